"""jobs.distributed.fetch_ahead: the first item is fetched before anyone asks for it, and the
iterator still yields every item once, in order (nothing else: no Ray needed)."""

import threading

import pytest

from interestformer.jobs.distributed import fetch_ahead


def test_the_first_item_is_fetched_in_the_background_and_every_item_follows_in_order():
    asked = threading.Event()

    def batches():
        asked.set()
        yield from range(5)

    ahead = fetch_ahead(batches())
    assert asked.wait(timeout=10), "the first item was not fetched until the caller asked for it"
    assert list(ahead) == [0, 1, 2, 3, 4]
    assert list(fetch_ahead(iter(()))) == []


def test_an_error_fetching_the_first_item_reaches_the_caller():
    def broken():
        raise OSError("pipeline failed")
        yield

    ahead = fetch_ahead(broken())
    with pytest.raises(OSError, match="pipeline failed"):
        next(ahead)

"""Training batches stream to the workers exactly once per epoch: more Parquet shards than
workers, an uneven number of packed batches, and no row lost or repeated (real Ray Data); and
batches are full whatever the shards' sizes, so a short batch never costs an extra step."""

import os
import threading
from collections import Counter

import pytest

from interestformer.datasets.pipeline import sequence_batches, unpack
from interestformer.datasets.prepare import prepare
from interestformer.jobs.config import load_config
from interestformer.jobs.distributed import ExactSplit

from conftest import PROJECT_DIR

pytestmark = pytest.mark.slow  # prepares the tiny demo data: about half a minute

WORKERS = 2


def user_windows(rows) -> Counter:
    """Each packed row's users as (history, targets) tuples, counted: the multiset of user windows
    trained on (windows that happen to be equal are counted, not merged)."""
    seen = Counter()
    for row in rows:
        batch = unpack(row)
        for history, targets in zip(batch["history"].tolist(), batch["targets"].tolist()):
            seen[(tuple(history), tuple(targets))] += 1
    return seen


def test_every_user_window_reaches_exactly_one_worker_each_epoch(ray_local, tmp_path):
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [
        f"data.prepared_dir={tmp_path / 'prepared'}",
        "data.sequence_shards=5",  # more shards (and blocks) than workers
    ])
    prepared = prepare(cfg.data)
    # 3 users a batch: the batches cannot split evenly over the workers every epoch.
    batches = sequence_batches(prepared, "train", 3, cfg.data.max_seq_len, num_negatives=4, text=False, image=False)
    rows = list(batches.iter_torch_batches(batch_size=1))
    sizes = sorted((len(unpack(row)["history"]) for row in rows), reverse=True)
    assert sizes[:-1] == [3] * (len(rows) - 1), f"short batches besides the last: {sizes}"
    expected = user_windows(rows)
    assert sum(expected.values()) == prepared.report()["users"] - prepared.report()["users_too_short"]

    shares = ExactSplit().configure({"train": batches}, WORKERS, None, None)
    for epoch in range(2):
        seen = [Counter() for _ in range(WORKERS)]
        rows_per_worker = [0] * WORKERS

        def consume(rank):  # the workers of a split must read concurrently, as Ray Train's do
            rows = list(shares[rank]["train"].iter_torch_batches(batch_size=1))
            rows_per_worker[rank] = len(rows)
            seen[rank] = user_windows(rows)

        threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert all(rows_per_worker), rows_per_worker  # every worker got a share
        # Counted windows: a lost or repeated one changes a count (equal windows of different
        # users, which the tiny data has, may land on both workers).
        assert seen[0] + seen[1] == expected, f"epoch {epoch}: lost or repeated user windows"

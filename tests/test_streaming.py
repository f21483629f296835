"""How a run's datasets reach its workers (jobs.distributed.WorkerShares, real Ray Data, more
Parquet shards than workers): training rows (one a user) in equal shares, every user at most
once an epoch and at most world_size - 1 left out; evaluation rows (packed batches) split
exactly, none lost or repeated."""

import os
import threading
from collections import Counter

import pytest

from interestformer.datasets.pipeline import sequence_batches, training_batches, unpack
from interestformer.datasets.prepare import prepare
from interestformer.jobs.config import load_config
from interestformer.jobs.distributed import WorkerShares
from interestformer.jobs.train import batch_packer, training_rows

from conftest import PROJECT_DIR

pytestmark = pytest.mark.slow  # prepares the tiny demo data: about half a minute

WORKERS = 2


def windows(batches) -> Counter:
    """Each batch's users as (history, targets) tuples, counted: the multiset of user windows
    (windows that happen to be equal are counted, not merged). An evaluation row has one target."""
    seen = Counter()
    for batch in batches:
        for history, targets in zip(batch["history"].tolist(), batch["targets"].tolist()):
            seen[(tuple(history), tuple(targets) if isinstance(targets, list) else targets)] += 1
    return seen


def read_concurrently(shares, read) -> list:
    """read(rank's share) on every rank at once, as Ray Train's workers read a split."""
    out = [None] * len(shares)

    def consume(rank):
        out[rank] = read(shares[rank])

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(len(shares))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return out


@pytest.fixture(scope="module")
def tiny(ray_local, tmp_path_factory):
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [
        f"data.prepared_dir={tmp_path_factory.mktemp('prepared')}",
        "data.sequence_shards=5",  # more shards (and blocks) than workers
        "train.micro_batch_size=3",  # users cannot split evenly over the workers every epoch
    ])
    return cfg, prepare(cfg.data)


def test_training_rows_reach_the_workers_in_equal_shares_each_user_at_most_once(tiny):
    cfg, prepared = tiny
    packer = batch_packer(prepared, cfg)
    whole = windows(training_batches(training_rows(prepared, cfg), packer, 3))
    users = prepared.report()["users"] - prepared.report()["users_too_short"]
    workers = 7  # 60 users: 8 each, 4 sit out
    assert sum(whole.values()) == users and users % workers

    shares = WorkerShares().configure({"train": training_rows(prepared, cfg)}, workers, None, None)
    for epoch in range(2):
        batches = read_concurrently([share["train"] for share in shares],
                                    lambda share: list(training_batches(share, packer, 3, epoch)))
        # The same number of batches and users on every worker: they step together, no lending.
        assert len({len(b) for b in batches}) == 1 and len({sum(len(x["history"]) for x in b) for b in batches}) == 1
        # One batch at most is short (Ray Data's formatting threads may hand it over before the last).
        assert all(sorted(len(batch["history"]) for batch in share)[1:] == [3] * (len(share) - 1) for share in batches)
        seen = sum((windows(b) for b in batches), Counter())
        assert not seen - whole, f"epoch {epoch}: a user window twice or made up"
        assert sum((whole - seen).values()) == users % workers, f"epoch {epoch}: more users left out than the split needs"


def test_evaluation_rows_are_split_exactly(tiny):
    cfg, prepared = tiny
    rows = sequence_batches(prepared, "validation", 3, cfg.data.max_seq_len)
    expected = windows(unpack(row) for row in rows.iter_torch_batches(batch_size=1))
    shares = WorkerShares().configure({"train": training_rows(prepared, cfg), "validation": rows}, WORKERS, None, None)
    for epoch in range(2):
        seen = read_concurrently([share["validation"] for share in shares], lambda share: windows(
            unpack(row) for row in share.iter_torch_batches(batch_size=1)))
        assert all(seen), "every worker gets a share"
        assert seen[0] + seen[1] == expected, f"pass {epoch}: lost or repeated evaluation rows"

"""The evaluation protocol on a tiny hand-made dataset: metrics against values computed by hand,
and the cold-start splits (items, and users, held out of training entirely). Real Parquet, real
Ray Data."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from interestformer.datasets.config import DataConfig
from interestformer.datasets.pipeline import cold_items, is_new_user, sequence_batches, unpack
from interestformer.datasets.prepare import prepare
from interestformer.jobs.config import JobConfig
from interestformer.jobs.evaluate import evaluate_most_popular

from conftest import one_epoch_of_training_batches

pytestmark = pytest.mark.slow  # a real prepare job: about 20 s

# Each user's items, oldest first. The last is the test target, the one before it validates.
SEQUENCES = {
    "u1": ["a", "a", "b", "c"],
    "u2": ["a", "b", "b", "d"],
    "u3": ["b", "a", "c", "a"],
    "u4": ["c", "a", "e"],
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("tiny")
    (root / "events").mkdir()
    (root / "items").mkdir()
    rows = [(user, item, t) for user, items in SEQUENCES.items() for t, item in enumerate(items)]
    users, items, times = zip(*rows)
    pq.write_table(pa.table({"user_id": list(users), "item_id": list(items), "timestamp": list(times)}),
                   root / "events" / "part-0.parquet")
    pq.write_table(pa.table({"item_id": list("abcde"), "title": ["A", "B", "C", "D", "E"]}),
                   root / "items" / "part-0.parquet")
    cfg = DataConfig(source="parquet", events_path=str(root / "events"), items_path=str(root / "items"),
                     prepared_dir=str(root / "prepared"), text_columns=["title"], sequence_shards=1)
    return prepare(cfg)


def job_config(cold_fraction: float = 0.0, new_user_fraction: float = 0.0) -> JobConfig:
    return JobConfig.from_dict({"eval": {"ks": [1, 3]}, "train": {"select_metric": "val_ndcg@3"},
                                "data": {"cold_item_fraction": cold_fraction, "new_user_fraction": new_user_fraction}})


def most_popular(prepared, split: str, cold_fraction: float = 0.0, new_user_fraction: float = 0.0) -> dict:
    cfg = job_config(cold_fraction, new_user_fraction)
    rows = sequence_batches(prepared, split, 8, 10, cold_fraction=cold_fraction,
                            new_user_fraction=new_user_fraction).iter_torch_batches(batch_size=1)
    return evaluate_most_popular(prepared, rows, cfg, split).report()


def test_most_popular_test_metrics_match_hand_computed(prepared):
    # Counts before each test target: a 5, b 4, c 2, d 0, e 0. Ties rank against the target.
    # u1's c: a, b ahead -> rank 2; u2's d: ties with e, below a, b, c -> rank 4; u3's a -> rank 0;
    # u4's e -> rank 4.
    ranks = [2, 4, 0, 4]
    metrics = most_popular(prepared, "test")
    assert metrics["users"] == 4
    assert metrics["hr@1"] == pytest.approx(0.25)
    assert metrics["hr@3"] == pytest.approx(0.5)
    assert metrics["ndcg@3"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(2)) / 4)  # 0.375
    assert metrics["mrr"] == pytest.approx(sum(1 / (r + 1) for r in ranks) / 4)
    # Segments, at K = 10: every user has 2 or 3 events before the target; d and e never occur in
    # training (u2's and u4's targets are cold).
    assert metrics["segment/history_1-3/users"] == 4 and "segment/history_4-20/users" not in metrics
    assert metrics["segment/target_cold/users"] == metrics["segment/target_warm/users"] == 2
    assert metrics["segment/target_cold/ndcg@10"] == pytest.approx(1 / math.log2(6))  # ranks 4, 4
    assert metrics["segment/target_warm/ndcg@10"] == pytest.approx((1 / math.log2(4) + 1) / 2)  # ranks 2, 0
    assert metrics["segment/target_cold/hr@10"] == metrics["segment/history_1-3/hr@10"] == 1.0


def test_most_popular_validation_metrics_match_hand_computed(prepared):
    # Training events only (all but each user's last two): a 4, b 2, c 1, d 0, e 0.
    # Validation targets: u1 b -> rank 1, u2 b -> 1, u3 c -> 2, u4 a -> 0.
    metrics = most_popular(prepared, "validation")
    assert metrics["hr@1"] == pytest.approx(0.25)
    assert metrics["hr@3"] == pytest.approx(1.0)
    assert metrics["ndcg@3"] == pytest.approx((2 / math.log2(3) + 1 / math.log2(4) + 1) / 4)
    assert metrics["mrr"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3 + 1) / 4)


def no_filter_warnings(recwarn):
    """Ray Data warns on every filter by a Python function; the splits filter block by block instead."""
    assert not [str(w.message) for w in recwarn if "filter" in str(w.message)]


def test_cold_items_never_reach_training_and_are_the_cold_split_targets(prepared, recwarn):
    fraction = 0.4  # 2 of the 5 items
    cold = set(cold_items(prepared.num_items, fraction).tolist())
    assert len(cold) == 2 and cold == set(cold_items(prepared.num_items, fraction).tolist())  # fixed choice

    def batches(split):
        if split == "train":
            return one_epoch_of_training_batches(prepared, 8, 10, num_negatives=20, cold_fraction=fraction)
        rows = sequence_batches(prepared, split, 8, 10, cold_fraction=fraction)
        return [unpack(row) for row in rows.iter_batches(batch_size=1, batch_format="numpy")]

    for batch in batches("train"):
        seen = {int(i) for name in ("history", "targets", "unique_items") for i in batch[name].ravel()}
        assert not seen & cold, "a held-out item reached training (history, target or negative)"
    test_targets = np.concatenate([b["targets"] for b in batches("test")])
    cold_batches = batches("cold")
    cold_targets = np.concatenate([b["targets"] for b in cold_batches])
    assert sorted(cold_targets) == sorted(t for t in test_targets if t in cold)
    for batch in cold_batches:
        assert not set(batch["history"].ravel()) & cold  # histories never show a held-out item
    # Held-out items have no training popularity, so most-popular ranks them last.
    metrics = most_popular(prepared, "cold", fraction)
    assert metrics["users"] == len(cold_targets) and metrics["hr@3"] == 0.0
    no_filter_warnings(recwarn)


def test_new_users_never_train_and_are_ranked_after_each_of_their_first_events(prepared, recwarn):
    fraction = 0.5  # u3 and u4, by their ids' hashes; u4 has too few events to be ranked after 3
    assert [user for user in SEQUENCES if is_new_user(user, fraction)] == ["u3", "u4"]

    def batches(split):
        if split == "train":
            return one_epoch_of_training_batches(prepared, 8, 10, num_negatives=2, new_user_fraction=fraction)
        rows = sequence_batches(prepared, split, 8, 10, new_user_fraction=fraction)
        return [unpack(row) for row in rows.iter_batches(batch_size=1, batch_format="numpy")]

    assert sum(len(batch["history"]) for batch in batches("train")) == 2  # u1 and u2 only
    [rows] = batches("new_users")
    # u3: b a c a, ranked with no event (-> b), after b (-> a), after b a (-> c), after b a c (-> a).
    assert rows["targets"].tolist() == [2, 1, 3, 1]
    assert rows["history_length"].tolist() == (rows["history"] > 0).sum(1).tolist() == [0, 1, 2, 3]
    assert rows["history"][3, -3:].tolist() == [2, 1, 3]
    # Training events (all but each user's last two): a 4, b 2, c 1 -> ranks 1, 0, 2, 0.
    metrics = most_popular(prepared, "new_users", new_user_fraction=fraction)
    assert metrics["users"] == 4 and metrics["hr@1"] == pytest.approx(0.5) and metrics["hr@3"] == 1.0
    assert metrics["segment/history_0/users"] == 1 and metrics["segment/history_1-3/users"] == 3
    assert metrics["segment/history_0/hr@10"] == 1.0
    no_filter_warnings(recwarn)


def test_train_since_keeps_the_users_with_a_training_target_from_then_on(prepared, recwarn):
    def training_users(since: int) -> int:
        return sum(len(batch["history"]) for batch in one_epoch_of_training_batches(prepared, 8, 10, num_negatives=2,
                                                                                     train_since=since))

    # Each user trains on all but their last two events: u1-u3's last training target is at time 1,
    # u4 (3 events) has none after time 0.
    assert training_users(0) == 4 and training_users(1) == 3
    no_filter_warnings(recwarn)

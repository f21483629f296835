"""Sequence building, time split and bad-row accounting on hand-made Parquet logs (real Ray Data)."""


import dataclasses
import io
import os
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from interestformer.errors import ConfigError
from interestformer.datasets.config import DataConfig
from interestformer.datasets.pipeline import TrainingBatches, by_history_length, catalogue_rows, sequence_batches, unpack
from interestformer.datasets.prepare import DataQualityError, PreparedData, _fingerprint, _user_sequences, input_paths, prepare

from conftest import one_epoch_of_training_batches

pytestmark = pytest.mark.slow  # real Ray Data jobs: about a minute


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_logs(root, events_rows: list[list[tuple]]):
    """Each entry of events_rows is one shard: (user_id, item_id, timestamp, event_type)."""
    (root / "events").mkdir(parents=True)
    (root / "items").mkdir()
    for i, rows in enumerate(events_rows):
        users, items, times, types = zip(*rows)
        pq.write_table(pa.table({
            "user_id": pa.array(users, pa.string()),
            "item_id": pa.array(items, pa.string()),
            "timestamp": pa.array(times, pa.float64()),  # floats, so NaN can occur as in real logs
            "event_type": pa.array(types, pa.string()),
        }), root / "events" / f"part-{i}.parquet")
    (root / "green.png").write_bytes(png("green"))
    pq.write_table(pa.table({
        "item_id": ["a", "b", "c", "d", "e", "c"],  # "c" twice: the second row is set aside
        "title": ["Crème brûlée", "Naïve art", "Café", "Dogs", "Eels", "Café again"],
        "image": pa.array([png("red"), b"\xff\xd8 not really a jpeg", None, png("blue"), None, None], pa.binary()),
        "image_uri": [None, None, None, None, str(root / "green.png"), None],  # e's image is a file
    }), root / "items" / "part-0.parquet")


SHARDS = [
    [
        ("u1", "a", 10, "view"),
        ("u1", "b", 5, "click"),
        ("u1", "c", 10, "view"),       # same second as "a": ordered by item after time
        ("u1", "b", 5, "click"),       # exact duplicate of an event above
        ("u1", "b", 20, "view"),       # re-consumption later: kept
        ("u1", "zzz", 7, "view"),      # not in the catalogue
        (None, "a", 3, "view"),        # no user
        ("u1", "d", -5, "view"),       # negative time
        ("u1", "d", float("nan"), "view"),
        ("u2", "a", 1, "view"),        # the only event of u2
        ("u3", "c", 1, "view"),
        ("u3", "d", 2, "purchase"),
    ],
    [   # u4's events are split over two shards
        ("u4", "e", 4, "view"),
        ("u4", "a", 1, "view"),
    ],
    [
        ("u4", "c", 3, None),          # no event type: the default one
        ("u4", "b", 2, "view"),
    ],
]


def log_config(root) -> DataConfig:
    """The data config of the logs written under root."""
    return DataConfig(source="parquet", events_path=str(root / "events"), items_path=str(root / "items"),
                      prepared_dir=str(root / "prepared"), max_seq_len=4, image_size=8, vocab_size=60,
                      sequence_shards=2, max_bad_fraction=0.5)


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory) -> PreparedData:
    root = tmp_path_factory.mktemp("logs")
    write_logs(root, SHARDS)
    return prepare(log_config(root))


def sequences(prepared: PreparedData) -> dict[str, dict]:
    table = pq.read_table(prepared.sequences_path).to_pylist()
    return {row["user_id"]: row for row in table}


def index(item_id: str) -> int:
    return "abcde".index(item_id) + 1  # items are indexed in sorted id order, from 1


def test_sequences_are_chronological_with_deterministic_ties(prepared):
    rows = sequences(prepared)
    assert rows["u1"]["items"] == [index("b"), index("a"), index("c"), index("b")]
    assert rows["u1"]["timestamps"] == [5, 10, 10, 20]
    assert rows["u1"]["num_duplicates"] == 1
    assert rows["u4"]["items"] == [index(i) for i in "abce"]  # merged across shards, by time
    assert rows["u4"]["event_types"] == ["view", "view", "interaction", "view"]
    assert rows["u2"]["num_events"] == 1


def test_sequences_are_written_in_sequence_shards_files_each_user_once(prepared):
    """data.sequence_shards sets the files (the parallelism of every later read), whatever the
    number of event files (3 here) and however Ray Data shuffles to group the users."""
    files = sorted(f for f in os.listdir(prepared.sequences_path) if f.endswith(".parquet"))
    assert len(files) == 2, files
    users = [u for f in files for u in pq.read_table(os.path.join(prepared.sequences_path, f)).column("user_id").to_pylist()]
    assert sorted(users) == ["u1", "u2", "u3", "u4"]


def test_a_block_of_many_users_becomes_a_sequence_per_user_in_any_row_order():
    """Prepare builds every sequence of a block at once: users interleaved, in several chunks,
    with duplicates, ties and re-consumption, give what one user at a time gives."""
    events = [("u2", 3, 7, "view"), ("u1", 2, 5, "view"), ("u2", 1, 7, "view"), ("u1", 2, 5, "view"),
              ("u1", 2, 5, "click"), ("u10", 4, 1, "view"), ("u1", 1, 9, "view"), ("u1", 2, 9, "view"),
              ("u2", 3, 7, "view"), ("u2", 3, 7, "view")]
    users, items, times, types = zip(*events)
    table = pa.table({"user_id": pa.array(users), "item_index": pa.array(items, pa.int32()),
                      "timestamp": pa.array(times, pa.int64()), "event_type": pa.array(types)})
    rows = _user_sequences(pa.concat_tables([table.slice(0, 4), table.slice(4)])).to_pylist()
    assert rows == [
        {"user_id": "u1", "items": [2, 2, 1, 2], "event_types": ["click", "view", "view", "view"],
         "timestamps": [5, 5, 9, 9], "num_events": 4, "num_duplicates": 1},
        {"user_id": "u10", "items": [4], "event_types": ["view"], "timestamps": [1], "num_events": 1,
         "num_duplicates": 0},
        {"user_id": "u2", "items": [1, 3], "event_types": ["view", "view"], "timestamps": [7, 7], "num_events": 2,
         "num_duplicates": 2},
    ]
    assert _user_sequences(table.slice(0, 0)).num_rows == 0


def test_every_row_is_used_quarantined_or_counted_as_duplicate(prepared):
    report = prepared.report()
    events_in = sum(len(shard) for shard in SHARDS)
    assert report["events_in"] == events_in
    assert report["events_used"] == 4 + 1 + 2 + 4
    assert report["events_duplicate"] == 1
    assert report["events_unknown_item"] == 1
    assert report["events_null_user_id"] == 1
    assert report["events_bad_timestamp"] == 2
    assert report["items_image_undecodable"] == 1
    assert report["items_duplicate_item_id"] == 1
    assert (report["users"], report["users_too_short"], report["users_train_only"]) == (4, 1, 1)

    quarantine = pq.read_table(f"{prepared.path}/quarantine/events").to_pandas()
    assert sorted(quarantine["reason"]) == ["bad_timestamp", "bad_timestamp", "null_user_id", "unknown_item"]
    assert "zzz" in set(quarantine["item_id"])
    items = pq.read_table(prepared.items_path).to_pandas().set_index("item_id")
    assert len(items) == 5  # an item whose image is broken stays, without an image
    assert not items.loc["b", "has_image"] and items.loc["a", "has_image"]
    assert items.loc["e", "has_image"]  # read through its image_uri
    assert not items.loc["c", "has_image"]
    # Decoded and resized once, here: the table holds (3, 8, 8) pixels, which training reads as they are.
    red = np.frombuffer(items.loc["a", "pixels"], np.uint8).reshape(3, 8, 8)
    assert (red[0] == 255).all() and (red[1:] == 0).all()
    assert items.loc["b", "pixels"] is None and items.loc["c", "pixels"] is None
    item_quarantine = pq.read_table(f"{prepared.path}/quarantine/items").to_pandas()
    assert sorted(zip(item_quarantine["item_id"], item_quarantine["reason"])) == [
        ("b", "image_undecodable"), ("c", "duplicate_item_id")]


def test_time_split_last_for_test_one_before_for_validation(prepared):
    def rows_of(split):
        if split == "train":
            batches = one_epoch_of_training_batches(prepared, batch_size=8, max_seq_len=4)
        else:
            batches = [unpack(row) for row in sequence_batches(prepared, split, batch_size=8, max_seq_len=4)
                       .iter_torch_batches(batch_size=1)]
        return sorted(pair for batch in batches for pair in zip(batch["history"].tolist(), batch["targets"].tolist()))

    a, b, c, e = (index(i) for i in "abce")
    # u4 = a, b, c, e. u1 = b, a, c, b. u3 (2 events) trains only; u2 (1 event) nowhere.
    assert rows_of("test") == sorted([([0, a, b, c], e), ([0, b, a, c], b)])
    assert rows_of("validation") == sorted([([0, 0, a, b], c), ([0, 0, b, a], c)])
    train = rows_of("train")
    assert ([0, 0, 0, a], [0, 0, 0, b]) in train  # u4: a -> b
    assert ([0, 0, 0, index("c")], [0, 0, 0, index("d")]) in train  # u3 trains on both events
    assert len(train) == 3


def test_training_batches_carry_the_pixels_prepare_decoded(prepared):
    """A training batch's items have the same content as the catalogue stream (item vectors, the
    feature store): the pixels prepare decoded, zeros and has_image False where there is none."""
    catalogue = {}
    for row in catalogue_rows(prepared, batch_size=2, text=False, image=True).iter_rows():
        catalogue[row["item_index"]] = (row["pixels"], row["has_image"])
    assert sum(has for _, has in catalogue.values()) == 3  # a, d, e
    seen = set()
    for batch in one_epoch_of_training_batches(prepared, batch_size=8, max_seq_len=4, num_negatives=2, image=True):
        for j, item in enumerate(batch["unique_items"].tolist()[1:], start=1):  # 0 is padding
            pixels, has_image = catalogue[item]
            assert (batch["pixels"][j].numpy() == pixels).all() and bool(batch["has_image"][j]) == has_image
            seen.add(item)
    assert seen


def test_full_softmax_and_length_grouped_training_batches(prepared):
    """data.full_softmax: every item is a candidate of every training batch. data.group_by_length:
    the same training rows, cut from blocks sorted by history length."""
    def train_batches(**kwargs):
        return one_epoch_of_training_batches(prepared, batch_size=1, max_seq_len=4, **kwargs)

    every_item = list(range(prepared.num_items + 1))  # no item held out here; 0 is padding
    for batch in train_batches(num_negatives=None):
        assert batch["unique_items"].tolist() == every_item
    rows = sorted((b["history"].tolist(), b["targets"].tolist()) for b in train_batches())
    assert sorted((b["history"].tolist(), b["targets"].tolist()) for b in train_batches(group_by_length=True)) == rows

    block = pa.table({"user_id": ["x", "y", "z", "w"], "num_events": [5, 2, 9, 2]})
    assert by_history_length(block).column("user_id").to_pylist() == ["y", "w", "x", "z"]  # stable


def test_sampled_negatives_depend_on_the_seed_the_epoch_and_the_users_only(prepared):
    """Sampled negatives are drawn per (train.seed, epoch, the batch's users): two workers' packers
    (or two threads of one) draw the same for the same batch, whichever packs it; the draws change
    with the epoch, the users and the seed."""
    def negatives(packer, users, epoch):
        shape = (len(users), 4)
        rows = {"user_id": np.array(users), "history": np.zeros(shape, np.int64),
                "event_types": np.zeros(shape, np.int64), "targets": np.full(shape, index("a"))}
        return frozenset(packer.for_epoch(epoch)(rows)["unique_items"].tolist()) - {0, index("a")}

    worker_0, worker_1, other_seed = (TrainingBatches(prepared, 1, False, False, seed, 0.0) for seed in (0, 0, 1))
    epochs = range(16)
    draws = [negatives(worker_0, ["u1", "u2"], epoch) for epoch in epochs]
    assert draws == [negatives(worker_1, ["u1", "u2"], epoch) for epoch in epochs]
    assert len(set(draws)) > 1  # another epoch, other negatives
    assert draws != [negatives(worker_0, ["u1", "u3"], epoch) for epoch in epochs]
    assert draws != [negatives(other_seed, ["u1", "u2"], epoch) for epoch in epochs]


def test_batching_keys_reuse_the_prepared_data_and_shaping_keys_do_not(prepared):
    """A continued run (train_since), held-out users or items, another window or other negatives
    read the same prepared files: prepare() returns them untouched. A key that shapes the files
    (here the number of sequence shards) gives another fingerprint, so they are prepared again."""
    cfg = log_config(pathlib.Path(prepared.path).parent)
    files = sorted(pathlib.Path(prepared.sequences_path).rglob("*.parquet"))
    written = [f.stat().st_mtime_ns for f in files]
    again = prepare(dataclasses.replace(cfg, max_seq_len=8, num_negatives=3, cold_item_fraction=0.2,
                                        new_user_fraction=0.1, train_since=15))
    assert again.meta["fingerprint"] == prepared.meta["fingerprint"]
    assert files and [f.stat().st_mtime_ns for f in files] == written

    def fingerprint(c):
        return _fingerprint(c, "", *input_paths(c))

    assert fingerprint(dataclasses.replace(cfg, sequence_shards=3)) != fingerprint(cfg)
    # The same files from another folder (here a link to it) are the same input; a changed file is not.
    root = pathlib.Path(cfg.events_path).parent
    elsewhere = root.parent / f"{root.name}-link"
    elsewhere.symlink_to(root)
    assert fingerprint(dataclasses.replace(cfg, events_path=str(elsewhere / "events"),
                                           items_path=str(elsewhere / "items"))) == fingerprint(cfg)
    touched = sorted((root / "items").rglob("*.parquet"))[0]
    times = touched.stat().st_atime_ns, touched.stat().st_mtime_ns
    os.utime(touched, ns=(times[0], times[1] + 10**9))
    assert fingerprint(cfg) != again.meta["fingerprint"]
    os.utime(touched, ns=times)  # the module's other tests share these files


def test_too_much_bad_input_stops_the_job_with_the_counts(ray_local, tmp_path):
    write_logs(tmp_path, [[("u1", "zzz", 1, "view"), ("u1", "yyy", 2, "view"), ("u1", "a", 3, "view")]])
    cfg = DataConfig(source="parquet", events_path=str(tmp_path / "events"), items_path=str(tmp_path / "items"),
                     prepared_dir=str(tmp_path / "prepared"), max_bad_fraction=0.5, vocab_size=60)
    with pytest.raises(DataQualityError, match=r"2 of 3 events are unusable"):
        prepare(cfg)


def test_timestamps_are_checked_against_the_reference_time_not_only_the_clock():
    import time

    import pandas as pd

    from interestformer.datasets.schema import tag_events

    now = int(time.time())
    batch = pd.DataFrame({"user_id": ["u", "u", "u"], "item_id": ["a", "a", "a"],
                          "timestamp": [1_000_000, now - 3600, now + 10 * 86400]})
    by_clock = tag_events(batch, {"a": 1}).column("reason").to_pylist()
    assert by_clock == [None, None, "bad_timestamp"]  # ten days ahead of the clock
    # A reference time in the past makes the same log prepare the same way on any later date.
    pinned = tag_events(batch, {"a": 1}, reference_time=2_000_000).column("reason").to_pylist()
    assert pinned == [None, "bad_timestamp", "bad_timestamp"]
    ahead = tag_events(batch, {"a": 1}, reference_time=now + 30 * 86400).column("reason").to_pylist()
    assert ahead == [None, None, None]
    with pytest.raises(ConfigError, match="reference_time"):
        DataConfig(reference_time=-1)

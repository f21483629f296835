"""The demo dataset: schema, determinism, caching, corrupt inputs, and that it carries real signal."""

import io
import itertools
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from interestformer.errors import ConfigError
from interestformer.datasets.demo import DemoDataConfig, generate_demo

SMALL = dict(num_users=50, num_items=40, num_topics=4, image_size=32, num_shards=3)

EVENTS_SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                           ("timestamp", pa.int64()), ("event_type", pa.string()),
                           ("value", pa.float64())])
ITEMS_SCHEMA = pa.schema([("item_id", pa.string()), ("title", pa.string()),
                          ("description", pa.string()), ("image", pa.binary()),
                          ("image_uri", pa.string()), ("topic", pa.int32())])


def _shards(out, sub):
    return sorted(os.path.join(out, sub, f) for f in os.listdir(os.path.join(out, sub)))


def _read(out):
    events = pa.concat_tables(pq.read_table(p) for p in _shards(out, "events"))
    return events, pq.read_table(_shards(out, "items")[0])


def _decodes(data, size):
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception:
        return False
    assert img.size == (size, size)
    return True


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo_small"))
    cfg = DemoDataConfig(**SMALL)
    return out, cfg, generate_demo(out, cfg)


@pytest.fixture(scope="module")
def topical(tmp_path_factory):
    """More topics than the small config, so topic concentration is not trivially high."""
    out = str(tmp_path_factory.mktemp("demo_topical"))
    cfg = DemoDataConfig(num_users=120, num_items=240, num_topics=12, image_size=16, num_bad_images=0)
    generate_demo(out, cfg)
    return _read(out)


def test_files_schema_and_summary(small):
    out, cfg, summary = small
    assert [os.path.basename(p) for p in _shards(out, "events")] == [
        f"part-{s:05d}.parquet" for s in range(cfg.num_shards)]
    assert os.path.exists(os.path.join(out, "items", "part-00000.parquet"))
    for p in _shards(out, "events"):
        assert pq.read_schema(p).remove_metadata() == EVENTS_SCHEMA
    events, items = _read(out)
    assert items.schema.remove_metadata() == ITEMS_SCHEMA

    assert summary["path"] == out
    assert summary["events"] == events.num_rows
    assert summary["users"] == len(set(events["user_id"].to_pylist())) == cfg.num_users
    assert summary["items"] == items.num_rows == cfg.num_items
    catalogue = set(items["item_id"].to_pylist())
    unknown = [i for i in events["item_id"].to_pylist() if i not in catalogue]
    assert summary["bad_events"] == len(unknown) == round(cfg.bad_event_fraction * events.num_rows)
    assert summary["bad_images"] == cfg.num_bad_images

    assert set(events["event_type"].to_pylist()) <= {"view", "click", "purchase"}
    assert events["event_type"].to_pylist().count("view") > events.num_rows / 2
    assert events["value"].null_count == 0
    assert items["image_uri"].null_count == items.num_rows
    assert all(u.startswith("u") and len(u) == 7 for u in events["user_id"].to_pylist())
    assert all(i.startswith("i") and len(i) == 7 for i in catalogue)


def test_users_sharded_and_rows_shuffled(small):
    out, _, _ = small
    owners = [set(pq.read_table(p)["user_id"].to_pylist()) for p in _shards(out, "events")]
    for a, b in itertools.combinations(owners, 2):
        assert not a & b  # a user's events sit in exactly one shard
    users = pq.read_table(_shards(out, "events")[0])["user_id"].to_pylist()
    assert users != sorted(users)  # the pipeline has to sort


def test_same_seed_same_bytes_and_cache(small, tmp_path):
    out, cfg, summary = small
    again = str(tmp_path / "again")
    assert generate_demo(again, DemoDataConfig(**SMALL)) == {**summary, "path": again}
    for sub in ("events", "items"):
        for a, b in zip(_shards(out, sub), _shards(again, sub), strict=True):
            with open(a, "rb") as fa, open(b, "rb") as fb:
                assert fa.read() == fb.read()

    # the second call with the same config reuses the files
    stamps = {p: os.stat(p).st_mtime_ns for p in _shards(again, "events") + _shards(again, "items")}
    stamps[os.path.join(again, "_SUCCESS")] = os.stat(os.path.join(again, "_SUCCESS")).st_mtime_ns
    assert generate_demo(again, DemoDataConfig(**SMALL)) == {**summary, "path": again}
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps

    # a different config regenerates and leaves no stale shards behind
    other = generate_demo(again, DemoDataConfig(**{**SMALL, "num_shards": 2, "seed": 1}))
    assert len(_shards(again, "events")) == 2
    assert other["events"] == _read(again)[0].num_rows


def test_images_decode_except_the_bad_ones(small):
    out, cfg, _ = small
    _, items = _read(out)
    ok = [_decodes(b, cfg.image_size) for b in items["image"].to_pylist()]
    assert ok.count(False) == cfg.num_bad_images
    formats = {Image.open(io.BytesIO(b)).format for b, good in zip(items["image"].to_pylist(), ok) if good}
    assert formats == {"JPEG", "PNG"}


def test_title_words_follow_topics(topical):
    _, items = topical
    words = [set(t.lower().split()) for t in items["title"].to_pylist()]
    topic = items["topic"].to_pylist()
    same, diff = [], []
    for i, j in itertools.combinations(range(len(words)), 2):
        (same if topic[i] == topic[j] else diff).append(len(words[i] & words[j]) / len(words[i] | words[j]))
    assert np.mean(same) > 0.1
    assert np.mean(same) > 4 * np.mean(diff)


def test_users_concentrate_on_few_topics(topical):
    events, items = topical
    topic_of = dict(zip(items["item_id"].to_pylist(), items["topic"].to_pylist()))
    per_user = {}
    for u, i in zip(events["user_id"].to_pylist(), events["item_id"].to_pylist()):
        if i in topic_of:
            per_user.setdefault(u, []).append(topic_of[i])
    top3 = [np.sort(np.bincount(t, minlength=12))[-3:].sum() / len(t) for t in per_user.values()]
    assert np.mean(top3) > 0.6  # uniform over 12 topics would give ~0.25-0.4


def test_timestamps_increase_and_sequences_long_enough(topical):
    events, _ = topical
    by_user = {}
    for u, ts in zip(events["user_id"].to_pylist(), events["timestamp"].to_pylist()):
        by_user.setdefault(u, []).append(ts)
    for ts in by_user.values():
        assert len(ts) >= 3
        ts = sorted(ts)
        assert all(a < b for a, b in zip(ts, ts[1:]))  # no ties: the order is unambiguous
    start = min(min(ts) for ts in by_user.values())
    end = max(max(ts) for ts in by_user.values())
    # A fixed window: starts on 2025-01-01 and ends before 2026-03-01, whatever today's date, so
    # prepare's check against the wall clock never sets any of it aside.
    assert 1735689600 <= start and end < 1772323200


def test_bad_config_is_rejected():
    with pytest.raises(ConfigError):
        DemoDataConfig(num_items=3, num_topics=4)
    with pytest.raises(ConfigError):
        DemoDataConfig(short_term_prob=1.5)

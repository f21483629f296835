"""The bad-input corpus (tests/bad_input, see its EXPECTED.md) through the real prepare job:
every broken row or file is counted by reason and set aside, nothing valid is lost, and the job
fails with a clear message only past data.max_bad_fraction."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from interestformer.datasets.config import DataConfig
from interestformer.datasets.prepare import DataQualityError, prepare

from conftest import PROJECT_DIR

pytestmark = pytest.mark.slow  # a real prepare job: about 30 s

CORPUS = os.path.join(PROJECT_DIR, "tests", "bad_input")


def config(tmp_path, **overrides) -> DataConfig:
    return DataConfig(source="parquet", events_path=os.path.join(CORPUS, "events"),
                      items_path=os.path.join(CORPUS, "items"), prepared_dir=str(tmp_path / "prepared"),
                      text_columns=["title"], text_max_tokens=12, sequence_shards=2, **overrides)


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    return prepare(config(tmp_path_factory.mktemp("bad")))


def test_every_broken_row_and_file_is_counted_by_reason(prepared):
    report = prepared.report()
    expected = {
        "events_null_user_id": 2, "events_null_item_id": 2, "events_bad_timestamp": 3, "events_unknown_item": 1,
        "events_duplicate": 1,
        "events_files_shard_unreadable": 2, "events_files_shard_missing_column": 1,
        "events_files_shard_mistyped_column": 1, "events_shard_missing_column": 5, "events_shard_mistyped_column": 7,
        "items_files_shard_unreadable": 1, "items_image_undecodable": 4,
        "users": 30 + 5 + 1, "users_too_short": 1, "items": 20,
    }
    assert {key: report.get(key) for key in expected} == expected
    for reason in ("shard_unreadable", "shard_missing_column", "bad_timestamp", "image_undecodable"):
        assert reason in prepared.meta["reasons"]  # each reason is explained in meta.json


def test_rows_in_equal_rows_used_plus_set_aside(prepared):
    readable = [f for f in os.listdir(os.path.join(CORPUS, "events")) if f.startswith(("part-0", "part-1", "part-3",
                                                                                        "part-4", "part-5"))]
    rows_in = sum(pq.read_metadata(os.path.join(CORPUS, "events", f)).num_rows for f in readable)
    report = prepared.report()
    set_aside = sum(v for k, v in report.items() if k.startswith("events_") and not k.startswith("events_files_")
                    and k not in ("events_in", "events_used", "events_duplicate"))
    assert report["events_in"] == rows_in
    assert rows_in == report["events_used"] + report["events_duplicate"] + set_aside
    used = ray.data.read_parquet(prepared.sequences_path).sum("num_events")
    assert used == report["events_used"]


def test_set_aside_rows_and_files_are_written_with_their_reason(prepared):
    rows = ray.data.read_parquet(os.path.join(prepared.path, "quarantine", "events")).to_pandas()
    assert rows["reason"].value_counts().to_dict() == {"null_user_id": 2, "null_item_id": 2, "bad_timestamp": 3,
                                                       "unknown_item": 1}
    with open(os.path.join(prepared.path, "quarantine", "shards.json")) as f:
        shards = json.load(f)
    by_file = {os.path.basename(s["path"]): s["reason"] for s in shards["events"] + shards["items"]}
    assert by_file == {
        "part-2-not-parquet.parquet": "shard_unreadable", "part-6-truncated.parquet": "shard_unreadable",
        "part-3-missing-timestamp.parquet": "shard_missing_column",
        "part-4-text-timestamp.parquet": "shard_mistyped_column", "part-1-not-parquet.parquet": "shard_unreadable",
    }
    items = ray.data.read_parquet(os.path.join(prepared.path, "quarantine", "items")).to_pandas()
    assert sorted(items["item_id"]) == ["m5", "m6", "m7", "m8"]  # zero-byte, truncated, not an image, bomb


def test_odd_text_is_decoded_and_bounded(prepared):
    from transformers import AutoTokenizer

    table = pq.read_table(prepared.items_path).to_pydict()
    tokens = dict(zip(table["item_id"], table["text_tokens"]))
    tokenizer = AutoTokenizer.from_pretrained(prepared.tokenizer_path)
    assert "caf" in tokenizer.decode(tokens["m3"], skip_special_tokens=True)  # latin-1 bytes did not fail
    assert len(tokens["m4"]) == 12 and all(t != tokenizer.pad_token_id for t in tokens["m4"])  # 1 MB cut to 12


def test_job_fails_clearly_only_past_the_threshold(ray_local, tmp_path):
    with pytest.raises(DataQualityError, match="max_bad_fraction=0.01"):
        prepare(config(tmp_path, max_bad_fraction=0.01))


def test_no_usable_file_fails_naming_what_was_set_aside(ray_local, tmp_path):
    bad = tmp_path / "events"
    bad.mkdir()
    (bad / "part-0.parquet").write_bytes(b"not parquet")
    pq.write_table(pa.table({"user_id": ["u"]}), bad / "part-1.parquet")
    cfg = DataConfig(source="parquet", events_path=str(bad), items_path=os.path.join(CORPUS, "items"),
                     prepared_dir=str(tmp_path / "prepared"), text_columns=["title"])
    with pytest.raises(DataQualityError, match="no usable event file.*shard_missing_column"):
        prepare(cfg)

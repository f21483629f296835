"""datasets/convert.py on small hand-made logs (CSV, TSV, JSON lines, sequences, an item table
with real images), bad rows of each kind included: what is written, what is set aside and why,
and that datasets/schema.py's own checks accept the output. The command line runs as a real
subprocess. No Ray: prepare is not run here."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from interestformer.datasets.convert import convert_events, convert_items, convert_sequences, main
from interestformer.datasets.schema import (
    EVENT_REQUIRED, ITEM_REQUIRED, load_image, normalise_items, shard_problem, tag_events,
)

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = os.path.join(PROJECT_DIR, ".venv", "bin", "python")
PYTHON = VENV_PYTHON if os.path.exists(VENV_PYTHON) else sys.executable

# Line numbers below are the file's (the header is line 1).
CSV_LOG = (
    "\ufeffuser,item,ts,kind,rating\n"        # 1  a byte-order mark before the header
    "u1,a,1700000000,view,4.5\n"              # 2
    "u1,b,1700000100.9,click,\n"              # 3  fractional seconds floor; empty value is null
    ",c,1700000200,view,1\n"                  # 4  null_user_id
    "u2,  ,1700000300,view,1\n"               # 5  null_item_id (blank)
    "u2,d,yesterday,view,1\n"                 # 6  bad_timestamp
    "u2,e,1700000400,view,five\n"             # 7  bad_value
    "u3,f,1700000500\n"                       # 8  wrong_field_count
    "\n"                                      # 9  blank: skipped, counted
    'u3,"g,h",1700000600,"buy\nnow",2\n'      # 10-11 quoted comma and newline: one record
    "u3,i,1700000700000,view,1\n"             # 12 milliseconds given as seconds: bad_timestamp
    "u3,j,-5,view,1\n"                        # 13 before 1970: bad_timestamp
)


def read_quarantine(report: dict) -> list[dict]:
    with open(report["quarantine"], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def accepted_events(out: str) -> list[dict]:
    """The written events, after checking each part against schema.py's shard and row checks:
    every part usable as a whole, and no row given a reason by tag_events."""
    parts = sorted(os.path.join(out, name) for name in os.listdir(out))
    assert parts and all(os.path.basename(p).startswith("part-") for p in parts)
    for part in parts:
        assert shard_problem(pq.read_schema(part), EVENT_REQUIRED) is None
    table = pq.read_table(out)
    item_index = {item: i + 1 for i, item in enumerate(sorted(set(table["item_id"].to_pylist())))}
    tagged = tag_events(table.to_pandas(), item_index)
    assert tagged["reason"].null_count == len(tagged), tagged["reason"].to_pylist()
    return table.to_pylist()


def test_csv_log(tmp_path):
    log = tmp_path / "log.csv"
    log.write_bytes(CSV_LOG.encode() + b"u4,k,1700000800,view,\xff\xfe\n")  # 14 not UTF-8
    out = tmp_path / "shop" / "events"
    report = convert_events(str(log), str(out), user="user", item="item", time_column="ts",
                            type_column="kind", value_column="rating")

    assert (report["rows_read"], report["rows_written"], report["rows_set_aside"]) == (11, 3, 8)
    assert report["set_aside"] == {"bad_timestamp": 3, "bad_value": 1, "not_utf8": 1, "null_item_id": 1,
                                   "null_user_id": 1, "wrong_field_count": 1}
    assert report["blank_lines"] == 1 and report["parts"] == 1 and report["files"] == 1
    assert set(report["reasons"]) == set(report["set_aside"])
    assert report["quarantine"] == str(tmp_path / "shop" / "quarantine" / "events_convert.jsonl")

    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.names == ["user_id", "item_id", "timestamp", "event_type", "value"]
    assert schema.types == [pa.string(), pa.string(), pa.int64(), pa.string(), pa.float64()]
    assert accepted_events(str(out)) == [
        {"user_id": "u1", "item_id": "a", "timestamp": 1700000000, "event_type": "view", "value": 4.5},
        {"user_id": "u1", "item_id": "b", "timestamp": 1700000100, "event_type": "click", "value": None},
        {"user_id": "u3", "item_id": "g,h", "timestamp": 1700000600, "event_type": "buy\nnow", "value": 2.0},
    ]

    aside = read_quarantine(report)
    assert [(r["line"], r["reason"]) for r in aside] == [
        (4, "null_user_id"), (5, "null_item_id"), (6, "bad_timestamp"), (7, "bad_value"),
        (8, "wrong_field_count"), (12, "bad_timestamp"), (13, "bad_timestamp"), (14, "not_utf8"),
    ]
    assert all(r["file"] == str(log) for r in aside)
    assert aside[0]["record"] == ",c,1700000200,view,1"
    assert aside[3]["record"] == "u2,e,1700000400,view,five" and "five" in aside[3]["detail"]
    assert aside[4]["detail"] == "3 fields; the header has 5"
    assert "--time-unit ms" in aside[5]["detail"] and aside[6]["detail"] == "before 1970"


def test_tsv_folder_gzip_and_milliseconds(tmp_path):
    logs = tmp_path / "logs"
    (logs / "day=2").mkdir(parents=True)
    with gzip.open(logs / "day=1.tsv.gz", "wt") as f:
        f.write("uid\tiid\tms\n7\t12\t1700000000999\n7\t\"13\"\t1700000001000\n8\t14\t17e11\n")
    (logs / "day=2" / "part.tab").write_text("uid\tiid\tms\textra\n"  # an extra column is fine
                                             "8\t15\t1700000002500\tx\n8\t16\tsoon\tx\n9\t17\t1700000003000\n")
    (logs / "_SUCCESS").write_text("")
    out = tmp_path / "events"
    report = convert_events(str(logs), str(out), user="uid", item="iid", time_column="ms", time_unit="ms")

    assert report["files"] == 2 and report["set_aside"] == {"bad_timestamp": 1, "wrong_field_count": 1}
    rows = accepted_events(str(out))
    assert pq.read_schema(out / "part-00000.parquet").names == ["user_id", "item_id", "timestamp"]
    assert [(r["user_id"], r["item_id"], r["timestamp"]) for r in rows] == [
        ("7", "12", 1700000000), ("7", '"13"', 1700000001), ("8", "14", 1700000000), ("8", "15", 1700000002),
    ]  # TSV has no quoting: quotes stay; milliseconds floor to seconds
    aside = read_quarantine(report)
    assert [(os.path.relpath(r["file"], logs), r["line"], r["reason"]) for r in aside] == [
        (os.path.join("day=2", "part.tab"), 3, "bad_timestamp"),
        (os.path.join("day=2", "part.tab"), 4, "wrong_field_count"),
    ]
    assert aside[1]["record"] == "9\t17\t1700000003000"


def test_jsonl_iso_times(tmp_path):
    lines = [
        {"user": 1, "item": 10, "time": "2024-05-01T12:30:00Z", "kind": "view"},
        {"user": 1, "item": 11, "time": "2024-05-01T14:30:00+02:00"},    # same instant; kind missing
        {"user": "2", "item": "x", "time": "2024-05-01 12:30:01.75", "kind": ""},  # no offset: UTC
        {"user": "2", "item": "y", "time": "2024-05-02", "kind": "buy"},  # a date: midnight UTC
        {"user": "3", "item": "z", "time": "May 1st"},
        {"user": "3", "item": "z", "time": 1714566600},                   # a number, not ISO text
        {"item": "z", "time": "2024-05-01T12:30:00Z"},
        {"user": "3", "item": None, "time": "2024-05-01T12:30:00Z"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"user": "4", "item"\n[1, 2, 3]\n\n'
    log = tmp_path / "log.ndjson"
    log.write_text(text)
    report = convert_events(str(log), str(tmp_path / "events"), user="user", item="item", time_column="time",
                            time_unit="iso", type_column="kind")

    noon = 1714566600  # 2024-05-01T12:30:00Z
    assert [(r["user_id"], r["item_id"], r["timestamp"], r["event_type"])
            for r in accepted_events(str(tmp_path / "events"))] == [
        ("1", "10", noon, "view"), ("1", "11", noon, None), ("2", "x", noon + 1, None), ("2", "y", 1714608000, "buy"),
    ]
    assert report["set_aside"] == {"bad_timestamp": 2, "invalid_json": 2, "null_item_id": 1, "null_user_id": 1}
    assert (report["rows_read"], report["blank_lines"]) == (10, 1)
    aside = read_quarantine(report)
    assert [(r["line"], r["reason"]) for r in aside] == [
        (5, "bad_timestamp"), (6, "bad_timestamp"), (7, "null_user_id"), (8, "null_item_id"),
        (9, "invalid_json"), (10, "invalid_json"),
    ]
    assert aside[4]["record"] == '{"user": "4", "item"' and aside[5]["detail"] == "a JSON list, not an object"


def test_sequences_ordinal_timestamps(tmp_path):
    source = tmp_path / "sequences.txt"
    source.write_text(
        "u1\ti3 i7  i2\n"          # 1  a double space is one separator
        "u2\ti7\n"                 # 2
        "no tab here i1 i2\n"      # 3  wrong_field_count
        "\ti1 i2\n"                # 4  null_user_id
        "u3\t\n"                   # 5  null_item_id: no items
        "u1\ti9 i3\n"              # 6  u1 again: continues after its first line
    )
    report = convert_sequences(str(source), str(tmp_path / "seq" / "events"))
    assert [(r["user_id"], r["item_id"], r["timestamp"]) for r in accepted_events(str(tmp_path / "seq" / "events"))] == [
        ("u1", "i3", 0), ("u1", "i7", 1), ("u1", "i2", 2), ("u2", "i7", 0), ("u1", "i9", 3), ("u1", "i3", 4),
    ]
    assert (report["rows_read"], report["rows_written"], report["events_written"], report["users"]) == (6, 3, 6, 2)
    assert report["set_aside"] == {"null_item_id": 1, "null_user_id": 1, "wrong_field_count": 1}
    assert [(r["line"], r["reason"], r["record"]) for r in read_quarantine(report)] == [
        (3, "wrong_field_count", "no tab here i1 i2"), (4, "null_user_id", "\ti1 i2"), (5, "null_item_id", "u3\t"),
    ]

    commas = tmp_path / "commas.tsv"
    commas.write_text("u1\ta,b,c,\nu2\ta,,b\n")  # a trailing separator is fine; an empty item is not
    report = convert_sequences(str(commas), str(tmp_path / "commas" / "events"), separator=",")
    assert [r["timestamp"] for r in accepted_events(str(tmp_path / "commas" / "events"))] == [0, 1, 2]
    assert [(r["reason"], r["detail"]) for r in read_quarantine(report)] == [("null_item_id", "empty item at position 2")]


def _png(path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 8), colour).save(path, format="PNG")


def test_items_text_and_images(tmp_path):
    catalogue = tmp_path / "catalogue"
    _png(catalogue / "a.png", (255, 0, 0))
    _png(catalogue / "img" / "b.png", (0, 255, 0))
    _png(tmp_path / "elsewhere" / "c.png", (0, 0, 255))
    table = catalogue / "items.csv"
    table.write_text(
        "sku,title,description,picture\n"
        'A,Red thing,"Bright, red",a.png\n'
        "B,Green thing,,img/b.png\n"
        f"C,Blue thing,Deep blue,{tmp_path / 'elsewhere' / 'c.png'}\n"
        "D,Remote thing,Far away,s3://bucket/d.jpg\n"
        "E,Lost thing,Its picture is gone,missing.png\n"
        "F,Plain thing,No picture,\n"
        ",Nameless,no id,a.png\n"
        "G,Too,many,fields,here\n"
    )
    out = tmp_path / "shop" / "items"
    report = convert_items(str(table), str(out), item="sku", text=["title", "description"], image="picture")

    assert (report["rows_read"], report["rows_written"]) == (8, 6)
    assert report["set_aside"] == {"null_item_id": 1, "wrong_field_count": 1}
    assert (report["images"], report["images_not_found"]) == (5, 1)
    assert report["quarantine"] == str(tmp_path / "shop" / "quarantine" / "items_convert.jsonl")
    assert [(r["line"], r["reason"]) for r in read_quarantine(report)] == [(8, "null_item_id"), (9, "wrong_field_count")]

    part = out / "part-00000.parquet"
    assert shard_problem(pq.read_schema(part), ITEM_REQUIRED) is None
    written = pq.read_table(part)
    assert written.schema.names == ["item_id", "title", "description", "image_uri"]
    assert set(written.schema.types) == {pa.string()}
    rows = written.to_pylist()
    assert [r["item_id"] for r in rows] == list("ABCDEF")
    assert rows[0]["description"] == "Bright, red" and rows[1]["description"] is None
    assert [r["image_uri"] for r in rows] == [
        str(catalogue / "a.png"), str(catalogue / "img" / "b.png"), str(tmp_path / "elsewhere" / "c.png"),
        "s3://bucket/d.jpg", str(catalogue / "missing.png"), None,
    ]
    # schema.py's catalogue normalisation keeps every column, and the local images decode.
    normal = normalise_items(written, ["title", "description"])
    assert normal.column_names == ["item_id", "title", "description", "image", "image_uri"]
    colours = []
    for uri in normal["image_uri"].to_pylist()[:3]:
        with open(uri, "rb") as f:
            pixels = load_image(f.read(), 4)
        colours.append(np.argmax(pixels[:, 0, 0]))
    assert colours == [0, 1, 2]


def test_items_jsonl_with_image_root(tmp_path):
    _png(tmp_path / "pictures" / "p1.png", (9, 9, 9))
    table = tmp_path / "meta" / "items.jsonl"
    table.parent.mkdir()
    table.write_text('{"id": 1, "name": "One", "tags": ["x", "y"], "img": "p1.png"}\n'
                     '{"id": 2, "name": null, "img": ""}\nnot json\n')
    report = convert_items(str(table), str(tmp_path / "items"), item="id", text=["name", "tags"], image="img",
                           image_root=str(tmp_path / "pictures"))
    assert pq.read_table(tmp_path / "items").to_pylist() == [
        {"item_id": "1", "name": "One", "tags": '["x", "y"]', "image_uri": str(tmp_path / "pictures" / "p1.png")},
        {"item_id": "2", "name": None, "tags": None, "image_uri": None},
    ]
    assert report["set_aside"] == {"invalid_json": 1} and report["images_not_found"] == 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "interestformer.datasets.convert", *args], cwd=PROJECT_DIR,
                          capture_output=True, text=True, timeout=60)


def test_cli_converts_and_reports(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user,item,ts\nu1,a,1700000000\nu1,,1700000001\n")
    done = run_cli("events", str(log), "--out", str(tmp_path / "events"), "--user", "user", "--item", "item",
                   "--time", "ts")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["rows_written"], report["set_aside"]) == (1, {"null_item_id": 1})
    assert pq.read_table(tmp_path / "events").num_rows == 1


@pytest.mark.parametrize("case", ["missing file", "missing column", "unknown format", "unknown extension",
                                  "missing image root"])
def test_cli_user_errors(tmp_path, case):
    log, items = tmp_path / "log.csv", tmp_path / "items.csv"
    log.write_text("user,item,ts\nu1,a,1700000000\n")
    items.write_text("sku,picture\nA,a.png\n")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "clicks.log").write_text("user,item,ts\n")
    out = tmp_path / "out" / "events"
    events = ["--out", str(out), "--user", "user", "--item", "item", "--time", "ts"]
    args, expected = {
        "missing file": (["events", str(tmp_path / "nope.csv"), *events], str(tmp_path / "nope.csv")),
        "missing column": (["events", str(log), *events[:-1], "time"], "--time 'time' is not a column of"),
        "unknown format": (["events", str(log), *events, "--format", "xml"], "--format"),
        "unknown extension": (["events", str(tmp_path / "logs"), *events], "clicks.log from its extension"),
        "missing image root": (["items", str(items), "--out", str(out), "--item", "sku", "--image", "picture",
                                "--image-root", str(tmp_path / "no-pictures")], "--image-root"),
    }[case]
    done = run_cli(*args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert expected in done.stderr
    assert not out.exists()  # nothing is written before the inputs are checked


def test_help_has_an_example_per_command(capsys):
    for command in ("events", "sequences", "items"):
        with pytest.raises(SystemExit) as exit:
            main([command, "--help"])
        assert exit.value.code == 0
        assert f"convert {command} " in capsys.readouterr().out.split("example", 1)[1]

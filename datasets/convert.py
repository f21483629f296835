"""Common log shapes -> the project's input schema (datasets/schema.py), with bad rows set aside.

Three sub-commands, each reading its input line by line and writing Parquet in batches, so a log
larger than memory converts as well as a small one:

- ``events``: a CSV, TSV or JSON-lines log (or a folder of them), one event per row, with columns
  for the user, the item and the time, and optionally an event type and a value;
- ``sequences``: one line per user, ``user_id<TAB>item item item ...``, oldest first, no
  timestamps: each user's events get ordinal timestamps 0, 1, 2, ... (as datasets/movielens.py
  gives sequences.tsv.gz), so only their order matters;
- ``items``: a CSV, TSV or JSON-lines item table: an id, text columns, an image path or URI.

Writes ``OUT/part-NNNNN.parquet`` (one file unless there are more than ROWS_PER_FILE rows; parts
of an earlier run are removed first). Events: user_id, item_id (strings), timestamp (int64 epoch
seconds), and event_type (string) / value (float64) when --type / --value name them. Items:
item_id, each --text column under its own name (strings), image_uri (absolute path or URI) with
--image.

A row that cannot be used never stops the run and is never dropped: it is counted by reason and
written, with its file, line number, reason and text as read, to one JSON line of
``OUT/../quarantine/<name of OUT>_convert.jsonl`` (next to the output, so that prepare never
reads it as input). The file is rewritten by every run, empty when nothing was set aside. The
report (rows read, written and set aside by reason) is printed as JSON.

User mistakes (an input that does not exist, a column the header lacks, an unknown format) end
with one line ``error: ...`` on stderr and exit status 2, before any row is read.

    python -m interestformer.datasets.convert events logs/clicks.csv --out data/shop/events \\
        --user customer --item sku --time ts --time-unit ms --type action
    python -m interestformer.datasets.convert items catalogue.csv --out data/shop/items \\
        --item sku --text title,description --image picture
"""

import argparse
import csv
import gzip
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from interestformer.datasets.schema import FUTURE_SLACK_SECONDS, REASONS

# Reasons for which datasets/schema.py has no name (it reads typed Parquet, not text).
CONVERT_REASONS = {
    "bad_value": "value is not a finite number (an empty value is fine: it becomes null)",
    "wrong_field_count": "the line has more or fewer fields than the header has columns "
                         "(sequences: no TAB after the user id)",
    "invalid_json": "the line is not a JSON object",
    "not_utf8": "the line is not valid UTF-8",
    "unparseable_record": "the CSV reader could not parse the record (e.g. a field over its size limit)",
}
ALL_REASONS = {**REASONS, **CONVERT_REASONS}

FORMATS = {"csv": ",", "tsv": "\t", "jsonl": None}  # format -> field delimiter
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
TIME_UNITS = ("s", "ms", "iso")
JSON_PEEK_LINES = 1000  # JSON lines have no header: a key must occur in one of the first objects
ROWS_PER_GROUP = 100_000  # rows buffered before a write (a Parquet row group)
ROWS_PER_FILE = 5_000_000  # rows per output part; small logs give one file


class UsageError(ValueError):
    """A mistake in the command line or its inputs, found before any row is read: exit status 2."""


@dataclass
class Record:
    """One record of an input file: its values by column, or why they cannot be read."""

    file: str
    line: int  # 1-based number of the record's first line
    raw: str  # the record's text as read (several lines for a CSV record with quoted newlines)
    values: dict | None  # column -> value (strings for CSV/TSV; any JSON value for JSON lines)
    reason: str | None = None
    detail: str = ""


# ---------------------------------------------------------------------------------------------
# Reading


class LineTap:
    """A binary file's lines as text, remembering the lines consumed since the last take():
    the CSV reader pulls lines from it, and a record's raw text and first line number come from
    what it pulled. Lines that are not UTF-8 are decoded with U+FFFD and flagged."""

    def __init__(self, binary):
        self.binary, self.line, self.taken, self.bad_utf8 = binary, 0, [], False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        data = next(self.binary)
        self.line += 1
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text, self.bad_utf8 = data.decode("utf-8", errors="replace"), True
        if self.line == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the header
        self.taken.append(text)
        return text

    def take(self) -> tuple[int, str, bool]:
        """(first line number, text, whether a line was not UTF-8) of the lines since the last take."""
        first, raw, bad = self.line - len(self.taken) + 1, "".join(self.taken).rstrip("\r\n"), self.bad_utf8
        self.taken, self.bad_utf8 = [], False
        return first, raw, bad


def open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def format_of(path: str, given: str | None) -> str:
    if given:
        return given
    stem = path[:-3] if path.endswith(".gz") else path
    fmt = EXTENSIONS.get(os.path.splitext(stem)[1].lower())
    if fmt is None:
        raise UsageError(f"cannot tell the format of {path} from its extension "
                         f"({', '.join(EXTENSIONS)}, optionally .gz); pass --format csv, tsv or jsonl")
    return fmt


def csv_reader(tap: LineTap, fmt: str):
    # TSV has no quoting (tabs and newlines cannot occur in a field), so quote characters in a TSV
    # field are kept as they are; CSV uses the usual double quotes.
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    return csv.reader(tap, delimiter=FORMATS[fmt], quoting=quoting)


def read_columns(path: str, fmt: str) -> list[str]:
    """The header of a CSV/TSV file, or the keys of the first JSON_PEEK_LINES objects of a JSON-lines file."""
    with open_binary(path) as binary:
        tap = LineTap(binary)
        if fmt != "jsonl":
            try:
                for fields in csv_reader(tap, fmt):
                    if fields:
                        return [name.strip() for name in fields]
            except csv.Error as e:
                raise UsageError(f"cannot read the header of {path}: {e}; is --format right?") from None
            raise UsageError(f"{path} is empty: a {fmt.upper()} log needs a header line naming its columns")
        keys, objects = {}, 0
        for text in tap:
            if tap.line > JSON_PEEK_LINES:
                break
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict):
                objects += 1
                keys.update(dict.fromkeys(value))
        if not objects:
            raise UsageError(f"no JSON object in the first {JSON_PEEK_LINES} lines of {path}; is --format right?")
        return list(keys)


def check_columns(path: str, fmt: str, wanted: list[tuple[str, str]]) -> None:
    """Every column named by a flag ([(flag, column)]) must be one of the file's columns."""
    columns = read_columns(path, fmt)
    where = (f"a key of the first {JSON_PEEK_LINES} JSON objects of {path}" if fmt == "jsonl"
             else f"a column of {path}")
    for flag, column in wanted:
        if column not in columns:
            shown = ", ".join(repr(c) for c in columns[:30]) + (", ..." if len(columns) > 30 else "")
            raise UsageError(f"{flag} {column!r} is not {where} (found: {shown}); pass one of those to {flag}")


def records(path: str, fmt: str, counts: Counter) -> Iterator[Record]:
    """The records of one file, in order; blank lines are skipped (counted in counts["blank_lines"])."""
    with open_binary(path) as binary:
        tap = LineTap(binary)
        if fmt == "jsonl":
            for text in tap:
                line, raw, bad_utf8 = tap.take()
                if not text.strip():
                    counts["blank_lines"] += 1
                elif bad_utf8:
                    yield Record(path, line, raw, None, "not_utf8")
                else:
                    yield json_record(path, line, raw)
            return
        reader, header = csv_reader(tap, fmt), None
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                line, raw, _ = tap.take()
                yield Record(path, line, raw, None, "unparseable_record", str(e))
                continue
            line, raw, bad_utf8 = tap.take()
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                if header is not None:
                    counts["blank_lines"] += 1
            elif header is None:
                header = [name.strip() for name in fields]
            elif bad_utf8:
                yield Record(path, line, raw, None, "not_utf8")
            elif len(fields) != len(header):
                yield Record(path, line, raw, None, "wrong_field_count",
                             f"{len(fields)} fields; the header has {len(header)}")
            else:
                yield Record(path, line, raw, dict(zip(header, fields)))


def json_record(path: str, line: int, raw: str) -> Record:
    try:
        value = json.loads(raw)
    except ValueError as e:
        return Record(path, line, raw, None, "invalid_json", str(e))
    if not isinstance(value, dict):
        return Record(path, line, raw, None, "invalid_json", f"a JSON {type(value).__name__}, not an object")
    return Record(path, line, raw, value)


def input_files(source: str, skip: tuple[str, ...]) -> list[str]:
    """source itself, or the files under the folder source (recursively, sorted; hidden files,
    _SUCCESS-like markers and anything under the `skip` folders left out)."""
    if os.path.isfile(source):
        return [os.path.abspath(source)]
    if not os.path.isdir(source):
        raise UsageError(f"{source}: no such file or folder; pass an existing log file or folder")
    files = []
    for folder, subfolders, names in os.walk(os.path.abspath(source)):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith((".", "_"))
                               and os.path.join(folder, d) not in skip)
        files += [os.path.join(folder, n) for n in sorted(names) if not n.startswith((".", "_"))]
    if not files:
        raise UsageError(f"{source}: the folder holds no files; pass a log file or a folder of them")
    return files


def one_file(source: str, what: str) -> str:
    if not os.path.isfile(source):
        kind = "is a folder" if os.path.isdir(source) else "no such file"
        raise UsageError(f"{source}: {kind}; pass the {what} file")
    return os.path.abspath(source)


# ---------------------------------------------------------------------------------------------
# Values


def id_text(value) -> str | None:
    """A user or item id as text; None when missing, empty, or not a string or number."""
    if value is None or isinstance(value, (bool, dict, list)):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = int(value) if value.is_integer() else value
    text = str(value).strip()
    return text or None


def is_empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def as_number(value) -> int | float | None:
    """An integer or finite float from a number or its text; None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def epoch_seconds(value, unit: str, latest: float) -> tuple[int | None, str]:
    """(whole epoch seconds, "") or (None, why not). ISO-8601 times without an offset are UTC."""
    if is_empty(value):
        return None, "empty"
    if unit == "iso":
        if not isinstance(value, str):
            return None, "not an ISO-8601 string (is --time-unit right?)"
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            return None, "not an ISO-8601 date or date-time"
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        seconds = math.floor(moment.timestamp())
    else:
        number = as_number(value)
        if number is None:
            return None, "not a number (is --time-unit right?)"
        seconds = int(number // 1000 if unit == "ms" else math.floor(number))
    if seconds < 0:
        return None, "before 1970"
    if seconds > latest:
        hint = " (milliseconds? pass --time-unit ms)" if unit == "s" and seconds / 1000 <= latest else ""
        return None, f"more than a day in the future{hint}"
    return seconds, ""


# ---------------------------------------------------------------------------------------------
# Writing


class Output:
    """Rows -> out/part-NNNNN.parquet in batches; records set aside -> the quarantine file; counts."""

    def __init__(self, command: str, out: str, schema: pa.Schema):
        self.command, self.out, self.schema = command, os.path.abspath(out), schema
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise UsageError(f"--out {out} is a file; pass a folder for the Parquet parts")
        name = os.path.basename(self.out.rstrip(os.sep)) or "output"
        self.quarantine_path = os.path.join(os.path.dirname(self.out), "quarantine", f"{name}_convert.jsonl")
        self.counts, self.set_aside = Counter(), Counter()
        self.columns = [[] for _ in schema]
        self.writer, self.parts, self.rows_in_part = None, 0, 0
        self.quarantine = None

    def __enter__(self) -> "Output":
        os.makedirs(self.out, exist_ok=True)
        for name in os.listdir(self.out):  # an earlier run's parts: a smaller run must not keep them
            if name.startswith("part-") and name.endswith(".parquet"):
                os.remove(os.path.join(self.out, name))
        os.makedirs(os.path.dirname(self.quarantine_path), exist_ok=True)
        self.quarantine = open(self.quarantine_path, "w", encoding="utf-8")
        return self

    def add(self, *rows: tuple) -> None:
        """Writes the output rows of one input row (a sequences line gives one per event)."""
        self.counts["rows_written"] += 1
        for row in rows:
            for column, value in zip(self.columns, row):
                column.append(value)
        if len(self.columns[0]) >= ROWS_PER_GROUP:
            self.flush()

    def reject(self, record: Record, reason: str, detail: str = "") -> None:
        self.set_aside[reason] += 1
        entry = {"file": record.file, "line": record.line, "reason": reason, "detail": detail or record.detail,
                 "record": record.raw}
        self.quarantine.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if self.writer is not None and self.rows_in_part >= ROWS_PER_FILE:
            self.writer.close()
            self.writer = None
        if self.writer is None:
            path = os.path.join(self.out, f"part-{self.parts:05d}.parquet")
            self.writer, self.parts, self.rows_in_part = pq.ParquetWriter(path, self.schema), self.parts + 1, 0
        batch = pa.table([pa.array(c, f.type) for c, f in zip(self.columns, self.schema)], schema=self.schema)
        self.writer.write_table(batch)
        self.rows_in_part += batch.num_rows
        self.counts["parquet_rows"] += batch.num_rows
        self.columns = [[] for _ in self.schema]

    def __exit__(self, *error) -> None:
        if self.columns[0] or self.writer is None:  # an empty output still gets one (empty) part
            self.flush()
        self.writer.close()
        self.quarantine.close()

    def report(self, source: str, **extra) -> dict:
        rows_set_aside = sum(self.set_aside.values())
        report = {
            "command": self.command,
            "input": source,
            "output": self.out,
            "parts": self.parts,
            "quarantine": self.quarantine_path,
            "rows_read": self.counts["rows_written"] + rows_set_aside,
            "rows_written": self.counts["rows_written"],
            "rows_set_aside": rows_set_aside,
            "set_aside": dict(sorted(self.set_aside.items())),
            "blank_lines": self.counts["blank_lines"],
            **extra,
            "reasons": {r: ALL_REASONS[r] for r in sorted(self.set_aside)},
        }
        if self.set_aside["bad_timestamp"] * 2 > report["rows_read"]:
            report["hint"] = "most timestamps are unusable: check --time and --time-unit (s, ms or iso)"
        return report


# ---------------------------------------------------------------------------------------------
# Sub-commands


def convert_events(source: str, out: str, user: str, item: str, time_column: str, time_unit: str = "s",
                   fmt: str | None = None, type_column: str | None = None, value_column: str | None = None) -> dict:
    """A CSV/TSV/JSON-lines event log (a file, or a folder of files) -> out/part-*.parquet; returns the report."""
    if time_unit not in TIME_UNITS:
        raise UsageError(f"--time-unit {time_unit!r} is not one of {', '.join(TIME_UNITS)}")
    output_dir = os.path.abspath(out)
    files = input_files(source, skip=(output_dir, os.path.join(os.path.dirname(output_dir), "quarantine")))
    formats = {path: format_of(path, fmt) for path in files}
    wanted = [("--user", user), ("--item", item), ("--time", time_column), ("--type", type_column),
              ("--value", value_column)]
    wanted = [(flag, column) for flag, column in wanted if column]
    for path in files:  # every header is checked before any row is read
        check_columns(path, formats[path], wanted)

    fields = [("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())]
    fields += [("event_type", pa.string())] * bool(type_column) + [("value", pa.float64())] * bool(value_column)
    latest = time.time() + FUTURE_SLACK_SECONDS
    with Output("events", out, pa.schema(fields)) as output:
        for path in files:
            for record in records(path, formats[path], output.counts):
                if record.reason:
                    output.reject(record, record.reason)
                    continue
                values = record.values
                user_id, item_id = id_text(values.get(user)), id_text(values.get(item))
                seconds, why = epoch_seconds(values.get(time_column), time_unit, latest)
                if user_id is None:
                    output.reject(record, "null_user_id")
                elif item_id is None:
                    output.reject(record, "null_item_id")
                elif seconds is None:
                    output.reject(record, "bad_timestamp", why)
                else:
                    row = [user_id, item_id, seconds]
                    if type_column:
                        event_type = values.get(type_column)
                        row.append(None if is_empty(event_type) else str(event_type).strip())
                    if value_column:
                        raw_value = values.get(value_column)
                        value = None if is_empty(raw_value) else as_number(raw_value)
                        if value is None and not is_empty(raw_value):
                            output.reject(record, "bad_value", f"{raw_value!r} is not a finite number")
                            continue
                        row.append(None if value is None else float(value))
                    output.add(tuple(row))
    return output.report(os.path.abspath(source), files=len(files))


def convert_sequences(source: str, out: str, separator: str = " ") -> dict:
    """user_id<TAB>item item ... lines -> out/part-*.parquet with ordinal timestamps; returns the report.

    A user on several lines continues their sequence: the second line's events come after the
    first's."""
    path = one_file(source, "sequences")
    if not separator:
        raise UsageError("--separator is empty; pass the text between items, e.g. ' ' or ','")
    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())])
    next_ordinal: dict[str, int] = {}
    with Output("sequences", out, schema) as output, open_binary(path) as binary:
        tap = LineTap(binary)
        for text in tap:
            line, raw, bad_utf8 = tap.take()
            record = Record(path, line, raw, None)
            if not text.strip():
                output.counts["blank_lines"] += 1
                continue
            if bad_utf8:
                output.reject(record, "not_utf8")
                continue
            user_text, tab, items_text = text.rstrip("\r\n").partition("\t")
            user_id = user_text.strip()
            items = items_text.split() if separator == " " else [
                i.strip() for i in items_text.strip().strip(separator).split(separator)]
            if not tab:
                output.reject(record, "wrong_field_count", "no TAB between the user id and the items")
            elif not user_id:
                output.reject(record, "null_user_id")
            elif not items or not all(items):
                output.reject(record, "null_item_id", "no items" if not items else
                              f"empty item at position {items.index('') + 1}")
            else:
                start = next_ordinal.get(user_id, 0)
                output.add(*[(user_id, item_id, t) for t, item_id in enumerate(items, start)])
                next_ordinal[user_id] = start + len(items)
    # The rows of this input are lines (users); each written line gives its events.
    return output.report(path, users=len(next_ordinal), events_written=output.counts["parquet_rows"])


def resolve_image(value, root: str) -> str | None:
    """An image path or URI: URIs (scheme://) as they are, paths made absolute against root."""
    if is_empty(value) or not isinstance(value, str):
        return None
    value = value.strip()
    if "://" in value:
        return value
    return os.path.normpath(os.path.join(root, os.path.expanduser(value)))


def convert_items(source: str, out: str, item: str, text: tuple[str, ...] | list[str] = (), image: str | None = None,
                  image_root: str | None = None, fmt: str | None = None) -> dict:
    """An item table (CSV/TSV/JSON lines) -> out/part-*.parquet; returns the report."""
    path = one_file(source, "item")
    fmt = format_of(path, fmt)
    text = list(dict.fromkeys(c for c in text if c))
    if image_root and not image:
        raise UsageError("--image-root needs --image COL (the column holding the image paths)")
    if image_root and not os.path.isdir(image_root):
        raise UsageError(f"--image-root {image_root}: no such folder; pass the folder the image paths are relative to")
    for name in text:
        if name == "item_id" and item != "item_id" or name == "image_uri" and image:
            raise UsageError(f"--text column {name!r} would clash with the output column {name}; "
                             "rename it in the input or leave it out of --text")
    check_columns(path, fmt, [("--item", item), *[("--text", c) for c in text], *[("--image", image)] * bool(image)])

    root = os.path.abspath(image_root) if image_root else os.path.dirname(path)
    fields = [("item_id", pa.string())] + [(c, pa.string()) for c in text]
    fields += [("image_uri", pa.string())] * bool(image)
    images = Counter()
    with Output("items", out, pa.schema(fields)) as output:
        for record in records(path, fmt, output.counts):
            if record.reason:
                output.reject(record, record.reason)
                continue
            item_id = id_text(record.values.get(item))
            if item_id is None:
                output.reject(record, "null_item_id")
                continue
            row = [item_id] + [text_value(record.values.get(c)) for c in text]
            if image:
                uri = resolve_image(record.values.get(image), root)
                images["images"] += uri is not None
                images["images_not_found"] += uri is not None and "://" not in uri and not os.path.isfile(uri)
                row.append(uri)
            output.add(tuple(row))
    extra = {"images": images["images"], "images_not_found": images["images_not_found"]} if image else {}
    return output.report(path, **extra)


def text_value(value) -> str | None:
    if is_empty(value):
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Command line

# How the user typed the command: the console script, or the module form.
PROG = ("interestformer-convert" if os.path.basename(sys.argv[0]) == "interestformer-convert"
        else "python -m interestformer.datasets.convert")


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line, `error: ...`, and exits with status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert common log shapes to the project's events/ and items/ Parquet schema\n"
        "(docs/data.md). Bad rows are never dropped: each is set aside with its reason in\n"
        "OUT/../quarantine/<name of OUT>_convert.jsonl, and a JSON report is printed.",
        epilog=f"example:\n  {PROG} events clicks.csv --out data/shop/events --user customer --item sku --time ts\n"
               f"  {PROG} items products.csv --out data/shop/items --item sku --text title --image picture\n"
               f"run `{PROG} <command> --help` for a command's flags",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{events,sequences,items}")
    formats = dict(choices=sorted(FORMATS), help="input format (default: from the extension: "
                   ".csv, .tsv/.tab, .jsonl/.ndjson, each optionally .gz)")

    events = commands.add_parser(
        "events", help="an event log: one row per event (CSV, TSV or JSON lines)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert an event log (one row per event) to events Parquet: user_id, item_id,\n"
        "timestamp (int64 epoch seconds) and, when named, event_type and value.",
        epilog="example (clicks.csv has the header customer,sku,ts,action):\n"
               f"  {PROG} events clicks.csv --out data/shop/events \\\n"
               "      --user customer --item sku --time ts --time-unit ms --type action\n"
               "bad rows go to data/shop/quarantine/events_convert.jsonl",
    )
    events.add_argument("source", metavar="LOG_FILE_OR_DIR", help="a log file, or a folder of them (read recursively)")
    events.add_argument("--out", required=True, metavar="OUT_DIR/events", help="folder for the Parquet parts")
    events.add_argument("--format", **formats)
    events.add_argument("--user", required=True, metavar="COL", help="column holding the user id")
    events.add_argument("--item", required=True, metavar="COL", help="column holding the item id")
    events.add_argument("--time", required=True, metavar="COL", help="column holding the event time")
    events.add_argument("--time-unit", choices=TIME_UNITS, default="s",
                        help="s: epoch seconds (default); ms: epoch milliseconds; iso: ISO-8601 text "
                        "such as 2024-05-01T12:30:00Z (no offset: UTC)")
    events.add_argument("--type", metavar="COL", help="column holding the event type (view, click, ...)")
    events.add_argument("--value", metavar="COL", help="column holding a number (rating, dwell time, ...)")

    sequences = commands.add_parser(
        "sequences", help="one line per user: user_id<TAB>item item item ... (oldest first)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a sequences file (one line per user: user_id, a TAB, then the user's\n"
        "items oldest first) to events Parquet. There are no times: each user's events get the\n"
        "timestamps 0, 1, 2, ..., so only their order matters. A user on several lines\n"
        "continues the sequence.",
        epilog="example (sequences.txt holds lines such as 'u1<TAB>i3 i7 i2'):\n"
               f"  {PROG} sequences sequences.txt --out data/seq/events\n"
               "bad lines go to data/seq/quarantine/events_convert.jsonl",
    )
    sequences.add_argument("source", metavar="FILE", help="the sequences file (optionally .gz)")
    sequences.add_argument("--out", required=True, metavar="OUT_DIR/events", help="folder for the Parquet parts")
    sequences.add_argument("--separator", default=" ",
                           help="text between items (default: ' ', which splits on any run of whitespace)")

    items = commands.add_parser(
        "items", help="an item table: id, text columns, image paths (CSV, TSV or JSON lines)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert an item table to items Parquet: item_id, the --text columns under\n"
        "their own names, and image_uri (absolute paths or URIs) from --image.",
        epilog="example (products.csv has the header sku,title,description,picture):\n"
               f"  {PROG} items products.csv --out data/shop/items \\\n"
               "      --item sku --text title,description --image picture --image-root pictures/\n"
               "then set data.text_columns: [title, description] in the config;\n"
               "bad rows go to data/shop/quarantine/items_convert.jsonl",
    )
    items.add_argument("source", metavar="FILE", help="the item table")
    items.add_argument("--out", required=True, metavar="OUT_DIR/items", help="folder for the Parquet parts")
    items.add_argument("--format", **formats)
    items.add_argument("--item", required=True, metavar="COL", help="column holding the item id")
    items.add_argument("--text", default="", metavar="COL[,COL...]",
                       help="text columns to keep, comma-separated (name them in data.text_columns)")
    items.add_argument("--image", metavar="COL", help="column holding image paths or URIs (s3://, gs://, ...)")
    items.add_argument("--image-root", metavar="DIR",
                       help="folder relative image paths start from (default: the item file's folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: convert, then print the report as JSON."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "events":
            report = convert_events(args.source, args.out, args.user, args.item, args.time, args.time_unit,
                                    args.format, args.type, args.value)
        elif args.command == "sequences":
            report = convert_sequences(args.source, args.out, args.separator)
        else:
            report = convert_items(args.source, args.out, args.item, args.text.split(","), args.image,
                                   args.image_root, args.format)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, EOFError) as e:  # e.g. a truncated .gz: the rows before it were written
        print(f"error: reading or writing failed, the output is incomplete: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

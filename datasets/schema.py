"""The input schema, and the checks that set unusable rows aside with a reason.

Behaviour events (sharded Parquet, one row per event):

| column     | type                                        | required | meaning                       |
|------------|---------------------------------------------|----------|-------------------------------|
| user_id    | string or integer                           | yes      | who acted                     |
| item_id    | string or integer                           | yes      | on what; must be in catalogue |
| timestamp  | integer (epoch seconds) or Arrow timestamp  | yes      | when; orders each user's log  |
| event_type | string                                      | no       | view, click, purchase, ...    |
| value      | float                                       | no       | rating, dwell time, price ... |

Item catalogue (Parquet, one row per item):

| column      | type              | required | meaning                                        |
|-------------|-------------------|----------|------------------------------------------------|
| item_id     | string or integer | yes      | matches events.item_id                         |
| title, ...  | string            | no       | text columns named in data.text_columns        |
| image       | binary            | no       | encoded image bytes (JPEG, PNG, WebP, ...)     |
| image_uri   | string            | no       | local path or object-store URI of the image    |

A row that cannot be used is never dropped silently: it gets a reason from REASONS, is written to
the quarantine folder with it, and is counted in the prepare report.
"""

import hashlib
import hmac
import io
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

EVENT_REQUIRED = ("user_id", "item_id", "timestamp")
ITEM_REQUIRED = ("item_id",)


def _id_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t) or (
        pa.types.is_dictionary(t) and _id_type(t.value_type))


def _time_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_timestamp(t)


# The Arrow types a required column may have (anything else cannot hold an id or a time).
COLUMN_TYPES = {"user_id": _id_type, "item_id": _id_type, "timestamp": _time_type}


def shard_problem(schema: pa.Schema, required: tuple[str, ...]) -> str | None:
    """The reason a Parquet file with this schema cannot be used as a whole, or None."""
    for name in required:
        if name not in schema.names:
            return "shard_missing_column"
        if not COLUMN_TYPES[name](schema.field(name).type):
            return "shard_mistyped_column"
    return None
DEFAULT_EVENT_TYPE = "interaction"

REASONS = {
    "null_user_id": "user_id is null or empty",
    "null_item_id": "item_id is null or empty",
    "unknown_item": "item_id is not in the catalogue",
    "bad_timestamp": "timestamp is null, not a number, negative, or more than a day in the future (epoch seconds expected)",
    "duplicate_event": "same user, item, timestamp and event type as a kept event",
    "duplicate_item_id": "catalogue row whose item_id another row has; one of them is kept (which is not defined)",
    "image_undecodable": "image bytes or URI could not be read and decoded (item kept without image)",
    # Whole files, found before any row is read (see prepare.screen_shards); their rows are counted
    # from the Parquet footer where it can be read.
    "shard_unreadable": "the file is not readable Parquet",
    "shard_missing_column": "the file lacks a required column",
    "shard_mistyped_column": "a required column of the file has a type that cannot hold it",
}
FUTURE_SLACK_SECONDS = 86_400  # clocks differ; a day ahead of now is still a plausible event time

# What prepare writes. Explicit Arrow types: no column is left for Ray to guess (a column that is
# all None, or numpy arrays per row, would otherwise be pickled or become a Ray tensor type).
TAGGED_EVENT_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("item_id", pa.string()), ("item_index", pa.int32()),
    ("timestamp", pa.int64()), ("event_type", pa.string()), ("value", pa.float64()), ("reason", pa.string()),
])
ITEM_TABLE_SCHEMA = pa.schema([
    ("item_index", pa.int32()), ("item_id", pa.string()), ("text_tokens", pa.list_(pa.int32())),
    ("text_mask", pa.list_(pa.int8())), ("pixels", pa.binary()), ("has_image", pa.bool_()), ("reason", pa.string()),
])
SEQUENCE_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("items", pa.list_(pa.int32())), ("event_types", pa.list_(pa.string())),
    ("timestamps", pa.list_(pa.int64())), ("num_events", pa.int32()), ("num_duplicates", pa.int32()),
])

# Images whose header declares more pixels than this are refused before decoding (decompression
# bombs); ample for any catalogue picture.
Image.MAX_IMAGE_PIXELS = 64_000_000


def as_id_strings(column: pd.Series) -> pd.Series:
    """User and item ids become strings, nulls and empty strings become None."""
    ids = column.astype("string").str.strip()
    return ids.where(ids.notna() & (ids != ""), None).astype(object)


def as_epoch_seconds(column: pd.Series, reference_time: int = 0) -> pd.Series:
    """Integer seconds, from integers, floats or datetimes; unusable values become NaN, and so do
    times more than a day after `reference_time` (0: the wall clock now)."""
    if pd.api.types.is_datetime64_any_dtype(column):
        if column.dt.tz is not None:
            column = column.dt.tz_convert("UTC").dt.tz_localize(None)
        numbers = ((column - pd.Timestamp(0)) // pd.Timedelta(seconds=1)).astype("float64")
    else:
        numbers = pd.to_numeric(column, errors="coerce").astype("float64")
    latest = (reference_time or time.time()) + FUTURE_SLACK_SECONDS
    return numbers.where(np.isfinite(numbers) & (numbers >= 0) & (numbers <= latest))


def pseudonymise(ids: pd.Series, key: bytes) -> pd.Series:
    """Ids -> keyed hashes (HMAC-SHA256, 128 bits as hex); nulls stay null. Without the key the
    raw ids cannot be recovered or guessed by hashing candidates."""
    return ids.map(lambda v: hmac.new(key, v.encode(), hashlib.sha256).hexdigest()[:32] if isinstance(v, str) else None)


def tag_events(batch: pd.DataFrame, item_index: dict[str, int], id_key: bytes = b"", reference_time: int = 0) -> pa.Table:
    """Normalises an event batch and gives every unusable row its reason (None when usable).
    With id_key, user ids are pseudonymised before anything is kept or set aside; timestamps
    more than a day after reference_time (0: now) are bad."""
    missing = [c for c in EVENT_REQUIRED if c not in batch.columns]
    if missing:
        raise ValueError(f"events are missing required column(s) {missing}; found {list(batch.columns)}")
    users = as_id_strings(batch["user_id"])
    if id_key:
        users = pseudonymise(users, id_key)
    items = as_id_strings(batch["item_id"])
    seconds = as_epoch_seconds(batch["timestamp"], reference_time)
    event_type = (
        batch["event_type"].astype("string").fillna(DEFAULT_EVENT_TYPE).astype(object)
        if "event_type" in batch.columns
        else pd.Series(DEFAULT_EVENT_TYPE, index=batch.index, dtype=object)
    )
    value = pd.to_numeric(batch["value"], errors="coerce") if "value" in batch.columns else np.nan
    index = items.map(item_index)

    reason = pd.Series(None, index=batch.index, dtype=object)
    # Later checks overwrite earlier ones only where no reason is set yet: the first problem wins.
    for name, bad in (
        ("null_user_id", users.isna()),
        ("null_item_id", items.isna()),
        ("unknown_item", items.notna() & index.isna()),
        ("bad_timestamp", seconds.isna()),
    ):
        reason = reason.where(reason.notna() | ~bad, name)
    tagged = pd.DataFrame(
        {
            "user_id": users,
            "item_id": items,
            "item_index": index.fillna(0).astype("int32"),
            "timestamp": seconds.fillna(-1).astype("int64"),
            "event_type": event_type,
            "value": pd.Series(value, index=batch.index, dtype="float64"),
            "reason": reason,
        }
    )
    return pa.Table.from_pandas(tagged, schema=TAGGED_EVENT_SCHEMA, preserve_index=False)


def normalise_items(batch: pa.Table, text_columns: list[str]) -> pa.Table:
    """A catalogue batch with any accepted column types -> item_id, the text columns (strings),
    image (bytes), image_uri (string); absent columns become nulls. Text stored as bytes is
    decoded as UTF-8, and bytes that are not UTF-8 become U+FFFD rather than an error."""
    def column(name: str, kind: pa.DataType) -> pa.Array:
        if name not in batch.column_names:
            return pa.nulls(batch.num_rows, kind)
        values = batch[name]
        if kind == pa.string() and (pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type)):
            return pa.array([None if v is None else v.decode("utf-8", errors="replace") for v in values.to_pylist()],
                            pa.string())
        return pc.cast(values, kind)

    names = ["item_id", *dict.fromkeys(c for c in text_columns if c != "item_id"), "image", "image_uri"]
    kinds = [pa.string()] * (len(names) - 2) + [pa.binary(), pa.string()]
    return pa.table([column(n, k) for n, k in zip(names, kinds)], names=names)


def load_image(data: bytes | None, size: int) -> np.ndarray | None:
    """Encoded image bytes -> (3, size, size) uint8 RGB, or None when they cannot be decoded."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (size, size))  # lets JPEG decode at reduced scale: much faster
            pixels = image.convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return np.asarray(pixels, dtype=np.uint8).transpose(2, 0, 1).copy()

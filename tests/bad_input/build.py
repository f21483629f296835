"""Writes the bad-input corpus in this folder (events/, items/); EXPECTED.md says what each file
and row must lead to, and tests/test_bad_input.py checks it. Rerun after changing a case:

    .venv/bin/python tests/bad_input/build.py
"""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ITEMS = [f"m{i}" for i in range(1, 21)]
FAR_FUTURE = 10_000_000_000  # the year 2286


def image_bytes(kind: str) -> bytes:
    buffer = io.BytesIO()
    if kind == "png":
        Image.new("RGB", (16, 16), "teal").save(buffer, format="PNG")
    elif kind == "jpeg":
        Image.new("RGB", (64, 64), "orange").save(buffer, format="JPEG")
    elif kind == "bomb":  # 25,000 x 25,000 pixels declared in a file of a few tens of KB
        Image.new("1", (25_000, 25_000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def good_events() -> list[tuple]:
    """u0..u29 with 6 events each on the catalogue, 1 s apart: all usable."""
    rng = np.random.default_rng(0)
    return [(f"u{u}", ITEMS[int(rng.integers(0, 20))], 1_600_000_000 + 60 * u + t, "view")
            for u in range(30) for t in range(6)]


def events_table(rows, user_type=pa.string(), time_type=pa.float64()) -> pa.Table:
    users, items, times, kinds = zip(*rows)
    return pa.table({"user_id": pa.array(users, user_type), "item_id": pa.array(items, pa.string()),
                     "timestamp": pa.array(times, time_type), "event_type": pa.array(kinds, pa.string())})


def main():
    events, items = os.path.join(HERE, "events"), os.path.join(HERE, "items")
    os.makedirs(events, exist_ok=True)
    os.makedirs(items, exist_ok=True)
    bad_rows = [
        (None, "m1", 1_600_000_000, "view"),            # null_user_id
        ("", "m1", 1_600_000_000, "view"),              # null_user_id (empty)
        ("u1", None, 1_600_000_001, "view"),            # null_item_id
        ("u1", "  ", 1_600_000_002, "view"),            # null_item_id (blank)
        ("u1", "m1", -5, "view"),                       # bad_timestamp (negative)
        ("u1", "m1", float("nan"), "view"),             # bad_timestamp (NaN)
        ("u1", "m1", FAR_FUTURE, "view"),               # bad_timestamp (far future)
        ("u1", "no-such-item", 1_600_000_003, "view"),  # unknown_item
        ("u0", "m1", 1_600_000_000, "view"),            # duplicate of a good row below
        ("u0", "m1", 1_600_000_000, "view"),
        ("solo", "m2", 1_600_000_000, "view"),          # a user with one event: kept, too short
    ]
    pq.write_table(events_table(good_events() + bad_rows), os.path.join(events, "part-0-rows.parquet"))
    int_users = [(1000 + u, ITEMS[u], 1_600_000_000 + t, "click") for u in range(5) for t in range(4)]
    pq.write_table(events_table(int_users, user_type=pa.int64(), time_type=pa.int64()),
                   os.path.join(events, "part-1-integer-user-ids.parquet"))
    with open(os.path.join(events, "part-2-not-parquet.parquet"), "wb") as f:
        f.write(b"user_id,item_id,timestamp\nu1,m1,1600000000\n")  # a CSV under a Parquet name
    pq.write_table(pa.table({"user_id": ["x"] * 5, "item_id": ["m1"] * 5}),
                   os.path.join(events, "part-3-missing-timestamp.parquet"))
    pq.write_table(pa.table({"user_id": ["y"] * 7, "item_id": ["m1"] * 7, "timestamp": ["yesterday"] * 7}),
                   os.path.join(events, "part-4-text-timestamp.parquet"))
    pq.write_table(events_table([("z", "m1", 1.0, "view")]).slice(0, 0), os.path.join(events, "part-5-empty.parquet"))
    whole = io.BytesIO()
    pq.write_table(events_table(good_events()[:20]), whole)
    with open(os.path.join(events, "part-6-truncated.parquet"), "wb") as f:
        f.write(whole.getvalue()[: len(whole.getvalue()) // 2])  # cut off mid-file: no footer

    titles = [f"Movie {i}".encode() for i in range(1, 21)]
    titles[2] = "Café Noir".encode("latin-1")  # not UTF-8
    titles[3] = ("very long " * 110_000).encode()  # about 1 MB
    images = [image_bytes("png")] * 20
    images[4] = b""  # zero bytes
    images[5] = image_bytes("jpeg")[:200]  # truncated JPEG
    images[6] = b"%PDF-1.4 this is not an image at all"  # not an image, though the catalogue says .jpg
    images[7] = image_bytes("bomb")  # decompression bomb: refused before decoding
    pq.write_table(pa.table({"item_id": ITEMS, "title": pa.array(titles, pa.binary()),
                             "image": pa.array(images, pa.binary())}), os.path.join(items, "part-0.parquet"))
    with open(os.path.join(items, "part-1-not-parquet.parquet"), "wb") as f:
        f.write(b"\x00" * 64)


if __name__ == "__main__":
    main()

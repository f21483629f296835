"""MovieLens-1M (GroupLens files) -> the project's input schema (see datasets/schema.py).

Reads from a source folder:

- ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``), preferred when present: real epoch
  timestamps, the rating becomes ``value``; or else
- ``sequences.tsv.gz`` (``userId<TAB>movieId movieId ...``, oldest first): no timestamps and no
  ratings, so each user's events get ordinal timestamps 0, 1, 2, ... and a null value;
- ``movies.dat`` (``MovieID::Title (Year)::Genre|Genre``, latin-1), the catalogue.

``users.dat`` is never read: its demographics are personal data and the models do not use them.

Writes ``out_dir/events/part-NNNNN.parquet`` (``num_shards`` files, each user's events in one
shard, ordered by user then time) and ``out_dir/items/part-00000.parquet`` (the rated movies of
movies.dat, or all of them with keep_unrated). Posters are passed through as the files' raw bytes: decoding them, and
counting the ones that do not decode, is the prepare step's job. The same input always gives
byte-identical files.

    python -m interestformer.datasets.movielens ../shared/data/ml-1m data/ml-1m \\
        --posters ../shared/data/ml-1m/posters
"""

import argparse
import gzip
import json
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EVENT_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64()),
    ("event_type", pa.string()), ("value", pa.float64()),
])
ITEM_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("title", pa.string()), ("description", pa.string()),
    ("image", pa.binary()), ("image_uri", pa.string()),
])
EVENT_TYPE = "rating"
RATINGS, SEQUENCES, MOVIES = "ratings.dat", "sequences.tsv.gz", "movies.dat"
ENCODING = "latin-1"  # GroupLens' encoding: titles such as "Misérables, Les (1995)"
# The release year closes the title; a few titles lack the space before it ("(L'Associe)(1982)").
YEAR = re.compile(r"\s*\((\d{4})\)\s*$")


def read_ratings(path: str) -> pd.DataFrame:
    """ratings.dat -> user, item, timestamp, value (one row per line, in file order)."""
    # "::" read with the fast C parser as ":" separators around empty columns 1, 3 and 5.
    return pd.read_csv(
        path, sep=":", header=None, encoding=ENCODING, usecols=[0, 2, 4, 6],
        names=["user", "_1", "item", "_3", "value", "_5", "timestamp"],
        dtype={"user": "int64", "item": "int64", "value": "float64", "timestamp": "int64"},
    )[["user", "item", "timestamp", "value"]]


def read_sequences(path: str) -> pd.DataFrame:
    """sequences.tsv.gz -> user, item, timestamp (0, 1, 2, ... per user), value (NaN)."""
    users, items = [], []
    with gzip.open(path, "rt", encoding=ENCODING) as lines:
        for line in lines:
            user, _, movies = line.partition("\t")
            sequence = np.array(movies.split(), dtype=np.int64)
            users.append(np.full(len(sequence), int(user), dtype=np.int64))
            items.append(sequence)
    return pd.DataFrame({
        "user": np.concatenate(users),
        "item": np.concatenate(items),
        "timestamp": np.concatenate([np.arange(len(s), dtype=np.int64) for s in items]),
        "value": np.nan,
    })


def split_title(title: str, genres: str) -> tuple[str, str]:
    """("Toy Story (1995)", "Animation|Comedy") -> ("Toy Story", "Year: 1995. Genres: Animation, Comedy")."""
    year = YEAR.search(title)
    genre_text = f"Genres: {', '.join(genres.split('|'))}"
    if year is None:
        return title.strip(), genre_text
    return title[:year.start()], f"Year: {year.group(1)}. {genre_text}"


def read_poster(posters_dir: str | None, movie_id: str) -> bytes | None:
    """The poster file's bytes as they are (not decoded), or None when there is none."""
    if posters_dir is None:
        return None
    path = os.path.join(posters_dir, f"{movie_id}.jpg")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def movie_catalogue(path: str, posters_dir: str | None) -> pa.Table:
    """movies.dat -> one row per movie in file order, in ITEM_SCHEMA."""
    ids, titles, descriptions, images = [], [], [], []
    with open(path, encoding=ENCODING) as lines:
        for line in lines:
            movie_id, full_title, genres = line.rstrip("\r\n").split("::")
            title, description = split_title(full_title, genres)
            ids.append(movie_id)
            titles.append(title)
            descriptions.append(description)
            images.append(read_poster(posters_dir, movie_id))
    return pa.table(
        [ids, titles, descriptions, images, pa.nulls(len(ids), pa.string())], schema=ITEM_SCHEMA
    )


def event_table(events: pd.DataFrame) -> pa.Table:
    """user, item, timestamp, value (integer ids) -> EVENT_SCHEMA, rows in the same order."""
    return pa.table(
        [
            pa.array(events["user"].astype(str), pa.string()),
            pa.array(events["item"].astype(str), pa.string()),
            pa.array(events["timestamp"], pa.int64()),
            pa.array(np.full(len(events), EVENT_TYPE, dtype=object), pa.string()),
            pa.array(events["value"], pa.float64(), from_pandas=True),  # NaN becomes null
        ],
        schema=EVENT_SCHEMA,
    )


def write_parts(folder: str, parts: list[pa.Table]) -> None:
    """parts[i] -> folder/part-{i:05d}.parquet. Parts of an earlier run are removed first, so a run
    with fewer shards never leaves stale ones behind."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.startswith("part-") and name.endswith(".parquet"):
            os.remove(os.path.join(folder, name))
    for i, part in enumerate(parts):
        pq.write_table(part, os.path.join(folder, f"part-{i:05d}.parquet"))


def convert_movielens(source_dir: str, out_dir: str, posters_dir: str | None = None, num_shards: int = 8,
                      keep_unrated: bool = False) -> dict:
    """Converts a MovieLens-1M folder (see the module docstring) to out_dir/events and out_dir/items.

    The catalogue holds the movies that have ratings (3,706 in ML-1M), the candidate set of the
    published full-ranking tables; keep_unrated keeps all of movies.dat (3,883).

    Returns {"users", "items" (catalogue rows), "rated_items" (distinct items in events), "events",
    "posters" (items with poster bytes), "source" (the events file used), "path"}.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    source = RATINGS if os.path.exists(os.path.join(source_dir, RATINGS)) else SEQUENCES
    source_path = os.path.join(source_dir, source)
    if not os.path.exists(source_path):
        raise FileNotFoundError(f"{source_dir} has neither {RATINGS} nor {SEQUENCES}")
    raw = read_ratings(source_path) if source == RATINGS else read_sequences(source_path)
    items = movie_catalogue(os.path.join(source_dir, MOVIES), posters_dir)
    if not keep_unrated:
        rated = pa.array(raw["item"].astype(str).unique(), pa.string())
        items = items.filter(pc.is_in(items.column("item_id"), value_set=rated))

    # By user, then time; stable, so events in the same second keep the source's order.
    raw = raw.sort_values(["user", "timestamp"], kind="stable")
    events = event_table(raw)
    shard = raw["user"].to_numpy() % num_shards  # a user's events all live in one shard
    write_parts(os.path.join(out_dir, "events"), [events.filter(shard == s) for s in range(num_shards)])
    write_parts(os.path.join(out_dir, "items"), [items])
    return {
        "users": int(raw["user"].nunique()),
        "items": len(items),
        "rated_items": int(raw["item"].nunique()),
        "events": len(events),
        "posters": len(items) - items.column("image").null_count,
        "source": source,
        "path": out_dir,
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: convert, then print the summary."""
    parser = argparse.ArgumentParser(
        prog="python -m interestformer.datasets.movielens",
        description="Convert MovieLens-1M (ratings.dat or sequences.tsv.gz, plus movies.dat) to the "
        "project's events/ and items/ Parquet schema. users.dat is never read.",
    )
    parser.add_argument("source_dir", help="folder with movies.dat and ratings.dat or sequences.tsv.gz")
    parser.add_argument("out_dir", help="output folder; events/ and items/ are written under it")
    parser.add_argument("--posters", metavar="DIR", help="folder of <movieId>.jpg posters (default: no images)")
    parser.add_argument("--shards", type=int, default=8, help="number of event files (default: 8)")
    parser.add_argument("--keep-unrated", action="store_true",
                        help="keep movies nobody rated in the catalogue (the published tables rank only rated ones)")
    args = parser.parse_args(argv)
    summary = convert_movielens(args.source_dir, args.out_dir, args.posters, args.shards, args.keep_unrated)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""MovieLens-1M conversion: a hand-made slice in the GroupLens formats, and the real data when present."""

import gzip
import io
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from interestformer.datasets.movielens import EVENT_SCHEMA, ITEM_SCHEMA, convert_movielens
from conftest import SHARED_DATA

MOVIES = [  # (id, title as in movies.dat, genres)
    ("1", "Toy Story (1995)", "Animation|Children's|Comedy"),
    ("2", "Crème de la crème (1999)", "Comedy"),
    ("3", "Amélie (2001)", "Comedy|Romance"),
    ("4", "Associate, The (L'Associe)(1982)", "Comedy"),  # as in ML-1M: no space before the year
]
# UserID::MovieID::Rating::Timestamp, grouped by user but not in time order (as in ratings.dat).
# User 2 rates two movies in the same second, user 3 has one event, movie 4 is never rated.
RATINGS = [
    (1, 3, 4, 978300760), (1, 1, 5, 978300100), (1, 2, 3, 978302000),
    (2, 2, 2, 978000000), (2, 1, 4, 978000050), (2, 3, 5, 978000050),
    (3, 1, 1, 965000000),
    (10, 3, 5, 970000000), (10, 2, 4, 970000001),
]
SHARDS = 2


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 30), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _chronological(ratings=RATINGS) -> dict[int, list[tuple]]:
    """Each user's ratings, oldest first; same-second ties keep file order (a stable sort)."""
    by_user: dict[int, list[tuple]] = {}
    for row in sorted(ratings, key=lambda r: (r[0], r[3])):
        by_user.setdefault(row[0], []).append(row)
    return by_user


@pytest.fixture
def slice_dir(tmp_path) -> tuple[str, str, dict[str, bytes]]:
    """(source folder with movies.dat + ratings.dat, posters folder, poster bytes by movie id)."""
    source = tmp_path / "ml-slice"
    source.mkdir()
    movies = "".join(f"{m}::{title}::{genres}\n" for m, title, genres in MOVIES)
    (source / "movies.dat").write_bytes(movies.encode("latin-1"))
    (source / "ratings.dat").write_text("".join("::".join(map(str, r)) + "\n" for r in RATINGS), "ascii")
    posters = tmp_path / "posters"
    posters.mkdir()
    written = {"1": _jpeg(), "2": b"not a jpeg", "4": _jpeg()}  # movie 3 has no poster
    for movie_id, data in written.items():
        (posters / f"{movie_id}.jpg").write_bytes(data)
    return str(source), str(posters), written


def _events(out: str) -> pa.Table:
    parts = sorted(os.listdir(os.path.join(out, "events")))
    assert parts == [f"part-{s:05d}.parquet" for s in range(SHARDS)]
    tables = [pq.read_table(os.path.join(out, "events", p)) for p in parts]
    for s, table in enumerate(tables):  # sharded by user
        assert all(int(u) % SHARDS == s for u in table.column("user_id").to_pylist())
    return pa.concat_tables(tables)


def _items(out: str) -> pa.Table:
    assert os.listdir(os.path.join(out, "items")) == ["part-00000.parquet"]
    return pq.read_table(os.path.join(out, "items", "part-00000.parquet"))


def _sequences(events: pa.Table) -> dict[str, list[tuple]]:
    """user_id -> [(item_id, timestamp, value), ...] in file order."""
    by_user: dict[str, list[tuple]] = {}
    for row in events.to_pylist():
        by_user.setdefault(row["user_id"], []).append((row["item_id"], row["timestamp"], row["value"]))
    return by_user


def test_ratings_slice(slice_dir, tmp_path):
    source, posters, written = slice_dir
    out = str(tmp_path / "out")
    summary = convert_movielens(source, out, posters_dir=posters, num_shards=SHARDS, keep_unrated=True)
    assert summary == {"users": 4, "items": 4, "rated_items": 3, "events": len(RATINGS), "posters": 3,
                       "source": "ratings.dat", "path": out}

    events = _events(out)
    assert events.schema.remove_metadata() == EVENT_SCHEMA
    assert events.num_rows == len(RATINGS)
    assert set(events.column("event_type").to_pylist()) == {"rating"}
    expected = {str(u): [(str(m), t, float(r)) for _, m, r, t in rows] for u, rows in _chronological().items()}
    assert _sequences(events) == expected  # values, timestamps, tie order; user 3's single event too

    items = _items(out)
    assert items.schema.remove_metadata() == ITEM_SCHEMA
    rows = {row["item_id"]: row for row in items.to_pylist()}
    assert list(rows) == ["1", "2", "3", "4"]  # with keep_unrated, the unrated movie 4 stays
    titles = [rows[m]["title"] for m in rows]
    assert titles == ["Toy Story", "Crème de la crème", "Amélie", "Associate, The (L'Associe)"]
    assert rows["1"]["description"] == "Year: 1995. Genres: Animation, Children's, Comedy"
    assert rows["3"]["description"] == "Year: 2001. Genres: Comedy, Romance"
    assert rows["4"]["description"] == "Year: 1982. Genres: Comedy"
    # Raw bytes pass through, corrupt ones too (prepare counts those); no file -> null.
    assert rows["1"]["image"] == written["1"] and rows["2"]["image"] == b"not a jpeg"
    assert rows["3"]["image"] is None
    assert items.column("image_uri").null_count == items.num_rows


def test_catalogue_holds_only_rated_movies_by_default(slice_dir, tmp_path):
    source, posters, _ = slice_dir
    out = str(tmp_path / "out")
    assert convert_movielens(source, out, posters_dir=posters)["items"] == 3
    assert [row["item_id"] for row in _items(out).to_pylist()] == ["1", "2", "3"]


def test_sequences_slice(slice_dir, tmp_path):
    source, posters, _ = slice_dir
    chronological = _chronological()
    lines = "".join(f"{u}\t{' '.join(str(r[1]) for r in rows)}\n" for u, rows in chronological.items())
    os.remove(os.path.join(source, "ratings.dat"))
    with gzip.open(os.path.join(source, "sequences.tsv.gz"), "wt") as f:
        f.write(lines)
    out = str(tmp_path / "out")
    summary = convert_movielens(source, out, posters_dir=posters, num_shards=SHARDS)
    assert summary["source"] == "sequences.tsv.gz"
    assert (summary["users"], summary["events"], summary["rated_items"]) == (4, len(RATINGS), 3)

    events = _events(out)
    assert events.schema.remove_metadata() == EVENT_SCHEMA
    assert events.column("value").null_count == events.num_rows  # no ratings in this form
    expected = {str(u): [(str(r[1]), t, None) for t, r in enumerate(rows)] for u, rows in chronological.items()}
    assert _sequences(events) == expected  # ordinal timestamps 0..n-1, same order as ratings.dat's


def test_deterministic(slice_dir, tmp_path):
    source, posters, _ = slice_dir
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        convert_movielens(source, str(out), posters_dir=posters, num_shards=SHARDS)
        outputs.append({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))})
    assert len(outputs[0]) == SHARDS + 1
    assert outputs[0] == outputs[1]


def test_rerun_with_fewer_shards_leaves_no_stale_parts(slice_dir, tmp_path):
    source, posters, _ = slice_dir
    out = str(tmp_path / "out")
    convert_movielens(source, out, posters_dir=posters, num_shards=5)
    convert_movielens(source, out, posters_dir=posters, num_shards=SHARDS)
    assert _events(out).num_rows == len(RATINGS)


ML_1M = os.path.join(SHARED_DATA, "ml-1m")


@pytest.mark.skipif(not os.path.isdir(ML_1M), reason=f"MovieLens-1M not found at {ML_1M} (shared test data absent)")
def test_real_ml_1m(tmp_path):
    out = str(tmp_path / "ml-1m")
    start = time.perf_counter()
    summary = convert_movielens(ML_1M, out, posters_dir=os.path.join(ML_1M, "posters"))
    seconds = time.perf_counter() - start
    assert summary == {"users": 6040, "items": 3706, "rated_items": 3706, "events": 1_000_209,
                       "posters": 2952, "source": "sequences.tsv.gz", "path": out}  # every poster is of a rated movie
    assert seconds < 60, f"conversion took {seconds:.1f} s"
    events = pq.read_table(os.path.join(out, "events"))
    assert events.num_rows == 1_000_209 and events.schema.remove_metadata() == EVENT_SCHEMA

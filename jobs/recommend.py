"""Batch recommendations: every user's (or the given users') top-K items, with explanations, -> Parquet.

    interestformer-recommend --checkpoint runs/<run>/checkpoint_<...> --out recommendations/
        [--users users.parquet | users.txt] [--k 10] [--include-history] [--explain 3]

Ray Data batch inference, as jobs/embed_items.py is: the users' full histories stream from the
checkpoint's prepared sequences (every event, oldest first) into `--actors` recommender actors,
each holding the model the run logs to MLflow (jobs/serving.py Recommender, so a user gets here
what the MLflow model returns for the same history), and the results stream into Parquet files:
no process holds all users. The serving artifacts are exported once, in the driver
(serving.export), and reach the actors through Ray's object store, never through the driver's
disk, so actors on other nodes of a cluster load them too.

Output: Parquet files in --out, one row per user found, in no particular order:
    user_id              string
    item_ids             list<string>          the K recommended raw item ids, best first
    scores               list<double>          their cosine scores, descending
    explanations         list<list<string>>    per recommended item, up to --explain history item
                                               ids its score depends on most, most first
    explanation_weights  list<list<double>>    how much more that score drops without each of
                                               them than the user's top items' scores do
                                               (leave-one-out, models/explain.py)
By default no item of a user's history is recommended (--include-history allows them); a user
with fewer other items than K gets fewer. `_summary.json` beside the files is written last: users
written, users requested but not in the data (their ids too: none is dropped silently), the
parameters and the time taken.

--users names a Parquet file or folder with a user_id column, or a text file with one user id a
line; the requested ids (not their histories) are read into the driver.
"""

import argparse
import os
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data.expressions import col

from interestformer.datasets.prepare import PreparedData
from interestformer.datasets.storage import filesystem, join, read_bytes, read_json, read_parquet, write_json
from interestformer.jobs.cli import program
from interestformer.jobs.cluster import start_ray
from interestformer.jobs.distributed import STATE_FILE
from interestformer.jobs.embed_items import _files_schema_and_rows
from interestformer.jobs.serving import Recommender, export

SUMMARY = "_summary.json"  # the leading underscore keeps Parquet readers from taking it for data
OUTPUT_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("item_ids", pa.list_(pa.string())), ("scores", pa.list_(pa.float64())),
    ("explanations", pa.list_(pa.list_(pa.string()))), ("explanation_weights", pa.list_(pa.list_(pa.float64()))),
])


def requested_users(uri: str) -> list[str]:
    """The distinct user ids, in first-seen order, of a Parquet file or folder with a user_id
    column, or of a text file with one id a line (blank lines skipped)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory or path.endswith(".parquet"):
        ids = pq.ParquetDataset(path, filesystem=fs).read(columns=["user_id"]).column("user_id").to_pylist()
        ids = [str(user) for user in ids if user is not None]
    else:
        ids = [line.strip() for line in read_bytes(uri).decode().splitlines() if line.strip()]
    return list(dict.fromkeys(ids))


def read_artifacts(folder: str) -> dict[str, bytes]:
    """{artifact name: its bytes} of the serving artifacts in `folder` (serving.export)."""
    artifacts = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            artifacts[name] = f.read()
    return artifacts


class RecommendUsers:
    """A batch of prepared sequences -> their users' recommendations (OUTPUT_SCHEMA), through a
    Recommender built from the serving artifacts' bytes (an object-store reference)."""

    def __init__(self, artifacts: ray.ObjectRef, k: int, exclude_history: bool, explain: int, threads: int):
        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as folder:  # the Recommender reads every file when it is built
            paths = {}
            for name, payload in ray.get(artifacts).items():
                paths[name] = os.path.join(folder, name)
                with open(paths[name], "wb") as f:
                    f.write(payload)
            self.recommender = Recommender(paths)
        self.k, self.exclude_history, self.explain = k, exclude_history, explain

    def __call__(self, sequences: pa.Table) -> pa.Table:
        item_ids = self.recommender.item_ids
        histories = [[item_ids[i - 1] for i in items] for items in sequences.column("items").to_pylist()]
        out = self.recommender.recommend(histories, sequences.column("event_types").to_pylist(), self.k,
                                         self.exclude_history, self.explain)
        return pa.table({"user_id": sequences.column("user_id"),
                         **{name: out[name].tolist() for name in OUTPUT_SCHEMA.names[1:]}}, schema=OUTPUT_SCHEMA)


def recommend(checkpoint: str, out: str, users: list[str] | None, k: int, exclude_history: bool, explain: int,
              batch_size: int, actors: int, cpus_per_actor: int) -> dict:
    """Writes the recommendations of the checkpoint's model for `users` (None: every user of its
    prepared data) into Parquet in `out`, then its summary; returns the summary."""
    started = time.perf_counter()
    state = read_json(join(checkpoint, STATE_FILE))
    if state is None:
        raise FileNotFoundError(f"no checkpoint at {checkpoint} ({STATE_FILE} missing)")
    prepared = PreparedData.load(state["prepared_path"])
    with tempfile.TemporaryDirectory() as folder:
        export(checkpoint, folder)
        artifacts = ray.put(read_artifacts(folder))

    sequences = read_parquet(prepared.sequences_path, columns=["user_id", "items", "event_types"])
    if users is not None:
        sequences = sequences.filter(expr=col("user_id").is_in(users))
    recommendations = sequences.map_batches(
        RecommendUsers,
        fn_constructor_kwargs=dict(artifacts=artifacts, k=k, exclude_history=exclude_history, explain=explain,
                                   threads=cpus_per_actor),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
    )
    fs, path = filesystem(out)
    recommendations.write_parquet(path, filesystem=fs, mode="overwrite")

    written, missing = 0, list(users or [])
    if fs.get_file_info(path).type != pafs.FileType.NotFound:  # no files when no user was found
        written = _files_schema_and_rows(fs, path)[1]
        if users is not None:  # only ids are read back, never histories
            found = pq.ParquetDataset(path, filesystem=fs).read(columns=["user_id"]).column("user_id").to_pylist()
            missing = sorted(set(users) - set(found))
    summary = {"users_written": written, "users_requested": None if users is None else len(users),
               "users_not_found": len(missing), "users_not_found_ids": missing, "k": k,
               "exclude_history": exclude_history, "explain": explain, "checkpoint": checkpoint,
               "seconds": round(time.perf_counter() - started, 1)}
    write_json(join(out, SUMMARY), summary)
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog=program("python -m jobs.recommend"),
        description="Top-K recommendations with explanations for every user of a checkpoint's prepared data "
                    "(or for the given users), written as Parquet: Ray Data batch inference.",
        epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder (or object-store URI) written by jobs.train; its prepared data "
                             "holds the users' histories")
    parser.add_argument("--out", required=True, help="output folder or URI; Parquet files already there are replaced")
    parser.add_argument("--users", default="",
                        help="only these users: a Parquet file or folder with a user_id column, or a text file "
                             "with one user id a line (default: every user)")
    parser.add_argument("--k", type=int, default=10, help="items recommended per user")
    parser.add_argument("--include-history", action="store_true",
                        help="allow items of a user's history among the recommendations (default: excluded)")
    parser.add_argument("--explain", type=int, default=3,
                        help="history items named per recommended item, those its score depends on most "
                             "(leave-one-out: one more user-model pass per distinct history item; 0: none, faster)")
    parser.add_argument("--batch-size", type=int, default=256, help="users per batch an actor scores at once")
    parser.add_argument("--actors", type=int, default=1, help="recommender actors, each holding the model")
    parser.add_argument("--cpus-per-actor", type=int, default=1, help="CPUs (and torch threads) per actor")
    args = parser.parse_args(argv)
    for name in ("k", "batch_size", "actors", "cpus_per_actor"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.explain < 0:
        parser.error(f"--explain must be >= 0, got {args.explain}")

    users = requested_users(args.users) if args.users else None
    # Locally, logical CPUs for the actors and one more for the read and write tasks beside them
    # (on a 2-core machine the actors would otherwise leave the pipeline no CPU).
    start_ray(args.actors * args.cpus_per_actor + 1)
    ray.data.DataContext.get_current().enable_progress_bars = True  # this job's progress report
    summary = recommend(args.checkpoint, args.out, users, args.k, not args.include_history, args.explain,
                        args.batch_size, args.actors, args.cpus_per_actor)
    if summary["users_not_found"]:
        shown = summary["users_not_found_ids"][:10]
        print(f"{summary['users_not_found']} requested user(s) not in the data, so not written: "
              f"{', '.join(shown)}{' ...' if summary['users_not_found'] > len(shown) else ''} "
              f"(all in {join(args.out, SUMMARY)})", file=sys.stderr)
    print(f"Recommendations for {summary['users_written']} users ({args.k} items each, {args.explain} explaining "
          f"items per item) written in {summary['seconds']:.0f} s to {args.out}")
    return summary


if __name__ == "__main__":
    from interestformer.jobs import cli

    cli.recommend()

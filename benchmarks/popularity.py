"""Where in the catalogue models rank well: test HR@10 and NDCG@10 per segment of target
popularity (models.ranking.TARGET_POPULARITY_BUCKETS: how often the target item occurred before),
for trained checkpoints side by side.

    .venv/bin/python -m benchmarks.popularity --run id_only=runs/<run>/checkpoint_<...> \\
        --run id_text=runs/<other run>/checkpoint_<...> [--out benchmarks/results/popularity.json]

Each checkpoint's best-validation weights rank the test split through jobs.evaluate: the same
code, and the same figures, as its training run's test metrics. Runs given the same label (one
per seed) are averaged. Content is expected to beat IDs on rarely seen targets; the table shows
how many test users such targets have, and whether it does. Prints a Markdown table (a row per
segment, a column per label) and writes the figures with machine, date and commit.
"""

import argparse
import os
import statistics

from benchmarks.common import RESULTS_DIR, save_results, stamp
from interestformer.jobs.evaluate import main as evaluate
from interestformer.models.ranking import TARGET_POPULARITY_BUCKETS, bucket_name

SEGMENTS = [bucket_name("target_popularity", low, high) for low, high in TARGET_POPULARITY_BUCKETS]
METRICS = ("hr@10", "ndcg@10")


def segment_figures(report: dict) -> dict:
    """A test report's (RankTotals.report) users, HR@10 and NDCG@10 per popularity segment that has users."""
    return {segment: {"users": report[f"segment/{segment}/users"],
                      **{m: report[f"segment/{segment}/{m}"] for m in METRICS}}
            for segment in SEGMENTS if f"segment/{segment}/users" in report}


def means_by_label(runs: list[dict]) -> dict:
    """Per label: its runs' mean of every segment metric (and of the overall NDCG@10), and how many runs."""
    means = {}
    for label in dict.fromkeys(run["label"] for run in runs):
        mine = [run for run in runs if run["label"] == label]
        segments = {segment: {"users": mine[0]["segments"][segment]["users"],
                              **{m: statistics.mean(run["segments"][segment][m] for run in mine) for m in METRICS}}
                    for segment in mine[0]["segments"]}
        means[label] = {"runs": len(mine), "ndcg@10": statistics.mean(run["ndcg@10"] for run in mine),
                        "segments": segments}
    return means


def markdown_table(means: dict) -> str:
    labels = list(means)
    head = ["target occurred before", "test users", *(f"{label} ndcg@10 (hr@10)" for label in labels)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for segment in SEGMENTS:
        if segment not in means[labels[0]]["segments"]:
            continue
        figures = [means[label]["segments"][segment] for label in labels]
        times = segment.removeprefix("target_popularity_").replace("over_", "> ") + " times"
        lines.append(f"| {times} | {figures[0]['users']} | "
                     + " | ".join(f"{f['ndcg@10']:.4f} ({f['hr@10']:.4f})" for f in figures) + " |")
    lines.append("| all | | " + " | ".join(f"{means[label]['ndcg@10']:.4f}" for label in labels) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.popularity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=CHECKPOINT",
                        help="a checkpoint folder written by jobs.train, under a label (repeatable; runs with the "
                             "same label are averaged)")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "popularity.json"), help="results JSON")
    args = parser.parse_args(argv)
    pairs = [run.split("=", 1) for run in args.run]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        parser.error("--run takes LABEL=CHECKPOINT")
    runs = []
    for label, checkpoint in pairs:
        report = evaluate(["--checkpoint", checkpoint, "--split", "test"])
        runs.append({"label": label, "checkpoint": checkpoint, "ndcg@10": report["ndcg@10"],
                     "hr@10": report["hr@10"], "segments": segment_figures(report)})
    means = means_by_label(runs)
    save_results(args.out, {"runs": runs, "means": means, **stamp()})
    print("\n" + markdown_table(means) + f"\n\nWritten to {args.out}")
    return means


if __name__ == "__main__":
    main()

"""Cold start, measured: new users after 0-3 events, and items that never trained.

    .venv/bin/python -m benchmarks.cold_start                  # the demo and ML-1M
    .venv/bin/python -m benchmarks.cold_start --datasets demo --set train.epochs=1   # a quick look

One jobs.train run per dataset, with a tenth of the users and a tenth of the items held out of
training (data.new_user_fraction and data.cold_item_fraction 0.1):
    new users   each held-out user ranked after their first 0, 1, 2 and 3 events (the target is
                the next one); with no event the model serves the most popular items, with 1-3
                it reads those items' representations (their IDs never trained on these users,
                and their text and images);
    new items   test users whose target is a held-out item, never seen in training: ranked from
                text and image alone (ML-1M: the content config; the demo: its ID + text +
                image model, where a held-out item's ID row is untrained).
Most popular is scored on the same rankings. Results: benchmarks/results/cold_start.json, and a table.
"""

import json
import os
import time

from benchmarks.common import PROJECT_DIR, RESULTS_DIR, read_results, save_results, stamp
from benchmarks.ml1m import ensure_converted
from interestformer.jobs.config import config_parser, load_config
from interestformer.jobs.train import train

DATASETS = {"demo": "configs/demo.yaml", "ml1m": "configs/ml1m_id_text_image.yaml"}
HELD_OUT = ["data.new_user_fraction=0.1", "data.cold_item_fraction=0.1"]
OUT = os.path.join(RESULTS_DIR, "cold_start.json")


def figures(summary: dict, model: str) -> dict:
    """HR@10 (and users) of one model on the new-user segments and the held-out items."""
    new_users = summary["new_users" if model == "InterestFormer" else "most_popular_new_users"]
    cold = summary["cold" if model == "InterestFormer" else "most_popular_cold"]
    row = {"new_items_hr@10": cold["hr@10"], "new_items_users": cold["users"]}
    for segment in ("history_0", "history_1-3"):
        row[f"new_users_{segment}_hr@10"] = new_users[f"segment/{segment}/hr@10"]
        row[f"new_users_{segment}_rankings"] = new_users[f"segment/{segment}/users"]
    return row


def markdown_table(results: dict) -> str:
    head = ["data", "model", "new user, 0 events: hr@10", "new user, 1-3 events: hr@10", "new item: hr@10"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dataset, models in results.items():
        if dataset not in DATASETS:
            continue
        for model in ("InterestFormer", "most popular"):
            row = models[model]
            lines.append(f"| {dataset} | {model} | {row['new_users_history_0_hr@10']:.4f} | "
                         f"{row['new_users_history_1-3_hr@10']:.4f} | {row['new_items_hr@10']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = config_parser("python -m benchmarks.cold_start", __doc__, example="train.epochs=1")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {list(DATASETS)}")
    args = parser.parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    if set(datasets) - set(DATASETS):
        parser.error(f"choose datasets from {list(DATASETS)}")
    configs = {d: load_config(os.path.join(PROJECT_DIR, DATASETS[d]), [
        *HELD_OUT, "experiment.mlflow_experiment=cold-start-benchmark", *args.set]) for d in datasets}
    if "ml1m" in datasets:
        ensure_converted(os.path.join(PROJECT_DIR, "..", "shared", "data", "ml-1m"),
                         configs["ml1m"].data.events_path.removesuffix("/events"))
    results = read_results(OUT)
    for dataset, cfg in configs.items():
        started = time.perf_counter()
        summary = train(cfg)
        results[dataset] = {model: figures(summary, model) for model in ("InterestFormer", "most popular")}
        results[dataset].update(run_id=summary["run_id"], minutes=(time.perf_counter() - started) / 60,
                                config=DATASETS[dataset], overrides=HELD_OUT + args.set, **stamp())
        save_results(OUT, results)
        print(f"\n{dataset}: {json.dumps(results[dataset])}", flush=True)
    print("\n" + markdown_table(results))
    print(f"\nWritten to {OUT}")
    return results


if __name__ == "__main__":
    main()

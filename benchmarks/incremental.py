"""Incremental training, measured on a time split of the demo log: cost and quality side by side.

    .venv/bin/python -m benchmarks.incremental                  # about 15 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.incremental --set train.epochs=1   # a quick look

The demo generator writes a log whose users start within `start_days` days of each other, so
their activity overlaps in time. The log is cut by time into five periods: 1-3 hold the first
60% of the events, 4 the next 20%, 5 the last 20%. A tenth of the catalogue (a seeded choice)
launches in period 4: those items have no earlier events and are missing from the catalogue of
periods 1-3, so the ID table must grow.

    base   trained from scratch on periods 1-3
    (a)    retrained from scratch on periods 1-4
    (b)    continued from base's checkpoint (train.init_from) on the log of periods 1-4 with
           data.train_since at period 4's start: only period-4 events are targets, earlier ones
           are history; launched items get new, empty ID rows
    (c)    stale: base's checkpoint as it is, never trained on period 4

Every model ranks period 5 with jobs.evaluate --data-config: each user with events before period
5 and one in it; the target is that user's first period-5 event, the history everything before
it; full ranking over the whole catalogue. It is reported for all such users and for those whose
target is a launched item (the stale model has never trained on one: it ranks them from their
text and image). Cost: the job's minutes (prepare, training, per-epoch validation, test), the
training loop's minutes, and training events (targets) processed, over all epochs.
Results: benchmarks/results/incremental.json, and a table.
"""

import json
import os
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from benchmarks.common import PROJECT_DIR, stamp, write_results
from interestformer.datasets.demo import DemoDataConfig, generate_demo
from interestformer.jobs import evaluate
from interestformer.jobs.config import config_parser, load_config
from interestformer.jobs.train import train

WORK = os.path.join(PROJECT_DIR, "data", "incremental")
LAUNCHED_FRACTION, LAUNCH_SEED = 0.1, 7
DEMO = DemoDataConfig(num_users=2000, start_days=10)
METRICS = ("hr@10", "ndcg@10", "hr@50", "mrr")


def write_log(name: str, events: pd.DataFrame, items: pa.Table) -> dict:
    """Writes one log (events and catalogue) as Parquet; returns its data config section."""
    folder = os.path.join(WORK, "logs", name)
    for sub, table in (("events", pa.Table.from_pandas(events, preserve_index=False)), ("items", items)):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        pq.write_table(table, os.path.join(folder, sub, "part-00000.parquet"))
    return {"source": "parquet", "events_path": os.path.join(folder, "events"),
            "items_path": os.path.join(folder, "items")}


def build_logs() -> tuple[dict, dict]:
    """The time-split logs: data config sections by name, and the period boundaries."""
    raw = os.path.join(WORK, "raw")
    generate_demo(raw, DEMO)
    events = pq.read_table(os.path.join(raw, "events")).to_pandas()
    items = pq.read_table(os.path.join(raw, "items"))
    period4, period5 = (int(t) for t in np.quantile(events["timestamp"], [0.6, 0.8]))
    ids = np.asarray(items.column("item_id").to_pylist())
    launched = set(np.random.default_rng(LAUNCH_SEED).choice(ids, round(LAUNCHED_FRACTION * len(ids)), replace=False))
    is_launched = events["item_id"].isin(launched)
    before5 = events[events["timestamp"] < period5]
    first_in_5 = events[events["timestamp"] >= period5].sort_values("timestamp", kind="stable").groupby("user_id").head(1)
    first_in_5 = first_in_5[first_in_5["user_id"].isin(before5["user_id"])]

    def history_of(targets: pd.DataFrame) -> pd.DataFrame:  # the targets' users' events before period 5
        return before5[before5["user_id"].isin(targets["user_id"])]

    launched_targets = first_in_5[first_in_5["item_id"].isin(launched)]
    logs = {
        "periods_1_3": write_log("periods_1_3", events[(events["timestamp"] < period4) & ~is_launched],
                                 items.filter(pa.array(~np.isin(ids, list(launched))))),
        "periods_1_4": write_log("periods_1_4", before5, items),
        # Only users with a period-5 event: each one's last event is then that target.
        "period_5": write_log("period_5", pd.concat([history_of(first_in_5), first_in_5]), items),
        "period_5_launched": write_log("period_5_launched", pd.concat(
            [history_of(launched_targets), launched_targets]), items),
    }
    return logs, {"period_4_start": period4, "period_5_start": period5, "launched_items": len(launched),
                  "period_5_users": int(first_in_5["user_id"].nunique()),
                  "period_5_launched_target_users": int(launched_targets["user_id"].nunique())}


def data_overrides(data: dict, prepared: str) -> list[str]:
    return [f"data.{key}={value}" for key, value in data.items()] + [
        f"data.prepared_dir={os.path.join(WORK, 'prepared', prepared)}"]


def run(name: str, data: dict, overrides: list[str]) -> dict:
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "demo.yaml"), [
        *data_overrides(data, name), "experiment.mlflow_experiment=incremental-benchmark",
        f"experiment.name={name}-{time.strftime('%Y%m%d-%H%M%S')}", *overrides])
    started = time.perf_counter()
    summary = train(cfg)
    return {"checkpoint": summary["checkpoint"], "minutes": (time.perf_counter() - started) / 60,
            "training_loop_minutes": sum(epoch["seconds"] for epoch in summary["throughput"]) / 60,
            "training_events": sum(epoch["events"] for epoch in summary["throughput"]),
            "training_users_per_epoch": summary["throughput"][0]["users"], "run_id": summary["run_id"]}


def ranked_on(checkpoint: str, data: dict, prepared: str) -> dict:
    """jobs.evaluate --data-config of the checkpoint on a log (prepared with its tokenizer)."""
    path = os.path.join(WORK, f"{prepared}.yaml")
    section = {**data, "prepared_dir": os.path.join(WORK, "prepared", prepared)}
    with open(path, "w") as f:
        yaml.safe_dump({"data": section}, f)
    report = evaluate.main(["--checkpoint", checkpoint, "--data-config", path])
    return {"users": report["users"], **{m: report[m] for m in METRICS}}


def markdown_table(figures: dict) -> str:
    head = ["model", "trained on", "job minutes", "training-loop minutes", "training events", *METRICS,
            "launched-item hr@10 (users)", "users"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, what in (("(a) retrain", "periods 1-4, from scratch"), ("(b) continue", "period 4, from base"),
                       ("(c) stale", "periods 1-3 (base)")):
        row = figures["models"][name]
        cells = [what, f"{row['minutes']:.1f}", f"{row['training_loop_minutes']:.1f}", str(row["training_events"]),
                 *(f"{row['period_5'][m]:.4f}" for m in METRICS),
                 f"{row['period_5_launched']['hr@10']:.4f} ({row['period_5_launched']['users']})",
                 str(row["period_5"]["users"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = config_parser("python -m benchmarks.incremental", __doc__, example="train.epochs=1")
    args = parser.parse_args(argv)
    load_config(os.path.join(PROJECT_DIR, "configs", "demo.yaml"), args.set)  # config mistakes stop here
    logs, split = build_logs()
    print(json.dumps(split), flush=True)
    base = run("base", logs["periods_1_3"], args.set)
    models = {
        "(a) retrain": run("retrain", logs["periods_1_4"], args.set),
        "(b) continue": run("continue", logs["periods_1_4"], [
            f"train.init_from={base['checkpoint']}", f"data.train_since={split['period_4_start']}", *args.set]),
        "(c) stale": {**base, "minutes": 0.0, "training_loop_minutes": 0.0, "training_events": 0,
                      "base_minutes": base["minutes"], "base_training_events": base["training_events"]},
    }
    for name, row in models.items():
        tag = name.split()[1]  # each model's own prepared copy: its tokenizer's token ids
        row["period_5"] = ranked_on(row["checkpoint"], logs["period_5"], f"period_5-{tag}")
        row["period_5_launched"] = ranked_on(row["checkpoint"], logs["period_5_launched"], f"period_5_launched-{tag}")
    figures = {"split": split, "models": models, "base": base, "overrides": args.set, "demo": vars(DEMO)}
    print("\n" + markdown_table(figures))
    write_results("incremental", figures)
    return {**figures, **stamp()}


if __name__ == "__main__":
    main()

"""Time to quality on MovieLens-1M: our training job against a plain PyTorch loop, in one run.

    .venv/bin/python -m benchmarks.convergence                    # each side capped at 90 minutes
    .venv/bin/python -m benchmarks.convergence --minutes 45       # shorter caps

1. Ours: jobs.train on configs/ml1m_id_only.yaml (2 Ray Train workers, DeepSpeed, Ray Data),
   trained to its early stop (train.patience) or for --minutes, whichever comes first. Its
   validation curve is read back from the MLflow run; its minutes count from the job's start
   (Ray, prepared data, worker start-up and all).
2. Then the plain loop (benchmarks/plain_loop.py): the same model, loss, batch size (micro-batch
   x workers), schedule and model selection in one process with as many threads as our workers
   have CPUs, its minutes counted from its start (packing the batches included). It stops at the
   same cap, at its own early stop, or once its validation passes the best ours reached.

Both read the test split once, with their best-validation epoch. Writes
benchmarks/results/convergence.json (curves against minutes and epochs, test metrics, the time
to each validation level and the ratio ours / plain) and benchmarks/results/convergence.png.
"""

import json
import os
import time

from benchmarks.common import PROJECT_DIR, RESULTS_DIR, stamp
from benchmarks.ml1m import ensure_converted
from benchmarks.plain_loop import plain_convergence
from interestformer.datasets.prepare import prepare
from interestformer.jobs import tracking
from interestformer.jobs.config import config_parser, load_config
from interestformer.jobs.cluster import ensure_ray
from interestformer.jobs.train import tokenizer_path, train

CONFIG = os.path.join(PROJECT_DIR, "configs", "ml1m_id_only.yaml")
LEVEL = 0.15  # the validation NDCG@10 the time target names
TEST_METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr")


def minutes_to(curve: list[dict], metric: str, level: float) -> float | None:
    """Minutes until the curve first reaches `level`; None if it never does."""
    return next((point["minutes"] for point in curve if point[metric] >= level), None)


def level_ratios(ours: list[dict], plain: list[dict], metric: str, step: float = 0.01) -> dict[str, float]:
    """ours / plain minutes to each validation level (multiples of `step`) that both curves reach."""
    top = min(max(p[metric] for p in ours), max(p[metric] for p in plain))
    levels = [round(step * i, 4) for i in range(1, int(top / step + 1e-9) + 1)]
    return {f"{level:.2f}": minutes_to(ours, metric, level) / minutes_to(plain, metric, level) for level in levels}


def ours_curve(summary: dict, metric: str, started_ms: int) -> list[dict]:
    """The job's validation curve from its MLflow run: epoch, minutes since the job started, metric."""
    uri, run_id = summary["tracking_uri"], summary["run_id"]
    epochs = {point.step: int(point.value) for point in tracking.metric_points(uri, run_id, "epochs_done")}
    return [{"epoch": epochs[point.step], "minutes": (point.timestamp - started_ms) / 60000, metric: point.value}
            for point in tracking.metric_points(uri, run_id, metric)]


def plot(curves: dict[str, list[dict]], metric: str, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_time, by_epoch) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        by_time.plot([p["minutes"] for p in curve], [p[metric] for p in curve], marker=".", label=name)
        by_epoch.plot([p["epoch"] for p in curve], [p[metric] for p in curve], marker=".", label=name)
    for axes, label in ((by_time, "wall minutes"), (by_epoch, "epoch")):
        axes.axhline(LEVEL, color="grey", linestyle=":", linewidth=1)
        axes.set_xlabel(label)
        axes.set_ylabel(f"validation {metric.removeprefix('val_')}")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("MovieLens-1M, ID-only, full ranking: validation during training")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = config_parser("python -m benchmarks.convergence", __doc__)
    parser.add_argument("--minutes", type=float, default=90.0, help="cap of each side's wall time (default 90)")
    parser.add_argument("--source", default=os.path.join(PROJECT_DIR, "..", "shared", "data", "ml-1m"),
                        help="MovieLens-1M folder (sequences.tsv.gz, movies.dat, posters/)")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "convergence.json"), help="results JSON")
    args = parser.parse_args(argv)
    cfg = load_config(args.config or CONFIG, ["experiment.mlflow_experiment=benchmarks", *args.set,
                                              f"train.max_minutes={args.minutes}"])
    metric = cfg.train.select_metric

    ensure_converted(args.source, cfg.data.events_path.removesuffix("/events"))
    started_ms = int(time.time() * 1000)
    summary = train(cfg)
    ours = {"curve": ours_curve(summary, metric, started_ms), "best_epoch": summary["best_epoch"],
            "stopped_epoch": summary["stopped_epoch"], "validation": summary["validation"],
            "test": summary["test"], "minutes": (time.time() * 1000 - started_ms) / 60000, "run_id": summary["run_id"]}
    print(f"ours: best {metric} {ours['validation'][metric]:.4f} at epoch {ours['best_epoch']}, "
          f"stopped at {ours['stopped_epoch']}, {ours['minutes']:.1f} min", flush=True)

    ensure_ray(cfg)  # prepare runs on Ray Data; the job's Ray is still up
    prepared = prepare(cfg.data, tokenizer_path=tokenizer_path(cfg))
    threads = max(1, int(cfg.train.num_workers * cfg.train.cpus_per_worker))
    plain = plain_convergence(prepared, cfg, threads, cfg.train.micro_batch_size * cfg.train.num_workers,
                              args.minutes, stop_at=ours["validation"][metric])

    results = {}
    for name, side in (("ours", ours), ("plain", plain)):
        results[name] = {**side, f"minutes_to_val_ndcg_{LEVEL}": minutes_to(side["curve"], metric, LEVEL),
                         "test_ndcg@10": side["test"]["ndcg@10"], "test_hr@10": side["test"]["hr@10"]}
    ratios = level_ratios(ours["curve"], plain["curve"], metric)
    top = max(ratios, key=float) if ratios else None
    figures = {
        "config": os.path.relpath(args.config or CONFIG, PROJECT_DIR), "overrides": args.set, "cap_minutes": args.minutes,
        "metric": metric, "ours": results["ours"], "plain": results["plain"],
        "test_ndcg@10": results["ours"]["test_ndcg@10"], f"minutes_to_val_ndcg_{LEVEL}":
            results["ours"][f"minutes_to_val_ndcg_{LEVEL}"],
        # ours over plain, to the highest validation level both reached; and at every level below it
        "time_ratio_vs_plain": ratios[top] if top else None, "time_ratio_level": float(top) if top else None,
        "time_ratio_by_level": ratios, "plain_threads": threads, **stamp(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(figures, f, indent=1)
    plot({"InterestFormer (2 workers)": ours["curve"], f"plain loop ({threads} threads)": plain["curve"]}, metric,
         os.path.splitext(args.out)[0] + ".png")
    print("\n" + markdown_table(figures))
    print(f"\nWritten to {args.out}")
    return figures


def markdown_table(figures: dict) -> str:
    head = ["run", "best epoch", "stopped", "minutes", f"min to val {LEVEL}", "val ndcg@10", *TEST_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ("ours", "plain"):
        side = figures[name]
        to_level = side[f"minutes_to_val_ndcg_{LEVEL}"]
        lines.append("| " + " | ".join([name, str(side["best_epoch"]), str(side["stopped_epoch"]), f"{side['minutes']:.1f}",
                                        "not reached" if to_level is None else f"{to_level:.1f}",
                                        f"{side['validation'][figures['metric']]:.4f}",
                                        *(f"{side['test'][m]:.4f}" for m in TEST_METRICS)]) + " |")
    ratio = figures["time_ratio_vs_plain"]
    lines.append(f"\nours / plain wall time to validation {figures['time_ratio_level']}: "
                 f"{'n/a' if ratio is None else f'{ratio:.2f}x'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Overhead of the distributed stack: samples/s of our training job (Ray Data streaming into Ray
Train workers running DeepSpeed) against a plain single-process PyTorch loop over the same model,
data and batch size (benchmarks/plain_loop.py), in one run.

    .venv/bin/python -m benchmarks.overhead                      # the demo model, 3 epochs each
    .venv/bin/python -m benchmarks.overhead --config configs/tiny.yaml --set train.epochs=2

Each worker gets `--threads` CPU threads (train.cpus_per_worker), and so does the plain loop.
Rates are steady state: the first epoch (start-up, the DeepSpeed op compile, Ray Data's first
pass) is left out of every figure. Writes benchmarks/results/overhead.json.
Targets (issue 4): our 1-worker run within 10% of the plain loop; 2 workers faster than 1.
"""


from benchmarks.common import write_results
from benchmarks.plain_loop import plain_training
from interestformer.datasets.prepare import prepare
from interestformer.jobs.config import config_parser, load_config
from interestformer.jobs.cluster import ensure_ray
from interestformer.jobs.train import train


def steady_rate(epochs: list[dict]) -> float:
    """Samples/s over every epoch but the first."""
    later = epochs[1:] or epochs
    return sum(e["users"] for e in later) / sum(e["seconds"] for e in later)


def main(argv=None):
    parser = config_parser("python -m benchmarks.overhead", __doc__)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not counted")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per worker and for the plain loop")
    args = parser.parse_args(argv)
    common = [f"train.epochs={args.epochs}", f"train.cpus_per_worker={args.threads}",
              "experiment.mlflow_experiment=benchmarks", "experiment.system_metrics_interval_s=0", *args.set]
    configs = {workers: load_config(args.config, [*common, f"train.num_workers={workers}"]) for workers in (1, 2)}

    ensure_ray(configs[2])  # before Ray Data starts a Ray of its own, too small for the workers and the pipeline
    prepared = prepare(configs[1].data, tokenizer_path=configs[1].model.text.pretrained_path)
    plain = plain_training(prepared, configs[1], args.threads)
    ours = {workers: train(cfg)["throughput"] for workers, cfg in configs.items()}
    figures = {
        "plain_samples_per_s": steady_rate(plain),
        "ours_1w_samples_per_s": steady_rate(ours[1]),
        "ours_2w_samples_per_s": steady_rate(ours[2]),
        "threads_per_worker": args.threads,
        "epochs_counted": args.epochs - 1,
        "micro_batch_size": configs[1].train.micro_batch_size,
        "config": args.config or "demo (built-in defaults)",
        "overrides": args.set,
        "per_epoch": {"plain": plain, "ours_1w": ours[1], "ours_2w": ours[2]},
    }
    figures["ours_1w_vs_plain"] = figures["ours_1w_samples_per_s"] / figures["plain_samples_per_s"]
    figures["ours_2w_vs_1w"] = figures["ours_2w_samples_per_s"] / figures["ours_1w_samples_per_s"]
    print("\n| run | samples/s | vs plain |\n|---|---|---|")
    for name in ("plain", "ours_1w", "ours_2w"):
        rate = figures[f"{name}_samples_per_s"]
        print(f"| {name} | {rate:.1f} | {rate / figures['plain_samples_per_s']:.3f} |")
    write_results("overhead", figures)
    return figures


if __name__ == "__main__":
    main()

"""Ingest headroom: how fast the Ray Data pipeline alone produces training batches, against how
fast training consumes them, and how long the trainer waits for data, in one run.

    .venv/bin/python -m benchmarks.ingest                    # the demo (text + images, live encoders), 3 epochs
    .venv/bin/python -m benchmarks.ingest --config configs/tiny.yaml

1. The pipeline alone: the training job's own dataset (jobs.train.training_rows: sequences read
   from Parquet, cut into windows) batched by its own collate function (negatives, text tokens,
   pixels) and iterated by this process as a worker iterates it, with nothing consuming them.
2. The training job itself (jobs.train.train): its workers time every wait for their next batch.
Both report steady state: every epoch but the first, and within an epoch every batch but the
first (Ray Data starts each epoch's pipeline anew; that first wait is reported on its own).
Writes benchmarks/results/ingest.json. Targets (issue 4): pipeline >= 3x training; trainer wait
under 5% of step time.
"""

import time

from benchmarks.common import write_results
from benchmarks.overhead import steady_rate
from interestformer.datasets.prepare import prepare
from interestformer.jobs.config import config_parser, load_config
from interestformer.jobs.cluster import ensure_ray
from interestformer.datasets.pipeline import training_batches
from interestformer.jobs.train import batch_packer, train, training_rows


def pipeline_alone(dataset, packer, batch_size: int, epochs: int) -> list[dict]:
    """Per epoch: users, seconds after the first batch, samples/s and the first batch's wait."""
    out = []
    for epoch in range(epochs):
        started, first, users = time.perf_counter(), None, 0
        for batch in training_batches(dataset, packer, batch_size, epoch):
            if first is None:
                first = time.perf_counter()
            else:
                users += len(batch["history"])
        seconds = time.perf_counter() - first
        out.append({"users": users, "seconds": seconds, "samples_per_s": users / seconds,
                    "first_batch_wait_s": first - started})
    return out


def main(argv=None):
    parser = config_parser("python -m benchmarks.ingest", __doc__)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each part; the first is not counted")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [f"train.epochs={args.epochs}", "experiment.mlflow_experiment=benchmarks",
                                    "experiment.system_metrics_interval_s=0", *args.set])
    ensure_ray(cfg)
    prepared = prepare(cfg.data, tokenizer_path=cfg.model.text.pretrained_path)
    alone = pipeline_alone(training_rows(prepared, cfg), batch_packer(prepared, cfg), cfg.train.micro_batch_size,
                           args.epochs)
    trained = train(cfg)["throughput"]
    later = trained[1:] or trained
    figures = {
        "pipeline_samples_per_s": steady_rate(alone),
        "train_samples_per_s": steady_rate(trained),
        "trainer_wait_fraction": max(e["data_wait_fraction"] for e in later),
        "first_batch_wait_s": {"pipeline_alone": [e["first_batch_wait_s"] for e in alone[1:]],
                               "training": [e["first_batch_wait_s"] for e in later]},
        "workers": cfg.train.num_workers,
        "pipeline_workers": cfg.train.pipeline_workers,
        "micro_batch_size": cfg.train.micro_batch_size,
        "config": args.config or "demo (built-in defaults)",
        "overrides": args.set,
        "per_epoch": {"pipeline_alone": alone, "training": trained},
    }
    figures["headroom"] = figures["pipeline_samples_per_s"] / figures["train_samples_per_s"]
    print("\n| figure | value |\n|---|---|")
    for key in ("pipeline_samples_per_s", "train_samples_per_s", "headroom", "trainer_wait_fraction"):
        print(f"| {key} | {figures[key]:.3f} |")
    write_results("ingest", figures)
    return figures


if __name__ == "__main__":
    main()

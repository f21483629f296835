"""Long- vs short-term interest: the ablation of model.interest on the demo data and MovieLens-1M.

    .venv/bin/python -m benchmarks.interest                    # both datasets, every variant
    .venv/bin/python -m benchmarks.interest --datasets demo --set train.epochs=1   # a quick look
    .venv/bin/python -m benchmarks.interest --datasets demo --seeds 0,1,2          # mean and spread

Each variant is one jobs.train run of the dataset's config with only the interest keys changed:
    short      the causal Transformer over the last model.short_term_events events
    long       one attention read over the whole window (data.max_seq_len events), learned query
    gated      both, the long-term read queried by the short-term interest, mixed by the learned
               gate (the default)
    full       the causal Transformer attending to the whole window (short_term_events 0): the
               model before long/short-term interest, for reference
Every number is the final epoch's model on the test split (validation beside it). With several
--seeds (train.seed: initialisation and negatives) each variant runs once per seed and the table
gives the mean and the sample standard deviation across seeds; a later run with other seeds and the
same --set adds its runs to those already in the results. Results go to
benchmarks/results/interest.json (merged with datasets run before) and print as a table.
"""

import json
import os
import time

from benchmarks.common import (PROJECT_DIR, RESULTS_DIR, across_seeds, parse_seeds, read_results, save_results,
                               stamp, with_earlier_seeds)
from benchmarks.ml1m import ensure_converted
from interestformer.jobs.config import config_parser, load_config
from interestformer.jobs.train import train

DATASETS = {"demo": "configs/demo.yaml", "ml1m": "configs/ml1m_id_only.yaml"}
VARIANTS = {
    "short": ["model.interest=short"],
    "long": ["model.interest=long"],
    "gated": ["model.interest=gated"],
    "full": ["model.interest=short", "model.short_term_events=0"],
}
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr")
OUT = os.path.join(RESULTS_DIR, "interest.json")


def run_variant(dataset: str, variant: str, seed: int, overrides: list[str]) -> dict:
    cfg = load_config(os.path.join(PROJECT_DIR, DATASETS[dataset]),
                      ["experiment.mlflow_experiment=interest-benchmark", f"experiment.name={dataset}-{variant}-"
                       f"{time.strftime('%Y%m%d-%H%M%S')}", *VARIANTS[variant], *overrides, f"train.seed={seed}"])
    started = time.perf_counter()
    summary = train(cfg)
    row = {m: summary["test"][m] for m in METRICS}
    row.update({f"val_{m}": summary["validation"][f"val_{m}"] for m in ("hr@10", "ndcg@10")},
               users=summary["test"]["users"], minutes=(time.perf_counter() - started) / 60,
               epochs=cfg.train.epochs, short_term_events=cfg.model.short_term_events,
               max_seq_len=cfg.data.max_seq_len, seed=seed, run_id=summary["run_id"])
    return row


def markdown_table(results: dict) -> str:
    """A row per dataset and variant; figures over several seeds read mean ± standard deviation."""
    head = ["data", "interest", "seeds", *METRICS, "val ndcg@10", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dataset in DATASETS:
        for variant in VARIANTS:
            row = results.get(dataset, {}).get(variant)
            if row:
                seeds = row.get("seeds", [row.get("seed", 0)])
                spread = len(seeds) > 1
                cells = [f"{row[m]:.4f}" + (f" ± {row['sd_' + m]:.4f}" if spread else "")
                         for m in (*METRICS, "val_ndcg@10")] + [f"{row['minutes']:.1f}"]
                lines.append(f"| {dataset} | {variant} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = config_parser("python -m benchmarks.interest", __doc__, example="train.epochs=1")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {list(DATASETS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated train.seed values; each variant runs once per "
                                                     "seed and the table gives mean ± standard deviation")
    args = parser.parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    variants = [v for v in args.variants.split(",") if v]
    if set(datasets) - set(DATASETS) or set(variants) - set(VARIANTS):
        parser.error(f"choose datasets from {list(DATASETS)} and variants from {list(VARIANTS)}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError:
        parser.error(f"--seeds takes integers, got {args.seeds!r}")
    for dataset in datasets:  # every config mistake stops here, before any training
        for variant in variants:
            load_config(os.path.join(PROJECT_DIR, DATASETS[dataset]), VARIANTS[variant] + args.set)
    if "ml1m" in datasets:
        ensure_converted(os.path.join(PROJECT_DIR, "..", "shared", "data", "ml-1m"),
                         load_config(os.path.join(PROJECT_DIR, DATASETS["ml1m"])).data.events_path.removesuffix("/events"))

    results = read_results(OUT)
    for dataset in datasets:
        for variant in variants:
            runs = []
            for seed in seeds:
                runs.append({**run_variant(dataset, variant, seed, args.set), **stamp()})
                print(f"\n{dataset} {variant} seed {seed}: {json.dumps(runs[-1])}", flush=True)
            runs = with_earlier_seeds(results.get(dataset, {}).get(variant), runs, args.set)
            row = across_seeds(runs, (*METRICS, "val_hr@10", "val_ndcg@10", "minutes"))
            results.setdefault(dataset, {})[variant] = {**row, "overrides": args.set, **stamp()}
            save_results(OUT, results)
    print("\n" + markdown_table(results))
    print(f"\nWritten to {OUT}")
    return results


if __name__ == "__main__":
    main()

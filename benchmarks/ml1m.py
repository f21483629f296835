"""MovieLens-1M benchmark: the four item configs and most-popular, under the published protocol.

    .venv/bin/python -m benchmarks.ml1m                       # everything (see docs/benchmarks.md for run time)
    .venv/bin/python -m benchmarks.ml1m --configs id_only --set train.epochs=2   # a quick look

For each config in configs/ml1m_<name>.yaml it runs jobs.train twice:
  1. the standard protocol: each user's last item is the test target, the one before it
     validates, full ranking over all 3,706 items, max sequence length 200 -> hr@K, ndcg@K, mrr,
     and HR@10 and NDCG@10 per segment of target popularity (popularity_segments);
  2. the cold-start protocol: the same config with data.cold_item_fraction = 0.1 (10% of items
     held out of training entirely) -> cold_hr@10 and cold_ndcg@10 over test users whose target is
     one of those items.
Every number is the best-validation epoch's model (train.select_metric, with early stopping),
read once on the test split; the recipe was chosen on validation only. Most-popular is scored on the same users. Results are written to
benchmarks/results/ml1m.json (merged with configs run before, so configs can run one at a time)
and printed as a Markdown table beside the published numbers.

With several --seeds (train.seed: initialisation, dropout, negatives) each config runs once
per seed, the table gives mean ± sample standard deviation, and a later run with other seeds and the
same --set adds its runs to those already there. Whether content pays is then one command:

    .venv/bin/python -m benchmarks.ml1m --configs id_only,id_text --seeds 0,1,2 --skip-cold

which ends with each content config against ID-only over the seeds both ran: the mean difference in
test NDCG@10, and whether it is at least +0.005 with the content config's lowest seed above
ID-only's highest (the bar a gain must clear to be more than seed noise).

With --distill, each seed then trains once more as a student of the other seeds' best checkpoints
(train.teachers, distillation), under the protocol's standard split, into the row
<config>_distilled: one model against several ranked together, over the same seeds.

    .venv/bin/python -m benchmarks.ml1m --configs id_only --seeds 0,1,2 --skip-cold --distill
"""

import argparse
import json
import os
import time

from benchmarks.common import (PROJECT_DIR, across_seeds, parse_seeds, read_results, save_results,
                               stamp as benchmark_stamp, with_earlier_seeds)
from benchmarks.popularity import segment_figures
from interestformer.datasets.movielens import convert_movielens
from interestformer.jobs.config import load_config
from interestformer.jobs.train import train

CONFIGS = ("id_only", "id_text", "id_text_image", "content_only")
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr")
COLD_METRICS = ("hr@10", "ndcg@10")
COLD_FRACTION = 0.1
# meta-recsys/generative-recommenders README, same protocol (full ranking, last item, length 200).
PUBLISHED = {
    "SASRec": {"hr@10": 0.2853, "ndcg@10": 0.1603, "hr@50": 0.5474, "ndcg@50": 0.2185, "hr@200": 0.7528,
               "ndcg@200": 0.2498},
    "HSTU": {"hr@10": 0.3097, "ndcg@10": 0.1720, "hr@50": 0.5754, "ndcg@50": 0.2307, "hr@200": 0.7716,
             "ndcg@200": 0.2606},
    "HSTU-large": {"hr@10": 0.3294, "ndcg@10": 0.1893, "hr@50": 0.5935, "ndcg@50": 0.2481, "hr@200": 0.7839,
                   "ndcg@200": 0.2771},
}
DEFAULT_OUT = os.path.join(PROJECT_DIR, "benchmarks", "results", "ml1m.json")
# Content pays when it beats ID-only by this much test NDCG@10 on the mean over seeds, with its lowest
# seed above ID-only's highest.
CONTENT_MARGIN = 0.005


def ensure_converted(source: str, out_dir: str):
    """Converts the shared MovieLens-1M copy into our schema once (a few seconds)."""
    if os.path.isdir(os.path.join(out_dir, "events")) and os.path.isdir(os.path.join(out_dir, "items")):
        return
    posters = os.path.join(source, "posters")
    print(json.dumps(convert_movielens(source, out_dir, posters if os.path.isdir(posters) else None)), flush=True)


def run_config(name: str, overrides: list[str], seed: int, cold: bool) -> dict:
    """One training run of configs/ml1m_<name>.yaml; returns jobs.train's summary and the minutes."""
    extra = [f"data.cold_item_fraction={COLD_FRACTION}"] if cold else []
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", f"ml1m_{name}.yaml"),
                      ["experiment.mlflow_experiment=ml1m-benchmark", *overrides, f"train.seed={seed}", *extra])
    started = time.perf_counter()
    summary = train(cfg)
    summary["minutes"] = (time.perf_counter() - started) / 60
    summary["max_epochs"] = cfg.train.epochs
    return summary


STANDARD_FIELDS = (*METRICS, "users", "max_epochs", "best_epoch", "stopped_epoch", "run_id", "checkpoint",
                   "popularity_segments")
COLD_FIELDS = (*(f"cold_{m}" for m in COLD_METRICS), "cold_users", "cold_run_id", "cold_best_epoch", "cold_minutes")


def standard_figures(summary: dict) -> dict:
    """A standard-protocol run's row fields from run_config's summary."""
    return {**{m: summary["test"][m] for m in METRICS}, "users": summary["test"]["users"],
            "minutes": summary["minutes"], "max_epochs": summary["max_epochs"], "best_epoch": summary["best_epoch"],
            "stopped_epoch": summary["stopped_epoch"], "run_id": summary["run_id"],
            "checkpoint": summary["checkpoint"], "popularity_segments": segment_figures(summary["test"])}


def teachers_of(seed: int, runs: list[dict]) -> list[str]:
    """Distillation's teachers for `seed`: the best checkpoints of the other seeds' runs."""
    return [run["checkpoint"] for run in runs if run["seed"] != seed and "checkpoint" in run]


def with_other_protocol(earlier: dict | None, run: dict, overrides: list[str], ran_cold: bool) -> dict:
    """A seed's run of one protocol alone (--cold-only, or --skip-cold when ran_cold is False) with the
    other protocol's figures from the earlier run of the same seed and overrides in the results row,
    which would otherwise replace that run and lose them: a row can be filled a protocol at a time.
    The kept part's commit and date stay beside it (standard_commit, standard_date or cold_commit,
    cold_date), and minutes covers both parts where the earlier run's split of them is known."""
    if not earlier or earlier.get("overrides") != overrides:
        return run
    before = next((r for r in earlier.get("runs", [{"seed": 0, **earlier}]) if r.get("seed", 0) == run["seed"]), None)
    part, fields = ("standard", STANDARD_FIELDS) if ran_cold else ("cold", COLD_FIELDS)
    kept = {key: before[key] for key in fields if before and key in before}
    if not kept:
        return run
    merged = {**kept, **run, f"{part}_commit": before.get(f"{part}_commit", before.get("commit")),
              f"{part}_date": before.get(f"{part}_date", before.get("date"))}
    cold_minutes = before.get("cold_minutes") if "cold_hr@10" in before else 0.0
    standard_minutes = before["minutes"] - cold_minutes if "minutes" in before and cold_minutes is not None else None
    kept_minutes = standard_minutes if ran_cold else cold_minutes
    if kept_minutes is None:  # an earlier run of both parts from before cold_minutes was recorded
        merged.pop("minutes")
    else:
        merged["minutes"] = run["minutes"] + kept_minutes
    return merged


def markdown_table(results: dict) -> str:
    """The results beside the published rows, as docs/benchmarks.md shows them."""
    head = ["model", "seeds", *METRICS, "cold hr@10", "cold ndcg@10", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, published in PUBLISHED.items():
        lines.append("| " + " | ".join([f"{name} (published)", "", *(f"{published.get(m, float('nan')):.4f}"
                                                                      for m in METRICS[:-1]), "", "", "", ""]) + " |")
    for name in (*(row for name in CONFIGS for row in (name, f"{name}_distilled")), "most_popular"):
        if name not in results:
            continue
        row = results[name]
        seeds = row.get("seeds", [])

        def cell(key: str, digits: int = 4) -> str:
            if key not in row:
                return ""
            return f"{row[key]:.{digits}f}" + (f" ± {row['sd_' + key]:.{digits}f}" if len(seeds) > 1 else "")

        cells = [",".join(map(str, seeds)), *(cell(m) for m in METRICS), *(cell(f"cold_{m}") for m in COLD_METRICS),
                 cell("minutes", 0)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def content_against_id_only(results: dict, metric: str = "ndcg@10") -> dict:
    """Each content config against ID-only over the seeds both ran with the same --set: test `metric`
    per seed, the mean difference, and whether content pays (CONTENT_MARGIN on the mean, the content
    config's lowest seed above ID-only's highest)."""
    id_only = results.get("id_only", {})
    baseline = {run["seed"]: run[metric] for run in id_only.get("runs", []) if metric in run}
    verdicts = {}
    for name in CONFIGS[1:]:
        row = results.get(name, {})
        if row.get("overrides") != id_only.get("overrides"):
            continue
        content = {run["seed"]: run[metric] for run in row.get("runs", []) if metric in run}
        seeds = sorted(set(content) & set(baseline))
        if not seeds:
            continue
        ours, theirs = [content[s] for s in seeds], [baseline[s] for s in seeds]
        mean_difference = sum(ours) / len(seeds) - sum(theirs) / len(seeds)
        verdicts[name] = {
            "seeds": seeds, "metric": f"test_{metric}", "id_only": theirs, name: ours,
            "differences": [a - b for a, b in zip(ours, theirs)], "mean_difference": mean_difference,
            "lowest_above_highest": min(ours) > max(theirs),
            "pays": mean_difference >= CONTENT_MARGIN and min(ours) > max(theirs),
        }
    return verdicts


def verdict_lines(verdicts: dict) -> list[str]:
    """content_against_id_only's verdicts, a line each, as the command prints them."""
    lines = []
    for name, v in verdicts.items():
        per_seed = ", ".join(f"{d:+.4f}" for d in v["differences"])
        lines.append(f"{name} vs id_only, seeds {v['seeds']}: {v['metric']} {v['mean_difference']:+.4f} on the mean "
                     f"(per seed {per_seed}); lowest {name} {min(v[name]):.4f}, highest id_only {max(v['id_only']):.4f}: "
                     + ("content pays" if v["pays"] else f"content does not pay (needs {CONTENT_MARGIN:+.3f} and the "
                                                         f"lowest seed above the highest)"))
    return lines


def record(results: dict, name: str, runs: list[dict], overrides: list[str], stamp: dict):
    """Puts a config's runs so far (with the earlier seeds of the same overrides) into the results,
    as their mean and spread over seeds, and brings the content verdict up to date."""
    runs_so_far = with_earlier_seeds(results.get(name), runs, overrides)
    keys = (*METRICS, *(f"cold_{m}" for m in COLD_METRICS), "minutes")
    results[name] = {**across_seeds(runs_so_far, keys), "overrides": overrides, **stamp}
    results.update(stamp, protocol="last item test, previous item validation, full ranking over every item, "
                                   f"max_seq_len 200; cold: {COLD_FRACTION:.0%} of items held out of training")
    results["content_vs_id_only"] = content_against_id_only(results)


def distill_seeds(name: str, seeds: list[int], runs: list[dict], args, results: dict, stamp: dict):
    """--distill: each seed trained again with the other seeds' best checkpoints as teachers, into
    the row <name>_distilled, saved after each student."""
    students = []
    for seed in seeds:
        teachers = teachers_of(seed, runs)
        student = run_config(name, [*args.set, f"train.teachers=[{','.join(teachers)}]"], seed, cold=False)
        students.append({"seed": seed, **standard_figures(student), "teachers": teachers, **stamp})
        print(f"\n{name} seed {seed} distilled: {json.dumps(students[-1])}", flush=True)
        record(results, f"{name}_distilled", students, args.set, stamp)
        save_results(args.out, results)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ml1m", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.path.join(PROJECT_DIR, "..", "shared", "data", "ml-1m"),
                        help="MovieLens-1M folder (GroupLens files or sequences.tsv.gz, movies.dat, posters/)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every run, e.g. --set train.epochs=2 (repeatable)")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--skip-cold", action="store_true",
                      help="skip the cold-start runs (a seed's cold figures already in --out are kept)")
    runs.add_argument("--cold-only", action="store_true",
                      help="only the cold-start runs (a seed's standard figures already in --out are kept)")
    parser.add_argument("--seeds", default="0", help="comma-separated train.seed values; each config runs once per "
                                                     "seed and the table gives mean ± standard deviation (default 0)")
    parser.add_argument("--distill", action="store_true",
                        help="then train each seed again, distilled from the other seeds' best checkpoints, as the row "
                             "<config>_distilled (standard protocol; two seeds or more)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="results JSON (merged with what it already holds)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if any(setting.split("=", 1)[0].strip() == "train.seed" for setting in args.set):
        parser.error("give the training seeds with --seeds, not --set train.seed")
    if args.distill and (len(seeds) < 2 or args.cold_only):
        parser.error("--distill trains each seed from the others' standard runs: it needs two --seeds or more, "
                     "without --cold-only")
    for name in names:  # every config mistake stops here, before any training
        load_config(os.path.join(PROJECT_DIR, "configs", f"ml1m_{name}.yaml"), args.set)

    ensure_converted(args.source, load_config(os.path.join(PROJECT_DIR, "configs", "ml1m_id_only.yaml")).data.events_path
                     .removesuffix("/events"))
    results = read_results(args.out)
    stamp = benchmark_stamp()
    for name in names:
        runs = []
        for seed in seeds:
            row, popular = {"seed": seed, "minutes": 0.0, **stamp}, {}
            if not args.cold_only:
                standard = run_config(name, args.set, seed, cold=False)
                row.update(standard_figures(standard))
                popular = {m: standard["most_popular"][m] for m in METRICS}
            if not args.skip_cold:
                cold = run_config(name, args.set, seed, cold=True)
                row.update({f"cold_{m}": cold["cold"][m] for m in COLD_METRICS}, cold_users=cold["cold"]["users"],
                           cold_run_id=cold["run_id"], cold_best_epoch=cold["best_epoch"],
                           cold_minutes=cold["minutes"], minutes=row["minutes"] + cold["minutes"])
                popular.update({f"cold_{m}": cold["most_popular_cold"][m] for m in COLD_METRICS},
                               cold_users=cold["most_popular_cold"]["users"])
            if args.cold_only or args.skip_cold:
                row = with_other_protocol(results.get(name), row, args.set, ran_cold=args.cold_only)
            runs.append(row)
            print(f"\n{name} seed {seed}: {json.dumps(row)}", flush=True)
            # Most-popular does not depend on the seed: the same users and training events every time.
            results["most_popular"] = {**results.get("most_popular", {}), **popular, **stamp}
            record(results, name, runs, args.set, stamp)
            save_results(args.out, results)
        if args.distill:
            distill_seeds(name, seeds, runs, args, results, stamp)
    print("\n" + markdown_table(results))
    for line in verdict_lines(results["content_vs_id_only"]):
        print(line)
    print(f"\nWritten to {args.out}")
    return results


if __name__ == "__main__":
    main()

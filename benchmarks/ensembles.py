"""Do two trained models know different things? Test HR@10 and NDCG@10 of checkpoints alone and
of score-level ensembles of them.

    .venv/bin/python -m benchmarks.ensembles --run id_0=runs/<run>/checkpoint_<...> \\
        --run id_1=runs/<other run>/checkpoint_<...> --run content_0=runs/<third run>/checkpoint_<...> \\
        --ensemble id_0+id_1 --ensemble id_0+content_0 [--out benchmarks/results/ensembles.json]

Each checkpoint's best-validation weights encode the catalogue and rank the test users as
jobs.evaluate does; an ensemble ranks by the sum of its members' cosines (the product of their
softmaxes at one temperature; models.ranking.evaluate_ensemble). Two runs of one config gain from
their seeds alone; an ID model and a content model gain more than that only where the content
knows what the item IDs do not. The checkpoints must rank the same prepared data. Prints a
Markdown table (a row per model and per ensemble) and writes the figures with machine, date and
commit.
"""

import argparse
import os

import torch

from benchmarks.common import RESULTS_DIR, save_results, stamp
from interestformer.datasets.pipeline import item_batches
from interestformer.datasets.prepare import PreparedData
from interestformer.jobs.config import JobConfig
from interestformer.jobs.evaluate import device_batches, eval_datasets, popularity_counts
from interestformer.models.ranking import evaluate_ensemble, item_representations

METRICS = ("hr@10", "ndcg@10", "mrr")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ensembles", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=CHECKPOINT",
                        help="a checkpoint folder written by jobs.train, under a label of its own (repeatable)")
    parser.add_argument("--ensemble", action="append", default=[], metavar="LABEL+LABEL[+...]",
                        help="models that rank together, by their --run labels (repeatable)")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "ensembles.json"), help="results JSON")
    args = parser.parse_args(argv)
    pairs = [run.split("=", 1) for run in args.run]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        parser.error("--run takes LABEL=CHECKPOINT")
    args.runs = dict(pairs)
    if len(args.runs) != len(pairs):
        parser.error("--run labels must differ: each names one checkpoint")
    args.ensembles = [ensemble.split("+") for ensemble in args.ensemble]
    for members in args.ensembles:
        if len(members) < 2 or any(member not in args.runs for member in members):
            parser.error(f"--ensemble {'+'.join(members)}: needs two or more of the --run labels {sorted(args.runs)}")
    return args


def markdown_table(rankings: dict) -> str:
    lines = ["| ranking | " + " | ".join(f"test {m}" for m in METRICS) + " |", "|" + "---|" * (len(METRICS) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{figures[m]:.4f}" for m in METRICS) + " |" for name, figures in rankings.items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)

    from interestformer.jobs.cluster import start_ray
    from interestformer.jobs.distributed import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {label: load_model(checkpoint, device) for label, checkpoint in args.runs.items()}
    prepared_paths = {state["prepared_path"] for _, state in models.values()}
    if len(prepared_paths) > 1:
        raise SystemExit(f"The checkpoints rank different prepared data ({sorted(prepared_paths)}): an ensemble needs one")
    start_ray()
    prepared = PreparedData.load(prepared_paths.pop())
    cfg = JobConfig.from_dict(next(iter(models.values()))[1]["config"])
    tables = {}
    for label, (model, state) in models.items():  # each config's item rows carry the content its live encoders read
        text, image = JobConfig.from_dict(state["config"]).model.live_content()
        items = item_batches(prepared, cfg.eval.batch_size, text=text, image=image)
        tables[label] = item_representations(model, device_batches(items.iter_torch_batches(batch_size=1), device),
                                             prepared.num_items)
    _, users = eval_datasets(prepared, cfg, "test")
    user_batches = list(device_batches(users.iter_torch_batches(batch_size=1), device))  # read once, ranked by all
    popularity = popularity_counts(prepared, cfg, "test").to(device)

    rankings = {}
    for members in [[label] for label in args.runs] + args.ensembles:
        report = evaluate_ensemble([(models[label][0], tables[label]) for label in members], user_batches, cfg.eval.ks,
                                   cfg.eval.exclude_history, cfg.eval.item_chunk_size, popularity).report()
        rankings["+".join(members)] = {"users": report["users"], **{m: report[m] for m in METRICS}}
    save_results(args.out, {"checkpoints": args.runs, "rankings": rankings, **stamp()})
    print("\n" + markdown_table(rankings) + f"\n\nWritten to {args.out}")
    return rankings


if __name__ == "__main__":
    main()

"""Items that never trained, given their content neighbours' ID rows (model.cold_item_neighbours):
which k and temperature, chosen on validation.

    .venv/bin/python -m benchmarks.cold_neighbours --checkpoint runs/<run>/checkpoint_<...>

The checkpoint must come from a run with held-out items (data.cold_item_fraction > 0) and
model.cold_item_neighbours > 0 (configs/ml1m_id_text.yaml with --cold-only in benchmarks.ml1m
makes one). Nothing trains: the checkpoint's model ranks two splits with its untrained items' ID
rows left as training left them, zeroed, or filled from their k nearest trained items at each
temperature:
  simulated cold (validation): a seeded tenth of the trained items lose their trained rows, which
    are filled from the other trained items; the validation users whose target is one of them are
    ranked. Each seed (--seeds) draws another tenth; k and the temperature are chosen here, by the
    mean NDCG@10 over the seeds.
  cold (test): the run's held-out items, filled from every trained item; the test users whose
    target is one of them.
Writes benchmarks/results/cold_neighbours.json and prints a Markdown table.
"""

import argparse
import json

import torch
from safetensors.torch import load as load_tensors

from benchmarks.common import write_results
from interestformer.datasets.pipeline import unpack
from interestformer.datasets.prepare import PreparedData
from interestformer.datasets.storage import join, read_bytes
from interestformer.jobs.cluster import start_ray
from interestformer.jobs.config import JobConfig
from interestformer.jobs.distributed import WEIGHTS_FILE, load_model
from interestformer.jobs.evaluate import eval_datasets, popularity_counts
from interestformer.models.ranking import evaluate_model, item_representations

NEIGHBOURS = (1, 5, 10, 20)
TEMPERATURES = (0.02, 0.05, 0.1)
SIMULATED_FRACTION = 0.1


class Split:
    """One split's ranking: its user rows, read once, kept to those users whose target is in
    `targets` (None: all of them), against the catalogue's item rows (the same for every split)."""

    def __init__(self, item_rows: list[dict], prepared: PreparedData, cfg: JobConfig, split: str,
                 targets: torch.Tensor | None):
        _, users = eval_datasets(prepared, cfg, split)
        self.items = item_rows
        self.users = [kept for row in users.iter_torch_batches(batch_size=1)
                      if len((kept := only_targets(unpack(row), targets))["targets"])]
        self.popularity, self.cfg = popularity_counts(prepared, cfg, split), cfg

    def rank(self, model) -> dict:
        catalogue = item_representations(model, iter(self.items), model.spec.num_items)
        totals = evaluate_model(model, catalogue, iter(self.users), [10, 50], self.cfg.eval.exclude_history,
                                self.cfg.eval.item_chunk_size, self.popularity)
        return {k: v for k, v in totals.report().items() if k in ("hr@10", "ndcg@10", "hr@50", "users")}


def simulated_cold(trained: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded tenth of the trained items (bool by item index)."""
    candidates = torch.nonzero(trained).squeeze(1)
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    items = torch.zeros_like(trained)
    items[candidates[order[: int(len(candidates) * SIMULATED_FRACTION)]]] = True
    return items


def only_targets(batch: dict, targets: torch.Tensor | None) -> dict:
    """A packed evaluation batch cut to its users whose target is in `targets` (bool by item index)."""
    if targets is None:
        return batch
    keep = targets[batch["targets"]]
    users = len(keep)
    return {name: value[keep] if name != "unique_items" and value.shape[:1] == (users,) else value
            for name, value in batch.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cold_neighbours", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder of a run with held-out items and "
                                                            "model.cold_item_neighbours > 0")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, each a tenth of the trained items "
                                                          "simulated cold (default: 0,1,2)")
    args = parser.parse_args(argv)

    model, state = load_model(args.checkpoint)
    cfg = JobConfig.from_dict(state["config"])
    encoder = model.item_encoder
    if encoder.id_trained is None or not cfg.data.cold_item_fraction:
        parser.error(f"{args.checkpoint} is not from a run with data.cold_item_fraction > 0 and "
                     "model.cold_item_neighbours > 0")
    # load_model has filled the untrained rows; "as trained" needs them as training left them.
    trained_table = load_tensors(read_bytes(join(args.checkpoint, WEIGHTS_FILE)))[model.ID_TABLE].float()
    trained = encoder.id_trained.clone()
    simulated = [simulated_cold(trained, int(seed)) for seed in args.seeds.split(",")]

    start_ray()
    prepared = PreparedData.load(state["prepared_path"])
    item_rows = [unpack(row) for row in eval_datasets(prepared, cfg, "cold")[0].iter_torch_batches(batch_size=1)]
    splits = [("validation", Split(item_rows, prepared, cfg, "validation", items), trained & ~items)
              for items in simulated]
    splits.append(("cold", Split(item_rows, prepared, cfg, "cold", None), trained))
    variants = [("as trained", None, None), ("zero", 0, None)] + [
        (f"k {k}, temperature {t}", k, t) for k in NEIGHBOURS for t in TEMPERATURES]
    rows = []
    for name, k, temperature in variants:
        row = {"variant": name, "neighbours": k, "temperature": temperature, "validation_seeds": []}
        for split, ranking, donors in splits:
            table = encoder.id_embedding.weight.data
            table.copy_(trained_table)
            encoder.id_trained.copy_(donors)
            if k == 0:
                table[~donors] = 0.0
            elif k:
                encoder.neighbours, encoder.neighbour_temperature = k, temperature
                encoder.fill_untrained_ids()
            figures = ranking.rank(model)
            if split == "validation":
                row["validation_seeds"].append(figures)
            else:
                row[split] = figures
        row["validation"] = {m: sum(f[m] for f in row["validation_seeds"]) / len(simulated) for m in ("hr@10", "ndcg@10")}
        row["validation"]["users"] = sum(f["users"] for f in row["validation_seeds"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    chosen = max((r for r in rows if r["neighbours"]), key=lambda r: r["validation"]["ndcg@10"])
    figures = {"checkpoint": args.checkpoint, "simulated_cold_items": [int(items.sum()) for items in simulated],
               "chosen_on_validation": chosen["variant"], "variants": rows}
    path = write_results("cold_neighbours", figures)
    print("\n| ID rows of untrained items | simulated cold (validation, mean of seeds) ndcg@10 | hr@10 | cold (test) ndcg@10 | hr@10 "
          "| hr@50 |\n|---|---|---|---|---|---|")
    for r in rows:
        v, c = r["validation"], r["cold"]
        mark = " (chosen)" if r is chosen else ""
        print(f"| {r['variant']}{mark} | {v['ndcg@10']:.4f} | {v['hr@10']:.4f} | {c['ndcg@10']:.4f} | {c['hr@10']:.4f} "
              f"| {c['hr@50']:.4f} |")
    print(f"\nUsers: {rows[0]['validation']['users']} (validation), {rows[0]['cold']['users']} (cold). Written to {path}")
    return figures


if __name__ == "__main__":
    main()

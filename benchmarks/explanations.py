"""Do explanations discriminate? How often each method names the newest event, and whether the reason
it names is like the recommended movie.

    .venv/bin/python -m benchmarks.explanations --checkpoint runs/<run>/checkpoint_<...> [--users 600]

For a sample of the checkpoint's users (their whole history; the model reads the last
data.max_seq_len events), the top-K items outside the history and, for each, its top reason by
two methods of models/explain.py:
- raw drop: how much the item's score drops when the reason leaves the history (no reference);
- specific drop (what the MLflow model and jobs.recommend return): how much more it drops than
  the mean score of the user's top REFERENCE_ITEMS items.

Per method: the share of recommendations whose top reason is the user's newest event, the mean
number of distinct top reasons among a user's K items, and the share of top reasons that share a
label with the recommended item, beside the same share for the newest event and for a history
item drawn at random. The labels are MovieLens' genres (read from the items' description,
"Genres: A, B") or, on the demo, each item's planted topic, which is what drew the user's events. Prints a table; writes benchmarks/results/explanations.json (--out).
"""

import argparse
import os
import re
import tempfile

import pyarrow.parquet as pq
import torch

from interestformer.datasets.prepare import PreparedData, input_paths
from interestformer.datasets.storage import join, read_json
from interestformer.jobs.cluster import start_ray
from interestformer.jobs.config import JobConfig
from interestformer.jobs.distributed import STATE_FILE
from interestformer.jobs.serving import Recommender, export
from interestformer.models.explain import REFERENCE_ITEMS, history_contributions, top_contributors
from interestformer.models.ranking import chunked_top_k

from benchmarks.common import RESULTS_DIR, save_results, stamp

GENRES = re.compile(r"Genres: ([^.]*)")


def item_labels(items_path: str, index: dict[str, int]) -> dict[int, set[str]]:
    """Item index -> its known labels: the demo's planted `topic` (each item's dominant one), or
    MovieLens' genres from the description column ("Genres: A, B"); none when the table has neither."""
    dataset = pq.ParquetDataset(items_path)
    if "topic" in dataset.schema.names:
        table = dataset.read(columns=["item_id", "topic"]).to_pydict()
        return {index[i]: {str(t)} for i, t in zip(table["item_id"], table["topic"]) if i in index}
    if "description" not in dataset.schema.names:
        return {}
    table = dataset.read(columns=["item_id", "description"]).to_pydict()
    genres = {}
    for item_id, description in zip(table["item_id"], table["description"]):
        found = GENRES.search(description or "")
        if found and item_id in index:
            genres[index[item_id]] = {g.strip() for g in found.group(1).split(",")}
    return genres


def sample_histories(prepared: PreparedData, users: int, window: int, seed: int) -> torch.Tensor:
    """(users, window) left-padded item indices: the last `window` events of `users` users drawn at
    random (at least 2 distinct items each, so there is a choice of reason)."""
    items = pq.read_table(prepared.sequences_path, columns=["items"]).column("items").to_pylist()
    items = [row for row in items if len(set(row)) >= 2]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:users]
    history = torch.zeros(len(order), window, dtype=torch.long)
    for row, user in enumerate(order.tolist()):
        last = torch.tensor(items[user][-window:])
        history[row, window - len(last):] = last
    return history


def shares(history: torch.Tensor, recommended: torch.Tensor, reasons: torch.Tensor,
           labels: dict[int, set[str]]) -> dict[str, float]:
    """Figures of one method: recommended (B, K) item indices and their top reasons (B, K)."""
    newest = history[:, -1:].expand_as(reasons)
    distinct = torch.tensor([len(set(row)) for row in reasons.tolist()], dtype=torch.float)
    figures = {"top_reason_is_newest": (reasons == newest).float().mean().item(),
               "distinct_top_reasons_per_user": distinct.mean().item()}
    if labels:
        def share_label(a: torch.Tensor) -> float:
            pairs = [(i, j) for i, j in zip(recommended.flatten().tolist(), a.flatten().tolist())
                     if i in labels and j in labels]
            return sum(bool(labels[i] & labels[j]) for i, j in pairs) / max(len(pairs), 1)
        figures["top_reason_shares_a_label"] = share_label(reasons)
    return figures


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.explanations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder written by jobs.train")
    parser.add_argument("--users", type=int, default=600, help="users sampled (default 600)")
    parser.add_argument("--k", type=int, default=10, help="recommended items per user (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="which users are drawn (default 0)")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "explanations.json"), help="results JSON")
    args = parser.parse_args(argv)

    start_ray()
    with tempfile.TemporaryDirectory() as folder:  # a folder that holds no checkpoint fails here, naming it
        recommender = Recommender(export(args.checkpoint, folder))
    state = read_json(join(args.checkpoint, STATE_FILE))
    prepared = PreparedData.load(state["prepared_path"])
    model, representations = recommender.model, recommender.representations
    history = sample_histories(prepared, args.users, model.spec.max_seq_len, args.seed)
    types = (history > 0).long()  # MovieLens has one event type
    labels = item_labels(input_paths(JobConfig.from_dict(state["config"]).data)[1], recommender.item_index)

    with torch.no_grad():
        users = model.encode_users(representations[history], history, types)[:, -1]
    _, top = chunked_top_k(lambda a, b: users @ recommender.vectors[a:b].T, len(recommender.vectors),
                           max(args.k, REFERENCE_ITEMS), history, recommender.item_chunk_size)
    recommended = top[:, :args.k]
    figures = {"checkpoint": args.checkpoint, "users": len(history), "k": args.k,
               "reference_items": REFERENCE_ITEMS, "methods": {}}
    for method, reference in (("raw drop", torch.zeros_like(top)), ("specific drop", top)):
        contributions = history_contributions(model, representations, history, types, recommended, reference)
        reasons = top_contributors(history, contributions, 1)[0][..., 0]  # (B, K)
        figures["methods"][method] = shares(history, recommended, reasons, labels)
    if labels:
        lengths = (history > 0).sum(1, keepdim=True)  # a random real position of each window
        draws = torch.rand(recommended.shape, generator=torch.Generator().manual_seed(1))
        random_item = history.gather(1, history.shape[1] - 1 - (draws * lengths).long())
        figures["newest_event_shares_a_label"] = shares(history, recommended, history[:, -1:].expand_as(recommended),
                                                        labels)["top_reason_shares_a_label"]
        figures["random_history_item_shares_a_label"] = shares(history, recommended, random_item,
                                                               labels)["top_reason_shares_a_label"]
    print(markdown_table(figures))
    save_results(args.out, {**figures, **stamp()})
    print(f"wrote {args.out}")
    return figures


def markdown_table(figures: dict) -> str:
    keys = list(next(iter(figures["methods"].values())))
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method, values in figures["methods"].items():
        lines.append(f"| {method} | " + " | ".join(f"{values[key]:.3f}" for key in keys) + " |")
    for key in ("newest_event_shares_a_label", "random_history_item_shares_a_label"):
        if key in figures:
            lines.append(f"\n{key}: {figures[key]:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    from interestformer.jobs.cli import run

    run(main)

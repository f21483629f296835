"""Full-ranking evaluation: every catalogue item is a candidate for every user.

The metrics follow the published MovieLens tables (SASRec, HSTU): one held-out target per user,
HR@K (target in the top K), NDCG@K (1 / log2(rank + 2) when in the top K), MRR (1 / (rank + 1)).
Ties count against the target: an item scoring exactly as high as the target ranks ahead of it,
so a constant scorer cannot look good.

Functions return sums over users, so workers can add their sums and divide once.
"""

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from interestformer.models.interest_former import InterestFormer


def metric_sums(ranks: torch.Tensor, ks: Iterable[int]) -> dict[str, float]:
    """Sums over users of hr@K, ndcg@K and mrr for 0-based ranks (B,)."""
    ranks = ranks.double()
    sums = {"mrr": (1.0 / (ranks + 1)).sum().item()}
    for k in ks:
        hit = ranks < k
        sums[f"hr@{k}"] = hit.sum().item()
        sums[f"ndcg@{k}"] = (hit / torch.log2(ranks + 2)).sum().item()
    return sums


def mean_metrics(sums: dict[str, float], num_users: float) -> dict[str, float]:
    return {name: value / max(num_users, 1) for name, value in sums.items()}


def add_sums(total: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    return {name: total.get(name, 0.0) + value for name, value in sums.items()}


@torch.no_grad()
def item_representations(model: InterestFormer, item_batches: Iterable[dict], num_items: int) -> torch.Tensor:
    """Encodes the whole catalogue, a batch at a time -> (num_items + 1, d) item representations,
    what the user Transformer reads (InterestFormer.encode_users); row 0 (padding) is 0."""
    table = None
    for batch in item_batches:
        representations = model.encode_items(batch["unique_items"], batch)  # (U, d)
        if table is None:
            table = torch.zeros(num_items + 1, representations.shape[1], device=representations.device)
        table[batch["unique_items"]] = representations.float()
    return table


def item_vectors(model: InterestFormer, item_batches: Iterable[dict], num_items: int) -> torch.Tensor:
    """The whole catalogue's L2-normalised item representations (num_items + 1, d), what users
    are scored against; row 0 (padding) is 0."""
    return F.normalize(item_representations(model, item_batches, num_items), dim=-1)


@torch.no_grad()
def chunked_target_ranks(
    score_columns: Callable[[int, int], torch.Tensor],
    num_columns: int,
    targets: torch.Tensor,
    history: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """0-based ranks (B,) of each row's target among item columns 1..N, from a score matrix made
    `chunk_size` columns at a time (score_columns(start, stop) -> (B, stop - start)), so memory
    stays bounded however large the catalogue. Column 0 (padding) never counts; with history
    (B, T), items in it do not count either, except the target. Ties count against the target.

    The targets' scores are read out of the same chunk products that are then compared with
    them (one product is computed identically twice), so any chunk size gives the ranks of
    ranking each whole row at once."""
    chunks = [(start, min(start + chunk_size, num_columns)) for start in range(0, num_columns, chunk_size)]
    cached = {}
    if len(chunks) == 1:  # the common case: one product serves both passes
        cached[chunks[0]] = score_columns(*chunks[0]).float()
    target_scores = torch.empty(len(targets), device=targets.device)
    for start, stop in chunks:
        inside = (targets >= start) & (targets < stop)
        if inside.any():
            scores = cached.get((start, stop))
            scores = score_columns(start, stop).float() if scores is None else scores
            target_scores[inside] = scores[inside, targets[inside] - start]
    at_least_as_good = torch.zeros(len(targets), dtype=torch.long, device=targets.device)
    for start, stop in chunks:
        scores = cached.get((start, stop))
        scores = (score_columns(start, stop).float() if scores is None else scores).clone()
        if start == 0:
            scores[:, 0] = float("-inf")
        if history is not None:
            local = history - start
            in_chunk = (local >= 0) & (local < stop - start)
            seen = torch.zeros_like(scores, dtype=torch.bool)
            rows, positions = in_chunk.nonzero(as_tuple=True)
            seen[rows, local[rows, positions]] = True
            target_here = (targets >= start) & (targets < stop)
            seen[target_here, targets[target_here] - start] = False
            scores = scores.masked_fill(seen, float("-inf"))
        at_least_as_good += (scores >= target_scores[:, None]).sum(1)
    return at_least_as_good - 1  # the target itself


@torch.no_grad()
def rank_users(
    scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None, ks: Iterable[int]
) -> dict[str, float]:
    """Metric sums of whole score rows (B, N+1) for item indices 0..N; column 0 is padding and
    never ranked. When history (B, T) is given, items in it are removed from the candidates
    (except the target)."""
    ranks = chunked_target_ranks(lambda a, b: scores[:, a:b], scores.shape[1], targets, history, scores.shape[1])
    return metric_sums(ranks, ks)


@torch.no_grad()
def evaluate_model(
    model: InterestFormer,
    items: torch.Tensor,
    eval_batches: Iterable[dict],
    ks: Iterable[int],
    exclude_history: bool,
    chunk_size: int = 65536,
) -> tuple[dict[str, float], int]:
    """Metric sums and the user count of `model` over eval batches, with item vectors `items`
    (N+1, d), scored `chunk_size` items at a time."""
    totals, users = {}, 0
    for batch in eval_batches:
        user = model.user_vectors(batch).float()  # (B, d)
        # Cosine scores; the temperature does not change the order.
        ranks = chunked_target_ranks(lambda a, b: user @ items[a:b].T, len(items), batch["targets"],
                                     batch["history"] if exclude_history else None, chunk_size)
        totals = add_sums(totals, metric_sums(ranks, ks))
        users += len(user)
    return totals, users


@torch.no_grad()
def evaluate_popularity(
    popularity: torch.Tensor, eval_batches: Iterable[dict], ks: Iterable[int], exclude_history: bool
) -> tuple[dict[str, float], int]:
    """The most-popular baseline: every user gets the same scores, item counts (N+1,)."""
    totals, users = {}, 0
    for batch in eval_batches:
        targets = batch["targets"]
        scores = popularity.float().expand(len(targets), -1)
        history = batch["history"] if exclude_history else None
        totals = add_sums(totals, rank_users(scores, targets, history, ks))
        users += len(targets)
    return totals, users

"""Full-ranking evaluation: every catalogue item is a candidate for every user.

The metrics follow the published MovieLens tables (SASRec, HSTU): one held-out target per user,
HR@K (target in the top K), NDCG@K (1 / log2(rank + 2) when in the top K), MRR (1 / (rank + 1)).
Ties count against the target: an item scoring exactly as high as the target ranks ahead of it,
so a constant scorer cannot look good.

Functions return sums over users, so workers can add their sums and divide once.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from interestformer.models.interest_former import InterestFormer


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (B, N) over all candidates, targets (B,) indices into N -> (B,) 0-based ranks."""
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    return (scores >= target_scores).sum(1) - 1  # every item at least as good, minus the target


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
def item_vectors(model: InterestFormer, item_batches: Iterable[dict], num_items: int) -> torch.Tensor:
    """Encodes the whole catalogue, a batch at a time -> (num_items + 1, d) L2-normalised; row 0
    (padding) is 0."""
    table = None
    for batch in item_batches:
        vectors = F.normalize(model.encode_items(batch["unique_items"], batch), dim=-1)  # (U, d)
        if table is None:
            table = torch.zeros(num_items + 1, vectors.shape[1], device=vectors.device)
        table[batch["unique_items"]] = vectors.float()
    return table


@torch.no_grad()
def rank_users(
    scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None, ks: Iterable[int]
) -> dict[str, float]:
    """scores (B, N+1) for item indices 0..N; column 0 is padding and never ranked. When history
    (B, T) is given, items in it are removed from the candidates (except the target)."""
    scores = scores.float().clone()
    scores[:, 0] = float("-inf")
    if history is not None:
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, history, True)
        seen.scatter_(1, targets[:, None], False)
        scores = scores.masked_fill(seen, float("-inf"))
    return metric_sums(target_ranks(scores, targets), ks)


@torch.no_grad()
def evaluate_model(
    model: InterestFormer,
    items: torch.Tensor,
    eval_batches: Iterable[dict],
    ks: Iterable[int],
    exclude_history: bool,
) -> tuple[dict[str, float], int]:
    """Metric sums and the user count of `model` over eval batches, with item vectors `items`."""
    totals, users = {}, 0
    for batch in eval_batches:
        user = model.user_vectors(batch).float()  # (B, d)
        scores = user @ items.T  # (B, N+1); cosine, the temperature does not change the order
        history = batch["history"] if exclude_history else None
        totals = add_sums(totals, rank_users(scores, batch["targets"], history, ks))
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

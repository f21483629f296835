"""Why an item was recommended: each history item's share in its score (gradient x input).

A user's score for item i is the cosine s_i = <u, v_i> of the user's interest u (the user
Transformer's output after the last event, L2-normalised) and the item's normalised
representation v_i. The contribution of history position j is <ds_i/dh_j, h_j>, where h_j is the
item representation the Transformer reads there (its row of the catalogue representation table,
InterestFormer.encode_users). Positions holding the same item add up to that item's contribution.

Caveats. Gradient x input is a first-order (linear) attribution: it is faithful where the score
is close to linear in the history's representations, and only indicative through attention
softmaxes and layer norms. Contributions do not add up to the score: the rest falls to positions,
event types, biases and what the linearisation misses. The recommended item's own vector is held
fixed: an item that appears in the history is credited only for what it does to the user's
interest. The model must be in eval mode (dropout off), or the attribution is of a random network.

Shapes: B users, T history positions, K recommended items per user, d the representation width.
"""

import torch
import torch.nn.functional as F

from interestformer.models.interest_former import InterestFormer


def history_contributions(
    model: InterestFormer,
    representations: torch.Tensor,
    history: torch.Tensor,
    event_types: torch.Tensor,
    items: torch.Tensor,
) -> torch.Tensor:
    """Gradient x input contribution (B, K, T) of each history position to the cosine score of
    each of the users' items (B, K) (item indices), for left-padded histories (B, T) of item
    indices with their event-type indices, read from the representation table (N + 1, d).
    Padding positions contribute 0.

    Users are independent, so one backward pass of scores[:, k].sum() gives every user's
    gradients for their k-th item: K backward passes per batch."""
    with torch.enable_grad():
        history_vectors = representations[history].detach().requires_grad_(True)  # (B, T, d)
        users = model.encode_users(history_vectors, history, event_types)[:, -1]  # (B, d), normalised
        scores = (users[:, None, :] * F.normalize(representations[items], dim=-1)).sum(-1)  # (B, K)
        contributions = []
        for k in range(items.shape[1]):
            [gradient] = torch.autograd.grad(scores[:, k].sum(), history_vectors,
                                             retain_graph=k < items.shape[1] - 1)
            contributions.append((gradient * history_vectors).sum(-1))  # (B, T)
    return (torch.stack(contributions, dim=1) * (history > 0)[:, None, :]).detach()  # (B, K, T)


def top_contributors(history: torch.Tensor, contributions: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each recommended item's n history items that raised its score most: (item indices
    (B, K, n'), weights (B, K, n')), n' = min(n, T), largest weight first, from history (B, T)
    and history_contributions (B, K, T).

    An item's contribution is the sum over the positions it holds; its weight is that
    contribution's share of the total absolute contribution of the whole history to the
    recommended item's score (so weights lie in [-1, 1] and their absolute values over all
    history items add up to 1). Slots beyond a history's distinct items hold index 0 (padding)
    with weight 0; an item that lowered the score (negative weight) is listed only when fewer
    items raised it."""
    same = history[:, :, None] == history[:, None, :]  # (B, T, T): positions holding the same item
    summed = contributions @ same.to(contributions.dtype)  # (B, K, T): each position's item total
    # One position stands for each distinct item: its first (same.tril(-1): an earlier twin).
    stands = (history > 0) & ~(same & torch.ones_like(same).tril(-1)).any(-1)  # (B, T)
    total = (summed.abs() * stands[:, None, :]).sum(-1, keepdim=True).clamp(min=1e-12)  # (B, K, 1)
    ranked = summed.masked_fill(~stands[:, None, :], float("-inf"))
    top = ranked.topk(min(n, history.shape[1]), dim=-1)  # (B, K, n)
    real = top.values > float("-inf")
    items = history[:, None, :].expand_as(summed).gather(-1, top.indices) * real
    weights = torch.where(real, top.values / total, torch.zeros_like(top.values))
    return items, weights

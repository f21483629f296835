"""Why an item was recommended: which history items its score depends on, by leaving each out.

A user's score for item i is the cosine s_i = <u, v_i> of the user's interest u (the user model's
output after the newest event, InterestFormer.encode_users) and the item's normalised
representation v_i. Leaving a history item j out (every occurrence of j is removed, the later
events move up as if j had never happened, and the user model reads the history again) drops
s_i by some amount. The contribution of j to i is how much more s_i drops than the scores of the
user's top items do on average (the `reference` items, a few dozen): the part of the drop that
is specific to i.

Why the specific part: removing the newest event moves the whole interest, and the scores of all
of the user's top items fall together. The raw drop then names the newest event first for nearly
every recommendation, which explains nothing about why this item rather than the others. What
item i loses beyond the user's other top items is what sets it apart: a history item similar to
i, or the one that caused it.

Why leave-one-out rather than attention weights or gradients: the answer is the one a product
owner asks for ("would it still have been recommended without this?"), it is exact for the
model as it is (no linearisation; attention weights say where a layer looked, not what the
score depends on), and it treats every position alike. Gradient x input was tried first: layer
norms and the final L2 normalisation make the score nearly invariant to the scale of the newest
event's state, so it credits the newest item with almost nothing, however decisive.

Cost: one more pass of the user model per distinct history item (a history of T distinct items:
T passes, batched `variants_at_once` at a time), and none per recommended or reference item:
every item's drop comes from the same passes. Contributions do not add up to the score: items
interact (removing two similar items can cost more than the sum of removing each).

Shapes: B users, T history positions, K recommended items per user, M reference items per user,
d the representation width.
"""

import torch
import torch.nn.functional as F

from interestformer.models.interest_former import InterestFormer


def first_occurrences(history: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions of left-padded histories (B, T) that hold an item's first
    occurrence; one stands for each distinct item."""
    same = history[:, :, None] == history[:, None, :]  # (B, T, T): positions holding the same item
    earlier_twin = (same & torch.ones_like(same).tril(-1)).any(-1)
    return (history > 0) & ~earlier_twin


REFERENCE_ITEMS = 50
"""How many of the user's top items the specific drop is measured against."""


@torch.no_grad()
def history_contributions(
    model: InterestFormer,
    representations: torch.Tensor,
    history: torch.Tensor,
    event_types: torch.Tensor,
    items: torch.Tensor,
    reference: torch.Tensor,
    variants_at_once: int = 1024,
) -> torch.Tensor:
    """Leave-one-out contributions (B, K, T): at the first position of each distinct item of the
    left-padded histories (B, T) (item indices, read from the representation table (N + 1, d),
    with their event-type indices), how much more each user's cosine score of their items (B, K)
    drops when that item leaves the history than the mean score of their reference items (B, M)
    does (the user's top items; their padding index 0 does not count); 0 at every other position.
    Without a history's only item there is no user to score: its drop is the whole score."""
    B, T = history.shape
    K = items.shape[1]
    targets = F.normalize(representations[torch.cat([items, reference], dim=1)], dim=-1)  # (B, K + M, d)
    weights = (reference > 0).float()
    weights = weights / weights.sum(1, keepdim=True).clamp(min=1)  # (B, M): the reference mean

    def scores(rows: torch.Tensor, histories: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        users = model.encode_users(representations[histories], histories, types)[:, -1]  # (V, d)
        return (users[:, None, :] * targets[rows]).sum(-1)  # (V, K)

    full = scores(torch.arange(B), history, event_types)  # (B, K + M)
    contributions = torch.zeros(B, K, T, dtype=full.dtype, device=full.device)
    rows, positions = first_occurrences(history).nonzero(as_tuple=True)  # a variant per distinct item
    for start in range(0, len(rows), variants_at_once):
        row, position = rows[start:start + variants_at_once], positions[start:start + variants_at_once]
        h, t = history[row], event_types[row]
        kept = (h > 0) & (h != h.gather(1, position[:, None]))  # (V, T)
        # Left-pad again: a stable sort puts the removed and padding slots first, the rest in order.
        order = kept.int().sort(dim=1, stable=True).indices
        kept = kept.gather(1, order)
        without = scores(row, h.gather(1, order) * kept, t.gather(1, order) * kept)
        left = kept.any(dim=1, keepdim=True)
        drops = full[row] - torch.where(left, without, torch.zeros_like(without))  # (V, K + M)
        common = (drops[:, K:] * weights[row]).sum(1, keepdim=True)  # (V, 1)
        contributions[row, :, position] = drops[:, :K] - common
    return contributions


def top_contributors(history: torch.Tensor, contributions: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each recommended item's n history items whose removal lowers its score most: (item
    indices (B, K, n'), score drops (B, K, n')), n' = min(n, T), largest drop first, from history
    (B, T) and history_contributions (B, K, T). Slots beyond a history's distinct items hold index
    0 (padding) with drop 0; an item whose removal raises the score (negative drop) is listed
    only when fewer items lower it."""
    stands = first_occurrences(history)
    ranked = contributions.masked_fill(~stands[:, None, :], float("-inf"))
    top = ranked.topk(min(n, history.shape[1]), dim=-1)  # (B, K, n)
    real = top.values > float("-inf")
    items = history[:, None, :].expand_as(contributions).gather(-1, top.indices) * real
    drops = torch.where(real, top.values, torch.zeros_like(top.values))
    return items, drops

"""Full-ranking metrics against a brute-force reference and hand-computed values."""

import math

import torch

from interestformer.models.ranking import metric_sums, rank_users, target_ranks


def brute_force(scores: torch.Tensor, targets: torch.Tensor, ks) -> dict[str, float]:
    """Per user: sort every candidate; the target's rank counts every other item scoring at least
    as high (ties against the target); then average HR, NDCG, MRR."""
    out = {"mrr": 0.0, **{f"hr@{k}": 0.0 for k in ks}, **{f"ndcg@{k}": 0.0 for k in ks}}
    for row, target in zip(scores.tolist(), targets.tolist()):
        rank = sum(1 for j, s in enumerate(row) if j != target and s >= row[target])
        out["mrr"] += 1 / (rank + 1)
        for k in ks:
            if rank < k:
                out[f"hr@{k}"] += 1
                out[f"ndcg@{k}"] += 1 / math.log2(rank + 2)
    return {name: value / len(targets) for name, value in out.items()}


def test_metrics_match_brute_force_on_random_scores():
    gen = torch.Generator().manual_seed(0)
    ks = (1, 5, 10, 50)
    for trial in range(5):
        scores = torch.randn(64, 300, generator=gen)
        if trial % 2:  # coarse scores give many ties
            scores = scores.round()
        targets = torch.randint(0, 300, (64,), generator=gen)
        ours = {k: v / 64 for k, v in metric_sums(target_ranks(scores, targets), ks).items()}
        reference = brute_force(scores, targets, ks)
        assert ours.keys() == reference.keys()
        for name in ours:
            assert math.isclose(ours[name], reference[name], abs_tol=1e-9), name


def test_hand_computed_example():
    # Items 0..4, column 0 is padding. User A's target (item 2) is ranked 2nd; user B's (item 4) 4th.
    scores = torch.tensor([[9.0, 0.5, 0.8, 0.9, 0.1], [9.0, 0.4, 0.3, 0.2, 0.1]])
    sums = rank_users(scores, torch.tensor([2, 4]), history=None, ks=(1, 3))
    assert sums["hr@1"] == 0
    assert sums["hr@3"] == 1  # only A
    assert math.isclose(sums["ndcg@3"], 1 / math.log2(3))
    assert math.isclose(sums["mrr"], 1 / 2 + 1 / 4)


def test_history_exclusion_removes_seen_items_but_never_the_target():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7]])
    targets = torch.tensor([3])
    assert rank_users(scores, targets, None, ks=(1,))["hr@1"] == 0
    history = torch.tensor([[0, 1, 2, 3]])  # the target also occurs in the history
    assert rank_users(scores, targets, history, ks=(1,))["hr@1"] == 1


def test_padding_column_is_never_a_candidate():
    scores = torch.tensor([[100.0, 0.2, 0.1]])
    assert rank_users(scores, torch.tensor([1]), None, ks=(1,))["hr@1"] == 1

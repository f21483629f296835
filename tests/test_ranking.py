"""Full-ranking metrics against a brute-force reference and hand-computed values; metrics at every
K from the rank histogram, and per-segment metrics, against the same metric functions."""

import itertools
import math

import torch

import pytest

from interestformer.models.ranking import (
    RankTotals, chunked_target_ranks, chunked_top_k, evaluate_popularity, histogram_metrics, metric_sums,
    rank_histogram, row_ranks, seen_in_chunk,
)


def rank_users(scores, targets, history, ks):
    return metric_sums(row_ranks(scores, targets, history), ks)


def brute_force(scores: torch.Tensor, targets: torch.Tensor, ks) -> dict[str, float]:
    """Per user: the target's rank counts every other item (column 0 is padding) scoring at
    least as high (ties against the target); then average HR, NDCG, MRR."""
    out = {"mrr": 0.0, **{f"hr@{k}": 0.0 for k in ks}, **{f"ndcg@{k}": 0.0 for k in ks}}
    for row, target in zip(scores.tolist(), targets.tolist()):
        rank = sum(1 for j, s in enumerate(row) if j not in (0, target) and s >= row[target])
        out["mrr"] += 1 / (rank + 1)
        for k in ks:
            if rank < k:
                out[f"hr@{k}"] += 1
                out[f"ndcg@{k}"] += 1 / math.log2(rank + 2)
    return {name: value / len(targets) for name, value in out.items()}


@pytest.mark.parametrize("chunk", [1, 7, 64, 300])
def test_metrics_match_brute_force_on_random_scores_whatever_the_chunk_size(chunk):
    gen = torch.Generator().manual_seed(0)
    ks = (1, 5, 10, 50)
    for trial in range(5):
        scores = torch.randn(64, 300, generator=gen)
        if trial % 2:  # coarse scores give many ties
            scores = scores.round()
        targets = torch.randint(1, 300, (64,), generator=gen)
        ranks = chunked_target_ranks(lambda a, b: scores[:, a:b], 300, targets, None, chunk)
        ours = {k: v / 64 for k, v in metric_sums(ranks, ks).items()}
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


def test_chunked_ranking_with_history_equals_whole_rows():
    gen = torch.Generator().manual_seed(1)
    user, items = torch.randn(32, 8, generator=gen), torch.randn(501, 8, generator=gen)
    items[250:260] = items[250]  # identical items tie exactly
    targets = torch.randint(1, 501, (32,), generator=gen)
    history = torch.randint(0, 501, (32, 20), generator=gen)
    history[:, 0] = targets  # the target in the history never leaves the candidates
    whole = chunked_target_ranks(lambda a, b: user @ items[a:b].T, 501, targets, history, 501)
    for chunk in (1, 13, 250):
        assert torch.equal(chunked_target_ranks(lambda a, b: user @ items[a:b].T, 501, targets, history, chunk), whole)


def test_chunked_top_k_equals_a_stable_sort_of_whole_rows():
    # The tie rule: equal scores go to the lower item index, i.e. a stable descending sort.
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(16, 101, generator=gen)
    history = torch.randint(0, 101, (16, 30), generator=gen)
    history[0] = torch.arange(71, 101)  # row 0 keeps only 70 candidates: its last 10 of k = 80 are -inf
    for scores, excluded in itertools.product((scores, scores.round(decimals=1)), (None, history)):  # rounded: ties
        whole = scores[:, 1:] if excluded is None else scores[:, 1:].masked_fill(seen_in_chunk(excluded, 1, 101),
                                                                                 float("-inf"))
        reference = whole.sort(dim=1, descending=True, stable=True)
        for k in (1, 10, 80, 200):
            for chunk in (1, 7, 32, 100, 1000):
                top_scores, top_indices = chunked_top_k(lambda a, b: scores[:, a:b], 101, k, excluded, chunk)
                assert torch.equal(top_indices, reference.indices[:, :k] + 1), (k, chunk)
                assert torch.equal(top_scores, reference.values[:, :k]), (k, chunk)
    assert torch.isinf(top_scores[0, 70:]).all() and not torch.isinf(top_scores[0, :70]).any()


def test_metrics_at_every_k_from_the_rank_histogram_equal_the_metric_functions():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(500, 120, generator=gen).round(decimals=1)  # ties too
    ranks = row_ranks(scores, torch.randint(1, 120, (500,), generator=gen), None)
    max_k = 50
    histogram = rank_histogram(ranks, max_k)
    assert len(histogram) == max_k + 1 and sum(histogram) == 500
    assert histogram[-1] == int((ranks >= max_k).sum()) > 0  # the users beyond max_k are counted, not lost
    at_every_k = histogram_metrics(histogram)
    assert len(at_every_k["hr"]) == len(at_every_k["ndcg"]) == max_k
    for k in range(1, max_k + 1):
        sums = metric_sums(ranks, (k,))
        assert math.isclose(at_every_k["hr"][k - 1], sums[f"hr@{k}"] / 500, abs_tol=1e-12), k
        assert math.isclose(at_every_k["ndcg"][k - 1], sums[f"ndcg@{k}"] / 500, abs_tol=1e-12), k


def test_segment_metrics_match_hand_computed_values_and_add_up_over_batches():
    # 0-based ranks, events before the target, whether the target never occurred in training.
    ranks = torch.tensor([0, 3, 12, 1, 9, 250])
    history_length = torch.tensor([2, 5, 6, 20, 21, 300])
    target_cold = torch.tensor([False, True, False, False, True, False])
    whole = RankTotals((10, 200))
    whole.add(ranks, history_length, target_cold)
    halves = RankTotals((10, 200))
    for part in (slice(0, 3), slice(3, 6)):
        halves.add(ranks[part], history_length[part], target_cold[part])
    assert halves.report() == pytest.approx(whole.report())
    assert halves.histogram == whole.histogram

    segments = whole.segment_metrics()
    ndcg = lambda rank: 1 / math.log2(rank + 2)  # noqa: E731
    expected = {
        "history_1-3": (1, [0]),  # users, their ranks
        "history_4-20": (3, [3, 12, 1]),
        "history_21-50": (1, [9]),
        "history_over_200": (1, [250]),
        "target_cold": (2, [3, 9]),
        "target_warm": (4, [0, 12, 1, 250]),
    }
    assert {key.rsplit("/", 1)[0] for key in segments} == {f"segment/{name}" for name in expected}  # 0, 51-200: no one
    for name, (users, segment_ranks) in expected.items():
        assert segments[f"segment/{name}/users"] == users
        hits = [r for r in segment_ranks if r < 10]
        assert segments[f"segment/{name}/hr@10"] == pytest.approx(len(hits) / users)
        assert segments[f"segment/{name}/ndcg@10"] == pytest.approx(sum(map(ndcg, hits)) / users)
        assert segments[f"segment/{name}/mrr"] == pytest.approx(sum(1 / (r + 1) for r in segment_ranks) / users)
    assert whole.metrics()["users"] == 6 and whole.metrics()["hr@10"] == pytest.approx(4 / 6)


def test_users_are_segmented_by_how_often_their_target_occurred_before():
    ranks = torch.tensor([0, 3, 12, 1, 9, 250])
    history_length = torch.tensor([2, 5, 6, 20, 21, 300])
    target_popularity = torch.tensor([0, 5, 9, 10, 999, 1000])
    totals = RankTotals((10,))
    totals.add(ranks, history_length, torch.zeros(6, dtype=torch.bool), target_popularity)
    segments = totals.segment_metrics()
    expected = {"0": [0], "1-9": [3, 12], "10-99": [1], "100-999": [9], "over_999": [250]}  # bucket: its ranks
    for bucket, bucket_ranks in expected.items():
        assert segments[f"segment/target_popularity_{bucket}/users"] == len(bucket_ranks)
        assert segments[f"segment/target_popularity_{bucket}/mrr"] == pytest.approx(
            sum(1 / (r + 1) for r in bucket_ranks) / len(bucket_ranks))
    assert segments["segment/target_popularity_1-9/hr@10"] == 0.5

    # The most-popular baseline is segmented by the same counts it ranks by: the head item first.
    popularity = torch.tensor([0, 1500, 40, 3])  # column 0 is padding
    batch = {"targets": torch.tensor([1, 2, 3]), "history": torch.zeros(3, 1, dtype=torch.long),
             "history_length": torch.tensor([1, 1, 1]), "target_cold": torch.zeros(3, dtype=torch.bool)}
    baseline = evaluate_popularity(popularity, [batch], [1], exclude_history=False).segment_metrics()
    assert baseline["segment/target_popularity_over_999/hr@10"] == 1.0
    assert baseline["segment/target_popularity_1-9/hr@10"] == 1.0 and baseline["segment/target_popularity_1-9/mrr"] == 1 / 3
    assert "segment/target_popularity_0/users" not in baseline


def test_totals_of_worker_shares_merge_to_the_totals_of_all_users_even_with_an_empty_share():
    ranks, lengths = torch.tensor([0, 3, 70, 250]), torch.tensor([2, 9, 30, 300])
    cold = torch.tensor([False, True, False, False])
    whole = RankTotals((10, 50))
    whole.add(ranks, lengths, cold)
    first, second, empty = RankTotals((10, 50)), RankTotals((10, 50)), RankTotals((10, 50))
    first.add(ranks[:1], lengths[:1], cold[:1])
    second.add(ranks[1:], lengths[1:], cold[1:])
    for parts in ([first, second], [empty, first, second], [second, empty, first]):
        merged = RankTotals.merge(parts)
        assert merged.metrics() == pytest.approx(whole.metrics())
        assert merged.report() == pytest.approx(whole.report())
        assert merged.histogram == whole.histogram

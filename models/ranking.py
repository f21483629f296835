"""Full-ranking evaluation: every catalogue item is a candidate for every user.

The metrics follow the published MovieLens tables (SASRec, HSTU): one held-out target per user,
HR@K (target in the top K), NDCG@K (1 / log2(rank + 2) when in the top K), MRR (1 / (rank + 1)).
Ties count against the target: an item scoring exactly as high as the target ranks ahead of it,
so a constant scorer cannot look good.

Functions return sums over users, so workers can add their sums and divide once. An evaluation
pass keeps them in a RankTotals: the metrics at eval.ks, a histogram of the target ranks (HR@K
and NDCG@K for every K up to the largest follow from it exactly), and sums per user segment.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from interestformer.models.interest_former import InterestFormer, trailing_real_columns


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
    """total + sums, key by key; a key missing on one side counts as 0 there."""
    out = dict(total)
    for name, value in sums.items():
        out[name] = out.get(name, 0.0) + value
    return out


def rank_histogram(ranks: torch.Tensor, max_k: int) -> list[int]:
    """Users per 0-based rank 0..max_k-1 of ranks (B,), then the users ranked max_k or beyond."""
    return torch.bincount(ranks.clamp(max=max_k), minlength=max_k + 1).tolist()


def histogram_metrics(histogram: list[int]) -> dict[str, list[float]]:
    """HR@K and NDCG@K for K = 1..max_k (list index K - 1) from a rank histogram (rank_histogram):
    HR@K is the share of users ranked in the top K, NDCG@K the sum of 1 / log2(rank + 2) over
    those users divided by all users, so each equals metric_sums at that K."""
    counts = torch.tensor(histogram, dtype=torch.float64)
    users, top = counts.sum().clamp(min=1), counts[:-1]
    gains = top / torch.log2(torch.arange(len(top), dtype=torch.float64) + 2)
    return {"hr": (top.cumsum(0) / users).tolist(), "ndcg": (gains.cumsum(0) / users).tolist()}


HISTORY_BUCKETS = ((0, 0), (1, 3), (4, 20), (21, 50), (51, 200), (201, None))
"""Segments of users by how many events before the target the model may read (batch key
history_length): from new users (0-3 events, data.new_user_fraction; 0 also when every earlier
item was held out, data.cold_item_fraction) to users whose history is longer than any window."""
SEGMENT_K = 10
"""Cut-off of the per-segment HR and NDCG."""


TARGET_POPULARITY_BUCKETS = ((0, 0), (1, 9), (10, 99), (100, 999), (1000, None))
"""Segments of users by how often their target item occurred before (the popularity counts of the
split's most-popular ranking): from items never seen, through the long tail, to the head. Where
content pays over IDs is expected at the low end, so these show it where the mean hides it."""


def user_segments(history_length: torch.Tensor, target_cold: torch.Tensor,
                  target_popularity: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Segment name -> which users (B,) bool belong to it: one history-length bucket per user
    (history_<low>-<high>, history_<n> for one length, history_over_<low - 1>), target_cold or
    target_warm (batch keys), and when the targets' popularity (B,) is given one bucket of it
    (target_popularity_<low>-<high>, named as the history buckets)."""
    segments = bucket_segments("history", history_length, HISTORY_BUCKETS)
    segments["target_cold"], segments["target_warm"] = target_cold, ~target_cold
    if target_popularity is not None:
        segments.update(bucket_segments("target_popularity", target_popularity, TARGET_POPULARITY_BUCKETS))
    return segments


def bucket_segments(name: str, values: torch.Tensor, buckets) -> dict[str, torch.Tensor]:
    """bucket_name -> which of values (B,) lie in that bucket of `buckets` ((low, high or None), ...)."""
    return {bucket_name(name, low, high): (values >= low) if high is None else (values >= low) & (values <= high)
            for low, high in buckets}


def bucket_name(name: str, low: int, high: int | None) -> str:
    """<name>_<low>-<high>; <name>_<n> for one value; <name>_over_<low - 1> without an upper bound."""
    return f"{name}_over_{low - 1}" if high is None else f"{name}_{low}" if low == high else f"{name}_{low}-{high}"


def segment_sums(ranks: torch.Tensor, segments: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per segment: '<segment>/users' (a count) and the sums of '<segment>/<metric>' at SEGMENT_K."""
    sums = {}
    for name, members in segments.items():
        sums[f"{name}/users"] = members.sum().item()
        sums.update({f"{name}/{metric}": value for metric, value in metric_sums(ranks[members], (SEGMENT_K,)).items()})
    return sums


@dataclass
class RankTotals:
    """Everything an evaluation pass reports, as sums over users of their targets' 0-based ranks;
    `add` a batch at a time, divide once at the end."""

    ks: tuple[int, ...]
    """Cut-offs of the metrics; the rank histogram reaches the largest."""
    users: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    """hr@K, ndcg@K for K in ks, and mrr (metric_sums)."""
    segment_sums: dict[str, float] = field(default_factory=dict)
    """Per user segment (user_segments): its users and metric sums (segment_sums)."""
    histogram: list[int] = field(default_factory=list)
    """Users per rank (rank_histogram at max(ks))."""

    def add(self, ranks: torch.Tensor, history_length: torch.Tensor, target_cold: torch.Tensor,
            target_popularity: torch.Tensor | None = None):
        self.users += len(ranks)
        self.sums = add_sums(self.sums, metric_sums(ranks, self.ks))
        segments = user_segments(history_length, target_cold, target_popularity)
        self.segment_sums = add_sums(self.segment_sums, segment_sums(ranks, segments))
        counts = rank_histogram(ranks, max(self.ks))
        self.histogram = [a + b for a, b in zip(self.histogram, counts)] if self.histogram else counts

    @staticmethod
    def merge(parts: list["RankTotals"]) -> "RankTotals":
        """The totals over every part's users (e.g. each worker's share of a split)."""
        total = RankTotals(parts[0].ks)
        for part in parts:
            total.users += part.users
            total.sums = add_sums(total.sums, part.sums)
            total.segment_sums = add_sums(total.segment_sums, part.segment_sums)
            if part.histogram:
                total.histogram = [a + b for a, b in zip(total.histogram, part.histogram)] if total.histogram \
                    else list(part.histogram)
        return total

    def metrics(self) -> dict[str, float]:
        """Means over users of the metrics at ks and mrr, and the user count ('users')."""
        return {**mean_metrics(self.sums, self.users), "users": self.users}

    def segment_metrics(self) -> dict[str, float]:
        """'segment/<segment>/<metric>': means over the segment's users, and its user count
        ('segment/<segment>/users'), for every segment that has users."""
        out = {}
        for key, value in self.segment_sums.items():
            segment, metric = key.rsplit("/", 1)
            users = self.segment_sums[f"{segment}/users"]
            if users:
                out[f"segment/{key}"] = int(value) if metric == "users" else value / users
        return out

    def report(self) -> dict[str, float]:
        """The metrics and the segment metrics: what a split's final evaluation logs."""
        return {**self.metrics(), **self.segment_metrics()}

    def metrics_at_every_k(self) -> dict[str, list[float]]:
        """HR@K and NDCG@K for K = 1..max(ks) (histogram_metrics)."""
        return histogram_metrics(self.histogram)


@torch.no_grad()
def item_representations(model: InterestFormer, item_batches: Iterable[dict], num_items: int) -> torch.Tensor:
    """Encodes the catalogue's items in `item_batches`, a batch at a time -> (num_items + 1, d)
    item representations, what the user Transformer reads (InterestFormer.encode_users); rows of
    items not in the batches (row 0, padding, among them) are 0, so the tables of disjoint shares
    of the catalogue add up to the whole catalogue's."""
    table = torch.zeros(num_items + 1, model.cfg.d_model, device=model.position.weight.device)
    for batch in item_batches:
        table[batch["unique_items"]] = model.encode_items(batch["unique_items"], batch).float()  # (U, d)
    return table


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
            seen = seen_in_chunk(history, start, stop)
            target_here = (targets >= start) & (targets < stop)
            seen[target_here, targets[target_here] - start] = False
            scores = scores.masked_fill(seen, float("-inf"))
        at_least_as_good += (scores >= target_scores[:, None]).sum(1)
    return at_least_as_good - 1  # the target itself


def seen_in_chunk(history: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(B, stop - start) bool: which of item columns start..stop-1 occur in each row of history (B, T)."""
    local = history - start
    in_chunk = (local >= 0) & (local < stop - start)
    seen = torch.zeros(len(history), stop - start, dtype=torch.bool, device=history.device)
    rows, positions = in_chunk.nonzero(as_tuple=True)
    seen[rows, local[rows, positions]] = True
    return seen


def best_columns(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Column indices (B, width), in increasing order, of each row's `width` highest scores
    (B, C); of columns tied at the cut, the lower indices."""
    top = scores.topk(width, dim=1)
    kth, local = top.values[:, -1:], top.indices  # (B, 1), (B, width)
    # topk may take any of the columns tied at a row's k-th score; where it left one of them out
    # (rare with float scores), keep those with the lowest indices.
    cut_ties = (scores == kth).sum(1) > (top.values == kth).sum(1)
    if cut_ties.any():
        rows, cut = scores[cut_ties], kth[cut_ties]
        above, tied = rows > cut, rows == cut
        keep = above | (tied & (tied.cumsum(1, dtype=torch.int32) <= width - above.sum(1, keepdim=True)))
        local[cut_ties] = keep.nonzero(as_tuple=True)[1].view(-1, width)  # exactly `width` per row
    return local.sort(dim=1).values


@torch.no_grad()
def chunked_top_k(
    score_columns: Callable[[int, int], torch.Tensor],
    num_columns: int,
    k: int,
    history: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best item columns among 1..num_columns-1 (column 0 is padding): (scores,
    indices), each (B, min(k, num_columns - 1)), best first. The score matrix is made
    `chunk_size` columns at a time (score_columns(start, stop) -> (B, stop - start)) and merged
    into a running top-k, so memory stays O(B * (k + chunk_size)) however large the catalogue.
    With history (B, T), items in it score -inf: a row with fewer than k other items ends in -inf.

    Ties go to the lower item index, so the result is one fixed order whatever the chunk size:
    the rows' columns 1.. sorted by score, descending, with a stable sort."""
    top_scores = top_indices = None
    for start in range(1, num_columns, chunk_size):
        stop = min(start + chunk_size, num_columns)
        scores = score_columns(start, stop).float()  # (B, C)
        if history is not None:
            scores = scores.masked_fill(seen_in_chunk(history, start, stop), float("-inf"))
        local = best_columns(scores, min(k, stop - start))
        chunk_scores, chunk_indices = scores.gather(1, local), local + start
        if top_scores is not None:  # the running top-k holds lower indices, in tie order already
            chunk_scores = torch.cat([top_scores, chunk_scores], dim=1)
            chunk_indices = torch.cat([top_indices, chunk_indices], dim=1)
        order = chunk_scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
        top_scores, top_indices = chunk_scores.gather(1, order), chunk_indices.gather(1, order)
    return top_scores, top_indices


@torch.no_grad()
def row_ranks(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
    """0-based target ranks (B,) in whole score rows (B, N+1) for item indices 0..N; column 0 is
    padding and never ranked. When history (B, T) is given, items in it are removed from the
    candidates (except the target)."""
    return chunked_target_ranks(lambda a, b: scores[:, a:b], scores.shape[1], targets, history, scores.shape[1])


@torch.no_grad()
def evaluate_model(
    model: InterestFormer,
    representations: torch.Tensor,
    eval_batches: Iterable[dict],
    ks: Iterable[int],
    exclude_history: bool,
    chunk_size: int = 65536,
    popularity: torch.Tensor | None = None,
) -> RankTotals:
    """The rank totals of `model` over eval batches, with the catalogue's item representations
    (N+1, d) from item_representations, scored `chunk_size` items at a time. Users read their
    histories' rows of the table, so each item is encoded once per evaluation, not once per
    batch it occurs in, and eval batches need no item content. Scores are cosines: dot products
    scaled by each item's inverse norm (one number an item, computed once) and the user's, so no
    second catalogue-sized table is made. A user without any history event is ranked by
    `popularity` (N+1,) item counts, as serving ranks one (the model has nothing to read); users
    are also segmented by their target's count in it (TARGET_POPULARITY_BUCKETS)."""
    return evaluate_ensemble([(model, representations)], eval_batches, ks, exclude_history, chunk_size, popularity)


@torch.no_grad()
def evaluate_ensemble(
    members: list[tuple[InterestFormer, torch.Tensor]],
    eval_batches: Iterable[dict],
    ks: Iterable[int],
    exclude_history: bool,
    chunk_size: int = 65536,
    popularity: torch.Tensor | None = None,
) -> RankTotals:
    """evaluate_model for models of one catalogue ranking together, each with its item
    representations: an item's score is the sum of its cosines under every model, i.e. the
    product of their softmaxes at one temperature."""
    inverse_norms = [1 / table.norm(dim=-1).clamp(min=1e-12) for _, table in members]  # as F.normalize; row 0 scores 0
    num_columns = len(members[0][1])
    totals = RankTotals(tuple(ks))
    for batch in eval_batches:
        keep = trailing_real_columns(batch["history"])  # all-padding columns change nothing
        history = batch["history"][:, keep]
        users = []
        for model, table in members:
            user = model.encode_users(table[history], history, batch["event_types"][:, keep])[:, -1]  # (B, d)
            users.append(user / user.norm(dim=-1, keepdim=True).clamp(min=1e-12))
        empty = ~(history > 0).any(dim=1, keepdim=True)  # (B, 1)

        def scores(a: int, b: int) -> torch.Tensor:
            cosines = sum((user @ table[a:b].T) * norms[a:b]
                          for user, (_, table), norms in zip(users, members, inverse_norms))
            return cosines if popularity is None else torch.where(empty, popularity[a:b].float(), cosines)

        ranks = chunked_target_ranks(scores, num_columns, batch["targets"], history if exclude_history else None,
                                     chunk_size)
        totals.add(ranks, batch["history_length"], batch["target_cold"],
                   None if popularity is None else popularity[batch["targets"]])
    return totals


@torch.no_grad()
def evaluate_popularity(
    popularity: torch.Tensor, eval_batches: Iterable[dict], ks: Iterable[int], exclude_history: bool
) -> RankTotals:
    """The most-popular baseline: every user gets the same scores, item counts (N+1,)."""
    totals = RankTotals(tuple(ks))
    for batch in eval_batches:
        targets = batch["targets"]
        scores = popularity.float().expand(len(targets), -1)
        ranks = row_ranks(scores, targets, batch["history"] if exclude_history else None)
        totals.add(ranks, batch["history_length"], batch["target_cold"], popularity[targets])
    return totals

"""Prepared data -> Ray Datasets that stream into Ray Train workers.

Training: one row per user (`training_windows`): the user's latest max_seq_len + 1 training
events as a left-padded history and its next items, cut by Ray Data tasks. Ray Train splits the
rows across the workers (equal shares: up to world_size - 1 users sit out each epoch, which
ones following the epoch's random block order, and the job counts them), and each worker
batches its share on the way in (`training_batches`): a batch's candidates are the unique items
it holds plus sampled negatives, and each unique item's text tokens and pixels travel once, so
the collate function (`TrainingBatches`) packs them on the worker's formatting threads, from the
catalogue's content held in memory (`ItemContent`).

Evaluation: each output row is one whole packed batch, packed by Ray Data tasks; the workers
split these rows exactly (no user dropped or counted twice) and sum their shares' rank totals.

Packed training batch (B users, T = max_seq_len, U unique items, L tokens, S pixels):
    history      (B, T) int64   item indices, left-padded with 0, oldest first
    event_types  (B, T) int64   event-type indices aligned with history
    targets      (B, T) int64   the next item after each history position, 0 where none
    unique_items (U,)   int64   sorted; includes 0 (padding), every history item and target,
                                and the uniformly sampled negatives
    text_tokens  (U, L) int64, text_mask (U, L) int64         when the model reads text
    pixels       (U, 3, S, S) uint8, has_image (U,) bool      when the model reads images
Packed evaluation batch: history and event_types as above, unique_items of the histories (no
negatives, no content: users read the encoded catalogue), targets (B,): the held-out item after
each history, and for reports by user segment (models/ranking.py):
    history_length (B,) int64   events before the target the model may read (held-out items
                                excluded), counted before the max_seq_len cut
    target_cold    (B,) bool    the target never occurs in training: held out, or no training event

Images are decoded and resized once, by prepare: the item table holds their pixels, so no epoch
decodes an image. Item content at scale: catalogue passes (evaluation's item vectors, the frozen
encoders' feature store, serving's export) stream the item table (`catalogue_rows`), reading
only the content columns asked for, so no process holds the catalogue's images. Training
batches look their items' content up by index (`ItemContent`), which reads only the live
encoders' columns. The remaining limit: with a live (top or full) image encoder, each training
worker holds the whole catalogue's pixels. At catalogue scale, freeze the image encoder and
train from the Parquet feature store (jobs/embed_items.py).

Splits by time, per user with n events (oldest first): test target = event n, validation target =
event n-1, training = events 1..n-2. Users with 2 events train on both; users with 1 event
cannot form a pair and are counted in the prepare report (users_too_short). With
data.train_since (incremental training on a new window), training targets are the events at or
after it; earlier events are only read as history, and users without such a target do not train.

Cold-start users (data.new_user_fraction > 0): a fixed set of users (by a hash of the user id)
never trains, and split `new_users` holds, for each of them with at least NEW_USER_EVENTS + 1
events, one row per history of their first 0..NEW_USER_EVENTS events, whose target is the next.

Cold-start items (data.cold_item_fraction > 0): a fixed, seeded set of items is held out of
training entirely. Their events are dropped from every training sequence and every history, they
are never sampled as negatives, and split `cold` holds the test users whose target is one of them
(the model must rank an item it has never seen).
"""

import copy
import hashlib
import zlib
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.expressions import col

from interestformer.datasets.prepare import PreparedData
from interestformer.datasets.storage import read_parquet, read_table

if TYPE_CHECKING:
    import torch

Split = Literal["train", "validation", "test", "cold", "new_users"]
COLD_ITEM_SEED = 20261124  # fixed, so every config of a benchmark holds out the same items
NEW_USER_EVENTS = 3  # new users are ranked after each of their first 0..3 events
BATCHES_PER_TASK = 8  # batches a packing task makes: few tasks, yet blocks small enough to stream


def cold_items(num_items: int, fraction: float) -> np.ndarray:
    """The sorted item indices (1..num_items) held out of training for cold-start evaluation."""
    count = round(fraction * num_items)
    return np.sort(np.random.default_rng(COLD_ITEM_SEED).choice(np.arange(1, num_items + 1), count, replace=False))


def is_cold_mask(num_items: int, fraction: float) -> np.ndarray:
    """(num_items + 1,) bool: True at the held-out items' indices."""
    mask = np.zeros(num_items + 1, dtype=bool)
    mask[cold_items(num_items, fraction)] = True
    return mask


def trained_items(prepared: PreparedData, cold_fraction: float) -> np.ndarray:
    """(N+1,) bool by item index: the items training reaches (at least one training event, not
    held out); padding is not one."""
    return (np.asarray(prepared.meta["popularity_train"]) > 0) & ~is_cold_mask(prepared.num_items, cold_fraction)


def is_new_user(user_id: str, fraction: float) -> bool:
    """Whether a user is held out of training as a new user: the first 8 bytes of the BLAKE2b
    digest of the user id, as a fraction of 2**64, fall below `fraction` (the same choice in every
    split, run and process)."""
    digest = hashlib.blake2b(str(user_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def catalogue_ids(prepared: PreparedData) -> list[str]:
    """The catalogue's item ids in index order: item index i is catalogue_ids(prepared)[i - 1]."""
    table = read_table(prepared.items_path, ["item_index", "item_id"]).sort_by("item_index")
    return table.column("item_id").to_pylist()


def content_columns(text: bool, image: bool) -> list[str]:
    """The item table's columns that hold the content a batch needs (tokens, pixels)."""
    return (["text_tokens", "text_mask"] if text else []) + (["pixels", "has_image"] if image else [])


def pixel_arrays(stored: list, size: int) -> np.ndarray:
    """The item table's pixels (prepare decoded and resized each image once: 3 * S * S bytes,
    or None for an item without an image) -> (U, 3, S, S) uint8, zeros where there is none."""
    pixels = np.zeros((len(stored), 3, size, size), dtype=np.uint8)
    for j, data in enumerate(stored):
        if data is not None:
            pixels[j] = np.frombuffer(data, dtype=np.uint8).reshape(3, size, size)
    return pixels


def id_buckets(item_ids: list[str], buckets: int) -> np.ndarray:
    """(len(item_ids) + 1,) int64: for item ids in index order (catalogue_ids), each item index's
    hashed ID row, 1..buckets; row 0, padding, stays 0. The row depends on the raw item id alone
    (the first 8 bytes of its BLAKE2b digest modulo `buckets`), so an item keeps its row in any
    catalogue version or order, on every machine."""
    rows = np.zeros(len(item_ids) + 1, dtype=np.int64)
    for index, item_id in enumerate(item_ids, start=1):
        digest = int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little")
        rows[index] = 1 + digest % buckets
    return rows


class ItemContent:
    """Text tokens and pixels of the catalogue, looked up by item index (live encoders).

    Reads only the columns the live encoders need: nothing when neither text nor images are
    live. With a live image encoder it holds the catalogue's pixels (3 * S * S bytes an item:
    45 MB for 3,706 items at S = 64); at catalogue scale, freeze the image encoder and train from
    the feature store (jobs/embed_items.py), which streams the catalogue instead."""

    def __init__(self, prepared: PreparedData, text: bool, image: bool):
        n, L, S = prepared.num_items, prepared.meta["text_max_tokens"], prepared.meta["image_size"]
        self.text, self.image = text, image
        if not (text or image):
            return
        table = read_table(prepared.items_path, ["item_index", *content_columns(text, image)]).to_pydict()
        index = np.asarray(table["item_index"], dtype=np.int64)
        if text:  # rows of items without text stay all padding
            self.tokens = np.zeros((n + 1, L), dtype=np.int64)
            self.mask = np.zeros((n + 1, L), dtype=np.int64)
            for i, tokens, mask in zip(index, table["text_tokens"], table["text_mask"]):
                self.tokens[i], self.mask[i] = tokens, mask
        if image:  # rows of items without an image stay zeros, has_image False
            self.pixels = np.zeros((n + 1, 3, S, S), dtype=np.uint8)
            self.has_image = np.zeros(n + 1, dtype=bool)
            self.pixels[index], self.has_image[index] = pixel_arrays(table["pixels"], S), table["has_image"]

    def __call__(self, items: np.ndarray) -> dict[str, np.ndarray]:
        """Content of the unique items (U,), in the same order."""
        content = {}
        if self.text:
            content["text_tokens"] = self.tokens[items]
            content["text_mask"] = self.mask[items]
        if self.image:
            content["pixels"], content["has_image"] = self.pixels[items], self.has_image[items]
        return content


def left_pad(rows: list[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), dtype=np.int64)
    for r, row in enumerate(rows):
        if len(row):
            out[r, -len(row):] = row
    return out


def event_type_index(prepared: PreparedData) -> dict[str, int]:
    """Event type -> its index, from 1 (0 is padding and unknown types)."""
    return {t: i + 1 for i, t in enumerate(prepared.meta["event_types"])}


def type_indices(event_types, index: dict[str, int]) -> np.ndarray:
    """A user's event types (oldest first) -> their indices, int64."""
    return np.array([index.get(t, 0) for t in event_types], dtype=np.int64)


class UserWindows:
    """A batch of stored sequences -> one training row per user (see the module docstring): the
    user's last max_seq_len + 1 training events (held-out items removed), as a left-padded
    history and the next item after each position."""

    def __init__(self, prepared: PreparedData, max_seq_len: int, cold_fraction: float, train_since: int):
        self.T, self.train_since = max_seq_len, train_since
        self.is_cold = is_cold_mask(prepared.num_items, cold_fraction)
        self.event_type_index = event_type_index(prepared)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        histories, types, targets = [], [], []
        for items, event_types, stamps in zip(batch["items"], batch["event_types"], batch["timestamps"]):
            end = training_end(len(items))
            items = np.asarray(items, dtype=np.int64)[:end]
            warm = ~self.is_cold[items]
            window = slice(-(self.T + 1), None)
            types_idx = type_indices(event_types[:end], self.event_type_index)
            window_items, window_types = items[warm][window], types_idx[warm][window]
            window_stamps = np.asarray(stamps, dtype=np.int64)[:end][warm][window]
            histories.append(window_items[:-1])
            types.append(window_types[:-1])
            targets.append(np.where(window_stamps[1:] >= self.train_since, window_items[1:], 0))
        return {"user_id": batch["user_id"], "history": left_pad(histories, self.T),
                "event_types": left_pad(types, self.T), "targets": left_pad(targets, self.T)}


class TrainingBatches(NumpyBatchCollateFn):
    """A batch of training rows (UserWindows' rows) -> one packed training batch of torch tensors:
    the collate function of the workers' iterators (training_batches). Runs in the training
    worker's process, on Ray Data's formatting threads, while the model computes: it stacks the
    rows, samples negatives and looks the batch's unique items' content up (ItemContent)."""

    def __init__(self, prepared: PreparedData, num_negatives: int | None, text: bool, image: bool, seed: int,
                 cold_fraction: float):
        """num_negatives: uniformly sampled negatives per batch; None: every warm item is a
        candidate (full softmax)."""
        self.num_negatives, self.seed, self.epoch = num_negatives, seed, 0
        self.negative_pool = np.flatnonzero(~is_cold_mask(prepared.num_items, cold_fraction)[1:]) + 1  # warm items
        self.content = ItemContent(prepared, text, image)

    def for_epoch(self, epoch: int) -> "TrainingBatches":
        """This packer for another epoch's negatives; the catalogue's content is shared, not copied."""
        packer = copy.copy(self)
        packer.epoch = epoch
        return packer

    def __call__(self, rows: dict[str, np.ndarray]) -> "dict[str, torch.Tensor]":
        # Imported here, the one place this module needs torch: Ray Data's processes (split
        # coordinators, pooled task workers) import the module to unpickle its packers, and torch
        # would cost each of them about 2 s of CPU.
        import torch

        # Copies: a zero-copy view of a Ray Data block can be read-only, on which torch.from_numpy warns.
        packed = {name: np.array(rows[name], dtype=np.int64) for name in ("history", "event_types", "targets")}
        if self.num_negatives is None:  # full softmax: every warm item, which holds every history and target
            candidates = [self.negative_pool, [0]]
        else:  # the same negatives for the same users in the same epoch, on any worker and thread
            users = zlib.crc32("\n".join(map(str, rows["user_id"])).encode())
            rng = np.random.default_rng([self.seed, self.epoch, users])
            candidates = [packed["history"].ravel(), packed["targets"].ravel(), [0],
                          rng.choice(self.negative_pool, self.num_negatives)]
        packed["unique_items"] = np.unique(np.concatenate(candidates)).astype(np.int64)
        packed.update(self.content(packed["unique_items"]))
        return {name: torch.from_numpy(value) for name, value in packed.items()}


class PackBatches:
    """A batch of stored sequences -> one packed evaluation batch (see the module docstring)."""

    def __init__(self, prepared: PreparedData, split: Split, max_seq_len: int, cold_fraction: float):
        self.split, self.T = split, max_seq_len
        self.is_cold = is_cold_mask(prepared.num_items, cold_fraction)
        self.never_trained = ~trained_items(prepared, cold_fraction)
        self.event_type_index = event_type_index(prepared)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        histories, types, targets, history_lengths = [], [], [], []
        for items, event_types in zip(batch["items"], batch["event_types"]):
            types_idx = type_indices(event_types, self.event_type_index)
            items = np.asarray(items, dtype=np.int64)
            for end in self._target_positions(len(items)):
                warm = ~self.is_cold[items[:end]]
                histories.append(items[:end][warm][-self.T:])
                types.append(types_idx[:end][warm][-self.T:])
                targets.append(items[end])
                history_lengths.append(int(warm.sum()))
        history = left_pad(histories, self.T)
        packed = {"history": history, "event_types": left_pad(types, self.T),
                  "targets": np.asarray(targets, dtype=np.int64),
                  "history_length": np.asarray(history_lengths, dtype=np.int64)}
        packed["target_cold"] = self.never_trained[packed["targets"]]
        packed["unique_items"] = np.unique(np.concatenate([history.ravel(), [0]])).astype(np.int64)
        return {name: value[None] for name, value in packed.items()}  # one row holds the batch

    def _target_positions(self, num_events: int):
        """The 0-based events an evaluation split ranks a user on (a row each)."""
        if self.split == "new_users":
            return range(NEW_USER_EVENTS + 1)
        return [num_events - (2 if self.split == "validation" else 1)]


def by_history_length(rows: pa.Table) -> pa.Table:
    """Rows of user sequences in order of their length (a stable sort): the batches cut from a
    block of them hold users of like lengths, so little of a batch is padding (the model computes
    no column that is padding in every row). Evaluation blocks always are, training blocks with
    data.group_by_length (they still come in random order)."""
    return rows.sort_by("num_events")


def training_end(num_events):
    """How many of a user's first events the training split reads (the rest validate and test):
    for one user (an int) or many (an array)."""
    return num_events - 2 * (num_events >= 3)  # plain arithmetic: an int stays an int in the packing loop


def training_windows(prepared: PreparedData, batch_size: int, max_seq_len: int, pipeline_workers: int = 1,
                     cold_fraction: float = 0.0, train_since: int = 0, new_user_fraction: float = 0.0,
                     group_by_length: bool = False) -> ray.data.Dataset:
    """The training split, one row per user (UserWindows), in a new random block order each epoch.
    Ray Train splits it across the workers, which batch it themselves (training_batches).
    batch_size: the micro-batch, for the block size: with data.group_by_length a block is sorted
    by history length and cut into BATCHES_PER_TASK batches of like lengths."""
    ds = training_sequences(prepared, train_since, new_user_fraction).randomize_block_order()
    ds = ds.repartition(target_num_rows_per_block=batch_size * BATCHES_PER_TASK, strict=True)
    if group_by_length:
        ds = ds.map_batches(by_history_length, batch_size=None, batch_format="pyarrow")
    # Tasks in Ray's pooled worker processes (a window is a few index arrays): no actor to start
    # each epoch. Their CPU is one of those jobs.cluster.data_cpus keeps.
    windows = UserWindows(prepared, max_seq_len, cold_fraction, train_since)
    return ds.map_batches(_pack_with, fn_kwargs={"packer": windows}, batch_size=batch_size, batch_format="numpy",
                          compute=ray.data.TaskPoolStrategy(size=pipeline_workers), num_cpus=1)


def training_batches(rows, packer: TrainingBatches, batch_size: int, epoch: int = 0, prefetch_batches: int = 4):
    """An epoch of packed training batches (dicts of CPU tensors) from training rows: a worker's
    share (a Ray DataIterator) or a whole dataset. Only the split's last batch can be short."""
    return rows.iter_torch_batches(batch_size=batch_size, prefetch_batches=prefetch_batches, device="cpu",
                                   collate_fn=packer.for_epoch(epoch))


def sequence_batches(prepared: PreparedData, split: Split, batch_size: int, max_seq_len: int,
                     pipeline_workers: int = 1, cold_fraction: float = 0.0,
                     new_user_fraction: float = 0.0) -> ray.data.Dataset:
    """A dataset whose rows are packed evaluation batches of `batch_size` users for `split`, one
    batch per block: a map task packs BATCHES_PER_TASK batches' worth of users into one output
    block of that many batches, and a split across workers hands out whole blocks."""
    if split == "new_users":
        ds = keep_rows(stored_sequences(prepared).filter(expr=col("num_events") > NEW_USER_EVENTS),
                       _NewUsers(new_user_fraction, keep=True))
    else:  # a history, and a target beyond the validation one
        ds = stored_sequences(prepared).filter(expr=col("num_events") >= 3)
    if split == "cold":
        ds = keep_rows(ds, _TargetIsCold(is_cold_mask(prepared.num_items, cold_fraction)))
    ds = ds.repartition(target_num_rows_per_block=batch_size * BATCHES_PER_TASK, strict=True)
    ds = ds.map_batches(by_history_length, batch_size=None, batch_format="pyarrow")
    # An evaluation batch is a few index arrays (users read the encoded catalogue): tasks in
    # Ray's pooled worker processes pack it, where an actor pool would start a process for
    # every pass of every split. They take no CPU of their own, so they run beside the next
    # epoch's training pipeline without a CPU kept for them (jobs.cluster.data_cpus).
    packer = PackBatches(prepared, split, max_seq_len, cold_fraction)
    packed = ds.map_batches(_pack_with, fn_kwargs={"packer": packer}, batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.TaskPoolStrategy(size=pipeline_workers), num_cpus=0)
    return packed.repartition(target_num_rows_per_block=1)


def _pack_with(batch: dict[str, np.ndarray], packer) -> dict[str, np.ndarray]:
    return packer(batch)


def stored_sequences(prepared: PreparedData) -> ray.data.Dataset:
    """The prepared users' sequences, with the columns batches are packed from."""
    return read_parquet(prepared.sequences_path).select_columns(
        ["user_id", "items", "event_types", "timestamps", "num_events"])


def training_sequences(prepared: PreparedData, train_since: int = 0, new_user_fraction: float = 0.0) -> ray.data.Dataset:
    """The stored sequences of the users who train: a pair of events, not a held-out new user,
    and with train_since a training target at or after it (the training split's last target is
    its latest)."""
    ds = stored_sequences(prepared).filter(expr=col("num_events") >= 2)
    if new_user_fraction:
        ds = keep_rows(ds, _NewUsers(new_user_fraction, keep=False))
    if train_since:
        ds = keep_rows(ds, _TrainsSince(train_since))
    return ds


def keep_rows(ds: ray.data.Dataset, keep) -> ray.data.Dataset:
    """The rows of `ds` for which `keep` (a pyarrow block -> a bool per row) holds. A filter by a
    Python function that Ray Data cannot read as an expression, done a block at a time: its own
    row-by-row `filter(fn)` is slower, and says so on the console every time."""
    return ds.map_batches(lambda block: block.filter(pa.array(keep(block), type=pa.bool_())),
                          batch_format="pyarrow", batch_size=None)


def list_elements(column, positions: np.ndarray) -> np.ndarray:
    """Element `positions[i]` of row i's list, for a pyarrow list column."""
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    # offsets are positions in the whole values buffer, which a sliced array's .values is too
    return lists.values.to_numpy(zero_copy_only=False)[np.asarray(lists.offsets)[:-1] + positions]


class _TargetIsCold:
    """Keeps the users whose test target (last event) is a held-out item."""

    def __init__(self, is_cold: np.ndarray):
        self.is_cold = is_cold

    def __call__(self, block: pa.Table) -> np.ndarray:
        lengths = pc.list_value_length(block["items"]).to_numpy(zero_copy_only=False)
        return self.is_cold[list_elements(block["items"], lengths - 1)]


class _NewUsers:
    """Keeps the held-out new users (keep=True) or everyone else (keep=False): is_new_user."""

    def __init__(self, fraction: float, keep: bool):
        self.fraction, self.keep = fraction, keep

    def __call__(self, block: pa.Table) -> np.ndarray:
        return np.array([is_new_user(user, self.fraction) == self.keep for user in block["user_id"].to_pylist()],
                        dtype=bool)


class _TrainsSince:
    """Keeps the users whose last training target is at or after `since` (train.train_since)."""

    def __init__(self, since: int):
        self.since = since

    def __call__(self, block: pa.Table) -> np.ndarray:
        ends = training_end(block["num_events"].to_numpy(zero_copy_only=False))
        return list_elements(block["timestamps"], ends - 1) >= self.since


def catalogue_rows(prepared: PreparedData, batch_size: int, text: bool = True, image: bool = True) -> ray.data.Dataset:
    """The catalogue streamed from the item table, one row per item: item_index, item_id and, as
    asked, text_tokens (L,) int64, text_mask (L,) int64, pixels (3, S, S) uint8 and has_image.

    Only the asked columns are read, `batch_size` items at a time: no process holds the whole
    catalogue's images."""
    rows = read_parquet(prepared.items_path).select_columns(
        ["item_index", "item_id", *content_columns(text, image)])  # pushed down into the read
    if not (text or image):
        return rows
    return rows.map_batches(_item_content, fn_kwargs=dict(image_size=prepared.meta["image_size"]),
                            batch_size=batch_size, batch_format="pyarrow")


def _item_content(table: pa.Table, image_size: int) -> dict[str, np.ndarray]:
    rows = {"item_index": table["item_index"].to_numpy(), "item_id": np.asarray(table["item_id"].to_pylist(), object)}
    if "text_tokens" in table.column_names:  # prepare pads every item's tokens to text_max_tokens
        for name in ("text_tokens", "text_mask"):
            column = table[name].combine_chunks()
            rows[name] = column.flatten().to_numpy().astype(np.int64).reshape(len(column), -1)
    if "pixels" in table.column_names:
        rows["pixels"] = pixel_arrays(table["pixels"].to_pylist(), image_size)
        rows["has_image"] = table["has_image"].to_numpy(zero_copy_only=False)
    return rows


def item_batches(prepared: PreparedData, batch_size: int, text: bool = True, image: bool = True) -> ray.data.Dataset:
    """A dataset whose rows are packed batches of catalogue items (every item exactly once)."""
    return catalogue_rows(prepared, batch_size, text, image).map_batches(
        _pack_items, batch_size=batch_size, batch_format="numpy").repartition(target_num_rows_per_block=1)


def _pack_items(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch of catalogue rows -> one packed batch of items, sorted by item index."""
    order = np.argsort(rows["item_index"])
    packed = {"unique_items": rows["item_index"][order].astype(np.int64)}
    packed.update({name: values[order] for name, values in rows.items() if name not in ("item_index", "item_id")})
    return {name: value[None] for name, value in packed.items()}


def unpack(row: dict) -> dict:
    """A packed row as read by iter_torch_batches(batch_size=1) -> the batch itself."""
    return {name: value[0] for name, value in row.items()}

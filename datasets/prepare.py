"""Raw logs -> prepared data: an item table, one chronological sequence per user, a quarantine.

Runs once per input (the result is cached under data.prepared_dir and reused while the inputs
and the data config are unchanged), as Ray Data jobs that stream the shards: no step collects
the event log in one process. Building sequences is a group-by over users, which is too slow to
repeat every epoch, so it is stored and the training pipeline streams the stored sequences.

Layout of data.prepared_dir:
    raw/                generated demo input (source: demo only)
    items/              item_index, item_id, text_tokens, text_mask, pixels, has_image
    sequences/          user_id, items, event_types, timestamps, num_events, num_duplicates
    quarantine/events/  unusable events with their reason
    quarantine/items/   unusable catalogue rows (or images) with their reason
    tokenizer/          the tokenizer items were tokenised with
    meta.json           sizes, vocabularies, counts per reason, popularity; written last
"""

import hashlib
import hmac
import json
import os
import posixpath
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from interestformer.errors import ConfigError
from interestformer.datasets.config import DataConfig, pseudonym_key
from interestformer.datasets.demo import generate_demo
from interestformer.datasets.schema import (
    EVENT_REQUIRED, ITEM_REQUIRED, ITEM_TABLE_SCHEMA, REASONS, SEQUENCE_SCHEMA, load_image, normalise_items,
    shard_problem, tag_events,
)
from interestformer.datasets.storage import (absolute, filesystem, join, local_folder, read_json, read_parquet,
                                             read_table, write_json)

TEXT_CHARS_PER_TOKEN = 32  # generous: word pieces are rarely longer than a few characters
# A process's first item-row task takes seconds of CPU (transformers, the tokenizer, the id index):
# one more process pays for itself only with a few thousand items to tokenise and decode.
ITEMS_PER_ITEM_TASK = 2000
META_VERSION = 3  # bump when the prepared layout changes: cached data is then rebuilt


class DataQualityError(RuntimeError):
    """More of the input is unusable than data.max_bad_fraction allows."""


@dataclass
class PreparedData:
    path: str
    meta: dict

    @classmethod
    def load(cls, path: str) -> "PreparedData":
        meta = read_json(join(path, "meta.json"))
        if meta is None:
            raise FileNotFoundError(f"no prepared data at {path} (meta.json missing)")
        return cls(path, meta)

    @property
    def items_path(self) -> str:
        return join(self.path, "items")

    @property
    def sequences_path(self) -> str:
        return join(self.path, "sequences")

    @property
    def tokenizer_path(self) -> str:
        return join(self.path, "tokenizer")

    @property
    def num_items(self) -> int:
        return self.meta["num_items"]

    def report(self) -> dict[str, int]:
        """Row counts: input, used, and set aside per reason (what the job logs)."""
        return self.meta["report"]


def prepare(cfg: DataConfig, tokenizer_path: str = "") -> PreparedData:
    """Prepares cfg's input (generating the demo data first if asked) or reuses a cached result.

    tokenizer_path: a Hugging Face tokenizer folder or URI (a pretrained text encoder's, or an
    earlier run's prepared one); empty trains a word-piece vocabulary of cfg.vocab_size on the
    catalogue's text.
    """
    check_inputs(cfg)
    out = absolute(cfg.prepared_dir)
    if cfg.source == "demo":
        generate_demo(join(out, "raw"), cfg.demo)
    events_path, items_path = input_paths(cfg)
    # This folder's own tokenizer (an earlier run's, prepared here) is the one it was prepared with.
    own_tokenizer = bool(tokenizer_path) and absolute(tokenizer_path) == join(out, "tokenizer")
    fingerprint = _fingerprint(cfg, "" if own_tokenizer else tokenizer_path, events_path, items_path)
    cached = read_json(join(out, "meta.json"))
    if cached and cached.get("fingerprint") == fingerprint:
        return PreparedData(out, cached)

    # Whole files that cannot be used are found from their footers, before any row is read.
    events_fs, event_files, event_shards_aside = screen_shards(events_path, EVENT_REQUIRED)
    items_fs, item_files, item_shards_aside = screen_shards(items_path, ITEM_REQUIRED)
    shards_aside = {"events": event_shards_aside, "items": item_shards_aside}
    write_json(join(out, "quarantine", "shards.json"), shards_aside)
    for what, files, path in (("event", event_files, events_path), ("catalogue", item_files, items_path)):
        if not files:
            raise DataQualityError(f"no usable {what} file under {path}; set aside: {shards_aside}")

    items = read_shards(items_fs, item_files, normalise_items, "pyarrow", text_columns=cfg.text_columns)
    item_ids, duplicated = _catalogue_ids(items)
    item_index = {item_id: i + 1 for i, item_id in enumerate(item_ids)}
    if tokenizer_path:
        _save_tokenizer(tokenizer_path, join(out, "tokenizer"))  # kept as it is when it is this folder's
    else:
        _train_tokenizer(items, cfg, join(out, "tokenizer"))
    if duplicated:
        items = items.groupby("item_id").map_groups(_mark_duplicate_items, batch_format="pandas")
    # Tasks, not an actor pool: Ray's driver logs a warning for every actor pool (its constructor
    # lies in the object store and may be restarted), and a task that dies is retried all the same.
    processed = items.map_batches(
        item_rows,
        fn_kwargs=dict(item_index=ray.put(item_index), tokenizer_uri=join(out, "tokenizer"), cfg=cfg,
                       duplicated=bool(duplicated)),
        batch_format="pandas",
        batch_size=256,
        compute=ray.data.TaskPoolStrategy(size=item_row_tasks(len(item_ids),
                                                              ray.available_resources().get("CPU", 1))),
    )
    # Materialised once: the item rows feed two writes (kept, quarantined), and recomputing them
    # would decode every catalogue image twice.
    _write_split(processed.materialize(), join(out, "items"), join(out, "quarantine", "items"), keep_reason="image_undecodable")

    id_key = pseudonym_key() if cfg.pseudonymise_user_ids else b""
    tagged = read_shards(events_fs, event_files, tag_events, "pandas", item_index=item_index, id_key=id_key,
                         reference_time=cfg.reference_time)
    _write_split(tagged, None, join(out, "quarantine", "events"))
    good = tagged.map_batches(_usable_rows, batch_format="pyarrow")
    # A sort (datasets.storage.read_parquet gives prepare's datasets the sort-based shuffle) keeps
    # as many blocks as it is given, one a shard, and puts each user's events in one block: what
    # groupby().map_groups() does, without a call per user.
    sequences = good.repartition(cfg.sequence_shards).sort("user_id").map_batches(_user_sequences, batch_size=None,
                                                                                 batch_format="pyarrow")
    sequences.write_parquet(join(out, "sequences"), mode="overwrite")

    meta = _summarise(out, len(item_ids), cfg, fingerprint, shards_aside)
    _check_quality(meta["report"], cfg.max_bad_fraction)
    write_json(join(out, "meta.json"), meta)
    return PreparedData(out, meta)


def item_row_tasks(num_items: int, free_cpus: float) -> int:
    """The most item-row tasks prepare runs at once: one per ITEMS_PER_ITEM_TASK items, at most the
    free CPUs, at least one."""
    return max(1, min(int(free_cpus), num_items // ITEMS_PER_ITEM_TASK))


def check_inputs(cfg: DataConfig):
    """Fails naming the key when a local input folder of cfg does not exist: before Ray starts,
    not as a Ray Data error. (Object-store paths are listed when prepare reads them.)"""
    if cfg.source != "parquet":
        return
    for key in ("events_path", "items_path"):
        path = getattr(cfg, key)
        if "://" not in path and not os.path.exists(absolute(path)):
            raise ConfigError(f"data.{key}", f"{path} does not exist: write your logs there in Parquet "
                                             "(python -m interestformer.datasets.convert converts CSV, TSV and "
                                             "JSON lines; docs/data.md) or fix the path")


def input_paths(cfg: DataConfig) -> tuple[str, str]:
    """Where cfg's events and item catalogue are read from: your logs, or what the demo generator
    writes under prepared_dir/raw."""
    if cfg.source == "demo":
        raw = join(absolute(cfg.prepared_dir), "raw")
        return join(raw, "events"), join(raw, "items")
    return absolute(cfg.events_path), absolute(cfg.items_path)


def item_rows(batch: pd.DataFrame, item_index: ray.ObjectRef, tokenizer_uri: str, cfg: DataConfig,
              duplicated: bool) -> pa.Table:
    """Catalogue rows -> item table rows (ItemRows), with the ItemRows this process built for the
    catalogue whose id -> index map is `item_index`. The map comes by reference, fetched once per
    process: a catalogue's million ids would otherwise be copied into every task."""
    key = item_index.hex()
    if key not in _ITEM_ROWS_BY_CATALOGUE:
        _ITEM_ROWS_BY_CATALOGUE.clear()  # an earlier prepare's index is not needed again
        _ITEM_ROWS_BY_CATALOGUE[key] = ItemRows(ray.get(item_index), tokenizer_uri, cfg, duplicated)
    return _ITEM_ROWS_BY_CATALOGUE[key](batch)


_ITEM_ROWS_BY_CATALOGUE: dict[str, "ItemRows"] = {}


class ItemRows:
    """Catalogue rows -> item table rows: index, tokens, a validated and resized image."""

    def __init__(self, item_index: dict[str, int], tokenizer_uri: str, cfg: DataConfig, duplicated: bool):
        from transformers import AutoTokenizer

        self.index = item_index
        # The prepared data's copy: a task may run on a node that has no other.
        self.tokenizer = AutoTokenizer.from_pretrained(local_folder(tokenizer_uri))
        self.cfg = cfg
        self.duplicated = duplicated

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        from interestformer.datasets.schema import as_id_strings

        ids = as_id_strings(batch["item_id"])
        reason = batch["reason"] if self.duplicated else pd.Series(None, index=batch.index, dtype=object)
        reason = reason.where(reason.notna() | ids.notna(), "null_item_id")
        texts = [self._text(row) for _, row in batch.iterrows()]
        tokens = self.tokenizer(
            texts, max_length=self.cfg.text_max_tokens, truncation=True, padding="max_length"
        )
        images, has_image = [], []
        for _, row in batch.iterrows():
            pixels = load_image(self._image_bytes(row), self.cfg.image_size)
            images.append(pixels.tobytes() if pixels is not None else None)
            has_image.append(pixels is not None)
        had_image = self._declares_image(batch)
        no_image = ~pd.Series(has_image, index=batch.index)
        reason = reason.where(reason.notna() | ~(had_image & no_image), "image_undecodable")
        return pa.table(
            {
                "item_index": ids.map(self.index).fillna(0).astype("int32").to_numpy(),
                "item_id": _strings(ids),
                "text_tokens": tokens["input_ids"],
                "text_mask": tokens["attention_mask"],
                "pixels": images,
                "has_image": has_image,
                "reason": _strings(reason),
            },
            schema=ITEM_TABLE_SCHEMA,
        )

    def _text(self, row) -> str:
        parts = [row.get(c) for c in self.cfg.text_columns]
        text = ". ".join(p for p in parts if isinstance(p, str) and p.strip())
        # Only the first text_max_tokens tokens are kept; a megabyte of text need not be tokenised.
        return text[:TEXT_CHARS_PER_TOKEN * self.cfg.text_max_tokens]

    def _declares_image(self, batch: pd.DataFrame) -> pd.Series:
        declared = pd.Series(False, index=batch.index)
        for column in ("image", "image_uri"):
            if column in batch.columns:
                declared |= batch[column].notna()
        return declared

    def _image_bytes(self, row) -> bytes | None:
        data = row.get("image")
        if isinstance(data, (bytes, bytearray)) and data:
            return bytes(data)
        uri = row.get("image_uri")
        if not isinstance(uri, str) or not uri:
            return None
        try:
            fs, path = filesystem(uri)
            with fs.open_input_stream(path) as f:
                return f.read()
        except (OSError, ValueError):
            return None


def _strings(column: pd.Series) -> list[str | None]:
    return [None if pd.isna(v) else str(v) for v in column]


def _mark_duplicate_items(group: pd.DataFrame) -> pd.DataFrame:
    group = group.copy()
    group["reason"] = [None] + ["duplicate_item_id"] * (len(group) - 1)
    return group


def _usable_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"])).drop_columns(["reason", "item_id"])


def _set_aside_rows(batch: pa.Table) -> pa.Table:
    """Rows with a reason. Scalar columns are kept as text, so any broken value can be written
    and read back; derived arrays (tokens, images) are left out."""
    rows = batch.filter(pc.is_valid(batch["reason"]))
    scalar = [f.name for f in rows.schema if f.name not in ("text_tokens", "text_mask", "pixels")]
    return pa.table({name: pc.cast(rows[name], pa.string()) for name in scalar})


def _kept_rows(batch: pa.Table, keep_reason: str) -> pa.Table:
    reason = batch["reason"]
    return batch.filter(pc.or_kleene(pc.is_null(reason), pc.equal(reason, keep_reason))).drop_columns(["reason"])


def _write_split(ds: ray.data.Dataset, keep_path: str | None, quarantine_path: str, keep_reason: str = ""):
    """Writes rows without a reason (and those whose reason is `keep_reason`, e.g. an item whose
    image failed is still usable) to keep_path, and rows with a reason to quarantine_path."""
    ds.map_batches(_set_aside_rows, batch_format="pyarrow").write_parquet(quarantine_path, mode="overwrite")
    if keep_path:
        kept = ds.map_batches(_kept_rows, fn_kwargs={"keep_reason": keep_reason}, batch_format="pyarrow")
        kept.write_parquet(keep_path, mode="overwrite")


def _user_sequences(events: pa.Table) -> pa.Table:
    """A block of whole users' events (a sort by user_id puts each user in one block) -> one row
    per user with the chronological sequence. Vectorised over the block: at millions of events a
    per-user call (map_groups) is most of prepare's time.

    Order: timestamp, then item index, then event type, so the result never depends on how the
    log was sharded. Exact duplicates (same item, timestamp and event type) are counted and
    collapsed into one event; repeated consumption at other times is kept.
    """
    if not events.num_rows:
        return SEQUENCE_SCHEMA.empty_table()
    keys = ["user_id", "timestamp", "item_index", "event_type"]
    events = events.select(keys).sort_by([(key, "ascending") for key in keys]).combine_chunks()
    same = [pc.equal(events[key].slice(1), events[key].slice(0, events.num_rows - 1)).to_numpy(zero_copy_only=False)
            for key in keys]  # each row against the one before it
    new_user = np.concatenate([[True], ~same[0]])
    duplicate = np.concatenate([[False], np.logical_and.reduce(same)])
    kept = events.filter(pa.array(~duplicate)).combine_chunks()
    starts = np.flatnonzero(new_user)
    offsets = pa.array(np.append(np.flatnonzero(new_user[~duplicate]), kept.num_rows).astype(np.int32))
    num_events = np.diff(offsets.to_numpy())
    return pa.table(
        {
            "user_id": events["user_id"].take(pa.array(starts)),
            "items": pa.ListArray.from_arrays(offsets, kept["item_index"].combine_chunks()),
            "event_types": pa.ListArray.from_arrays(offsets, kept["event_type"].combine_chunks()),
            "timestamps": pa.ListArray.from_arrays(offsets, kept["timestamp"].combine_chunks()),
            "num_events": num_events.astype(np.int32),
            "num_duplicates": (np.diff(np.append(starts, events.num_rows)) - num_events).astype(np.int32),
        },
        schema=SEQUENCE_SCHEMA,
    )


def _catalogue_ids(items: ray.data.Dataset) -> tuple[list[str], list[str]]:
    """Sorted distinct item ids (their index is position + 1) and the ids given more than once."""
    from interestformer.datasets.schema import as_id_strings

    ids = as_id_strings(items.select_columns(["item_id"]).to_pandas()["item_id"]).dropna()
    counts = ids.value_counts()
    return sorted(counts.index), sorted(counts.index[counts > 1])


def _train_tokenizer(items: ray.data.Dataset, cfg: DataConfig, out: str):
    """Trains a lower-casing word-piece vocabulary on the catalogue text and saves it to `out`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    columns = [c for c in cfg.text_columns if c in items.schema().names]
    texts = (
        " ".join(str(v) for v in row.values() if isinstance(v, str))
        for row in items.select_columns(columns).iter_rows()
    ) if columns else iter([""])
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, special_tokens=specials))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )
    if "://" not in out:
        wrapped.save_pretrained(out)
        return
    with tempfile.TemporaryDirectory() as local:  # Hugging Face saves to local folders only
        wrapped.save_pretrained(local)
        _save_tokenizer(local, out)


def _save_tokenizer(uri: str, out: str):
    """Copies a tokenizer folder into the prepared data, so checkpoints name one place for it."""
    if absolute(uri) == out:
        return
    fs, path = filesystem(out)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_folder(uri), out)


def _sequence_stats(batch: pd.DataFrame, num_items: int) -> pd.DataFrame:
    """Per batch of sequences: item counts before validation and before test (for most-popular),
    the event types seen, and user counts by length."""
    train, pretest = np.zeros(num_items + 1, np.int64), np.zeros(num_items + 1, np.int64)
    types = set()
    for items, n, event_types in zip(batch["items"], batch["num_events"], batch["event_types"]):
        if n >= 2:
            np.add.at(train, items[:-2] if n >= 3 else items, 1)
            np.add.at(pretest, items[:-1] if n >= 3 else items, 1)
        types.update(event_types)
    n = batch["num_events"]
    return pd.DataFrame(
        {
            "train_counts": [train],
            "pretest_counts": [pretest],
            "event_types": [np.array(sorted(types), dtype=object)],
            "users": [len(batch)],
            "users_too_short": [int((n < 2).sum())],
            "users_train_only": [int((n == 2).sum())],
            "events_used": [int(n.sum())],
            "duplicates": [int(batch["num_duplicates"].sum())],
        }
    )


def screen_shards(uri: str, required: tuple[str, ...]) -> tuple[pafs.FileSystem, list[list[str]], list[dict]]:
    """Reads only the Parquet footers under `uri` -> (its filesystem, usable files grouped by
    schema, files set aside). A file set aside is {"path", "reason", "rows" (None when even the footer is
    unreadable), "detail"}. Empty files are neither: they hold nothing to use or to lose."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no input at {uri}")
    files = [path] if info.is_file else sorted(
        i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if i.is_file and not os.path.basename(i.path).startswith((".", "_"))  # _SUCCESS, .crc files
    )
    usable, aside = {}, []
    for file in files:
        try:
            with fs.open_input_file(file) as handle:
                metadata = pq.ParquetFile(handle).metadata
                schema = metadata.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as e:
            aside.append({"path": file, "reason": "shard_unreadable", "rows": None, "detail": str(e)[:300]})
            continue
        if metadata.num_rows == 0:
            continue
        problem = shard_problem(schema, required)
        if problem:
            columns = ", ".join(f"{f.name}: {f.type}" for f in schema)
            aside.append({"path": file, "reason": problem, "rows": metadata.num_rows, "detail": columns})
        else:
            usable.setdefault(str(schema.remove_metadata()), []).append(file)
    return fs, list(usable.values()), aside


def read_shards(fs: pafs.FileSystem, groups: list[list[str]], normalise, batch_format: str, **kwargs) -> ray.data.Dataset:
    """Files grouped by schema -> one dataset in one schema. Each group is normalised before the
    groups meet: Ray Data cannot put, e.g., integer and string user ids into one block."""
    parts = [read_parquet(files, filesystem=fs).map_batches(normalise, fn_kwargs=kwargs,
                                                                    batch_format=batch_format)
             for files in groups]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _summarise(out: str, num_items: int, cfg: DataConfig, fingerprint: str, shards_aside: dict) -> dict:
    stats = (
        read_parquet(join(out, "sequences"))
        .map_batches(_sequence_stats, fn_kwargs={"num_items": num_items}, batch_format="pandas")
        .to_pandas()
    )
    event_quarantine = _reason_counts(join(out, "quarantine", "events"))
    item_quarantine = _reason_counts(join(out, "quarantine", "items"))
    event_types = sorted(set().union(*[set(t) for t in stats["event_types"]]))
    report = {
        "events_used": int(stats["events_used"].sum()),
        "events_duplicate": int(stats["duplicates"].sum()),
        **{f"events_{reason}": n for reason, n in event_quarantine.items()},
        "items": num_items,
        **{f"items_{reason}": n for reason, n in item_quarantine.items()},
        "users": int(stats["users"].sum()),
        "users_too_short": int(stats["users_too_short"].sum()),
        "users_train_only": int(stats["users_train_only"].sum()),
    }
    shard_reasons = set()
    for what, aside in shards_aside.items():
        for shard in aside:  # rows of files set aside whole count like rows set aside one by one
            shard_reasons.add(shard["reason"])
            files_key, rows_key = f"{what}_files_{shard['reason']}", f"{what}_{shard['reason']}"
            report[files_key] = report.get(files_key, 0) + 1
            report[rows_key] = report.get(rows_key, 0) + (shard["rows"] or 0)
    report["events_in"] = (report["events_used"] + report["events_duplicate"] + sum(event_quarantine.values())
                           + sum(s["rows"] or 0 for s in shards_aside["events"]))
    return {
        "version": META_VERSION,
        "fingerprint": fingerprint,
        "num_items": num_items,
        "event_types": event_types,
        "text_max_tokens": cfg.text_max_tokens,
        "image_size": cfg.image_size,
        "report": report,
        "reasons": {r: REASONS[r] for r in sorted({*event_quarantine, *item_quarantine, *shard_reasons})},
        "popularity_train": np.sum(np.stack(stats["train_counts"]), axis=0).tolist(),
        "popularity_pretest": np.sum(np.stack(stats["pretest_counts"]), axis=0).tolist(),
    }


def _reason_counts(path: str) -> dict[str, int]:
    """Rows set aside under `path`, by reason: one column read straight from the files, where a Ray
    Data job would take longer to start than to read it."""
    try:
        reasons = read_table(path, ["reason"])["reason"].to_pandas()
    except (ValueError, OSError, KeyError):  # an empty quarantine has no files to read
        return {}
    return {str(k): int(v) for k, v in reasons.value_counts().items()}


def _check_quality(report: dict, max_bad_fraction: float):
    events_bad = report["events_in"] - report["events_used"] - report["events_duplicate"]
    items_bad = sum(v for k, v in report.items()
                    if k.startswith("items_") and not k.startswith("items_files_") and k != "items_image_undecodable")
    for what, bad, total in (("events", events_bad, report["events_in"]), ("items", items_bad, report["items"] + items_bad)):
        if total and bad / total > max_bad_fraction:
            raise DataQualityError(
                f"{bad} of {total} {what} are unusable ({bad / total:.1%} > data.max_bad_fraction="
                f"{max_bad_fraction}); see the quarantine folder for each row's reason. Counts: {report}"
            )


def _fingerprint(cfg: DataConfig, tokenizer_path: str, *inputs: str) -> str:
    """Changes when the inputs or anything in the config that shapes the prepared data change."""
    # Keys the batching reads (not the prepared files) must not invalidate the cache.
    batching = ("max_seq_len", "num_negatives", "full_softmax", "group_by_length", "max_bad_fraction", "cold_item_fraction", "new_user_fraction",
                "train_since")
    # Where the inputs and the output lie does not shape the data either: the inputs count by their
    # files (below), so the same files reached from another folder (a moved checkout, a second one
    # whose data/ links to the first's) reuse what was prepared.
    locations = ("events_path", "items_path", "prepared_dir")
    shaping = {k: v for k, v in asdict(cfg).items() if k not in batching + locations}
    listing = []
    for uri in inputs:
        fs, path = pafs.FileSystem.from_uri(uri)
        selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        root = fs.get_file_info(path)
        infos = [root] if root.is_file else fs.get_file_info(selector)
        listing.append(sorted((posixpath.relpath(i.path, posixpath.dirname(path) if root.is_file else path),
                               i.size, str(i.mtime)) for i in infos if i.is_file))
    parts = [META_VERSION, shaping, tokenizer_path, listing]
    if cfg.pseudonymise_user_ids:  # another key gives other pseudonyms; the key itself stays out
        parts.append(hmac.new(pseudonym_key(), b"fingerprint", hashlib.sha256).hexdigest()[:16])
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

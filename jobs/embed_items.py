"""Frozen encoders' item features -> a Parquet feature store that frozen-encoder training reads.

    interestformer-embed-items --config configs/x.yaml [--set model.text.train_mode=frozen]

A frozen encoder's output for an item never changes, so instead of running it in every step on
every worker, this job runs it once over the catalogue and the model looks the features up
(ItemEncoder's buffers). It is Ray Data batch inference: the item table is streamed with only the
content columns the frozen encoders read (images as the pixels prepare decoded), and
`train.embed_workers` encoder actors (one GPU each when train.use_gpu) turn batches of items
into features, which stream into Parquet files: no process holds the catalogue's images.

The store is a folder beside the prepared data, `features/<key>/`, keyed by the prepared data
and what decides the frozen encoders' output (EncoderConfig.output_fields: not their projection
or learning rate), so later runs (a sweep's trials, the benchmark's configs) reuse it. One row
per catalogue item:
    item_index int32, item_id string,
    text_features fixed_size_list<float32>[w]             when the text encoder is frozen
    image_features fixed_size_list<float32>[w], has_image  when the image encoder is frozen
`_summary.json` is written last: a folder without it is incomplete and is computed again.
jobs.train calls `feature_store` too (computing the store when it is missing), and each
training worker reads the store into its model's buffers (`load_features`).

The remaining limit: a live (top or full) image encoder still has its training pipeline's actors
hold the catalogue's encoded image bytes (datasets/pipeline.py ItemContent), because training
batches look items up by index. At catalogue scale, freeze the image encoder and train from
the feature store.
"""

import dataclasses
import hashlib
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from interestformer.errors import ConfigError
from interestformer.datasets.pipeline import catalogue_rows
from interestformer.datasets.prepare import PreparedData, prepare
from interestformer.datasets.storage import filesystem, join, read_json, write_json
from interestformer.jobs.config import JobConfig, config_parser, load_config
from interestformer.models.encoders import build_image_encoder, build_text_encoder
from interestformer.models.interest_former import DataSpec

SUMMARY = "_summary.json"  # the leading underscore keeps Parquet readers from taking it for data


def store_uri(prepared: PreparedData, cfg: JobConfig) -> str:
    """The folder of this prepared data's feature store for cfg's frozen encoders ('' if none is frozen)."""
    frozen = cfg.model.frozen_encoders()
    if not frozen:
        return ""
    # An encoder built from config is random: its seed is part of what it computes.
    key = {kind: [enc.output_fields(), "" if enc.pretrained_path else cfg.train.seed] for kind, enc in frozen.items()}
    payload = json.dumps([prepared.meta["fingerprint"], key], sort_keys=True, default=str)
    return join(prepared.path, "features", hashlib.sha256(payload.encode()).hexdigest()[:16])


def feature_store(prepared: PreparedData, cfg: JobConfig, spec: DataSpec) -> tuple[str, DataSpec, dict]:
    """(uri, spec with the features' widths, summary) of the frozen encoders' feature store,
    computed now unless it is complete already; ('', spec, {}) when no encoder is frozen."""
    uri = store_uri(prepared, cfg)
    if not uri:
        return uri, spec, {}
    summary = read_json(join(uri, SUMMARY))
    if summary is None:
        summary = _embed(prepared, cfg, spec, uri)
    else:
        print(f"Feature store of {summary['items']} items reused: {uri}", flush=True)
    widths = summary["widths"]
    return uri, dataclasses.replace(spec, text_feature_dim=widths.get("text_features", 0),
                                    image_feature_dim=widths.get("image_features", 0)), summary


def _embed(prepared: PreparedData, cfg: JobConfig, spec: DataSpec, uri: str) -> dict:
    frozen = cfg.model.frozen_encoders()
    workers = cfg.train.embed_workers
    print(f"Encoding {prepared.num_items} catalogue items with the frozen {' and '.join(frozen)} encoder(s), "
          f"{workers} actor(s), into {uri}...", flush=True)
    started = time.perf_counter()
    # Training has not started yet: its CPUs are free for the encoders.
    threads = max(1, int(cfg.train.num_workers * cfg.train.cpus_per_worker) // workers)
    rows = catalogue_rows(prepared, cfg.eval.batch_size, text="text" in frozen, image="image" in frozen)
    features = rows.map_batches(
        EncodeItems,
        fn_constructor_kwargs=dict(cfg=cfg, spec=spec, threads=threads),
        batch_size=cfg.eval.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1 if cfg.train.use_gpu else threads,
        num_gpus=1 if cfg.train.use_gpu else 0,
    )
    fs, path = filesystem(uri)
    features.write_parquet(path, filesystem=fs, mode="overwrite")  # an incomplete earlier attempt goes
    schema, items = _files_schema_and_rows(fs, path)
    if items != prepared.num_items:
        raise RuntimeError(f"the feature store at {uri} holds {items} rows for {prepared.num_items} items")
    summary = {"items": items, "seconds": round(time.perf_counter() - started, 1),
               "widths": {f.name: f.type.list_size for f in schema if pa.types.is_fixed_size_list(f.type)}}
    write_json(join(uri, SUMMARY), summary)
    print(f"Encoded {items} items in {summary['seconds']:.0f} s into {uri}", flush=True)
    return summary


def _files_schema_and_rows(fs: pafs.FileSystem, path: str) -> tuple[pa.Schema, int]:
    """The store's schema and row count, from its files' footers (no rows are read)."""
    dataset = pq.ParquetDataset(path, filesystem=fs)
    return dataset.schema, sum(pq.read_metadata(f, filesystem=fs).num_rows for f in dataset.files)


def load_features(uri: str) -> dict[str, torch.Tensor]:
    """The store at `uri` as the model's buffers ({} for ''): text_features (N+1, w),
    image_features (N+1, w) and has_image (N+1,), by item index (row 0, padding, stays 0)."""
    if not uri:
        return {}
    items = read_json(join(uri, SUMMARY))["items"]
    fs, path = filesystem(uri)
    store = pq.ParquetDataset(path, filesystem=fs)
    table = store.read(columns=[name for name in store.schema.names if name != "item_id"])
    index = table["item_index"].to_numpy()
    features = {}
    for name in table.column_names:
        if name == "item_index":
            continue
        column = table[name].combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            values = column.flatten().to_numpy().reshape(len(column), column.type.list_size)
        else:
            values = column.to_numpy(zero_copy_only=False)
        by_index = np.zeros((items + 1, *values.shape[1:]), dtype=values.dtype)
        by_index[index] = values
        features[name] = torch.from_numpy(by_index)
    return features


class EncodeItems:
    """A batch of catalogue rows (datasets.pipeline.catalogue_rows) -> the frozen encoders'
    features of those items, one row each."""

    def __init__(self, cfg: JobConfig, spec: DataSpec, threads: int):
        torch.set_num_threads(threads)
        torch.manual_seed(cfg.train.seed)  # the same random weights in every actor
        self.device = "cuda" if cfg.train.use_gpu else "cpu"
        frozen = cfg.model.frozen_encoders()
        self.text = (build_text_encoder(frozen["text"], spec.text_vocab_size, spec.text_max_tokens).to(self.device).eval()
                     if "text" in frozen else None)
        self.image = (build_image_encoder(frozen["image"], spec.image_size).to(self.device).eval()
                      if "image" in frozen else None)

    @torch.no_grad()
    def __call__(self, rows: dict[str, np.ndarray]) -> pa.Table:
        out = {"item_index": pa.array(rows["item_index"], pa.int32()), "item_id": pa.array(list(rows["item_id"]), pa.string())}
        if self.text is not None:
            tokens, mask = (torch.from_numpy(rows[name]).to(self.device) for name in ("text_tokens", "text_mask"))
            out["text_features"] = _fixed_size_lists(self.text(tokens, mask))
        if self.image is not None:
            has_image = torch.from_numpy(rows["has_image"])
            features = torch.zeros(len(has_image), self.image.width)
            if has_image.any():
                features[has_image] = self.image(torch.from_numpy(rows["pixels"][rows["has_image"]]).to(self.device)).float().cpu()
            out["image_features"], out["has_image"] = _fixed_size_lists(features), pa.array(rows["has_image"])
        return pa.table(out)


def _fixed_size_lists(features: torch.Tensor) -> pa.FixedSizeListArray:
    """(U, w) -> U fixed-size lists of w float32: a plain Parquet list column any reader takes."""
    values = features.float().cpu().numpy()
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])


def main(argv=None) -> dict:
    """Prepares the data (cached) and computes its feature store unless it is there already;
    returns {uri, items, seconds, computed}."""
    from interestformer.jobs.cluster import ensure_ray
    from interestformer.jobs.train import data_spec

    args = config_parser("python -m jobs.embed_items", __doc__, "model.text.train_mode=frozen").parse_args(argv)
    cfg = load_config(args.config, args.set)  # every config mistake stops here, before Ray starts
    if not cfg.model.frozen_encoders():
        raise ConfigError("model.text.train_mode", "no enabled encoder is frozen, so there is nothing to embed: "
                                                   "set model.text.train_mode=frozen or model.image.train_mode=frozen")
    started = time.perf_counter()
    ensure_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = True  # this job's only progress report
    prepared = prepare(cfg.data, tokenizer_path=cfg.model.text.pretrained_path)
    computed = read_json(join(store_uri(prepared, cfg), SUMMARY)) is None
    uri, _, summary = feature_store(prepared, cfg, data_spec(prepared, cfg))
    seconds = time.perf_counter() - started
    print(f"Feature store: {summary['items']} items, {len(summary['widths'])} feature column(s) "
          f"{summary['widths']}, {seconds:.0f} s in all, at {uri}")
    return {"uri": uri, "items": summary["items"], "seconds": seconds, "computed": computed}


if __name__ == "__main__":
    from interestformer.jobs import cli

    cli.embed_items()

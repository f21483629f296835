"""The reference for benchmarks/overhead.py: the same model, data and batches trained by a plain
single-process PyTorch loop, with no Ray, no DeepSpeed and no data streaming.

The batches are packed beforehand by the pipeline's own PackBatches and held in memory, so the
loop times nothing but the steps: forward, backward, gradient clipping and an AdamW step with
the same learning-rate warm-up as the DeepSpeed config. Whatever our job is slower than this
is what Ray Train, DeepSpeed and streaming cost.
"""

import time

import numpy as np
import pyarrow.parquet as pq
import torch

from interestformer.datasets.pipeline import PackBatches, unpack
from interestformer.datasets.prepare import PreparedData
from interestformer.jobs.config import JobConfig
from interestformer.jobs.distributed import ADAM_BETAS
from interestformer.jobs.embed_items import feature_store, load_features
from interestformer.jobs.train import data_spec
from interestformer.models.interest_former import InterestFormer


def packed_training_batches(prepared: PreparedData, cfg: JobConfig) -> list[dict[str, torch.Tensor]]:
    """One epoch of training batches, packed as the Ray Data pipeline packs them."""
    table = pq.read_table(prepared.sequences_path, columns=["user_id", "items", "event_types", "timestamps", "num_events"])
    table = table.filter(np.asarray(table.column("num_events")) >= 2)
    text, image = cfg.model.live_content()
    pack = PackBatches(prepared, "train", cfg.data.max_seq_len, cfg.data.num_negatives, text, image, cfg.train.seed,
                       cfg.data.cold_item_fraction, cfg.data.train_since)
    size, batches = cfg.train.micro_batch_size, []
    for start in range(0, table.num_rows, size):
        rows = table.slice(start, size).to_pydict()
        batches.append({name: torch.from_numpy(np.asarray(value)) for name, value in unpack(pack(rows)).items()})
    return batches


def plain_training(prepared: PreparedData, cfg: JobConfig, threads: int) -> list[dict]:
    """Trains for cfg.train.epochs over the packed batches in this process; per epoch: users,
    seconds and samples/s."""
    torch.set_num_threads(threads)
    features_uri, spec, _ = feature_store(prepared, cfg, data_spec(prepared, cfg))
    torch.manual_seed(cfg.train.seed)
    model = InterestFormer(cfg.model, spec)
    model.item_encoder.load_content_features(load_features(features_uri))
    optimizer = torch.optim.AdamW(model.param_groups(cfg.train.lr), betas=ADAM_BETAS,
                                  weight_decay=cfg.train.weight_decay, fused=True)  # as jobs.distributed's
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / max(cfg.train.warmup_steps, 1)))
    batches = packed_training_batches(prepared, cfg)
    epochs = []
    for _ in range(cfg.train.epochs):
        model.train()
        started, users = time.perf_counter(), 0
        for batch in batches:
            loss = model(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            warmup.step()
            users += len(batch["history"])
        seconds = time.perf_counter() - started
        epochs.append({"users": users, "seconds": seconds, "samples_per_s": users / seconds})
    return epochs

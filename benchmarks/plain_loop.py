"""The reference for benchmarks/overhead.py and benchmarks/convergence.py: the same model, data
and batches trained by a plain single-process PyTorch loop, with no Ray, no DeepSpeed engine and
no data streaming.

The batches are packed beforehand by the pipeline's own packers and held in memory, so the
loop times nothing but the steps: forward, backward, gradient clipping and an AdamW step with the
same learning-rate schedule as the DeepSpeed config (DeepSpeed's own scheduler class, a function
of the step, built from the same config dict). Whatever our job is slower than this is what Ray
Train, DeepSpeed and streaming cost.
"""

import math
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from interestformer.datasets.pipeline import BATCHES_PER_TASK, PackBatches, UserWindows, by_history_length, unpack
from interestformer.datasets.prepare import PreparedData
from interestformer.jobs.config import JobConfig
from interestformer.jobs.distributed import ADAM_BETAS, lr_scheduler, training_precision
from interestformer.jobs.embed_items import feature_store, load_features
from interestformer.jobs.evaluate import popularity_counts
from interestformer.jobs.selection import ModelSelection
from interestformer.jobs.train import batch_packer, data_spec
from interestformer.models.interest_former import InterestFormer
from interestformer.models.ranking import evaluate_model, item_representations


def packed_batches(prepared: PreparedData, cfg: JobConfig, split: str, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """A split's batches, packed as the Ray Data pipeline packs them: for training one epoch's,
    for validation or test every user with a target (as jobs.evaluate.eval_datasets, without
    item content)."""
    table = pq.read_table(prepared.sequences_path, columns=["user_id", "items", "event_types", "timestamps", "num_events"])
    table = table.filter(np.asarray(table.column("num_events")) >= (2 if split == "train" else 3))
    if split == "train":
        windows = UserWindows(prepared, cfg.data.max_seq_len, cfg.data.cold_item_fraction, cfg.data.train_since)
        packer = batch_packer(prepared, cfg)
        pack = lambda rows: packer(windows(rows))  # noqa: E731
    else:
        evaluation = PackBatches(prepared, split, cfg.data.max_seq_len, cfg.data.cold_item_fraction)
        pack = lambda rows: {name: torch.from_numpy(value) for name, value in unpack(evaluation(rows)).items()}  # noqa: E731
    batches = []
    for first in range(0, table.num_rows, batch_size * BATCHES_PER_TASK):  # the pipeline's blocks
        block = table.slice(first, batch_size * BATCHES_PER_TASK)
        if split != "train" or cfg.data.group_by_length:
            block = by_history_length(block)
        for start in range(0, block.num_rows, batch_size):
            batches.append(pack(block.slice(start, batch_size).to_pydict()))
    return batches


def plain_model(prepared: PreparedData, cfg: JobConfig, threads: int, total_steps: int):
    """The model, its AdamW (as jobs.distributed's: torch's fused AdamW) and learning-rate schedule."""
    from deepspeed.runtime import lr_schedules

    torch.set_num_threads(threads)
    features_uri, spec, _ = feature_store(prepared, cfg, data_spec(prepared, cfg))
    torch.manual_seed(cfg.train.seed)
    model = InterestFormer(cfg.model, spec)
    model.item_encoder.load_content_features(load_features(features_uri))
    optimizer = torch.optim.AdamW(model.param_groups(cfg.train.lr), betas=ADAM_BETAS,
                                  weight_decay=cfg.train.weight_decay, fused=True)
    schedule = lr_scheduler(cfg.train, total_steps)
    return model, optimizer, getattr(lr_schedules, schedule["type"])(optimizer, **schedule["params"])


def train_epoch(model, optimizer, scheduler, batches: list[dict], train) -> dict:
    """One pass over the batches; users, seconds and samples/s. In bf16 (train.precision, with auto
    decided as the job decides it) the steps compute in bf16 under autocast (DeepSpeed's engine
    holds bf16 weights instead)."""
    model.train()
    bf16 = training_precision(train) == "bf16"
    started, users = time.perf_counter(), 0
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        scheduler.step()
        users += len(batch["history"])
    seconds = time.perf_counter() - started
    return {"users": users, "seconds": seconds, "samples_per_s": users / seconds}


def plain_training(prepared: PreparedData, cfg: JobConfig, threads: int) -> list[dict]:
    """Trains for cfg.train.epochs over the packed batches in this process; per epoch: users,
    seconds and samples/s."""
    batches = packed_batches(prepared, cfg, "train", cfg.train.micro_batch_size)
    model, optimizer, scheduler = plain_model(prepared, cfg, threads, cfg.train.epochs * len(batches))
    return [train_epoch(model, optimizer, scheduler, batches, cfg.train) for _ in range(cfg.train.epochs)]


@torch.no_grad()
def full_ranking(model, prepared: PreparedData, cfg: JobConfig, batches: list[dict], split: str) -> dict[str, float]:
    """Full-ranking metrics of a split's packed batches, by the evaluation code the job runs (for
    models without live content encoders: the catalogue is encoded from item indices alone)."""
    model.eval()
    catalogue = torch.arange(1, prepared.num_items + 1)
    items = item_representations(model, [{"unique_items": catalogue}], prepared.num_items)
    return evaluate_model(model, items, batches, cfg.eval.ks, cfg.eval.exclude_history, cfg.eval.item_chunk_size,
                          popularity_counts(prepared, cfg, split)).metrics()


def plain_convergence(prepared: PreparedData, cfg: JobConfig, threads: int, batch_size: int, max_minutes: float,
                      stop_at: float = math.inf) -> dict:
    """Trains like plain_training on batches of `batch_size` users, in a fresh order every epoch,
    and validates after every epoch, with the job's model selection and early stopping
    (train.select_metric, patience), until max_minutes have passed or validation reaches
    `stop_at`. The test split is then ranked once with the best epoch's weights. Returns the
    curve (epoch, minutes since the start, validation metric) and the test metrics."""
    started = time.perf_counter()
    batches = packed_batches(prepared, cfg, "train", batch_size)
    validation = packed_batches(prepared, cfg, "validation", cfg.eval.batch_size)
    model, optimizer, scheduler = plain_model(prepared, cfg, threads, cfg.train.epochs * len(batches))
    selection, best_weights, curve = ModelSelection.for_run(cfg.train), None, []
    order = np.random.default_rng(cfg.train.seed)
    for epoch in range(1, cfg.train.epochs + 1):
        train_epoch(model, optimizer, scheduler, [batches[i] for i in order.permutation(len(batches))], cfg.train)
        val = {f"val_{k}": v for k, v in full_ranking(model, prepared, cfg, validation, "validation").items()}
        if selection.update(epoch, val):
            best_weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        curve.append({"epoch": epoch, "minutes": (time.perf_counter() - started) / 60, selection.metric: val[selection.metric]})
        print(f"plain loop: epoch {epoch}, {curve[-1]['minutes']:.1f} min, {selection.metric} "
              f"{val[selection.metric]:.4f} (best {selection.best:.4f} at {selection.best_epoch})", flush=True)
        if selection.should_stop or val[selection.metric] >= stop_at or curve[-1]["minutes"] >= max_minutes:
            break
    model.load_state_dict(best_weights)
    test = full_ranking(model, prepared, cfg, packed_batches(prepared, cfg, "test", cfg.eval.batch_size), "test")
    return {"curve": curve, "best_epoch": selection.best_epoch, "stopped_epoch": curve[-1]["epoch"],
            "validation": selection.best_metrics, "test": test, "minutes": (time.perf_counter() - started) / 60}

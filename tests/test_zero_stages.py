"""ZeRO-3 across 2 Ray Train workers follows the same loss trajectory as plain data parallelism
(ZeRO-0), and so does the item-ID table split by rows across the workers (train.shard_item_table):
the same model, seeds and per-rank batches through jobs/distributed.py's DeepSpeed config,
engine and optimizer step, on gloo. None of them has DeepSpeed build a C++ kernel on the way."""

import os
import sys
import tempfile

import pytest
import ray.cloudpickle
import ray.train
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from interestformer.jobs.config import JobConfig
from interestformer.jobs.distributed import optimizer_step, setup_engine
from interestformer.models.interest_former import DataSpec, InterestFormer

pytestmark = pytest.mark.slow  # 2-worker DeepSpeed runs, five in one worker group

SPEC = DataSpec(num_items=50, num_event_types=2, max_seq_len=8, text_vocab_size=10, text_max_tokens=4, image_size=8)
STEPS = 6


def fixed_batch(generator: torch.Generator, users: int = 4) -> dict:
    """A training batch of random full-length histories, the same on every run for a seed."""
    T = SPEC.max_seq_len
    sequence = torch.randint(1, SPEC.num_items + 1, (users, T + 1), generator=generator)
    history, targets = sequence[:, :-1], sequence[:, 1:]
    negatives = torch.randint(1, SPEC.num_items + 1, (8,), generator=generator)
    return {"history": history, "targets": targets,
            "event_types": torch.randint(1, SPEC.num_event_types + 1, (users, T), generator=generator),
            "unique_items": torch.unique(torch.cat([history.ravel(), targets.ravel(), negatives, torch.zeros(1, dtype=torch.long)]))}


def train_fixed_batches(cfg: JobConfig) -> list[float]:
    torch.manual_seed(0)
    engine, _ = setup_engine(InterestFormer(cfg.model, SPEC), cfg.train)
    generator = torch.Generator().manual_seed(100 + ray.train.get_context().get_world_rank())
    losses = []
    for _ in range(STEPS):
        loss = engine(fixed_batch(generator))
        engine.backward(loss)
        optimizer_step(engine)
        losses.append(loss.item())
    return losses


def train_every_variant(variants: dict) -> dict:
    """Each variant's trajectory in turn, in one worker group: its start is the slow part. And
    the files DeepSpeed built meanwhile into a torch extensions folder of their own (torch reads
    TORCH_EXTENSIONS_DIR at each build), where an op built in an earlier run cannot hide a build."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as extensions:
        os.environ["TORCH_EXTENSIONS_DIR"] = extensions
        trajectories = {name: train_fixed_batches(JobConfig.from_dict(config)) for name, config in variants.items()}
        built = [os.path.relpath(os.path.join(folder, name), extensions)
                 for folder, _, files in os.walk(extensions) for name in files]
    return {"trajectories": trajectories, "built": built}


def job_config(stage: int, **train) -> dict:
    return JobConfig.from_dict({
        "model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "dropout": 0.0,
                  "text": {"enabled": False}, "image": {"enabled": False}},
        "train": {"zero_stage": stage, "num_workers": 2, "micro_batch_size": 4, "warmup_steps": 1, "lr": 0.01,
                  **train},
    }).to_dict()


VARIANTS = {
    "zero0": job_config(0),
    "zero3": job_config(3),
    "zero0 unclipped": job_config(0, grad_clip=0.0),
    "zero0 sharded table": job_config(0, grad_clip=0.0, shard_item_table=True),
    "zero3 sharded table": job_config(3, grad_clip=0.0, shard_item_table=True),
}


@pytest.fixture(scope="module")
def worker_group_result(ray_local, tmp_path_factory) -> dict:
    """Every variant's per-step losses on 2 Ray Train workers, and what DeepSpeed built."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    trainer = TorchTrainer(train_every_variant, train_loop_config=VARIANTS,
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(name="zero-stages",
                                                          storage_path=str(tmp_path_factory.mktemp("zero"))))
    return trainer.fit().return_value


@pytest.fixture(scope="module")
def trajectories(worker_group_result) -> dict:
    return worker_group_result["trajectories"]


def test_deepspeed_builds_no_kernel_on_cpu(worker_group_result):
    """DeepSpeed's CPU backend would compile its shared-memory all-reduce (40-80 s, needing a C++
    compiler) at every first start in an environment; training never calls it."""
    assert worker_group_result["built"] == []


def test_zero3_on_two_workers_follows_the_zero0_loss_trajectory(trajectories):
    plain, zero3 = trajectories["zero0"], trajectories["zero3"]
    assert plain[-1] < plain[0]  # it learns
    assert zero3 == pytest.approx(plain, rel=1e-5), (plain, zero3)


def test_an_item_table_sharded_across_two_workers_follows_the_zero0_loss_trajectory(trajectories):
    """Each worker holds half the table's rows and steps them in its own AdamW; no gradient is
    clipped here (grad_clip=0), since the sharded table's is clipped by its own norm."""
    plain = trajectories["zero0 unclipped"]
    for stage in (0, 3):
        sharded = trajectories[f"zero{stage} sharded table"]
        assert sharded == pytest.approx(plain, rel=1e-5), (stage, plain, sharded)

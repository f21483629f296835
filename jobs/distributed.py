"""The distributed wiring, in one place: the DeepSpeed config, the engine, checkpoints.

Every Ray Train worker builds the same model and hands it to deepspeed.initialize; Ray Train has
already set up the process group (gloo on CPU, NCCL on GPU), which DeepSpeed picks up.

A checkpoint folder holds:
    deepspeed/          DeepSpeed's own sharded model and optimizer state (exact resume)
    model.safetensors   the run's model: the weights of its best epoch so far (train.select_metric),
                        gathered from every ZeRO stage (evaluation, serving, init_from; loads
                        without unpickling anything)
    latest.safetensors  the weights of the checkpoint's own epoch, where that is not the best one
                        (read to resume on another number of workers)
    item_table/         with train.shard_item_table, each rank's rows of the item-ID table and
                        their AdamW state (rank<r>.safetensors)
    checkpoint.json     epoch and step reached, the config and the data spec
    item_ids.json       the catalogue's item ids in index order, so that a later run on a changed
                        catalogue (train.init_from) finds each item's trained row
"""

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import ray.train
import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file, save_file

from interestformer.errors import ConfigError
from interestformer.datasets.storage import join, read_bytes, read_json
from interestformer.models.interest_former import DataSpec, InterestFormer
from interestformer.models.sharded_table import ShardedEmbedding

WEIGHTS_FILE = "model.safetensors"
LATEST_WEIGHTS_FILE = "latest.safetensors"
STATE_FILE = "checkpoint.json"
ITEM_IDS_FILE = "item_ids.json"
DEEPSPEED_TAG = "deepspeed"
ITEM_TABLE_DIR = "item_table"
ADAM_BETAS = (0.9, 0.98)


def deepspeed_config(train, total_steps: int = 0) -> dict:
    """The DeepSpeed config of a TrainConfig; the only place one is built. total_steps: the
    optimizer steps of all train.epochs (optimizer_steps), which a cosine schedule decays over."""
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch's fused AdamW: DeepSpeed's fused Adam is a C++ op compiled on first use, and
            # torch's default (foreach) steps through parameter-sized temporaries (2M x 64 items
            # at ZeRO-0: peak 3,637 -> 3,127 MB, step 7.2 -> 4.9 s). Offloaded optimizer state
            # steps in DeepSpeed's CPU Adam, which is worth its compilation.
            "params": {"lr": train.lr, "weight_decay": train.weight_decay, "betas": list(ADAM_BETAS),
                       "torch_adam": not train.offload_optimizer,
                       **({} if train.offload_optimizer else {"fused": True})},
        },
        "scheduler": lr_scheduler(train, total_steps),
        "zero_optimization": {
            "stage": train.zero_stage,
            "stage3_gather_16bit_weights_on_model_save": True,
            # Stage 3 copies gradients into a bucket of up to this many values before reducing them
            # (DeepSpeed's default, 5e8, is 2 GB in fp32). With a 2M x 64 item table the smaller
            # bucket cut each worker's peak memory by 490 MB (benchmarks/memory.py); stages 1-2 did
            # not change.
            **({"reduce_bucket_size": 20_000_000} if train.zero_stage == 3 else {}),
            **({"offload_optimizer": {"device": "cpu", "pin_memory": train.use_gpu}} if train.offload_optimizer else {}),
            **({"offload_param": {"device": "cpu", "pin_memory": train.use_gpu}} if train.offload_params else {}),
        },
        # auto is decided on the workers (training_precision); the driver's copy of the config says so.
        "bf16": {"enabled": "auto" if train.precision == "auto" else train.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), from the Linux CPU flags:
    torch's own checks are private. False where that is unknown (not Linux); fp32 is never slow."""
    try:
        with open("/proc/cpuinfo") as f:
            return bool({"avx512_bf16", "amx_bf16"} & set(f.read().split()))
    except OSError:
        return False


def training_precision(train) -> str:
    """train.precision with auto decided for this process's hardware: bf16 where it is native (a
    CUDA GPU with bf16; cpu_has_native_bf16), else fp32. Where a process group is up, every rank
    takes bf16 only if all of them have it."""
    if train.precision != "auto":
        return train.precision
    native = torch.cuda.is_bf16_supported(including_emulation=False) if train.use_gpu else cpu_has_native_bf16()
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        agreed = torch.tensor([float(native)], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        native = bool(agreed.item())
    return "bf16" if native else "fp32"


def lr_scheduler(train, total_steps: int) -> dict:
    """The learning-rate schedule, as DeepSpeed's scheduler config: linear warm-up over
    train.warmup_steps (or train.warmup_fraction of total_steps), then constant or cosine decay to
    train.min_lr_ratio at total_steps. Each parameter group follows it from its own lr (encoders
    may have their own, see InterestFormer.param_groups), so no absolute rates appear here."""
    warmup = max(1, train.warmup_steps or round(train.warmup_fraction * total_steps))
    if train.lr_schedule == "constant":
        return {"type": "WarmupLR",
                "params": {"warmup_min_lr": 0.0, "warmup_num_steps": warmup, "warmup_type": "linear"}}
    return {"type": "WarmupCosineLR",
            "params": {"warmup_min_ratio": 0.0, "warmup_num_steps": warmup, "warmup_type": "linear",
                       "cos_min_ratio": train.min_lr_ratio, "total_num_steps": max(1, total_steps)}}


def optimizer_steps(train, train_users: int, world_size: int) -> int:
    """Optimizer steps in all train.epochs: each epoch every worker steps through its share of the
    training users in micro-batches, train.grad_accum_steps of them a step."""
    batches = math.ceil(train_users / (train.micro_batch_size * world_size))
    return train.epochs * math.ceil(batches / train.grad_accum_steps)


def setup_engine(model: InterestFormer, train, total_steps: int = 0) -> tuple[object, dict | None]:
    """Wraps the model in a DeepSpeed engine on this worker's device, resumed from the run's latest
    checkpoint when it has one; returns (engine, the checkpoint's state or None). A resumed state's
    "resumed" says how it resumed, for the console.

    On the world size that wrote the checkpoint, DeepSpeed's own shards load: weights, optimizer
    moments and learning-rate schedule, exactly. On another world size those shards do not fit
    the new partitioning, so the weights come from the checkpoint's consolidated weights of its
    epoch (loaded before DeepSpeed partitions them), the learning-rate schedule
    continues at the saved step, and the optimizer's moments start again from zero. With
    train.shard_item_table the ID table is split across the ranks here, before DeepSpeed sees the
    model, and its rows and moments resume alike."""
    import deepspeed

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as folder:
        state = None
        if folder:
            with open(os.path.join(folder, STATE_FILE)) as f:
                state = json.load(f)
        world, rank = ray.train.get_context().get_world_size(), ray.train.get_context().get_world_rank()
        resharded = state is not None and state.get("world_size", world) != world
        if resharded:
            latest = os.path.join(folder, LATEST_WEIGHTS_FILE)
            weights = load_file(latest if os.path.exists(latest) else os.path.join(folder, WEIGHTS_FILE))
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
        if train.shard_item_table:
            model.item_encoder.shard_id_table({"lr": train.lr, "betas": ADAM_BETAS, "weight_decay": train.weight_decay},
                                              train.grad_clip, ray.train.torch.get_device())
        train = dataclasses.replace(train, precision=training_precision(train))
        if not train.use_gpu:
            skip_shared_memory_kernel()
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.param_groups(train.lr),
                                               config=deepspeed_config(train, total_steps))
        if resharded:
            engine.lr_scheduler.step(state["step"])
            state["resumed"] = (f"Resumed a {state['world_size']}-worker checkpoint on {world} workers: weights from "
                                f"{WEIGHTS_FILE}, optimizer moments restart, learning rate at step {state['step']}")
        elif state is not None:
            check_pickles(os.path.join(folder, "deepspeed"))
            engine.load_checkpoint(os.path.join(folder, "deepspeed"), tag=DEEPSPEED_TAG)
            if table := sharded_table(engine):
                table.load_shard_state(load_file(os.path.join(folder, ITEM_TABLE_DIR, f"rank{rank}.safetensors")))
            state["resumed"] = f"Resumed from the checkpoint of epoch {state['epoch']} (step {state['step']})"
    return engine, state


def skip_shared_memory_kernel():
    """DeepSpeed's CPU backend builds its shared-memory all-reduce kernel as it starts: a C++
    compile of 40-80 s the first time in each environment (needing a compiler), and a ninja check
    at every start after. Only DeepSpeed's inference all-reduce (tensor-parallel inference) calls
    it; ZeRO's training collectives go through the gloo process group either way. Marked
    incompatible in DeepSpeed's table of ops, it is never built."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def sharded_table(engine) -> ShardedEmbedding | None:
    """The engine's model's row-sharded ID table (train.shard_item_table), if it has one."""
    item_encoder = engine.module.item_encoder
    return item_encoder.id_embedding if isinstance(item_encoder.id_embedding, ShardedEmbedding) else None


def optimizer_step(engine):
    """engine.step(), and at each gradient-accumulation boundary the sharded ID table's own step at
    the learning rate DeepSpeed's step used. Every rank must call it together."""
    boundary, lr = engine.is_gradient_accumulation_boundary(), engine.get_lr()[0]
    engine.step()
    if boundary and (table := sharded_table(engine)):
        table.step(lr)


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, on every rank (each evaluates its share of the users).
    Every rank must call this: ZeRO-3's partitions and a sharded ID table's rows are gathered,
    copied and let go."""
    import deepspeed

    gathered = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
                if engine.zero_optimization_partition_weights() else contextlib.nullcontext())
    with gathered:
        weights = {name: tensor.detach().cpu().clone() for name, tensor in engine.module.state_dict().items()}
    if table := sharded_table(engine):
        weights[InterestFormer.ID_TABLE] = table.full_weight().cpu()
    return weights


class WorkerShares(ray.train.DataConfig):
    """How a run's datasets reach its workers. The training rows (one a user) take Ray Train's own
    split: every worker gets as many rows as the others, so all step together, and up to
    world_size - 1 users sit out each epoch (which ones follows the epoch's random block order;
    the job counts them).

    The evaluation datasets (rows of whole packed batches) are split exactly, without dropping a
    row: a dropped evaluation row would leave its users out of the metrics. Workers may then hold
    a batch more or less than others, which is harmless there: each ranks its share and the totals
    are summed (RankTotals.merge). Only DataConfig's public surface is used: `configure` (its
    documented extension point) and `default_ingest_options`; shards read from the workers'
    nodes where they can (locality)."""

    def __init__(self):
        super().__init__(datasets_to_split=["train"])

    def configure(self, datasets: dict, world_size: int, worker_handles, worker_node_ids, **kwargs):
        training = {name: dataset for name, dataset in datasets.items() if name == "train"}
        output = super().configure(training, world_size, worker_handles, worker_node_ids, **kwargs)
        for name, dataset in datasets.items():
            if name in training:
                continue
            ds = dataset.copy(dataset)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = self.default_ingest_options()
            for rank, share in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                output[rank][name] = share
        return output


def fetch_ahead(batches: Iterable) -> Iterator:
    """An iterator over `batches` whose first item is already being fetched in a background
    thread: Ray Data starts every epoch's pipeline anew (seconds on a small machine), and this way
    that start-up runs while the worker does something else (DeepSpeed's set-up, saving a
    checkpoint, evaluating) instead of while it waits for its first batch. Two pipelines then run
    at once: jobs.cluster.data_cpus keeps CPUs for both."""
    items = iter(batches)
    fetcher = ThreadPoolExecutor(max_workers=1)
    first = fetcher.submit(next, items, _NO_ITEM)
    fetcher.shutdown(wait=False)

    def chained():
        item = first.result()
        if item is not _NO_ITEM:
            yield item
            yield from items

    return chained()


_NO_ITEM = object()


def timed_batches(batches: Iterable[dict], device) -> Iterator[tuple[dict, float]]:
    """Yields (batch on `device`, seconds spent waiting for it) for an epoch of batches."""
    batches = iter(batches)
    while True:
        asked = time.perf_counter()
        batch = next(batches, None)
        waited = time.perf_counter() - asked
        if batch is None:
            return
        yield {name: value.to(device, non_blocking=True) for name, value in batch.items()}, waited


def best_checkpoint_weights() -> dict[str, torch.Tensor]:
    """The best epoch's weights held by the run's latest checkpoint (its model.safetensors)."""
    with ray.train.get_checkpoint().as_directory() as folder:
        return load_file(os.path.join(folder, WEIGHTS_FILE))


def save_and_report(engine, weights: dict, latest: dict | None, metrics: dict, state: dict, item_ids: list[str]):
    """Saves a checkpoint on every rank and reports it with the metrics to Ray Train. Rank 0 writes
    the gathered weights: `weights`, the run's model (its best epoch's), and `latest`, this epoch's
    own, where they differ."""
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(os.path.join(folder, "deepspeed"), tag=DEEPSPEED_TAG)
        rank = ray.train.get_context().get_world_rank()
        if table := sharded_table(engine):
            os.makedirs(os.path.join(folder, ITEM_TABLE_DIR))
            save_file({k: v.contiguous().cpu() for k, v in table.shard_state().items()},
                      os.path.join(folder, ITEM_TABLE_DIR, f"rank{rank}.safetensors"))
        if rank == 0:
            write_weights_and_state(folder, weights, state, item_ids)
            if latest is not None:
                save_file(latest, os.path.join(folder, LATEST_WEIGHTS_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def write_weights_and_state(folder: str, weights: dict[str, torch.Tensor], state: dict, item_ids: list[str]):
    """Writes the whole model's weights, the checkpoint's state and the catalogue's item ids (in
    index order): what load_model and start_from read."""
    save_file(weights, os.path.join(folder, WEIGHTS_FILE))
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)
    with open(os.path.join(folder, ITEM_IDS_FILE), "w") as f:
        json.dump(item_ids, f)


def checkpoint_state(folder: str, key: str) -> dict:
    """A checkpoint folder's saved state; fails naming config `key` when the folder holds no
    checkpoint written by jobs.train."""
    state = read_json(join(folder, STATE_FILE))
    if state is None or read_json(join(folder, ITEM_IDS_FILE)) is None:
        raise ConfigError(key, f"no checkpoint written by jobs.train at {folder} ({STATE_FILE} or {ITEM_IDS_FILE} missing)")
    return state


def check_start_from(cfg):
    """Fails, naming train.init_from, when that checkpoint is missing or its model cannot start
    this config's (other sizes, layers or encoders): before any cluster resource is taken. The
    checkpoint's data spec stands in for this run's, whose catalogue-sized tensors are matched
    item by item (start_from), so only the model config is compared here; models are built on
    the meta device, without memory."""
    from interestformer.jobs.config import JobConfig

    path = cfg.train.init_from
    state = checkpoint_state(path, "train.init_from")
    tokenizer = join(state["prepared_path"], "tokenizer")  # jobs.train.tokenizer_path reads it
    if cfg.model.text.enabled and not cfg.model.text.pretrained_path and read_json(
            join(tokenizer, "tokenizer_config.json")) is None:
        raise ConfigError("train.init_from", f"the earlier run's tokenizer is gone ({tokenizer}): its token ids "
                                             "are what the text encoder learned")
    spec = DataSpec(**state["spec"])
    with torch.device("meta"):
        earlier = InterestFormer(JobConfig.from_dict(state["config"]).model, spec).state_dict()
        now = InterestFormer(cfg.model, dataclasses.replace(spec, max_seq_len=cfg.data.max_seq_len)).state_dict()
    per_item = (*InterestFormer.CATALOGUE_BUFFERS, InterestFormer.ID_TABLE)
    differ = sorted(name for name in set(earlier) | set(now) if name not in per_item and (
        name not in earlier or name not in now or earlier[name].shape != now[name].shape))
    if differ:
        raise ConfigError("train.init_from", f"the checkpoint's model does not fit this config's: "
                                             f"{len(differ)} weights differ, e.g. {differ[:4]} (keep the model "
                                             f"section and data.max_seq_len of the run that wrote {path})")


def start_from(model: InterestFormer, folder: str, item_ids: list[str]) -> dict[str, int]:
    """Loads an earlier run's checkpoint (a folder or URI) into a model built for this catalogue
    (item_ids, in index order), matching items by id (InterestFormer.load_earlier); returns how
    many items kept a trained row and how many are new."""
    index = {item_id: i + 1 for i, item_id in enumerate(read_json(join(folder, ITEM_IDS_FILE)))}
    earlier_rows = torch.tensor([0] + [index.get(item_id, -1) for item_id in item_ids], dtype=torch.int64)
    model.load_earlier(load_tensors(read_bytes(join(folder, WEIGHTS_FILE))), earlier_rows)
    new = int((earlier_rows < 0).sum())
    return {"items_carried": len(item_ids) - new, "items_new": new}


# DeepSpeed's loader unpickles its files with weights_only=False, so any code in a planted file
# would run. Before it reads a checkpoint, every pickle in it is scanned (without being executed)
# for globals beyond torch's weights-only set and these DeepSpeed types its files really hold.
DEEPSPEED_PICKLE_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file would unpickle something other than tensors and DeepSpeed's own state."""


def check_pickles(folder: str):
    """Raises UnsafeCheckpointError when a .pt file under `folder` names a global outside
    torch's weights-only set and DEEPSPEED_PICKLE_GLOBALS. Nothing is unpickled."""
    for root, _, names in os.walk(folder):
        for name in sorted(n for n in names if n.endswith(".pt")):
            path = os.path.join(root, name)
            try:
                unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - DEEPSPEED_PICKLE_GLOBALS
            except Exception as e:  # not a torch file at all
                raise UnsafeCheckpointError(f"{path} is not a readable torch checkpoint: {e}") from None
            if unsafe:
                raise UnsafeCheckpointError(f"{path} would unpickle {sorted(unsafe)}; refusing to load it")


def check_teachers(cfg):
    """Fails, naming train.teachers, when a teacher's checkpoint is missing or its encoders read
    item content this config's batches do not carry: before any cluster resource is taken."""
    from interestformer.jobs.config import JobConfig

    text, image = cfg.model.live_content()
    for folder in cfg.train.teachers:
        state = checkpoint_state(folder, "train.teachers")
        teacher_text, teacher_image = JobConfig.from_dict(state["config"]).model.live_content()
        if (teacher_text and not text) or (teacher_image and not image):
            raise ConfigError("train.teachers", f"the model at {folder} encodes item "
                                                f"{'text' if teacher_text and not text else 'images'} as it ranks, "
                                                "which this config's batches do not carry")


def check_teacher_catalogues(cfg, catalogue: list[str]):
    """Fails, naming train.teachers, when a teacher was trained on another catalogue: its item
    indices must be this run's."""
    for folder in cfg.train.teachers:
        if read_json(join(folder, ITEM_IDS_FILE)) != catalogue:
            raise ConfigError("train.teachers", f"the model at {folder} was trained on another catalogue than "
                                                f"this run's {len(catalogue)} items: a teacher must rank the same items")


class Teachers:
    """Distillation's teachers (train.teachers) in a worker: frozen models of earlier runs, in the
    precision the run trains in, that score a training batch's candidates together."""

    def __init__(self, folders: list[str], device, dtype: torch.dtype):
        self.models = [load_model(folder, device)[0].to(dtype) for folder in folders]

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        """The mean of the teachers' candidate_logits on `batch`: (M, U - 1)."""
        return torch.stack([model.candidate_logits(batch)[0] for model in self.models]).mean(dim=0)


def load_model(folder: str, device: str | torch.device = "cpu") -> tuple[InterestFormer, dict]:
    """A plain fp32 model from a checkpoint folder's gathered weights, and its saved state. The
    folder may be in object storage (checkpoint_uri); DeepSpeed's shards are not read."""
    from interestformer.jobs.config import JobConfig

    state = read_json(join(folder, STATE_FILE))
    if state is None:
        raise ConfigError("--checkpoint", f"{folder} holds no checkpoint ({STATE_FILE} not found): give the "
                                          "checkpoint folder the training job printed")
    model = model_from_weights(load_tensors(read_bytes(join(folder, WEIGHTS_FILE))),
                               JobConfig.from_dict(state["config"]), DataSpec(**state["spec"]), device)
    return model, state


def checkpoint_uri(checkpoint: ray.train.Checkpoint) -> str:
    """Where a checkpoint is, for jobs.evaluate and people: its local folder, or its URI
    (s3://bucket/...) where Ray's `path` is only the path inside the object store."""
    fs = checkpoint.filesystem
    return checkpoint.path if fs.type_name == "local" else f"{fs.type_name}://{checkpoint.path}"


def model_from_weights(weights: dict, cfg, spec: DataSpec, device) -> InterestFormer:
    """An fp32 evaluation copy of the model with the given weights, untrained items' ID rows
    filled from their content neighbours (model.cold_item_neighbours)."""
    model = InterestFormer(cfg.model, spec)
    model.load_state_dict({name: tensor.float() if tensor.is_floating_point() else tensor
                           for name, tensor in weights.items()})
    model.item_encoder.fill_untrained_ids()
    return model.to(device).eval()

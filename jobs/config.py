"""The one config schema of every job and sweep, and its loader.

A config file is YAML whose sections mirror `JobConfig`; every key is optional (the dataclass
defaults are the demo) and every key is checked before Ray starts: an unknown key, a wrong type,
an out-of-range value or an impossible combination raises ConfigError naming the key's path.
`--set section.key=value` on any job's command line overrides a key after the file is read.
A file may build on another with `base: other.yaml`: configs that differ in a few keys say only
those (see configs/ml1m_*.yaml).
"""

import copy
import dataclasses
import importlib.util
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from interestformer.errors import ConfigError
from interestformer.datasets.config import DataConfig
from interestformer.models.interest_former import ModelConfig


@dataclass
class TrainConfig:
    """Ray Train workers, DeepSpeed and the optimisation."""

    num_workers: int = 2
    """Ray Train workers (processes); one GPU each when use_gpu."""
    use_gpu: bool = False
    """Train on GPUs (NCCL); otherwise CPUs (gloo)."""
    cpus_per_worker: float = 0.5
    """CPUs Ray reserves per training worker. Keep CPUs free for the Ray Data pipeline, or it
    starves and training waits forever."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the training workers on nodes: PACK on as few nodes as fit them (Ray's
    default), SPREAD over as many as it can, STRICT_PACK all on one node, STRICT_SPREAD each on a
    node of its own (needs num_workers nodes)."""
    pipeline_workers: int = 1
    """Most Ray Data tasks at once that cut users' training windows (and pack evaluation batches). A run
    keeps pipeline_workers + 2 CPUs for Ray Data besides its workers' (jobs.cluster.data_cpus)."""
    embed_workers: int = 1
    """Ray Data actors that run the frozen encoders over the catalogue into the feature store
    (jobs.embed_items, or jobs.train when the store is missing); one GPU each when use_gpu."""
    epochs: int = 3
    """Most passes over the training sequences; early stopping (patience) may end a run sooner."""
    eval_every: int = 1
    """Validate every this many epochs (and always after the last): each validation ranks the
    whole catalogue for every validation user."""
    select_metric: str = "val_ndcg@10"
    """The validation metric (higher is better) that picks the run's best epoch and drives early
    stopping; Tune sweeps judge trials by it too. The best epoch's weights are what the run tests
    once at its end, saves as its model and logs to MLflow (best_epoch, stopped_epoch)."""
    patience: int = 0
    """Early stopping: end the run after this many validations in a row without a gain of at least
    min_delta over the best. 0: train all epochs (the best epoch's weights are still the model)."""
    min_delta: float = 0.0
    """The least gain in select_metric that counts as an improvement for patience."""
    max_minutes: float = 0.0
    """A time budget: the run ends after the first epoch that finishes past this many minutes of
    the workers' time (a resumed run counts what came before), and tests its best epoch as after
    an early stop. 0: no limit."""
    micro_batch_size: int = 64
    """Users per batch on each worker. With live item encoders a step encodes every item its batch
    touches (on the demo, most of its catalogue) whatever the batch size, so larger batches share
    that cost; a log of a few hundred users wants smaller ones, for more steps (docs/data.md)."""
    grad_accum_steps: int = 1
    """Micro-batches summed before each optimizer step."""
    lr: float = 2e-3
    """Peak learning rate of AdamW (after linear warm-up)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_fraction: float = 0.025
    """Linear learning-rate warm-up over this fraction of all the optimizer steps of train.epochs,
    so that it scales with the data: a small log has few steps an epoch, and a fixed count of
    warm-up steps could last many epochs there."""
    warmup_steps: int = 0
    """Warm-up as a number of optimizer steps instead; > 0 overrides warmup_fraction."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant holds lr; cosine decays it to lr x min_lr_ratio over all
    train.epochs (a run that stops early stops somewhere on the way down)."""
    min_lr_ratio: float = 0.1
    """Where the cosine schedule ends, as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + weights
    partitioned across workers."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """Training precision. bf16 is the choice on GPUs (Ampere or newer) and on CPUs with native bf16
    (AVX512-BF16 or AMX); elsewhere a CPU emulates it, several times slower than fp32. auto: bf16
    where the training workers' hardware computes it natively, else fp32, decided on the workers
    (the run's `precision` tag in MLflow says which)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep the optimizer state in CPU memory and step it there with DeepSpeed's CPU
    Adam (compiled on first use). Frees GPU memory for a larger item table or batch; needs
    zero_stage 1, 2 or 3."""
    offload_params: bool = False
    """ZeRO-Infinity: also keep the partitioned weights in CPU memory between uses. Only stage 3
    partitions weights, so this needs zero_stage 3."""
    shard_item_table: bool = False
    """An item-ID table whose training state (weights, gradient and AdamW moments: 16 bytes a value
    in fp32) is too large for one worker: split its rows across the workers, as TorchRec's
    row-wise sharding. Each worker holds, updates and checkpoints 1/num_workers of the rows and
    their AdamW state; a step's lookups and gradients travel between the workers (all-gather,
    all-to-all). DeepSpeed trains the rest of the model at any zero_stage; the rows and their
    AdamW state stay on the worker's device (offload_optimizer does not move them). The table's
    gradient is clipped by its own norm (grad_clip), not jointly with the rest. The saved weights
    (model.safetensors) hold the whole table, so evaluation and serving are unchanged; resuming
    on another worker count restarts the table's AdamW moments, as DeepSpeed's. Each worker still
    holds the whole table while it builds the model (then keeps its rows) and while it evaluates
    (to rank its users against every item)."""
    init_from: str = ""
    """Incremental training: a checkpoint of an earlier run (its folder or URI, as in that run's
    checkpoint_path.txt) whose weights this run starts from, on new data (e.g. a newer log with
    data.train_since at the new window's start). Items are matched by id: trained ID rows carry
    over unchanged, items new to the catalogue start with an empty (zero) ID row and are ranked
    from their content until they train. Optimizer state and learning-rate warm-up start afresh.
    The model section must match that run's. A rerun that has a checkpoint of its own resumes
    from that instead."""
    teachers: list[str] = field(default_factory=list)
    """Distillation: checkpoints of earlier runs on this catalogue (folders or URIs, as
    init_from) that score every training batch's candidates together, by the mean of their
    logits: an ensemble's ranking, which beats each of its members (docs/benchmarks.md). The loss
    is then (1 - distill_weight) x the cross-entropy to the next item + distill_weight x the
    cross-entropy to the teachers' softmax, and one model learns what they agree on at one
    model's serving cost. Training pays a forward pass of every teacher a batch. A teacher may
    have its own model section; the item content its encoders read must be content this config's
    batches carry."""
    distill_weight: float = 0.5
    """Distillation: the teachers' share of the loss (0-1); used only with teachers."""
    seed: int = 0
    """Seeds model initialisation, dropout and negative sampling. The users' order in an epoch and
    which worker reads which of them are Ray Data's and not seeded, so two runs of one seed differ
    (on ML-1M by up to about 0.007 test NDCG@10): compare settings over seeds, not single runs."""
    log_every_steps: int = 10
    """Log loss and samples/s to MLflow every this many optimizer steps."""
    max_failures: int = 2
    """Times a run recovers from a lost worker (process killed, node gone) by restarting every
    worker from the latest checkpoint, i.e. losing at most the current epoch's steps. -1: always;
    0: never."""

    def __post_init__(self):
        if self.num_workers < 1:
            raise ConfigError("num_workers", f"must be >= 1, got {self.num_workers}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be one of 0, 1, 2, 3, got {self.zero_stage}")
        for key in ("epochs", "micro_batch_size", "grad_accum_steps", "log_every_steps", "pipeline_workers",
                    "embed_workers", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.max_failures < -1:
            raise ConfigError("max_failures", f"must be >= -1, got {self.max_failures}")
        for key in ("patience", "min_delta", "max_minutes"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError("warmup_fraction", f"must be within [0, 1), got {self.warmup_fraction}")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ConfigError("distill_weight", f"must be between 0 and 1, got {self.distill_weight}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", f"must be within [0, 1], got {self.min_lr_ratio}")
        if self.lr <= 0 or self.cpus_per_worker <= 0:
            raise ConfigError("lr" if self.lr <= 0 else "cpus_per_worker", "must be > 0")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("offload_optimizer", "needs ZeRO to partition the optimizer state: "
                                                   "set zero_stage to 1, 2 or 3, or offload_optimizer=false")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("offload_params", f"needs zero_stage=3, got {self.zero_stage}: only ZeRO-3 "
                                                "partitions the weights it would offload (allowed: zero_stage=3, "
                                                "or offload_params=false)")


@dataclass
class EvalConfig:
    """Full-ranking evaluation: every catalogue item is a candidate."""

    ks: list[int] = field(default_factory=lambda: [10, 50, 200])
    """Cut-offs of HR@K and NDCG@K."""
    exclude_history: bool = False
    """Remove the other items of the user's history window from the candidates, as the published
    MovieLens tables do (HSTU's and RecBole's full-ranking code; configs/ml1m_*.yaml set it).
    Off by default: where users come back to items they had (re-purchases, re-listens), a
    repeated item must stay a candidate. The target itself is always ranked."""
    batch_size: int = 128
    """Users per evaluation batch."""
    item_chunk_size: int = 65536
    """Items scored at once for a batch of users: evaluation memory stays about
    batch_size x item_chunk_size scores, however large the catalogue."""

    def __post_init__(self):
        if self.item_chunk_size < 1:
            raise ConfigError("item_chunk_size", f"must be >= 1, got {self.item_chunk_size}")
        if not self.ks or min(self.ks) < 1:
            raise ConfigError("ks", f"must be a non-empty list of positive integers, got {self.ks}")


@dataclass
class ExperimentConfig:
    """Where runs, checkpoints and MLflow records go."""

    name: str = ""
    """Run name in Ray Train and MLflow. Empty: a new timestamped name per run. A rerun with the same
    name and storage_path resumes from that run's latest checkpoint."""
    storage_path: str = "runs"
    """Checkpoints and Ray Train state: local folder, or shared storage (s3://...) on a cluster.
    Relative paths are taken from the current directory."""
    tracking_uri: str = ""
    """MLflow tracking URI. Empty: $MLFLOW_TRACKING_URI, else a SQLite store mlflow.db in the
    current directory. A multi-node cluster needs a server every node reaches (http://...)."""
    mlflow_experiment: str = "interestformer"
    """MLflow experiment the run is recorded in."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept. Each also holds the best epoch's weights so far, so the best
    model survives however many are dropped."""
    system_metrics_interval_s: float = 10.0
    """Seconds between samples of CPU, memory, disk, network and NVIDIA GPU use, logged to the run
    as system/* metrics by MLflow's monitor in the rank-0 training worker (so they describe the
    machine it runs on, all of it). 0 disables."""
    verbose: bool = False
    """Stream every Ray process's output (training workers, Ray Data, libraries' warnings) to the
    console, as Ray does by default (--verbose). Off: the console shows the run's progress and
    results only; everything is still in Ray's log folder (/tmp/ray/session_latest/logs)."""

    def __post_init__(self):
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints", "must be >= 1")
        if self.system_metrics_interval_s < 0:
            raise ConfigError("system_metrics_interval_s", f"must be >= 0, got {self.system_metrics_interval_s}")


@dataclass
class TuneConfig:
    """A Ray Tune sweep over the training function (python -m tuning.sweep)."""

    search_space: dict[str, dict[str, list[Any]]] = field(default_factory=lambda: {
        "train.lr": {"loguniform": [5e-4, 5e-3]},
        "model.d_model": {"choice": [32, 64]},
    })
    """Config keys to search, each with one distribution: {choice: [values]}, {grid: [values]}
    (every value, times num_samples), {uniform: [low, high]}, {loguniform: [low, high]} or
    {randint: [low, high]} (both ends included). Any key of this schema may be searched, e.g.
    model.n_layers, model.dropout, data.num_negatives, data.max_seq_len,
    model.text.train_mode, train.zero_stage."""
    num_samples: int = 4
    """Trials sampled from the search space (with grid values: samples per grid point)."""
    search: Literal["random", "optuna"] = "random"
    """How trials are sampled: random (and grid), or optuna (a model-based TPE searcher that
    learns from finished trials; no grid values)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha: stop trials whose validation metric trails the others' at the same epoch
    (asynchronous successive halving); fifo: every trial runs all its epochs."""
    grace_period: int = 1
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: int = 2
    """ASHA keeps about 1 in reduction_factor trials at each rung."""
    max_concurrent_trials: int = 0
    """Trials run at once. 0: as many as the cluster's CPUs and GPUs hold, each trial taking
    train.num_workers workers plus the CPUs of its data pipelines (train.pipeline_workers)."""
    max_failures: int = 1
    """Times one trial is retried after an error (it resumes from its own checkpoint)."""
    fail_fast: bool = False
    """Stop the whole sweep at the first trial that fails for good."""
    registered_model: str = ""
    """MLflow registered model name of the best trial's model. Empty: the sweep's name."""

    def __post_init__(self):
        for key in ("num_samples", "grace_period"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.reduction_factor < 2:
            raise ConfigError("reduction_factor", f"must be >= 2, got {self.reduction_factor}")
        if self.max_concurrent_trials < 0 or self.max_failures < -1:
            raise ConfigError("max_concurrent_trials" if self.max_concurrent_trials < 0 else "max_failures",
                              "must be >= 0 (max_failures: >= -1, -1 retries forever)")
        for key, spec in self.search_space.items():
            where = f"search_space.{key}"
            if len(spec) != 1 or next(iter(spec)) not in SEARCH_DISTRIBUTIONS:
                raise ConfigError(where, f"must be one distribution, one of {list(SEARCH_DISTRIBUTIONS)}, "
                                         f"e.g. {{choice: [32, 64]}}; got {spec!r}")
            kind, values = next(iter(spec.items()))
            if kind in ("choice", "grid") and not values:
                raise ConfigError(f"{where}.{kind}", "needs at least one value")
            if kind in ("uniform", "loguniform", "randint"):
                numbers = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values)
                if not numbers or values[0] >= values[1] or (kind == "loguniform" and values[0] <= 0):
                    raise ConfigError(f"{where}.{kind}", f"must be [low, high] with low < high"
                                                         f"{' and low > 0' if kind == 'loguniform' else ''}, got {values!r}")
            if kind == "grid" and self.search == "optuna":
                raise ConfigError(f"{where}.grid", "optuna samples; it cannot search a grid: use choice")


SEARCH_DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


@dataclass
class JobConfig:
    """Everything a train, evaluate or sweep job reads."""

    data: DataConfig = field(default_factory=DataConfig)
    """Input logs and batching."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model sizes and encoders."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Workers, DeepSpeed, optimisation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    """Outputs and MLflow."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Sweeps."""

    def __post_init__(self):
        image = self.model.image
        if image.enabled and not image.pretrained_path and self.data.image_size % image.patch_size:
            raise ConfigError(
                "model.image.patch_size",
                f"must divide data.image_size={self.data.image_size}, got {image.patch_size}",
            )
        if self.data.max_seq_len < 2:
            raise ConfigError("data.max_seq_len", "must be >= 2")
        validation = ["val_mrr"] + [f"val_{m}@{k}" for k in self.eval.ks for m in ("hr", "ndcg")]
        if self.train.select_metric not in validation:
            raise ConfigError("train.select_metric", f"{self.train.select_metric!r} is not a validation metric of "
                                                     f"eval.ks={self.eval.ks}; one of {validation}")
        if self.train.shard_item_table and not self.model.use_item_id:
            raise ConfigError("train.shard_item_table", "the model has no item-ID table to shard "
                                                        "(model.use_item_id=false)")
        self._check_search_space()

    def _check_search_space(self):
        """Every searched key exists, and each value (or range end) it may take is valid there."""
        base = dataclasses.asdict(self)
        base["tune"]["search_space"] = {}
        for key, spec in self.tune.search_space.items():
            kind, values = next(iter(spec.items()))
            for value in values:
                trial = copy.deepcopy(base)
                try:
                    set_key(trial, key, int(value) if kind == "randint" else value)
                    JobConfig.from_dict(trial)
                except ConfigError as e:
                    raise ConfigError(f"tune.search_space.{key}", f"{value!r} is not a valid value: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobConfig":
        return build(cls, data, "")


def load_config(path: str | None = None, overrides: list[str] = ()) -> JobConfig:
    """Reads a YAML config (none: the demo defaults), applies `key.path=value` overrides,
    validates everything, and makes paths absolute: relative ones from the current directory,
    `pkg:<package>/<sub/path>` from an installed Python package's folder."""
    data = read_yaml(path) if path else {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep:
            raise ConfigError(override, "an override must look like section.key=value")
        set_key(data, key.strip(), yaml.safe_load(raw))
    cfg = JobConfig.from_dict(data)
    for section, key in (("data", "prepared_dir"), ("data", "events_path"), ("data", "items_path"),
                         ("experiment", "storage_path"), ("train", "init_from")):
        setattr(getattr(cfg, section), key, _absolute(getattr(getattr(cfg, section), key)))
    cfg.train.teachers = [_absolute(teacher) for teacher in cfg.train.teachers]
    for encoder in ("text", "image"):
        encoder_cfg = getattr(cfg.model, encoder)
        if encoder_cfg.pretrained_path:
            encoder_cfg.pretrained_path = _local_path(encoder_cfg.pretrained_path, f"model.{encoder}.pretrained_path")
    return cfg


def _absolute(path: str) -> str:
    """A path made absolute from the current directory; URIs and empty values as they are."""
    return os.path.abspath(path) if path and "://" not in path and not os.path.isabs(path) else path


def set_key(data: dict, key: str, value: Any):
    """Sets `section.key` (any depth) in a config's nested dict, creating sections as needed."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"'{part}' is not a section")
    node[leaf] = value


def read_yaml(path: str) -> dict:
    """A config file's sections. `base: other.yaml` (relative to the file) starts from that
    file's keys and lays this file's on top, section by section."""
    if not os.path.isfile(path):
        raise ConfigError("--config", f"{path}: no such file (the configs/ folder has examples)")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError("<file>", f"{path} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError("base", f"must be the path of another config file, got {base!r}")
    return _merge(read_yaml(os.path.join(os.path.dirname(os.path.abspath(path)), base)), data)


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def _local_path(value: str, key: str) -> str:
    """An existing local path from a config value (weights are never downloaded at run time)."""
    if value.startswith("pkg:"):
        package, _, inner = value[len("pkg:"):].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(key, f"no installed Python package {package!r} (from {value!r})")
        value = os.path.join(list(spec.submodule_search_locations)[0], inner)
    elif not os.path.isabs(value):
        value = os.path.abspath(value)
    if not os.path.exists(value):
        raise ConfigError(key, f"no such local file or folder: {value}")
    return value


def build(cls, data: Any, path: str):
    """Builds dataclass `cls` from `data`, checking keys and types; errors name the key path."""
    if not isinstance(data, dict):
        raise ConfigError(path or "<root>", f"must be a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(_join(path, unknown[0]), f"unknown key; allowed keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(_join(path, e.key), e.reason) from None


# A number in exponent form without a dot (1e-3): YAML 1.1, which PyYAML reads, takes it for text.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(hint, value: Any, path: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, path)
    if hint is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(path, f"must be a mapping with text keys, got {type(value).__name__} {value!r}")
        return {k: _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if hint is str and value is None:  # `key:` in a file, `--set key=` on the command line: nothing
        return ""
    raise ConfigError(path, f"must be {getattr(hint, '__name__', hint)}, got {type(value).__name__} {value!r}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def field_docs(cls=JobConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, doc) of every config key, for --help, read from the dataclasses'
    attribute docstrings."""
    import ast
    import inspect

    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # inherited fields too
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, following in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    rows = []
    for f in dataclasses.fields(cls):
        # The declared default, not an instance's value after __post_init__: a key whose default
        # is resolved later (train_mode `auto`) must not show what an empty config resolves it to.
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(value):
            rows += field_docs(type(value), _join(prefix, f.name))
        else:
            rows.append((_join(prefix, f.name), repr(value), docs.get(f.name, "")))
    return rows


def config_parser(prog: str, description: str, example: str = "train.zero_stage=3"):
    """The command line every job, sweep and benchmark shares: --config and repeatable --set,
    with every config key, its default and its doc in --help. Callers add their own flags."""
    import argparse

    keys = "\n".join(f"  {key} (default {default}): {doc}" for key, default, doc in field_docs())
    from interestformer.jobs.cli import program

    parser = argparse.ArgumentParser(prog=program(prog), description=description,
                                     epilog=f"config keys (YAML sections, or --set section.key=value):\n{keys}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file; without it, the demo config (all defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one config key, e.g. --set {example} (repeatable)")
    parser.add_argument("--verbose", action="append_const", dest="set", const="experiment.verbose=true",
                        help="also stream every Ray process's output and libraries' warnings to the console "
                             "(same as --set experiment.verbose=true)")
    return parser

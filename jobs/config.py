"""The one config schema of every job and sweep, and its loader.

A config file is YAML whose sections mirror `JobConfig`; every key is optional (the dataclass
defaults are the demo) and every key is checked before Ray starts: an unknown key, a wrong type,
an out-of-range value or an impossible combination raises ConfigError naming the key's path.
`--set section.key=value` on any job's command line overrides a key after the file is read.
A file may build on another with `base: other.yaml`: configs that differ in a few keys say only
those (see configs/ml1m_*.yaml).
"""

import dataclasses
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from interestformer import ConfigError
from interestformer.datasets.config import DataConfig
from interestformer.models.interest_former import ModelConfig

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    pipeline_workers: int = 1
    """Most Ray Data actors that pack batches (decode images, sample negatives) at once."""
    epochs: int = 6
    """Passes over the training sequences."""
    micro_batch_size: int = 32
    """Users per batch on each worker."""
    grad_accum_steps: int = 1
    """Micro-batches summed before each optimizer step."""
    lr: float = 2e-3
    """Peak learning rate of AdamW (after linear warm-up)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Optimizer steps of linear learning-rate warm-up."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + weights
    partitioned across workers."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision; bf16 is the choice on GPUs (Ampere or newer)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep the optimizer state in CPU memory and step it there with DeepSpeed's CPU
    Adam (compiled on first use). Frees GPU memory for a larger item table or batch; needs
    zero_stage 1, 2 or 3."""
    offload_params: bool = False
    """ZeRO-Infinity: also keep the partitioned weights in CPU memory between uses. Only stage 3
    partitions weights, so this needs zero_stage 3."""
    seed: int = 0
    """Seeds model initialisation and negative sampling."""
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
        for key in ("epochs", "micro_batch_size", "grad_accum_steps", "log_every_steps", "pipeline_workers"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.max_failures < -1:
            raise ConfigError("max_failures", f"must be >= -1, got {self.max_failures}")
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
    """Remove items already in the user's history window from the candidates (the published
    MovieLens tables do not)."""
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
    Relative paths are taken from the project folder."""
    tracking_uri: str = ""
    """MLflow tracking URI. Empty: $MLFLOW_TRACKING_URI, else a SQLite store mlflow.db in the
    project folder. A multi-node cluster needs a server every node reaches (http://...)."""
    mlflow_experiment: str = "interestformer"
    """MLflow experiment the run is recorded in."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept."""
    system_metrics_interval_s: float = 10.0
    """Seconds between samples of CPU, memory, disk, network and NVIDIA GPU use, logged to the run
    as system/* metrics by MLflow's monitor in the rank-0 training worker (so they describe the
    machine it runs on, all of it). 0 disables."""

    def __post_init__(self):
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints", "must be >= 1")
        if self.system_metrics_interval_s < 0:
            raise ConfigError("system_metrics_interval_s", f"must be >= 0, got {self.system_metrics_interval_s}")


@dataclass
class TuneConfig:
    """A Ray Tune sweep over the training function (python -m tuning.sweep)."""

    lr: list[float] = field(default_factory=lambda: [1e-3, 3e-3])
    """Learning rates tried (grid)."""
    d_model: list[int] = field(default_factory=lambda: [32, 64])
    """Model widths tried (grid); each trial also sets the encoders' widths to it."""
    max_concurrent_trials: int = 1
    """Trials run at once; each takes train.num_workers workers."""
    metric: str = "val_ndcg@10"
    """Validation metric the best trial is chosen by (higher is better)."""

    def __post_init__(self):
        if not self.lr or not self.d_model:
            raise ConfigError("lr" if not self.lr else "d_model", "needs at least one value")


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobConfig":
        return build(cls, data, "")


def load_config(path: str | None = None, overrides: list[str] = ()) -> JobConfig:
    """Reads a YAML config (none: the demo defaults), applies `key.path=value` overrides,
    validates everything, and makes paths absolute: relative ones from the project folder,
    `pkg:<package>/<sub/path>` from an installed Python package's folder."""
    data = read_yaml(path) if path else {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep:
            raise ConfigError(override, "an override must look like section.key=value")
        *parents, leaf = key.strip().split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"'{part}' is not a section")
        node[leaf] = yaml.safe_load(raw)
    cfg = JobConfig.from_dict(data)
    for section, key in (("data", "prepared_dir"), ("data", "events_path"), ("data", "items_path"),
                         ("experiment", "storage_path")):
        value = getattr(getattr(cfg, section), key)
        if value and "://" not in value and not os.path.isabs(value):
            setattr(getattr(cfg, section), key, os.path.join(PROJECT_DIR, value))
    for encoder in ("text", "image"):
        encoder_cfg = getattr(cfg.model, encoder)
        if encoder_cfg.pretrained_path:
            encoder_cfg.pretrained_path = _local_path(encoder_cfg.pretrained_path, f"model.{encoder}.pretrained_path")
    return cfg


def read_yaml(path: str) -> dict:
    """A config file's sections. `base: other.yaml` (relative to the file) starts from that
    file's keys and lays this file's on top, section by section."""
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
        value = os.path.join(PROJECT_DIR, value)
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
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
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
    rows, defaults = [], cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows += field_docs(type(value), _join(prefix, f.name))
        else:
            rows.append((_join(prefix, f.name), repr(value), docs.get(f.name, "")))
    return rows

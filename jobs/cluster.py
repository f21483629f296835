"""Where every job starts or joins Ray (start_ray), and how a training run is sized for it:
the CPUs it keeps for Ray Data beside its workers (data_cpus), and the check that it fits a
running cluster before it takes anything (check_cluster_fits)."""

import logging
import math
import os

import ray
import ray.data
import torch

from interestformer.errors import ConfigError
from interestformer.jobs.config import JobConfig
from interestformer.jobs.progress import quiet_console


_USER_STARTUP_CONCURRENCY = "RAY_worker_maximum_startup_concurrency" in os.environ

# Ray Train's preemption watcher polls for nodes about to be reclaimed (spot instances). A local Ray
# has one node, which goes when the job goes; the watcher would be one more Python process, about 3
# CPU-seconds of a run's start on 2 cores. Read by the training controller, a Ray actor of the job;
# one the user set wins.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def start_ray(local_cpus: float = 0, verbose: bool = False, env_vars: dict | None = None) -> bool:
    """Where every job starts or joins Ray. Joins the cluster the job was submitted to
    (RAY_ADDRESS) and returns True; else starts a new local Ray in this process, with `local_cpus`
    logical CPUs (at least this machine's), and returns False; does nothing when Ray is already
    up. The workers' output (and the libraries' inside them) stays in Ray's log folder unless
    verbose."""
    quiet_console(verbose)
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
        return True
    # address="local": a new Ray for this job, even where `ray start` left a cluster running. The
    # dashboard (on 127.0.0.1) serves the State API, through which Ray Train removes the placement
    # group of a run whose controller is gone; without it every finished Tune trial keeps its
    # workers' CPUs and the next trial waits forever.
    num_cpus = max(os.cpu_count() or 1, math.ceil(local_cpus))
    # The raylet expects at most this many worker processes to start at once (by default the cores)
    # and warns on the console at 4x. A run's workers, Ray Data actors and helpers exceed 4x 2 cores
    # as a matter of course; tell it the CPUs it was given instead. (A RAY_ variable is how Ray
    # takes its own settings; one the user set wins, one an earlier local Ray set is replaced.)
    if not _USER_STARTUP_CONCURRENCY:
        os.environ["RAY_worker_maximum_startup_concurrency"] = str(num_cpus)
    own_settings = {name: value for name, value in LOCAL_RAY_ENV.items() if name not in os.environ}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": {**own_settings, **(env_vars or {})}}, **quiet)
    return False


def ensure_ray(cfg: JobConfig, concurrent_runs: int = 1, driver_cpus: float = 0.0):
    """start_ray for training runs. Locally, Ray is told of enough logical CPUs for the training
    workers AND the Ray Data pipelines that feed them (data_cpus), and `driver_cpus` for what
    drives each run (a Tune trial), for each of `concurrent_runs` trainings: on a 2-core machine
    the workers would otherwise take every CPU and the pipelines would wait forever for one. On a
    cluster, fails naming the key when the runs could never all be scheduled."""
    if cfg.train.use_gpu and not os.environ.get("RAY_ADDRESS"):  # a local Ray gets this machine's GPUs only
        gpus = torch.cuda.device_count()
        if gpus < cfg.train.num_workers:
            raise ConfigError("train.num_workers", f"{cfg.train.num_workers} GPU workers need as many GPUs; "
                                                   f"this machine has {gpus} (set train.use_gpu=false for CPUs)")
    # One progress bar (training) rather than one per Ray Data operator of every pass.
    ray.data.DataContext.get_current().enable_progress_bars = False
    needed = concurrent_runs * (cfg.train.num_workers * cfg.train.cpus_per_worker + data_cpus(cfg) + driver_cpus)
    if start_ray(needed, cfg.experiment.verbose, worker_env(cfg)):
        check_cluster_fits(cfg, concurrent_runs, driver_cpus)


def data_cpus(cfg: JobConfig) -> int:
    """The CPUs a training run keeps free for Ray Data. Two pipelines run at once: the next
    epoch's starts while the workers evaluate. The training pipeline holds its windowing tasks
    (train.pipeline_workers) and a read task, which backpressure can pause with their CPUs held;
    an evaluation pipeline needs a CPU for its read task (its packing tasks take none). With
    fewer, one pipeline can hold a CPU the other waits for, and the run hangs. No option makes
    these tasks CPU-free: Ray 2.60's Parquet reads start 1-CPU sampling (or listing) tasks and a
    strict repartition takes no remote arguments, so on a machine whose cores the workers take,
    only a local Ray told of more CPUs schedules them (docs/engineering-notes.md)."""
    return cfg.train.pipeline_workers + 2


def check_cluster_fits(cfg: JobConfig, concurrent_runs: int = 1, driver_cpus: float = 0.0):
    """On a running cluster, fails before taking anything when the training workers could never
    all be scheduled: Ray Train would otherwise wait for them until its start-up timeout.

    The ceiling is the autoscaler's (its node types times their max counts) when the cluster has
    one, else what the cluster holds now. Besides the workers, data_cpus must stay free for Ray
    Data."""
    from ray._private.state import state

    per_worker = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1.0} if cfg.train.use_gpu else {})}
    needed = {name: concurrent_runs * cfg.train.num_workers * amount for name, amount in per_worker.items()}
    needed["CPU"] += concurrent_runs * (data_cpus(cfg) + driver_cpus)
    autoscaler = state.get_cluster_config()
    if autoscaler is not None and autoscaler.node_group_configs:
        ceiling, source = state.get_max_resources_from_cluster_config() or {}, "the autoscaler's limit"
        # (resources, how many such nodes there may be; -1: no limit)
        shapes = [(dict(group.resources), group.max_count) for group in autoscaler.node_group_configs]
    else:
        ceiling, source = ray.cluster_resources(), "this cluster, which has no autoscaler"
        shapes = [(node["Resources"], 1) for node in ray.nodes() if node["Alive"]]
    for name, amount in per_worker.items():
        if not any(shape.get(name, 0) >= amount for shape, _ in shapes):
            key = "train.cpus_per_worker" if name == "CPU" else "train.use_gpu"
            raise ConfigError(key, f"one training worker needs {amount:g} {name}, more than any node of "
                                   f"{source} has ({max((s.get(name, 0) for s, _ in shapes), default=0):g})")
    if cfg.train.placement_strategy == "STRICT_SPREAD":  # one worker a node: there must be enough nodes
        nodes = [count for shape, count in shapes if all(shape.get(n, 0) >= a for n, a in per_worker.items())]
        if -1 not in nodes and sum(nodes) < cfg.train.num_workers:
            raise ConfigError("train.placement_strategy", f"STRICT_SPREAD puts each of the {cfg.train.num_workers} "
                                                          f"workers on a node of its own; {source} has at most "
                                                          f"{sum(nodes)} node(s) that can hold one")
    for name, amount in needed.items():
        if amount > ceiling.get(name, 0):
            raise ConfigError("train.num_workers", f"{concurrent_runs} run(s) of {cfg.train.num_workers} workers "
                                                   f"x {per_worker}, plus {data_cpus(cfg) + driver_cpus:g} CPU each for the data pipelines and driver, need "
                                                   f"{amount:g} {name}; {source} has at most {ceiling.get(name, 0):g}")


def worker_env(cfg: JobConfig) -> dict:
    """The environment of every Ray worker process of a training run."""
    # An unreachable tracking server costs a worker seconds, not MLflow's default minutes of retries.
    env = {"TOKENIZERS_PARALLELISM": "false", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    if not cfg.train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator with gloo, without the warning
    return env

"""The one place that talks to MLflow.

The driver opens the run (params, tags, config artifacts) before training; the rank-0 worker logs
per-step and per-epoch metrics into that same run by id; the driver logs the final metrics and
closes it. Workers use MlflowClient with an explicit run id, so no process relies on MLflow's
global "active run".

The embedded default store is SQLite in the project folder (MLflow's file store is in maintenance
mode); its artifacts go to mlartifacts/ beside it, an absolute location, so workers whose working
directory is elsewhere write to the same place.
"""

import json
import os
import platform
import subprocess
import sys
import time

from interestformer.jobs.config import PROJECT_DIR, JobConfig


def tracking_uri(cfg: JobConfig) -> str:
    return (
        cfg.experiment.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI", "")
        or f"sqlite:///{os.path.join(PROJECT_DIR, 'mlflow.db')}"
    )


def ui_command(uri: str) -> str:
    """The exact command that browses this store (the mlflow beside this Python, i.e. the venv's)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    beside = os.path.join(os.path.dirname(sys.executable), "mlflow")
    mlflow = beside if os.path.exists(beside) else "mlflow"
    return f"{mlflow} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = str(value)
    return flat


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:"):
        artifacts = "file://" + os.path.join(os.path.dirname(uri.removeprefix("sqlite:///")) or PROJECT_DIR, "mlartifacts")
    return client.create_experiment(name, artifact_location=artifacts)


def start_parent_run(cfg: JobConfig, run_name: str) -> str:
    """Opens the parent run of a sweep (its trials are child runs); returns its id."""
    uri = tracking_uri(cfg)
    run = _client(uri).create_run(experiment_id(uri, cfg.experiment.mlflow_experiment), run_name=run_name,
                                  tags={"git_commit": _git_commit(), "kind": "sweep"})
    log_params(uri, run.info.run_id, flatten({"tune": cfg.to_dict()["tune"]}))
    return run.info.run_id


def start_run(cfg: JobConfig, ds_config: dict, data_report: dict, run_name: str, parent_run_id: str = "") -> str:
    """Opens the run of a training job and records what defines it; returns its id."""
    uri = tracking_uri(cfg)
    client = _client(uri)
    tags = {
        "git_commit": _git_commit(),
        "ray_version": _version("ray"),
        "deepspeed_version": _version("deepspeed"),
        "torch_version": _version("torch"),
        "world_size": str(cfg.train.num_workers),
        "zero_stage": str(cfg.train.zero_stage),
        "precision": cfg.train.precision,
        "host_python": platform.python_version(),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(uri, cfg.experiment.mlflow_experiment), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    log_params(uri, run_id, flatten(cfg.to_dict()))
    client.log_text(run_id, json.dumps(cfg.to_dict(), indent=1), "config/resolved_config.json")
    client.log_text(run_id, json.dumps(ds_config, indent=1), "config/deepspeed_config.json")
    client.log_text(run_id, json.dumps(data_report, indent=1), "data/prepare_report.json")
    log_metrics(uri, run_id, {f"data/{k}": float(v) for k, v in data_report.items()}, step=0)
    return run_id


def log_params(uri: str, run_id: str, params: dict[str, str]):
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    client = _client(uri)
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _client(uri).log_batch(run_id, metrics=[Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items()])


def log_text(uri: str, run_id: str, text: str, artifact_file: str):
    _client(uri).log_text(run_id, text, artifact_file)


def end_run(uri: str, run_id: str, status: str = "FINISHED"):
    _client(uri).set_terminated(run_id, status)


def run_data(uri: str, run_id: str):
    """The run's params, metrics (latest values) and tags."""
    return _client(uri).get_run(run_id).data


def metric_history(uri: str, run_id: str, key: str) -> list[float]:
    return [m.value for m in _client(uri).get_metric_history(run_id, _metric_key(key))]


def _metric_key(key: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; '@' is written as '_at_'.
    return key.replace("@", "_at_")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"

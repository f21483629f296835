"""The one place that talks to MLflow.

The driver opens the run (params, tags, config artifacts) before training; the rank-0 worker logs
per-step and per-epoch metrics into that same run by id; the driver logs the final metrics and
the trained model (log_model; jobs/serving.py is what MLflow calls to serve it), and closes the
run. Workers use MlflowClient with an explicit run id, so no process relies on MLflow's global
"active run"; the rank-0 worker also runs MLflow's system-metrics monitor on that run.

The embedded default store is SQLite in the current directory (MLflow's file store is in maintenance
mode); its artifacts go to mlartifacts/ beside it, an absolute location, so workers whose working
directory is elsewhere write to the same place.
"""

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from interestformer.datasets.storage import local_folder
from interestformer.jobs.config import JobConfig


def tracking_uri(cfg: JobConfig) -> str:
    return (
        cfg.experiment.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI", "")
        or f"sqlite:///{os.path.abspath('mlflow.db')}"
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


# Credentials never reach MLflow, whatever a config or path holds: the password of a URI's
# user:password@, secret-named query parameters (S3/GCS/Azure signed URLs), AWS access key ids.
SECRETS = [
    (re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@"), "***@"),
    (re.compile(r"(?i)((?:secret|token|password|passwd|key|signature|sig|credential)[a-z_-]*=)[^&\s\"']+"), r"\1***"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "***"),
]


def redact(text: str) -> str:
    for pattern, replacement in SECRETS:
        text = pattern.sub(replacement, text)
    return text


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached."""


def check_reachable(uri: str, timeout_s: float = 10.0):
    """Fails fast, before any Ray resource is taken, when the tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as e:
        problem = str(getattr(e, "reason", e))
    raise TrackingUnavailable(
        f"MLflow tracking server {redact(uri)} is unreachable ({problem}). Start it (README: MLflow server), "
        "or pass another --tracking-uri; nothing was started.")


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def open_store(uri: str) -> threading.Thread:
    """Opens uri's MLflow store in a thread, which it returns: importing MLflow and opening a store
    (a new SQLite file creates its tables) takes seconds that can pass while Ray starts and the data
    is prepared. Join the thread before this process's first other call to MLflow, which then finds
    the store open (MLflow keeps one per URI); opened twice at once, a new file's tables could be
    created twice. A store that fails to open fails again, with its error, at that first call."""
    def open_quietly():
        try:
            _client(uri)
        except Exception:  # reported by the job's own first call
            pass

    thread = threading.Thread(target=open_quietly, name="mlflow-store", daemon=True)
    thread.start()
    return thread


def experiment_id(uri: str, name: str) -> str:
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:"):
        artifacts = "file://" + os.path.join(os.path.dirname(os.path.abspath(uri.removeprefix("sqlite:///"))), "mlartifacts")
    return client.create_experiment(name, artifact_location=artifacts)


def start_parent_run(cfg: JobConfig, run_name: str) -> str:
    """Opens the parent run of a sweep (its trials are child runs), or reopens the one of the same
    sweep (name and storage) when it is resumed; returns its id."""
    uri = tracking_uri(cfg)
    client = _client(uri)
    sweep_path = redact(os.path.join(cfg.experiment.storage_path, run_name))
    experiment = experiment_id(uri, cfg.experiment.mlflow_experiment)
    earlier = _reopen_run(client, experiment, "sweep_path", sweep_path)
    if earlier:
        return earlier.info.run_id
    run = client.create_run(experiment, run_name=run_name,
                            tags={"git_commit": _git_commit(), "kind": "sweep", "sweep_path": sweep_path,
                                  "ray_version": _version("ray")})
    log_params(uri, run.info.run_id, flatten({"tune": cfg.to_dict()["tune"]}))
    client.log_text(run.info.run_id, redact(json.dumps(cfg.to_dict(), indent=1)), "config/sweep_config.json")
    return run.info.run_id


def _reopen_run(client, experiment: str, tag: str, value: str):
    """The latest run of the experiment whose `tag` is `value`, set RUNNING again; None if none."""
    earlier = client.search_runs([experiment], f"tags.{tag} = '{value}'", order_by=["attributes.start_time DESC"],
                                 max_results=1)
    if not earlier:
        return None
    client.update_run(earlier[0].info.run_id, status="RUNNING")
    return earlier[0]


def child_run(uri: str, parent_run_id: str, run_name: str) -> str:
    """The id of a sweep's child run by name."""
    runs = _client(uri).search_runs(
        [_client(uri).get_run(parent_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.mlflow.runName = '{run_name}'", max_results=1)
    if not runs:
        raise LookupError(f"no child run {run_name!r} under {parent_run_id}")
    return runs[0].info.run_id


def close_unfinished_children(uri: str, parent_run_id: str, failed: set[str]):
    """Closes the child runs a sweep's trials left open: those named in `failed` (trials Tune
    reports as errors) as FAILED, the others as KILLED, tagged stopped_early (a scheduler such
    as ASHA stopped them)."""
    client = _client(uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    for run in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                                "attributes.status = 'RUNNING'"):
        if run.info.run_name in failed:
            client.set_terminated(run.info.run_id, "FAILED")
        else:
            client.set_tag(run.info.run_id, "stopped_early", "true")
            client.set_terminated(run.info.run_id, "KILLED")


def register_model(uri: str, run_id: str, name: str) -> str:
    """Registers the run's logged model under `name`; returns 'name/version'."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
    return f"{name}/{version.version}"


def set_tags(uri: str, run_id: str, tags: dict[str, str]):
    for key, value in tags.items():
        _client(uri).set_tag(run_id, key, redact(str(value)))


def start_run(cfg: JobConfig, ds_config: dict, data_report: dict, run_name: str, parent_run_id: str = "") -> str:
    """Opens the run of a training job and records what defines it; returns its id.

    A job named like an earlier one (experiment.name) in the same storage_path resumes that Ray
    Train run from its latest checkpoint, and continues its MLflow run too: one MLflow run per
    training, however often it was stopped and started. Params are immutable in MLflow, so a
    resume logs only new keys; the ones it changed are listed in config/resume_<n>.json."""
    uri = tracking_uri(cfg)
    client = _client(uri)
    train_run_path = redact(os.path.join(cfg.experiment.storage_path, run_name))  # Ray Train's run folder
    tags = {
        "git_commit": _git_commit(),
        "ray_version": _version("ray"),
        "deepspeed_version": _version("deepspeed"),
        "torch_version": _version("torch"),
        "world_size": str(cfg.train.num_workers),
        "zero_stage": str(cfg.train.zero_stage),
        "precision": cfg.train.precision,
        "host_python": platform.python_version(),
        "train_run_path": train_run_path,
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    experiment = experiment_id(uri, cfg.experiment.mlflow_experiment)
    earlier = _reopen_run(client, experiment, "train_run_path", train_run_path) if cfg.experiment.name else None
    params = {key: redact(value)[:6000] for key, value in flatten(cfg.to_dict()).items()}
    if earlier:
        run_id, logged = earlier.info.run_id, earlier.data.params
        resumes = int(earlier.data.tags.get("resumes", "0")) + 1
        for key, value in {**tags, "resumes": str(resumes)}.items():
            client.set_tag(run_id, key, value)
        log_params(uri, run_id, {key: value for key, value in params.items() if key not in logged})
        changed = {key: {"was": logged[key], "now": value} for key, value in params.items()
                   if key in logged and logged[key] != value}
        client.log_text(run_id, json.dumps({"changed_params": changed}, indent=1), f"config/resume_{resumes}.json")
    else:
        run_id = client.create_run(experiment, run_name=run_name, tags=tags).info.run_id
        log_params(uri, run_id, params)
    client.log_text(run_id, redact(json.dumps(cfg.to_dict(), indent=1)), "config/resolved_config.json")
    client.log_text(run_id, json.dumps(ds_config, indent=1), "config/deepspeed_config.json")
    client.log_text(run_id, json.dumps(data_report, indent=1), "data/prepare_report.json")
    log_metrics(uri, run_id, {f"data/{k}": float(v) for k, v in data_report.items()}, step=0)
    return run_id


def log_params(uri: str, run_id: str, params: dict[str, str]):
    from mlflow.entities import Param

    items = [Param(k, redact(v)[:6000]) for k, v in params.items()]
    client = _client(uri)
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _client(uri).log_batch(run_id, metrics=[Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items()])


def log_training_data(uri: str, run_id: str, name: str, source: str, digest: str, profile: dict):
    """Records the training data as the run's dataset input (context "training"): where it was
    read from (credentials redacted), a digest that changes whenever the data does, and `profile`
    (aggregate counts). The source is written as MLflow's own file-system sources write theirs
    ({"uri": ...}, of type "local", "s3", "gs", ...), for any scheme our data layer reads."""
    from urllib.parse import urlparse

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source = redact(source)
    scheme = urlparse(source).scheme
    dataset = Dataset(name=name, digest=digest, source_type=scheme if scheme not in ("", "file") else "local",
                      source=json.dumps({"uri": source}), profile=json.dumps(profile))
    _client(uri).log_inputs(run_id, [DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])])


def start_system_metrics(uri: str, run_id: str, interval_s: float):
    """Starts MLflow's system-metrics monitor on this machine: a thread that logs CPU, memory,
    disk, network (and, with nvidia-ml-py, GPU) use to the run as system/* metrics every
    interval_s seconds until `.finish()` is called on what this returns or the run ends. None
    when interval_s is 0, or when the monitor cannot start (training never waits for MLflow).

    The tracking URI is passed explicitly: a Ray worker has no mlflow.set_tracking_uri of its
    own. Steps continue after the run's last system/* step, so a worker restarted from a
    checkpoint adds to the series instead of writing over it."""
    if interval_s <= 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=uri)
    except Exception as e:  # any failure of the tracking server; training goes on
        print(f"System metrics not logged: {type(e).__name__}: {redact(str(e))}", file=sys.stderr)
        return None
    monitor.start()
    return monitor


def log_figure(uri: str, run_id: str, figure, artifact_file: str):
    """A matplotlib figure as an image artifact (the format follows artifact_file's extension)."""
    _client(uri).log_figure(run_id, figure, artifact_file)


class MetricsOutbox:
    """Metric logging that survives a tracking-server outage mid-run (the training worker's).

    A batch that cannot be sent waits, with its original timestamp and step, and is sent before
    the next one; training never stops for MLflow. What was late is reported in the run itself:
    tracking/delayed_batches and tracking/outage_seconds (the longest wait)."""

    def __init__(self, uri: str, run_id: str, max_waiting: int = 10_000):
        self.uri, self.run_id, self.max_waiting = uri, run_id, max_waiting
        self.waiting: list = []
        self.delayed = self.dropped = 0
        self.outage_start = None
        self.longest_outage = 0.0

    def log(self, metrics: dict[str, float], step: int):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.waiting += [Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items()]
        if len(self.waiting) > self.max_waiting:  # bounded: the oldest give way, and are counted
            self.dropped += len(self.waiting) - self.max_waiting
            self.waiting = self.waiting[-self.max_waiting:]
        self.flush()

    def unsent(self) -> dict:
        """What still waits, for a process that outlives this one to send (the driver, through
        log_unsent): each metric as (key, value, timestamp, step), and the gap so far."""
        return {"metrics": [(m.key, m.value, m.timestamp, m.step) for m in self.waiting], "gap": self.gap()}

    def gap(self) -> dict[str, float]:
        """The outage report: batches that had to wait, the longest wait so far, metrics dropped."""
        ongoing = time.time() - self.outage_start if self.outage_start is not None else 0.0
        return {"tracking/delayed_batches": self.delayed,
                "tracking/outage_seconds": max(self.longest_outage, ongoing),
                "tracking/dropped_metrics": self.dropped}

    def flush(self) -> bool:
        """Sends everything waiting; False when the server is still unreachable."""
        try:
            _log_metric_batches(self.uri, self.run_id, self.waiting)
        except Exception as e:  # any failure of the tracking server; training goes on
            if self.outage_start is None:
                self.outage_start = time.time()
                print(f"MLflow unreachable ({type(e).__name__}); metrics wait and are retried", file=sys.stderr)
            self.delayed += 1
            return False
        self.waiting = []
        if self.outage_start is not None:
            self.longest_outage = max(self.longest_outage, time.time() - self.outage_start)
            self.outage_start = None
            log_metrics(self.uri, self.run_id, self.gap(), step=0)
        return True


def log_model(uri: str, run_id: str, artifacts_folder: str, step: int = 0) -> str:
    """Logs serving artifacts (a folder, local or in object storage, as serving.export or a training
    run's workers write them) as the run's MLflow model "model", a recommender (jobs/serving.py says
    what it holds and takes); returns the model's id. It loads in any process of this environment
    with mlflow.pyfunc.load_model(f"runs:/{run_id}/model")."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    from interestformer.jobs import serving

    client = _client(uri)
    folder = local_folder(artifacts_folder)
    artifacts = {name: os.path.join(folder, name) for name in sorted(os.listdir(folder))}
    with tempfile.TemporaryDirectory() as out:
        experiment = client.get_run(run_id).info.experiment_id
        model = client.create_logged_model(experiment, name="model", source_run_id=run_id)
        saved = os.path.join(out, "model")
        mlflow.pyfunc.save_model(saved, python_model=serving.MODEL_CODE, artifacts=artifacts,
                                 code_paths=serving.package_code(os.path.join(out, "code")), signature=serving.signature(serving.item_id_type(artifacts)),
                                 input_example=serving.input_example(artifacts),
                                 pip_requirements=serving.requirements(),
                                 mlflow_model=mlflow.models.Model(model_id=model.model_id, run_id=run_id))
        client.log_model_artifacts(model.model_id, saved)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def log_unsent(uri: str, run_id: str, unsent: dict):
    """Logs what a worker's MetricsOutbox could not send before its process ended (see unsent)."""
    from mlflow.entities import Metric

    _log_metric_batches(uri, run_id, [Metric(*fields) for fields in unsent["metrics"]])
    log_metrics(uri, run_id, unsent["gap"], step=0)


def _log_metric_batches(uri: str, run_id: str, metrics: list):
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        _client(uri).log_batch(run_id, metrics=metrics[i : i + 1000])


def log_text(uri: str, run_id: str, text: str, artifact_file: str):
    _client(uri).log_text(run_id, redact(text), artifact_file)


def end_run(uri: str, run_id: str, status: str = "FINISHED"):
    _client(uri).set_terminated(run_id, status)


def run_data(uri: str, run_id: str):
    """The run's params, metrics (latest values) and tags."""
    return _client(uri).get_run(run_id).data


def metric_history(uri: str, run_id: str, key: str) -> list[float]:
    return [m.value for m in metric_points(uri, run_id, key)]


def metric_points(uri: str, run_id: str, key: str) -> list:
    """Every logged value of a metric, as MLflow's Metric (value, timestamp in ms, step), in the
    order logged."""
    return sorted(_client(uri).get_metric_history(run_id, _metric_key(key)), key=lambda m: (m.step, m.timestamp))


def _metric_key(key: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; '@' is written as '_at_'.
    return key.replace("@", "_at_")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"

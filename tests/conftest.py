"""Shared fixtures: one real local Ray for the in-process tests, a real MLflow server on 127.0.0.1,
and where test output goes."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
import ray

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(PROJECT_DIR), "shared", "data")
TEST_OUTPUT = os.path.join(PROJECT_DIR, "test-output")  # screenshots and the like; gitignored


def pytest_report_header(config):
    """How busy the machine is as the suite starts: the suite's time follows that as much as the
    code (00e7f62 passed in 17 minutes on a quiet 2-core machine, and took 50 in CI with its set-up)."""
    one, five, fifteen = os.getloadavg()
    return f"machine: {os.cpu_count()} CPUs, load average {one:.1f} {five:.1f} {fifteen:.1f} (1, 5, 15 min)"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray, started once; logical CPUs above the 2 physical ones so that training
    workers and the Ray Data pipeline both get scheduled (see jobs.cluster.ensure_ray)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_prepared_dir(tmp_path_factory) -> str:
    """Where configs/tiny.yaml's data is prepared once for the tests that train on it unchanged (or
    with batching keys only): prepare() finds it there by its fingerprint and reuses it, as it does
    for a user's second run. The tests of preparation itself prepare their own."""
    return str(tmp_path_factory.mktemp("tiny-prepared"))


def one_epoch_of_training_batches(prepared, batch_size: int, max_seq_len: int, num_negatives: int | None = 0,
                                  text: bool = False, image: bool = False, cold_fraction: float = 0.0,
                                  train_since: int = 0, new_user_fraction: float = 0.0,
                                  group_by_length: bool = False) -> list[dict]:
    """The whole training split's batches for one epoch, as a worker packs its share (seed 0)."""
    from interestformer.datasets.pipeline import TrainingBatches, training_batches, training_windows

    rows = training_windows(prepared, batch_size, max_seq_len, 1, cold_fraction, train_since, new_user_fraction,
                            group_by_length)
    return list(training_batches(rows, TrainingBatches(prepared, num_negatives, text, image, 0, cold_fraction),
                                 batch_size))


def fresh_checkpoint(cfg, folder) -> tuple[object, str]:
    """(prepared data, checkpoint folder) of cfg's freshly initialised model (seed 0), saved into
    `folder` as a training checkpoint is, without Ray Train; prepares cfg's data (a real Ray Data
    job: needs Ray). Hashed item IDs get their map loaded, as training does."""
    import torch

    from interestformer.datasets.pipeline import catalogue_ids, id_buckets
    from interestformer.datasets.prepare import prepare
    from interestformer.jobs.distributed import write_weights_and_state
    from interestformer.jobs.train import data_spec
    from interestformer.models.interest_former import InterestFormer

    prepared = prepare(cfg.data, tokenizer_path=cfg.model.text.pretrained_path)
    spec = data_spec(prepared, cfg)
    torch.manual_seed(0)
    model = InterestFormer(cfg.model, spec)
    if cfg.model.item_id_buckets:
        buckets = id_buckets(catalogue_ids(prepared), cfg.model.item_id_buckets)
        model.item_encoder.load_id_buckets(torch.from_numpy(buckets))
    checkpoint = os.path.join(folder, "checkpoint")
    os.makedirs(checkpoint)
    write_weights_and_state(checkpoint, model.state_dict(), {
        "epoch": 0, "step": 0, "config": cfg.to_dict(), "spec": vars(spec), "prepared_path": prepared.path,
        "world_size": 1}, catalogue_ids(prepared))
    return prepared, checkpoint


@pytest.fixture
def mlflow_uri(tmp_path):
    """A fresh SQLite MLflow store per test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def native_cpu_precision() -> str:
    """What train.precision auto should become on this machine's CPU: bf16 where it has AVX512-BF16
    or AMX (Linux CPU flags), else fp32."""
    with open("/proc/cpuinfo") as f:
        return "bf16" if {"avx512_bf16", "amx_bf16"} & set(f.read().split()) else "fp32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: str, port: int, artifacts: str = "") -> subprocess.Popen:
    """`mlflow server` (the venv's) on 127.0.0.1, in a process group of its own; returns once it answers.
    Artifacts go through it to `artifacts` (default: mlartifacts/ in the current folder)."""
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log, log_path = tempfile.mkstemp(prefix="mlflow-server-", suffix=".log")
    server = subprocess.Popen([mlflow, "server", "--backend-store-uri", store, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1",
                               *(["--artifacts-destination", artifacts] if artifacts else [])],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    os.close(log)  # the server writes to its own copy
    deadline = time.time() + 120
    while time.time() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    exited = server.poll()
    with contextlib.suppress(ProcessLookupError):  # an exited server's group may be gone
        stop_server(server)
    raise RuntimeError(f"mlflow server did not start ({'exit status ' + str(exited) if exited is not None else 'running'},"
                       f" port {port}); its output, {log_path}:\n{server_output(log_path)}")


def server_output(path: str, chars: int = 3000) -> str:
    """The end of a server's console log, for a failure's message: what a silent start-up hid."""
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def stop_server(server: subprocess.Popen):
    """Kills the server and its workers: the process group start_server made, nothing else."""
    os.killpg(server.pid, 9)
    server.wait()


def stop_ray_node(node: subprocess.Popen):
    """Ends a `ray start --block` node (ray_node_command, in a session of its own) at once: SIGKILL
    to its process group, whose reaper and workers go with it. On SIGTERM the node would stop each
    Ray process gracefully, about 30 s a node here, and no test needs a graceful stop."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)
    node.wait()


BIN = os.path.dirname(sys.executable)


def ray_node_command(*args: str) -> list[str]:
    """`ray start --block` of one node on 127.0.0.1 with `args`. Every port is its own: the in-process
    Ray of other tests already holds Ray's default agent ports, and a node whose dashboard agent cannot
    bind never accepts a job. Ending the process stops exactly this node (`ray stop` would stop every
    Ray on the machine)."""
    own_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    return [f"{BIN}/ray", "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
            *own_ports, *args]


def ray_env(**extra: str) -> dict:
    """The environment of `ray start` and the job CLI: token authentication on both sides (Ray 2.60's
    CLI does not turn it on by itself), and no RAY_ADDRESS of another cluster. `ray start --head`
    refuses to start without a token and never makes one, so ~/.ray/auth_token is made here when a
    fresh machine has none."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "token",
           **extra}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([f"{BIN}/ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    return env


def wait_for_job_api(address: str, env: dict, head: subprocess.Popen, log: str):
    """Returns once the head at `address` (its dashboard) answers the Jobs API."""
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run([f"{BIN}/ray", "job", "list", "--address", address], env=env,
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return
        assert head.poll() is None, open(log).read()
        time.sleep(2)
    pytest.fail("the Ray head did not answer: " + open(log).read())


def committable_copy(dest) -> str:
    """A copy of the files git would commit (tracked, or new and not ignored), as a fresh clone
    would hold them: a package built in the checkout itself would reuse its build/ folder."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=PROJECT_DIR,
                           check=True, capture_output=True, text=True).stdout.splitlines()
    for name in files:
        if os.path.isfile(os.path.join(PROJECT_DIR, name)):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy(os.path.join(PROJECT_DIR, name), os.path.join(dest, name))
    return str(dest)


@pytest.fixture(scope="session")
def job_package(tmp_path_factory) -> str:
    """The package alone (no dependencies) in a folder, as the README has users make it for
    `ray job submit`: `pip install --no-deps --target build/job .`; returns its interestformer/."""
    root = tmp_path_factory.mktemp("job-package")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                    "--target", str(root / "job"), committable_copy(root / "source")], check=True, timeout=300)
    return str(root / "job" / "interestformer")


def submit_job(address: str, env: dict, package: str, arguments: list[str], options: tuple = ()) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . --runtime-env-json '{"py_modules": [package]}' [options] --
    python -m interestformer.jobs.train arguments` from the project folder: the code travels with
    the job, as on a cluster whose nodes have only the dependencies installed."""
    command = [f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", ".",
               "--runtime-env-json", json.dumps({"py_modules": [package]}), *options, "--",
               "python", "-m", "interestformer.jobs.train", *arguments]
    for _ in range(30):  # the head's job agent comes up a little after its dashboard answers
        run = subprocess.run(command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=1100)
        if "No available agent to submit job" not in run.stderr:
            return run
        time.sleep(2)
    return run

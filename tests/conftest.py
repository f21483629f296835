"""Shared fixtures: one real local Ray for the in-process tests, a real MLflow server on 127.0.0.1,
and where test output goes."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import ray

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(PROJECT_DIR), "shared", "data")
TEST_OUTPUT = os.path.join(PROJECT_DIR, "test-output")  # screenshots and the like; gitignored


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray, started once; logical CPUs above the 2 physical ones so that training
    workers and the Ray Data pipeline both get scheduled (see jobs.train.ensure_ray)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path):
    """A fresh SQLite MLflow store per test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: str, port: int) -> subprocess.Popen:
    """`mlflow server` (the venv's) on 127.0.0.1, in a process group of its own; returns once it answers."""
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    server = subprocess.Popen([mlflow, "server", "--backend-store-uri", store, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise RuntimeError("mlflow server did not start")


def stop_server(server: subprocess.Popen):
    """Kills the server and its workers: the process group start_server made, nothing else."""
    os.killpg(server.pid, 9)
    server.wait()

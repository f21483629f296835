"""Shared fixtures: one real local Ray for the in-process tests, and where test output goes."""

import os

import pytest
import ray

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(PROJECT_DIR), "shared", "data")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray, started once; logical CPUs above the 2 physical ones so that training
    workers and the Ray Data pipeline both get scheduled (see jobs.train.ensure_ray)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path):
    """A fresh SQLite MLflow store per test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"

"""A tiny Ray Tune sweep over the real training job: child MLflow runs under a parent, best config."""

import os

import mlflow
import pytest

from interestformer.jobs.config import load_config
from interestformer.tuning.sweep import sweep

from conftest import PROJECT_DIR

pytestmark = pytest.mark.slow


def test_sweep_records_each_trial_as_a_child_run(ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [
        f"data.prepared_dir={tmp_path / 'prepared'}",
        f"experiment.storage_path={tmp_path / 'runs'}",
        f"experiment.tracking_uri={uri}",
        "experiment.name=sweep-test",
        "train.epochs=1",
        "tune.lr=[0.001, 0.003]",
        "tune.d_model=[16]",
    ])
    results = sweep(cfg)
    assert len(results) == 2 and not results.errors

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment.mlflow_experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(float(r.data.params["train.lr"]) for r in children) == [0.001, 0.003]
    for child in children:
        assert child.data.params["model.d_model"] == "16"
        assert "val_ndcg_at_10" in child.data.metrics and "test_ndcg_at_10" in child.data.metrics

    best = load_config(str(tmp_path / "runs" / "sweep-test" / "best_config.yaml"))
    assert best.train.lr in (0.001, 0.003) and best.model.d_model == 16

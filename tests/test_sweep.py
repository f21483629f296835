"""A small ASHA sweep over the real training job (2 trials of 3 epochs, one at a time; the second
may be stopped after its first epoch if it trails the first): a child MLflow run per trial under one
parent, the best config written out (the best trial's, key for key), the best trial's model
registered in MLflow; the same sweep resumed afterwards finds nothing left to run and reports the
same best trial. How a sweep closes the runs its trials left open."""

import os

import mlflow
import pytest

from interestformer.jobs import tracking
from interestformer.jobs.config import load_config
from interestformer.jobs.tracking import flatten
from interestformer.tuning.sweep import sweep

from conftest import PROJECT_DIR


def test_runs_left_open_are_closed_as_tune_reports_their_trials(tmp_path):
    """A trial's run is closed by its sweep, not by the trial: a trial Tune stops (ASHA) can end
    in any exception as its actor exits, so only Tune's results tell a stop from a failure."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [f"experiment.tracking_uri={uri}", f"experiment.storage_path={tmp_path / 'runs'}"])
    parent = tracking.start_parent_run(cfg, "sweep")
    client = mlflow.MlflowClient(uri)
    experiment = client.get_run(parent).info.experiment_id
    runs = {name: client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent}).info.run_id
            for name in ("failed", "stopped", "finished")}
    client.set_terminated(runs["finished"], "FINISHED")

    tracking.close_unfinished_children(uri, parent, failed={"failed"})
    closed = {name: client.get_run(run_id) for name, run_id in runs.items()}
    assert {name: run.info.status for name, run in closed.items()} == {
        "failed": "FAILED", "stopped": "KILLED", "finished": "FINISHED"}
    assert [name for name, run in closed.items() if run.data.tags.get("stopped_early")] == ["stopped"]
    assert client.get_run(parent).info.status == "RUNNING"  # the sweep closes its own run after its report


@pytest.mark.slow
def test_asha_sweep_records_trials_writes_the_best_config_and_registers_its_model(ray_local, tmp_path, tiny_prepared_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        f"data.prepared_dir={tiny_prepared_dir}",
        f"experiment.storage_path={tmp_path / 'runs'}",
        f"experiment.tracking_uri={uri}",
        "train.epochs=3",
        "tune.num_samples=2",
    ]
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "sweep_tiny.yaml"), overrides)
    results = sweep(cfg)
    assert len(results) == cfg.tune.num_samples == 2 and not results.errors

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment.mlflow_experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    assert len({r.data.params["train.lr"] for r in children}) == 2  # sampled from the loguniform range
    for child in children:
        assert child.data.params["model.d_model"] in ("16", "32")
        assert 0.0 <= float(child.data.params["model.dropout"]) <= 0.3
        epochs = len(client.get_metric_history(child.info.run_id, "val_ndcg_at_10"))
        if child.info.status == "KILLED":  # ASHA stopped it after its first epoch
            # The stop reaches the workers some time after the report that decided it: a tiny
            # trial may validate its remaining epochs first (a CI dry run saw all 3 of 3).
            assert child.data.tags["stopped_early"] == "true" and 1 <= epochs <= cfg.train.epochs
        else:
            assert child.info.status == "FINISHED" and epochs == cfg.train.epochs
            assert "test_ndcg_at_10" in child.data.metrics
    assert any(c.info.status == "FINISHED" for c in children)

    best_run = parent.data.tags["best_run_id"]
    assert best_run in {c.info.run_id for c in children}
    name, version = parent.data.tags["registered_model"].split("/")
    assert client.get_model_version(name, version).run_id == best_run
    trials = client.list_artifacts(parent.info.run_id)
    assert {"best_config.yaml", "trials.csv", "trials.md"} <= {a.path for a in trials}

    # The written config is the best trial's, whole: every data, model and train key as that trial
    # ran it, so `python -m jobs.train --config best_config.yaml` repeats it (not run here).
    best = load_config(str(tmp_path / "runs" / cfg.experiment.name / "best_config.yaml"))
    trial = client.get_run(best_run).data.params
    written = {k: v for k, v in flatten(best.to_dict()).items() if k.split(".")[0] in ("data", "model", "train")}
    assert written and written == {k: trial[k] for k in written}

    resumed = sweep(cfg, resume=True)  # nothing unfinished: the same trials, the same best
    assert len(resumed) == 2
    assert client.get_run(parent.info.run_id).data.tags["best_run_id"] == best_run

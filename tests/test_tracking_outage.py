"""A real MLflow server on 127.0.0.1 goes away in the middle of a real training run and comes
back: training goes on, metrics logged meanwhile wait, arrive afterwards with their steps, and
the run reports the gap."""

import os
import threading
import time

import pytest

from interestformer.jobs import tracking
from interestformer.jobs.config import load_config
from interestformer.jobs.train import train

from conftest import PROJECT_DIR, free_port, start_server, stop_server

pytestmark = pytest.mark.slow  # a training run and an MLflow server started twice


def test_training_goes_on_through_an_outage_and_every_metric_arrives(ray_local, tmp_path, tiny_prepared_dir):
    """The server dies once the first checkpoint exists and comes back a checkpoint later, which
    may be after the last epoch: the workers never stop, rank 0's metrics wait (and what is still
    waiting when its process ends is handed to the driver), every one arrives with its step, the
    gap is reported in the run, and the driver closes the run once the server is back."""
    store, port = f"sqlite:///{tmp_path / 'mlflow.db'}", free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [
        f"data.prepared_dir={tiny_prepared_dir}",
        f"experiment.storage_path={tmp_path / 'runs'}",
        f"experiment.tracking_uri={uri}",
        "experiment.name=outage", "train.epochs=3", "train.log_every_steps=1",
    ])
    server = start_server(store, port)
    try:
        outcome = {}
        job = threading.Thread(target=lambda: outcome.update(summary=train(cfg)))
        job.start()
        checkpoints = lambda: len(list((tmp_path / "runs" / "outage").glob("checkpoint_*/checkpoint.json")))  # noqa: E731
        wait_for(lambda: checkpoints() >= 1, job)
        stop_server(server)
        with pytest.raises(tracking.TrackingUnavailable):
            tracking.check_reachable(uri, timeout_s=2)
        wait_for(lambda: checkpoints() >= 2, job)  # an epoch trained and checkpointed meanwhile
        server = start_server(store, port)
        job.join(timeout=600)
        summary = outcome["summary"]
        client = tracking._client(uri)
        assert client.get_run(summary["run_id"]).info.status == "FINISHED"
        losses = client.get_metric_history(summary["run_id"], "train_loss")
        steps = sorted(m.step for m in losses)  # one loss per optimizer step, none lost in the outage
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2 * cfg.train.epochs, steps
        assert len(client.get_metric_history(summary["run_id"], "val_ndcg_at_10")) == cfg.train.epochs
        reported = tracking.run_data(uri, summary["run_id"]).metrics
        assert reported["tracking/delayed_batches"] >= 1 and reported["tracking/outage_seconds"] > 0
        assert reported["tracking/dropped_metrics"] == 0
        assert "test_ndcg_at_10" in reported
    finally:
        stop_server(server)


def wait_for(condition, job: threading.Thread, timeout_s: float = 600):
    deadline = time.time() + timeout_s
    while time.time() < deadline and job.is_alive() and not condition():
        time.sleep(0.5)
    assert condition(), "the training job ended or stalled before the condition held"

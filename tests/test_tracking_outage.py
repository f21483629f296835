"""A real MLflow server on 127.0.0.1 goes away mid-run and comes back: metrics logged meanwhile
wait, arrive afterwards with their steps, and the run reports the gap."""

import pytest

from conftest import free_port, start_server, stop_server
from interestformer.jobs import tracking
from interestformer.jobs.config import load_config

pytestmark = pytest.mark.slow  # starts an MLflow server twice: about 30 s


def test_metrics_wait_through_an_outage_and_the_gap_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as in training workers
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    store, port = f"sqlite:///{tmp_path / 'mlflow.db'}", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(store, port)
    try:
        tracking.check_reachable(uri)
        run_id = tracking.start_run(load_config(None, [f"experiment.tracking_uri={uri}"]), {}, {}, "outage")
        outbox = tracking.MetricsOutbox(uri, run_id)
        outbox.log({"train_loss": 3.0}, step=1)
        stop_server(server)
        with pytest.raises(tracking.TrackingUnavailable):
            tracking.check_reachable(uri, timeout_s=2)
        outbox.log({"train_loss": 2.0}, step=2)  # training goes on; nothing raises
        outbox.log({"train_loss": 1.5}, step=3)
        assert len(outbox.waiting) == 2 and outbox.delayed == 2
        server = start_server(store, port)
        outbox.log({"train_loss": 1.0}, step=4)
        assert outbox.waiting == []
        history = tracking._client(uri).get_metric_history(run_id, "train_loss")
        assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0)]
        reported = tracking.run_data(uri, run_id).metrics
        assert reported["tracking/delayed_batches"] == 2 and reported["tracking/outage_seconds"] > 0
    finally:
        stop_server(server)

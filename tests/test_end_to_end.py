"""The whole training job on the real stack: Ray Data -> 2 Ray Train workers with DeepSpeed ZeRO-2
-> checkpoint -> MLflow (SQLite), then jobs.evaluate on the checkpoint."""

import json
import os

import pytest
from safetensors.torch import load_file

from interestformer.jobs import evaluate, tracking
from interestformer.jobs.config import load_config
from interestformer.jobs.distributed import load_model
from interestformer.jobs.train import train

from conftest import PROJECT_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [
        f"data.prepared_dir={tmp / 'prepared'}",
        f"experiment.storage_path={tmp / 'runs'}",
        f"experiment.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        "experiment.name=e2e",
        "train.zero_stage=2",
        "train.num_workers=2",
        "train.epochs=4",
    ])
    return cfg, train(cfg)


def test_run_reports_test_metrics_and_baseline(finished_run):
    cfg, summary = finished_run
    events = summary["data"]["events_used"]
    assert 300 <= events <= 1000, events  # "a few hundred" generated events
    for metrics in (summary["test"], summary["most_popular"]):
        assert metrics["users"] == summary["data"]["users"]
        for k in (10, 50, 200):
            assert 0.0 <= metrics[f"ndcg@{k}"] <= metrics[f"hr@{k}"] <= 1.0


def test_loss_falls(finished_run):
    cfg, summary = finished_run
    losses = tracking.metric_history(summary["tracking_uri"], summary["run_id"], "train_loss")
    assert len(losses) >= 8
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.2, losses


def test_mlflow_run_holds_params_metrics_and_configs(finished_run):
    cfg, summary = finished_run
    uri, run_id = summary["tracking_uri"], summary["run_id"]
    data = tracking.run_data(uri, run_id)
    assert data.params["train.zero_stage"] == "2"
    assert data.params["model.d_model"] == str(cfg.model.d_model)
    assert data.params["data.max_seq_len"] == str(cfg.data.max_seq_len)
    assert data.tags["zero_stage"] == "2" and data.tags["world_size"] == "2"
    for key in ("train_loss", "samples_per_s", "events_per_s", "test_hr_at_10", "test_ndcg_at_10", "test_mrr",
                "test_hr_at_200", "most_popular_test_ndcg_at_10", "data/events_unknown_item"):
        assert key in data.metrics, key
    assert data.metrics["samples_per_s"] > 0
    for key in ("val_hr_at_10", "val_ndcg_at_10"):  # once per epoch
        assert len(tracking.metric_history(uri, run_id, key)) == cfg.train.epochs
    assert data.metrics["data/events_unknown_item"] >= 1  # the demo plants unknown items; counted
    import mlflow

    client = mlflow.MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    ds_config = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="config/deepspeed_config.json", tracking_uri=uri)).read())
    assert ds_config["zero_optimization"]["stage"] == 2
    [output] = client.get_run(run_id).outputs.model_outputs  # the trained model, for serving
    model = client.get_logged_model(output.model_id)
    assert model.name == "model" and model.status == "READY"
    assert os.path.isfile(mlflow.artifacts.download_artifacts(artifact_uri=f"{model.artifact_location}/MLmodel"))


def test_checkpoint_reloads_into_evaluate_with_the_same_metrics(finished_run):
    cfg, summary = finished_run
    folder = summary["checkpoint"]
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert os.path.isdir(os.path.join(folder, "deepspeed"))
    assert load_file(os.path.join(folder, "model.safetensors"))  # gathered weights, no pickle
    metrics = evaluate.main(["--checkpoint", folder, "--split", "test", "--run-id", summary["run_id"],
                             "--tracking-uri", summary["tracking_uri"]])
    for name, value in summary["test"].items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    logged = tracking.run_data(summary["tracking_uri"], summary["run_id"]).metrics  # --run-id logs there
    assert logged["eval_test_ndcg_at_10"] == pytest.approx(summary["test"]["ndcg@10"], abs=1e-9)


def test_zero3_bf16_with_accumulation_trains_checkpoints_and_resumes(ray_local, tmp_path):
    """ZeRO-3 partitions the weights, so the checkpoint's model.safetensors must be gathered from
    both workers; a rerun with the same name and storage resumes from the latest checkpoint, on
    one worker (consolidated weights) or on two (DeepSpeed's shards)."""
    overrides = [
        f"data.prepared_dir={tmp_path / 'prepared'}",
        f"experiment.storage_path={tmp_path / 'runs'}",
        f"experiment.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "experiment.name=zero3",
        "train.zero_stage=3",
        "train.precision=bf16",
        "train.grad_accum_steps=2",
    ]
    config = os.path.join(PROJECT_DIR, "configs", "tiny.yaml")
    first = train(load_config(config, overrides + ["train.epochs=1"]))
    weights = load_file(os.path.join(first["checkpoint"], "model.safetensors"))
    model, _ = load_model(first["checkpoint"])
    assert set(weights) == set(model.state_dict())  # every weight, gathered whole
    assert all(w.shape == model.state_dict()[name].shape for name, w in weights.items())

    # One worker instead of two, nothing left to train: the weights must come back exactly.
    resharded = train(load_config(config, overrides + ["train.epochs=1", "train.num_workers=1"]))
    for name, value in first["test"].items():
        assert resharded["test"][name] == pytest.approx(value, abs=1e-9), name

    second = train(load_config(config, overrides + ["train.epochs=2"]))  # two workers again: DeepSpeed's shards
    assert second["checkpoint"] != first["checkpoint"]
    assert os.path.dirname(second["checkpoint"]) == os.path.dirname(first["checkpoint"])  # same Ray Train run
    val = tracking.metric_history(second["tracking_uri"], second["run_id"], "val_ndcg_at_10")
    assert len(val) == 1  # epoch 1 came from the checkpoint; only epoch 2 ran
    metrics = evaluate.main(["--checkpoint", second["checkpoint"]])
    for name, value in second["test"].items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name



def test_frozen_and_partly_trained_encoders_with_cold_start_items(ray_local, tmp_path):
    """Frozen text (features computed once and cached), the image encoder's top layer training at
    its own lr, ZeRO-3 in bf16, 20% of items held out: the run reports cold-start metrics beside
    most-popular's, and its checkpoint (frozen features inside) re-evaluates the cold split exactly."""
    from interestformer.datasets.prepare import PreparedData
    from interestformer.jobs.content_features import content_features
    from interestformer.jobs.train import data_spec

    overrides = [
        f"data.prepared_dir={tmp_path / 'prepared'}",
        f"experiment.storage_path={tmp_path / 'runs'}",
        f"experiment.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "data.cold_item_fraction=0.2",
        "model.text.train_mode=frozen",
        "model.image.train_mode=top",
        "model.image.lr=0.0005",
        "train.zero_stage=3",
        "train.precision=bf16",
    ]
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), overrides)
    summary = train(cfg)
    assert summary["cold"]["users"] == summary["most_popular_cold"]["users"] > 0
    assert summary["most_popular_cold"]["hr@10"] == 0.0  # held-out items have no popularity
    logged = tracking.run_data(summary["tracking_uri"], summary["run_id"]).metrics
    assert logged["cold_test_ndcg_at_10"] == pytest.approx(summary["cold"]["ndcg@10"])
    assert "most_popular_cold_test_hr_at_10" in logged

    prepared = PreparedData.load(str(tmp_path / "prepared"))
    uri, features = content_features(prepared, cfg, data_spec(prepared, cfg))  # cached: no second pass
    assert os.path.isfile(uri) and set(features) == {"text_features"}
    weights = load_file(os.path.join(summary["checkpoint"], "model.safetensors"))
    assert "item_encoder.text_features" in weights and "item_encoder.text_encoder" not in " ".join(weights)
    metrics = evaluate.main(["--checkpoint", summary["checkpoint"], "--split", "cold"])
    for name, value in summary["cold"].items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name


def test_a_killed_worker_is_replaced_and_the_run_finishes_in_the_same_mlflow_run(finished_run, tmp_path):
    """SIGKILL one training worker once the first checkpoint exists: Ray Train restarts the workers
    from it (train.max_failures), the run ends in the same MLflow run, near the uninterrupted one."""
    import signal
    import threading
    import time

    reference_cfg, reference = finished_run
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [
        f"data.prepared_dir={reference_cfg.data.prepared_dir}",  # the same prepared data
        f"experiment.storage_path={tmp_path / 'runs'}",
        f"experiment.tracking_uri={reference['tracking_uri']}",
        "experiment.name=killed", "train.epochs=4", "train.max_failures=1",
    ])
    outcome = {}
    job = threading.Thread(target=lambda: outcome.update(summary=train(cfg)))
    job.start()
    run_folder = tmp_path / "runs" / "killed"
    deadline = time.time() + 300
    while time.time() < deadline and not list(run_folder.glob("checkpoint_*")):
        time.sleep(0.5)
    assert list(run_folder.glob("checkpoint_*")), "no checkpoint to recover from"
    workers = own_train_workers()
    assert workers, "no training worker process found"
    os.kill(max(workers), signal.SIGKILL)
    replaced = False
    while job.is_alive() and not replaced:  # new worker processes take over
        replaced = bool(own_train_workers() - workers)
        time.sleep(0.2)
    job.join(timeout=600)
    assert replaced, "the killed worker was never replaced"
    summary = outcome["summary"]
    assert summary["run_id"] and tracking._client(summary["tracking_uri"]).get_run(summary["run_id"]).info.status == "FINISHED"
    epochs = tracking.metric_history(summary["tracking_uri"], summary["run_id"], "val_ndcg_at_10")
    assert len(epochs) >= cfg.train.epochs  # an epoch cut short by the kill is run again
    assert summary["test"]["ndcg@10"] == pytest.approx(reference["test"]["ndcg@10"], abs=0.1)


def own_train_workers() -> set[int]:
    """PIDs of the Ray Train workers of this test session's Ray: descendants of this process, never
    the workers of another Ray on the same machine."""
    import psutil

    found = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.add(process.pid)
        except psutil.Error:  # gone meanwhile
            pass
    return found

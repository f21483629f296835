"""The whole training job on the real stack: Ray Data -> 2 Ray Train workers with DeepSpeed ZeRO-2
-> checkpoint -> MLflow (SQLite), then jobs.evaluate on the checkpoint."""

import io
import json
import os
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from interestformer.errors import ConfigError
from interestformer.datasets.pipeline import catalogue_ids, id_buckets
from interestformer.datasets.prepare import PreparedData, input_paths
from interestformer.jobs import evaluate, serving, tracking
from interestformer.jobs.config import load_config
from interestformer.jobs.distributed import load_model
from interestformer.jobs.train import train

from conftest import PROJECT_DIR, native_cpu_precision, one_epoch_of_training_batches

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory, tiny_prepared_dir):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [
        f"data.prepared_dir={tiny_prepared_dir}",
        f"experiment.storage_path={tmp / 'runs'}",
        f"experiment.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        "experiment.name=e2e",
        "train.zero_stage=2",
        "train.num_workers=2",
        "train.epochs=3",
        "train.eval_every=2",  # validates after epochs 2 and 3 (the last always validates)
        "data.full_softmax=true",  # every catalogue item a candidate of every target
        "experiment.system_metrics_interval_s=2",  # several samples within this short run
        "train.precision=auto",  # decided on the workers, recorded in MLflow
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
    # The workers rank the baseline on their shares of the test rows: the same as on the whole split.
    prepared = PreparedData.load(cfg.data.prepared_dir)
    whole = evaluate.eval_datasets(prepared, cfg, "test")[1].iter_torch_batches(batch_size=1)
    assert summary["most_popular"] == pytest.approx(evaluate.evaluate_most_popular(prepared, whole, cfg, "test").report())


def test_every_training_user_is_trained_at_most_once_per_epoch_across_workers(finished_run):
    cfg, summary = finished_run
    users = events = 0
    for batch in one_epoch_of_training_batches(PreparedData.load(cfg.data.prepared_dir), cfg.train.micro_batch_size,
                                               cfg.data.max_seq_len):
        users, events = users + len(batch["history"]), events + int((batch["targets"] > 0).sum())
    assert len(summary["throughput"]) == cfg.train.epochs
    for epoch in summary["throughput"]:  # summed over both workers: each user once, but those who sat out
        assert epoch["users"] + epoch["users_sat_out"] == users and 0 <= epoch["users_sat_out"] < cfg.train.num_workers
        assert epoch["events"] == events if not epoch["users_sat_out"] else epoch["events"] < events
        assert epoch["samples_per_s"] > 0 and 0 <= epoch["data_wait_fraction"] < 1
    for key in ("epoch_samples_per_s", "epoch_data_wait_fraction", "epoch_users_sat_out"):
        assert len(tracking.metric_history(summary["tracking_uri"], summary["run_id"], key)) == cfg.train.epochs


def test_loss_falls(finished_run):
    cfg, summary = finished_run
    losses = tracking.metric_history(summary["tracking_uri"], summary["run_id"], "train_loss")
    assert len(losses) >= 8
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.2, losses


def test_mlflow_run_holds_params_metrics_and_configs(finished_run, tmp_path):
    cfg, summary = finished_run
    uri, run_id = summary["tracking_uri"], summary["run_id"]
    data = tracking.run_data(uri, run_id)
    assert data.params["train.zero_stage"] == "2"
    assert data.params["model.d_model"] == str(cfg.model.d_model)
    assert data.params["data.max_seq_len"] == str(cfg.data.max_seq_len)
    assert data.tags["zero_stage"] == "2" and data.tags["world_size"] == "2"
    assert data.tags["precision"] == summary["precision"] == native_cpu_precision()  # what auto became
    for key in ("train_loss", "samples_per_s", "events_per_s", "test_hr_at_10", "test_ndcg_at_10", "test_mrr",
                "test_hr_at_200", "most_popular_test_ndcg_at_10", "data/events_unknown_item"):
        assert key in data.metrics, key
    assert data.metrics["samples_per_s"] > 0
    for key in ("val_hr_at_10", "val_ndcg_at_10"):  # after epochs 2 and 3 (train.eval_every 2)
        assert len(tracking.metric_history(uri, run_id, key)) == 2
    assert len(tracking.metric_history(uri, run_id, "epochs_done")) == cfg.train.epochs
    assert data.metrics["data/events_unknown_item"] >= 1  # the demo plants unknown items; counted
    assert data.metrics.get("data/events_bad_timestamp", 0) == 0  # its fixed window is past on any date
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
    # The workers wrote it from their evaluation copy: it must be the checkpoint's model (the best
    # epoch's weights) with the catalogue encoded as serving.export encodes it from the checkpoint.
    logged = mlflow.artifacts.download_artifacts(artifact_uri=f"{model.artifact_location}/artifacts",
                                                 dst_path=str(tmp_path / "logged"))
    exported = serving.export(summary["checkpoint"], str(tmp_path / "exported"))
    for name in ("catalogue.safetensors", "user_model.safetensors"):
        ours, reference = load_file(os.path.join(logged, name)), load_file(exported[name])
        assert ours.keys() == reference.keys(), name
        for key, tensor in ours.items():
            assert torch.allclose(tensor, reference[key], atol=1e-5), (name, key)
    for name in ("user_model.json", "item_ids.json"):
        with open(os.path.join(logged, name)) as f, open(exported[name]) as g:
            assert json.load(f) == json.load(g), name


def test_mlflow_run_holds_training_data_system_metrics_segments_and_report(finished_run):
    import mlflow

    cfg, summary = finished_run
    uri, run_id = summary["tracking_uri"], summary["run_id"]
    run = mlflow.MlflowClient(uri).get_run(run_id)
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == "demo-events" and dataset.source_type == "local"
    assert json.loads(dataset.source)["uri"] == input_paths(cfg.data)[0]
    assert dataset.digest == PreparedData.load(cfg.data.prepared_dir).meta["fingerprint"]
    assert {tag.key: tag.value for tag in dataset_input.tags}["mlflow.data.context"] == "training"

    metrics = run.data.metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0  # rank 0's machine, sampled while training
    assert "system/system_memory_usage_megabytes" in metrics
    users = summary["test"]["users"]
    for prefix in ("test_segment", "most_popular_test_segment"):
        history = {key: value for key, value in metrics.items()
                   if key.startswith(f"{prefix}/history_") and key.endswith("/users")}
        assert sum(history.values()) == users, history  # every user in exactly one history bucket
        assert metrics.get(f"{prefix}/target_cold/users", 0) + metrics[f"{prefix}/target_warm/users"] == users
    assert metrics["test_segment/target_warm/ndcg_at_10"] == pytest.approx(
        summary["test"]["segment/target_warm/ndcg@10"])

    def artifact(path: str) -> bytes:
        with open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=uri), "rb") as f:
            return f.read()

    table = pd.read_csv(io.BytesIO(artifact("report/metrics.csv")))
    assert list(zip(table["split"], table["model"])) == [("test", "InterestFormer"), ("test", "most popular")]
    assert table["ndcg@10"].tolist() == pytest.approx([summary["test"]["ndcg@10"], summary["most_popular"]["ndcg@10"]])
    assert "| test | InterestFormer |" in artifact("report/metrics.md").decode()
    segments = pd.read_csv(io.BytesIO(artifact("report/segments.csv")))
    assert set(segments["model"]) == {"InterestFormer", "most popular"} and "target_warm" in set(segments["segment"])
    assert artifact("report/hr_ndcg_at_k.png").startswith(b"\x89PNG")


def test_checkpoint_reloads_into_evaluate_with_the_same_metrics(finished_run):
    cfg, summary = finished_run
    folder = summary["checkpoint"]
    run_folder = os.path.dirname(folder)  # the run kept experiment.keep_checkpoints of its 3
    assert len([p for p in os.listdir(run_folder) if p.startswith("checkpoint_") and
                os.path.isdir(os.path.join(run_folder, p))]) == cfg.experiment.keep_checkpoints < cfg.train.epochs
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert os.path.isdir(os.path.join(folder, "deepspeed"))
    assert load_file(os.path.join(folder, "model.safetensors"))  # gathered weights, no pickle
    metrics = evaluate.main(["--checkpoint", folder, "--split", "test", "--run-id", summary["run_id"],
                             "--tracking-uri", summary["tracking_uri"]])
    for name, value in summary["test"].items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    logged = tracking.run_data(summary["tracking_uri"], summary["run_id"]).metrics  # --run-id logs there
    assert logged["eval_test_ndcg_at_10"] == pytest.approx(summary["test"]["ndcg@10"], abs=1e-9)


def test_zero3_bf16_with_accumulation_trains_checkpoints_and_resumes(ray_local, tmp_path, tiny_prepared_dir):
    """ZeRO-3 partitions the weights, so the checkpoint's model.safetensors must be gathered from
    both workers; a rerun with the same name and storage resumes from the latest checkpoint, on
    one worker (consolidated weights) or on two (DeepSpeed's shards). Item IDs are hashed (their
    map is a buffer, gathered and saved with the weights), the ID table's rows are split across the
    workers (saved whole in model.safetensors, and each worker's rows with their AdamW state) and
    blocks recompute their activations.

    A half-written checkpoint is never picked up: Ray Train registers a checkpoint
    (checkpoint_manager_snapshot.json) only once every worker has written its part, so a crash in
    the middle of a save leaves an unregistered folder. One such folder, newer than the real one,
    its weights cut in half and no state file, is planted before the resumes; both ignore it.

    Early stopping across the resume: no gain short of 1.0 counts (min_delta), so epoch 1 stays the
    best and the resumed run stops on patience after epoch 2 of 3, testing epoch 1's weights. A
    resume that forgot the best epoch would take epoch 2 as its first validation, hence its best."""
    overrides = [
        f"data.prepared_dir={tiny_prepared_dir}",
        f"experiment.storage_path={tmp_path / 'runs'}",
        f"experiment.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "experiment.name=zero3",
        "train.zero_stage=3",
        "train.precision=bf16",
        "train.grad_accum_steps=2",
        "model.item_id_buckets=32",
        "train.shard_item_table=true",
        "model.activation_checkpointing=true",
        "train.patience=1",
        "train.min_delta=1.0",
    ]
    config = os.path.join(PROJECT_DIR, "configs", "tiny.yaml")
    first = train(load_config(config, overrides + ["train.epochs=1"]))
    weights = load_file(os.path.join(first["checkpoint"], "model.safetensors"))
    model, state = load_model(first["checkpoint"])
    assert set(weights) == set(model.state_dict())  # every weight, gathered whole
    assert all(w.shape == model.state_dict()[name].shape for name, w in weights.items())
    buckets = id_buckets(catalogue_ids(PreparedData.load(state["prepared_path"])), 32)
    assert torch.equal(weights["item_encoder.id_bucket"], torch.from_numpy(buckets))  # filled by every worker
    assert sorted(os.listdir(os.path.join(first["checkpoint"], "item_table"))) == ["rank0.safetensors", "rank1.safetensors"]
    debris = os.path.join(os.path.dirname(first["checkpoint"]), "checkpoint_2099-01-01_00-00-00.000000")
    shutil.copytree(first["checkpoint"], debris)
    with open(os.path.join(debris, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    os.remove(os.path.join(debris, "checkpoint.json"))

    # One worker instead of two, nothing left to train: the weights must come back exactly.
    resharded = train(load_config(config, overrides + ["train.epochs=1", "train.num_workers=1"]))
    assert resharded["checkpoint"] == first["checkpoint"]
    for name, value in first["test"].items():
        assert resharded["test"][name] == pytest.approx(value, abs=1e-9), name

    second = train(load_config(config, overrides + ["train.epochs=3"]))  # two workers again: DeepSpeed's shards
    assert (second["best_epoch"], second["stopped_epoch"]) == (1, 2)
    logged = tracking.run_data(second["tracking_uri"], second["run_id"]).metrics
    assert (logged["best_epoch"], logged["stopped_epoch"]) == (1, 2)
    for name, value in first["test"].items():  # epoch 1's weights, tested again
        assert second["test"][name] == pytest.approx(value, abs=1e-9), name
    assert os.path.isfile(os.path.join(second["checkpoint"], "latest.safetensors"))  # epoch 2's, to resume from
    assert second["checkpoint"] != first["checkpoint"]
    assert os.path.dirname(second["checkpoint"]) == os.path.dirname(first["checkpoint"])  # same Ray Train run
    assert second["run_id"] == resharded["run_id"] == first["run_id"]  # one MLflow run, continued
    val = tracking.metric_history(second["tracking_uri"], second["run_id"], "val_ndcg_at_10")
    assert len(val) == 2  # epoch 1 ran once (first job), epoch 2 in the second, then the early stop
    metrics = evaluate.main(["--checkpoint", second["checkpoint"]])
    for name, value in second["test"].items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name



def test_frozen_and_partly_trained_encoders_with_cold_start_items(ray_local, tmp_path, tiny_prepared_dir):
    """Frozen text (features computed once into the Parquet feature store), the image encoder's
    top layer training at its own lr, ZeRO-3 in bf16, 20% of items held out (their ID rows filled
    from their text neighbours'), length-grouped batches: the run reports cold-start metrics
    beside most-popular's, and its checkpoint (frozen features inside) re-evaluates the cold split
    exactly. Its time budget (train.max_minutes) runs
    out in the first epoch, so it ends after that epoch, as after an early stop."""
    from interestformer.datasets.pipeline import trained_items
    from interestformer.jobs.embed_items import feature_store, load_features
    from interestformer.jobs.train import data_spec

    overrides = [
        f"data.prepared_dir={tiny_prepared_dir}",
        f"experiment.storage_path={tmp_path / 'runs'}",
        f"experiment.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "data.cold_item_fraction=0.2",
        "model.text.train_mode=frozen",
        "model.cold_item_neighbours=3",
        "model.image.train_mode=top",
        "model.image.lr=0.0005",
        "train.zero_stage=3",
        "train.precision=bf16",
        "data.group_by_length=true",
        "train.epochs=3",
        "train.max_minutes=0.001",
    ]
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), overrides)
    summary = train(cfg)
    assert (summary["best_epoch"], summary["stopped_epoch"], len(summary["throughput"])) == (1, 1, 1)
    assert summary["cold"]["users"] == summary["most_popular_cold"]["users"] > 0
    assert summary["most_popular_cold"]["hr@10"] == 0.0  # held-out items have no popularity
    logged = tracking.run_data(summary["tracking_uri"], summary["run_id"]).metrics
    assert logged["cold_test_ndcg_at_10"] == pytest.approx(summary["cold"]["ndcg@10"])
    assert "most_popular_cold_test_hr_at_10" in logged
    assert logged["cold_test_segment/target_cold/users"] == summary["cold"]["users"]  # every target held out

    prepared = PreparedData.load(tiny_prepared_dir)
    uri, _, store = feature_store(prepared, cfg, data_spec(prepared, cfg))  # the store: no second pass
    assert store["items"] == prepared.num_items and set(load_features(uri)) == {"text_features"}
    weights = load_file(os.path.join(summary["checkpoint"], "model.safetensors"))
    assert "item_encoder.text_features" in weights and "item_encoder.text_encoder" not in " ".join(weights)
    # Which items trained travels with the weights, so that every evaluation copy fills the same rows.
    assert torch.equal(weights["item_encoder.id_trained"], torch.from_numpy(trained_items(prepared, 0.2)))
    metrics = evaluate.main(["--checkpoint", summary["checkpoint"], "--split", "cold"])
    for name, value in summary["cold"].items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name


def test_a_killed_worker_is_replaced_and_the_run_finishes_in_the_same_mlflow_run(finished_run, tmp_path):
    """SIGKILL one training worker once the first checkpoint exists: Ray Train restarts the workers
    from it (train.max_failures), the new workers train only the epochs after it, and the run ends
    in the same MLflow run. (Its metrics are not compared with the uninterrupted run's: on 60
    users NDCG@10 moves by 0.1 between runs that differ only in batch order.)"""
    import signal
    import threading
    import time

    reference_cfg, reference = finished_run
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [
        f"data.prepared_dir={reference_cfg.data.prepared_dir}",  # the same prepared data
        f"experiment.storage_path={tmp_path / 'runs'}",
        f"experiment.tracking_uri={reference['tracking_uri']}",
        "experiment.name=killed", "train.epochs=3", "train.max_failures=1",
    ])
    outcome = {}
    job = threading.Thread(target=lambda: outcome.update(summary=train(cfg)))
    job.start()
    run_folder = tmp_path / "runs" / "killed"
    deadline = time.time() + 300
    # Registered, not just a folder: a folder appears while the workers still write into it, and a
    # worker killed then leaves nothing to resume from (the restart would begin at epoch 1).
    while time.time() < deadline and not registered_checkpoints(run_folder):
        time.sleep(0.2)
    assert registered_checkpoints(run_folder), "no checkpoint to recover from"
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
    assert len(summary["throughput"]) < cfg.train.epochs  # the new workers began at the checkpoint, not at epoch 1
    assert summary["test"]["users"] == reference["test"]["users"]


def registered_checkpoints(run_folder) -> list[str]:
    """The checkpoints Ray Train has registered for the run (each worker's part written)."""
    snapshot = run_folder / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    try:
        return [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
    except json.JSONDecodeError:  # being rewritten this moment
        return []


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


def test_a_run_continues_from_another_runs_checkpoint_on_a_newer_window(finished_run, tmp_path):
    """Incremental training: a new run starts from the finished run's checkpoint and trains one
    epoch on the events at or after train_since only (earlier ones are history). Every user with
    such a target trains, once. And jobs.evaluate ranking the checkpoint on data named by a config
    (items matched by id, here the same catalogue) gives the run's own test metrics, plus the
    cut-off that config's eval section adds."""
    import numpy as np
    import pyarrow.parquet as pq
    import yaml

    cfg, summary = finished_run
    sequences = pq.read_table(PreparedData.load(cfg.data.prepared_dir).sequences_path).to_pandas()
    since = int(np.median(np.concatenate(sequences["timestamps"].tolist())))
    # The training split's last target is event n-2 (n >= 3), or event n of a 2-event user.
    last_target = [stamps[len(stamps) - 3 if len(stamps) >= 3 else -1] for stamps in sequences["timestamps"]]
    expected_users = sum(stamp >= since for stamp in last_target)
    assert 0 < expected_users < len(sequences)

    continued = train(load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [
        f"data.prepared_dir={cfg.data.prepared_dir}",
        f"experiment.storage_path={tmp_path / 'runs'}",
        f"experiment.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"train.init_from={summary['checkpoint']}",
        f"data.train_since={since}",
        "train.epochs=1",
        "train.num_workers=1",
    ]))
    assert continued["throughput"][0]["users"] == expected_users
    assert continued["test"]["users"] == summary["test"]["users"]
    latest = max(stamp for stamps in sequences["timestamps"] for stamp in stamps)
    with pytest.raises(ConfigError, match="data.train_since.*no user with a training target"):
        train(load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [  # a window after the log ends
            f"data.prepared_dir={cfg.data.prepared_dir}", f"experiment.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"train.init_from={summary['checkpoint']}", f"data.train_since={latest + 1}"]))

    data_config = tmp_path / "data.yaml"
    data_config.write_text(yaml.safe_dump({"data": {"prepared_dir": cfg.data.prepared_dir, **{
        key: getattr(cfg.data, key) for key in ("max_seq_len", "image_size", "num_negatives", "sequence_shards")},
        "demo": vars(cfg.data.demo)}, "eval": {"ks": [5, *cfg.eval.ks]}}))  # and its protocol: one more K
    metrics = evaluate.main(["--checkpoint", summary["checkpoint"], "--data-config", str(data_config)])
    for name, value in summary["test"].items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name
    assert 0.0 <= metrics["ndcg@5"] <= metrics["hr@5"] <= metrics["hr@10"]


def test_a_run_distilled_from_a_checkpoint_loads_its_teacher_on_the_workers_and_records_it(finished_run, tmp_path):
    """train.teachers: the finished run's model scores every batch of a 1-epoch run, in the
    precision the workers train in; the run logs its teacher among its params."""
    cfg, summary = finished_run
    distilled = train(load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [
        f"data.prepared_dir={cfg.data.prepared_dir}",
        f"experiment.storage_path={tmp_path / 'runs'}",
        f"experiment.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"train.teachers=[{summary['checkpoint']}]",
        "train.distill_weight=0.7",
        "train.precision=auto",
        "train.epochs=1",
        "train.num_workers=1",
    ]))
    assert distilled["test"]["users"] == summary["test"]["users"]
    params = tracking.run_data(distilled["tracking_uri"], distilled["run_id"]).params
    assert summary["checkpoint"] in params["train.teachers"] and params["train.distill_weight"] == "0.7"

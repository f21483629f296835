"""Nothing personal or secret leaks: user ids pseudonymised at ingest with a keyed hash,
credentials redacted from everything logged to MLflow (the training data's source too), none in
the shipped configs; the cluster's job API needs a token."""

import glob
import json
import os

import jsonschema
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from interestformer.errors import ConfigError
from interestformer.datasets.config import DataConfig
from interestformer.jobs import tracking
from interestformer.jobs.config import load_config

from conftest import PROJECT_DIR

CORPUS = os.path.join(PROJECT_DIR, "tests", "bad_input")
SECRET_KEY = "AKIAABCDEFGHIJKLMNOP"


def test_pseudonymising_needs_a_key_and_fails_before_ray(monkeypatch):
    monkeypatch.delenv("INTERESTFORMER_ID_KEY", raising=False)
    monkeypatch.delenv("INTERESTFORMER_ID_KEY_FILE", raising=False)
    with pytest.raises(ConfigError, match="data.pseudonymise_user_ids.*INTERESTFORMER_ID_KEY"):
        load_config(None, ["data.pseudonymise_user_ids=true"])


@pytest.mark.slow  # a real prepare job
def test_raw_user_ids_never_reach_the_prepared_data(ray_local, tmp_path, monkeypatch):
    from interestformer.datasets.prepare import prepare

    key_file = tmp_path / "id.key"
    key_file.write_text("a key from a secret store\n")
    monkeypatch.setenv("INTERESTFORMER_ID_KEY_FILE", str(key_file))
    cfg = DataConfig(source="parquet", events_path=os.path.join(CORPUS, "events"),
                     items_path=os.path.join(CORPUS, "items"), prepared_dir=str(tmp_path / "prepared"),
                     text_columns=["title"], pseudonymise_user_ids=True)
    prepared = prepare(cfg)
    raw = {f"u{i}" for i in range(30)} | {str(1000 + i) for i in range(5)} | {"solo"}
    users = pq.read_table(prepared.sequences_path).column("user_id").to_pylist()
    assert len(users) == 36 and not set(users) & raw
    assert all(len(u) == 32 and int(u, 16) >= 0 for u in users)  # 128-bit hex pseudonyms
    quarantined = pq.read_table(os.path.join(prepared.path, "quarantine", "events")).column("user_id").to_pylist()
    assert not set(quarantined) & raw
    for path in glob.glob(os.path.join(prepared.path, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            assert b"a key from a secret store" not in data, path  # the key itself is never written
    again = prepare(DataConfig(**{**vars(cfg), "prepared_dir": str(tmp_path / "again")}))
    assert pq.read_table(again.sequences_path).column("user_id").to_pylist() == users  # stable pseudonyms


def test_credentials_are_redacted_from_what_mlflow_receives(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [
        f"experiment.tracking_uri={uri}",
        "experiment.storage_path=s3://alice:hunter2@bucket/runs",
        f"data.events_path=s3://bucket/events?X-Amz-Signature=deadbeef&X-Amz-Credential={SECRET_KEY}/x",
        "data.source=parquet", "data.items_path=gs://bucket/items?token=tok123",
    ])
    run_id = tracking.start_run(cfg, {}, {"events_in": 1}, "redaction")
    tracking.log_training_data(uri, run_id, "events", cfg.data.events_path, "0123abcd", {"events_in": 1})
    params = tracking.run_data(uri, run_id).params
    logged = " ".join(params.values())
    import mlflow

    logged += open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config/resolved_config.json",
                                                       tracking_uri=uri)).read()
    (dataset_input,) = mlflow.MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    assert dataset_input.dataset.source_type == "s3"
    logged += dataset_input.dataset.source
    for secret in ("hunter2", "deadbeef", SECRET_KEY, "tok123"):
        assert secret not in logged, secret
    assert params["experiment.storage_path"] == "s3://***@bucket/runs"  # the rest stays readable
    assert params["data.items_path"] == "gs://bucket/items?token=***"


def test_shipped_configs_and_cluster_yaml_hold_no_credentials():
    files = glob.glob(os.path.join(PROJECT_DIR, "configs", "*.yaml")) + [os.path.join(PROJECT_DIR, "cluster.yaml")]
    for path in files:
        with open(path) as f:
            text = f.read()
        assert tracking.redact(text) == text, f"{path} holds something credential-like"


def test_cluster_yaml_is_valid_for_ray_up_and_every_node_starts_ray_with_token_auth():
    with open(os.path.join(PROJECT_DIR, "cluster.yaml")) as f:
        cluster = yaml.safe_load(f)
    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        jsonschema.validate(cluster, json.load(f))  # what `ray up` checks first
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in cluster[key] if "ray start" in command]
        assert starts and all("export RAY_AUTH_MODE=token;" in command for command in starts), key
    assert cluster["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # the token itself is no file here


def test_unreachable_tracking_server_fails_before_anything_starts():
    with pytest.raises(tracking.TrackingUnavailable, match="127.0.0.1:9.*unreachable"):
        tracking.check_reachable("http://127.0.0.1:9", timeout_s=2)  # port 9 (discard): nothing listens


def test_prepare_runs_item_row_tasks_for_the_catalogue_it_has_not_for_every_cpu():
    from interestformer.datasets.prepare import ITEMS_PER_ITEM_TASK, item_row_tasks

    assert item_row_tasks(1000, 6) == 1  # the demo's catalogue: one task at a time, however many CPUs are free
    assert item_row_tasks(3 * ITEMS_PER_ITEM_TASK, 6) == 3
    assert item_row_tasks(10**6, 6) == 6 and item_row_tasks(10**6, 0) == 1

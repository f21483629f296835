"""A 2-node Ray cluster on this machine, reached the way a real cluster is: two `ray start`
processes (a head and a worker node, each with its own temp folder), an S3-compatible object store
(moto's server) for the prepared data, the frozen encoder's features and the checkpoints, a
`mlflow server` over HTTP, and the code sent with `ray job submit --working-dir .` (the package in
runtime_env `py_modules`, built with `pip install --no-deps --target` as the README says). The two
training workers are placed STRICT_SPREAD, one per node, so nothing works only because rank 0
shares a disk with the driver. Credentials are in the nodes' environment (as an IAM role would
be), never in the job; this test process sets no AWS or Ray variable of its own.

On the same cluster: a job asking for more than it holds fails before taking anything, and a job
stopped with `ray job stop` resumes from its checkpoint in object storage when submitted again."""

import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import mlflow
import pyarrow.fs as pafs
import pytest

from conftest import (BIN, free_port, ray_env, ray_node_command, start_server, stop_ray_node, stop_server, submit_job,
                      wait_for_job_api)

# In `make test`; `make test-multinode` runs it alone, in a few minutes (docs/benchmarks.md has the measured time).
pytestmark = [pytest.mark.slow, pytest.mark.multinode, pytest.mark.timeout(1800)]
BUCKET = "interestformer"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def object_store(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with an empty bucket; yields its endpoint."""
    tmp_path = tmp_path_factory.mktemp("s3")
    port = free_port()
    server = subprocess.Popen([f"{BIN}/moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=open(tmp_path / "s3.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, (tmp_path / "s3.log").read_text()
            time.sleep(0.5)
    bucket_store(endpoint, allow_bucket_creation=True).create_dir(BUCKET)
    yield endpoint
    stop_server(server)


def bucket_store(endpoint: str, **options) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem on moto's server at `endpoint`, with the nodes' credentials."""
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                             secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region=CREDENTIALS["AWS_REGION"],
                             **options)


@pytest.fixture(scope="module")
def two_nodes(object_store, tmp_path_factory):
    """A head and a worker node of 2 CPUs each (the 2 workers' 1 CPU and the pipelines' 3 need 4);
    yields (job API address, CLI env, temp folders)."""
    tmp_path = tmp_path_factory.mktemp("nodes")
    env = ray_env(AWS_ENDPOINT_URL=object_store, **CREDENTIALS)
    # Short temp folders of their own: Ray's socket paths must stay under 108 characters.
    temp_dirs = [tempfile.mkdtemp(prefix="ray-head-"), tempfile.mkdtemp(prefix="ray-node-")]
    gcs_port, dashboard_port = free_port(), free_port()
    common = ["--num-cpus=2", "--object-store-memory=300000000"]
    head = subprocess.Popen(
        ray_node_command("--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dirs[0]}", *common),
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    nodes = [head]
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        wait_for_job_api(address, env, head, str(tmp_path / "head.log"))
        def start_node() -> subprocess.Popen:
            return subprocess.Popen(
                ray_node_command(f"--address=127.0.0.1:{gcs_port}", f"--temp-dir={temp_dirs[1]}", *common),
                env=env, stdout=open(tmp_path / "node.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)

        nodes.append(start_node())
        deadline, restarts = time.time() + 240, 1
        while len(ray_list(address, env, "nodes", "state=ALIVE")) < 2:
            log = (tmp_path / "node.log").read_text()
            # `ray start` gives its raylet a fixed 30 s to register; on a loaded 2-core machine that
            # can pass. A node that gave up that way is started again, once, after whatever it left.
            if nodes[1].poll() is not None and "timed out during startup" in log and restarts:
                stop_ray_node(nodes[1])
                nodes[1], restarts = start_node(), restarts - 1
            assert time.time() < deadline and nodes[1].poll() is None, log
            time.sleep(2)
        yield address, env, temp_dirs
    finally:
        for node in reversed(nodes):
            stop_ray_node(node)
        for folder in temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


def ray_list(address: str, env: dict, what: str, *filters: str) -> list[dict]:
    """`ray list <what> --detail` through the State API of the head at `address`."""
    command = [f"{BIN}/ray", "list", what, "--address", address, "--detail", "--format", "json", "--limit", "1000"]
    for condition in filters:
        command += ["--filter", condition]
    listing = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    if listing.stdout.strip() == "No resource in the cluster":  # Ray's CLI says so, even in json, for none
        return []
    return json.loads(listing.stdout)


@pytest.mark.parametrize("overrides, key", [
    (["train.num_workers=8"], "train.num_workers"),
    (["train.cpus_per_worker=6"], "train.cpus_per_worker"),
    (["train.num_workers=3", "train.placement_strategy=STRICT_SPREAD"], "train.placement_strategy")],
    ids=["workers", "cpus_per_worker", "one_worker_a_node"])
def test_more_than_the_cluster_holds_fails_before_training(two_nodes, job_package, tmp_path, overrides, key):
    """The cluster has 4 CPUs on 2 nodes: 8 workers x 0.5 CPU plus the pipelines' 3 cannot all run,
    no node holds a 6-CPU worker, and 2 nodes cannot take 3 workers one a node. Each fails at
    once, naming the key, with nothing written."""
    address, env, _ = two_nodes
    run = submit_job(address, env, job_package, [
        "--config", "configs/tiny.yaml", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--set", f"experiment.storage_path={tmp_path / 'runs'}", "--set", f"data.prepared_dir={tmp_path / 'prepared'}",
        *[arg for override in overrides for arg in ("--set", override)]])
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-5000:]
    assert f"config key '{key}'" in output, output[-5000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "prepared").exists()


def test_two_nodes_train_through_object_storage_and_an_mlflow_server(two_nodes, object_store, job_package, tmp_path):
    """The job (5 epochs) is stopped with `ray job stop` once its first checkpoint is registered in
    the bucket, then the same command is submitted again: it picks up after the checkpointed epoch
    (not from scratch), succeeds, prints how to browse its run, and continues the same MLflow run."""
    address, env, temp_dirs = two_nodes
    store = bucket_store(object_store)
    mlflow_port = free_port()
    server = start_server(f"sqlite:///{tmp_path / 'mlflow.db'}", mlflow_port, artifacts=str(tmp_path / "artifacts"))
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    epochs = 5  # a tiny epoch takes seconds: the stop must land before the last one's checkpoint
    arguments = [
        "--config", "configs/tiny.yaml", "--tracking-uri", tracking_uri,
        "--set", f"data.prepared_dir=s3://{BUCKET}/prepared", "--set", f"experiment.storage_path=s3://{BUCKET}/runs",
        "--set", "experiment.name=two-nodes", "--set", f"train.epochs={epochs}",
        "--set", "train.placement_strategy=STRICT_SPREAD", "--set", "model.text.train_mode=frozen"]
    try:
        run = submit_job(address, env, job_package, arguments, options=("--submission-id", "stop-me", "--no-wait"))
        assert run.returncode == 0, run.stdout + run.stderr
        deadline = time.time() + 600
        while time.time() < deadline and not registered_checkpoints(store, f"{BUCKET}/runs/two-nodes"):
            time.sleep(0.2)
        assert registered_checkpoints(store, f"{BUCKET}/runs/two-nodes"), "no checkpoint before the deadline"
        stop = subprocess.run([f"{BIN}/ray", "job", "stop", "--address", address, "stop-me"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        status = subprocess.run([f"{BIN}/ray", "job", "status", "--address", address, "stop-me"], env=env,
                                capture_output=True, text=True, timeout=60).stdout
        assert "was stopped" in status, status

        resumed = submit_job(address, env, job_package, arguments)
        output = resumed.stdout + resumed.stderr
        assert resumed.returncode == 0 and "succeeded" in output, output[-5000:]
        assert f"Browse the run: open {tracking_uri} in a browser" in output, output[-5000:]
        assert "Resumed from the checkpoint of epoch" in output, output[-5000:]
        epoch = int(output.split("Resumed from the checkpoint of epoch ")[1].split()[0])
        assert 1 <= epoch < epochs

        # Every worker group of both jobs had its two workers one on each node, as Ray's State API
        # saw them. A job may start its group more than once (Ray Train starts a new one after a
        # failed start): in one CI run one job's four workers came from two groups.
        groups, jobs = {}, set()
        for worker in ray_list(address, env, "actors", "class_name=RayTrainWorker"):
            groups.setdefault(worker["placement_group_id"], []).append(worker["node_id"])
            jobs.add(worker["job_id"])
        assert len(jobs) == 2 and all(len(nodes) == len(set(nodes)) == 2 for nodes in groups.values()), groups

        # The run, read back through the server: finished, with test metrics, the checkpoint's
        # URI and the model (whose artifacts went through the server).
        client = mlflow.MlflowClient(tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name("interestformer").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same run, continued
        assert runs[0].data.tags["resumes"] == "1"
        assert "test_ndcg_at_10" in runs[0].data.metrics
        run_id = runs[0].info.run_id
        steps = [m.step for m in sorted(client.get_metric_history(run_id, "val_ndcg_at_10"), key=lambda m: m.timestamp)]
        # The first job validated epochs 1..k; k may pass the checkpoint it resumed from, since the
        # stop lands a moment after the epochs' metrics are logged. The second validated each epoch
        # after that checkpoint once; the checkpoint's epoch and those before it never again.
        first, second = steps[:len(steps) - (epochs - epoch)], steps[len(steps) - (epochs - epoch):]
        per_epoch = steps[0]
        assert first == [per_epoch * e for e in range(1, len(first) + 1)] and len(first) >= epoch, steps
        assert second == [per_epoch * e for e in range(epoch + 1, epochs + 1)], steps
        checkpoint = client.download_artifacts(run_id, "checkpoint_path.txt", str(tmp_path))
        assert open(checkpoint).read().startswith(f"s3://{BUCKET}/runs/two-nodes/checkpoint_")
        assert client.search_logged_models([runs[0].info.experiment_id])  # the model, through the server

        # Everything the job kept is in the bucket: prepared data, the frozen text encoder's
        # features, and checkpoints holding both ranks' DeepSpeed shards.
        objects = [info.path for info in store.get_file_info(pafs.FileSelector(BUCKET, recursive=True)) if info.is_file]
        assert f"{BUCKET}/prepared/meta.json" in objects
        assert any(path.startswith(f"{BUCKET}/prepared/tokenizer/") for path in objects)
        assert any(path.startswith(f"{BUCKET}/prepared/features/") for path in objects), objects
        shards = {path.rsplit("/", 1)[1] for path in objects if path.startswith(f"{BUCKET}/runs/two-nodes/checkpoint_")}
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= shards

        # Nothing was written beside the code either node ran: the job's working folder, which
        # `--working-dir .` unpacked on each node, holds no runs/, data/, MLflow store or a local
        # folder named after the bucket (what the demo generator wrote before it used pyarrow).
        copies = [folder for temp_dir in temp_dirs
                  for folder in glob.glob(f"{temp_dir}/session_*/runtime_resources/working_dir_files/*/")]
        assert {folder.split("/session_")[0] for folder in copies} == set(temp_dirs), copies
        for folder in copies:
            written = {"runs", "data", "mlruns", "mlartifacts", "mlflow.db", "s3:"} & set(os.listdir(folder))
            assert not written, (folder, written)
        # The package travelled with the job (runtime_env py_modules) to both nodes.
        shipped = [temp_dir for temp_dir in temp_dirs if glob.glob(
            f"{temp_dir}/session_*/runtime_resources/py_modules_files/*/interestformer/jobs/train.py")]
        assert shipped == temp_dirs, temp_dirs
    finally:
        stop_server(server)


def registered_checkpoints(store: pafs.FileSystem, run_folder: str) -> list[str]:
    """The checkpoints Ray Train has registered for the run in the bucket (each worker's part
    uploaded): a checkpoint folder alone may still be missing the other worker's files."""
    try:
        with store.open_input_stream(f"{run_folder}/checkpoint_manager_snapshot.json") as f:
            return [c["checkpoint_dir_name"] for c in json.loads(f.read())["checkpoint_results"]]
    except (FileNotFoundError, OSError, json.JSONDecodeError):  # not written yet, or being rewritten
        return []

"""The way users run jobs: a Ray head on 127.0.0.1 and `ray job submit --working-dir .` through
the real Jobs API. A job succeeds; a job asking for more workers than the cluster holds fails
before it takes anything; a job stopped with `ray job stop` resumes from its checkpoint when
submitted again. The head this module started is stopped at the end."""

import os
import subprocess
import time

import mlflow
import pytest

from conftest import BIN, free_port, ray_env, ray_node_command, stop_ray_node, submit_job, wait_for_job_api

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` in its own process (see conftest.ray_node_command)."""
    log = str(tmp_path_factory.mktemp("ray_head") / "head.log")
    gcs_port, dashboard_port = free_port(), free_port()
    env = ray_env()
    head = subprocess.Popen(
        ray_node_command("--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={dashboard_port}", "--num-cpus=4"),
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    wait_for_job_api(address, env, head, log)
    yield address, env
    stop_ray_node(head)
    # A killed head leaves its address behind, where a later bare ray.init() would find it.
    current = "/tmp/ray/ray_current_cluster"
    if os.path.exists(current) and open(current).read().strip().endswith(f":{gcs_port}"):
        os.remove(current)


def submit(address: str, env: dict, package: str, tmp_path, *args: str, options: tuple = (),
           prepared_dir: str = "") -> subprocess.CompletedProcess:
    """`ray job submit [options]` of the training job on the tiny config with `args`, this test's
    storage and MLflow store (and its prepared data unless prepared_dir is given)."""
    return submit_job(address, env, package, [
        "--config", "configs/tiny.yaml",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--set", f"experiment.storage_path={tmp_path / 'runs'}",
        "--set", f"data.prepared_dir={prepared_dir or tmp_path / 'prepared'}", *args], options)


@pytest.mark.parametrize("override, key", [("train.num_workers=8", "train.num_workers"),
                                           ("train.cpus_per_worker=6", "train.cpus_per_worker"),
                                           ("train.placement_strategy=STRICT_SPREAD", "train.placement_strategy")])
def test_more_than_the_cluster_holds_fails_before_training(ray_head, job_package, tmp_path, override, key):
    """The head has 4 CPUs: 8 workers x 0.5 CPU plus the pipelines' 3 cannot all run, no node
    holds a 6-CPU worker, and the one node cannot take the tiny config's 2 workers one a node.
    Each fails at once, naming the key, with nothing written."""
    address, env = ray_head
    run = submit(address, env, job_package, tmp_path, "--set", override)
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-5000:]
    assert f"config key '{key}'" in output, output[-5000:]
    assert not (tmp_path / "runs").exists()


def test_a_stopped_job_resumes_from_its_checkpoint_in_the_same_mlflow_run(ray_head, job_package, tmp_path, tiny_prepared_dir):
    """`ray job submit`, then `ray job stop` once the first checkpoint exists, then the same
    command again: the job picks up after the checkpointed epoch (not from scratch), succeeds,
    prints how to browse its run, and continues the same MLflow run."""
    address, env = ray_head
    epochs = 3
    args = ("--set", "experiment.name=stopped", "--set", f"train.epochs={epochs}")
    run = submit(address, env, job_package, tmp_path, *args, options=("--submission-id", "stop-me", "--no-wait"),
                 prepared_dir=tiny_prepared_dir)
    assert run.returncode == 0, run.stdout + run.stderr
    run_folder = tmp_path / "runs" / "stopped"
    deadline = time.time() + 600
    while time.time() < deadline and not list(run_folder.glob("checkpoint_*/checkpoint.json")):
        time.sleep(0.5)
    assert list(run_folder.glob("checkpoint_*/checkpoint.json")), "no checkpoint before the deadline"
    stop = subprocess.run([f"{BIN}/ray", "job", "stop", "--address", address, "stop-me"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = subprocess.run([f"{BIN}/ray", "job", "status", "--address", address, "stop-me"], env=env,
                            capture_output=True, text=True, timeout=60).stdout
    assert "was stopped" in status, status

    resumed = submit(address, env, job_package, tmp_path, *args, prepared_dir=tiny_prepared_dir)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0 and "succeeded" in output, output[-5000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in output
    assert "Resumed from the checkpoint of epoch" in output, output[-5000:]
    epoch = int(output.split("Resumed from the checkpoint of epoch ")[1].split()[0])
    assert 1 <= epoch < epochs

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("interestformer").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same run, continued
    assert runs[0].data.tags["resumes"] == "1"
    steps = [m.step for m in sorted(client.get_metric_history(runs[0].info.run_id, "val_ndcg_at_10"),
                                    key=lambda m: m.timestamp)]
    # The first attempt validated epochs 1..k; k may pass the checkpoint it resumed from, since the
    # stop lands a moment after the epochs' metrics are logged. The second validated each epoch after
    # that checkpoint once; the checkpoint's epoch and those before it never again.
    first, second = steps[:len(steps) - (epochs - epoch)], steps[len(steps) - (epochs - epoch):]
    per_epoch = steps[0]
    assert first == [per_epoch * e for e in range(1, len(first) + 1)] and len(first) >= epoch, steps
    assert second == [per_epoch * e for e in range(epoch + 1, epochs + 1)], steps

"""The way users run jobs: a Ray head on 127.0.0.1, `ray job submit --working-dir .` through the
real Jobs API, wait for success, stop the head this test started."""

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import PROJECT_DIR

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` in its own process: ending it stops exactly the processes it
    started (unlike `ray stop`, which would stop every Ray on the machine)."""
    gcs_port, dashboard_port = free_port(), free_port()
    # Every port of its own: the in-process Ray of other tests already holds Ray's default agent
    # ports, and a head whose dashboard agent cannot bind never accepts a job.
    own_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    # Token authentication on both sides: the head creates ~/.ray/auth_token if there is none,
    # and the job CLI sends it (Ray 2.60's CLI does not turn it on by itself).
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [f"{BIN}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=4",
         "--disable-usage-stats", *own_ports],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run([f"{BIN}/ray", "job", "list", "--address", address], env=env,
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            break
        assert head.poll() is None, (tmp_path / "head.log").read_text()
        time.sleep(2)
    else:
        pytest.fail("the Ray head did not answer: " + (tmp_path / "head.log").read_text())
    yield address, env
    head.terminate()
    head.wait(timeout=120)
    # A terminated head leaves its address behind, where a later bare ray.init() would find it.
    current = "/tmp/ray/ray_current_cluster"
    if os.path.exists(current) and open(current).read().strip().endswith(f":{gcs_port}"):
        os.remove(current)


def test_submitted_training_job_succeeds(ray_head, tmp_path):
    address, env = ray_head
    command = [f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
               "python", "-m", "jobs.train", "--config", "configs/tiny.yaml",
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
               "--set", f"experiment.storage_path={tmp_path / 'runs'}",
               "--set", f"data.prepared_dir={tmp_path / 'prepared'}",
               "--set", "train.epochs=1"]
    for _ in range(30):  # the head's job agent comes up a little after its dashboard answers
        run = subprocess.run(command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in run.stderr:
            break
        time.sleep(2)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    assert "succeeded" in output, output[-5000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in output
    assert os.path.isfile(tmp_path / "mlflow.db")
    assert any(name.startswith("run-") for name in os.listdir(tmp_path / "runs"))

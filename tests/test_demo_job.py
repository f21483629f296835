"""The README's main job on its embedded default (the demo): it must beat most-popular, its
console shows the run's progress and results only, and its explanations find the planted topics."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from conftest import PROJECT_DIR, server_output

pytestmark = pytest.mark.slow


def test_demo_beats_most_popular_on_the_test_split(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = subprocess.run(
        # Prepared afresh, as in a fresh clone: prepare's console is checked too.
        [sys.executable, "-m", "jobs.train", "--tracking-uri", uri,
         "--set", f"experiment.storage_path={tmp_path / 'runs'}", "--set", f"data.prepared_dir={tmp_path / 'demo'}"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=1100,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    print(output[output.index("Finished in"):])  # the table the user sees: both rows
    assert "most popular" in output
    # One clean display: a line per epoch from the driver, none of the workers' or libraries' output.
    assert re.search(r"^epoch 1/\d+: \d+ batches, loss \d", run.stdout + run.stderr, re.M), output[-3000:]
    # core_worker.cc: Ray's driver logs a line for every Ray Data actor pool it starts; the job starts none.
    for noise in ("RayTrainWorker", "Warning", "deprecated", "Progress bars", "Started a local Ray", "INFO",
                  "worker processes have been started", "core_worker.cc"):
        assert noise not in output, (noise, output[-5000:])
    check_printed_ui_command(output, uri, tmp_path)

    client = mlflow.MlflowClient(uri)
    [result] = client.search_runs([client.get_experiment_by_name("interestformer").experiment_id])
    metrics = result.data.metrics
    for k in (10, 50):
        assert metrics[f"test_ndcg_at_{k}"] > metrics[f"most_popular_test_ndcg_at_{k}"]
        assert metrics[f"test_hr_at_{k}"] > metrics[f"most_popular_test_hr_at_{k}"]
    assert metrics["test_ndcg_at_10"] > 1.5 * metrics["most_popular_test_ndcg_at_10"]
    check_explanations_find_the_planted_topics(re.search(r"^Checkpoint: (.*)$", output, re.M).group(1), tmp_path)


def check_explanations_find_the_planted_topics(checkpoint: str, tmp_path):
    """The demo's events follow planted topics, so a good reason for a recommendation is a history
    item of its topic. The shipped explanations (the specific drop) must name such items more often
    than the newest event or a random history item is one, and name the newest event less often
    than the raw score drop does. 600 users, as the benchmark measures: with 200, the user draw
    alone moved the margin over the newest event by 0.04 (0.047 and 0.083 on one checkpoint)."""
    from benchmarks.explanations import main

    figures = main(["--checkpoint", checkpoint, "--users", "600", "--out", str(tmp_path / "explanations.json")])
    shipped, raw = figures["methods"]["specific drop"], figures["methods"]["raw drop"]
    # Two runs of today's demo measured 0.087 and 0.095 over the newest event, 0.19 over a random item.
    assert shipped["top_reason_shares_a_label"] > figures["newest_event_shares_a_label"] + 0.05, figures
    assert shipped["top_reason_shares_a_label"] > figures["random_history_item_shares_a_label"] + 0.1, figures
    assert shipped["top_reason_is_newest"] < raw["top_reason_is_newest"], figures


def check_printed_ui_command(output: str, uri: str, tmp_path):
    """Runs the exact command the job printed (on a free port) and finds the run through it."""
    command = re.search(r"Browse the run: (.*)", output).group(1)
    assert f"ui --backend-store-uri {uri} --host 127.0.0.1" in command
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = shlex.split(command.replace("--port 5000", f"--port {port}"))
    log = tmp_path / "mlflow-ui.log"
    with open(log, "w") as console:
        server = subprocess.Popen(args, cwd=PROJECT_DIR, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300  # mlflow ui starts slowly on a loaded machine
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=interestformer")
                body = json.loads(urllib.request.urlopen(request, timeout=5).read())
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, \
                    f"the printed MLflow UI command did not serve on port {port}:\n{server_output(str(log))}"
                time.sleep(1)
        assert body["experiment"]["name"] == "interestformer"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        server.wait(timeout=60)

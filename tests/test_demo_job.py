"""The README's main job on its embedded default (the demo): it must beat most-popular."""

import subprocess
import sys

import mlflow
import pytest

from conftest import PROJECT_DIR

pytestmark = pytest.mark.slow


def test_demo_beats_most_popular_on_the_test_split(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--tracking-uri", uri, "--set", f"experiment.storage_path={tmp_path / 'runs'}"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=850,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    print(output[output.index("Finished in"):])  # the table the user sees: both rows
    assert "most popular" in output and f"Browse the run: mlflow ui --backend-store-uri {uri}" in output

    client = mlflow.MlflowClient(uri)
    [result] = client.search_runs([client.get_experiment_by_name("interestformer").experiment_id])
    metrics = result.data.metrics
    for k in (10, 50):
        assert metrics[f"test_ndcg_at_{k}"] > metrics[f"most_popular_test_ndcg_at_{k}"]
        assert metrics[f"test_hr_at_{k}"] > metrics[f"most_popular_test_hr_at_{k}"]
    assert metrics["test_ndcg_at_10"] > 1.5 * metrics["most_popular_test_ndcg_at_10"]

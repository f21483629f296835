"""Our datasets/ layer never shadows Hugging Face `datasets` (installed beside it)."""

import subprocess
import sys

from conftest import PROJECT_DIR

SCRIPT = """
import datasets
from interestformer.datasets.pipeline import sequence_batches
from interestformer.jobs.train import train
import transformers, mlflow.data

assert "site-packages" in datasets.__file__, datasets.__file__
table = datasets.Dataset.from_dict({"user_id": ["u1", "u2"], "item_id": ["a", "b"]})
assert table.num_rows == 2
from mlflow.data.huggingface_dataset import from_huggingface
assert from_huggingface(table).profile["num_rows"] == 2
print("ok")
"""


def test_hugging_face_datasets_and_ours_import_side_by_side():
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=PROJECT_DIR, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")


def test_the_data_pipeline_module_imports_without_torch():
    """Ray Data's split coordinators and task workers import datasets/pipeline.py to unpickle its
    packers; torch there would cost each of them seconds of CPU."""
    script = "import sys, interestformer.datasets.pipeline; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "False"

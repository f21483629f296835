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

"""InterestFormer as users of other training libraries install it: a wheel built from this checkout,
installed into a fresh virtual environment, run through its console script from a folder outside
the checkout; its run's MLflow model then loads there.

The fresh environment takes the dependencies (torch, Ray, DeepSpeed, MLflow...) from the
project's .venv through a .pth line, not from PyPI: the test is about our package, and the
machine has no internet. A plain path line does not run .venv's own .pth files, so the checkout's
editable install stays out of it."""

import glob
import json
import os
import subprocess
import sys
import sysconfig

import pytest

from conftest import PROJECT_DIR, committable_copy

pytestmark = pytest.mark.slow

LOAD_AND_PREDICT = """
import json, sys
import mlflow
from mlflow import MlflowClient

client = MlflowClient()
[run] = client.search_runs([client.get_experiment_by_name("interestformer").experiment_id])
model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
out = model.predict(model.input_example, params={"k": 5})
code = [m.__file__ for name, m in sys.modules.items() if name.startswith("interestformer.") and getattr(m, "__file__", None)]
print(json.dumps({"status": run.info.status, "items": [list(r) for r in out.item_ids], "code": code}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    """The bin/ folder of a fresh venv holding only our wheel (and .venv's packages by path)."""
    root = tmp_path_factory.mktemp("package")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist"), committable_copy(root / "source")], check=True, timeout=300)
    [wheel] = glob.glob(str(root / "dist" / "interestformer-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    python = str(root / "venv" / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "dependencies-from-project-venv.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
                   check=True, timeout=300)
    return str(root / "venv" / "bin")


def test_the_wheel_installs_a_package_whose_console_script_trains_and_whose_model_loads(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    work = tmp_path / "work"  # the user's own folder, outside the checkout
    work.mkdir()
    scripts = ("train", "evaluate", "embed-items", "recommend", "sweep", "convert")
    helps = {script: subprocess.Popen([f"{installed}/interestformer-{script}", "--help"], cwd=work, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script in scripts}  # all at once: each spends seconds importing its job
    for script, shown in helps.items():
        out, err = shown.communicate(timeout=300)
        assert shown.returncode == 0, (script, err[-2000:])
        assert f"usage: interestformer-{script}" in out, out[:300]

    trained = subprocess.run(
        [f"{installed}/interestformer-train", "--config", os.path.join(PROJECT_DIR, "configs", "tiny.yaml"),
         "--set", "train.epochs=1", "--set", "data.prepared_dir=prepared"],
        cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    # Working files land in the current folder, none beside the installed package.
    assert {"mlflow.db", "mlartifacts", "runs", "prepared"} <= set(os.listdir(work)), os.listdir(work)
    package = subprocess.run([f"{installed}/python", "-c", "import interestformer.jobs, os; "
                              "print(os.path.dirname(list(interestformer.jobs.__path__)[0]))"],
                             cwd=work, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert not package.startswith(PROJECT_DIR), package
    assert set(os.listdir(package)) <= {"errors.py", "datasets", "models", "jobs", "tuning", "__pycache__"}

    loaded = subprocess.run([f"{installed}/python", "-c", LOAD_AND_PREDICT], cwd=work, capture_output=True, text=True,
                            env=env | {"MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    served = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert served["status"] == "FINISHED"
    assert len(served["items"]) == 1 and len(served["items"][0]) == 5
    assert served["code"] and not any(path.startswith((PROJECT_DIR, package)) for path in served["code"]), served["code"]

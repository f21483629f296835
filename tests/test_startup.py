"""What a job's Ray processes start with. On 2 cores every CPU-second a process spends starting
is about half a second of the job's wall time: the modules those processes import leave out the
libraries they never call, and a local Ray runs no preemption watcher."""

import os
import subprocess
import sys

import pytest

from conftest import PROJECT_DIR


@pytest.mark.parametrize("module, library", [
    ("interestformer.datasets.pipeline", "torch"),  # Ray Data's processes unpickle its packers
    ("interestformer.jobs.train", "matplotlib"),  # every training worker runs its train_loop_per_worker
    ("interestformer.tuning.sweep", "matplotlib"),  # every Tune trial runs its trainable
])
def test_modules_that_ray_processes_import_leave_out_libraries_they_never_call(module, library):
    script = f"import sys, {module}; print({library!r} in sys.modules)"
    run = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "False"


# Ray Train starts its controller as an actor with environment variables of its own, merged with
# the job's: the controller reads the watcher's switch, so this actor stands in for it.
LOCAL_RAY_SCRIPT = """
import os, ray
from interestformer.jobs.cluster import start_ray

start_ray(2)

@ray.remote(num_cpus=0, runtime_env={"env_vars": {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}})
class Controller:
    def watcher_switch(self):
        return os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")

print(ray.get(Controller.remote().watcher_switch.remote()))
"""


@pytest.mark.slow
def test_a_local_ray_switches_off_the_preemption_watcher():
    """A local Ray's one node goes when the job goes; the watcher would be one more process."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}
    run = subprocess.run([sys.executable, "-c", LOCAL_RAY_SCRIPT], cwd=PROJECT_DIR, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "0", run.stdout[-3000:]

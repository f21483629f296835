"""Time to a first result, as a new user meets it: the training job's command line, timed from
the command to its final table, each run in a fresh process with its own MLflow store and
checkpoint folder.

    .venv/bin/python -m benchmarks.first_result

1. tiny, cold: configs/tiny.yaml for 1 epoch, its data prepared afresh (target: 60 s);
2. tiny, warm: the same again, the prepared data cached;
3. demo, cold: `python -m jobs.train` on the built-in demo (3 epochs, data generated and prepared
   afresh), what `make demo` runs once the venv exists (target: 2 minutes).

Each run's stages come from the moments its console lines appear: the data line (prepare and the
MLflow run started), the first epoch's line (the workers, DeepSpeed and a first epoch), and the
final table (the rest of training, the test split, the report and the MLflow model). Writes
benchmarks/results/first_result.json.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.common import PROJECT_DIR, write_results

TARGETS_S = {"tiny_cold": 60.0, "demo_cold": 120.0}
MARKS = {"data_ready_s": "MLflow run ", "first_epoch_s": "epoch 1/", "finished_s": "Finished in"}


def timed_run(args: list[str], workdir: str) -> dict:
    """Runs `python -m jobs.train ARGS` with its own store and checkpoints; the seconds until each
    mark's first line, and in all."""
    os.makedirs(workdir, exist_ok=True)
    command = [sys.executable, "-m", "jobs.train", "--tracking-uri", f"sqlite:///{workdir}/mlflow.db",
               "--set", f"experiment.storage_path={workdir}/runs", *args]
    started, seen = time.perf_counter(), {}
    with subprocess.Popen(command, cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as job:
        for line in job.stdout:
            for mark, text in MARKS.items():
                if mark not in seen and line.startswith(text):
                    seen[mark] = time.perf_counter() - started
    if job.returncode:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {job.returncode}")
    return {**seen, "total_s": time.perf_counter() - started}


def main(argv=None) -> dict:
    argparse.ArgumentParser(prog="python -m benchmarks.first_result", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    runs = {}
    with tempfile.TemporaryDirectory() as workdir:
        tiny = ["--config", os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), "--set", "train.epochs=1",
                "--set", f"data.prepared_dir={workdir}/prepared/tiny"]
        runs["tiny_cold"] = timed_run(tiny, os.path.join(workdir, "tiny_cold"))
        runs["tiny_warm"] = timed_run(tiny, os.path.join(workdir, "tiny_warm"))
        runs["demo_cold"] = timed_run(["--set", f"data.prepared_dir={workdir}/prepared/demo"],
                                      os.path.join(workdir, "demo_cold"))
    print("\n| run | data ready s | first epoch s | finished s | target s |\n|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | " + " | ".join(f"{run.get(mark, float('nan')):.0f}" for mark in MARKS)
              + f" | {TARGETS_S.get(name, '')} |")
    write_results("first_result", {"runs": runs, "targets_s": TARGETS_S})
    return runs


if __name__ == "__main__":
    main()

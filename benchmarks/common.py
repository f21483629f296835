"""What every benchmark records beside its figures (the machine, the date and the commit), and how
results files merge runs made at different times, seeds included."""

import json
import os
import platform
import statistics
import subprocess
from datetime import datetime, timezone


PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks run from a checkout
RESULTS_DIR = os.path.join(PROJECT_DIR, "benchmarks", "results")


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.machine())
    return platform.machine()


def machine() -> str:
    """CPU cores and model (with whether it computes bf16 natively: without, bf16 runs several
    times slower than fp32), memory and GPU."""
    from interestformer.jobs.distributed import cpu_has_native_bf16

    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # the description must never fail the benchmark
        gpu = "GPU unknown"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"{os.cpu_count()} CPU cores ({cpu_name()}, {bf16}), {memory:.0f} GiB, {gpu}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True)
        # The results files do not count: a benchmark that runs in parts writes its own as it goes.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results"], cwd=PROJECT_DIR, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def stamp() -> dict:
    """machine, date (UTC) and commit, as every benchmarks/results/*.json records them."""
    return {"machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": commit()}


def write_results(name: str, figures: dict) -> str:
    """Writes benchmarks/results/<name>.json: the figures with machine, date and commit; returns its path."""
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(path, "w") as f:
        json.dump({**figures, **stamp()}, f, indent=1)
    print(f"wrote {path}")
    return path


def read_results(path: str) -> dict:
    """A merged results file's figures so far ({} before its first run): benchmarks that run in
    parts (a dataset or config at a time) add theirs to it."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def save_results(path: str, results: dict):
    """Writes a merged results file; called after every part, so a later failure keeps the earlier ones."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def parse_seeds(text: str) -> list[int]:
    """A --seeds value ("0,1,2") as train.seed values; ValueError unless it names at least one integer."""
    seeds = [int(seed) for seed in text.split(",") if seed.strip()]
    if not seeds:
        raise ValueError(text)
    return seeds


def with_earlier_seeds(earlier: dict | None, runs: list[dict], overrides: list[str]) -> list[dict]:
    """This invocation's runs (each with its "seed") plus the earlier ones in a results row with the
    same overrides and other seeds, so that seeds can be added a run at a time (a row from before
    seeds were recorded counts as seed 0)."""
    if not earlier or earlier.get("overrides") != overrides:
        return runs
    seeds = {run["seed"] for run in runs}
    return [run for run in earlier.get("runs", [{"seed": 0, **earlier}]) if run["seed"] not in seeds] + runs


def across_seeds(runs: list[dict], keys) -> dict:
    """The mean of each of `keys` over the seeds' runs (those every run has), and its sample standard
    deviation (sd_*); with the last run's other fields, the seeds and the runs themselves."""
    row = {}
    for key in keys:
        if all(key in run for run in runs):
            values = [run[key] for run in runs]
            row[key] = statistics.mean(values)
            row[f"sd_{key}"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return {**runs[-1], **row, "seeds": [run["seed"] for run in runs], "runs": runs}

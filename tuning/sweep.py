"""A Ray Tune sweep over the training job: each trial is a whole jobs.train run.

    interestformer-sweep --config configs/sweep_tiny.yaml             # 4 tiny trials, a few minutes
    interestformer-sweep --config configs/sweep_tiny.yaml --resume    # a stopped sweep goes on
    ray job submit --working-dir . --runtime-env-json '{"py_modules": ["build/job/interestformer"]}' \
        -- python -m interestformer.tuning.sweep --config configs/my_sweep.yaml   # docs/cluster.md

Each trial builds its own TorchTrainer (DeepSpeed workers and all) through jobs.train.train: a
Tuner whose trials launch TorchTrainers is the form Ray 2.60 recommends for Train V2. Train's
per-epoch reports reach Tune through TuneReportCallback, so ASHA can stop a weak trial after any
epoch. The search space is `tune.search_space` in the config file: config keys and their
distributions. In MLflow the sweep is a parent run with one child run per trial. At the end the
best trial's config is written out as a ready-to-run YAML and its model is registered in MLflow.
"""

import copy
import os
import sys

import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from interestformer.errors import ConfigError
from interestformer.datasets.prepare import prepare
from interestformer.jobs import tracking
from interestformer.jobs.config import JobConfig, config_parser, load_config, set_key
from interestformer.jobs.report import markdown
from interestformer.jobs.cluster import check_cluster_fits, data_cpus, ensure_ray
from interestformer.jobs.train import tokenizer_path, train

TRIAL_CPUS = 0.25  # a trial only drives its TorchTrainer; its workers reserve their own CPUs
DISTRIBUTIONS = {
    "choice": tune.choice,
    "grid": tune.grid_search,
    "uniform": lambda bounds: tune.uniform(*bounds),
    "loguniform": lambda bounds: tune.loguniform(*bounds),
    "randint": lambda bounds: tune.randint(bounds[0], bounds[1] + 1),  # both ends included, as written
}


def search_space(cfg: JobConfig) -> dict:
    """Tune's distributions of the config's search space, keyed by config path."""
    return {key: DISTRIBUTIONS[kind](values) for key, spec in cfg.tune.search_space.items()
            for kind, values in spec.items()}


def trial_config(base: dict, values: dict) -> JobConfig:
    """The sweep's config with one trial's sampled values applied."""
    config = copy.deepcopy(base)
    for key, value in values.items():
        set_key(config, key, value)
    return JobConfig.from_dict(config)


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


class EpochReports(TuneReportCallback):
    """Passes each validated epoch's metrics on to Tune, except the last epoch's (the end of
    train.epochs, or an early stop): the trial reports its best epoch's itself once training has
    returned. A scheduler stops a trial on a report (ASHA always does at its last epoch), and a stop
    on the last epoch's report would cut off the trial's test evaluation and model logging."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if self.metric in metrics[0] and "stopped_epoch" not in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(params: dict):
    """One Tune trial: a full training run whose epochs report to Tune. Its Ray Train run and MLflow
    child run are named after the trial, so a retried or resumed trial continues both."""
    cfg = trial_config(params["config"], params["values"])
    cfg.experiment.name = trial_run_name(params["sweep_name"], tune.get_context().get_trial_id())
    summary = train(cfg, parent_run_id=params["parent_run_id"], callbacks=[EpochReports(cfg.train.select_metric)],
                    display=False)
    tune.report(summary["validation"])


def concurrent_trials(cfg: JobConfig) -> int:
    """tune.max_concurrent_trials, or (0) as many trials as the cluster's CPUs and GPUs hold: each
    takes its workers, data_cpus for its data pipelines and TRIAL_CPUS for its driver."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    resources = ray.cluster_resources() if ray.is_initialized() else {"CPU": os.cpu_count() or 1}
    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker + data_cpus(cfg) + TRIAL_CPUS
    trials = int(resources.get("CPU", 1) // per_trial)
    if cfg.train.use_gpu:
        trials = min(trials, int(resources.get("GPU", 0) // cfg.train.num_workers))
    return max(1, trials)


def sweep(cfg: JobConfig, resume: bool = False) -> tune.ResultGrid:
    name = cfg.experiment.name or "sweep"
    path = os.path.join(cfg.experiment.storage_path, name)
    exists = tune.Tuner.can_restore(path)  # checked before any cluster resource is taken
    if exists and not resume:
        raise ConfigError("experiment.name", f"a sweep named {name!r} is already in {cfg.experiment.storage_path}: "
                                             "pass --resume to continue it, or choose another name")
    if resume and not exists:
        raise ConfigError("experiment.name", f"no sweep named {name!r} in {cfg.experiment.storage_path} to resume")
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    cfg.experiment.tracking_uri = uri  # as resolved here: Tune runs each trial in a folder of its own
    if os.environ.get("RAY_ADDRESS"):
        ensure_ray(cfg)  # joins the cluster, whose resources decide how many trials fit
    concurrent = concurrent_trials(cfg)
    ensure_ray(cfg, concurrent_runs=concurrent, driver_cpus=TRIAL_CPUS)  # locally: a Ray sized for that many trials
    if os.environ.get("RAY_ADDRESS"):
        check_cluster_fits(cfg, concurrent, TRIAL_CPUS)
    prepare(cfg.data, tokenizer_path=tokenizer_path(cfg))  # once, before trials share it
    parent_run_id = tracking.start_parent_run(cfg, name)
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_CPUS})
    if resume:
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"config": cfg.to_dict(), "parent_run_id": parent_run_id, "sweep_name": name,
                         "values": search_space(cfg)},
            tune_config=tune.TuneConfig(
                metric=cfg.train.select_metric, mode="max", num_samples=cfg.tune.num_samples,
                search_alg=_searcher(cfg), scheduler=_scheduler(cfg), max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(
                name=name, storage_path=cfg.experiment.storage_path,
                failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures, fail_fast=cfg.tune.fail_fast)),
        )
    print(f"Sweep {name}: {concurrent} trial(s) at once; MLflow parent run {parent_run_id} in {uri}", flush=True)
    results = tuner.fit()
    if results.num_terminated + results.num_errors < len(results):  # stopped (Ctrl-C): nothing is final
        tracking.end_run(uri, parent_run_id, "KILLED")
        print(f"\nSweep {name} stopped with trials unfinished. Continue it with: "
              f"python -m tuning.sweep --config <the same config> --resume", flush=True)
        return results
    return report(cfg, name, path, uri, parent_run_id, results)


def _searcher(cfg: JobConfig):
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.train.seed)
    return None  # Tune's random and grid search


def _scheduler(cfg: JobConfig):
    if cfg.tune.scheduler == "asha":  # a trial is stopped only at an epoch's end, after grace_period epochs
        return ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                             grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                             reduction_factor=cfg.tune.reduction_factor)
    return FIFOScheduler()


def report(cfg: JobConfig, name: str, path: str, uri: str, parent_run_id: str, results: tune.ResultGrid):
    """Writes the best trial's config, registers its model, closes the MLflow runs, prints a table."""
    metric = cfg.train.select_metric
    rows, failed = [], set()
    for result in results:
        trial_id = result.metrics.get("trial_id", "") if result.metrics else ""
        trial = trial_run_name(name, trial_id) if trial_id else os.path.basename(result.path)
        if result.error:
            failed.add(trial)
        rows.append({"trial": trial,
                     **{key: result.config["values"][key] for key in sorted(result.config["values"])},
                     "epochs": (result.metrics or {}).get("training_iteration", 0),
                     metric: (result.metrics or {}).get(metric, float("nan")),
                     "error": type(result.error).__name__ if result.error else ""})
    tracking.close_unfinished_children(uri, parent_run_id, failed)  # trials that failed, or ASHA stopped
    trials = pd.DataFrame(rows)
    tracking.log_text(uri, parent_run_id, markdown(trials), "trials.md")
    tracking.log_text(uri, parent_run_id, trials.to_csv(index=False), "trials.csv")
    if all(r["error"] for r in rows):
        tracking.end_run(uri, parent_run_id, "FAILED")
        sys.exit(f"every trial failed; see {path}")
    best = results.get_best_result(metric=metric, mode="max", scope="last", filter_nan_and_inf=True)
    best_cfg = trial_config(cfg.to_dict(), best.config["values"])
    best_cfg.tune = type(best_cfg.tune)()  # a training config: the sweep's own settings are not its
    best_cfg.experiment.name = ""
    best_yaml = yaml.safe_dump(best_cfg.to_dict(), sort_keys=False)
    best_path = os.path.join(path, "best_config.yaml")
    with open(best_path, "w") as f:
        f.write(best_yaml)
    best_run = tracking.child_run(uri, parent_run_id, trial_run_name(name, best.metrics["trial_id"]))
    version = tracking.register_model(uri, best_run, cfg.tune.registered_model or name)
    tracking.log_text(uri, parent_run_id, best_yaml, "best_config.yaml")
    tracking.log_metrics(uri, parent_run_id, {f"best_{metric}": best.metrics[metric]}, step=0)
    tracking.set_tags(uri, parent_run_id, {"best_run_id": best_run, "registered_model": version})
    tracking.end_run(uri, parent_run_id)

    print("\n" + markdown(trials))
    print(f"Best config: {best_path}\nRegistered model: {version}\nBrowse the sweep: {tracking.ui_command(uri)}")
    return results


def main(argv=None):
    parser = config_parser("python -m tuning.sweep", __doc__, "tune.num_samples=8")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stopped sweep of the same experiment.name and storage_path: "
                             "finished trials are kept, unfinished and errored ones go on from their checkpoints")
    args = parser.parse_args(argv)
    return sweep(load_config(args.config, args.set), resume=args.resume)


if __name__ == "__main__":
    from interestformer.jobs import cli

    cli.sweep()

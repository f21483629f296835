"""The benchmarks' bookkeeping, which their figures rest on: how seeds run at different times combine,
whether content beats ID-only beyond seed noise, and that the command lines refuse mistakes before
any training."""

import statistics

import pytest

from interestformer.errors import ConfigError
from benchmarks.common import across_seeds, with_earlier_seeds
from benchmarks.interest import METRICS, main, markdown_table
from benchmarks.ml1m import content_against_id_only, verdict_lines


KEYS = (*METRICS, "val_hr@10", "val_ndcg@10", "minutes")


def run(seed: int, ndcg: float) -> dict:
    figures = {"hr@10": 2 * ndcg, "ndcg@10": ndcg, "hr@50": 4 * ndcg, "ndcg@50": 1.5 * ndcg, "mrr": ndcg / 2,
               "val_hr@10": 2 * ndcg, "val_ndcg@10": ndcg, "minutes": 1.0 + seed}
    return {**figures, "seed": seed, "run_id": f"run-{seed}"}


def test_seeds_added_later_merge_with_earlier_runs_of_the_same_overrides():
    earlier = across_seeds([run(0, 0.10), run(1, 0.12)], KEYS)
    earlier["overrides"] = ["train.epochs=4"]
    merged = with_earlier_seeds(earlier, [run(2, 0.14)], ["train.epochs=4"])
    assert [r["seed"] for r in merged] == [0, 1, 2]

    rerun = with_earlier_seeds(earlier, [run(1, 0.20)], ["train.epochs=4"])  # a rerun seed replaces its old run
    assert sorted((r["seed"], r["ndcg@10"]) for r in rerun) == [(0, 0.10), (1, 0.20)]

    assert with_earlier_seeds(earlier, [run(2, 0.14)], ["train.epochs=8"]) == [run(2, 0.14)]  # other settings
    assert with_earlier_seeds(None, [run(2, 0.14)], []) == [run(2, 0.14)]


def test_a_row_from_before_seeds_counts_as_seed_0():
    old = {**run(0, 0.10), "overrides": []}
    del old["seed"]
    merged = with_earlier_seeds(old, [run(1, 0.12)], [])
    assert [r["seed"] for r in merged] == [0, 1] and merged[0]["ndcg@10"] == 0.10


def test_across_seeds_gives_the_mean_and_sample_standard_deviation():
    row = across_seeds([run(0, 0.10), run(1, 0.12), run(2, 0.17)], KEYS)
    assert row["ndcg@10"] == pytest.approx(0.13)
    assert row["sd_ndcg@10"] == pytest.approx(statistics.stdev([0.10, 0.12, 0.17]))
    assert row["seeds"] == [0, 1, 2] and len(row["runs"]) == 3
    assert across_seeds([run(0, 0.10)], KEYS)["sd_ndcg@10"] == 0.0

    table = markdown_table({"demo": {"gated": row, "short": across_seeds([run(0, 0.11)], KEYS)}})
    assert "| demo | gated | 3 | 0.2600 ± " in table and "| demo | short | 1 | 0.2200 |" in table


@pytest.mark.parametrize("argv", [["--seeds", "0,one"], ["--datasets", "demo", "--seeds", ","], ["--datasets", "imagenet"],
                                  ["--variants", "medium"]])
def test_command_line_mistakes_fail_before_training(argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code != 0


def test_a_config_mistake_in_set_fails_naming_the_key_before_training():
    with pytest.raises(ConfigError, match="model.interest"):
        main(["--datasets", "demo", "--set", "model.interest=both"])


def test_convergence_times_each_validation_level_both_curves_reach():
    from benchmarks.convergence import level_ratios, minutes_to

    ours = [{"epoch": 1, "minutes": 2.0, "val_ndcg@10": 0.05}, {"epoch": 2, "minutes": 4.0, "val_ndcg@10": 0.125},
            {"epoch": 3, "minutes": 6.0, "val_ndcg@10": 0.11}]
    plain = [{"epoch": 1, "minutes": 1.0, "val_ndcg@10": 0.06}, {"epoch": 2, "minutes": 5.0, "val_ndcg@10": 0.13}]
    assert minutes_to(ours, "val_ndcg@10", 0.12) == 4.0 and minutes_to(ours, "val_ndcg@10", 0.13) is None
    ratios = level_ratios(ours, plain, "val_ndcg@10")
    assert list(ratios) == [f"{level / 100:.2f}" for level in range(1, 13)]  # up to 0.12, which both reach
    assert ratios["0.05"] == 2.0 and ratios["0.06"] == 4.0 and ratios["0.12"] == pytest.approx(0.8)


@pytest.mark.slow
def test_the_plain_loop_validates_stops_and_tests_its_best_epoch(ray_local, tiny_prepared_dir):
    """benchmarks.convergence's reference side on the tiny data: a validation per epoch, a stop once
    validation reaches the level asked for, and the test split ranked with the best epoch."""
    import os

    from benchmarks.plain_loop import plain_convergence
    from interestformer.datasets.prepare import prepare
    from benchmarks.common import PROJECT_DIR
    from interestformer.jobs.config import load_config

    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [
        f"data.prepared_dir={tiny_prepared_dir}", "train.epochs=3", "data.full_softmax=true",
        "model.text.enabled=false", "model.image.enabled=false"])  # the loop ranks models without live encoders
    prepared = prepare(cfg.data)
    full = plain_convergence(prepared, cfg, threads=1, batch_size=8, max_minutes=10)
    assert [p["epoch"] for p in full["curve"]] == [1, 2, 3] and full["stopped_epoch"] == 3
    best = max(full["curve"], key=lambda p: p["val_ndcg@10"])
    assert full["best_epoch"] == best["epoch"] and full["validation"]["val_ndcg@10"] == best["val_ndcg@10"]
    assert full["test"]["users"] == full["validation"]["val_users"] > 0
    stopped = plain_convergence(prepared, cfg, threads=1, batch_size=8, max_minutes=10, stop_at=0.0)
    assert [p["epoch"] for p in stopped["curve"]] == [1]


def test_cold_neighbours_simulates_a_seeded_tenth_of_the_trained_items_and_keeps_their_users():
    import torch

    from benchmarks.cold_neighbours import only_targets, simulated_cold

    trained = torch.ones(101, dtype=torch.bool)
    trained[0] = trained[91:] = False  # padding and 10 items that never trained
    first, again, other = simulated_cold(trained, 0), simulated_cold(trained, 0), simulated_cold(trained, 1)
    assert int(first.sum()) == 9 and not (first & ~trained).any()  # a tenth of the 90 trained items
    assert torch.equal(first, again) and not torch.equal(first, other)
    batch = {"history": torch.tensor([[1, 2], [3, 4], [5, 6]]), "targets": torch.tensor([7, 8, 9]),
             "history_length": torch.tensor([2, 2, 2]), "unique_items": torch.tensor([0, 1, 2, 3, 4, 5, 6])}
    wanted = torch.zeros(101, dtype=torch.bool)
    wanted[[8, 9]] = True
    kept = only_targets(batch, wanted)
    assert kept["targets"].tolist() == [8, 9] and kept["history"].tolist() == [[3, 4], [5, 6]]
    assert kept["history_length"].tolist() == [2, 2] and torch.equal(kept["unique_items"], batch["unique_items"])
    assert only_targets(batch, None) is batch


def ml1m_row(ndcgs: dict[int, float], overrides: list[str]) -> dict:
    return {**across_seeds([{"seed": seed, "ndcg@10": v} for seed, v in ndcgs.items()], ["ndcg@10"]),
            "overrides": overrides}


def test_content_pays_only_by_the_margin_on_the_mean_with_its_lowest_seed_above_id_onlys_highest():
    id_only = ml1m_row({0: 0.160, 1: 0.162, 2: 0.161}, [])
    results = {
        "id_only": id_only,
        "id_text": ml1m_row({0: 0.168, 1: 0.167, 2: 0.166}, []),  # +0.006 on the mean, every seed above
        "id_text_image": ml1m_row({0: 0.175, 1: 0.161, 2: 0.170}, []),  # +0.008 on the mean, seed 1 below 0.162
        "content_only": ml1m_row({0: 0.170, 1: 0.170}, ["train.epochs=10"]),  # another recipe: not compared
    }
    verdicts = content_against_id_only(results)
    assert set(verdicts) == {"id_text", "id_text_image"}
    assert verdicts["id_text"]["pays"] and verdicts["id_text"]["mean_difference"] == pytest.approx(0.006)
    assert not verdicts["id_text_image"]["pays"] and not verdicts["id_text_image"]["lowest_above_highest"]

    results["id_text"] = ml1m_row({0: 0.164, 1: 0.166, 2: 0.165, 3: 0.100}, [])  # +0.004: every seed above, too little
    verdicts = content_against_id_only(results)
    assert verdicts["id_text"]["seeds"] == [0, 1, 2]  # seed 3 has no ID-only run beside it
    assert verdicts["id_text"]["lowest_above_highest"] and not verdicts["id_text"]["pays"]
    assert "content does not pay" in verdict_lines(verdicts)[0] and "+0.0040 on the mean" in verdict_lines(verdicts)[0]


@pytest.mark.parametrize("argv", [["--seeds", "0,one"], ["--seeds", ","], ["--set", "train.seed=3"]])
def test_ml1m_seed_mistakes_fail_before_training(argv, capsys):
    from benchmarks.ml1m import main as ml1m

    with pytest.raises(SystemExit) as stopped:
        ml1m(["--configs", "id_only", *argv])
    assert stopped.value.code == 2 and "seed" in capsys.readouterr().err


def test_ml1m_cold_only_and_skip_cold_exclude_each_other_before_training(capsys):
    from benchmarks.ml1m import main as ml1m

    with pytest.raises(SystemExit) as stopped:
        ml1m(["--configs", "id_text", "--skip-cold", "--cold-only"])
    assert stopped.value.code == 2 and "not allowed with argument --skip-cold" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--seeds", "0,1", "--cold-only"]])
def test_ml1m_distill_needs_two_seeds_standard_runs_before_training(argv, capsys):
    from benchmarks.ml1m import main as ml1m

    with pytest.raises(SystemExit) as stopped:
        ml1m(["--configs", "id_only", "--distill", *argv])
    assert stopped.value.code == 2 and "--distill" in capsys.readouterr().err


def test_ml1m_each_seed_is_distilled_from_the_other_seeds_and_tabled_beside_its_config():
    from benchmarks.ml1m import markdown_table, teachers_of

    runs = [{"seed": seed, "ndcg@10": 0.17 + seed / 100, "checkpoint": f"runs/seed{seed}"} for seed in (0, 1, 2)]
    assert teachers_of(1, runs) == ["runs/seed0", "runs/seed2"]
    results = {"id_only": across_seeds(runs, ["ndcg@10"]),
               "id_only_distilled": across_seeds([{"seed": 0, "ndcg@10": 0.1834}], ["ndcg@10"])}
    lines = markdown_table(results).splitlines()
    assert [line.split(" | ")[0] for line in lines[-2:]] == ["| id_only", "| id_only_distilled"]
    assert "0.1834" in lines[-1]


def test_ml1m_a_protocol_run_alone_keeps_the_other_protocols_figures_of_its_seed():
    """--cold-only after a standard run (or --skip-cold after a cold one) into the same file adds to
    the seed's run rather than replacing it: the standard figures, and the content verdict on them,
    survive."""
    from benchmarks.ml1m import COLD_METRICS, METRICS as ML1M_METRICS, with_other_protocol

    keys = (*ML1M_METRICS, *(f"cold_{m}" for m in COLD_METRICS), "minutes")
    standard = {"seed": 0, "ndcg@10": 0.178, "hr@10": 0.314, "run_id": "a", "minutes": 30.0, "commit": "c1",
                "date": "d1"}
    row = {**across_seeds([standard], keys), "overrides": []}
    cold = {"seed": 0, "cold_hr@10": 0.06, "cold_ndcg@10": 0.03, "cold_run_id": "b", "cold_minutes": 31.0,
            "minutes": 31.0, "commit": "c2", "date": "d2"}
    merged = with_other_protocol(row, cold, [], ran_cold=True)
    assert merged["ndcg@10"] == 0.178 and merged["run_id"] == "a" and merged["cold_hr@10"] == 0.06
    assert merged["minutes"] == 61.0 and merged["commit"] == "c2" and merged["standard_commit"] == "c1"
    row = {**across_seeds(with_earlier_seeds(row, [merged], []), keys), "overrides": []}
    assert row["ndcg@10"] == 0.178 and row["cold_hr@10"] == 0.06

    rerun = {"seed": 0, "ndcg@10": 0.180, "run_id": "c", "minutes": 29.0, "commit": "c3", "date": "d3"}
    again = with_other_protocol(row, rerun, [], ran_cold=False)  # a new standard run keeps the cold figures
    assert again["ndcg@10"] == 0.180 and again["cold_hr@10"] == 0.06 and again["cold_commit"] == "c2"
    assert again["minutes"] == 60.0

    assert with_other_protocol(row, cold, ["train.epochs=4"], ran_cold=True) == cold  # other settings
    assert with_other_protocol(row, {**cold, "seed": 1}, [], ran_cold=True) == {**cold, "seed": 1}  # other seed


@pytest.fixture(scope="module")
def tiny_checkpoint(ray_local, tiny_prepared_dir, tmp_path_factory) -> tuple[str, dict]:
    """A tiny run's checkpoint and its test report through jobs.evaluate: what the benchmarks that
    re-rank checkpoints must reproduce."""
    import os

    from benchmarks.common import PROJECT_DIR
    from conftest import fresh_checkpoint
    from interestformer.jobs.config import load_config
    from interestformer.jobs.evaluate import main as evaluate

    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [f"data.prepared_dir={tiny_prepared_dir}"])
    _, checkpoint = fresh_checkpoint(cfg, str(tmp_path_factory.mktemp("tiny_checkpoint")))
    return checkpoint, evaluate(["--checkpoint", checkpoint, "--split", "test"])


@pytest.mark.slow  # two test-split evaluations of a tiny checkpoint through jobs.evaluate
def test_popularity_segments_of_checkpoints_are_their_evaluations_and_average_per_label(tiny_checkpoint, tmp_path):
    import json

    from benchmarks.popularity import main as popularity

    checkpoint, report = tiny_checkpoint
    out = str(tmp_path / "popularity.json")
    means = popularity(["--run", f"seeded={checkpoint}", "--run", f"seeded={checkpoint}", "--out", out])

    segments = means["seeded"]["segments"]
    assert means["seeded"]["runs"] == 2 and means["seeded"]["ndcg@10"] == pytest.approx(report["ndcg@10"])
    assert sum(figures["users"] for figures in segments.values()) == report["users"]  # every user in one segment
    for segment, figures in segments.items():
        assert figures["ndcg@10"] == pytest.approx(report[f"segment/{segment}/ndcg@10"])
    with open(out) as f:
        written = json.load(f)
    assert len(written["runs"]) == 2 and written["commit"] and written["machine"]


def test_popularity_refuses_a_run_without_a_label_before_evaluating(capsys):
    from benchmarks.popularity import main as popularity

    with pytest.raises(SystemExit) as stopped:
        popularity(["--run", "runs/some/checkpoint"])
    assert stopped.value.code == 2 and "LABEL=CHECKPOINT" in capsys.readouterr().err


@pytest.mark.slow  # the benchmark ranks a tiny checkpoint's test split twice
def test_ensembles_rank_each_checkpoint_as_its_evaluation_and_a_model_with_itself_alike(tiny_checkpoint, tmp_path):
    import json

    from benchmarks.ensembles import main as ensembles

    checkpoint, report = tiny_checkpoint
    out = str(tmp_path / "ensembles.json")
    rankings = ensembles(["--run", f"a={checkpoint}", "--run", f"b={checkpoint}", "--ensemble", "a+b", "--out", out])

    assert rankings["a"]["ndcg@10"] == pytest.approx(report["ndcg@10"]) and rankings["a"]["users"] == report["users"]
    assert rankings["a+b"] == pytest.approx(rankings["a"])  # twice one model's cosines rank as the model
    with open(out) as f:
        written = json.load(f)
    assert set(written["rankings"]) == {"a", "b", "a+b"} and written["commit"] and written["machine"]


@pytest.mark.parametrize("argv, message", [
    (["--run", "a=x", "--run", "a=y"], "labels must differ"),
    (["--run", "a=x", "--run", "b=y", "--ensemble", "a+c"], "a+c"),
    (["--run", "a=x", "--ensemble", "a"], "two or more"),
])
def test_ensembles_refuse_unknown_or_single_members_before_loading(argv, message, capsys):
    from benchmarks.ensembles import main as ensembles

    with pytest.raises(SystemExit) as stopped:
        ensembles(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err

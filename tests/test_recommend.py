"""Batch recommendations and their explanations: jobs.recommend writes one row per requested user
(real Ray Data, real Parquet, a checkpoint of real prepared data) and reports requested users it
does not know; the explanations (Recommender, what the job and the MLflow model call) name the
history item that causes a recommendation in a task built so that the cause is known."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from interestformer.datasets.pipeline import catalogue_ids
from interestformer.jobs import recommend
from interestformer.jobs.config import load_config
from interestformer.jobs.serving import Recommender, write_artifacts
from interestformer.models.explain import history_contributions
from interestformer.models.interest_former import DataSpec, InterestFormer, ModelConfig

from conftest import PROJECT_DIR, fresh_checkpoint

K = 5


@pytest.fixture(scope="module")
def checkpoint(ray_local, tmp_path_factory, tiny_prepared_dir):
    """The tiny config's prepared data and a freshly initialised model's checkpoint of it."""
    tmp = tmp_path_factory.mktemp("recommend")
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [f"data.prepared_dir={tiny_prepared_dir}"])
    prepared, folder = fresh_checkpoint(cfg, str(tmp))
    sequences = pq.read_table(prepared.sequences_path, columns=["user_id", "items"]).to_pydict()
    ids = catalogue_ids(prepared)
    histories = {user: {ids[i - 1] for i in items} for user, items in zip(sequences["user_id"], sequences["items"])}
    return prepared, folder, histories


def read_output(folder: str) -> dict[str, dict]:
    table = pq.read_table(folder)
    assert table.schema.equals(recommend.OUTPUT_SCHEMA)
    return {row["user_id"]: row for row in table.to_pylist()}


@pytest.mark.slow  # a catalogue export and a Ray Data job: about 30 s here
def test_every_user_gets_k_items_from_outside_their_history_with_explanations(checkpoint, tmp_path):
    _, folder, histories = checkpoint
    out = str(tmp_path / "recommendations")
    summary = recommend.main(["--checkpoint", folder, "--out", out, "--k", str(K), "--explain", "2",
                              "--batch-size", "16"])

    rows = read_output(out)
    assert set(rows) == set(histories) and summary["users_written"] == len(histories)
    for user, row in rows.items():
        assert len(row["item_ids"]) == len(set(row["item_ids"])) == K and not set(row["item_ids"]) & histories[user]
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert len(row["explanations"]) == len(row["explanation_weights"]) == K
        for named, weights in zip(row["explanations"], row["explanation_weights"]):
            assert len(named) == len(weights) == min(2, len(histories[user])) and set(named) <= histories[user]
    with open(os.path.join(out, recommend.SUMMARY)) as f:
        assert json.load(f) == summary and summary["users_not_found"] == 0


@pytest.mark.slow  # as above
def test_requested_users_only_and_unknown_ones_reported(checkpoint, tmp_path, capsys):
    prepared, folder, histories = checkpoint
    known = sorted(histories)[:3]
    users = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user_id": known + ["nobody", "nobody-either", known[0]]}), users)
    out = str(tmp_path / "recommendations")
    summary = recommend.main(["--checkpoint", folder, "--out", out, "--users", str(users), "--include-history",
                              "--k", str(prepared.num_items), "--explain", "0"])

    rows = read_output(out)
    assert sorted(rows) == known
    for row in rows.values():  # the whole catalogue, history included
        assert len(row["item_ids"]) == prepared.num_items and row["explanations"] == [[]] * prepared.num_items
    assert summary["users_requested"] == 5 and summary["users_written"] == 3
    assert summary["users_not_found"] == 2 and summary["users_not_found_ids"] == ["nobody", "nobody-either"]
    assert "2 requested user(s) not in the data" in capsys.readouterr().err


@pytest.mark.slow  # the catalogue export again: about 10 s here
def test_the_explanations_benchmark_compares_both_methods_on_a_checkpoint(checkpoint, tmp_path):
    from benchmarks.explanations import main

    _, folder, histories = checkpoint
    out = tmp_path / "explanations.json"
    figures = main(["--checkpoint", folder, "--users", "8", "--k", "3", "--out", str(out)])

    assert set(figures["methods"]) == {"raw drop", "specific drop"} and figures["users"] == 8
    for values in figures["methods"].values():
        assert 0 <= values["top_reason_is_newest"] <= 1 and 1 <= values["distinct_top_reasons_per_user"] <= 3
        assert 0 <= values["top_reason_shares_a_label"] <= 1  # the demo's items carry their planted topic
    assert 0 <= figures["random_history_item_shares_a_label"] <= 1
    with open(out) as f:
        assert json.load(f)["methods"] == figures["methods"]


def test_requested_users_from_a_text_file(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("u2\n\nu1\n u2 \n")
    assert recommend.requested_users(str(users)) == ["u2", "u1"]


# The planted task: history items 1..CAUSES each cause one next item (cause c -> item c + CAUSES);
# the other items are fillers that say nothing. Every training history holds fillers and one cause.
ITEMS, T, CAUSES = 30, 8, 5


def planted_histories(users: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Histories (users, T) of fillers with one cause at any position, the newest included, and
    their causes (users,)."""
    history = torch.randint(2 * CAUSES + 1, ITEMS + 1, (users, T), generator=generator)
    causes = torch.randint(1, CAUSES + 1, (users,), generator=generator)
    history[torch.arange(users), torch.randint(0, T, (users,), generator=generator)] = causes
    return history, causes


def test_explanations_name_the_planted_cause(tmp_path):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = InterestFormer(ModelConfig(d_model=32, n_layers=1, n_heads=2, dropout=0.0),
                           DataSpec(num_items=ITEMS, num_event_types=1, max_seq_len=T, text_vocab_size=0,
                                    text_max_tokens=0, image_size=0), with_item_encoder=False)
    representations = torch.randn(ITEMS + 1, 32)  # a fixed catalogue; row 0 is padding
    representations[0] = 0
    vectors = F.normalize(representations[1:], dim=-1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):  # about 5 s
        history, causes = planted_histories(64, generator)
        users = model.encode_users(representations[history], history, torch.ones_like(history))[:, -1]
        loss = F.cross_entropy(users @ vectors.T / 0.05, causes + CAUSES - 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ids = [f"item{i:02d}" for i in range(1, ITEMS + 1)]
    recommender = Recommender(write_artifacts(model.eval(), representations, torch.ones(ITEMS + 1, dtype=torch.long),
                                              ids, ["view"], 7, str(tmp_path)))

    history, causes = planted_histories(40, generator)
    assert (history[:, -1] == causes).sum() >= 3  # some causes are the newest event
    histories = [[ids[i - 1] for i in row] for row in history.tolist()]
    out = recommender.recommend(histories, [["view"] * T] * len(histories), 3, True, explain=3)
    for row, cause in enumerate(causes.tolist()):
        assert out.item_ids[row][0] == ids[cause + CAUSES - 1]  # the model learned the task
        assert out.explanations[row][0][0] == ids[cause - 1]  # and the explanation names its cause
        weights = out.explanation_weights[row][0]
        assert weights[0] > 0 and weights[0] > 2 * abs(weights[1])
    empty = recommender.recommend([[], ["not-in-the-catalogue"]], None, 3, True, explain=3)
    assert empty.explanations.tolist() == [[[], [], []]] * 2  # most popular items: nothing to explain


def test_contributions_are_each_items_drop_beyond_the_reference_items_mean():
    """history_contributions against a brute force: for each distinct history item, the history
    without it is read again; the contribution is the item's score drop less the mean drop of the
    reference items (padding references do not count; with none, the whole drop)."""
    torch.manual_seed(0)
    model = InterestFormer(ModelConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0),
                           DataSpec(num_items=12, num_event_types=1, max_seq_len=6, text_vocab_size=0,
                                    text_max_tokens=0, image_size=0), with_item_encoder=False).eval()
    representations = torch.randn(13, 16)
    representations[0] = 0
    history = torch.tensor([[0, 0, 3, 5, 3, 7], [1, 2, 4, 6, 8, 9], [0, 0, 0, 0, 0, 11]])  # a repeat; a lone item
    items = torch.tensor([[10, 11], [3, 5], [2, 4]])
    reference = torch.tensor([[10, 11, 12, 1], [3, 5, 0, 0], [0, 0, 0, 0]])
    got = history_contributions(model, representations, history, (history > 0).long(),
                                items, reference)

    def scores(row: list[int], targets: torch.Tensor) -> torch.Tensor:
        if not row:
            return torch.zeros(len(targets))
        h = torch.tensor([[0] * (6 - len(row)) + row])
        user = model.encode_users(representations[h], h, (h > 0).long())[0, -1]
        return F.normalize(representations[targets], dim=-1) @ user

    for b, row in enumerate(history.tolist()):
        real = [i for i in row if i]
        targets = torch.cat([items[b], reference[b]])
        full = scores(real, targets)
        for position, item in enumerate(row):
            if item == 0 or item in row[:position]:  # padding, and every occurrence after an item's first
                assert torch.all(got[b, :, position] == 0)
                continue
            drop = full - scores([i for i in real if i != item], targets)
            used = reference[b] > 0
            common = drop[2:][used].mean() if used.any() else 0.0
            torch.testing.assert_close(got[b, :, position], drop[:2] - common, atol=1e-5, rtol=1e-4)


def test_integer_item_ids_go_in_and_come_out_as_integers(tmp_path):
    """A catalogue whose logs had integer ids: the MLflow model takes and returns integers (its
    signature says so, and MLflow checks requests against it); inside they are looked up as
    prepare keeps them, as text."""
    import mlflow
    import pandas as pd

    from interestformer.jobs import serving

    ids = pa.table({"item_id": pa.array([10, 20, 30, 40, 50], pa.int64())})
    pq.write_table(ids, tmp_path / "items.parquet")
    assert serving.input_item_id_type(str(tmp_path / "items.parquet")) == "long"
    pq.write_table(ids.cast(pa.schema([("item_id", pa.string())])), tmp_path / "text_items.parquet")
    assert serving.input_item_id_type(str(tmp_path / "text_items.parquet")) == "string"
    assert serving.input_item_id_type(str(tmp_path / "gone")) == "string"

    torch.manual_seed(0)
    model = InterestFormer(ModelConfig(d_model=16, n_layers=1, n_heads=2),
                           DataSpec(num_items=5, num_event_types=1, max_seq_len=4, text_vocab_size=0,
                                    text_max_tokens=0, image_size=0), with_item_encoder=False)
    artifacts = write_artifacts(model.eval(), torch.randn(6, 16), torch.arange(6), ["10", "20", "30", "40", "50"],
                                ["view"], 7, str(tmp_path / "artifacts"), "long")
    mlflow.pyfunc.save_model(str(tmp_path / "model"), python_model=serving.MODEL_CODE, artifacts=artifacts,
                             code_paths=serving.package_code(str(tmp_path / "code")),
                             signature=serving.signature(serving.item_id_type(artifacts)),
                             input_example=serving.input_example(artifacts))
    out = mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(
        pd.DataFrame({"history": [[10, 30], [99]]}), params={"k": 3, "explain": 1})
    assert out.unknown_items.tolist() == [0, 1]
    for row in out.item_ids:
        assert len(row) == 3 and all(type(i) is int for i in row)
    assert not {10, 30} & set(out.item_ids[0])  # its history is excluded
    assert all(type(i) is int for per_item in out.explanations[0] for i in per_item)

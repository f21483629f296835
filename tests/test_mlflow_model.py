"""The run's model in MLflow: a checkpoint logged as an MLflow model loads with
mlflow.pyfunc.load_model in a fresh process whose working directory is elsewhere (so our code
comes from the model itself), recommends exactly what the evaluation's ranking code ranks, and
holds nothing about any user. Real prepared data (Ray Data), a real SQLite MLflow store."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from interestformer.datasets.pipeline import ItemContent, catalogue_ids, item_batches, left_pad
from interestformer.jobs import serving, tracking
from interestformer.jobs.config import load_config
from interestformer.jobs.distributed import load_model
from interestformer.jobs.evaluate import device_batches
from interestformer.models.ranking import item_representations

from conftest import PROJECT_DIR, fresh_checkpoint

pytestmark = pytest.mark.slow  # a real prepare job and a fresh Python that imports MLflow and torch

K = 5
UNKNOWN = "not-in-the-catalogue"

# Runs in a fresh Python: argv = model URI, input rows as JSON; prints the predictions as JSON.
LOAD_AND_PREDICT = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame(json.loads(sys.argv[2])), params={"k": %d})
print(json.dumps({"item_ids": [list(ids) for ids in out["item_ids"]],
                  "scores": [[float(s) for s in scores] for scores in out["scores"]],
                  "unknown_items": [int(n) for n in out["unknown_items"]],
                  "explanations": [[list(ids) for ids in row] for row in out["explanations"]],
                  "explanation_weights": [[[float(w) for w in ws] for ws in row] for row in out["explanation_weights"]],
                  "code": [m.__file__ for name, m in sys.modules.items()
                           if name.startswith("interestformer.") and getattr(m, "__file__", None)]}))
""" % K


@pytest.fixture(scope="module")
def logged(ray_local, tmp_path_factory, tiny_prepared_dir):
    """A tiny config's freshly initialised model, saved as a training checkpoint is, logged into
    an MLflow run. Its item IDs are hashed (fewer rows than items), whose map travels in the weights."""
    tmp = tmp_path_factory.mktemp("mlflow_model")
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"), [
        f"data.prepared_dir={tiny_prepared_dir}",
        f"experiment.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        "model.item_id_buckets=16",
    ])
    prepared, checkpoint = fresh_checkpoint(cfg, str(tmp))
    uri = tracking.tracking_uri(cfg)
    run_id = tracking.start_run(cfg, {}, prepared.report(), "serving")
    serving.export(checkpoint, str(tmp / "serving"))
    tracking.log_model(uri, run_id, str(tmp / "serving"))
    tracking.end_run(uri, run_id)
    return cfg, prepared, checkpoint, uri, run_id


def real_histories(prepared, users: int, T: int) -> tuple[list[list[int]], list[list[str]], list[str]]:
    """The first users' last T events (all of which the model reads) as item indices and event
    types, and their user ids."""
    table = pq.read_table(prepared.sequences_path).sort_by("user_id").slice(0, users).to_pydict()
    return ([items[-T:] for items in table["items"]], [types[-T:] for types in table["event_types"]],
            table["user_id"])


def ranked_by_the_evaluation_code(cfg, prepared, checkpoint, histories, event_types):
    """Top-K (item indices, scores) of the checkpoint's model for the histories, through
    InterestFormer.user_vectors (items encoded from their content) against the normalised
    ranking.item_representations, history items excluded."""
    model, _ = load_model(checkpoint)
    text, image = cfg.model.live_content()
    rows = item_batches(prepared, cfg.eval.batch_size, text, image).iter_torch_batches(batch_size=1)
    items = F.normalize(item_representations(model, device_batches(rows, "cpu"), prepared.num_items), dim=-1)
    type_index = {name: i + 1 for i, name in enumerate(prepared.meta["event_types"])}
    history = torch.from_numpy(left_pad([np.array(h) for h in histories], model.spec.max_seq_len))
    types = torch.from_numpy(left_pad([np.array([type_index[t] for t in row]) for row in event_types],
                                      model.spec.max_seq_len))
    unique = torch.unique(torch.cat([history.ravel(), torch.tensor([0])]))
    content = {name: torch.from_numpy(v) for name, v in ItemContent(prepared, text, image)(unique.numpy()).items()}
    with torch.no_grad():
        scores = model.user_vectors({"history": history, "event_types": types, "unique_items": unique, **content}) @ items.T
    scores[:, 0] = float("-inf")
    scores.scatter_(1, history, float("-inf"))
    top = scores.topk(K, dim=1)
    return top.indices.tolist(), top.values.tolist()


def test_a_fresh_process_loads_the_logged_model_and_ranks_as_evaluation_does(logged, tmp_path):
    cfg, prepared, checkpoint, uri, run_id = logged
    ids = catalogue_ids(prepared)
    histories, event_types, _ = real_histories(prepared, 3, cfg.data.max_seq_len)
    rows = {"history": [[ids[i - 1] for i in h] for h in histories], "event_types": [list(t) for t in event_types]}
    rows["history"][1].insert(0, UNKNOWN)  # ignored, and counted
    rows["event_types"][1].insert(0, "view")
    rows["history"].append([UNKNOWN])  # nothing known: the most popular items
    rows["event_types"].append(["view"])

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MLFLOW_TRACKING_URI": uri}
    done = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, f"runs:/{run_id}/model", json.dumps(rows)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])

    assert not any(path.startswith(PROJECT_DIR) for path in served["code"]), served["code"]  # the model's own copy
    assert served["unknown_items"] == [0, 1, 0, 1]
    expected_items, expected_scores = ranked_by_the_evaluation_code(cfg, prepared, checkpoint, histories, event_types)
    for row, history in enumerate(rows["history"][:3]):
        items, scores = served["item_ids"][row], served["scores"][row]
        assert len(items) == K and set(items) <= set(ids) and not set(items) & set(history)
        assert scores == sorted(scores, reverse=True)
        assert items == [ids[i - 1] for i in expected_items[row]]
        assert scores == pytest.approx(expected_scores[row], abs=1e-5)
    for row, history in enumerate(rows["history"]):  # the default, 3 items, explains each recommendation
        explanations, weights = served["explanations"][row], served["explanation_weights"][row]
        assert len(explanations) == len(weights) == K
        known = [item for item in history if item in ids]
        for named, shares in zip(explanations, weights):
            assert len(named) == len(shares) == min(3, len(set(known))) and set(named) <= set(known)
            assert shares == sorted(shares, reverse=True) and sum(abs(w) for w in shares) <= 1 + 1e-6
    popularity = np.array(prepared.meta["popularity_pretest"][1:])
    assert served["item_ids"][3] == [ids[i] for i in np.argsort(-popularity, kind="stable")[:K]]


def test_nothing_about_users_is_logged(logged, tmp_path):
    import mlflow

    cfg, prepared, checkpoint, uri, run_id = logged
    _, _, users = real_histories(prepared, 10**6, cfg.data.max_seq_len)
    client = mlflow.MlflowClient(uri)
    [output] = client.get_run(run_id).outputs.model_outputs  # the run's one model
    model = client.get_logged_model(output.model_id)
    assert model.name == "model" and model.status == "READY"
    folder = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(tmp_path))
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    assert {"MLmodel", "user_model.safetensors", "catalogue.safetensors", "item_ids.json"} <= {
        os.path.basename(f) for f in files}
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        assert not [user for user in users if user.encode() in data], path
    data = tracking.run_data(uri, run_id)
    logged_text = json.dumps([data.params, data.tags])
    assert not [user for user in users if user in logged_text]

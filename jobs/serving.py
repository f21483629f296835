"""A run's model as a recommender: users' recent item histories in, top-K item ids out.

Every training run logs it to MLflow as the model "model" (tracking.log_model); any process of
this environment can then load and call it:

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    model.predict(pd.DataFrame({"history": [["i000012", "i000007"]]}), params={"k": 10})

What is logged is what serving reads, and nothing more (`export`):
    user_model.safetensors   the user Transformer's weights (no item encoder)
    user_model.json          its model config, data spec, the event-type vocabulary and the
                             run's eval.item_chunk_size
    catalogue.safetensors    every catalogue item's representation, computed once when the model
                             is logged with the run's item encoder; each item's count of events
                             (every user's but the last: the most popular, for empty histories)
    item_ids.json            the catalogue's item ids in index order
No user id or anything else about a user is among them, nor the job config's data paths and URIs.

Serving reads no image, token or content encoder: a history's items are looked up among the
precomputed representations and read by the user Transformer (InterestFormer.encode_users), and
every catalogue item is scored by cosine against the user, as evaluation ranks them
(models/ranking.py), item_chunk_size items at a time into a running top-k (chunked_top_k), so
memory stays bounded however large the catalogue. With params explain > 0 (default 3), each
recommended item also names the history items its score depends on most (models/explain.py:
leave-one-out against the user's other top items, one more pass of the user model per distinct
history item). The model is logged as code
(jobs/serving_model.py, MLflow's "models from code"), so loading it unpickles nothing; our layers
travel with it as MLflow code paths.
"""

import dataclasses
import importlib
import json
import os
import shutil
from importlib.metadata import version

import mlflow.pyfunc
import pandas as pd
import torch
import torch.nn.functional as F
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema
from safetensors.torch import load_file, save_file
from torch.nn.utils.rnn import pad_sequence

from interestformer.jobs.config import EvalConfig, build
from interestformer.models.explain import REFERENCE_ITEMS, history_contributions, top_contributors
from interestformer.models.interest_former import DataSpec, InterestFormer, ModelConfig
from interestformer.models.ranking import chunked_top_k

USER_WEIGHTS, USER_MODEL, CATALOGUE, ITEM_IDS = (
    "user_model.safetensors", "user_model.json", "catalogue.safetensors", "item_ids.json")
PARAMS = {"k": 10, "exclude_history": True, "explain": 3}  # predict's params and their defaults
MODEL_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serving_model.py")
# The layers of the package the loaded model imports; package_code copies them into the model.
SERVING_LAYERS = ("models", "jobs", "datasets")
# What importing those layers' serving path needs; recorded with the model, never installed by loading.
SERVING_PACKAGES = ("mlflow", "torch", "safetensors", "numpy", "pandas", "pyarrow", "pillow", "pyyaml")


def package_code(out: str) -> list[str]:
    """The model's code paths: a copy of the `interestformer` package's serving layers in
    out/interestformer, taken from wherever this process imports them (a wheel's site-packages or
    a checkout's editable install), so the model loads where the package is not installed."""
    from interestformer import errors

    package = os.path.join(out, "interestformer")
    os.makedirs(package)
    shutil.copy(errors.__file__, package)
    for layer in SERVING_LAYERS:
        # The first portion of the (namespace) layer: where this process imports its modules from.
        source = list(importlib.import_module(f"interestformer.{layer}").__path__)[0]
        shutil.copytree(source, os.path.join(package, layer), ignore=shutil.ignore_patterns("__pycache__"))
    return [package]


def signature(item_id_type: str) -> ModelSignature:
    """What the model takes and returns; item ids in the type the training logs had them
    (item_id_type: "long" for integer ids, "string" otherwise)."""
    ids = DataType.long if item_id_type == "long" else DataType.string
    return ModelSignature(
        inputs=Schema([
            ColSpec(Array(ids), "history"),  # raw item ids, oldest first
            ColSpec(Array(DataType.string), "event_types", required=False),  # one per history item
        ]),
        outputs=Schema([
            ColSpec(Array(ids), "item_ids"),  # best first
            ColSpec(Array(DataType.double), "scores"),
            ColSpec(Array(Array(ids)), "explanations"),  # per recommended item: history item ids
            ColSpec(Array(Array(DataType.double)), "explanation_weights"),  # ... and the score drop without each
            ColSpec(DataType.long, "unknown_items"),
        ]),
        params=ParamSchema([ParamSpec("k", DataType.long, PARAMS["k"]),
                            ParamSpec("exclude_history", DataType.boolean, PARAMS["exclude_history"]),
                            ParamSpec("explain", DataType.long, PARAMS["explain"])]),
    )


def input_item_id_type(items_path: str) -> str:
    """"long" when the item_id column of every Parquet file of the input catalogue has an integer
    type (prepare keeps ids as text), else "string"; "string" too when the input is gone."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from interestformer.datasets.storage import filesystem

    def integer(t) -> bool:
        return pa.types.is_integer(t) or (pa.types.is_dictionary(t) and pa.types.is_integer(t.value_type))

    try:
        fs, path = filesystem(items_path)
        files = ds.dataset(path, filesystem=fs, format="parquet").files
        types = [pq.read_schema(f, filesystem=fs).field("item_id").type for f in files]
    except (OSError, KeyError, ValueError):
        return "string"
    return "long" if types and all(integer(t) for t in types) else "string"


def requirements() -> list[str]:
    """The serving packages pinned at this environment's versions."""
    return [f"{package}=={version(package)}" for package in SERVING_PACKAGES]


def export(checkpoint_folder: str, out: str) -> dict[str, str]:
    """Writes the serving artifacts of a training checkpoint into folder `out`; returns
    {artifact name: path}. Encodes the whole catalogue once (Ray Data over the prepared items),
    on a GPU when there is one."""
    from interestformer.datasets.pipeline import item_batches
    from interestformer.datasets.prepare import PreparedData
    from interestformer.jobs.config import JobConfig
    from interestformer.jobs.distributed import load_model
    from interestformer.jobs.evaluate import device_batches
    from interestformer.models.ranking import item_representations

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, state = load_model(checkpoint_folder, device)
    prepared = PreparedData.load(state["prepared_path"])
    cfg = JobConfig.from_dict(state["config"])
    rows = item_batches(prepared, cfg.eval.batch_size, *model.cfg.live_content()).iter_torch_batches(batch_size=1)
    representations = item_representations(model, device_batches(rows, device), prepared.num_items)
    return catalogue_artifacts(model, representations, prepared, cfg, out)


def catalogue_artifacts(model: InterestFormer, representations: torch.Tensor, prepared, cfg, out: str) -> dict[str, str]:
    """write_artifacts for a model (an evaluation copy: untrained items' ID rows filled) and its
    encoded catalogue, on the prepared data and config (a JobConfig) it was trained with."""
    from interestformer.datasets.pipeline import catalogue_ids
    from interestformer.datasets.prepare import input_paths

    popularity = torch.tensor(prepared.meta["popularity_pretest"], dtype=torch.int64)
    return write_artifacts(model, representations.cpu(), popularity, catalogue_ids(prepared), prepared.meta["event_types"],
                           cfg.eval.item_chunk_size, out, input_item_id_type(input_paths(cfg.data)[1]))


def write_artifacts(model: InterestFormer, representations: torch.Tensor, popularity: torch.Tensor,
                    item_ids: list[str], event_types: list[str], item_chunk_size: int, out: str,
                    item_id_type: str = "string") -> dict[str, str]:
    """Writes the serving artifacts (module docstring) into folder `out`; returns {artifact name:
    path}. representations (N + 1, d) and popularity (N + 1,) are by item index, item_ids and
    event_types in index order (index i is entry i - 1); item_id_type is the ids' type in the
    logs ("long" or "string"), which the model takes and returns them in."""
    from interestformer.jobs.tracking import redact

    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name) for name in (USER_WEIGHTS, USER_MODEL, CATALOGUE, ITEM_IDS)}
    user_weights = {name: tensor.cpu() for name, tensor in model.state_dict().items()
                    if not name.startswith("item_encoder.")}  # the item encoder's work is in the catalogue
    save_file(user_weights, paths[USER_WEIGHTS])
    about = {"model": dataclasses.asdict(model.cfg), "spec": dataclasses.asdict(model.spec),
             "event_types": event_types, "item_chunk_size": item_chunk_size, "item_id_type": item_id_type}
    with open(paths[USER_MODEL], "w") as f:
        f.write(redact(json.dumps(about, indent=1)))  # a pretrained_path might carry credentials
    save_file({"representations": representations, "popularity": popularity}, paths[CATALOGUE])
    with open(paths[ITEM_IDS], "w") as f:
        json.dump(item_ids, f)
    return paths


def item_id_type(artifacts: dict[str, str]) -> str:
    """The type ("long" or "string") the model takes and returns item ids in."""
    with open(artifacts[USER_MODEL]) as f:
        return json.load(f).get("item_id_type", "string")  # models logged before it was recorded: text


def input_example(artifacts: dict[str, str]) -> pd.DataFrame:
    """A request MLflow stores with the model, to show how it is called: one history of the
    catalogue's first two items."""
    with open(artifacts[ITEM_IDS]) as f:
        first = json.load(f)[:2]
    return pd.DataFrame({"history": [[int(i) for i in first] if item_id_type(artifacts) == "long" else first]})


class Recommender:
    """The serving artifacts, loaded: top-K catalogue items for histories of raw item ids."""

    def __init__(self, artifacts: dict[str, str]):
        with open(artifacts[USER_MODEL]) as f:
            about = json.load(f)
        self.model = InterestFormer(build(ModelConfig, about["model"], "model"), DataSpec(**about["spec"]),
                                    with_item_encoder=False)
        self.model.load_state_dict(load_file(artifacts[USER_WEIGHTS]))
        self.model.eval()
        # Items scored at once: the run's eval.item_chunk_size (models logged before it was
        # recorded: the default).
        self.item_chunk_size = about.get("item_chunk_size", EvalConfig.item_chunk_size)
        catalogue = load_file(artifacts[CATALOGUE])
        self.representations = catalogue["representations"]  # (N + 1, d); what the user Transformer reads
        self.vectors = F.normalize(self.representations, dim=-1)  # what users are scored against
        with open(artifacts[ITEM_IDS]) as f:
            ids = json.load(f)  # as prepare keeps them: text
        self.item_index = {item_id: i + 1 for i, item_id in enumerate(ids)}
        # Returned in the type the logs had (integer ids come back as integers).
        self.item_ids = [int(i) for i in ids] if about.get("item_id_type") == "long" else ids
        self.event_type_index = {name: i + 1 for i, name in enumerate(about["event_types"])}
        popularity = catalogue["popularity"][1:].double()
        self.most_popular = torch.argsort(popularity, descending=True, stable=True)  # 0-based positions
        self.popularity_share = popularity / popularity.sum().clamp(min=1)

    def recommend(self, histories: list, event_types: list | None, k: int, exclude_history: bool,
                  explain: int = 0) -> pd.DataFrame:
        """Top-k items for each history (raw item ids, oldest first); event_types, when given, holds
        one list per history (None for a history without them) of one type per item.

        Returns item_ids (best first), scores (cosine, as in evaluation), explanations and
        explanation_weights, and unknown_items (history items not in the catalogue, which are
        ignored) per history. The user Transformer reads the last max_seq_len known items. An
        event type the model does not know, or none given, reads as the padding type, as in
        training. With exclude_history, no item of the history is recommended. A history without
        a known item gets the k most popular items, scored by their share of the prepared events.

        explain > 0: for each recommended item, the `explain` items of the window read whose
        removal from the history lowers its score most beyond the user's other top items'
        (explanations: raw item ids, most first), and by how much its cosine score drops more
        than theirs without each (explanation_weights), by leave-one-out (models/explain.py says
        how, and why). Each row holds one list per
        recommended item in both columns; the lists are empty with explain 0 and for the most
        popular items of a history without a known item."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if explain < 0:
            raise ValueError(f"explain must be >= 0, got {explain}")
        known, unknown = [], []
        for row, items in enumerate(histories):
            types = event_types[row] if event_types is not None and event_types[row] is not None else None
            if types is not None and len(types) != len(items):
                raise ValueError(f"history {row} has {len(items)} items but {len(types)} event types")
            items = [str(item) for item in items]  # integer ids are looked up as prepare wrote them
            pairs = [(self.item_index[item], self.event_type_index.get(types[j], 0) if types is not None else 0)
                     for j, item in enumerate(items) if item in self.item_index]
            known.append(pairs)
            unknown.append(len(items) - len(pairs))

        popular = self.most_popular[:k]
        item_ids = [[self.item_ids[i] for i in popular.tolist()] for _ in histories]
        scores = [self.popularity_share[popular].tolist() for _ in histories]
        explanations = [[[] for _ in popular] for _ in histories]
        weights = [[[] for _ in popular] for _ in histories]
        rows = [row for row, pairs in enumerate(known) if pairs]
        if rows:
            ranked = self._rank([known[row] for row in rows], k, exclude_history, explain)
            for row, *columns in zip(rows, *ranked):
                item_ids[row], scores[row], explanations[row], weights[row] = columns
        return pd.DataFrame({"item_ids": item_ids, "scores": scores, "explanations": explanations,
                             "explanation_weights": weights, "unknown_items": unknown})

    def _rank(self, histories: list[list[tuple[int, int]]], k: int, exclude_history: bool, explain: int):
        """Per non-empty history of (item index, event-type index): the top-k item ids, their
        scores, and per recommended item its explanation's item ids and weights (empty lists
        when explain is 0)."""
        T = self.model.spec.max_seq_len
        history = torch.zeros(len(histories), T, dtype=torch.long)  # left-padded, as in training
        types = torch.zeros_like(history)
        for row, pairs in enumerate(histories):
            window = torch.tensor(pairs[-T:])
            history[row, T - len(window):], types[row, T - len(window):] = window[:, 0], window[:, 1]
        with torch.no_grad():
            users = self.model.encode_users(self.representations[history], history, types)[:, -1]  # (B, d)
        seen = None
        if exclude_history:  # every item of the history, also those older than the window
            seen = pad_sequence([torch.tensor([item for item, _ in pairs]) for pairs in histories], batch_first=True)
        top_scores, top_indices = chunked_top_k(lambda a, b: users @ self.vectors[a:b].T, len(self.vectors),
                                                max(k, REFERENCE_ITEMS) if explain else k, seen,
                                                self.item_chunk_size)  # ties: the lower item index first
        reference = top_indices.masked_fill(top_scores == float("-inf"), 0)  # the user's top items
        top_scores, top_indices = top_scores[:, :k], top_indices[:, :k]
        if explain:
            contributions = history_contributions(self.model, self.representations, history, types, top_indices,
                                                  reference)
            contributors, drops = (t.tolist() for t in top_contributors(history, contributions, explain))
        ids, values, explanations, weights = [], [], [], []
        for row, (indices, row_scores) in enumerate(zip(top_indices.tolist(), top_scores.tolist())):
            kept = [j for j, s in enumerate(row_scores) if s != float("-inf")]  # fewer left than k
            ids.append([self.item_ids[indices[j] - 1] for j in kept])
            values.append([row_scores[j] for j in kept])
            if explain:
                explanations.append([[self.item_ids[i - 1] for i in contributors[row][j] if i] for j in kept])
                weights.append([[w for i, w in zip(contributors[row][j], drops[row][j]) if i] for j in kept])
            else:
                explanations.append([[] for _ in kept])
                weights.append([[] for _ in kept])
        return ids, values, explanations, weights


class RecommenderModel(mlflow.pyfunc.PythonModel):
    """The MLflow face of Recommender (see the module docstring for how it is logged).

    Input: a DataFrame with a column `history` (per user, a list of raw item ids, oldest first)
    and optionally `event_types` (per user, a list of event types aligned with the history).
    Params: k (default 10), exclude_history (default True), explain (default 3; 0: none).
    Output: a DataFrame with, per input row, item_ids (list of k raw item ids, best first),
    scores (list of k floats, descending), explanations (per recommended item, a list of up to
    `explain` history item ids its score depends on most), explanation_weights (how much more
    its score drops without each than the user's top items' do, Recommender.recommend) and unknown_items (history items not in the catalogue)."""

    def load_context(self, context):
        self.recommender = Recommender(context.artifacts)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = PARAMS | (params or {})
        event_types = model_input["event_types"].tolist() if "event_types" in model_input else None
        return self.recommender.recommend(model_input["history"].tolist(), event_types, int(params["k"]),
                                          bool(params["exclude_history"]), int(params["explain"]))

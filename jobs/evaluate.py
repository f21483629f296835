"""Full-ranking evaluation of a checkpoint: HR@K, NDCG@K and MRR, every item a candidate.

    interestformer-evaluate --checkpoint runs/<run>/checkpoint_<...> [--split test] [--run-id ID]

Reads the checkpoint's gathered weights (model.safetensors) and its config, streams the split's
users and the catalogue through Ray Data, and prints (and with --run-id logs to MLflow) the
metrics, overall and per user segment. With --data-config the users and catalogue are another
data's (e.g. a newer window of the log), and its eval section, if any, the protocol: items are
matched by id, and items the checkpoint never saw are ranked from their content
(jobs.train.catalogue_model). Training's validation and test ranking call the same
models.ranking.evaluate_model on the same packed rows, so a checkpoint evaluated here gives the
metrics its run logged (a test re-evaluates one).
"""

import argparse
import json

import torch

from interestformer.datasets.config import DataConfig
from interestformer.datasets.pipeline import cold_items, item_batches, sequence_batches, unpack
from interestformer.datasets.prepare import PreparedData, prepare
from interestformer.jobs.cli import program
from interestformer.jobs.config import JobConfig, load_config, read_yaml
from interestformer.models.ranking import RankTotals, evaluate_model, evaluate_popularity, item_representations


def device_batches(rows, device):
    """Packed rows (iter_torch_batches(batch_size=1)) -> their batches, on `device`."""
    for row in rows:
        yield {name: value.to(device) for name, value in unpack(row).items()}


def evaluate(model, item_rows, eval_rows, cfg: JobConfig, device, popularity: torch.Tensor) -> RankTotals:
    """Rank totals (metrics, per-segment metrics, HR/NDCG at every K) of `model` over an iterable
    of packed evaluation rows (any Ray Data iterator's iter_torch_batches(batch_size=1)), with the
    catalogue from packed item rows; users without history get the `popularity` ranking."""
    items = item_representations(model, device_batches(item_rows, device), model.spec.num_items)
    return evaluate_model(model, items, device_batches(eval_rows, device), cfg.eval.ks, cfg.eval.exclude_history,
                          cfg.eval.item_chunk_size, popularity.to(device))


def popularity_counts(prepared: PreparedData, cfg: JobConfig, split: str) -> torch.Tensor:
    """Item counts (N+1,) that the split's most-popular ranking uses: events before the test
    targets, or for validation and new users training events only; held-out items count 0."""
    counts = torch.tensor(prepared.meta["popularity_train" if split in ("validation", "new_users")
                                        else "popularity_pretest"])
    # Held-out items never occur before the target in what training sees.
    counts[torch.from_numpy(cold_items(prepared.num_items, cfg.data.cold_item_fraction))] = 0
    return counts


def evaluate_most_popular(prepared: PreparedData, eval_rows, cfg: JobConfig, split: str) -> RankTotals:
    """The most-popular baseline: items ranked by how often they occur before the split's target."""
    return evaluate_popularity(popularity_counts(prepared, cfg, split), device_batches(eval_rows, "cpu"), cfg.eval.ks,
                               cfg.eval.exclude_history)


def eval_datasets(prepared: PreparedData, cfg: JobConfig, split: str):
    """The packed item rows, with the content the model's live encoders read, and the split's
    packed user rows, without content: users read the encoded catalogue (evaluate_model)."""
    text, image = cfg.model.live_content()
    items = item_batches(prepared, cfg.eval.batch_size, text=text, image=image)
    users = sequence_batches(prepared, split, cfg.eval.batch_size, cfg.data.max_seq_len,
                             pipeline_workers=cfg.train.pipeline_workers, cold_fraction=cfg.data.cold_item_fraction,
                             new_user_fraction=cfg.data.new_user_fraction)
    return items, users


def checkpoint_on_data(checkpoint: str, cfg: JobConfig, data: DataConfig) -> tuple[object, PreparedData]:
    """The checkpoint's model (cfg: its config) on other data, prepared now if need be with the
    checkpoint's tokenizer, items matched by id; and that prepared data."""
    from interestformer.jobs.embed_items import feature_store
    from interestformer.jobs.train import catalogue_model, data_spec, tokenizer_path

    cfg.data = data
    prepared = prepare(data, tokenizer_path=tokenizer_path(cfg, checkpoint))
    features_uri, spec, _ = feature_store(prepared, cfg, data_spec(prepared, cfg))
    model, carried = catalogue_model(cfg, spec, features_uri, prepared, checkpoint)
    model.item_encoder.fill_untrained_ids()  # as in every evaluation copy (distributed.model_from_weights)
    print(f"Ranking {prepared.path} with {checkpoint}: {carried}", flush=True)
    return model, prepared


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog=program("python -m jobs.evaluate"),
        description="Full-ranking evaluation (HR@K, NDCG@K, MRR over every item) of a training checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder written by jobs.train")
    parser.add_argument("--split", choices=["validation", "test", "cold", "new_users"], default="test",
                        help="users' held-out item to rank (model selection uses validation); cold: test users "
                             "whose target is a held-out item (runs with data.cold_item_fraction > 0); new_users: "
                             "held-out users after 0-3 events (runs with data.new_user_fraction > 0)")
    parser.add_argument("--data-config", default="", help="a config file whose data section names the data to "
                        "rank (prepared if need be) instead of the checkpoint's, and whose eval section, if it has "
                        "one, is the protocol to rank under (eval.ks, eval.exclude_history); other sections are "
                        "ignored")
    parser.add_argument("--run-id", default="", help="also log the metrics into this MLflow run")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default as in jobs.train)")
    args = parser.parse_args(argv)

    from interestformer.jobs.cluster import start_ray
    from interestformer.jobs.distributed import load_model
    from interestformer.jobs import tracking

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, state = load_model(args.checkpoint, device)
    cfg = JobConfig.from_dict(state["config"])
    start_ray()
    if args.data_config:
        other = load_config(args.data_config)
        if "eval" in read_yaml(args.data_config):  # re-scored under another protocol
            cfg.eval = other.eval
        model, prepared = checkpoint_on_data(args.checkpoint, cfg, other.data)
        model = model.to(device).eval()
    else:
        prepared = PreparedData.load(state["prepared_path"])
    items, users = eval_datasets(prepared, cfg, args.split)
    metrics = evaluate(model, items.iter_torch_batches(batch_size=1), users.iter_torch_batches(batch_size=1),
                       cfg, device, popularity_counts(prepared, cfg, args.split)).report()
    print(json.dumps({f"{args.split}_{k}": v for k, v in metrics.items()}, indent=1))
    if args.run_id:
        if args.tracking_uri:
            cfg.experiment.tracking_uri = args.tracking_uri
        tracking.log_metrics(tracking.tracking_uri(cfg), args.run_id,
                             {f"eval_{args.split}_{k}": v for k, v in metrics.items()}, step=state["step"])
    return metrics


if __name__ == "__main__":
    from interestformer.jobs import cli

    cli.evaluate()

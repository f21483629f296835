"""Train the multimodal interest Transformer with Ray Train + DeepSpeed, logged to MLflow.

    interestformer-train                                  # the demo, on a local Ray
    interestformer-train --config configs/x.yaml --set train.epochs=3
    ray job submit --working-dir . --runtime-env-json '{"py_modules": ["build/job/interestformer"]}' \
        -- python -m interestformer.jobs.train --config configs/x.yaml   # docs/cluster.md

The job: validate the config (before Ray starts), prepare the data (cached), open the MLflow
run, fit on Ray Train workers (which also rank the most-popular baseline on the test split's
rows), log the final report (jobs/report.py), close the run and print the headline metrics with
the command that browses them.
"""

import math
import os
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime

import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from interestformer.errors import ConfigError
from interestformer.datasets.pipeline import (
    TrainingBatches,
    catalogue_ids,
    id_buckets,
    trained_items,
    training_batches,
    training_sequences,
    training_windows,
)
from interestformer.datasets.prepare import PreparedData, check_inputs, input_paths, prepare
from interestformer.datasets.storage import absolute, join, local_folder, read_json, write_bytes
from interestformer.jobs import tracking
from interestformer.jobs.cluster import ensure_ray, worker_env
from interestformer.jobs.config import JobConfig, config_parser, load_config
from interestformer.jobs.embed_items import feature_store, load_features
from interestformer.jobs.distributed import (
    best_checkpoint_weights,
    check_start_from,
    check_teacher_catalogues,
    check_teachers,
    checkpoint_uri,
    deepspeed_config,
    fetch_ahead,
    STATE_FILE,
    full_state_dict,
    model_from_weights,
    optimizer_step,
    optimizer_steps,
    save_and_report,
    setup_engine,
    start_from,
    Teachers,
    timed_batches,
    WorkerShares,
)
from interestformer.jobs.evaluate import device_batches, eval_datasets, evaluate_most_popular, popularity_counts
from interestformer.jobs.progress import DriverDisplay, ProgressBoard, WorkerProgress, quiet_console
from interestformer.jobs.report import log_report
from interestformer.jobs.selection import ModelSelection
from interestformer.models.interest_former import DataSpec, InterestFormer
from interestformer.models.ranking import RankTotals, evaluate_model, item_representations

METRIC_PREFIX = {"test": "test_", "cold": "cold_test_", "new_users": "new_user_"}  # MLflow names of each split's metrics


def final_splits(cfg: JobConfig) -> list[str]:
    """The splits evaluated once at the end: test, and the cold-start ones the config asks for."""
    return ["test"] + (["cold"] if cfg.data.cold_item_fraction else []) + (
        ["new_users"] if cfg.data.new_user_fraction else [])


def train_loop_per_worker(loop_config: dict):
    """Runs in every Ray Train worker: set up, then each epoch train, validate, checkpoint and
    report; at the end, test the best epoch."""
    worker = TrainingWorker(loop_config)
    for epoch in worker.epochs_left():
        worker.train_epoch(epoch)
        metrics, last = worker.validate(epoch)
        worker.checkpoint(epoch, metrics, last)
        if last:
            break
    return worker.test_best_epoch()


class TrainingWorker:
    """One Ray Train worker's run, in the steps train_loop_per_worker takes. Every rank calls each
    step together (they meet in collectives); rank 0 alone logs to MLflow."""

    def __init__(self, loop_config: dict):
        """Set up: the model and its DeepSpeed engine (resumed from the run's checkpoint if there is
        one), this worker's share of the training data, model selection, evaluation and logging."""
        cfg = self.cfg = JobConfig.from_dict(loop_config["config"])
        self.spec = DataSpec(**loop_config["spec"])
        self.rank = ray.train.get_context().get_world_rank()
        self.world = ray.train.get_context().get_world_size()
        self.device = ray.train.torch.get_device()
        if not cfg.train.use_gpu:  # as many threads as reserved CPUs: workers must not fight over cores
            torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        prepared = PreparedData.load(loop_config["prepared_path"])
        self.catalogue = catalogue_ids(prepared)
        self.serving_uri = loop_config["serving_uri"]
        init_from = cfg.train.init_from if ray.train.get_checkpoint() is None else ""  # a run's own checkpoint comes first
        model, carried = catalogue_model(cfg, self.spec, loop_config["features_uri"], prepared, init_from)
        self.train_rows = ray.train.get_dataset_shard("train")
        self.packer = batch_packer(prepared, cfg)
        self.train_users = loop_config["train_users"]
        # A fresh run's first epoch starts its pipeline while DeepSpeed sets up. A resumed run may have
        # no epoch left, and a pipeline nobody reads would hold a CPU through the final evaluation.
        self.rows = self._epoch_rows(0) if ray.train.get_checkpoint() is None else None
        self.evaluation = EpochEvaluation(cfg, self.spec, prepared, self.device)
        self.evaluation.read_ahead(["items", "validation", *final_splits(cfg)])
        steps_per_epoch = math.ceil(loop_config["train_users"] / (cfg.train.micro_batch_size * self.world))
        self.engine, state = setup_engine(model, cfg.train, optimizer_steps(cfg.train, loop_config["train_users"],
                                                                             self.world))
        self.state = state or {"epoch": 0, "step": 0}
        self.state.update(config=loop_config["config"], spec=loop_config["spec"],
                          prepared_path=loop_config["prepared_path"], world_size=self.world)
        self.selection = ModelSelection.for_run(cfg.train, self.state.get("selection"))
        self.best_weights = best_checkpoint_weights() if self.selection.best_epoch else None  # a resumed run's best
        self.precision = "bf16" if self.engine.bfloat16_enabled() else "fp32"
        teacher_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.teachers = Teachers(cfg.train.teachers, self.device, teacher_dtype) if cfg.train.teachers else None
        notes = [f"Started from {init_from}: {carried}" if carried else "", self.state.pop("resumed", ""),
                 f"train.precision auto: {self.precision} on this hardware" if cfg.train.precision == "auto" else ""]
        self.progress = WorkerProgress(loop_config["progress_board"], self.rank, cfg.train.epochs * steps_per_epoch,
                                       self.state["epoch"] * steps_per_epoch, "\n".join(n for n in notes if n))
        self.throughput = []  # per epoch run here: users, events, seconds, samples/s, data wait
        self.metrics_out = tracking.MetricsOutbox(loop_config["tracking_uri"], loop_config["run_id"])  # rank 0's
        self.system_metrics = None  # rank 0 samples the machine it trains on (the driver's may not train at all)
        if self.rank == 0:
            self.system_metrics = tracking.start_system_metrics(loop_config["tracking_uri"], loop_config["run_id"],
                                                                cfg.experiment.system_metrics_interval_s)
        self.began = time.perf_counter() - self.state.get("worker_seconds", 0.0)  # earlier attempts' time counts
        self.weights = None  # the latest epoch's full weights

    def _epoch_rows(self, epoch: int):  # an epoch of this worker's batches, its pipeline starting now
        return fetch_ahead(training_batches(self.train_rows, self.packer, self.cfg.train.micro_batch_size, epoch))

    def _out_of_time(self) -> bool:
        return _out_of_time(self.cfg.train.max_minutes, time.perf_counter() - self.began)

    def epochs_left(self):
        """The epochs to train: none for a run resumed after its early stop or with its time spent."""
        for epoch in range(self.state["epoch"], self.cfg.train.epochs):
            if self.selection.should_stop or self._out_of_time():
                return
            yield epoch

    def train_epoch(self, epoch: int):
        """One pass over this worker's share of the training data; rank 0 logs every
        train.log_every_steps optimizer steps."""
        engine = self.engine
        engine.train()
        window = {"loss": 0.0, "batches": 0, "users": 0, "events": 0, "wait": 0.0, "start": time.perf_counter()}
        seen = torch.zeros(2, dtype=torch.float64)  # users and events (targets) this worker trained on
        self.epoch_loss = [0.0, 0]  # rank 0's loss sum and batches, for the epoch's line on the console
        started, waits = time.perf_counter(), []
        for batch, wait in timed_batches(self.rows or self._epoch_rows(epoch), self.device):
            if self.teachers:
                loss = engine(batch, self.teachers.logits(batch), self.cfg.train.distill_weight)
            else:
                loss = engine(batch)
            engine.backward(loss)
            optimizer_step(engine)
            waits.append(wait)
            users, events = len(batch["history"]), int((batch["targets"] > 0).sum())
            window.update(loss=window["loss"] + loss.item(), batches=window["batches"] + 1,
                          users=window["users"] + users, events=window["events"] + events, wait=window["wait"] + wait)
            seen += torch.tensor([users, events])
            self.epoch_loss = [self.epoch_loss[0] + loss.item(), self.epoch_loss[1] + 1]
            self.progress.update(1)
            if engine.is_gradient_accumulation_boundary():
                self.state["step"] += 1
                if self.rank == 0 and self.state["step"] % self.cfg.train.log_every_steps == 0:
                    _log_window(self.metrics_out, window, self.world, engine, self.state["step"])
        self.throughput.append(_epoch_throughput(seen, time.perf_counter() - started, waits, self.train_users,
                                                 self.device))
        self.rows = None

    def validate(self, epoch: int) -> tuple[dict, bool]:
        """Validation every train.eval_every epochs and on the last; returns the epoch's metrics and
        whether the run ends here (the last epoch, its time spent, or patience run out)."""
        self.boundary = time.perf_counter()
        self.weights = full_state_dict(self.engine)  # on every rank; ZeRO-3 gathers the partitions
        metrics = {"epoch": epoch}
        # The last epoch always validates, also when the time budget ends the run early.
        last = epoch + 1 == self.cfg.train.epochs or self._out_of_time()
        if (epoch + 1) % self.cfg.train.eval_every == 0 or last:
            val = {f"val_{k}": v for k, v in self.evaluation.totals(self.weights, "validation").metrics().items()}
            if self.selection.update(epoch + 1, val):
                self.best_weights = self.weights
            metrics.update(val)
        return metrics, last or self.selection.should_stop

    def checkpoint(self, epoch: int, metrics: dict, last: bool):
        """Saves the epoch's checkpoint (DeepSpeed state, and the best epoch's weights as the model)
        and reports it to Ray Train; logs the epoch's metrics and prints its line."""
        if not last:  # the next epoch's pipeline starts while this one checkpoints
            self.rows = self._epoch_rows(epoch + 1)
        throughput, selection = self.throughput[-1], self.selection
        self.state.update(epoch=epoch + 1, selection=selection.state(), worker_seconds=time.perf_counter() - self.began)
        metrics.update(best_epoch=selection.best_epoch, epoch_samples_per_s=throughput["samples_per_s"],
                       epoch_data_wait_fraction=throughput["data_wait_fraction"], epoch_train_s=throughput["seconds"],
                       epoch_users_sat_out=throughput["users_sat_out"],
                       epoch_eval_s=time.perf_counter() - self.boundary, **({"stopped_epoch": epoch + 1} if last else {}))
        if self.rank == 0:
            self.metrics_out.log({**{k: v for k, v in metrics.items() if k != "epoch"}, "epochs_done": epoch + 1},
                                 step=self.state["step"])
        self.progress.epoch(*_epoch_line(epoch + 1, self.cfg, self.epoch_loss, throughput, metrics, selection))
        saving = time.perf_counter()
        model_weights = self.weights if self.best_weights is None else self.best_weights  # nothing validated: latest
        save_and_report(self.engine, model_weights, None if model_weights is self.weights else self.weights, metrics,
                        self.state, self.catalogue)
        if self.rank == 0:
            self.metrics_out.log({"epoch_checkpoint_s": time.perf_counter() - saving}, step=self.state["step"])

    def test_best_epoch(self) -> dict | None:
        """The test splits, read once with the best epoch's weights (a run with no epoch left to
        train has them from its checkpoint; one that validated nothing yet, its latest), and the
        most-popular baseline on the same rows; rank 0 writes the serving model of those weights
        (to `serving_uri`, which the driver logs to MLflow), logs the model's metrics, closes its
        logging and returns the run's results to the driver."""
        weights = self.best_weights or full_state_dict(self.engine)
        results = {split: self.evaluation.totals(weights, split) for split in final_splits(self.cfg)}
        baselines = {split: self.evaluation.most_popular(split) for split in final_splits(self.cfg)}
        self.progress.close()
        if self.rank != 0:
            return None
        self.evaluation.export(self.serving_uri)
        for split, totals in results.items():
            self.metrics_out.log({f"{METRIC_PREFIX[split]}{k}": v for k, v in totals.report().items()},
                                 step=self.state["step"])
        if self.system_metrics:
            self.system_metrics.finish()
        unsent = None if self.metrics_out.flush() else self.metrics_out.unsent()
        if unsent:  # the driver retries them for longer, with MLflow's own retries
            print(f"MLflow still unreachable at the end: {len(unsent['metrics'])} metrics handed to the driver",
                  file=sys.stderr)
        return {**results, "most_popular": baselines, "step": self.state["step"], "unsent_metrics": unsent,
                "throughput": self.throughput, "best_epoch": self.selection.best_epoch,
                "stopped_epoch": self.state["epoch"], "validation": self.selection.best_metrics,
                "precision": self.precision}


def _epoch_throughput(seen: torch.Tensor, seconds: float, waits: list[float], train_users: int, device) -> dict:
    """One epoch's training rate over all workers (users and events summed, the slowest worker's
    seconds), the users who sat out the epoch (Ray Train's equal split: at most world_size - 1),
    and the data waits of the worker that waited most: for its first batch (the pipeline starting
    up; Ray Data starts each epoch's anew) and, as a share of the epoch's time, for every later
    one (steady state)."""
    import torch.distributed as dist

    total = seen.to(device)
    dist.all_reduce(total)
    first = waits[0] if waits else 0.0
    slowest = torch.tensor([seconds, first, sum(waits[1:]) / seconds], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return {"users": int(total[0]), "events": int(total[1]), "users_sat_out": train_users - int(total[0]),
            "seconds": slowest[0].item(),
            "samples_per_s": total[0].item() / slowest[0].item(), "first_batch_wait_s": slowest[1].item(),
            "data_wait_fraction": slowest[2].item()}


def _out_of_time(max_minutes: float, seconds: float) -> bool:
    """Whether train.max_minutes has run out, as rank 0's clock says (every rank must call it
    together, and all get the same answer)."""
    import torch.distributed as dist

    if not max_minutes:
        return False
    out = torch.tensor([seconds > 60 * max_minutes], dtype=torch.float32, device=ray.train.torch.get_device())
    dist.broadcast(out, src=0)
    return bool(out.item())


class EpochEvaluation:
    """Full ranking inside the training workers, shared by all of them (every worker must call
    `totals` together, with the same weights): each encodes its share of the catalogue (the shares
    are summed into the whole item table) and ranks its share of a split's users against every
    item, and every worker gets the totals over all users.

    The model and item table are built once per weights, so the test splits after the last
    validation reuse them. The packed evaluation rows (index arrays; item content only for live
    encoders) are held for later epochs while a dataset's share stays under HELD_BYTES, so an
    epoch boundary starts no pipeline for them. Their first pass runs in a background thread from
    the start (`read_ahead`), while DeepSpeed sets up and the first epoch trains: each pass starts
    a Ray Data pipeline, seconds of waiting on a small machine. A dataset over HELD_BYTES is read
    again at each use (its read-ahead pass is one pass more)."""

    HELD_BYTES = 256 * 2**20

    def __init__(self, cfg: JobConfig, spec: DataSpec, prepared: PreparedData, device):
        self.cfg, self.spec, self.prepared, self.device = cfg, spec, prepared, device
        self.held: dict[str, list] = {}
        self.reading: dict[str, Future] = {}
        self.weights = self.model = self.items = None

    def read_ahead(self, names: list[str]):
        """Reads these datasets' shares one after the other in a background thread and holds those
        that fit. Every worker reads the same datasets in the same order: a split's pass advances
        only when all of them read it."""
        reader = ThreadPoolExecutor(max_workers=1)
        shards = {name: ray.train.get_dataset_shard(name) for name in names}  # needs Ray Train's context: here, not in the reader
        self.reading = {name: reader.submit(self._hold, name, shard) for name, shard in shards.items()}
        reader.shutdown(wait=False)

    def _hold(self, name: str, shard):
        rows, size = [], 0
        for row in shard.iter_torch_batches(batch_size=1):
            if rows is None:  # too large to hold: the pass still ends (every worker's must), streamed at each use
                continue
            size += sum(value.numel() * value.element_size() for value in row.values())
            if size > self.HELD_BYTES:
                rows = None
            else:
                rows.append(row)
        if rows is not None:
            self.held[name] = rows

    def totals(self, weights: dict, split: str) -> RankTotals:
        import torch.distributed as dist

        if weights is not self.weights:
            self.weights, self.model = weights, model_from_weights(weights, self.cfg, self.spec, self.device)
            self.items = item_representations(self.model, device_batches(self._rows("items"), self.device),
                                              self.spec.num_items)
            dist.all_reduce(self.items)  # each item's row was encoded by exactly one worker, the others hold 0
        share = evaluate_model(self.model, self.items, device_batches(self._rows(split), self.device), self.cfg.eval.ks,
                               self.cfg.eval.exclude_history, self.cfg.eval.item_chunk_size,
                               popularity_counts(self.prepared, self.cfg, split).to(self.device))
        return _merged(share)

    def export(self, out_uri: str):
        """Writes the serving artifacts (jobs/serving.py) of the model last ranked with, and of the
        catalogue it encoded, into folder `out_uri` (local or in object storage): on the workers,
        the driver neither builds the model nor encodes the catalogue again."""
        from interestformer.jobs import serving

        with tempfile.TemporaryDirectory() as folder:
            for name, path in serving.catalogue_artifacts(self.model, self.items, self.prepared, self.cfg, folder).items():
                with open(path, "rb") as f:
                    write_bytes(join(out_uri, name), f.read())

    def most_popular(self, split: str) -> RankTotals:
        """The most-popular baseline on a split, from the rows the model was ranked on."""
        return _merged(evaluate_most_popular(self.prepared, self._rows(split), self.cfg, split))

    def _rows(self, name: str):
        """This worker's packed rows of a dataset: from memory once its read-ahead pass held them."""
        if name in self.reading:
            self.reading.pop(name).result()  # raises what the pass raised
        if name in self.held:
            yield from self.held[name]
        else:
            yield from ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=1)


def _merged(share: RankTotals) -> RankTotals:
    """Every worker's share of a split's rank totals -> the totals over all its users, on every worker."""
    import torch.distributed as dist

    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, share)
    return RankTotals.merge(shares)


def _log_window(metrics_out, window, world, engine, step):
    seconds = time.perf_counter() - window["start"]
    metrics_out.log({
        "train_loss": window["loss"] / max(window["batches"], 1),
        # Every worker runs as many batches of as many users as rank 0 (Ray Train's equal split),
        # so rank 0's rate times the world size is the job's rate.
        "samples_per_s": window["users"] * world / seconds,
        "events_per_s": window["events"] * world / seconds,
        "lr": engine.get_lr()[0],
        "data_wait_fraction": window["wait"] / seconds,  # rank 0's time blocked on its next batch
    }, step=step)
    window.update(loss=0.0, batches=0, users=0, events=0, wait=0.0, start=time.perf_counter())


def _epoch_line(epoch: int, cfg: JobConfig, loss: list, throughput: dict, metrics: dict,
                selection: ModelSelection) -> tuple[str, str]:
    """The console's line for an epoch, and the progress bar's description after it."""
    best = f"best {selection.best:.4f} at epoch {selection.best_epoch}" if selection.best_epoch else ""
    validated = f", {selection.metric} {metrics[selection.metric]:.4f} ({best})" if selection.metric in metrics else ""
    line = (f"epoch {epoch}/{cfg.train.epochs}: {loss[1]} batches, loss {loss[0] / max(1, loss[1]):.4f}, "
            f"{throughput['samples_per_s']:.0f} users/s{validated}")
    return line, f"epoch {min(epoch + 1, cfg.train.epochs)}/{cfg.train.epochs}" + (f" ({best})" if best else "")


def catalogue_model(cfg: JobConfig, spec: DataSpec, features_uri: str, prepared: PreparedData,
                    init_from: str = "") -> tuple[InterestFormer, dict | None]:
    """The model for the prepared data's catalogue: frozen encoders' features from the feature
    store, the hashed-ID map, which items training reaches, and with init_from an earlier
    checkpoint's weights, items matched by id (start_from, whose counts are returned; None
    without init_from)."""
    catalogue = catalogue_ids(prepared)
    model = InterestFormer(cfg.model, spec)
    model.item_encoder.load_content_features(load_features(features_uri))
    if cfg.model.item_id_buckets:
        model.item_encoder.load_id_buckets(torch.from_numpy(id_buckets(catalogue, cfg.model.item_id_buckets)))
    if cfg.model.cold_item_neighbours:
        model.item_encoder.load_trained_items(torch.from_numpy(trained_items(prepared, cfg.data.cold_item_fraction)))
    return model, start_from(model, init_from, catalogue) if init_from else None


def tokenizer_path(cfg: JobConfig, checkpoint: str = "") -> str:
    """The tokenizer that item text is tokenised with: the pretrained text encoder's; else, for a
    run that starts from an earlier one (train.init_from) or a checkpoint ranking other data, the
    earlier run's, so that token ids mean what its text encoder learned; else '' (prepare trains
    a vocabulary on the catalogue)."""
    earlier = checkpoint or cfg.train.init_from
    if cfg.model.text.pretrained_path or not earlier:
        return cfg.model.text.pretrained_path
    return PreparedData(read_json(join(earlier, STATE_FILE))["prepared_path"], {}).tokenizer_path


def data_spec(prepared: PreparedData, cfg: JobConfig) -> DataSpec:
    """The model's view of the prepared data (frozen features' widths: embed_items.feature_store)."""
    from transformers import AutoTokenizer

    return DataSpec(
        num_items=prepared.num_items,
        num_event_types=len(prepared.meta["event_types"]),
        max_seq_len=cfg.data.max_seq_len,
        text_vocab_size=len(AutoTokenizer.from_pretrained(local_folder(prepared.tokenizer_path))),
        text_max_tokens=prepared.meta["text_max_tokens"],
        image_size=prepared.meta["image_size"],
    )


def training_rows(prepared: PreparedData, cfg: JobConfig):
    """The training rows (one a user) that stream to the workers (split across them by WorkerShares)."""
    return training_windows(prepared, cfg.train.micro_batch_size, cfg.data.max_seq_len, cfg.train.pipeline_workers,
                            cfg.data.cold_item_fraction, cfg.data.train_since, cfg.data.new_user_fraction,
                            cfg.data.group_by_length)


def batch_packer(prepared: PreparedData, cfg: JobConfig) -> TrainingBatches:
    """What turns a worker's training rows into the model's batches: negatives, live encoders' content."""
    return TrainingBatches(prepared, cfg.data.negatives(), *cfg.model.live_content(), cfg.train.seed,
                           cfg.data.cold_item_fraction)


def train(cfg: JobConfig, parent_run_id: str = "", callbacks: list = (), display: bool = True) -> dict:
    """Prepare, fit, evaluate, log. Returns the run's id, test metrics, baseline and checkpoint.
    display: draw the run's progress on this process's console (jobs.progress); a sweep's trials
    do not."""
    check_inputs(cfg.data)  # before any Ray resource is taken
    quiet_console(cfg.experiment.verbose)
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    if cfg.train.init_from:
        check_start_from(cfg)
    check_teachers(cfg)
    store = tracking.open_store(uri)  # while Ray starts and the data is prepared
    ensure_ray(cfg)
    prepared = prepare(cfg.data, tokenizer_path=tokenizer_path(cfg))
    if cfg.train.teachers:
        check_teacher_catalogues(cfg, catalogue_ids(prepared))
    features_uri, spec, _ = feature_store(prepared, cfg, data_spec(prepared, cfg))
    report = prepared.report()
    # Users with a training target: every user with two events, less held-out new users, or those
    # with a target in the new window.
    train_users = (training_sequences(prepared, cfg.data.train_since, cfg.data.new_user_fraction).count()
                   if cfg.data.train_since or cfg.data.new_user_fraction else report["users"] - report["users_too_short"])
    if not train_users:  # before the MLflow run and the workers: a run that could not train one step
        raise ConfigError("data.train_since" if cfg.data.train_since else "data",
                          f"leaves no user with a training target ({report['users']} users read)")
    run_name = cfg.experiment.name or f"run-{datetime.now():%Y%m%d-%H%M%S}"
    store.join()
    run_id = tracking.start_run(cfg, deepspeed_config(cfg.train, optimizer_steps(cfg.train, train_users,
                                                                                 cfg.train.num_workers)),
                                report, run_name, parent_run_id)
    events_path, _ = input_paths(cfg.data)
    dataset_name = "demo-events" if cfg.data.source == "demo" else os.path.basename(events_path.rstrip("/"))
    tracking.log_training_data(uri, run_id, dataset_name, events_path, prepared.meta["fingerprint"], report)
    print(f"MLflow run {run_id} in {uri}. Data: {report['users']} users, {report['items']} items, "
          f"{report['events_used']} of {report['events_in']} events used (the rest set aside or duplicates: "
          f"counts by reason in the run's data/* metrics and {prepared.path}/quarantine)", flush=True)

    items, validation = eval_datasets(prepared, cfg, "validation")
    eval_splits = final_splits(cfg)
    datasets = {
        "train": training_rows(prepared, cfg),
        "validation": validation,
        "items": items,
        **{split: eval_datasets(prepared, cfg, split)[1] for split in eval_splits},
    }
    serving_uri = join(absolute(cfg.experiment.storage_path), run_name, "serving")  # beside the run's checkpoints
    board = ProgressBoard.remote() if display else None
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "spec": vars(spec),
            "prepared_path": prepared.path,
            "tracking_uri": uri,
            "run_id": run_id,
            "features_uri": features_uri,
            "serving_uri": serving_uri,
            "train_users": train_users,
            "progress_board": board,
        },
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker},
                                     placement_strategy=cfg.train.placement_strategy),
        run_config=RunConfig(
            name=run_name,
            storage_path=cfg.experiment.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.experiment.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg)},
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        # Every worker trains on, and evaluates, its own share of the users, and encodes its own
        # share of the catalogue for full ranking.
        dataset_config=WorkerShares(),
    )
    try:
        if board is None:
            result = trainer.fit()
        else:
            with DriverDisplay(board):
                result = trainer.fit()
    except BaseException:
        # A sweep's trial leaves its run to the sweep, which knows from Tune whether the trial
        # failed or was stopped: a stopped trial's fit can end in any exception as its actor exits.
        if not parent_run_id:
            tracking.end_run(uri, run_id, "FAILED")
        raise
    if result.return_value["unsent_metrics"]:
        tracking.log_unsent(uri, run_id, result.return_value["unsent_metrics"])
    tracking.set_tags(uri, run_id, {"precision": result.return_value["precision"]})  # auto, as the workers decided
    summary = {"run_id": run_id, "run_name": run_name, "tracking_uri": uri,
               "checkpoint": checkpoint_uri(result.checkpoint), "data": report,
               **{key: result.return_value[key]
                  for key in ("validation", "best_epoch", "stopped_epoch", "throughput", "precision")}}
    evaluations = {}
    for split in eval_splits:
        baseline = result.return_value["most_popular"][split]
        tracking.log_metrics(uri, run_id, {f"most_popular_{METRIC_PREFIX[split]}{k}": v
                                           for k, v in baseline.report().items()}, step=result.return_value["step"])
        evaluations[split] = {"InterestFormer": result.return_value[split], "most popular": baseline}
        summary[split], summary[f"most_popular_{split}"] = result.return_value[split].report(), baseline.report()
    summary["most_popular"] = summary.pop("most_popular_test")
    log_report(uri, run_id, evaluations)
    tracking.log_text(uri, run_id, summary["checkpoint"], "checkpoint_path.txt")
    tracking.log_model(uri, run_id, serving_uri, step=result.return_value["step"])
    tracking.end_run(uri, run_id)
    return summary


def parse_args(argv=None):
    parser = config_parser("python -m jobs.train", __doc__)
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (same as --set experiment.tracking_uri=...)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = args.set + ([f"experiment.tracking_uri={args.tracking_uri}"] if args.tracking_uri else [])
    cfg = load_config(args.config, overrides)  # every config mistake stops here, before Ray starts
    started = time.perf_counter()
    summary = train(cfg)
    minutes = (time.perf_counter() - started) / 60
    print(f"\nFinished in {minutes:.1f} min. Test split, full ranking over {summary['data']['items']} items "
          f"({summary['test']['users']} users):")
    headline = [f"{metric}@{k}" for k in cfg.eval.ks for metric in ("hr", "ndcg")] + ["mrr"]  # as eval.ks asks
    print(f"  {'':14}" + "".join(f"{k:>10}" for k in headline))
    for name, metrics in (("InterestFormer", summary["test"]), ("most popular", summary["most_popular"])):
        print(f"  {name:14}" + "".join(f"{metrics[k]:>10.4f}" for k in headline))
    if "cold" in summary:
        print(f"Cold-start items ({summary['cold']['users']} test users whose target was held out of training):")
        for name, metrics in (("InterestFormer", summary["cold"]), ("most popular", summary["most_popular_cold"])):
            print(f"  {name:14}" + "".join(f"{metrics[k]:>10.4f}" for k in headline))
    if "new_users" in summary:
        print(f"New users ({summary['new_users']['users']} rankings of held-out users after their first 0-3 events), "
              f"hr@10 by events seen:")
        for name, metrics in (("InterestFormer", summary["new_users"]), ("most popular", summary["most_popular_new_users"])):
            print(f"  {name:14}" + "".join(f"{n:>8} {metrics.get(f'segment/history_{n}/hr@10', float('nan')):.4f}"
                                           for n in ("0", "1-3")))
    print(f"Checkpoint: {summary['checkpoint']}")
    print(f"Browse the run: {tracking.ui_command(summary['tracking_uri'])}")
    return summary


if __name__ == "__main__":
    from interestformer.jobs import cli

    cli.train()

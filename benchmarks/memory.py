"""Memory: per-worker peak memory for ZeRO 0/1/2/3 at 1 and 2 workers, a model whose item table dominates.

    .venv/bin/python -m benchmarks.memory                      # 2M items, all 8 configurations (slow on 2 cores)
    .venv/bin/python -m benchmarks.memory --items 100000 --stages 0,3 --workers 2   # a quick look

Each configuration is the training job's own wiring: a Ray Train TorchTrainer whose workers build
the ID-only InterestFormer (items x d_model item table: 2M x 64 = 128M of its ~128.1M
parameters) and wrap it with jobs/distributed.py's setup_engine, which builds the DeepSpeed config
(fp32, torch AdamW, on CPU), then run a few optimizer steps on synthetic batches whose histories
and targets are random items. Every worker reports:
  peak_mb    its process's peak resident memory (getrusage ru_maxrss), all of it: Python, torch
             and Ray take `start_mb` before the model exists;
  state_mb   the bytes of the tensors this rank holds for training, each counted once, at their
             highest (as the optimizer is about to step): its weights, their gradients, and the
             optimizer's parameters (ZeRO's fp32 partitions), gradients and AdamW moments; free of
             allocator noise, and of DeepSpeed's communication buckets (allocated up to
             reduce_bucket_size, 5e8 values, but touched only as far as used);
  params_mb  the weights this rank holds (its ZeRO-3 partition, param.ds_tensor, at stage 3);
  moments_mb AdamW's exp_avg and exp_avg_sq on this rank.
At stage 0 every worker holds everything (4 x 4 bytes per parameter, plus buffers); stage 1
splits the moments, stage 2 also the gradients, stage 3 also the weights. The model is built
whole on each worker before DeepSpeed partitions it (as the training job does), so peak_mb at
stage 3 still includes one whole table at start-up. Stages 0 and 3 run again with the table's
rows split across the workers (train.shard_item_table): each worker holds, and steps in its own
AdamW, 1/workers of the rows; their figures count those rows, gradient and moments too. Results
go to benchmarks/results/memory.json: `peak_mb` (the larger of the workers') keyed by
z<stage>_<workers>w (and z<stage>_<workers>w_sharded), and the other figures alike.
"""

import argparse
import json
import os
import resource
import tempfile
import time

import torch

MB = 2**20
FIGURES = ("peak_mb", "start_mb", "state_mb", "params_mb", "moments_mb")


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def held_state_mb(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> float:
    """Bytes of the weights this rank holds (param.ds_tensor, its partition, under ZeRO-3), their
    gradients, and what the optimizers step on: their parameters (ZeRO's fp32 partitions, a
    sharded table's rows), gradients and moments; each tensor once."""
    tensors = {}
    for p in module.parameters():
        tensors.update({t.data_ptr(): t.nbytes for t in (getattr(p, "ds_tensor", p), p.grad) if t is not None})
    for group in (group for optimizer in optimizers for group in optimizer.param_groups):
        for p in group["params"]:
            tensors.update({t.data_ptr(): t.nbytes for t in (p, p.grad) if t is not None})
            state = next((o.state[p] for o in optimizers if p in o.state), {})
            tensors.update({t.data_ptr(): t.nbytes for t in state.values() if torch.is_tensor(t)})
    return sum(tensors.values()) / MB


def synthetic_batch(num_items: int, batch_size: int, T: int, gen: torch.Generator) -> dict:
    """A training batch (datasets/pipeline.py's keys) of random items: full histories, a target
    after every event."""
    history = torch.randint(1, num_items + 1, (batch_size, T), generator=gen)
    targets = torch.randint(1, num_items + 1, (batch_size, T), generator=gen)
    return {"history": history, "targets": targets, "event_types": torch.ones_like(history),
            "unique_items": torch.unique(torch.cat([history.ravel(), targets.ravel(), torch.tensor([0])]))}


def measure_worker(loop_config: dict):
    """Runs in every Ray Train worker: the model, the engine, a few steps; writes this rank's figures."""
    import ray.train

    from interestformer.jobs.config import JobConfig
    from interestformer.jobs.distributed import optimizer_step, setup_engine, sharded_table
    from interestformer.models.interest_former import DataSpec, InterestFormer

    start_mb = rss_peak_mb()
    cfg = JobConfig.from_dict(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    num_items, T = loop_config["num_items"], cfg.data.max_seq_len
    spec = DataSpec(num_items=num_items, num_event_types=1, max_seq_len=T, text_vocab_size=0, text_max_tokens=0,
                    image_size=0)
    engine, _ = setup_engine(InterestFormer(cfg.model, spec), cfg.train)
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch AdamW (ZeRO wraps it)
    table = sharded_table(engine)
    optimizers = [optimizer] + ([table.optimizer] if table else [])
    state_mb = [0.0]  # its highest, taken as DeepSpeed's optimizer is about to step: gradients in place

    def before_step(optimizer, args, kwargs):
        state_mb[0] = max(state_mb[0], held_state_mb(engine.module, optimizers))

    optimizer.register_step_pre_hook(before_step)
    gen = torch.Generator().manual_seed(cfg.train.seed + rank)  # each rank its own items
    started = time.perf_counter()
    for _ in range(loop_config["steps"]):
        loss = engine(synthetic_batch(num_items, cfg.train.micro_batch_size, T, gen))
        engine.backward(loss)
        optimizer_step(engine)  # the sharded table steps after DeepSpeed's optimizer

    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]  # ZeRO-3: this rank's partition
    params += [table.rows] if table else []
    moments = [t for o in optimizers for state in o.state.values() for t in state.values() if torch.is_tensor(t) and t.dim()]
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    parameters += table.bounds[-1] * table.dim if table else 0
    figures = {"rank": rank, "parameters": parameters,
               "start_mb": start_mb, "peak_mb": rss_peak_mb(), "state_mb": state_mb[0],
               "params_mb": sum(p.nbytes for p in params) / MB, "moments_mb": sum(t.nbytes for t in moments) / MB,
               "step_seconds": (time.perf_counter() - started) / loop_config["steps"], "loss": loss.item()}
    with open(os.path.join(loop_config["out_dir"], f"rank{rank}.json"), "w") as f:
        json.dump(figures, f)


def run_configuration(cfg, num_items: int, steps: int, storage: str) -> list[dict]:
    """One TorchTrainer run of measure_worker; returns every worker's figures."""
    import ray.train
    from ray.train.torch import TorchTrainer

    name = f"z{cfg.train.zero_stage}_{cfg.train.num_workers}w"
    out_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=storage)
    trainer = TorchTrainer(
        measure_worker,
        train_loop_config={"config": cfg.to_dict(), "num_items": num_items, "steps": steps, "out_dir": out_dir},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage),
    )
    trainer.fit()
    workers = []
    for rank in range(cfg.train.num_workers):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            workers.append(json.load(f))
    return workers


def table(results: dict) -> str:
    head = ["config", "workers' peak MB", "start MB", "tensors MB", "weights MB", "moments MB", "s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, workers in results.items():
        cells = [name] + [" / ".join(f"{w[key]:.0f}" for w in workers) for key in FIGURES]
        cells.append(" / ".join(f"{w['step_seconds']:.1f}" for w in workers))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    from benchmarks.common import write_results
    from interestformer.jobs.config import JobConfig
    from interestformer.jobs.cluster import ensure_ray

    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2_000_000, help="catalogue size: rows of the item table")
    parser.add_argument("--stages", default="0,1,2,3", help="comma-separated ZeRO stages")
    parser.add_argument("--workers", default="2,1", help="comma-separated worker counts, in the order run")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per configuration")
    parser.add_argument("--sharded-stages", default="0,3",
                        help="comma-separated ZeRO stages also run with the table's rows split across the workers "
                             "(train.shard_item_table), keyed z<stage>_<workers>w_sharded; empty leaves them out")
    args = parser.parse_args(argv)

    cfg = JobConfig()
    cfg.model.text.enabled = cfg.model.image.enabled = False  # ID-only: the item table is the model
    cfg.train.cpus_per_worker = 0.5
    cfg.train.num_workers = max(int(w) for w in args.workers.split(","))
    ensure_ray(cfg)
    results = {}
    stages = [(int(stage), False) for stage in args.stages.split(",")]  # (ZeRO stage, table sharded)
    stages += [(int(stage), True) for stage in args.sharded_stages.split(",") if stage]
    with tempfile.TemporaryDirectory(prefix="memory-benchmark-") as storage:
        for workers in (int(w) for w in args.workers.split(",")):
            for stage, sharded in stages:
                cfg.train.zero_stage, cfg.train.num_workers, cfg.train.shard_item_table = stage, workers, sharded
                name = f"z{stage}_{workers}w" + ("_sharded" if sharded else "")
                results[name] = run_configuration(cfg, args.items, args.steps, storage)
                print(f"{name}: {json.dumps(results[name])}", flush=True)
                # After every configuration: a later failure keeps the earlier ones.
                figures = {key: {name: max(w[key] for w in workers) for name, workers in results.items()}
                           for key in FIGURES}
                figures.update(items=args.items, d_model=cfg.model.d_model, parameters=results[name][0]["parameters"],
                               steps=args.steps, workers=results)
                path = write_results("memory", figures)
    print("\n" + table(results))
    print(f"\nWritten to {path}")
    return figures


if __name__ == "__main__":
    main()

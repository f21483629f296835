"""Training speed of the sequence Transformer: samples/s, tokens/s and model FLOPs utilisation.

    .venv/bin/python -m benchmarks.gpu                 # GPU sizes on a GPU, small sizes on a CPU
    .venv/bin/python -m benchmarks.gpu --preset cpu    # the small sizes anywhere (a quick look)
    .venv/bin/python -m benchmarks.gpu --d-model 1024 --layers 16 --seq-lens 200,1024,4096

What is timed: training steps of the real InterestFormer (models/interest_former.py) -- forward,
backward and an AdamW step -- under bf16 autocast (fp32 weights and optimizer state, as
DeepSpeed's bf16 keeps its master copy), at each sequence length. Items are IDs only (no text or
image encoder). Batches are synthetic and full length: every user has T + 1 events, so there is
no padding and the attention is plain causal without a mask, which a GPU runs with the flash
kernel (on a GPU the script allows only that kernel, so a step that could not take it fails).
Items are drawn uniformly from the catalogue; the candidates of a step are its unique items plus
`--negatives` uniform negatives, as in training.

Model FLOPs of one step (a multiply-add is 2 FLOPs; backward costs twice the forward, so 6 per
multiply-add in all), with B users, T positions, d = d_model, L layers, U unique candidates:
    6 * P_blocks * B*T        the Transformer's weights (L blocks and the final LayerNorm) per token
    6 * P_items * U           the item tower's weights (ID-only: the fuse Linear and its LayerNorm)
                              per unique item encoded; embedding lookups count nothing
    6 * L * T * d * B*T       attention scores and weighted sums. Full attention costs 12*L*T*d
                              per token (the count of PaLM and nanoGPT); we count half, because
                              causal attention needs only the lower triangle and flash skips the rest
    6 * B*T * U * d           logits: every position's user vector against every candidate
Recomputation under --activation-checkpointing is not model FLOPs and is not counted.
MFU = model FLOPs per second / the ceiling, the measured throughput of large square matmuls in
the same dtype on the same device (not the datasheet peak).

Writes benchmarks/results/gpu.json: samples_per_s, tokens_per_s, mfu and model_tflops keyed by
sequence length, device, dtype, ceiling_tflops, the sizes, machine, date and commit.
"""

import argparse
import json
import os
import time
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import PROJECT_DIR, cpu_name, stamp
from interestformer.models.encoders import ImageEncoderConfig, TextEncoderConfig
from interestformer.models.interest_former import DataSpec, InterestFormer, ModelConfig

DEFAULT_OUT = os.path.join(PROJECT_DIR, "benchmarks", "results", "gpu.json")
# Sizes by preset: a GPU's are a substantial model and batch; a CPU's finish in about two minutes.
PRESETS = {
    "gpu": dict(d_model=512, layers=8, heads=8, items=100_000, tokens_per_batch=32_768, warmup=5, steps=20,
                matmul_size=8192),
    "cpu": dict(d_model=128, layers=2, heads=2, items=10_000, tokens_per_batch=2048, warmup=2, steps=5,
                matmul_size=2048),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`: the best of `repeats` timed runs after a warm-up."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for i in range(repeats + 2):
        sync(device)
        started = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:  # the first runs pick kernels and warm caches
            best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(args, seq_len: int, device: torch.device) -> InterestFormer:
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      activation_checkpointing=args.activation_checkpointing,
                      text=TextEncoderConfig(enabled=False), image=ImageEncoderConfig(enabled=False))
    spec = DataSpec(num_items=args.items, num_event_types=1, max_seq_len=seq_len, text_vocab_size=2,
                    text_max_tokens=2, image_size=16)
    torch.manual_seed(0)
    return InterestFormer(cfg, spec).to(device).train()


def synthetic_batch(batch_size: int, seq_len: int, num_items: int, negatives: int, device) -> dict:
    """A packed training batch (datasets/pipeline.py) of full-length histories: no padding."""
    generator = torch.Generator().manual_seed(0)
    items = torch.randint(1, num_items + 1, (batch_size, seq_len + 1), generator=generator)
    sampled = torch.randint(1, num_items + 1, (negatives,), generator=generator)
    batch = {
        "history": items[:, :-1].contiguous(),
        "targets": items[:, 1:].contiguous(),
        "event_types": torch.ones(batch_size, seq_len, dtype=torch.long),
        "unique_items": torch.unique(torch.cat([items.ravel(), sampled, torch.tensor([0])])),
    }
    return {name: value.to(device) for name, value in batch.items()}


def step_flops(model: InterestFormer, batch_size: int, seq_len: int, candidates: int) -> float:
    """Model FLOPs of one training step (the formula in the module docstring)."""
    d, layers, tokens = model.cfg.d_model, model.cfg.n_layers, batch_size * seq_len
    blocks = sum(p.numel() for p in model.blocks.parameters()) + sum(p.numel() for p in model.ln_f.parameters())
    item_tower = sum(p.numel() for name, p in model.item_encoder.named_parameters()
                     if not name.startswith("id_embedding."))
    return (6 * blocks * tokens + 6 * item_tower * candidates + 6 * layers * seq_len * d * tokens
            + 6 * tokens * candidates * d)


def measure(args, seq_len: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Times args.steps training steps at one sequence length (after args.warmup untimed ones)."""
    model = build_model(args, seq_len, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch_size = max(1, args.tokens_per_batch // seq_len)
    batch = synthetic_batch(batch_size, seq_len, args.items, args.negatives, device)
    flash_only = device.type == "cuda" and not args.any_attention_kernel
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        with autocast, sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash_only else nullcontext():
            loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - started) / args.steps
    flops = step_flops(model, batch_size, seq_len, len(batch["unique_items"]))
    result = {"batch_size": batch_size, "candidates": len(batch["unique_items"]), "step_ms": seconds * 1e3,
              "samples_per_s": batch_size / seconds, "tokens_per_s": batch_size * seq_len / seconds,
              "model_tflops": flops / seconds / 1e12}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="sizes (default: gpu on a GPU, cpu otherwise); the flags below override them")
    parser.add_argument("--seq-lens", default="200,1024", help="comma-separated sequence lengths")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="autocast and ceiling dtype")
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--items", type=int, help="catalogue size (ID embedding rows)")
    parser.add_argument("--tokens-per-batch", type=int, help="batch size = this // sequence length")
    parser.add_argument("--negatives", type=int, default=128, help="uniform negatives per batch")
    parser.add_argument("--warmup", type=int, help="untimed steps first")
    parser.add_argument("--steps", type=int, help="timed steps")
    parser.add_argument("--matmul-size", type=int, help="n of the n x n x n matmul that measures the ceiling")
    parser.add_argument("--activation-checkpointing", action="store_true", help="model.activation_checkpointing")
    parser.add_argument("--any-attention-kernel", action="store_true",
                        help="on a GPU, let PyTorch pick the attention kernel instead of requiring flash")
    parser.add_argument("--out", default=DEFAULT_OUT, help="results JSON (overwritten)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    seq_lens = [int(n) for n in args.seq_lens.split(",")]
    dtype = DTYPES[args.dtype]

    ceiling = matmul_ceiling(device, dtype, args.matmul_size)
    print(f"{device_name(device)}: {args.dtype} matmul ceiling {ceiling / 1e12:.1f} TFLOP/s "
          f"({args.matmul_size}^3)", flush=True)
    rows = {}
    for seq_len in seq_lens:
        rows[seq_len] = measure(args, seq_len, device, dtype)
        rows[seq_len]["mfu"] = rows[seq_len]["model_tflops"] * 1e12 / ceiling
        print(f"T={seq_len}: {json.dumps(rows[seq_len])}", flush=True)

    results = {
        "samples_per_s": {str(t): row["samples_per_s"] for t, row in rows.items()},
        "tokens_per_s": {str(t): row["tokens_per_s"] for t, row in rows.items()},
        "mfu": {str(t): row["mfu"] for t, row in rows.items()},
        "model_tflops": {str(t): row["model_tflops"] for t, row in rows.items()},
        "by_seq_len": {str(t): row for t, row in rows.items()},
        "device": device_name(device),
        "dtype": args.dtype,
        "ceiling_tflops": ceiling / 1e12,
        "sizes": {name: getattr(args, name) for name in (*PRESETS["gpu"], "negatives", "activation_checkpointing")},
        "load_average_1min": os.getloadavg()[0],  # other work on the machine slows a CPU run
        **stamp(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    head = ["seq len", "batch", "candidates", "step ms", "samples/s", "tokens/s", "model TFLOP/s", "MFU"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for t, row in rows.items():
        print(f"| {t} | {row['batch_size']} | {row['candidates']} | {row['step_ms']:.1f} | {row['samples_per_s']:.1f} "
              f"| {row['tokens_per_s']:.0f} | {row['model_tflops']:.3g} | {row['mfu']:.2%} |")
    print(f"\nCeiling: {ceiling / 1e12:.2f} TFLOP/s ({args.dtype} matmul) on {results['device']}. "
          f"Written to {args.out}")
    return results


if __name__ == "__main__":
    main()

"""Catalogue scale: full-ranking evaluation and top-k over 100k and 1M synthetic items in bounded memory.

    .venv/bin/python -m benchmarks.catalog                     # 100k and 1M items, 2,048 users
    .venv/bin/python -m benchmarks.catalog --items 10000 --users 256   # a quick look

For each catalogue size N, a fresh Python process (so its peak memory is that size's alone):
  - builds the default config's ID-only InterestFormer for N items (its item ID table is
    (N + 1, d_model)) and random L2-normalised item vectors (N + 1, d_model), what evaluation
    scores users against;
  - makes synthetic users: left-padded histories of random items, of random length up to
    data.max_seq_len, and a random target, in batches of eval.batch_size;
  - runs the evaluation's own code, ranking.evaluate_model (eval.ks, eval.exclude_history,
    eval.item_chunk_size items at a time), timed -> `seconds`;
  - then the serving top-k, ranking.chunked_top_k (k = the largest of eval.ks, history items
    excluded, as served), timed -> `top_k_seconds`;
  - reports its resident memory after set-up (`setup_mb`) and its peak at the end (getrusage
    ru_maxrss) -> `peak_mb`.
The difference is what ranking adds; with chunking it is bounded by about
eval.batch_size x eval.item_chunk_size scores (`chunk_bound_mb`) and does not grow with N, while
scoring whole rows would take eval.batch_size x (N + 1) scores (`whole_rows_mb`). What grows with
N is the item vectors and the model's ID table, both reported. Results go to
benchmarks/results/catalog.json: `seconds` and `peak_mb` keyed by item count, and the rest.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MB = 2**20


def resident_mb() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def measure(num_items: int, num_users: int, seed: int = 0) -> dict:
    """One catalogue size, in this process: times, peak memory and the sizes that explain it."""
    import torch

    from interestformer.jobs.config import JobConfig
    from interestformer.models.interest_former import DataSpec, InterestFormer
    from interestformer.models.ranking import chunked_top_k, evaluate_model

    cfg = JobConfig()
    cfg.model.text.enabled = cfg.model.image.enabled = False  # ID-only: the item table is the model
    T, batch_size, chunk = cfg.data.max_seq_len, cfg.eval.batch_size, cfg.eval.item_chunk_size
    torch.manual_seed(seed)
    spec = DataSpec(num_items=num_items, num_event_types=1, max_seq_len=T, text_vocab_size=0, text_max_tokens=0,
                    image_size=0)
    model = InterestFormer(cfg.model, spec).eval()
    items = torch.randn(num_items + 1, cfg.model.d_model)
    items /= items.norm(dim=1, keepdim=True)  # L2-normalised in place: no second table at set-up
    items[0] = 0  # padding

    batches = []
    for first in range(0, num_users, batch_size):
        B = min(batch_size, num_users - first)
        lengths = torch.randint(1, T + 1, (B,))
        history = torch.randint(1, num_items + 1, (B, T)) * (torch.arange(T) >= T - lengths[:, None])  # left-padded
        batches.append({"history": history, "event_types": (history > 0).long(),
                        "unique_items": torch.unique(torch.cat([history.ravel(), torch.tensor([0])])),
                        "targets": torch.randint(1, num_items + 1, (B,)), "history_length": lengths,
                        "target_cold": torch.zeros(B, dtype=torch.bool)})
    setup_mb = resident_mb()

    started = time.perf_counter()
    totals = evaluate_model(model, items, batches, cfg.eval.ks, cfg.eval.exclude_history, chunk)
    seconds = time.perf_counter() - started

    k = max(cfg.eval.ks)
    started = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            users = model.user_vectors(batch).float()  # (B, d)
            chunked_top_k(lambda a, b: users @ items[a:b].T, len(items), k, batch["history"], chunk)
    top_k_seconds = time.perf_counter() - started

    return {
        "items": num_items, "users": totals.users, "seconds": seconds, "top_k_seconds": top_k_seconds,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "setup_mb": setup_mb,
        "item_vectors_mb": items.nbytes / MB,
        "model_mb": sum(p.nbytes for p in model.parameters()) / MB,
        "chunk_bound_mb": batch_size * chunk * 4 / MB, "whole_rows_mb": batch_size * (num_items + 1) * 4 / MB,
        "batch_size": batch_size, "item_chunk_size": chunk, "top_k": k, "hr@10": totals.metrics()["hr@10"],
    }


def measure_in_child(num_items: int, num_users: int) -> dict:
    """measure() in a fresh Python, so ru_maxrss is this size's peak alone."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.catalog", "--child", str(num_items),
                           "--users", str(num_users)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{num_items} items failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ["items", "users", "eval s", "top-k s", "peak MB", "after set-up MB", "ranking adds MB",
            "item vectors MB", "model MB", "chunk bound MB", "whole rows MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['items']:,}", f"{r['users']:,}", f"{r['seconds']:.1f}", f"{r['top_k_seconds']:.1f}",
                 f"{r['peak_mb']:.0f}", f"{r['setup_mb']:.0f}", f"{r['peak_mb'] - r['setup_mb']:.0f}",
                 f"{r['item_vectors_mb']:.0f}", f"{r['model_mb']:.0f}", f"{r['chunk_bound_mb']:.0f}",
                 f"{r['whole_rows_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    from benchmarks.common import write_results

    parser = argparse.ArgumentParser(prog="python -m benchmarks.catalog", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="100000,1000000", help="comma-separated catalogue sizes")
    parser.add_argument("--users", type=int, default=2048, help="synthetic users ranked at each size")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one size, in this process
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.users)), flush=True)
        return {}

    rows = []
    for num_items in (int(n) for n in args.items.split(",")):
        rows.append(measure_in_child(num_items, args.users))
        print(json.dumps(rows[-1]), flush=True)
    figures = {
        "seconds": {str(r["items"]): r["seconds"] for r in rows},
        "peak_mb": {str(r["items"]): r["peak_mb"] for r in rows},
        "top_k_seconds": {str(r["items"]): r["top_k_seconds"] for r in rows},
        "setup_mb": {str(r["items"]): r["setup_mb"] for r in rows},
        "rows": rows,
    }
    print("\n" + table(rows))
    print(f"\nWritten to {write_results('catalog', figures)}")
    return figures


if __name__ == "__main__":
    main()

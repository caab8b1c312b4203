"""GradCache against the plain contrastive step: step time and peak memory at equal global batch, and
the largest batch each reaches inside a fixed memory budget.

Each (mode, batch) runs in a fresh process that loads the model, then caps its address space at
(current + budget) with RLIMIT_AS, so "out of memory" means the step needed more than the budget on
top of the loaded model, and a failure cannot disturb the other runs. Data: crop pairs from the Debian
corpus; model: all-MiniLM-L6-v2 (mean pooling), one process, CPU (or GPU where present).

    python benchmarks/gradcache.py [--budget-gib 6] [--batches 128 512 2048 4096] [--chunk 128]

Writes benchmarks/results/gradcache.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SEQ_LEN = 64


def _texts(batch: int) -> tuple[list[str], list[str]]:
    from speed_ray.data import read_labelled
    from speed_ray.pairs import build_pairs

    pairs, _ = build_pairs(read_labelled(REPO.parent / "shared/data/debian/labelled.jsonl"), "crops")
    pairs = (pairs * (batch // len(pairs) + 1))[:batch]
    return [p["anchor"] for p in pairs], [p["positive"] for p in pairs]


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _vms_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _run(mode: str, batch: int, chunk: int, budget_gib: float, out: mp.Queue) -> None:
    import torch

    from speed_ray.embedding import build_model
    from speed_ray.gradcache import cached_backward
    from speed_ray.losses import info_nce
    from speed_ray.models import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(resolve_model("all-minilm-l6-v2"), "mean", SEQ_LEN)
    model.train()
    anchors, positives = _texts(batch)
    texts = anchors + positives

    def embed(chunk_texts):
        return model(dict(model.preprocess(list(chunk_texts))))["sentence_embedding"]

    def loss_fn(emb):
        return info_nce(emb[:batch], emb[batch:], temperature=0.05)

    embed(texts[:8])  # warm-up: lazy allocations happen before the cap
    base = _rss_gib()
    resource.setrlimit(resource.RLIMIT_AS, (_vms_bytes() + int(budget_gib * 2**30), resource.RLIM_INFINITY))
    t0 = time.perf_counter()
    try:
        if mode == "cached":
            cached_backward(embed, texts, loss_fn, chunk)
        else:
            loss, _ = loss_fn(embed(texts))
            loss.backward()
    except (RuntimeError, MemoryError) as e:
        out.put({"mode": mode, "batch": batch, "ok": False, "error": str(e).splitlines()[0][:120]})
        return
    out.put(
        {
            "mode": mode,
            "batch": batch,
            "ok": True,
            "step_s": round(time.perf_counter() - t0, 3),
            "peak_extra_gib": round(_rss_gib() - base, 3),
        }
    )


def measure(mode: str, batch: int, chunk: int, budget_gib: float) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run, args=(mode, batch, chunk, budget_gib, q))
    p.start()
    p.join()
    result = (
        q.get()
        if not q.empty()
        else {"mode": mode, "batch": batch, "ok": False, "error": f"exit {p.exitcode}"}
    )
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-gib", type=float, default=6.0)
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 512, 2048, 4096])
    ap.add_argument("--chunk", type=int, default=128)
    args = ap.parse_args()
    runs = []
    for batch in args.batches:
        for mode in ("plain", "cached"):
            runs.append(measure(mode, batch, args.chunk, args.budget_gib))
    ok = {m: [r["batch"] for r in runs if r["mode"] == m and r["ok"]] for m in ("plain", "cached")}
    both = [b for b in args.batches if b in ok["plain"] and b in ok["cached"]]
    step = {(r["mode"], r["batch"]): r.get("step_s") for r in runs}
    result = {
        "benchmark": "gradcache",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": "all-MiniLM-L6-v2, mean pooling",
        "seq_len": SEQ_LEN,
        "chunk": args.chunk,
        "memory_budget_gib": args.budget_gib,
        "runs": runs,
        "largest_batch_in_budget": {m: max(v, default=0) for m, v in ok.items()},
        "cached_over_plain_step_time": {b: round(step[("cached", b)] / step[("plain", b)], 3) for b in both},
    }
    out = REPO / "benchmarks/results/gradcache.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("largest_batch_in_budget", "cached_over_plain_step_time")}, indent=2
        )
    )


if __name__ == "__main__":
    main()

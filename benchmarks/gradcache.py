"""GradCache against the plain contrastive step: step time and peak memory at equal global batch, and
the largest batch each reaches inside a fixed memory budget.

Each (mode, batch) runs in a fresh process that loads the model, then caps its address space at
(current + budget) with RLIMIT_AS, so "out of memory" means the step needed more than the budget on
top of the loaded model, and a failure cannot disturb the other runs. Data: crop pairs from the Debian
corpus; model: all-MiniLM-L6-v2 (mean pooling), one process, CPU (or GPU where present).

    python benchmarks/gradcache.py [--budget-gib 6] [--batches 128 512 2048 4096] [--chunk 128]
                                   [--last-blocks 2] [--repeats 2]

Each run is one optimizer step of the trainer's own ``train_step``. The first batch size is timed
``--repeats`` times per mode, interleaved, and compared by median; with ``--last-blocks N`` it also
times training only the last N blocks: plain, cached with the frozen blocks computed once, and
cached recomputing them (``embed.cache_frozen: false``).

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
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SEQ_LEN = 64


def _rows(batch: int) -> list[dict]:
    from speed_ray.embed.pairs import build_pairs
    from speed_ray.io.data import locate, read_labelled

    pairs, _ = build_pairs(read_labelled(locate("builtin:debian/labelled")), "crops")
    pairs = (pairs * (batch // len(pairs) + 1))[:batch]
    return [{"query": p["anchor"], "positive": p["positive"], "negatives": []} for p in pairs]


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _vms_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _run(mode: str, batch: int, chunk: int, budget_gib: float, last: int, out: mp.Queue) -> None:
    """One training step of the trainer's own ``train_step`` (AdamW), plain or cached (``mode``),
    all blocks or the last ``last``; ``cached-nocache`` recomputes the frozen blocks on replay."""
    import torch

    from speed_ray.embed.config import EmbedConfig
    from speed_ray.embed.model import FrozenBlocks, build_model
    from speed_ray.embed.step import train_step
    from speed_ray.embed.train import EmbedTrainSettings
    from speed_ray.io.models import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(resolve_model("all-minilm-l6-v2"), "mean", SEQ_LEN)
    model.train()
    frozen = FrozenBlocks(model, last) if last else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    rows = _rows(batch)
    ec = EmbedConfig(  # pass_tokens: the trainer's default, on both sides
        pooling="mean",
        temperature=0.05,
        symmetric=False,
        max_grad_norm=0.0,
        precision="fp32",
        chunk_size=0 if mode == "plain" else chunk,
    )
    config = EmbedTrainSettings(ec, model_path="", num_negatives=0, seed=0, snapshot_dir="")
    warm_up = replace(config, embed=replace(ec, chunk_size=0))
    train_step(model, optimizer, rows[:8], warm_up)  # warm-up before the cap
    base = _rss_gib()
    resource.setrlimit(resource.RLIMIT_AS, (_vms_bytes() + int(budget_gib * 2**30), resource.RLIM_INFINITY))
    t0 = time.perf_counter()
    try:
        train_step(model, optimizer, rows, config, frozen if mode == "cached" else None)
    except (RuntimeError, MemoryError) as e:
        out.put(
            {
                "mode": mode,
                "batch": batch,
                "last_blocks": last,
                "ok": False,
                "error": str(e).splitlines()[0][:120],
            }
        )
        return
    out.put(
        {
            "mode": mode,
            "batch": batch,
            "last_blocks": last,
            "ok": True,
            "step_s": round(time.perf_counter() - t0, 3),
            "peak_extra_gib": round(_rss_gib() - base, 3),
        }
    )


def measure(mode: str, batch: int, chunk: int, budget_gib: float, last: int = 0) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run, args=(mode, batch, chunk, budget_gib, last, q))
    p.start()
    p.join()
    result = (
        q.get()
        if not q.empty()
        else {"mode": mode, "batch": batch, "last_blocks": last, "ok": False, "error": f"exit {p.exitcode}"}
    )
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-gib", type=float, default=6.0)
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 512, 2048, 4096])
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument(
        "--last-blocks", type=int, default=2, help="also train the last N blocks only, at the first batch"
    )
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode at the first batch (timing)")
    args = ap.parse_args()
    first = args.batches[0]
    runs = []
    for _ in range(args.repeats):  # interleaved, so drifting load hits both modes alike
        for mode in ("plain", "cached"):
            runs.append(measure(mode, first, args.chunk, args.budget_gib))
    for batch in args.batches[1:]:
        for mode in ("plain", "cached"):
            runs.append(measure(mode, batch, args.chunk, args.budget_gib))
    if args.last_blocks:
        for _ in range(args.repeats):
            for mode in ("plain", "cached", "cached-nocache"):
                runs.append(measure(mode, first, args.chunk, args.budget_gib, args.last_blocks))

    def median_step(mode: str, batch: int, last: int = 0) -> float | None:
        times = sorted(
            r["step_s"]
            for r in runs
            if r["ok"] and (r["mode"], r["batch"], r["last_blocks"]) == (mode, batch, last)
        )
        return times[len(times) // 2] if times else None

    ok = {
        m: [r["batch"] for r in runs if r["mode"] == m and r["ok"] and not r["last_blocks"]]
        for m in ("plain", "cached")
    }
    ratios = {}
    for b in args.batches:
        plain, cached = median_step("plain", b), median_step("cached", b)
        if plain and cached:
            ratios[str(b)] = round(cached / plain, 3)
    result = {
        "benchmark": "gradcache",
        "what": "one optimizer step of speed_ray.embed.step.train_step (AdamW), crop pairs, no hard negatives",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": "all-MiniLM-L6-v2, mean pooling",
        "seq_len": SEQ_LEN,
        "chunk": args.chunk,
        "memory_budget_gib": args.budget_gib,
        "runs": runs,
        "largest_batch_in_budget": {m: max(v, default=0) for m, v in ok.items()},
        "cached_over_plain_step_time": ratios,
    }
    if args.last_blocks:
        last = {m: median_step(m, first, args.last_blocks) for m in ("plain", "cached", "cached-nocache")}
        if all(last.values()):
            result[f"last_{args.last_blocks}_blocks_at_{first}"] = {
                "step_s": last,
                "cached_over_plain": round(last["cached"] / last["plain"], 3),  # type: ignore[operator]
                "without_frozen_cache_over_plain": round(last["cached-nocache"] / last["plain"], 3),  # type: ignore[operator]
            }
    out = REPO / "benchmarks/results/gradcache.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k not in ("runs", "benchmark", "what")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

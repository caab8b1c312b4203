"""Training on a million pairs: what the driver and each Ray Train worker hold, against the data's size.

For each size (10,000, 100,000 and 1,000,000 pairs by default) a ``synth/train`` step of that many
rows (a query, a positive and a hard negative of random words each) is written, then the embed stage
trains the tiny BERT (``tiny-bert``, built from its config) on it for ``--steps`` steps on 2 Ray Train
workers, global batch 2 x ``--batch``: the driver streams the rows into ``<run>/embed/data``'s shards
and each worker reads its share of them (``speed_ray/embed/data.py``).

Sampled every 0.2 s: the driver's heap (``RssAnon``) and resident memory, and every Ray Train
worker's resident memory. Recorded per size: the data's bytes on disk (``synth/train``,
``embed/data``) and in memory as Python rows (what each worker held when the rows went out as one
object), the driver's heap before and at its peak, each worker's peak, and the run's time. A warm-up
run of 2,000 rows comes first (Ray and torch grow the driver's heap as they start), and the 10,000
row run stands for "the model and a fixed buffer": a worker's growth beyond it is what the data costs.

    python benchmarks/embed_data.py [--sizes 10000 100000 1000000] [--steps 300] [--batch 32]

Writes benchmarks/results/embed_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.synth_pipeline import status_mib  # noqa: E402

WORDS = [f"w{i:04d}" for i in range(5000)]
SHARD_ROWS = 10_000


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_train(run: Path, n: int) -> Path:
    """``<run>/synth/train``: ``n`` triplets in shards of ``SHARD_ROWS``, written a shard at a time."""
    import pyarrow as pa

    from speed_ray.io.schemas import TRIPLETS, write_stage

    def shards():
        for start in range(0, n, SHARD_ROWS):
            rng = random.Random(start)
            rows = [
                {
                    "id": f"e{i:08d}",
                    "anchor": text(rng, 8),
                    "positive": text(rng, 40),
                    "negative": text(rng, 40),
                }
                for i in range(start, min(n, start + SHARD_ROWS))
            ]
            yield pa.Table.from_pylist(rows, schema=TRIPLETS)

    out = run / "synth" / "train"
    write_stage(out, shards(), TRIPLETS, {}, time.time())
    return out


def train_workers() -> dict[str, float]:
    """{pid: resident MiB} of every Ray Train worker process."""
    out = {}
    for p in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::") and "TrainWorker" in cmd:
            out[p.name] = status_mib(p.name, "VmRSS")
    return out


class Sampler(threading.Thread):
    """Every ``period`` s: the driver's heap (split at the moment ``written`` appears: the training
    data is written, training starts) and resident memory, and each Ray Train worker's peak."""

    def __init__(self, written: Path, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.written, self.period, self.stop = written, period, threading.Event()
        self.heap: dict[str, list[float]] = {"writing data": [], "training": []}
        self.rss: list[float] = []
        self.workers: dict[str, float] = defaultdict(float)

    def run(self) -> None:
        while not self.stop.wait(self.period):
            phase = "training" if self.written.is_file() else "writing data"
            self.heap[phase].append(status_mib(os.getpid(), "RssAnon"))
            self.rss.append(status_mib(os.getpid(), "VmRSS"))
            for pid, rss in train_workers().items():
                self.workers[pid] = max(self.workers[pid], rss)


def folder_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


def python_rows_mib(run: Path, n: int) -> float:
    """The rows as the trainer's Python dicts, measured on one shard and scaled to ``n``: what every
    worker held when the whole set went out as one object."""
    import tracemalloc

    import pyarrow.parquet as pq

    from speed_ray.io.schemas import split_query

    shard = pq.read_table(next(iter(sorted((run / "synth" / "train").glob("*.parquet")))))
    tracemalloc.start()
    rows = [
        dict(zip(("instruction", "query"), split_query(r["anchor"]), strict=True))
        | {"positive": r["positive"], "negatives": [r["negative"]]}
        for r in shard.to_pylist()
    ]
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return round(size / len(rows) * n / 2**20, 1)


def run_size(root: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    from speed_ray.config import load_config
    from speed_ray.embed import driver as embed

    data_run = root / f"data-{n}"
    t0 = time.time()
    write_train(data_run, n)
    written_s = time.time() - t0
    cfg = load_config(
        None,
        [
            f"run.output_dir={root}",
            f"run.name=embed-{n}",
            "embed.model=tiny-bert",
            "embed.data.source=synth",
            f"embed.data.path={data_run}",
            "embed.resources.workers=2",
            f"embed.batch_size={args.batch}",
            f"embed.steps={args.steps}",
            "embed.max_seq_length=64",
            "embed.hard_negatives=1",
        ],
    )
    heap_before = status_mib(os.getpid(), "RssAnon")
    sampler = Sampler(cfg.run_dir / "embed" / "data" / "_manifest.json")
    sampler.start()
    t1 = time.time()
    manifest = embed.run(cfg)
    seconds = time.time() - t1
    sampler.stop.set()
    sampler.join()
    workers = sorted(sampler.workers.values(), reverse=True)[:2]
    return {
        "pairs": n,
        "steps": manifest["steps"],
        "global_batch": manifest["global_batch"],
        "epochs": manifest["epochs"],
        "data_on_disk_mib": {
            "synth/train": folder_mib(data_run / "synth" / "train"),
            "embed/data": folder_mib(cfg.run_dir / "embed" / "data"),
        },
        "rows_in_python_mib": python_rows_mib(data_run, n),
        "driver_heap_mib": {"before": round(heap_before, 1)}
        | {f"peak {phase}": round(max(v), 1) for phase, v in sampler.heap.items() if v}
        | {"peak": round(max(max(v) for v in sampler.heap.values() if v), 1)},
        "driver_rss_peak_mib": round(max(sampler.rss), 1),
        "worker_rss_peak_mib": [round(w, 1) for w in workers],
        "seconds": {"write_synth_train": round(written_s, 1), "embed_stage": round(seconds, 1)},
        "loss_first_last": [
            round(manifest["history"][0]["loss"], 4),
            round(manifest["history"][-1]["loss"], 4),
        ],
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Against the largest run, from each smaller one: how the driver's heap peak and the workers'
    peaks grew, beside how the data grew (a worker's share of it as Python rows)."""
    large = runs[-1]
    out: dict[str, Any] = {}
    for r in runs[:-1]:
        key = f"{r['pairs']:,}_to_{large['pairs']:,}_pairs"
        heap = (large["driver_heap_mib"]["peak"] - r["driver_heap_mib"]["peak"]) / r["driver_heap_mib"][
            "peak"
        ]
        out[key] = {
            "driver_heap_peak_growth": round(heap, 4),
            "worker_peak_growth_mib": round(
                max(large["worker_rss_peak_mib"]) - max(r["worker_rss_peak_mib"]), 1
            ),
            "worker_share_in_python_growth_mib": round(
                (large["rows_in_python_mib"] - r["rows_in_python_mib"]) / 2, 1
            ),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "embed_data.json"))
    args = p.parse_args()
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    runs = []
    with tempfile.TemporaryDirectory(prefix="speed-ray-embed-data-") as tmp:
        # Ray, torch and Ray Train import and start during the first run: a small warm-up run takes that
        # growth of the driver's heap, so the sizes compare the data alone.
        warmup = run_size(Path(tmp), 2_000, argparse.Namespace(steps=10, batch=args.batch))
        for n in args.sizes:
            runs.append(run_size(Path(tmp), n, args))
            print(json.dumps(runs[-1]), flush=True)
    summary = summarize(runs)
    result = {
        "benchmark": "embed_data",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "code": code.stdout.strip(),
        "settings": {"workers": 2, "batch_per_worker": args.batch, "steps": args.steps, "model": "tiny-bert"},
        "warmup": warmup,
        "runs": runs,
        "summary": summary,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

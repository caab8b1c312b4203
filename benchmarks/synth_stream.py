"""Synthesis at scale without a cluster: 1,000,000 example prompts streamed through the synth
generation step (``generate_step``: request shards on disk, Ray Data reading them on the workers, the
engine actor pool, parse tasks, shards written as they complete) with a fake engine on local Ray, while
the driver's resident memory is sampled.

The fake engine (``tests/fakes.py``) answers every prompt with canned JSON at once, so what is measured
is the pipeline itself: rows/s through Ray Data and the shard writer, and whether the driver's own memory
(its anonymous resident pages; Ray's shared object-store pages it touched are recorded apart) stays
flat as rows pass (streaming: the driver holds one shard of inputs while laying them out and the
unfinished shards' outputs, never the whole set). Afterwards every output id is checked against the
input ids: none lost, none duplicated.

    python benchmarks/synth_stream.py [--rows 1000000] [--shard-rows 10000] [--batch-size 1000]

Writes benchmarks/results/synth_stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # Ray's workers inherit the driver's sys.path: tests.fakes imports there too


def prompt_rows(n: int, seed: int, chunk: int = 1000) -> Iterator[dict[str, Any]]:
    """``n`` example prompts over the task kinds (fixed tasks, seeded placeholders), made lazily."""
    from speed_ray.synth import speed

    kinds = ["retrieval", "classification", "sts", "text_matching_short", "text_matching_long"]
    for start in range(0, n, chunk):
        tasks = [
            {
                "id": f"t{i}",
                "topic": "Computers/Software",
                "task_type": "text_matching" if "matching" in kinds[i % 5] else kinds[i % 5],
                "kind": kinds[i % 5],
                "task": f"Retrieve documentation pages that answer question {i} about a Linux package.",
                "error": None,
            }
            for i in range(start, min(start + chunk, n))
        ]
        yield from speed.example_requests(tasks, seed, max_chars=400)


def rss_mib(kind: str = "RssAnon") -> float:
    """The driver's resident memory from /proc/self/status: ``RssAnon`` is its own heap (Python
    objects, Arrow buffers it allocated); ``RssShmem`` the pages of Ray's shared-memory object store
    it has touched (blocks read zero-copy), which the object store, not the driver, owns."""
    with open("/proc/self/status") as f:
        kb = int(next(line for line in f if line.startswith(kind + ":")).split()[1])
    return kb / 1024


class Sampler(threading.Thread):
    """The driver's RSS every ``period`` seconds, with how many output shards are written by then."""

    def __init__(self, out_dir: Path, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.out_dir, self.period, self.samples = out_dir, period, []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            shards = len(list(self.out_dir.glob("shard_*.parquet")))
            self.samples.append((time.time(), shards, rss_mib(), rss_mib("RssShmem")))


def run(rows: int, shard_rows: int, batch_size: int, out_dir: Path) -> dict[str, Any]:
    """Stream ``rows`` prompts through ``generate_step`` into ``out_dir``; figures and the id check."""
    import pyarrow.parquet as pq

    from speed_ray.config import load_config
    from speed_ray.io.schemas import GENERATIONS, read_manifest
    from speed_ray.ray_utils import init_ray
    from speed_ray.synth import speed
    from speed_ray.synth.stage import generate_step, sampling_params
    from tests.fakes import FakeGenerator

    cfg = load_config(
        None,
        [
            f"run.output_dir={out_dir}",
            f"synth.shard_rows={shard_rows}",
            f"synth.engine.batch_size={batch_size}",
            "synth.engine.max_actors=1",
            f"eval.retrieval.path={'builtin:debian/retrieval'}",
        ],
    )
    init_ray(cfg)
    step_dir = out_dir / "generations"
    step_dir.mkdir(parents=True)
    rss_before = rss_mib()
    sampler = Sampler(step_dir)
    sampler.start()
    t0 = time.time()
    generate_step(
        cfg,
        cfg.synth.engine,
        step_dir,
        GENERATIONS,
        prompt_rows(rows, cfg.run.seed),
        sampling_params(64, 1.0, 1.0, 1),
        speed.parse_generations,
        generator=FakeGenerator(),
    )
    elapsed = time.time() - t0
    sampler.stop.set()
    sampler.join()
    manifest = read_manifest(step_dir)
    assert manifest is not None

    # Every input id exactly once among the outputs.
    wanted = {r["id"] for r in prompt_rows(rows, cfg.run.seed)}
    got = [
        i
        for f in manifest["files"]
        for i in pq.read_table(step_dir / f["name"], columns=["id"])["id"].to_pylist()
    ]
    shards = len(manifest["files"])
    by_fraction = {}
    for frac in (0.1, 0.5, 1.0):
        need = max(1, round(frac * shards))
        later = [rss for _, done, rss, _ in sampler.samples if done >= need]
        by_fraction[f"{int(frac * 100)}%"] = round(later[0], 1) if later else round(rss_mib(), 1)
    return {
        "rows": rows,
        "output_rows": manifest["num_rows"],
        "rows_lost": len(wanted - set(got)),
        "rows_duplicated": len(got) - len(set(got)),
        "unexpected_rows": len(set(got) - wanted),
        "seconds": round(elapsed, 1),
        "rows_per_s": round(rows / elapsed, 1),
        "driver_heap_mib": {  # RssAnon
            "before_step": round(rss_before, 1),
            "when_shards_written": by_fraction,
            "peak_sampled": round(max(rss for _, _, rss, _ in sampler.samples), 1),
        },
        "growth_10_to_100_mib": round(by_fraction["100%"] - by_fraction["10%"], 1),
        "object_store_pages_touched_mib_peak": round(max(shm for *_, shm in sampler.samples), 1),
        "peak_ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "shards": shards,
        "timeline": [
            {
                "s": round(t - t0, 1),
                "shards_written": done,
                "heap_mib": round(rss, 1),
                "shmem_mib": round(shm, 1),
            }
            for t, done, rss, shm in sampler.samples[:: max(1, len(sampler.samples) // 60)]
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--shard-rows", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/synth_stream.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        figures = run(args.rows, args.shard_rows, args.batch_size, Path(tmp) / "run")
    result = {
        "benchmark": "synth_stream",
        "what": "example prompts streamed through the synth generation step (request shards, Ray Data, "
        "engine actor pool, parse, shard writer) with a fake engine on local Ray; driver RSS sampled",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        **figures,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    keys = ("rows", "rows_lost", "rows_duplicated", "rows_per_s", "driver_heap_mib", "growth_10_to_100_mib")
    print(json.dumps({k: result[k] for k in keys}))


if __name__ == "__main__":
    main()

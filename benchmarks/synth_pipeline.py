"""The whole synth stage at scale without a cluster: tasks -> generations -> judgments -> pairs ->
drafts -> revisions -> dedup -> examples -> train, on 100,000 and on 1,000,000 example prompts, with a
fake engine on local Ray (``tests/fakes.SchemaGenerator``: answers every request from its schema at
once, so what is measured is the pipeline itself, not a model).

For every step: rows/s, the driver's own heap (``RssAnon``) when 10%, 50% and 100% of the step's
shards are written, the peak resident memory of every process (the driver, Ray's daemons, each
worker), and rows lost or written twice, checked against the step's inputs after the run.

    python benchmarks/synth_pipeline.py [--prompts 100000 1000000] [--shard-rows 10000]

Writes benchmarks/results/synth_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # Ray's workers inherit the driver's sys.path: tests.fakes imports there too

STEPS = ("tasks", "generations", "judgments", "pairs", "drafts", "revisions", "examples", "train")
TOPICS = 1000
SAMPLES = 2


def status_mib(pid: int | str, kind: str) -> float:
    """``kind`` (VmRSS, RssAnon, ...) of process ``pid`` from /proc, in MiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith(kind + ":")).split()[1]) / 1024
    except (OSError, StopIteration, ValueError):
        return 0.0


def process_name(pid: str) -> str:
    """A short name: the driver, a Ray daemon, or a Ray worker by what it runs (``ray::...``)."""
    if int(pid) == os.getpid():
        return "driver"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""
    for daemon in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py"):
        if daemon in cmd:
            return daemon
    # A worker's title names what it runs now (``ray::MapWorker(...).submit``): keep the what.
    return cmd.split(" ")[0].split(".")[0] if cmd.startswith("ray::") else ""


class Sampler(threading.Thread):
    """Every ``period`` s: the driver's heap, the shards written in the run's step folders, and the
    resident memory of every Ray process (by pid)."""

    def __init__(self, synth: Path, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.synth, self.period = synth, period
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            shards = {s: len(list((self.synth / s).glob("*.parquet"))) for s in STEPS}
            procs = {}
            for p in Path("/proc").glob("[0-9]*"):
                name = process_name(p.name)
                if name:
                    procs[p.name] = (name, status_mib(p.name, "VmRSS"))
            heap = status_mib(os.getpid(), "RssAnon")
            self.samples.append({"t": time.time(), "heap": heap, "shards": shards, "procs": procs})


def step_figures(manifest: dict[str, Any], samples: list[dict[str, Any]], step: str) -> dict[str, Any]:
    """Rows/s and the driver's heap at 10/50/100% of the step's shards, with peak RSS per process."""
    end = datetime.strptime(manifest["finished_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    t1 = end.timestamp() + 1.0  # finished_at has whole seconds
    t0 = t1 - manifest["duration_s"] - 1.0
    inside = [s for s in samples if t0 <= s["t"] <= t1]
    total = len(manifest["files"])
    heap = {}
    for frac in (0.1, 0.5, 1.0):
        need = max(1, round(frac * total))
        later = [s["heap"] for s in inside if s["shards"][step] >= need]
        heap[f"{int(frac * 100)}%"] = round(later[0] if later else inside[-1]["heap"], 1) if inside else None
    peak: dict[str, float] = defaultdict(float)
    for s in inside:
        for _pid, (name, rss) in s["procs"].items():
            peak[name] = max(peak[name], rss)
    grow = (heap["100%"] - heap["10%"]) / heap["10%"] if heap["10%"] else None
    return {
        "rows": manifest["num_rows"],
        "shards": total,
        "seconds": manifest["duration_s"],
        "rows_per_s": round(manifest["num_rows"] / max(manifest["duration_s"], 1e-9), 1),
        "driver_heap_mib": heap,
        "driver_heap_growth_10_to_100": round(grow, 4) if grow is not None else None,
        "peak_rss_mib_by_process": {k: round(v, 1) for k, v in sorted(peak.items())},
        "samples": len(inside),
    }


def ids(step_dir: Path, columns: list[str]) -> list[tuple]:
    import pyarrow.parquet as pq

    from speed_ray.io.schemas import read_manifest

    manifest = read_manifest(step_dir)
    assert manifest is not None, step_dir
    out: list[tuple] = []
    for f in manifest["files"]:
        t = pq.read_table(step_dir / f["name"], columns=columns)
        out += zip(*(t[c].to_pylist() for c in columns), strict=True)
    return out


def lost_and_duplicated(synth: Path) -> dict[str, dict[str, int]]:
    """Per step: rows expected from its input, rows lost and rows written twice (by key)."""
    prompts = {i for (i,) in set(ids(synth / "generations", ["id"]))}
    expect = {
        "generations": (
            {(i, k) for i in prompts for k in range(SAMPLES)},
            ids(synth / "generations", ["id", "sample"]),
        ),
        "judgments": (prompts, ids(synth / "judgments", ["example_id"])),
        "drafts": (prompts, ids(synth / "drafts", ["id"])),
        "pairs": (prompts, ids(synth / "pairs", ["id"])),
    }
    drafts = {i for (i,) in expect["drafts"][1]}
    expect["revisions"] = (drafts, ids(synth / "revisions", ["prompt_id"]))
    examples = ids(synth / "examples", ["id"])
    manifest = json.loads((synth / "examples/_manifest.json").read_text())
    removed = manifest.get("dedup", {}).get("removed", 0)
    expect["examples"] = (drafts, examples)
    out = {}
    for step, (wanted, got) in expect.items():
        keys = [g if len(g) > 1 else g[0] for g in got]
        out[step] = {
            "rows_expected": len(wanted),
            "rows_written": len(keys),
            "rows_lost": len(set(wanted) - set(keys)) - (removed if step == "examples" else 0),
            "rows_duplicated": len(keys) - len(set(keys)),
            "unexpected_rows": len(set(keys) - set(wanted)),
        }
    train = json.loads((synth / "train/_manifest.json").read_text())["num_rows"]
    out["train"] = {"rows_expected": len(examples), "rows_written": train, "rows_lost": len(examples) - train}
    out["examples"]["removed_by_dedup"] = removed
    return out


def run(prompts: int, shard_rows: int, batch_size: int, out_dir: Path) -> dict[str, Any]:
    from speed_ray.config import load_config
    from speed_ray.io.schemas import read_manifest
    from speed_ray.ray_utils import init_ray
    from speed_ray.synth import driver
    from tests.fakes import SchemaGenerator

    cfg = load_config(
        None,
        [
            f"run.output_dir={out_dir}",
            "run.name=bench",
            f"synth.num_topics={TOPICS}",
            f"synth.examples_per_task={prompts // TOPICS}",
            f"synth.sampling.samples_per_prompt={SAMPLES}",
            f"synth.shard_rows={shard_rows}",
            *(
                f"synth.{role}.{key}"  # any kind: the fake engine answers every call
                for role in ("engine", "judge", "reviser")
                for key in ("kind=vllm", f"batch_size={batch_size}", "max_actors=1")
            ),
        ],
    )
    init_ray(cfg)
    synth = cfg.run_dir / "synth"
    synth.mkdir(parents=True)
    sampler = Sampler(synth)
    sampler.start()
    t0 = time.time()
    driver.run(cfg, generator=SchemaGenerator(duplicate_every=50))
    elapsed = time.time() - t0
    sampler.stop.set()
    sampler.join()
    steps = {}
    for step in STEPS:
        manifest = read_manifest(synth / step)
        assert manifest is not None, step
        steps[step] = step_figures(manifest, sampler.samples, step)
    checks = lost_and_duplicated(synth)
    for step, c in checks.items():
        steps[step]["check"] = c
    return {"prompts": prompts, "seconds": round(elapsed, 1), "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--shard-rows", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/synth_pipeline.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = []
    for n in args.prompts:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            runs.append(run(n, args.shard_rows, args.batch_size, Path(tmp)))
        print(json.dumps({"prompts": n, "seconds": runs[-1]["seconds"]}), flush=True)
        import ray

        ray.shutdown()
    scaling = {}
    if len(runs) > 1:
        small, large = runs[0], runs[-1]
        for step in STEPS:
            a, b = small["steps"][step]["rows_per_s"], large["steps"][step]["rows_per_s"]
            scaling[step] = round(b / a, 3) if a else None
    result = {
        "benchmark": "synth_pipeline",
        "what": "the whole synth stage on a fake engine on local Ray: per step rows/s, the driver's heap at "
        "10/50/100% of the step's shards, peak RSS per process, rows lost or duplicated",
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {"topics": TOPICS, "samples_per_prompt": SAMPLES, "duplicate_every": 50},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "runs": runs,
        "rows_per_s_ratio_largest_to_smallest": scaling,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"rows_per_s_ratio_largest_to_smallest": scaling}))


if __name__ == "__main__":
    main()

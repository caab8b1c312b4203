"""Helpers shared by the stage modules: step skipping, timing and progress lines."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from speed_ray.schemas import MANIFEST, read_manifest, sha256_file

logger = logging.getLogger(__name__)


def log(msg: str, level: int = logging.INFO) -> None:
    """A status line of ``step`` (the modules log to their own ``logging.getLogger(__name__)``)."""
    logger.log(level, msg, stacklevel=2)


def step(out_dir: Path, name: str, build: Callable[[], dict]) -> dict:
    """Run ``build`` unless ``out_dir`` already holds a finished manifest whose files still have their
    checksums; return the manifest. A damaged step is done again (a generation step keeps its sound
    shards and makes only the damaged ones again)."""
    done = read_manifest(out_dir)
    if done is not None:
        bad = damaged_files(out_dir, done)
        if not bad:
            log(f"{name}: already finished, skipped (delete {out_dir} to redo it)")
            return done
        log(f"{name}: {', '.join(bad)} no longer match the manifest's checksums; doing the step again")
        (out_dir / MANIFEST).unlink()
    log(f"{name}: started")
    t0 = time.time()
    manifest = build()
    log(f"{name}: finished in {time.time() - t0:.1f}s")
    return manifest


def damaged_files(out_dir: Path, manifest: dict) -> list[str]:
    """The files a manifest lists with a checksum that are missing or no longer match it."""
    return [
        f["name"]
        for f in manifest.get("files", [])
        if "sha256" in f
        and (not (out_dir / f["name"]).is_file() or sha256_file(out_dir / f["name"]) != f["sha256"])
    ]

"""Helpers shared by the stage modules: step skipping, timing and progress lines."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from speed_ray.io.fingerprint import diff
from speed_ray.io.schemas import MANIFEST, read_manifest, sha256_file, write_json_atomic

logger = logging.getLogger(__name__)


def log(msg: str, level: int = logging.INFO) -> None:
    """A status line of ``step`` (the modules log to their own ``logging.getLogger(__name__)``)."""
    logger.log(level, msg, stacklevel=2)


def step(
    out_dir: Path,
    name: str,
    build: Callable[[], dict],
    fingerprint: dict[str, Any] | None = None,
    state: Iterable[Path] = (),
    clean: bool = True,
) -> dict:
    """Run ``build`` unless ``out_dir`` already holds a finished manifest whose files still have their
    checksums and, given a ``fingerprint`` (``speed_ray.io.fingerprint``), whose recorded fingerprint is
    this one; return the manifest. A damaged step is done again (a generation step keeps its sound
    shards and makes only the damaged ones again).

    A stale step (other config values or inputs than its output came from) is logged with what
    changed, its folder and ``state`` (checkpoints, caches) removed, and done again; with
    ``clean=False`` the builder is left to reuse what is still valid (eval's per-model records). An
    unfinished step (killed midway) resumes when its fingerprint is unchanged and starts over when it
    is not: the fingerprint is recorded beside the folder before ``build`` runs, and moves into the
    manifest once it is written."""
    done = read_manifest(out_dir)
    if fingerprint is not None:
        done = _current(out_dir, name, done, fingerprint, state, clean)
    if done is not None:
        bad = damaged_files(out_dir, done)
        if not bad:
            log(f"{name}: already finished, skipped (delete {out_dir} to redo it)")
            return done
        log(f"{name}: {', '.join(bad)} no longer match the manifest's checksums; doing the step again")
        (out_dir / MANIFEST).unlink()
    if fingerprint is not None:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(pending(out_dir), fingerprint)
    log(f"{name}: started")
    t0 = time.time()
    manifest = build()
    if fingerprint is not None:
        manifest = (read_manifest(out_dir) or manifest) | {"fingerprint": fingerprint}
        write_json_atomic(out_dir / MANIFEST, manifest)
        pending(out_dir).unlink(missing_ok=True)
    log(f"{name}: finished in {time.time() - t0:.1f}s")
    return manifest


def _current(
    out_dir: Path,
    name: str,
    done: dict | None,
    fingerprint: dict[str, Any],
    state: Iterable[Path],
    clean: bool,
) -> dict | None:
    """The finished manifest if it came from ``fingerprint``, else None (a stale step's output and
    ``state`` removed, or with ``clean=False`` only its manifest)."""
    old = (done or {}).get("fingerprint") or _read_json(pending(out_dir))
    if old is not None and old.get("sha256") != fingerprint["sha256"]:
        changes = "; ".join(diff(old, fingerprint)) or "its fingerprint changed"
        if done is not None:
            then = "redoing it and the steps after it" if clean else "redoing what changed"
            log(f"{name}: stale: {changes}; {then}")
        else:
            then = "starting over" if clean else "redoing what changed"
            log(f"{name}: an unfinished earlier run had other settings: {changes}; {then}")
        for path in (out_dir, *state) if clean else ():
            remove(path)
        (out_dir / MANIFEST).unlink(missing_ok=True)
        return None
    if done is not None and old is None:
        log(f"{name}: finished before speed-ray recorded fingerprints; kept as it is")
    elif done is not None and "fingerprint" not in done:  # killed before the manifest took it
        done |= {"fingerprint": fingerprint}
        write_json_atomic(out_dir / MANIFEST, done)
        pending(out_dir).unlink(missing_ok=True)
    return done


def pending(out_dir: Path) -> Path:
    """Where a started step's fingerprint waits for its manifest (beside the folder, which a whole
    step replaces at the end)."""
    return out_dir.parent / f".{out_dir.name}.fingerprint.json"


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def damaged_files(out_dir: Path, manifest: dict) -> list[str]:
    """The files a manifest lists with a checksum that are missing or no longer match it."""
    return [
        f["name"]
        for f in manifest.get("files", [])
        if "sha256" in f
        and (not (out_dir / f["name"]).is_file() or sha256_file(out_dir / f["name"]) != f["sha256"])
    ]

"""Step fingerprints: what a finished step's output depends on, so that a rerun after a config change
redoes that step (and, through their inputs, the steps after it) instead of reusing stale output.

A fingerprint is ``{"sha256", "config", "inputs"}``: ``config`` holds the dotted config keys the step
declares (``select`` over ``flatten``ed config, less the run config's ``RUNTIME_KEYS``: see
``SpeedRayConfig.fingerprint``), ``inputs`` the hashes of what
it reads (earlier steps' outputs by ``output_hash``, data files by ``path_hash``). Values are kept, not
only their hash, so ``diff`` can say what changed (``embed.learning_rate 2e-05 -> 0.0001``). Pure
functions, no Ray, no model.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from speed_ray.io.storage import RemoteFile

VERSION = 1


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (or a dataclass) -> ``{dotted.key: value}``. Lists and scalars are values; an
    empty mapping gives no key, a None section is one key with value None."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _under(key: str, pattern: str) -> bool:
    """``key`` is ``pattern`` or lies under it (``*`` matches any run of characters)."""
    return fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(key, pattern + ".*")


def select(flat: dict[str, Any], include: Iterable[str], exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The keys of ``flat`` under some ``include`` prefix and under no ``exclude`` prefix."""
    include, exclude = list(include), list(exclude)
    return {
        k: v
        for k, v in flat.items()
        if any(_under(k, p) for p in include) and not any(_under(k, p) for p in exclude)
    }


def _canonical(data: Any) -> Any:
    """What ``data`` reads as after a JSON round trip (what a manifest gives back)."""
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def fingerprint(config: dict[str, Any], inputs: dict[str, str | None] | None = None) -> dict[str, Any]:
    """``{"sha256", "config", "inputs"}`` for config values and input hashes."""
    body = _canonical({"config": config, "inputs": inputs or {}})
    digest = hashlib.sha256(json.dumps({"version": VERSION, **body}, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, **body}


def _show(value: Any, short: bool = False) -> str:
    if value is _ABSENT:
        return "(absent)"
    if short and isinstance(value, str):
        return value[:12]
    text = value if isinstance(value, str) and value else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


_ABSENT = object()


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed from fingerprint ``old`` to ``new``: ``key old -> new`` per config key, then
    ``input name old -> new`` (hashes cut to 12 characters), each in key order."""
    changes = []
    for section, label, short in (("config", "", False), ("inputs", "input ", True)):
        before, after = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(before) | set(after)):
            a, b = before.get(key, _ABSENT), after.get(key, _ABSENT)
            if a != b:
                changes.append(f"{label}{key} {_show(a, short)} -> {_show(b, short)}")
    return changes


def output_hash(manifest: dict[str, Any] | None) -> str | None:
    """What identifies a finished step's output, for the steps that read it: its files' checksums
    where the manifest lists them (a step redone to the same bytes changes nothing downstream), else
    the whole manifest (a trained model: retrained, it is new). None: the step has not finished."""
    if manifest is None:
        return None
    if "files" in manifest:
        content: Any = [[f["name"], f.get("sha256")] for f in manifest["files"]]
    else:
        content = {k: v for k, v in manifest.items() if k != "fingerprint"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def path_hash(path: str | os.PathLike | None) -> str | None:
    """The content of a data file, or of every file under a folder (by relative path); ``path`` may
    be a built-in data name, or a file's URI on object storage (its bytes hashed as they stream in:
    the same hash as a local copy's). None: no path, or nothing there."""
    if path is None:
        return None
    from speed_ray.io.data import locate_input
    from speed_ray.io.schemas import sha256_file
    from speed_ray.io.storage import RemoteFile

    p = locate_input(str(path))
    if isinstance(p, RemoteFile):
        return _stream_hash(p) if p.is_file() else None
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _stream_hash(file: RemoteFile) -> str:
    """The SHA-256 of a file on object storage, read a MiB at a time (as stored: not decompressed)."""
    h = hashlib.sha256()
    with file.open_stream(decompress=False) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_stamp(path: Path) -> str | None:
    """A model folder's identity without reading its weights: the output hash of the manifest
    speed-ray wrote in it, else its files' names, sizes and modification times."""
    from speed_ray.io.schemas import read_manifest

    if not path.is_dir():
        return None
    manifest = read_manifest(path)
    if manifest is not None:
        return output_hash(manifest)
    h = hashlib.sha256()
    for f in sorted(q for q in path.rglob("*") if q.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def run_model_inputs(specs: Iterable[str], run_dir: Path) -> dict[str, str | None]:
    """``{spec: output hash}`` for the specs that name a model a run made (``run:align/senior``)."""
    out = {}
    for spec in specs:
        if spec.startswith("run:"):
            out[spec] = folder_stamp(Path(os.path.normpath(run_dir / spec.removeprefix("run:"))))
    return out

"""The machinery of typed settings, shared by every config section: dataclasses built from YAML and
``key.sub=value`` overrides, with each error naming its dotted key, and the checks sections share.

It knows no section: ``speed_ray.config`` composes them, and each domain package's ``config.py``
declares its own (a dataclass and its ``validate``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from speed_ray.io.data import Source


class ConfigError(ValueError):
    """A user error in the configuration: names the key and what was expected."""


@dataclass
class TrainResources:
    """The Ray Train workers of a training step."""

    workers: int = 1
    """Ray Train workers (data parallel)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


# ----------------------------------------------------------------------------------------------
# Building


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping at the top level, got {type(data).__name__}"
        )
    # YAML aliases (``reviser: *teacher``) share one object: copy them, so that an override of
    # ``synth.judge.model`` does not also change the reviser.
    return json.loads(json.dumps(data, default=str))


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type, data: Any, prefix: str, base: Any = None) -> Any:
    """``cls`` from a mapping; keys it leaves out keep their value in ``base`` (default: ``cls()``'s),
    so ``embed: {resources: {cpus_per_worker: 2}}`` keeps embed's own default of 2 workers."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{key}: unknown key (expected one of: {', '.join(sorted(names))})")
    base = base if base is not None else cls()
    kwargs = {
        name: _coerce(hints[name], value, f"{prefix}{name}", getattr(base, name))
        for name, value in data.items()
    }
    return dataclasses.replace(base, **kwargs)


def _coerce(tp: Any, value: Any, key: str, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(typing.cast(type, tp), value, key + ".", default)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key, default)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item_tp.__name__}, got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return _scalar(tp, value, key)


def _scalar(tp: type, value: Any, key: str) -> Any:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool) or tp is str and isinstance(value, str):
        return value
    if tp is int and is_number and float(value).is_integer():
        return int(value)
    if tp is float and is_number:
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")


def absolute(value: str, base: Path) -> str:
    """A local path made absolute against ``base``; a built-in data name or a URL is left as it is."""
    if value.startswith("builtin:") or "://" in value:
        return value
    home = value == "~" or value.startswith("~/")  # not ~user: a name that need not exist
    return os.path.normpath(base / (Path(value).expanduser() if home else Path(value)))


def looks_like_path(spec: str) -> bool:
    """Specs that start like a path must be folders; ``org/name`` is a hub name."""
    return spec.startswith((".", "/", "~"))


# ----------------------------------------------------------------------------------------------
# Checks the sections share


def check_positive(values: dict[str, float]) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive number, got {value}")


def check_non_negative(values: dict[str, float]) -> None:
    for key, value in values.items():
        if value < 0:
            raise ConfigError(f"{key}: expected 0 (off) or a positive number, got {value}")


def check_choices(choices: dict[str, tuple[Any, tuple[Any, ...]]]) -> None:
    """``{key: (value, allowed)}``: each value is one of its allowed ones."""
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, allowed))}, got {value!r}")


def locate(key: str, spec: str) -> Path:
    """A data spec's path; an unknown built-in name is a ConfigError naming ``key``."""
    from speed_ray.io.data import locate as locate_data

    try:
        return locate_data(spec)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def locate_input(key: str, spec: str) -> Source:
    """``locate``, or for a URI (``s3://bucket/pairs.parquet``) the file on object storage; a URI
    with credentials in it, or one pyarrow cannot read, is a ConfigError naming ``key``."""
    from speed_ray.io import data, storage

    if not storage.is_uri(spec):
        return locate(key, spec)
    try:
        storage.check_uri(spec, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return data.locate_input(spec)


def check_model(key: str, spec: str) -> None:
    from speed_ray.io.models import spec_problem

    problem = spec_problem(spec)
    if problem:
        raise ConfigError(f"{key}: {problem}")


# Data files already read and found sound in this process, by reader and file stamp: a config loaded
# again (the saved one, an experiment's variants) does not read them again.
_SOUND_DATA: set[tuple[Any, ...]] = set()


def check_rows(key: str, path: str | None, reader: str, *args: Any) -> None:
    """Every row of the data file at ``path``, read now with the stage's own ``reader`` (a function of
    ``speed_ray.io.data``, by name, looked up at each call), so a bad row
    fails at once, naming the file, the line and the field, not after hours of earlier stages (the
    stage reads the file again: a second read, but no rows held in memory meanwhile)."""
    from speed_ray.io import data

    if path is None:
        return
    located = locate_input(key, path)
    try:
        seen = (reader, args, *_stamp(located))
        if seen in _SOUND_DATA:
            return
        collections.deque(getattr(data, reader)(located, *args), maxlen=0)  # a list, or rows streamed
    except (data.DataError, OSError) as e:  # OSError: a store that refuses or cannot be reached
        raise ConfigError(f"{key}: {e}") from None
    _SOUND_DATA.add(seen)


def _stamp(path: Source) -> tuple[Any, ...]:
    """A file's (or a folder's files') path, size and modification time."""
    from speed_ray.io.storage import RemoteFile

    if isinstance(path, RemoteFile):
        info = path.info()
        return ((path.uri, info.size, info.mtime_ns),)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def local_gpu_count() -> int:
    """GPUs visible to this process, without importing torch (nvidia-smi's device files)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(list(Path("/dev").glob("nvidia[0-9]*")))

"""kill -9 of the synth driver midway, then the same command again: the same rows as an uninterrupted
run, each exactly once, with the shards finished before the kill kept byte for byte.

Each request carries its own seed, so the real vLLM engine samples the same text for a row whatever
batch it lands in: the row contents are compared too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speed_ray.io.schemas import EXAMPLES, GENERATIONS, MANIFEST, TASKS, read_manifest, read_stage
from tests.conftest import rows_figures

# Three synth runs with vLLM start-ups (about 5.5 minutes on 2 CPUs): `make test-slow` runs it, so the
# default suite stays under 20 minutes.
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

STEPS = {"tasks": TASKS, "generations": GENERATIONS, "drafts": GENERATIONS, "examples": EXAMPLES}


def synth_cmd(out: Path, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "speed_ray.cli",
        "synth",
        "-",
        f"run.output_dir={out}",
        f"run.name={name}",
        "run.num_cpus=2",
        "synth.num_topics=12",
        "synth.shard_rows=2",  # many small shards: the kill lands between shard writes
        "synth.engine.model=tiny-llama",
        "synth.engine.dtype=float32",
        "synth.engine.kv_cache_gib=0.25",
        "synth.engine.max_model_len=1024",
        "synth.engine.batch_size=2",
        "synth.sampling.temperature=1.0",
        "synth.sampling.samples_per_prompt=2",
        "synth.sampling.max_tokens=200",
        "synth.sampling.max_field_chars=60",
    ]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def kill_when_shards_appear(cmd: list[str], folder: Path) -> dict[str, bytes]:
    """Start ``cmd``; once ``folder`` has a shard and no manifest, SIGKILL the driver."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 900  # a loaded 2-core CI box starts Ray and vLLM slowly
    try:
        while time.time() < deadline:
            if any(folder.glob("shard_*.parquet")) and not (folder / MANIFEST).exists():
                os.kill(proc.pid, signal.SIGKILL)  # the driver only, as a crashed head would
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
        else:
            pytest.fail("no shard appeared in time")
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        return {p.name: p.read_bytes() for p in folder.glob("shard_*.parquet")}
    finally:
        # Ray's raylet and workers die with their driver, but vLLM's engine processes outlive the actor
        # that started them: sweep everything left in the driver's session.
        kill_session(proc.pid)


def kill_session(sid: int) -> None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: the session id
                os.kill(int(stat.parent.name), signal.SIGKILL)


@pytest.mark.faults
def test_killed_synth_resumes_to_the_uninterrupted_result(tmp_path, model_cache, fault_record):
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    cmd = lambda name: [c if c != "-" else str(config) for c in synth_cmd(tmp_path, name)]  # noqa: E731

    run(cmd("whole"))
    killed = kill_when_shards_appear(cmd("resumed"), tmp_path / "resumed" / "synth" / "generations")
    assert killed and read_manifest(tmp_path / "resumed/synth/generations") is None
    run(cmd("resumed"))

    gens = tmp_path / "resumed/synth/generations"
    assert len(killed) < len(read_manifest(tmp_path / "whole/synth/generations")["files"])  # killed midway
    for name, data in killed.items():  # shards written before the kill: untouched
        assert (gens / name).read_bytes() == data
    for step, schema in STEPS.items():
        whole = read_stage(tmp_path / "whole/synth" / step, schema)
        resumed = read_stage(tmp_path / "resumed/synth" / step, schema)
        keys = ["id", "sample"] if "sample" in schema.names else ["id"]
        ids = list(zip(*(resumed[k].to_pylist() for k in keys), strict=True))
        assert len(ids) == len(set(ids)), f"{step}: a row was written twice"
        assert sorted(ids) == sorted(zip(*(whole[k].to_pylist() for k in keys), strict=True)), step
        # seeded sampling: the contents match as well
        assert resumed.sort_by([(k, "ascending") for k in keys]).equals(
            whole.sort_by([(k, "ascending") for k in keys])
        ), step
    assert read_stage(gens, GENERATIONS).num_rows > 0
    whole, resumed = (
        read_stage(tmp_path / r / "synth/generations", GENERATIONS) for r in ("whole", "resumed")
    )
    pairs = [list(zip(t["id"].to_pylist(), t["sample"].to_pylist(), strict=True)) for t in (whole, resumed)]
    fault_record(
        "synth driver SIGKILL mid-step, real vLLM (SmolLM2), every step compared",
        shards_kept=len(killed),
        **rows_figures(*pairs),
    )

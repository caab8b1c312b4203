"""Every synth step after generation runs shard by shard on the workers, and keeps exactly-once resume
after a kill: one run is SIGKILLed once inside each of those steps (its driver and its whole Ray
session, as a crashed head node would be), and the same command is run again each time. The steps end
with exactly the rows of an uninterrupted run, none lost and none written twice, and every shard
finished before a kill is kept byte for byte.

The engine is the fake OpenAI-compatible teacher (answers depend on the request alone), so the rows
of the two runs can be compared whole.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speed_ray.io.schemas import (
    EXAMPLES,
    GENERATIONS,
    JUDGMENTS,
    MANIFEST,
    PREFERENCE_PAIRS,
    TRIPLETS,
    read_stage,
)
from tests.conftest import rows_figures
from tests.fakes import FakeTeacher
from tests.ray.test_resume import kill_session
from tests.ray.test_teacher_synth import empty_config, overrides

# Eight synth runs, each starting Ray (about 3 minutes on 2 CPUs): `make test-faults` runs it.
pytestmark = [pytest.mark.faults, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]

# Where to kill, in the order the steps run: the folder whose first shard triggers the kill.
KILL_IN = ("judgments", "pairs", "drafts", "revisions", "examples/_candidates", "examples", "train")
STEPS = {
    "judgments": JUDGMENTS,
    "pairs": PREFERENCE_PAIRS,
    "drafts": GENERATIONS,
    "revisions": GENERATIONS,
    "examples": EXAMPLES,
    "train": TRIPLETS,
}


def command(tmp_path: Path, name: str, url: str) -> list[str]:
    args = [a for a in overrides(tmp_path, url) if not a.startswith(("run.name=", "synth.shard_rows="))]
    return [
        sys.executable,
        "-m",
        "speed_ray.cli",
        "synth",
        empty_config(tmp_path),
        *args,
        f"run.name={name}",
        "run.num_cpus=2",
        "synth.shard_rows=1",  # one prompt a shard: many shards, so a kill lands between them
    ]


def kill_in(cmd: list[str], folder: Path) -> dict[str, bytes] | None:
    """Run ``cmd`` until ``folder`` has a shard and no manifest, then SIGKILL its session; the shards
    there at that moment. None when the step finished between two looks (it is then not counted)."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 600
    try:
        while not any(folder.glob("*.parquet")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
            assert time.time() < deadline, f"no shard in {folder} within 600 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        kill_session(proc.pid)
    if (folder / MANIFEST).exists():
        return None
    return {p.name: p.read_bytes() for p in folder.glob("*.parquet")}


def keys(table, schema) -> list[tuple]:
    cols = ["id", "sample"] if "sample" in schema.names else ["id"]
    if schema is TRIPLETS:
        cols = ["anchor", "positive", "negative"]
    return list(zip(*(table[c].to_pylist() for c in cols), strict=True))


def test_each_streamed_step_resumes_after_a_kill_to_the_uninterrupted_rows(tmp_path, fault_record):
    with FakeTeacher(fail_every=7, tie_every=5) as teacher:
        subprocess.run(
            command(tmp_path, "whole", teacher.url), cwd=REPO, check=True, capture_output=True, timeout=600
        )
        kills = {}
        for folder in KILL_IN:
            kept = kill_in(command(tmp_path, "resumed", teacher.url), tmp_path / "resumed/synth" / folder)
            if kept is not None:
                kills[folder] = kept
        subprocess.run(
            command(tmp_path, "resumed", teacher.url), cwd=REPO, check=True, capture_output=True, timeout=600
        )

    run = tmp_path / "resumed/synth"
    assert len(kills) >= 5, f"killed midway in only {sorted(kills)}"
    for folder, kept in kills.items():
        if folder not in ("examples/_candidates", "train"):  # removed once examples is finished; made whole
            for name, data in kept.items():
                assert (run / folder / name).read_bytes() == data, f"{folder}/{name} changed after the kill"
    figures = {}
    for step, schema in STEPS.items():
        whole, resumed = (read_stage(tmp_path / r / "synth" / step, schema) for r in ("whole", "resumed"))
        figures[step] = rows_figures(keys(whole, schema), keys(resumed, schema))
        assert figures[step]["rows_lost"] == figures[step]["rows_duplicated"] == 0, step
        assert figures[step]["rows_written"] == figures[step]["rows_expected"] > 0, step
        order = [(c, "ascending") for c in schema.names if c in ("id", "sample", "anchor")]
        assert resumed.sort_by(order).equals(whole.sort_by(order)), step
    assert not (run / "examples/_candidates").exists()
    fault_record(
        "synth driver and Ray session SIGKILLed once inside each step after generation, then rerun",
        killed_in=sorted(kills),
        shards_kept={k: len(v) for k, v in kills.items()},
        **{f"{s}_rows_lost": f["rows_lost"] for s, f in figures.items()},
        **{f"{s}_rows_duplicated": f["rows_duplicated"] for s, f in figures.items()},
    )

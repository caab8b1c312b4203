"""Grounded synthesis keeps exactly-once resume: the synth driver and its whole Ray session are
SIGKILLed while the queries step is writing its shards, and the same command run again ends with
exactly the rows of an uninterrupted run, none lost and none written twice; the shards finished
before the kill are kept byte for byte and their chunks are not sent to the generator again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from speed_ray.io.schemas import DOCUMENTS, EXAMPLES, QUERIES, TRIPLETS, read_stage
from tests.conftest import rows_figures
from tests.fakes import FakeTeacher
from tests.faults.test_synth_resume import kill_in
from tests.ray.test_grounded_synth import empty_config, grounded_overrides

# Three synth runs, each starting Ray (about 1.5 minutes on 2 CPUs): `make test-faults` runs it.
pytestmark = [pytest.mark.faults, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
STEPS = {"documents": DOCUMENTS, "queries": QUERIES, "examples": EXAMPLES, "train": TRIPLETS}


def command(tmp_path: Path, name: str, url: str) -> list[str]:
    args = [a for a in grounded_overrides(tmp_path, url, name) if not a.startswith("synth.shard_rows=")]
    # one chunk a shard, and a generator batch of one: a kill lands between shards
    extra = ["run.num_cpus=2", "synth.shard_rows=1", "synth.engine.batch_size=1"]
    return [sys.executable, "-m", "speed_ray.cli", "synth", empty_config(tmp_path), *args, *extra]


def test_grounded_queries_resume_after_a_kill_to_the_uninterrupted_rows(tmp_path, fault_record):
    with FakeTeacher() as teacher:
        run = lambda name: subprocess.run(  # noqa: E731
            command(tmp_path, name, teacher.url), cwd=REPO, check=True, capture_output=True, timeout=600
        )
        run("whole")
        calls_whole = teacher.requests
        kept = kill_in(command(tmp_path, "resumed", teacher.url), tmp_path / "resumed/synth/queries")
        calls_before_rerun = teacher.requests
        run("resumed")
        calls_rerun = teacher.requests - calls_before_rerun

    assert kept, "the queries step finished before the kill: nothing was tested"
    for name, data in kept.items():
        assert (tmp_path / "resumed/synth/queries" / name).read_bytes() == data, f"{name} changed"
    assert calls_rerun <= calls_whole - len(kept)  # finished shards' chunks are not asked again
    figures = {}
    for step, schema in STEPS.items():
        whole, resumed = (read_stage(tmp_path / r / "synth" / step, schema) for r in ("whole", "resumed"))
        cols = ["anchor", "positive"] if schema is TRIPLETS else ["id"]
        keys = [list(zip(*(t[c].to_pylist() for c in cols), strict=True)) for t in (whole, resumed)]
        figures[step] = rows_figures(*keys)
        assert figures[step]["rows_lost"] == figures[step]["rows_duplicated"] == 0, step
        assert figures[step]["rows_written"] == figures[step]["rows_expected"] > 0, step
        order = [(c, "ascending") for c in cols]
        assert resumed.sort_by(order).equals(whole.sort_by(order)), step
    fault_record(
        "grounded synth driver and Ray session SIGKILLed inside the queries step, then rerun",
        shards_kept=len(kept),
        calls_whole=calls_whole,
        calls_rerun=calls_rerun,
        **{f"{s}_rows_lost": f["rows_lost"] for s, f in figures.items()},
        **{f"{s}_rows_duplicated": f["rows_duplicated"] for s, f in figures.items()},
    )

"""Killed generation actors and a killed driver: the step (or its rerun) ends with exactly the rows
of an uninterrupted run, none lost and none written twice, and the shards written before a crash
are kept byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from speed_ray.io.schemas import GENERATIONS, MANIFEST, read_stage
from tests.conftest import rows_figures
from tests.fakes import DiesOnce, FakeGenerator
from tests.faults.driver import generate
from tests.ray.test_resume import kill_session

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[2]
ROWS = 60


def rows_of(folder: Path):
    table = read_stage(folder, GENERATIONS)
    return table.sort_by([("id", "ascending"), ("sample", "ascending")])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("whole")
    generate(out, ROWS, FakeGenerator())
    return rows_of(out / "generations")


def keys(table) -> list[tuple[str, int]]:
    return list(zip(table["id"].to_pylist(), table["sample"].to_pylist(), strict=True))


def test_a_generation_actor_killed_mid_batch_is_replaced_and_no_row_is_lost(
    tmp_path, ray_session, uninterrupted, fault_record
):
    marker = tmp_path / "died"
    generate(tmp_path, ROWS, DiesOnce(str(marker), die_at=3))
    assert marker.is_file()  # the actor process did exit mid-batch
    got = rows_of(tmp_path / "generations")
    figures = rows_figures(keys(uninterrupted), keys(got))
    fault_record("generation actor exits mid-batch (Ray Data replaces it)", reruns=0, **figures)
    assert figures["rows_written"] == 2 * ROWS and figures["rows_duplicated"] == 0
    assert got.equals(uninterrupted)


@pytest.mark.slow  # about a minute; make test-faults runs it
def test_a_killed_driver_reruns_to_the_uninterrupted_rows(tmp_path, uninterrupted, fault_record):
    cmd = [sys.executable, "-m", "tests.faults.driver", str(tmp_path), str(ROWS), "0.05"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL, start_new_session=True)
    gens = tmp_path / "generations"
    deadline = time.time() + 300
    try:
        while not len(list(gens.glob("shard_*.parquet"))) >= 2:
            assert proc.poll() is None, "the step ended before it could be killed"
            assert time.time() < deadline, "no shard within 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as a crashed head would
        proc.wait(timeout=60)
    finally:
        kill_session(proc.pid)  # what is left of its local Ray
    kept = {p.name: p.read_bytes() for p in gens.glob("shard_*.parquet")}
    assert not (gens / MANIFEST).exists() and 2 <= len(kept) < ROWS // 10

    subprocess.run([*cmd[:-1], "0"], cwd=REPO, check=True, stderr=subprocess.DEVNULL, timeout=600)
    for name, data in kept.items():
        assert (gens / name).read_bytes() == data, name  # finished shards untouched
    got = rows_of(gens)
    figures = rows_figures(keys(uninterrupted), keys(got))
    fault_record(
        "driver SIGKILL mid-step, then the same command again", reruns=1, shards_kept=len(kept), **figures
    )
    assert got.equals(uninterrupted)
    assert sum(pq.read_metadata(p).num_rows for p in gens.glob("shard_*.parquet")) == 2 * ROWS

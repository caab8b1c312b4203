"""A disk that fills up mid-write and an output folder that cannot be written: a clear error, nothing
half-written left behind, and a rerun that finishes with every row once. (Root ignores permission
bits, so an unwritable folder is made by putting it under a regular file; a full disk by the
file-size limit, which fails writes with EFBIG as ENOSPC would.)"""

from __future__ import annotations

import contextlib
import errno
import resource
import signal
from pathlib import Path

import pytest

from speed_ray.cli import main
from speed_ray.io.schemas import MANIFEST, read_stage, write_stage
from speed_ray.io.shards import ShardedWriter, lay_out
from tests.conftest import DEBIAN, rows_figures
from tests.unit.test_shards import IDS, INPUTS, SCHEMA, outputs, table

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def disk_full_after(nbytes: int):
    """Writes of this process fail past ``nbytes`` per file (EFBIG) until the block ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*.tmp"))


def test_a_full_disk_mid_step_leaves_no_partial_shard_and_the_rerun_finishes(tmp_path, fault_record):
    out = tmp_path / "step"
    w = ShardedWriter(out, SCHEMA, lay_out(out, INPUTS, 3), outputs_per_id=2)
    w.add(table(outputs(IDS[:3])))  # shard 0 written while there is room
    with disk_full_after(512), pytest.raises(OSError) as err:
        w.add(table(outputs(IDS[3:6])))
    assert err.value.errno == errno.EFBIG or "too large" in str(err.value).lower()
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000.parquet"]
    assert leftovers(out) == [] and not (out / MANIFEST).exists()

    layout = lay_out(out, INPUTS, 3)  # the rerun, with room again
    assert layout.done == {0}
    again = ShardedWriter(out, SCHEMA, layout, outputs_per_id=2)
    again.add(table(outputs(IDS[3:])))
    again.finish({}, started=0.0)
    got = read_stage(out, SCHEMA)
    expected = [(i, k) for i in IDS for k in range(2)]
    figures = rows_figures(expected, list(zip(got["id"].to_pylist(), got["sample"].to_pylist(), strict=True)))
    fault_record(
        "disk full while a shard is written (EFBIG)",
        error=type(err.value).__name__,
        temp_files_left=0,
        reruns=1,
        **figures,
    )
    assert got["id"].to_pylist() == [i for i in IDS for _ in range(2)]


def test_a_full_disk_in_a_whole_stage_write_keeps_the_old_stage_and_no_temp_folder(tmp_path, fault_record):
    out = tmp_path / "drafts"
    rows = table(outputs(IDS)).drop_columns(["shard"])
    write_stage(out, [rows.slice(0, 4)], SCHEMA, {}, 0.0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with disk_full_after(512), pytest.raises(OSError):
        write_stage(out, [rows, rows], SCHEMA, {}, 0.0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the finished stage is untouched
    assert not (tmp_path / "drafts.tmp").exists() and leftovers(tmp_path) == []
    fault_record("disk full while a whole stage is written", finished_stage_kept=True, temp_files_left=0)


def test_an_unwritable_output_folder_stops_the_run_at_once_with_its_path(tmp_path, capsys, fault_record):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be\n")
    code = main(
        [
            "synth",
            "configs/quickstart.yaml",
            f"run.output_dir={blocker}",
            f"eval.retrieval.path={DEBIAN / 'retrieval'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("speed-ray: error: ") and str(blocker) in err and "Not a directory" in err
    assert blocker.read_text() == "a file where the output folder should be\n"
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-folder"]
    fault_record(
        "output folder cannot be written", exit_code=code, message=err.strip().replace(str(tmp_path), "<tmp>")
    )


def test_the_disk_limit_helper_really_limits(tmp_path):
    with disk_full_after(100), pytest.raises(OSError):
        (tmp_path / "big").write_bytes(b"x" * 1000)
    (tmp_path / "big").write_bytes(b"x" * 1000)  # and lifts again
    assert (tmp_path / "big").stat().st_size == 1000

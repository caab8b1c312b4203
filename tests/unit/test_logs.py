"""Status lines: -v / -q set the speed_ray logger's level, each line is printed once, in the
``[speed-ray HH:MM:SS]`` form on stderr, and Ray's known repeaters are said once in its workers."""

from __future__ import annotations

import logging
import os
import re

import pytest

from speed_ray.cli import main
from speed_ray.io import logs
from tests.conftest import DEBIAN

WROTE = re.compile(r"^\[speed-ray \d\d:\d\d:\d\d\] report: .*/report\.md \(and report\.html\)$")


def report(tmp_path, *flags: str) -> list[str]:
    """The cheapest path through the CLI: the report stage of a run that has no other output."""
    return [
        "report",
        "configs/quickstart.yaml",
        *flags,
        f"run.output_dir={tmp_path}",
        f"eval.retrieval.path={DEBIAN / 'retrieval'}",
    ]


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        ((), logging.INFO),
        (("-v",), logging.DEBUG),
        (("--verbose",), logging.DEBUG),
        (("-q",), logging.WARNING),
        (("--quiet",), logging.WARNING),
    ],
)
def test_verbosity_flags_set_the_speed_ray_level_before_or_after_the_subcommand(tmp_path, argv, level):
    assert main([*argv, *report(tmp_path)]) == 0  # before the subcommand
    assert logging.getLogger("speed_ray").level == level
    logging.getLogger("speed_ray").setLevel(logging.NOTSET)
    assert main(report(tmp_path, *argv)) == 0  # after it, between the overrides
    assert logging.getLogger("speed_ray").level == level
    assert (tmp_path / "quickstart" / "config.yaml").is_file()  # the override after the flag applied


def test_a_status_line_is_printed_once_on_stderr(tmp_path, capfd):
    for _ in range(2):  # a second run in the same process adds no second handler
        assert main(report(tmp_path)) == 0
        out, err = capfd.readouterr()
        assert out == f"report: {tmp_path / 'quickstart' / 'report.md'}\n"  # the program's output: stdout
        assert len(err.splitlines()) == 1 and WROTE.match(err.splitlines()[0]), err


def test_quiet_prints_no_status_line_and_no_bars(tmp_path, capfd):
    assert main(report(tmp_path, "-q")) == 0
    out, err = capfd.readouterr()
    assert err == "" and out == f"report: {tmp_path / 'quickstart' / 'report.md'}\n"
    assert not logs.bars() and logs.library_level() == "WARNING"
    logs.configure(logging.DEBUG)
    assert logs.bars() and logs.library_level() == "INFO"


def test_lines_do_not_reach_the_root_logger_twice(tmp_path, capfd):
    root = logging.StreamHandler()  # what a library's logging.basicConfig would add
    logging.getLogger().addHandler(root)
    try:
        assert main(report(tmp_path)) == 0
    finally:
        logging.getLogger().removeHandler(root)
    assert len(capfd.readouterr().err.splitlines()) == 1


def test_a_ray_worker_says_the_cleaners_warning_once_at_the_drivers_level(monkeypatch):
    import ray

    class Context:
        gcs_address = "127.0.0.1:6379"

    monkeypatch.setenv(logs.LEVEL_ENV, "WARNING")
    monkeypatch.setenv("RAY_ADDRESS", "")
    monkeypatch.delenv("RAY_ADDRESS")  # gone now, and again after the test
    monkeypatch.setattr(ray, "get_runtime_context", Context)
    cleaner = logging.getLogger(logs.SAY_ONCE[0])
    seen: list[str] = []
    catch = logging.Handler()
    catch.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    cleaner.addHandler(catch)
    try:
        logs.setup_ray_worker()
        for _ in range(3):
            cleaner.warning("Failed to query Ray Train Controller actor state.")
        cleaner.warning("Detected that the Ray Train controller actor is dead.")
    finally:
        cleaner.removeHandler(catch)
        cleaner.filters.clear()
        logging.getLogger("sentence_transformers").setLevel(logging.NOTSET)
    assert seen == [
        "Failed to query Ray Train Controller actor state.",
        "Detected that the Ray Train controller actor is dead.",
    ]
    assert logging.getLogger("speed_ray").level == logging.WARNING
    assert os.environ["RAY_ADDRESS"] == "127.0.0.1:6379"  # State API calls go to the worker's own cluster

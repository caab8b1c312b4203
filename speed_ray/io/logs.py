"""Status lines and progress bars.

Every module logs to its own ``logging.getLogger(__name__)``: one hierarchy under ``speed_ray``. A
process sets that hierarchy up once: the CLI and the jobs/ entry points with ``configure``, at the
level of ``-v`` (DEBUG) or ``-q`` (WARNING and up; INFO without either); each Ray worker process of a
run with ``setup_ray_worker`` (``init_ray`` makes it Ray's ``worker_process_setup_hook``), at the level
the driver had. A line reads ``[speed-ray 12:34:56] message`` and goes to stderr; stdout is left to the
program's output (``doctor``'s report, the final ``report: <path>``).

Progress bars (tqdm) go to stderr too and are off at ``-q`` (``bars()``). A plain tqdm bar in a Ray
worker reaches the driver only when it closes (Ray forwards a worker's output line by line, and a bar
redraws itself with carriage returns), so loops in Ray Train workers use ``worker_bar``: Ray's tqdm_ray
sends the bar's state to the driver, which draws it as a tqdm bar of its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

ROOT = "speed_ray"
FORMAT = "[speed-ray %(asctime)s] %(message)s"
DATEFMT = "%H:%M:%S"
# The driver's level, handed to its Ray workers through their environment (ray_utils.init_ray).
LEVEL_ENV = "SPEED_RAY_LOG_LEVEL"
# Ray Train (v2) starts a PlacementGroupCleaner actor per run that asks Ray's State API once a second
# whether the run's controller still lives. The State API is served by the dashboard, which a local Ray
# started by speed-ray does not run (init_ray: include_dashboard=False), so every question fails and
# the actor logs the same warning once a second (53 lines in a 3-step embed run). That Ray dies with
# its driver, so there is no placement group for the cleaner to save; the warning is shown once.
SAY_ONCE = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


class _Handler(logging.Handler):
    """Writes each line to the current ``sys.stderr`` (so pytest's capture sees it) through
    ``tqdm.write``, which clears the bars drawn there first and redraws them after: a line never lands
    inside a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class Once(logging.Filter):
    """Lets each distinct message through once per process."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def configure(level: int | str = logging.INFO) -> None:
    """One handler on the ``speed_ray`` logger at ``level``; calling it again replaces it (never a
    second handler, so never a line twice). The lines do not propagate to the root logger, whose
    handlers (a library's ``basicConfig``, Ray Train's console handler in its workers) would print
    them again."""
    logger = logging.getLogger(ROOT)
    for h in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(h)
    handler = _Handler()
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def add_flags(parser: argparse.ArgumentParser, *, default: Any = logging.INFO) -> None:
    """``-v/--verbose`` and ``-q/--quiet`` (into ``log_level``). Subcommand parsers pass
    ``default=argparse.SUPPRESS``, so a flag given before the subcommand is not reset after it."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const=logging.DEBUG,
        default=default,
        help="more detail: debug lines, and Ray Train's own progress lines",
    )
    g.add_argument(
        "-q",
        "--quiet",
        dest="log_level",
        action="store_const",
        const=logging.WARNING,
        default=default,
        help="warnings and errors only, no progress bars",
    )


def level() -> int:
    return logging.getLogger(ROOT).getEffectiveLevel()


def bars() -> bool:
    """Whether to draw progress bars (not at -q)."""
    return level() <= logging.INFO


def library_level() -> str:
    """The level of the libraries' own lines in a run's Ray workers (Ray Train's ``ray.train``: worker
    group started, a line per checkpoint report holding every reported metric; sentence-transformers':
    ``Saving model to /tmp/...``): their INFO lines only at -v, their warnings always."""
    return "INFO" if level() <= logging.DEBUG else "WARNING"


def setup_ray_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for a run's workers (``ray_utils.init_ray``): ``speed_ray``
    lines at the driver's level, and Ray's own lines kept from burying them."""
    import ray

    configure(os.environ.get(LEVEL_ENV, "INFO"))
    for name in SAY_ONCE:
        logging.getLogger(name).addFilter(Once())
    # A Ray Train worker logs each report with every reported metric (34 KB for embed's last one: the
    # probe embeddings) on a logger named by its file's path, outside ``ray.train``, where the level of
    # RunConfig's logging_config (library_level) does not reach.
    context = os.path.join(
        os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py"
    )
    logging.getLogger(context).setLevel(library_level())
    # Ray Train sends a worker's root logger to the console at INFO.
    logging.getLogger("sentence_transformers").setLevel(library_level())
    # The State API client (the cleaner above) finds its cluster by RAY_ADDRESS, else by the sessions
    # under /tmp/ray: with a second Ray on the machine it fails with "Found multiple active Ray
    # instances" and the cleaner's thread dies with a 30-line traceback.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def worker_bar(total: int, desc: str, done: int = 0) -> Any:
    """A progress bar with an ETA for a loop in a Ray worker, drawn by the driver (tqdm_ray); None at
    -q. Call ``update(n)`` and ``close()`` on it."""
    if not bars():
        return None
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc=desc, unit="step")
    bar.update(done)  # sent now, so the driver's clock (rate, ETA) starts with the loop
    return bar

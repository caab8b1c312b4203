"""Shared argument parsing for the job entry points: ``--config FILE [key.sub=value ...]`` runs as
``speed-ray COMMAND FILE [key.sub=value ...]`` does, through the CLI's own ``main`` (the same config
checks, and a user error is one line and exit status 2, before Ray starts)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from speed_ray.cli import main, parse_args
from speed_ray.io import logs


def run_job(command: str, description: str) -> NoReturn:
    """``command``: a ``speed-ray`` command (run, align, synth, embed, eval, report)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    logs.add_flags(p)  # -v / -q, as for the CLI, which gets them back
    args = parse_args(p)
    flags = {logging.DEBUG: ["-v"], logging.WARNING: ["-q"]}.get(args.log_level, [])
    sys.exit(main([command, args.config, *args.overrides, *flags]))

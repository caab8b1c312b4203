"""Shared argument parsing for the job entry points: ``--config FILE [key.sub=value ...]`` runs as
``speed-ray COMMAND FILE [key.sub=value ...]`` does, through the CLI's own ``main`` (the same config
checks, and a user error is one line and exit status 2, before Ray starts)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from speed_ray.cli import main


def run_job(command: str, description: str) -> NoReturn:
    """``command``: a ``speed-ray`` command (run, align, synth, embed, eval, report)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = p.parse_args()
    sys.exit(main([command, args.config, *args.overrides]))

"""Shared argument parsing for the job entry points (the same configs and code as the CLI)."""

from __future__ import annotations

import argparse

from speed_ray import logs
from speed_ray.cli import parse_args
from speed_ray.config import SpeedRayConfig, load_config


def parse_config(description: str) -> SpeedRayConfig:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    logs.add_flags(p)  # -v / -q, as for the CLI
    args = parse_args(p)
    logs.configure(args.log_level)
    return load_config(args.config, args.overrides)

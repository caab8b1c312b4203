"""Shared argument parsing for the job entry points (the same configs and code as the CLI)."""

from __future__ import annotations

import argparse

from speed_ray.config import SpeedRayConfig, load_config


def parse_config(description: str, stage: str | None = None) -> SpeedRayConfig:
    """The config named by ``--config`` with its overrides; a job for one ``stage`` runs that stage
    alone, as ``speed-ray STAGE CONFIG`` does."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = p.parse_args()
    only = [f"run.stages=[{stage}]"] if stage else []
    return load_config(args.config, [*args.overrides, *only])

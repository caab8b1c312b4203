"""The run's stages in order. Each stage module has ``run(cfg) -> dict`` (its summary) and writes
under ``cfg.run_dir/<stage>/``; a finished step has a ``_manifest.json`` and is skipped on rerun."""

from __future__ import annotations

from speed_ray.config import STAGES

__all__ = ["STAGES", "stage_module"]


def stage_module(name: str):
    """The module that runs stage ``name`` (``eval`` lives in ``evaluate``)."""
    import importlib

    return importlib.import_module(
        f"speed_ray.{'eval' if name == 'report' else name}.{'report' if name == 'report' else 'driver'}"
    )

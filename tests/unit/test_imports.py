"""`import speed_ray` (and its Ray-facing modules) must not load the heavy engines."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

CODE = """
import sys
import speed_ray, speed_ray.cli, speed_ray.config, speed_ray.synth.stage, speed_ray.engines
import speed_ray.synth.driver, speed_ray.align.driver, speed_ray.embed.driver, speed_ray.eval.driver
print(sorted(m for m in ("vllm", "trl", "deepspeed") if m in sys.modules))
"""


def test_import_loads_no_engine():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"

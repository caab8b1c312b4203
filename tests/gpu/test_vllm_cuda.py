"""The CUDA build of vLLM on a tiny model: the same engine code as on CPU (run with -m gpu)."""

from __future__ import annotations

import pytest

from speed_ray.engines import Request, Sampling
from speed_ray.io.settings import local_gpu_count

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(local_gpu_count() == 0, reason="needs an NVIDIA GPU")]


def test_generate_on_gpu(tiny_llama):
    from speed_ray.engines.vllm_engine import VllmGenerator

    engine = VllmGenerator(tiny_llama, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3)
    outs = engine.generate(
        [Request([{"role": "user", "content": "hi"}], seed=1)], Sampling(max_tokens=8, n=2)
    )
    assert len(outs[0]) == 2 and all(c.num_output_tokens > 0 for c in outs[0])

"""The eval stage on a GPU worker: ``eval.resources.gpus=1`` scores the model in a Ray task that holds
the GPU, with the same scores as on CPU (run with -m gpu)."""

from __future__ import annotations

import os

import pytest

from speed_ray.config import load_config
from speed_ray.io.settings import local_gpu_count

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(local_gpu_count() == 0, reason="needs an NVIDIA GPU")]


def test_models_encode_on_the_gpu_worker_the_config_asks_for(tmp_path, tiny_bert, beir_tiny, ray_session):
    from speed_ray.eval import driver as evaluate

    def scored(name: str, gpus: int) -> dict:
        args = [f"run.output_dir={tmp_path}", f"run.name={name}", f"embed.model={tiny_bert}"]
        args += ["eval.models=[base]", f"eval.retrieval.path={beir_tiny}", "eval.cache=false"]
        return evaluate.run(load_config(None, [*args, f"eval.resources.gpus={gpus}"]))

    assert ray_session.cluster_resources().get("GPU", 0) >= 1  # a local instance finds the node's GPUs
    gpu, cpu = scored("gpu", 1), scored("cpu", 0)
    assert gpu["scored_on"]["base"]["device"] == "cuda" and cpu["scored_on"]["base"]["device"] == "cpu"
    assert gpu["scored_on"]["base"]["pid"] != os.getpid()
    on_gpu, on_cpu = (m["scores"]["base"]["DebianPackageRetrieval"]["ndcg_at_10"] for m in (gpu, cpu))
    assert on_gpu == pytest.approx(on_cpu, abs=1e-3)

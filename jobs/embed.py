"""Contrastive embedding training under Ray Train (writes <run>/embed/model, a SentenceTransformer folder).

Local:
    python jobs/embed.py --config configs/quickstart.yaml
On a Ray cluster:
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/embed.py --config configs/quickstart.yaml run.ray_address=auto
"""

from __future__ import annotations

from _common import run_job

if __name__ == "__main__":
    run_job("embed", __doc__.splitlines()[0])

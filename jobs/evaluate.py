"""nDCG@10 of the base and trained embedders through mteb (writes <run>/eval/).

Local:
    python jobs/evaluate.py --config configs/quickstart.yaml
On a Ray cluster:
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/evaluate.py --config configs/quickstart.yaml run.ray_address=auto
"""

from __future__ import annotations

from _common import run_job

if __name__ == "__main__":
    run_job("eval", __doc__.splitlines()[0])

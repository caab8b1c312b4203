"""Topics -> tasks -> examples with vLLM in a Ray Data actor pool (writes <run>/synth/).

Local:
    python jobs/synth.py --config configs/quickstart.yaml
On a Ray cluster:
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/synth.py --config configs/quickstart.yaml run.ray_address=auto
"""

from __future__ import annotations

from _common import run_job

if __name__ == "__main__":
    run_job("synth", __doc__.splitlines()[0])

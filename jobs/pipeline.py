"""The config's stages (run.stages) in order: align -> synth -> embed -> eval -> report.

Local (2 CPUs, no GPU):
    python jobs/pipeline.py --config configs/quickstart.yaml
On a Ray cluster:
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/pipeline.py --config configs/quickstart.yaml run.ray_address=auto
"""

from __future__ import annotations

from _common import run_job

if __name__ == "__main__":
    run_job("run", __doc__.splitlines()[0])

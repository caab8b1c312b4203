"""SPEED's alignment loop: junior (SFT), senior (DPO), revisor (SFT), TRL under Ray Train (<run>/align/).

Local:
    python jobs/align.py --config configs/speed-cpu.yaml
On a Ray cluster:
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/align.py --config configs/speed_llama3_8b.yaml
"""

from __future__ import annotations

from _common import run_job

if __name__ == "__main__":
    run_job("align", __doc__.splitlines()[0])

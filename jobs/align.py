"""SPEED's alignment loop: junior (SFT), senior (DPO), revisor (SFT), TRL under Ray Train (<run>/align/).

Local:
    python jobs/align.py --config configs/speed-cpu.yaml
On a Ray cluster:
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/align.py --config configs/speed_llama3_8b.yaml
"""

from __future__ import annotations

from _common import parse_config

from speed_ray.cli import run_stages
from speed_ray.config import SpeedRayConfig


def main(cfg: SpeedRayConfig) -> None:
    run_stages(cfg)


if __name__ == "__main__":
    main(parse_config(__doc__.splitlines()[0], "align"))

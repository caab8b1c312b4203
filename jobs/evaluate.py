"""nDCG@10 of the base and trained embedders through mteb (writes <run>/eval/).

Local:
    python jobs/evaluate.py --config configs/quickstart.yaml
On a Ray cluster:
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/evaluate.py --config configs/quickstart.yaml run.ray_address=auto
"""

from __future__ import annotations

from _common import parse_config

from speed_ray.cli import run_stages
from speed_ray.config import SpeedRayConfig


def main(cfg: SpeedRayConfig) -> None:
    run_stages(cfg)


if __name__ == "__main__":
    main(parse_config(__doc__.splitlines()[0], "eval"))

"""A synth generation step as its own driver process, so a test can kill it:

    python -m tests.faults.driver OUT_DIR ROWS SECONDS_PER_REQUEST   # the fake engine
    python -m tests.faults.driver OUT_DIR ROWS vllm [OVERRIDE ...]    # real vLLM on tiny-llama

Writes ``OUT_DIR/generations`` (shards of 10 rows, batches of 5, one actor)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import DEBIAN


def example_rows(n: int) -> list[dict]:
    from speed_ray.synth import speed

    tasks = [
        {"id": f"t{i}", "topic": "A/B", "task_type": "retrieval", "kind": "retrieval"}
        | {"task": f"Find package {i}.", "error": None}
        for i in range(n)
    ]
    return list(speed.example_requests(tasks, seed=0, max_chars=100))


# The real vLLM engine on the built-in random model, sized for a 2-core CPU box.
TINY_VLLM = [
    "synth.engine.model=tiny-llama",
    "synth.engine.dtype=float32",
    "synth.engine.kv_cache_gib=0.25",
    "synth.engine.max_model_len=512",
]


def generate(
    out: Path, rows: int, generator, shard_rows: int = 10, overrides: list[str] | None = None
) -> dict:
    from speed_ray.config import load_config
    from speed_ray.io.schemas import GENERATIONS
    from speed_ray.synth import speed
    from speed_ray.synth.stage import generate_step, sampling_params

    cfg = load_config(
        None,
        [
            f"run.output_dir={out}",
            "run.num_cpus=2",
            f"synth.shard_rows={shard_rows}",
            "synth.engine.batch_size=5",
            f"eval.retrieval.path={DEBIAN / 'retrieval'}",
            *(overrides or []),
        ],
    )
    return generate_step(
        cfg,
        cfg.synth.engine,
        out / "generations",
        GENERATIONS,
        example_rows(rows),
        sampling_params(32, 1.0, 1.0, 2),
        speed.parse_generations,
        generator=generator,
    )


if __name__ == "__main__":
    from tests.fakes import FakeGenerator

    out, rows, engine = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if engine == "vllm":
        generate(out, rows, None, overrides=TINY_VLLM + sys.argv[4:])
    else:
        generate(out, rows, FakeGenerator(seconds_per_request=float(engine)))

"""Synthesis throughput: the same prompts through (a) a bare ``vllm.LLM`` in one process and (b) the
speed-ray Ray Data stage (autoscaling actor pool + parsing), same model, settings and batches.

Both sides get the same example prompts (seeded placeholders, JSON schemas as grammars), the same
``vllm.LLM`` arguments and ``SamplingParams`` (``speed_ray.engines.vllm_engine``), and the same batch
size. Throughput is output tokens per second in the steady state: from the moment the first batch's
output is back to the moment the last one is, over the tokens of every batch but the first, so engine
start-up (the same vLLM start on both sides, plus Ray's actor start on b) is left out; the end-to-end
times, start-up included, are recorded beside it. The raw side runs in a child process first, so the
two never share the machine.

    python benchmarks/synth_throughput.py [--model smollm2-135m-instruct] [--prompts 192]
        [--batch-size 32] [--max-tokens 128]

Writes benchmarks/results/synth_throughput.json. On a GPU machine pass ``--num-gpus 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def requests(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` example prompts over the task kinds (fixed tasks, seeded placeholders)."""
    from synth_stream import prompt_rows

    return list(prompt_rows(n, seed))


def engine_settings(args: argparse.Namespace) -> Any:
    """The engine section both sides run with (the pipeline gets it as overrides)."""
    from speed_ray.engines.config import EngineConfig
    from speed_ray.io.models import resolve_model

    return EngineConfig(model=resolve_model(args.model), dtype=args.dtype, kv_cache_gib=args.kv_cache_gib)


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": args.max_tokens, "temperature": 1.0, "top_p": 1.0, "n": 1}


def steady(arrivals: list[tuple[float, int]]) -> dict[str, float]:
    """Tokens/s between the first and the last batch's arrival, over the batches after the first."""
    arrivals = sorted(arrivals)
    span = arrivals[-1][0] - arrivals[0][0]
    tokens = sum(t for _, t in arrivals[1:])
    return {"tokens": tokens, "seconds": round(span, 3), "tokens_per_s": round(tokens / span, 2)}


def run_raw(args: argparse.Namespace) -> dict[str, Any]:
    """(a) bare vLLM: one ``LLM``, ``chat`` on each batch in turn."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    rows = requests(args.prompts, seed=0)
    t0 = time.time()  # vLLM's import counts, as it does in the engine actor on the other side
    from vllm import LLM

    from speed_ray.engines import Request, Sampling
    from speed_ray.engines.vllm_engine import llm_kwargs, sampling_params, vllm_platform

    eng = engine_settings(args)
    llm = LLM(**llm_kwargs(eng, eng.model, seed=0, platform=vllm_platform()))  # as the engine actor does
    ready = time.time()
    arrivals = []
    for i in range(0, len(rows), args.batch_size):
        batch = [
            Request(json.loads(r["messages"]), r["seed"], json.loads(r["json_schema"]))
            for r in rows[i : i + args.batch_size]
        ]
        outs = llm.chat(
            [r.messages for r in batch], sampling_params(batch, Sampling(**sampling(args))), use_tqdm=False
        )  # type: ignore[arg-type]
        arrivals.append((time.time(), sum(len(c.token_ids) for o in outs for c in o.outputs)))
    total = sum(t for _, t in arrivals)
    return {
        "engine_start_s": round(ready - t0, 2),
        "end_to_end_s": round(time.time() - t0, 2),
        "output_tokens": total,
        "steady": steady(arrivals),
    }


def run_ray(args: argparse.Namespace) -> dict[str, Any]:
    """(b) the pipeline's own stage: ``engine_pool`` (Ray Data actor pool + parse tasks)."""
    from speed_ray.config import load_config
    from speed_ray.io.shards import lay_out
    from speed_ray.ray_utils import init_ray

    s = engine_settings(args)
    cfg = load_config(
        None,
        [
            f"synth.engine.model={s.model}",
            f"synth.engine.dtype={args.dtype}",
            f"synth.engine.kv_cache_gib={args.kv_cache_gib}",
            f"synth.engine.batch_size={args.batch_size}",
            f"synth.engine.num_gpus={args.num_gpus}",
            f"eval.retrieval.path={'builtin:debian/retrieval'}",
        ],
    )
    init_ray(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        files = lay_out(Path(tmp), requests(args.prompts, seed=0), args.prompts).request_files
        return pool_figures(cfg, files, args)


def pool_figures(cfg: Any, files: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from speed_ray.synth import speed
    from speed_ray.synth.stage import engine_pool

    t0 = time.time()
    arrivals = []
    parsed = errors = 0
    for table in engine_pool(cfg, cfg.synth.engine, files, sampling(args), speed.parse_generations):
        arrivals.append((time.time(), sum(table["num_output_tokens"].to_pylist())))
        parsed += table.num_rows
        errors += table.num_rows - table["error"].null_count
    total = sum(t for _, t in arrivals)
    return {
        "end_to_end_s": round(time.time() - t0, 2),
        "output_tokens": total,
        "rows": parsed,
        "parse_errors": errors,
        "batches": len(arrivals),
        "steady": steady(arrivals),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-cache-gib", type=float, default=0.5)
    p.add_argument("--prompts", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--num-gpus", type=float, default=0.0)
    p.add_argument("--side", choices=["raw", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--side-out", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/synth_throughput.json"))
    args = p.parse_args()
    if args.side:  # a child run: one side's result as JSON in --side-out (vLLM also prints to stdout)
        result = run_raw(args) if args.side == "raw" else run_ray(args)
        Path(args.side_out).write_text(json.dumps(result))
        return
    sides = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("raw", "ray"):
            out = Path(tmp) / f"{side}.json"
            subprocess.run(
                [sys.executable, __file__, "--side", side, "--side-out", str(out), *sys.argv[1:]], check=True
            )
            sides[side] = json.loads(out.read_text())
            print(f"{side}: {sides[side]['steady']['tokens_per_s']} tokens/s (steady)", file=sys.stderr)
    result = {
        "benchmark": "synth_throughput",
        "what": "output tokens/s, steady state, same prompts/model/settings/batches: bare vllm.LLM vs the "
        "speed-ray Ray Data stage (actor pool + parse)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("side", "side_out", "out")},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "raw_vllm": sides["raw"],
        "ray_pipeline": sides["ray"],
        "ratio_ray_over_raw": round(
            sides["ray"]["steady"]["tokens_per_s"] / sides["raw"]["steady"]["tokens_per_s"], 3
        ),
        "ratio_end_to_end": round(
            (sides["ray"]["output_tokens"] / sides["ray"]["end_to_end_s"])
            / (sides["raw"]["output_tokens"] / sides["raw"]["end_to_end_s"]),
            3,
        ),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ratio_ray_over_raw", "ratio_end_to_end")}))


if __name__ == "__main__":
    main()

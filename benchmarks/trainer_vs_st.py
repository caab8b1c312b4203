"""speed-ray's embedding trainer against sentence-transformers' own trainer: seconds per optimizer step.

Both sides train all-MiniLM-L6-v2 (mean pooling, the same ``speed_ray.embed.model.build_model`` stack)
on the same crop pairs from the Debian corpus, with the same texts in every step: the ST side gets, in
order, the global batches ``speed_ray.embed.batches.global_batch`` hands our trainer, through a
sequential batch sampler. Same per-step batch, max_seq_length, learning rate (linear decay, no
warm-up, no weight decay, no clipping: both still compute the gradient norm), AdamW (ST: transformers'
default, fused with torch >= 2.8; ours: what ``speed_ray.embed.prepare.wrap`` builds), in-batch
negatives only, scale 1/temperature = 20, one worker, CPU, the same torch thread count and
TOKENIZERS_PARALLELISM=false.

  (a) ours: ``speed_ray.embed.driver.run`` under Ray Train, one worker; a step's seconds are the
      ``seconds`` of ``metrics.jsonl`` (measured in the worker: batch selection, tokenisation,
      forward, backward, optimizer and scheduler).
  (b) ST: ``SentenceTransformerTrainer`` + ``losses.MultipleNegativesRankingLoss(scale=20)``, timed
      by a ``TrainerCallback``. Two clocks: ``on_step_begin`` -> ``on_step_end`` (what the Trainer
      calls a step: forward, backward, optimizer, scheduler), and ``on_step_end`` -> ``on_step_end``
      (also the fetch and tokenisation of the batch, which the Trainer does before
      ``on_step_begin``). The second is the like-for-like clock for (a) and gives ``ratio``; the
      first gives ``ratio_vs_st_compute_only``.

The first 2 steps of each run are warm-up and left out. Each side runs in its own child process, the
two alternate (a, b, then b, a, ...) ``--repeats`` times, so drift in the machine's load hits both.
ratio = our steps/s / ST steps/s, from mean seconds per step (>= 1.0: ours at least as fast).

    python benchmarks/trainer_vs_st.py [--batch 32] [--steps 12] [--seq-len 128] [--repeats 2]

Writes benchmarks/results/trainer_vs_st.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from speed_ray.io.data import locate  # noqa: E402

DATA = locate("builtin:debian/labelled")
RETRIEVAL = locate("builtin:debian/retrieval")
WARMUP = 2
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",  # as in speed-ray's Ray workers (ray_utils.WORKER_ENV)
}


def code_state() -> dict[str, Any]:
    """The commit measured, and any uncommitted change to speed_ray/ (hashed: the working tree moves)."""
    import hashlib

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout

    diff = git("diff", "HEAD", "--", "speed_ray")
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "speed_ray_uncommitted": [
            line[3:] for line in git("status", "--porcelain", "--", "speed_ray").splitlines()
        ],
        "speed_ray_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
    }


def overrides(args: argparse.Namespace, output_dir: str) -> list[str]:
    return [
        f"run.output_dir={output_dir}",
        "run.name=bench",
        f"run.num_cpus={args.cpus}",
        "embed.model=all-minilm-l6-v2",
        "embed.pooling=mean",
        "embed.data.source=corpus",
        f"embed.data.path={DATA}",
        "embed.data.pair_mode=crops",
        f"embed.batch_size={args.batch}",
        f"embed.steps={args.steps}",
        f"embed.temperature={args.temperature}",
        f"embed.learning_rate={args.lr}",
        f"embed.max_seq_length={args.seq_len}",
        "embed.hard_negatives=0",
        "embed.resources.workers=1",
        f"embed.resources.cpus_per_worker={args.cpus}",
        f"eval.retrieval.path={RETRIEVAL}",
    ]


def summary(seconds: list[float], batch: int) -> dict[str, Any]:
    """Steady-state figures over the steps after the warm-up."""
    s = seconds[WARMUP:]
    mean = statistics.fmean(s)
    return {
        "steps_timed": len(s),
        "median_s": round(statistics.median(s), 4),
        "mean_s": round(mean, 4),
        "steps_per_s": round(1 / mean, 4),
        "examples_per_s": round(batch / mean, 2),
    }


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """(a) speed-ray's trainer, one Ray Train worker."""
    from speed_ray.config import load_config
    from speed_ray.embed.driver import run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, overrides(args, tmp))
        code = code_state()
        t0 = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - t0
        history = [
            json.loads(line) for line in (cfg.run_dir / "embed/metrics.jsonl").read_text().splitlines()
        ]
    return {
        "seconds": [round(h["seconds"], 4) for h in history],
        "loss": [round(h["loss"], 4) for h in history],
        "wall_s_with_ray_start_and_export": round(wall, 2),
        "code": code,  # at the run's start: the working tree may move under a benchmark
    }


def st_dataset(args: argparse.Namespace):
    """The texts of our global batches 1..steps, in order, as anchor/positive columns."""
    from datasets import Dataset

    from speed_ray.config import load_config
    from speed_ray.embed.data import WorkerBatches
    from speed_ray.embed.driver import training_data

    cfg = load_config(None, overrides(args, tempfile.gettempdir()))
    data, _ = training_data(cfg, Path(tempfile.mkdtemp()) / "data")
    batches = WorkerBatches(data, args.batch, 1, 0, cfg.run.seed)  # one worker takes whole global batches
    rows = [r for s in range(1, args.steps + 1) for r in batches(s)[1]]
    return Dataset.from_dict(
        {"anchor": [r["query"] for r in rows], "positive": [r["positive"] for r in rows]}
    )


def run_st(args: argparse.Namespace) -> dict[str, Any]:
    """(b) SentenceTransformerTrainer + MultipleNegativesRankingLoss, the same model stack and batches."""
    import torch
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments, losses
    from torch.utils.data import BatchSampler, SequentialSampler
    from transformers import TrainerCallback

    from speed_ray.embed.model import build_model
    from speed_ray.io.models import resolve_model

    torch.set_num_threads(args.cpus)  # what our worker does with cpus_per_worker
    torch.manual_seed(0)
    dataset = st_dataset(args)
    model = build_model(resolve_model("all-minilm-l6-v2"), "mean", args.seq_len)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(time.perf_counter())

    def sequential(dataset, batch_size, drop_last, **_):  # our batches, in our order
        return BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last)

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        targs = SentenceTransformerTrainingArguments(
            output_dir=tmp,
            use_cpu=True,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=args.lr,
            warmup_steps=0,
            lr_scheduler_type="linear",
            weight_decay=0.0,
            max_grad_norm=0.0,  # ours: embed.max_grad_norm 0 = no clipping (both still compute the norm)
            dataloader_drop_last=True,
            dataloader_num_workers=0,
            batch_sampler=sequential,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
        )
        loss = losses.MultipleNegativesRankingLoss(model, scale=1 / args.temperature)
        trainer = SentenceTransformerTrainer(
            model=model, args=targs, train_dataset=dataset, loss=loss, callbacks=[clock]
        )
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    steps = [e - b for b, e in zip(clock.begin, clock.end, strict=True)]
    # end -> end: step k's compute plus the fetch + tokenisation of its batch; step 1 has no start mark
    intervals = [clock.end[0] - clock.begin[0]] + [
        b - a for a, b in zip(clock.end, clock.end[1:], strict=False)
    ]
    return {
        "seconds": [round(s, 4) for s in intervals],
        "seconds_compute_only": [round(s, 4) for s in steps],
        "wall_s_train_call": round(wall, 2),
        "optimizer": f"{targs.optim} ({type(trainer.optimizer).__name__}, "
        f"fused={trainer.optimizer.defaults.get('fused')})",
    }


def side(name: str, args: argparse.Namespace, tmp: str, log: Path) -> dict[str, Any]:
    """One side in a fresh child process; its output goes to ``log``."""
    out = Path(tmp) / f"{name}.json"
    env = os.environ | ENV
    with log.open("a") as f:
        p = subprocess.run(
            [sys.executable, __file__, "--side", name, "--side-out", str(out), *sys.argv[1:]],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if p.returncode:
        sys.exit(f"{name} side failed (exit {p.returncode}); its log:\n" + log.read_text()[-4000:])
    result = json.loads(out.read_text())
    result["steady"] = summary(result["seconds"], args.batch)
    if "seconds_compute_only" in result:
        result["steady_compute_only"] = summary(result["seconds_compute_only"], args.batch)
    return result


def ratios(ours: list[float], st: list[float], st_compute: list[float]) -> dict[str, float]:
    """our steps/s over ST's (mean and median seconds per step, steady steps only)."""
    o, s, c = ours[WARMUP:], st[WARMUP:], st_compute[WARMUP:]
    return {
        "ratio": round(statistics.fmean(s) / statistics.fmean(o), 3),
        "ratio_median": round(statistics.median(s) / statistics.median(o), 3),
        "ratio_vs_st_compute_only": round(statistics.fmean(c) / statistics.fmean(o), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="per-step batch (one worker)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="torch threads / worker CPUs")
    p.add_argument("--side", choices=["ours", "st"], help=argparse.SUPPRESS)
    p.add_argument("--side-out", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/trainer_vs_st.json"))
    args = p.parse_args()
    if args.steps <= WARMUP:
        p.error(f"--steps must exceed the {WARMUP} warm-up steps")
    if args.side:  # a child run: one side's per-step seconds as JSON in --side-out
        result = run_ours(args) if args.side == "ours" else run_st(args)
        Path(args.side_out).write_text(json.dumps(result))
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "children.log"
        for r in range(args.repeats):
            order = ("ours", "st") if r % 2 == 0 else ("st", "ours")
            got = {name: side(name, args, tmp, log) for name in order}
            run = {"repeat": r + 1, "order": list(order), "ours": got["ours"], "st": got["st"]}
            run |= ratios(got["ours"]["seconds"], got["st"]["seconds"], got["st"]["seconds_compute_only"])
            runs.append(run)
            print(
                f"repeat {r + 1}: ours {got['ours']['steady']['mean_s']} s/step, ST "
                f"{got['st']['steady']['mean_s']} s/step (compute only "
                f"{got['st']['steady_compute_only']['mean_s']}), ratio {run['ratio']}",
                file=sys.stderr,
            )
    pooled = {k: [s for r in runs for s in r[k]["seconds"][WARMUP:]] for k in ("ours", "st")}
    pooled_c = [s for r in runs for s in r["st"]["seconds_compute_only"][WARMUP:]]
    overall = ratios(
        [0.0] * WARMUP + pooled["ours"], [0.0] * WARMUP + pooled["st"], [0.0] * WARMUP + pooled_c
    )
    result = {
        "benchmark": "trainer_vs_st",
        "what": "seconds per optimizer step, steady state (first 2 steps of each run left out): speed-ray's "
        "embedding trainer (Ray Train, 1 worker) vs SentenceTransformerTrainer + "
        "MultipleNegativesRankingLoss; same model stack, texts per step, batch, seq len, lr, CPU",
        "ratio_definition": "our steps/s / ST steps/s (>= 1.0: ours at least as fast); 'ratio' times ST "
        "from on_step_end to on_step_end (batch fetch + tokenisation included, as in ours), "
        "'ratio_vs_st_compute_only' from on_step_begin to on_step_end (tokenisation excluded on ST's side)",
        "settings": {
            "model": "all-MiniLM-L6-v2, mean pooling, normalised",
            "data": "crop pairs of the Debian labelled set (the same texts per step on both sides)",
            "batch": args.batch,
            "steps": args.steps,
            "warmup_steps_dropped": WARMUP,
            "seq_len": args.seq_len,
            "temperature": args.temperature,
            "st_scale": round(1 / args.temperature, 4),
            "learning_rate": args.lr,
            "threads": args.cpus,
            "repeats": args.repeats,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": {
            pkg: version(pkg) for pkg in ("torch", "sentence-transformers", "transformers", "ray", "datasets")
        },
        "code": code_state(),
        "code_changed_during_runs": len(
            {json.dumps(c, sort_keys=True) for c in [r["ours"]["code"] for r in runs]}
            | {json.dumps(code_state(), sort_keys=True)}
        )
        > 1,
        "runs": runs,
        "overall": {
            "ours_mean_s": round(statistics.fmean(pooled["ours"]), 4),
            "ours_median_s": round(statistics.median(pooled["ours"]), 4),
            "ours_steps_per_s": round(1 / statistics.fmean(pooled["ours"]), 4),
            "st_mean_s": round(statistics.fmean(pooled["st"]), 4),
            "st_median_s": round(statistics.median(pooled["st"]), 4),
            "st_steps_per_s": round(1 / statistics.fmean(pooled["st"]), 4),
            "st_compute_only_mean_s": round(statistics.fmean(pooled_c), 4),
            "st_compute_only_steps_per_s": round(1 / statistics.fmean(pooled_c), 4),
        },
        "ratio_per_repeat": [r["ratio"] for r in runs],
        **overall,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("ratio_per_repeat", "ratio", "ratio_median", "ratio_vs_st_compute_only")}
        )
    )


if __name__ == "__main__":
    main()

"""DPO with the reference log-probabilities precomputed once (``precompute_ref_log_probs=True``) against
the reference forward run again in every training step (``False``), for 1, 2 and 3 epochs over the
same pairs.

Both variants go through the product's own ``speed_ray.align.train.build_trainer`` (TRL's DPOTrainer,
LoRA on SmolLM2-135M-Instruct, so the reference is the base model with the adapter switched off), same
data, batch, steps and seed, one process, CPU. TRL 1.16 runs the precompute pass inside the DPOTrainer
constructor, so each run times construction (model load, tokenization, LoRA wrap and, for the
precompute variant, the reference pass) and ``trainer.train()`` separately, and compares their sum.
Reference forwards are counted, not inferred: a global forward hook counts every call of the model's
backbone (``LlamaModel``) made with gradients off (the reference forwards: the precompute batches, or
the reference half of every plain step) and with gradients on (the policy forwards). Every run writes
its pairs to a fresh ``datasets`` folder, so TRL's tokenization and reference log-probability caches
(kept beside the data folder) are never reused between runs. The final-step losses of the two variants
must agree within 1e-3 relative (the reference is the same frozen model), or the script fails after
writing the JSON. Data: prompts asking to describe a Debian package, chosen = that package's
description, rejected = the next package's, both cut to 400 characters.

    python benchmarks/dpo_ref_logps.py [--pairs 8] [--batch-size 4] [--epochs 1 2 3] [--threads 1]

The defaults are 8 pairs and one torch thread: on the 2-core machine this was written on, shared with
other work (load average about 6), one DPO step took 20-70 s, so 32 pairs (96 steps over both variants
and 1+2+3 epochs) would take 40 minutes or more and 16 pairs about 20, against a budget of about 15; and
two OpenMP threads fighting other processes for two cores made the same forward take anywhere from 2.5 s
to 58 s. Every step is also timed on its own (``step_s``), since medians resist that noise better than
single-run totals.

Writes benchmarks/results/dpo_ref_logps.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = "smollm2-135m-instruct"
TEXT_CHARS = 400
LOSS_RTOL = 1e-3


def pairs(n: int) -> list[dict[str, Any]]:
    """``n`` preference pairs as the align stage stores them (TRL's conversational format)."""
    from speed_ray.io.data import locate, read_labelled

    rows = [r for r in read_labelled(locate("builtin:debian/labelled")) if r["text"].strip()]
    rows = rows[: n + 1]
    return [
        {
            "prompt": [
                {"role": "user", "content": f"Describe the Debian package {r['id']} in a few sentences."}
            ],
            "chosen": [{"role": "assistant", "content": r["text"][:TEXT_CHARS]}],
            "rejected": [{"role": "assistant", "content": nxt["text"][:TEXT_CHARS]}],
        }
        for r, nxt in zip(rows[:n], rows[1 : n + 1], strict=True)
    ]


def config(model: str, data_dir: str, steps: int, batch_size: int, precompute: bool):
    from speed_ray.align.config import AlignConfig, AlignTrainConfig
    from speed_ray.align.train import AlignTrainSettings
    from speed_ray.io.settings import TrainResources

    # LoRA r 16, alpha 32 on every projection but k_proj: align's defaults
    resources = TrainResources(cpus_per_worker=2)
    align = AlignConfig(
        max_length=256, precompute_ref_log_probs=precompute, lora_dropout=0.0, resources=resources
    )
    train = AlignTrainConfig(steps=steps, learning_rate=1e-5, batch_size=batch_size)
    return AlignTrainSettings(align, train, "dpo", model, data_dir, seed=0)


class Counter:
    """Counts backbone forwards (gradients off = reference, on = policy), the rows they saw, the
    ``compute_ref_log_probs`` batches (TRL's precompute path, with their time) and the time of the whole
    precompute pass (those batches plus the dataloader and the Arrow cache write and read)."""

    def __init__(self, backbone: str):
        self.backbone = backbone
        self.reset()

    def reset(self) -> None:
        self.ref_forwards = self.ref_rows = self.policy_forwards = self.policy_rows = 0
        self.precompute_batches = 0
        self.precompute_s = self.precompute_forward_s = 0.0

    def hook(self, module, args, output) -> None:
        import torch

        if type(module).__name__ != self.backbone:
            return
        rows = output.last_hidden_state.shape[0]
        if torch.is_grad_enabled():
            self.policy_forwards += 1
            self.policy_rows += rows
        else:
            self.ref_forwards += 1
            self.ref_rows += rows

    @contextlib.contextmanager
    def installed(self):
        import torch
        from trl import DPOTrainer

        handle = torch.nn.modules.module.register_module_forward_hook(self.hook)
        compute, precompute = DPOTrainer.compute_ref_log_probs, DPOTrainer._precompute_ref_logps
        counter = self

        def compute_ref_log_probs(trainer, model, inputs):
            counter.precompute_batches += 1
            t0 = time.perf_counter()
            try:
                return compute(trainer, model, inputs)
            finally:
                counter.precompute_forward_s += time.perf_counter() - t0

        def _precompute_ref_logps(trainer, dataset, name, batch_size):
            t0 = time.perf_counter()
            try:
                return precompute(trainer, dataset, name, batch_size)
            finally:
                counter.precompute_s += time.perf_counter() - t0

        DPOTrainer.compute_ref_log_probs = compute_ref_log_probs
        DPOTrainer._precompute_ref_logps = _precompute_ref_logps
        try:
            yield self
        finally:
            handle.remove()
            DPOTrainer.compute_ref_log_probs, DPOTrainer._precompute_ref_logps = compute, precompute


def step_timer():
    """A ``TrainerCallback`` that records the wall time of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter() - self._t)

    return StepTimer()


def run(
    model: str, data: list[dict[str, Any]], steps: int, batch_size: int, precompute: bool, counter: Counter
):
    """One construction + ``train()`` on a fresh data folder; times, counts and the per-step losses."""
    from speed_ray.align.models import write_dataset
    from speed_ray.align.train import build_trainer, load_data

    with tempfile.TemporaryDirectory(prefix="dpo-ref-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        write_dataset(data, data_dir)
        cfg = config(model, str(data_dir), steps, batch_size, precompute)
        counter.reset()
        t0 = time.perf_counter()
        trainer = build_trainer(cfg, load_data(str(data_dir)), str(Path(tmp) / "out"))
        t1 = time.perf_counter()
        construct_refs = counter.ref_forwards
        timer = step_timer()
        trainer.add_callback(timer)
        trainer.train()
        t2 = time.perf_counter()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert trainer.state.global_step == steps, (trainer.state.global_step, steps)
        del trainer
    return {
        "construct_s": round(t1 - t0, 3),
        "precompute_s": round(counter.precompute_s, 3),
        "precompute_forward_s": round(counter.precompute_forward_s, 3),
        "train_s": round(t2 - t1, 3),
        "total_s": round(t2 - t0, 3),
        "ref_forwards": counter.ref_forwards,
        "ref_forwards_in_constructor": construct_refs,
        "ref_forwards_in_train": counter.ref_forwards - construct_refs,
        "ref_rows": counter.ref_rows,
        "precompute_batches": counter.precompute_batches,
        "policy_forwards": counter.policy_forwards,
        "policy_rows": counter.policy_rows,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "step_s": [round(x, 3) for x in timer.steps],
        "median_step_s": round(statistics.median(timer.steps), 3),
        "losses": losses,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import datasets
    import peft
    import torch
    import transformers
    import trl
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    from speed_ray.io.models import resolve_model

    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    model = str(resolve_model(MODEL))
    backbone = MODEL_MAPPING_NAMES[AutoConfig.from_pretrained(model).model_type]
    data = pairs(args.pairs)
    steps_per_epoch = math.ceil(len(data) / args.batch_size)
    counter = Counter(backbone)
    runs = []
    t_all = time.perf_counter()
    load_before = os.getloadavg()
    with counter.installed():
        # Warm-up (not reported): first-call costs (imports, kernels, allocator) fall on neither variant.
        t0 = time.perf_counter()
        run(model, data[: args.batch_size], 1, args.batch_size, False, counter)
        warmup_s = round(time.perf_counter() - t0, 3)
        for epochs in args.epochs:
            for variant, precompute in (("plain", False), ("precomputed", True)):
                r = run(model, data, epochs * steps_per_epoch, args.batch_size, precompute, counter)
                r = {"variant": variant, "epochs": epochs, "steps": epochs * steps_per_epoch, **r}
                print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
                runs.append(r)

    by = {(r["variant"], r["epochs"]): r for r in runs}
    summary = []
    failures = []
    for epochs in args.epochs:
        p, c = by[("plain", epochs)], by[("precomputed", epochs)]
        rel = abs(p["final_loss"] - c["final_loss"]) / max(abs(p["final_loss"]), 1e-12)
        max_step_rel = max(
            abs(a - b) / max(abs(a), 1e-12) for a, b in zip(p["losses"], c["losses"], strict=True)
        )
        ok = rel <= LOSS_RTOL
        if not ok:
            failures.append(
                f"{epochs} epoch(s): final loss {p['final_loss']} vs {c['final_loss']} (rel {rel:.2e})"
            )
        summary.append(
            {
                "epochs": epochs,
                "plain_over_precomputed_total": round(p["total_s"] / c["total_s"], 3),
                "plain_over_precomputed_train": round(p["train_s"] / c["train_s"], 3),
                "plain_over_precomputed_train_plus_precompute": round(
                    p["train_s"] / (c["train_s"] + c["precompute_s"]), 3
                ),
                "plain_over_precomputed_median_step": round(p["median_step_s"] / c["median_step_s"], 3),
                "ref_forwards": {"plain": p["ref_forwards"], "precomputed": c["ref_forwards"]},
                "final_loss": {"plain": p["final_loss"], "precomputed": c["final_loss"]},
                "final_loss_rel_diff": rel,
                "max_step_loss_rel_diff": max_step_rel,
                "losses_agree": ok,
            }
        )
    steps = {v: [x for r in runs if r["variant"] == v for x in r["step_s"]] for v in ("plain", "precomputed")}
    med = {v: statistics.median(x) for v, x in steps.items()}
    pre = [r for r in runs if r["variant"] == "precomputed"]
    pre_batch = statistics.median(r["precompute_forward_s"] / r["precompute_batches"] for r in pre)
    pre_overhead = statistics.median(r["precompute_s"] - r["precompute_forward_s"] for r in pre)
    # The same totals rebuilt from the pooled medians: less exposed to the machine's noise than one run.
    construct = {v: statistics.median(r["construct_s"] for r in runs if r["variant"] == v) for v in med}
    for x in summary:
        n = x["epochs"] * steps_per_epoch
        x["plain_over_precomputed_total_from_medians"] = round(
            (construct["plain"] + n * med["plain"]) / (construct["precomputed"] + n * med["precomputed"]), 3
        )
    one = next((x for x in summary if x["epochs"] == 1), None)
    worst = max(x["max_step_loss_rel_diff"] for x in summary)
    noisy = [x["epochs"] for x in summary if x["plain_over_precomputed_median_step"] < 1]
    measured = (
        f"Measured (medians over all runs): plain step {med['plain']:.2f} s, precomputed step "
        f"{med['precomputed']:.2f} s, so the reference forward costs about "
        f"{med['plain'] - med['precomputed']:.2f} s a step "
        f"({(med['plain'] - med['precomputed']) / med['plain']:.0%} of a plain step; the long-run limit of the "
        f"ratio is {med['plain'] / med['precomputed']:.2f}); one precompute batch takes {pre_batch:.2f} s "
        f"and the pass adds {pre_overhead:.2f} s besides (dataloader, Arrow cache), and construction {construct['precomputed']:.1f} s with the precompute against "
        f"{construct['plain']:.1f} s without. Totals rebuilt from these medians give plain/precomputed "
        + ", ".join(
            f"{x['plain_over_precomputed_total_from_medians']} at {x['epochs']} epoch(s)" for x in summary
        )
        + ". "
        + (
            f"The single-run 1-epoch total ratio is {one['plain_over_precomputed_total']}: "
            + (
                "above 1 although both variants run the same reference forwards there, which only noise "
                "(a slower plain run or faster precomputed one on the shared machine) explains. "
                if one["plain_over_precomputed_total"] > 1
                else "precomputing does not pay off for a single epoch, as expected. "
            )
            if one
            else ""
        )
        + (
            f"At {noisy} epoch(s) the precomputed run's median step was slower than the plain run's although it "
            "does strictly less work per step: that is the shared machine's noise, which also inflates or "
            "deflates the single-run totals. "
            if noisy
            else ""
        )
        + f"Load average {load_before} before and {os.getloadavg()} after: the machine was shared, so the "
        "single-run totals carry noise and the step medians are the steadier measure."
    )
    result = {
        "benchmark": "dpo_ref_logps",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": args.threads,
        "versions": {
            "torch": torch.__version__,
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "datasets": datasets.__version__,
        },
        "model": f"{MODEL} ({backbone}), LoRA r16/alpha32 on q,v,o,gate,up,down; reference = adapter off",
        "data": f"{len(data)} pairs from the Debian labelled set: prompt 'Describe the Debian package "
        f"<id> in a few sentences.', chosen = its text, rejected = the next package's, {TEXT_CHARS} chars each",
        "settings": {
            "pairs": len(data),
            "batch_size": args.batch_size,
            "steps_per_epoch": steps_per_epoch,
            "epochs": args.epochs,
            "max_length": 256,
            "learning_rate": 1e-5,
            "beta": 0.1,
            "seed": 0,
            "device": "cpu, one process",
            "loss_rtol": LOSS_RTOL,
            "defaults_note": "pairs lowered from 32 to 8 (2 steps per epoch) and torch threads set to 1 to keep "
            "the run near 15 minutes on a shared 2-core machine; see the module docstring",
        },
        "method": {
            "timing": "construct_s = build_trainer (DPOTrainer constructor: model load, tokenization, LoRA wrap "
            "and, when precomputing, the reference pass, whose own time is precompute_s); train_s = "
            "trainer.train(); total_s = construct_s + train_s; a 1-step warm-up run precedes and is not reported",
            "ref_forwards": "counted by a global forward hook on the backbone module, calls made with gradients "
            "off; precompute_batches counts DPOTrainer.compute_ref_log_probs calls (TRL's precompute path)",
            "caches": "every run writes its pairs to a fresh datasets folder (write_dataset into a new temp dir), "
            "so no run reuses another's tokenization or reference log-probability cache",
        },
        "warmup_s": warmup_s,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "wall_s": round(time.perf_counter() - t_all, 1),
        "results": runs,
        "summary": {
            "by_epochs": summary,
            "note": "Precomputing runs the same reference forwards as one plain epoch (one per batch, before "
            "training, inside the constructor) and then none during training, so the plain variant does "
            "epochs x steps_per_epoch reference forwards and the precomputed one steps_per_epoch whatever the "
            "epochs. At 1 epoch both do the same reference forwards, and the precompute adds its own "
            "dataloader and collation pass plus writing and re-reading the Arrow cache, so it should be no "
            "faster (ratio about 1, a little below); from 2 epochs on it saves (epochs - 1) x steps_per_epoch reference forwards, "
            "each worth a no-grad forward (a fraction of a training step's forward + backward), so the ratio "
            "grows with the epochs toward plain step / precomputed step, held down by the fixed construction "
            "cost. Losses agree "
            + ("exactly" if worst == 0 else f"within {worst:.1e} relative (worst step)")
            + ": the reference is the base model with the LoRA adapter off, the same computation whether run "
            "before training or inside each step. " + measured,
            "median_step_s": {v: round(x, 3) for v, x in med.items()},
            "median_precompute_batch_s": round(pre_batch, 3),
            "median_precompute_overhead_s": round(pre_overhead, 3),
        },
    }
    out = REPO / "benchmarks/results/dpo_ref_logps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{'epochs':>6} {'variant':>12} {'construct':>9} {'precomp':>8} {'train':>8} {'total':>8} "
        f"{'ref_fwd':>7} {'final_loss':>11}"
    )
    for r in runs:
        print(
            f"{r['epochs']:>6} {r['variant']:>12} {r['construct_s']:>9.2f} {r['precompute_s']:>8.2f} "
            f"{r['train_s']:>8.2f} {r['total_s']:>8.2f} {r['ref_forwards']:>7} {r['final_loss']:>11.6f}"
        )
    for s in summary:
        print(
            f"{s['epochs']} epoch(s): plain/precomputed total {s['plain_over_precomputed_total']}, "
            f"train {s['plain_over_precomputed_train']}, final-loss rel diff {s['final_loss_rel_diff']:.2e}"
        )
    print(f"wrote {out}")
    if failures:
        raise SystemExit("final losses disagree beyond 1e-3 relative: " + "; ".join(failures))


if __name__ == "__main__":
    main()

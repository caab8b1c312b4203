"""TRL under Ray Train: DPO with 2 data-parallel workers takes the same steps as one process on the
same batch, and a killed training worker resumes from its last checkpoint and finishes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from speed_ray.align.config import AlignConfig, AlignTrainConfig
from speed_ray.align.models import write_dataset
from speed_ray.align.train import AlignTrainSettings, build_trainer, load_data, sft_rows, train_loop
from speed_ray.config import load_config
from speed_ray.io.settings import TrainResources
from tests.distributed import registered_checkpoint, train_worker_pids

PROMPTS = ["Name a fruit.", "Name a colour.", "Name a tool.", "Name an animal."]
CHOSEN = ["An apple.", "Deep blue.", "A hammer.", "A red fox."]
REJECTED = ["Seven.", "Tuesday.", "Loud.", "Upward."]


def loop_config(
    model: str, data_dir: Path, kind: str, batch_size: int, steps: int, learning_rate: float = 5e-3, **kw
) -> AlignTrainSettings:
    align = AlignConfig(
        max_length=256,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,  # dropout draws differ between one process and two
        resources=TrainResources(cpus_per_worker=1),
        **kw,
    )
    return AlignTrainSettings(
        align,
        AlignTrainConfig(steps=steps, learning_rate=learning_rate, batch_size=batch_size),
        kind,
        model,
        str(data_dir),
        seed=0,
        generation={"do_sample": True, "temperature": 1.0},
    )


def pairs_dir(tmp_path: Path) -> Path:
    """Preference pairs as the align stage stores and trains on them (TRL's conversational format)."""
    rows = [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
        for p, c, r in zip(PROMPTS, CHOSEN, REJECTED, strict=True)
    ]
    path = tmp_path / "pairs.data"
    write_dataset(rows, path)
    return path


KEYS = ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins")


def test_dpo_two_workers_take_the_same_steps_as_one_process(tmp_path, tiny_llama, ray_session):
    from speed_ray.ray_utils import train

    data = pairs_dir(tmp_path)
    # one process, the whole batch of 4 pairs per step
    single = build_trainer(
        loop_config(tiny_llama, data, "dpo", 4, 2), load_data(str(data)), str(tmp_path / "single")
    )
    single.train()
    expected = [h for h in single.state.log_history if "loss" in h]

    # Ray Train, 2 gloo workers x 2 pairs: DDP averages the two halves' gradients
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=ddp"])
    res = TrainResources(workers=2, cpus_per_worker=1)
    config = loop_config(tiny_llama, data, "dpo", 2, 2)
    metrics = train(cfg, "dpo-ddp", train_loop, config, res, None, tmp_path / "ddp-model")
    got = metrics["history"]

    assert [h["step"] for h in got] == [1, 2] == [h["step"] for h in expected]
    for g, e in zip(got, expected, strict=True):
        for key in KEYS:
            assert g[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), (g["step"], key)
    # the first step starts at the reference (loss log 2); the second moved the same way in both runs
    assert got[0]["loss"] == pytest.approx(0.6931, abs=1e-4) and got[1]["loss"] < got[0]["loss"]
    # the exported folder is a merged model with the generation defaults the synth stage expects
    gen = json.loads((tmp_path / "ddp-model" / "generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["temperature"] == 1.0
    assert not (tmp_path / "ddp-model" / "adapter_config.json").exists()
    assert not (cfg.run_dir / "ray" / "dpo-ddp").exists()  # Ray's checkpoint copies are removed


@pytest.mark.faults
def test_a_killed_training_worker_resumes_from_its_last_checkpoint(
    tmp_path, tiny_llama, ray_session, fault_record
):
    from speed_ray.ray_utils import train

    rows = [
        {"messages": json.dumps([{"role": "user", "content": p}]), "completion": c}
        for p, c in zip(PROMPTS, CHOSEN, strict=True)
    ]
    data = tmp_path / "sft.data"
    write_dataset(sft_rows(rows), data)
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=kill"])
    steps, every = 200, 20
    config = loop_config(tiny_llama, data, "sft", 2, steps, save_steps=every)
    result: dict = {}

    def run() -> None:
        try:
            result["metrics"] = train(
                cfg,
                "sft-kill",
                train_loop,
                config,
                TrainResources(),
                None,
                tmp_path / "model",
                max_failures=1,
            )
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    storage = cfg.run_dir / "ray" / "sft-kill"
    deadline = time.time() + 300
    while not registered_checkpoint(storage):
        assert thread.is_alive(), f"training ended before its first checkpoint: {result}"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    pids = train_worker_pids()
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    thread.join(timeout=600)

    assert "error" not in result, result.get("error")
    metrics = result["metrics"]
    # it resumed from a checkpoint it had written, not from scratch, and finished the schedule
    assert metrics["resumed_from_step"] >= every and metrics["resumed_from_step"] % every == 0
    assert metrics["steps"] == steps
    assert [h["step"] for h in metrics["history"]] == list(range(1, steps + 1))
    assert (tmp_path / "model" / "config.json").is_file()
    fault_record(
        "SFT training worker SIGKILL mid-run (Ray Train restarts the group)",
        resumed_from_step=metrics["resumed_from_step"],
        steps=steps,
        steps_logged_once=[h["step"] for h in metrics["history"]] == list(range(1, steps + 1)),
    )


def run_single(tmp_path: Path, model: str, name: str, **kw) -> list[dict]:
    data = pairs_dir(tmp_path / name)
    trainer = build_trainer(
        loop_config(model, data, "dpo", 4, 2, **kw), load_data(str(data)), str(tmp_path / name / "out")
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_gradient_checkpointing_and_full_fine_tuning_options(tmp_path, tiny_llama):
    plain = run_single(tmp_path, tiny_llama, "plain")
    # gradient checkpointing recomputes activations: the same steps, less memory
    checkpointed = run_single(tmp_path, tiny_llama, "gc", gradient_checkpointing=True)
    for p, c in zip(plain, checkpointed, strict=True):
        assert c["loss"] == pytest.approx(p["loss"], rel=1e-5) and c["grad_norm"] == pytest.approx(
            p["grad_norm"], rel=1e-4
        )
    # full fine-tuning: no adapter; TRL's reference is a frozen copy, its log-probs precomputed
    full = run_single(tmp_path, tiny_llama, "full", finetune="full", learning_rate=1e-3)
    assert full[0]["loss"] == pytest.approx(0.6931, abs=1e-4) and full[1]["loss"] < full[0]["loss"]
    assert full[0]["grad_norm"] != pytest.approx(plain[0]["grad_norm"], rel=1e-2)  # every weight, not LoRA's


@pytest.mark.slow  # DeepSpeed's engine set-up on two CPU workers takes minutes on a 2-core box
def test_dpo_with_deepspeed_zero2_on_two_workers_matches_one_process(tmp_path, tiny_llama, ray_session):
    from speed_ray.ray_utils import train

    expected = run_single(tmp_path, tiny_llama, "single")
    data = pairs_dir(tmp_path / "zero")
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=zero2"])
    res = TrainResources(workers=2, cpus_per_worker=1)
    config = loop_config(tiny_llama, data, "dpo", 2, 2, deepspeed_stage=2)
    got = train(cfg, "dpo-zero2", train_loop, config, res, None, tmp_path / "zero2-model")["history"]
    for g, e in zip(got, expected, strict=True):
        for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
            assert g[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), (g["step"], key)
    assert (tmp_path / "zero2-model" / "config.json").is_file()

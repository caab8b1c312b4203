"""The alignment loop's pure parts: config, user data, training rows, model references, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speed_ray.align.train import deepspeed_config, long_prompts, sft_rows
from speed_ray.config import load_config
from speed_ray.io.data import read_chat_rows, read_preference_rows
from speed_ray.io.models import resolve_model
from speed_ray.io.settings import ConfigError

PROMPT = [{"role": "user", "content": "Write a retrieval example."}]


def test_nested_sections_keep_their_own_defaults():
    cfg = load_config(None, ["align.senior.steps=3", "embed.resources.cpus_per_worker=1"])
    # only the key given changes: the senior keeps SPEED's DPO lr and batch, embed its 2 workers
    assert (cfg.align.senior.steps, cfg.align.senior.learning_rate, cfg.align.senior.batch_size) == (
        3,
        1e-5,
        16,
    )
    assert (cfg.align.revisor.learning_rate, cfg.align.revisor.batch_size) == (5e-6, 24)
    assert (cfg.embed.resources.workers, cfg.embed.resources.cpus_per_worker) == (2, 1.0)
    assert cfg.align.generator.model == "run:align/junior"
    assert cfg.align.lora_target_modules == [
        "q_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


@pytest.mark.parametrize(
    "override, message",
    [
        ("align.without_verdict=keep", "align.without_verdict: expected one of drop, rule"),
        ("align.finetune=qlora", "align.finetune: expected one of lora, full"),
        ("align.deepspeed_stage=1", "align.deepspeed_stage: expected one of 0, 2, 3"),
        ("align.samples_per_prompt=1", "align.samples_per_prompt: the judge needs at least 2"),
        ("align.junior.batch_size=0", "align.junior.batch_size: expected a positive number"),
        ("align.save_steps=-1", "align.save_steps: expected 0 (off)"),
        ("synth.engine.model=run:align/critic", "synth.engine.model: 'run:align/critic' names no model"),
        ("synth.engine.model=run:../x/align/critic", "synth.engine.model: 'run:../x/align/critic' names no"),
        (
            "synth.engine.model=run:../../align/senior",
            "synth.engine.model: 'run:../../align/senior' names no",
        ),
        ("align.seed_data=/nonexistent/seed.jsonl", "align.seed_data: /nonexistent/seed.jsonl not found"),
    ],
)
def test_bad_align_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_disabled_align_engines_are_not_checked():
    # quickstart-style configs leave the stage out; its engines then need no GPU, model or key
    cfg = load_config(None, ["run.stages=[synth, embed]", "align.teacher.kind=openai"])
    assert "align" not in cfg.run.stages
    with pytest.raises(ConfigError, match="align.teacher.base_url: expected an http"):
        load_config(None, ["align.teacher.kind=openai"])


def test_another_runs_models_are_named_from_this_run(tmp_path):
    # an experiment's synth runs generate with the models of its align run
    cfg = load_config(None, ["synth.engine.model=run:../exp-align/align/senior"])
    assert cfg.synth.engine.model == "run:../exp-align/align/senior"
    senior = tmp_path / "exp-align" / "align" / "senior"
    senior.mkdir(parents=True)
    (senior / "config.json").write_text("{}")
    assert Path(resolve_model(cfg.synth.engine.model, tmp_path / "exp-synth")).resolve() == senior


def test_run_models_resolve_inside_the_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run:align/senior: no model folder at .*align/senior yet"):
        resolve_model("run:align/senior", tmp_path)
    (tmp_path / "align" / "senior").mkdir(parents=True)
    (tmp_path / "align" / "senior" / "config.json").write_text("{}")
    assert resolve_model("run:align/senior", tmp_path) == str(tmp_path / "align" / "senior")


def test_user_alignment_data_is_checked_by_row(tmp_path):
    good = tmp_path / "seed.jsonl"
    good.write_text(
        json.dumps({"messages": PROMPT, "completion": "{}"})
        + "\n"
        + json.dumps({"messages": json.dumps(PROMPT), "completion": "x", "extra": 1})
        + "\n"
    )
    rows = read_chat_rows(good, ("completion",))
    assert rows == [
        {"messages": json.dumps(PROMPT), "completion": "{}"},
        {"messages": json.dumps(PROMPT), "completion": "x"},
    ]
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"messages": PROMPT, "chosen": "a", "rejected": ""}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: rejected: expected a non-empty string"):
        read_preference_rows(bad)
    bad.write_text(json.dumps({"messages": [{"text": "hi"}], "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: messages: expected a non-empty list"):
        read_preference_rows(bad)
    bad.write_text(json.dumps({"messages": PROMPT, "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: missing keys \['rejected'\]"):
        read_preference_rows(bad)
    # TRL's conversational form: messages on every side
    bad.write_text(json.dumps({"prompt": PROMPT, "chosen": [{"role": "assistant"}], "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: chosen: expected a non-empty list"):
        read_preference_rows(bad)
    bad.write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: missing keys \['prompt'\]"):
        read_preference_rows(bad)


def test_training_rows_in_trl_formats():
    msgs = json.dumps(PROMPT)
    # SFT: prompt-completion, so TRL's loss covers the completion only
    assert sft_rows([{"messages": msgs, "completion": '{"a": 1}'}]) == [
        {"prompt": PROMPT, "completion": [{"role": "assistant", "content": '{"a": 1}'}]}
    ]
    # DPO: the stored pairs are already TRL's conversational preference rows (tests/unit/test_formats.py)


def test_deepspeed_config_from_stage():
    assert deepspeed_config(0) is None
    ds = deepspeed_config(3)
    assert ds is not None and ds["zero_optimization"] == {"stage": 3}
    # torch's AdamW: no C++ JIT build of DeepSpeed's fused Adam on a fresh machine
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_long_prompts_counted_with_the_models_chat_template(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    short = {"prompt": PROMPT}
    long = {"prompt": [{"role": "user", "content": "word " * 300}]}
    n_short = len(
        tok.apply_chat_template(PROMPT, tokenize=True, add_generation_prompt=True, return_dict=False)
    )
    assert long_prompts(tiny_llama, [short, long, short], n_short + 1) == [1]
    assert long_prompts(tiny_llama, [short], n_short) == [0]  # a prompt that fills max_length leaves no room


def test_align_report_counts_drops_and_budget(tmp_path):
    from speed_ray.eval.report_align import align_lines

    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    acc = {"calls": 50, "errors": 5, "input_tokens": 20_000, "output_tokens": 5_000}
    m = {f"align/{k}": None for k in ("tasks", "junior", "root", "senior", "revisions", "revisor")}
    m |= {
        "align/seed": {"engine": "vllm", "model": "t", "num_rows": 50, "accounting": acc, "duration_s": 9.0},
        "align/judgments": {
            "engine": "vllm",
            "model": "t",
            "num_rows": 40,
            "accounting": acc | {"calls": 40, "errors": 30},
            "duration_s": 5.0,
        },
        "align/pairs": {
            "judged": 10,
            "rule_scored": 0,
            "num_rows": 10,
            "rows_in": 42,
            "dropped": {"judge: invalid JSON": 30, "fewer than 2 samples": 2},
        },
        "align_drops": {"seed": {"invalid JSON": 5}, "judgments": {"invalid JSON": 30}},
    }
    text = "\n".join(align_lines(cfg, m))
    assert "| seed | vllm:`t` | 50 | 45 | 5 invalid JSON | 20000 | 5000 | 50 | 9.0 |" in text
    assert (
        "| pairs | judge: 10, rule score: 0 | 42 | 10 | 30 judge: invalid JSON, 2 fewer than 2 samples |"
        in text
    )
    # 50 of the paper's 25,000 seed calls; 25,000 of its 10M tokens
    assert "- seed: 50 calls of the paper's 25,000 (0.20%), 25,000 tokens of 10,000,000 (0.25%)" in text
    assert "- judgments: 40 calls of the paper's 10,000 (0.40%)" in text


def test_users_own_teacher_data_becomes_the_steps_output(tmp_path):
    from speed_ray.align.driver import user_step
    from speed_ray.align.models import training_rows
    from speed_ray.io.schemas import GENERATIONS, read_manifest, read_stage

    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps({"messages": PROMPT, "completion": c}) + "\n" for c in ("a", "b")))
    cfg = load_config(None, [f"run.output_dir={tmp_path}", f"align.seed_data={seed}"])
    out = cfg.run_dir / "align"
    manifest = user_step(cfg, out, "seed")
    assert manifest["num_rows"] == 2 and manifest["source"] == str(seed)
    table = read_stage(out / "seed", GENERATIONS)
    assert table["raw"].to_pylist() == ["a", "b"] and table["error"].null_count == 2
    assert read_manifest(out / "seed") == manifest
    assert training_rows(out, "junior") == [
        {"messages": json.dumps(PROMPT), "completion": "a"},
        {"messages": json.dumps(PROMPT), "completion": "b"},
    ]

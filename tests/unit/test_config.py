"""Config loading: merge order, unknown keys, types, files and resources, all before Ray starts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from speed_ray.config import SpeedRayConfig, load_config, save_config
from speed_ray.io.settings import ConfigError
from tests.conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_in_the_repo_loads(path, monkeypatch, hub_cache):
    monkeypatch.setenv(
        "OPENAI_API_KEY", "sk-test"
    )  # synth-teacher.yaml names it; only its presence is checked
    # the hub models a config names (org/name), in a local cache: the suite runs offline
    for repo_id in re.findall(r"^\s*model:\s*([\w.-]+/[\w.-]+)\s*(?:#.*)?$", path.read_text(), re.M):
        hub_cache(repo_id)
    assert isinstance(load_config(path), SpeedRayConfig)


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "synth:\n  num_topics: 7\n  sampling: {max_tokens: 99}\n")
    cfg = load_config(path, ["synth.sampling.max_tokens=12", "embed.learning_rate=1e-3", "run.name=x"])
    assert cfg.synth.num_topics == 7  # from YAML
    assert cfg.synth.sampling.max_tokens == 12  # override beats YAML
    assert cfg.embed.learning_rate == 0.001  # YAML-typed override, int/float coerced
    assert cfg.synth.sampling.temperature == 1.0  # default kept
    assert cfg.run_dir == (Path("runs") / "x").resolve()


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("synth:\n  enigne: {}\n", [], "synth.enigne: unknown key"),
        ("", ['eval.models=["../../etc=base"]'], "eval.models[0]: label '../../etc': expected letters"),
        ("", ["run.name=../elsewhere"], "run.name: expected a plain folder name"),
        ("", ["synth.sampling.max_tokens=lots"], "synth.sampling.max_tokens: expected int, got 'lots'"),
        ("", ["embed.resources.use_gpu=3"], "embed.resources.use_gpu: expected bool, got 3"),
        ("synth:\n  mix: {poetry: 1}\n", [], "synth.mix.poetry: unknown task type"),
        ("", ["synth.mix.sts=-1"], "synth.mix.sts: expected a non-negative number, got -1"),
        ("", ["synth.engine.kind=tgi"], "synth.engine.kind: expected one of vllm, transformers, openai"),
        ("", ["embed.data.max_rows=-1"], "embed.data.max_rows: expected 0 (all) or a positive number"),
        (
            "",
            ["embed.data.source=corpus", "embed.data.path=README.md", "embed.data.crops=README.md"],
            "embed.data.crops: adds crop pairs to synth or pairs rows",
        ),
        ("", ["embed.data.crops_order=first"], "embed.data.crops_order: 'first' orders the crop pairs"),
        ("", ["embed.data.crops_order=last"], "embed.data.crops_order: expected one of mixed, first"),
        ("", ["embed.data.exclude=builtin:debian/retrieval"], "embed.data.exclude: leaves documents out"),
        ("", ["embed.data.crops=/nonexistent/c.jsonl"], "embed.data.crops: /nonexistent/c.jsonl not found"),
        (
            "",
            ["embed.data.crops=builtin:debian/labelled", "embed.data.exclude=/nonexistent"],
            "embed.data.exclude: /nonexistent not found",
        ),
        (
            "",
            ["embed.data.source=corpus", "embed.data.path=README.md", "embed.data.max_rows=5"],
            "embed.data.max_rows: for synth and pairs data",
        ),
        (
            "synth:\n  judge: {kind: openai, model: gpt-4o}\n",
            [],
            "synth.judge.base_url: expected an http(s):// URL for kind openai, got None",
        ),
        (
            "synth:\n  reviser: {kind: openai, model: m, base_url: 'http://x/v1', api_key_env: NO_SUCH_KEY_VAR}\n",
            [],
            "synth.reviser.api_key_env: environment variable NO_SUCH_KEY_VAR is not set",
        ),
        ("", ["synth.dedup.threshold=1.5"], "synth.dedup.threshold: expected a value in (0, 1], got 1.5"),
        ("", ["embed.pooling=max"], "embed.pooling: expected one of"),
        (
            "",
            ["synth.taxonomy.path=/nonexistent/topics.txt"],
            "synth.taxonomy.path: file /nonexistent/topics.txt not found",
        ),
        ("", ["eval.retrieval.path=/nonexistent"], "eval.retrieval.path: expected /nonexistent/corpus.jsonl"),
        ("", ["embed.model=/no/such/model"], "embed.model: model folder /no/such/model not found"),
        ("", ["embed.resources.workers=64"], "embed.resources: 64 workers x 1.0 CPUs = 64.0 CPUs"),
        ("", ["synth.engine.num_gpus=1"], "synth.engine.num_gpus: 1 actors x 1.0 GPUs asked for"),
        ("", ["synth.engine.max_actors=0"], "synth.engine.max_actors: expected >= synth.engine.min_actors"),
        ("- a\n- b\n", [], "expected a mapping at the top level"),
        ("", ["novalue"], "override 'novalue': expected key.sub=value"),
        ("", ["embed.data.source=web"], "embed.data.source: expected one of synth, pairs, corpus"),
        ("", ["embed.data.source=corpus"], "embed.data.path: required when embed.data.source is 'corpus'"),
        (
            "",
            ["embed.data.source=pairs", "embed.data.path=/no/pairs.jsonl"],
            "embed.data.path: /no/pairs.jsonl not found",
        ),
        (
            "",
            ["embed.train_last_blocks=-1"],
            "embed.train_last_blocks: expected 0 (off) or a positive number",
        ),
        ("", ["embed.precision=fp8"], "embed.precision: expected one of fp32, bf16, fp16, got 'fp8'"),
        ("", ["embed.precision=fp16"], "embed.precision: fp16 needs DeepSpeed's loss scaling"),
        ("", ["embed.deepspeed_stage=1"], "embed.deepspeed_stage: expected one of 0, 2, 3, got 1"),
        ("", ["embed.finetune=qlora"], "embed.finetune: expected one of auto, lora, full"),
        ("", ["embed.lr_schedule=step"], "embed.lr_schedule: expected one of linear, cosine"),
        ("", ["embed.data.min_crops=1"], "embed.data.min_crops: a pair needs 2 different crops"),
        ("", ["embed.hard_negatives=-1"], "embed.hard_negatives: expected 0 (off) or a positive number"),
        ("", ["embed.save_steps=-5"], "embed.save_steps: expected 0 (off) or a positive number"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, monkeypatch, text, overrides, message):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever the machine has
    with pytest.raises(ConfigError, match=None) as err:
        load_config(write(tmp_path, text), overrides)
    assert message in str(err.value)


def test_embed_finetune_auto_is_lora_for_decoders_only():
    from speed_ray.embed.config import embed_finetune

    assert embed_finetune(load_config(None, ["embed.pooling=lasttoken"]).embed) == "lora"
    assert embed_finetune(load_config(None, ["embed.pooling=mean"]).embed) == "full"
    assert (
        embed_finetune(load_config(None, ["embed.pooling=lasttoken", "embed.finetune=full"]).embed) == "full"
    )


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file /nope.yaml: not found"):
        load_config("/nope.yaml")


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(None, ["synth.num_topics=3", "run.seed=5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_cli_bad_config_exits_2_before_ray(tmp_path):
    path = write(tmp_path, "embed:\n  batch_sise: 4\n")
    r = subprocess.run(
        [sys.executable, "-m", "speed_ray.cli", "run", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 2
    assert "embed.batch_sise: unknown key" in r.stderr
    assert "ray" not in r.stderr.lower().replace("speed-ray", "")  # failed before Ray started


def test_yaml_aliases_are_copies(tmp_path):
    text = "synth:\n  judge: &t {kind: openai, model: a, base_url: 'http://h/v1'}\n  reviser: *t\n"
    cfg = load_config(write(tmp_path, text), ["synth.judge.model=b"])
    assert (cfg.synth.judge.model, cfg.synth.reviser.model) == ("b", "a")
    assert cfg.synth.brainstormer is None and cfg.synth.reviser.base_url == "http://h/v1"


def test_paths_in_a_file_resolve_against_its_folder_and_overrides_against_the_current_one(
    tmp_path, monkeypatch
):
    conf = tmp_path / "conf"
    (conf / "models" / "m").mkdir(parents=True)
    (conf / "models" / "m" / "config.json").write_text("{}")
    (conf / "models" / "m" / "model.safetensors").write_bytes(b"")
    (tmp_path / "pairs.jsonl").write_text('{"anchor": "a", "positive": "p"}\n')
    (tmp_path / "topics.txt").write_text("A/B\n")
    path = conf / "c.yaml"
    path.write_text(
        "run: {output_dir: out}\n"
        "embed: {model: ./models/m, data: {source: pairs, path: ../pairs.jsonl}}\n"
        "eval: {models: [base, mine=./models/m, all-minilm-l6-v2]}\n"
        "experiment: {variants: {v: {embed.data.path: ../pairs.jsonl, synth.reviser: {model: ./models/m}}}}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert cfg.run.output_dir == str(conf / "out")
    assert cfg.embed.model == str(conf / "models" / "m")
    assert cfg.embed.data.path == str(tmp_path / "pairs.jsonl")
    assert cfg.eval.models == ["base", f"mine={conf / 'models' / 'm'}", "all-minilm-l6-v2"]
    assert cfg.eval.retrieval.path == "builtin:debian/retrieval"  # a built-in name stays a name
    assert cfg.experiment.variants["v"] == {
        "embed.data.path": str(tmp_path / "pairs.jsonl"),
        "synth.reviser": {"model": str(conf / "models" / "m")},
    }
    cfg = load_config(path, ["run.output_dir=out", "synth.taxonomy.path=../topics.txt"])
    assert cfg.run.output_dir == str(elsewhere / "out")  # an override: from the current folder
    assert cfg.synth.taxonomy.path == str(tmp_path / "topics.txt")
    saved = tmp_path / "saved" / "config.yaml"
    save_config(cfg, saved)
    assert load_config(saved) == cfg  # absolute in the saved copy: the same from anywhere


def test_run_stages(tmp_path):
    assert load_config(None).run.stages == ["align", "synth", "embed", "eval", "report"]
    assert load_config(REPO / "configs" / "crops-debian.yaml").run.stages == ["embed", "eval", "report"]
    assert "align" not in load_config(REPO / "configs" / "quickstart.yaml").run.stages
    with pytest.raises(
        ConfigError, match=r"run.stages: expected a list of stages from align, .* got \['train'\]"
    ):
        load_config(None, ["run.stages=[train]"])
    # the align engines are checked only when align runs
    bad = ["align.teacher.kind=openai", "align.teacher.base_url=null"]
    assert load_config(None, ["run.stages=[embed]", *bad])
    with pytest.raises(ConfigError, match="align.teacher.base_url"):
        load_config(None, bad)

"""Config loading: merge order, unknown keys, types, files and resources, all before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from speed_ray.config import ConfigError, SpeedRayConfig, load_config, save_config
from tests.conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_in_the_repo_loads(path):
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
        ("", ["synth.sampling.max_tokens=lots"], "synth.sampling.max_tokens: expected int, got 'lots'"),
        ("", ["embed.resources.use_gpu=3"], "embed.resources.use_gpu: expected bool, got 3"),
        ("synth:\n  task_types: [poetry]\n", [], "synth.task_types[0]: expected one of"),
        ("", ["embed.pooling=max"], "embed.pooling: expected one of"),
        (
            "",
            ["synth.topics_file=/nonexistent/topics.txt"],
            "synth.topics_file: file /nonexistent/topics.txt not found",
        ),
        ("", ["eval.retrieval_dir=/nonexistent"], "eval.retrieval_dir: expected /nonexistent/corpus.jsonl"),
        ("", ["embed.model=./no/such/model"], "embed.model: model folder ./no/such/model not found"),
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
    ],
)
def test_bad_configs_name_the_key(tmp_path, monkeypatch, text, overrides, message):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever the machine has
    with pytest.raises(ConfigError, match=None) as err:
        load_config(write(tmp_path, text), overrides)
    assert message in str(err.value)


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

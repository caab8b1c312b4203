"""How engine settings become ``vllm.LLM`` arguments on each platform, and the check of
``engine_kwargs`` at config load (vLLM's argument names, no engine started)."""

from __future__ import annotations

import pytest

from speed_ray import cli
from speed_ray.config import RUNTIME_KEYS, load_config, save_config
from speed_ray.engines.config import EngineConfig
from speed_ray.engines.vllm_engine import dataclass_fields, llm_kwargs
from speed_ray.io.settings import ConfigError
from tests.unit.test_bad_input import config, one_error_line

ENGINE = "synth.engine"


def kwargs(platform: str, **fields) -> dict:
    return llm_kwargs(EngineConfig(**fields), "/models/m", seed=7, platform=platform)


def test_the_cpu_build_gets_a_fixed_kv_cache_whole_prompt_prefill_and_eager_mode():
    kw = kwargs("cpu", kv_cache_gib=0.25, max_model_len=1024)
    assert kw["kv_cache_memory_bytes"] == 2**28 and "gpu_memory_utilization" not in kw
    assert kw["enable_chunked_prefill"] is False and kw["max_num_batched_tokens"] == 8192
    assert kw["enable_prefix_caching"] is True
    assert kw["enforce_eager"] is True
    assert (kw["model"], kw["seed"], kw["max_model_len"]) == ("/models/m", 7, 1024)


def test_cuda_gets_a_memory_share_chunked_prefill_and_cuda_graphs():
    kw = kwargs("cuda", kv_cache_gib=0.25, gpu_memory_utilization=0.8)
    assert kw["gpu_memory_utilization"] == 0.8 and "kv_cache_memory_bytes" not in kw
    assert kw["enable_chunked_prefill"] is True
    assert "max_num_batched_tokens" not in kw  # vLLM's default for the device
    assert kw["enable_prefix_caching"] is True
    assert kw["enforce_eager"] is False
    assert kwargs("cpu", max_model_len=10000)["max_num_batched_tokens"] == 10000


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_an_explicit_enforce_eager_wins_on_both_platforms(platform):
    assert kwargs(platform, enforce_eager=True)["enforce_eager"] is True
    assert kwargs(platform, enforce_eager=False)["enforce_eager"] is False


def test_engine_kwargs_are_applied_over_ours():
    extra = {"max_num_seqs": 64, "enable_prefix_caching": False, "max_num_batched_tokens": 2048}
    kw = kwargs("cpu", engine_kwargs=extra)
    assert {k: kw[k] for k in extra} == extra
    assert kwargs("cuda", engine_kwargs={"enable_chunked_prefill": False})["enable_chunked_prefill"] is False


def test_a_valid_engine_kwarg_passes_validation_and_reaches_llm_kwargs(tmp_path):
    extra = [f"{ENGINE}.engine_kwargs.max_num_seqs=64", f"{ENGINE}.engine_kwargs.kv_cache_dtype=fp8"]
    cfg = load_config(config(tmp_path), extra)
    assert cfg.synth.engine.engine_kwargs == {"max_num_seqs": 64, "kv_cache_dtype": "fp8"}
    kw = llm_kwargs(cfg.synth.engine, "/models/m", platform="cuda")
    assert (kw["max_num_seqs"], kw["kv_cache_dtype"]) == (64, "fp8")
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_an_unknown_engine_kwarg_in_the_file_is_exit_2_naming_it(tmp_path, capsys):
    path = config(tmp_path)
    path.write_text(path.read_text() + "synth:\n  engine:\n    engine_kwargs: {no_such_arg: 1}\n")
    assert cli.main(["run", str(path)]) == 2
    expected = f"{ENGINE}.engine_kwargs.no_such_arg: not a vLLM engine argument (see vllm.engine.arg_utils.EngineArgs)"
    one_error_line(capsys.readouterr().err, expected)
    assert not (tmp_path / "runs").exists()


def test_a_misspelt_engine_kwarg_gets_the_closest_names(tmp_path, capsys):
    assert cli.main(["synth", str(config(tmp_path)), f"{ENGINE}.engine_kwargs.max_num_seq=64"]) == 2
    expected = f"{ENGINE}.engine_kwargs.max_num_seq: not a vLLM engine argument (closest: max_num_seqs"
    one_error_line(capsys.readouterr().err, expected)


@pytest.mark.parametrize(
    ("name", "instead"),
    [("model", f"{ENGINE}.model"), ("seed", "run.seed"), ("enforce_eager", f"{ENGINE}.enforce_eager")],
)
def test_an_engine_kwarg_with_a_field_of_its_own_is_refused(tmp_path, name, instead):
    with pytest.raises(
        ConfigError, match=rf"^{ENGINE}\.engine_kwargs\.{name}: set by speed-ray; use {instead} instead$"
    ):
        load_config(config(tmp_path), [f"{ENGINE}.engine_kwargs.{name}=1"])


def test_engine_kwargs_are_only_for_vllm_engines(tmp_path):
    expected = rf"^{ENGINE}\.engine_kwargs: vLLM engine arguments, only for kind vllm \(got transformers\)$"
    with pytest.raises(ConfigError, match=expected):
        load_config(
            config(tmp_path), [f"{ENGINE}.kind=transformers", f"{ENGINE}.engine_kwargs.max_num_seqs=4"]
        )


def test_without_vllm_the_check_says_so(tmp_path, monkeypatch):
    import speed_ray.engines.vllm_engine as vllm_engine

    def missing():
        raise ImportError("No module named 'vllm'")

    monkeypatch.setattr(vllm_engine, "engine_arg_names", missing)
    with pytest.raises(
        ConfigError, match=r"engine_kwargs: checking vLLM engine arguments needs vllm, which cannot"
    ):
        load_config(config(tmp_path), [f"{ENGINE}.engine_kwargs.max_num_seqs=4"])


def test_engine_argument_names_are_read_from_the_dataclass_source():
    source = (
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class EngineArgs:\n"
        "    model: str = 'm'\n"
        "    max_num_seqs: int | None = None\n"
        "    _private: int = 0\n"
        "    LIMIT: ClassVar[int] = 3\n"
        "    plain = 4\n"
        "    def f(self):\n"
        "        local: int = 1\n"
    )
    assert dataclass_fields(source, "EngineArgs") == {"model", "max_num_seqs", "_private"}
    assert dataclass_fields(source, "Other") == set()


def test_gpu_memory_utilization_is_a_share(tmp_path):
    with pytest.raises(
        ConfigError, match=rf"^{ENGINE}\.gpu_memory_utilization: expected a share in \(0, 1\], got 1.5$"
    ):
        load_config(config(tmp_path), [f"{ENGINE}.gpu_memory_utilization=1.5"])


def test_memory_and_eager_settings_are_runtime_but_engine_kwargs_are_not():
    assert {f"{ENGINE}.gpu_memory_utilization", f"{ENGINE}.enforce_eager", f"{ENGINE}.kv_cache_gib"} <= set(
        RUNTIME_KEYS
    )
    assert not any("engine_kwargs" in k for k in RUNTIME_KEYS)

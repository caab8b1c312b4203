"""The ``embed.*`` section: the model to fine-tune, its training data, the contrastive loss and the
training run."""

from __future__ import annotations

from dataclasses import dataclass, field

from speed_ray.embed.pairs import CropRule
from speed_ray.io.settings import (
    ConfigError,
    TrainResources,
    check_choices,
    check_non_negative,
    check_positive,
    check_rows,
    locate_input,
)

POOLING_MODES = ("mean", "cls", "lasttoken")
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# Keys that change where or how the loss and gradients are computed, never their values
# (``speed_ray.io.fingerprint``). Workers are not here: workers x batch_size is the global batch.
RUNTIME = (
    "embed.resources.cpus_per_worker",
    "embed.resources.use_gpu",
    "embed.chunk_size",
    "embed.pass_tokens",
    "embed.cache_frozen",
    "embed.gradient_checkpointing",
    "embed.save_steps",
    "embed.max_failures",
)


@dataclass
class EmbedDataConfig:
    source: str = "synth"
    """synth (this run's examples) | pairs (a user file) | corpus (unlabelled text -> crops or dropout)."""
    path: str | None = None
    """synth: another run's folder, to train on its ``synth/train`` (null: this run's);
    pairs: parquet, JSONL, a step folder or a ``datasets`` folder with anchor, positive[, negative*] columns;
    corpus: a JSONL file with ``id`` and ``text``. A pairs or corpus file may also be a URI on object
    storage (``s3://bucket/pairs.parquet``, ``gs://...``), read through pyarrow with credentials from
    the environment."""
    max_rows: int = 0
    """synth and pairs: train on this many rows, a seeded sample (0: all). A smaller sample is part
    of a larger one with the same seed (``run.seed``), so data sizes make a scaling curve."""
    pair_mode: str = "crops"
    """corpus and crops: crops (two different sentence crops) | dropout (one crop twice)."""
    crop_min_chars: int = CropRule.min_chars
    crop_max_chars: int = CropRule.max_chars
    sentences_per_crop: int = CropRule.sentences_per_crop
    """The crops paper's rule (arXiv 2508.03453): 2 consecutive sentences of 100-250 characters."""
    min_crops: int = CropRule.min_crops
    """Documents with fewer crops give no pair (2 crops of 2 sentences = at least 3 valid sentences);
    they are counted in the manifest and the log, by reason."""
    holdout_fraction: float = 0.0
    """corpus and crops: leave out this seeded fraction of the documents (the crops paper's "(train)"
    variant); eval.knn with split: holdout and the same fraction and seed scores exactly them."""
    holdout_seed: int = 42
    crops: str | None = None
    """synth and pairs: an unlabelled corpus (JSONL with ``id`` and ``text``) whose sentence-crop pairs
    are trained on with the rows (pair_mode and the crop keys above; no hard negatives: masked)."""
    crops_order: str = "mixed"
    """With crops: mixed (crop pairs and rows shuffled into the same global batches) | first (each
    epoch takes every crop pair, then every row: one after the other)."""
    exclude: str | None = None
    """A corpus (JSONL, or a BEIR folder such as ``builtin:debian/retrieval``) whose document ids are
    left out of any corpus cropped for training (source corpus, or crops), e.g. the documents a
    retrieval eval scores; the manifest counts them."""

    def validate(self) -> None:
        if self.source != "synth" and self.path is None:
            raise ConfigError(f"embed.data.path: required when embed.data.source is {self.source!r}")
        if self.min_crops < 2:
            raise ConfigError(
                f"embed.data.min_crops: a pair needs 2 different crops, expected >= 2, got {self.min_crops}"
            )
        if self.crop_min_chars > self.crop_max_chars:
            raise ConfigError(
                f"embed.data.crop_min_chars: expected at most crop_max_chars ({self.crop_max_chars}), "
                f"got {self.crop_min_chars}"
            )
        if not 0 <= self.holdout_fraction < 1:
            raise ConfigError(
                f"embed.data.holdout_fraction: expected 0 <= fraction < 1, got {self.holdout_fraction}"
            )
        if self.max_rows < 0:
            raise ConfigError(
                f"embed.data.max_rows: expected 0 (all) or a positive number, got {self.max_rows}"
            )
        if self.max_rows and self.source == "corpus":
            raise ConfigError(
                "embed.data.max_rows: for synth and pairs data (a corpus gives a pair per document)"
            )
        cropped = self.source == "corpus" or self.crops is not None
        if self.holdout_fraction and not cropped:
            raise ConfigError(
                "embed.data.holdout_fraction: only a corpus (embed.data.source: corpus, or embed.data.crops) "
                "is held out from"
            )
        self._check_crops(cropped)
        self._check_files()

    def _check_crops(self, cropped: bool) -> None:
        if self.crops is not None and self.source == "corpus":
            raise ConfigError(
                "embed.data.crops: adds crop pairs to synth or pairs rows; with source corpus, "
                "embed.data.path is the corpus cropped"
            )
        if self.crops_order != "mixed" and self.crops is None:
            raise ConfigError(
                f"embed.data.crops_order: {self.crops_order!r} orders the crop pairs of embed.data.crops "
                "against the rows; set embed.data.crops"
            )
        if self.exclude is not None and not cropped:
            raise ConfigError(
                "embed.data.exclude: leaves documents out of a corpus cropped for training "
                "(embed.data.source: corpus, or embed.data.crops); neither is set"
            )

    def crop_rule(self) -> CropRule:
        """The crop rule these settings give (``speed_ray.embed.pairs``)."""
        return CropRule(self.crop_min_chars, self.crop_max_chars, self.sentences_per_crop, self.min_crops)

    def _check_files(self) -> None:
        """A pairs file or a corpus is read now (a local one, or one on object storage: a missing
        object is named by the reader); synth data may be another run's folder, which an experiment
        makes after loading this config."""
        from pathlib import Path

        for key, spec in (("exclude", self.exclude), ("crops", self.crops)):
            located = None if spec is None else locate_input(f"embed.data.{key}", spec)
            if isinstance(located, Path) and not located.exists():
                raise ConfigError(f"embed.data.{key}: {spec} not found")
        check_rows("embed.data.crops", self.crops, "iter_corpus")
        check_rows("embed.data.exclude", self.exclude, "document_ids")
        if self.source == "synth":
            return
        assert self.path is not None
        located = locate_input("embed.data.path", self.path)
        if isinstance(located, Path) and not located.exists():
            raise ConfigError(f"embed.data.path: {self.path} not found")
        reader = "iter_pairs" if self.source == "pairs" else "iter_corpus"
        check_rows("embed.data.path", self.path, reader)


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

    def validate(self) -> None:
        check_choices(
            {
                "embed.pooling": (self.pooling, POOLING_MODES),
                "embed.data.source": (self.data.source, ("synth", "pairs", "corpus")),
                "embed.data.pair_mode": (self.data.pair_mode, ("crops", "dropout")),
                "embed.data.crops_order": (self.data.crops_order, ("mixed", "first")),
                "embed.finetune": (self.finetune, ("auto", "lora", "full")),
                "embed.precision": (self.precision, ("fp32", "bf16", "fp16")),
                "embed.deepspeed_stage": (self.deepspeed_stage, (0, 2, 3)),
                "embed.lr_schedule": (self.lr_schedule, LR_SCHEDULES),
            }
        )
        check_positive(
            {
                "embed.batch_size": self.batch_size,
                "embed.steps": self.steps,
                "embed.resources.workers": self.resources.workers,
                "embed.temperature": self.temperature,
                "embed.lora_r": self.lora_r,
            }
        )
        names = (
            *("warmup_steps", "train_last_blocks", "chunk_size", "pass_tokens", "hard_negatives"),
            *("weight_decay", "max_grad_norm", "save_steps", "max_failures"),
        )
        check_non_negative({f"embed.{n}": getattr(self, n) for n in names})
        if self.precision == "fp16" and self.deepspeed_stage == 0:
            raise ConfigError(
                "embed.precision: fp16 needs DeepSpeed's loss scaling; expected embed.deepspeed_stage 2 or 3, "
                "or precision bf16"
            )
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"embed.dropout: expected a probability 0 <= p < 1 or null, got {self.dropout}")
        self.data.validate()


def embed_finetune(e: EmbedConfig) -> str:
    """``lora`` or ``full``: ``auto`` is LoRA for decoders (lasttoken pooling), full for encoders."""
    if e.finetune != "auto":
        return e.finetune
    return "lora" if e.pooling == "lasttoken" else "full"

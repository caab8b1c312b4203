"""The ``align.*`` section: SPEED's alignment loop, its teacher, its three trained models and their
training settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from speed_ray.engines.config import EngineConfig
from speed_ray.io.settings import (
    ConfigError,
    TrainResources,
    check_choices,
    check_non_negative,
    check_positive,
    check_rows,
    locate,
)

# The models align trains, in order.
STEPS = ("junior", "senior", "revisor")
# A user's alignment data per align key: the text columns besides ``messages`` (pairs: TRL's prompt /
# chosen / rejected, read by ``read_preference_rows``).
DATA_COLUMNS: dict[str, tuple[str, ...]] = {
    "seed_data": ("completion",),
    "pairs_data": (),
    "revision_data": ("completion",),
}
# Keys that change where or how fast align trains, never its models (``speed_ray.io.fingerprint``).
RUNTIME = (
    "align.resources.cpus_per_worker",
    "align.resources.use_gpu",
    "align.gradient_checkpointing",
    "align.precompute_ref_log_probs",
    "align.save_steps",
    "align.max_failures",
)


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

    def engines(self) -> dict[str, EngineConfig]:
        return {"align.teacher": self.teacher, "align.generator": self.generator}

    def validate(self, enabled: bool) -> None:
        """``enabled``: the run aligns (``align`` in ``run.stages``), so its data files are read now."""
        check_choices(
            {
                "align.without_verdict": (self.without_verdict, ("drop", "rule")),
                "align.finetune": (self.finetune, ("lora", "full")),
                "align.deepspeed_stage": (self.deepspeed_stage, (0, 2, 3)),
            }
        )
        check_positive(
            {
                "align.resources.workers": self.resources.workers,
                "align.num_topics": self.num_topics,
                "align.examples_per_task": self.examples_per_task,
                "align.max_length": self.max_length,
                **{
                    f"align.{n}.{k}": getattr(getattr(self, n), k)
                    for n in STEPS
                    for k in ("steps", "batch_size")
                },
            }
        )
        if self.samples_per_prompt < 2:
            raise ConfigError(
                "align.samples_per_prompt: the judge needs at least 2 outputs per prompt, "
                f"got {self.samples_per_prompt}"
            )
        check_non_negative({f"align.{k}": getattr(self, k) for k in ("save_steps", "max_failures")})
        if self.finetune == "lora" and not self.lora_target_modules:
            raise ConfigError("align.lora_target_modules: expected at least one module name for LoRA")
        for key in DATA_COLUMNS:
            path = getattr(self, key)
            if path is not None and not locate(f"align.{key}", path).exists():
                raise ConfigError(f"align.{key}: {path} not found")
            if enabled:
                self._check_rows(key, path)

    @staticmethod
    def _check_rows(key: str, path: str | None) -> None:
        if key == "pairs_data":
            check_rows(f"align.{key}", path, "read_preference_rows")
        else:
            check_rows(f"align.{key}", path, "read_chat_rows", DATA_COLUMNS[key])

"""What the distillation stages run, and every default they have: data, prune, cache, train, eval.

Torch-free, so the recipe schema composes these models directly and the CLI builds the
same objects (``edgekit distill`` with no options runs ``DistillConfig()``). The stage
modules (data, prune, cache, train, evaluate, pipeline) import their config from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgekit.arch import DEFAULT_CONTEXT
from edgekit.quantize.fakequant import TARGETS as QAT_TARGETS

LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl")  # the divergences edgekit.distill.losses computes

DEFAULT_EVAL_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain what a battery does in one sentence.",
]


class DataConfig(BaseModel):
    """The data stage's settings (``distill.data`` in a recipe)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[Path] = []  # user data; when empty, prompts are synthesised from the teacher
    synthetic_prompts: int = Field(256, ge=1)
    samples_per_prompt: int = Field(1, ge=1)  # > 1: rejection sampling keeps the best sample
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.7, ge=0)  # 0: greedy
    top_p: float = Field(0.9, gt=0, le=1)
    chain_of_thought: bool = False
    heldout_fraction: float = Field(0.1, ge=0, lt=1)
    max_seq_len: int = Field(512, ge=2)
    seed: int = 0
    batch_size: int = Field(16, ge=1)  # sequences in flight (llama.cpp slots, or one PyTorch generate batch)
    generate_responses: bool = True
    backend: Literal["auto", "llama.cpp", "pytorch"] = Field(
        "auto", description="what runs the teacher for prompts and answers: llama.cpp (continuous batching over "
                            "the teacher's own GGUF; several times PyTorch's tokens/s on a CPU), pytorch (the HF "
                            "folder; the GPU when there is one), or auto: llama.cpp when the teacher came from a "
                            "GGUF and no GPU is present, else pytorch")


class CacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["topk", "sampled"] = "topk"
    k: int = Field(32, ge=1, le=4096, description="logits kept per position (topk) or tokens drawn (sampled)")
    temperature: float = Field(1.0, gt=0, description="sampled mode draws from the teacher at this temperature")
    sequences_per_shard: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    seed: int = 0


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss: Literal[LOSSES] = "forward_kl"  # type: ignore[valid-type]
    temperature: float = Field(1.0, gt=0)
    kd_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0)
    feature_weight: float = Field(0.0, ge=0)
    beta: float = Field(0.5, ge=0, le=1, description="JSD mixing weight")
    skew: float = Field(0.1, ge=0, le=1, description="skew KL mixing weight")
    steps: int | None = Field(200, ge=1)
    time_budget_s: float | None = Field(None, gt=0, description="train for this much wall-clock time instead")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    on_policy_fraction: float = Field(0.0, ge=0, le=1, description="share of batches the student writes (GKD)")
    on_policy_max_new_tokens: int = Field(64, ge=1)
    assistant_fraction: float = Field(0.0, ge=0, le=1, description="share of training against the assistant")

    @model_validator(mode="after")
    def _length(self):
        if self.steps is None and self.time_budget_s is None:
            raise ValueError("set steps or time_budget_s")
        return self


class QatConfig(BaseModel):
    """Quantization-aware distillation: a last phase that trains the student through its export's quantizer.

    After the normal training, the trained student keeps learning from the teacher's logits (the same
    cache) with every weight the target export quantizes passed through that export's exact grid
    (:mod:`edgekit.quantize.fakequant`), so the exported int4 model is the model that was trained.
    """

    model_config = ConfigDict(extra="forbid")

    target: Literal[tuple(QAT_TARGETS)] = Field(  # type: ignore[valid-type]
        description="the export whose quantizer training goes through: <format>-<quant>, e.g. gguf-q4_0")
    steps: int | None = Field(100, ge=1)
    time_budget_s: float | None = Field(None, gt=0, description="train for this much wall-clock time instead")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (lower than training's: the student is trained)")
    warmup_steps: int = Field(5, ge=0)

    @model_validator(mode="after")
    def _length(self):
        if self.time_budget_s is not None and "steps" not in self.model_fields_set:
            self.steps = None  # a time budget replaces the default step count
        if self.steps is None and self.time_budget_s is None:
            raise ValueError("set steps or time_budget_s")
        return self

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """The training settings of the QAT phase: ``base`` (the student's own run) with this phase's length."""
        return base.model_copy(update={"steps": self.steps, "time_budget_s": self.time_budget_s, "lr": self.lr,
                                       "warmup_steps": self.warmup_steps})


class StudentSpec(BaseModel):
    """Either a device to plan for, or an explicit shape; ``init`` picks pruning or random weights."""

    model_config = ConfigDict(extra="forbid")

    device: str | None = Field("pi-zero-2w", description="plan the student for this device; dropped when an "
                                                         "explicit shape is given instead")
    format: str = "gguf"
    quant: str = "q4_k_m"
    context: int = Field(DEFAULT_CONTEXT, ge=16)
    target_decode_tok_s: float | None = None
    layers: int | None = Field(None, ge=1)
    hidden_size: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    kv_heads: int | None = Field(None, ge=1)
    init: Literal["minitron", "random"] = "minitron"
    reconstruct: bool = Field(True, description="after minitron pruning, refit each layer's attention output to the "
                                                "heads it keeps and rescale the norms for the hidden channels it "
                                                "drops, by least squares on the calibration text (a closer start)")
    family: str | None = Field(None, description="the student's model family; default the teacher's. Pairs that "
                                                 "work: edgekit.arch.CROSS_FAMILY (e.g. a llama student from a "
                                                 "qwen2 teacher)")

    @model_validator(mode="after")
    def _one_way(self):
        explicit = [self.layers, self.hidden_size, self.intermediate_size, self.heads, self.kv_heads]
        if "device" not in self.model_fields_set and any(v is not None for v in explicit):
            self.device = None  # an explicit shape replaces the default device
        if self.device and any(v is not None for v in explicit):
            raise ValueError("give either device (the planner sizes the student) or an explicit shape, not both")
        if not self.device and any(v is None for v in explicit):
            raise ValueError("an explicit student needs layers, hidden_size, intermediate_size, heads and kv_heads "
                             "(or set device to let the planner choose)")
        return self


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_EVAL_PROMPTS))
    max_new_tokens: int = Field(48, ge=1)
    max_sequences: int = Field(200, ge=1)
    baselines: list[Literal["ce", "teacher"]] = ["teacher"]


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: str = "default"
    student: StudentSpec = Field(default_factory=StudentSpec)
    data: DataConfig = Field(default_factory=DataConfig)
    calibration_sequences: int = Field(64, ge=1, description="training sequences used to rank units for pruning")
    cache: CacheConfig | None = Field(default_factory=CacheConfig, description="null: teacher online")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    qat: QatConfig | None = Field(None, description="null: no quantization-aware phase; the exports quantize the "
                                                    "float student after training (post-training quantization)")
    progressive: StudentSpec | None = Field(
        None, description="an intermediate model (teacher assistant): distilled from the teacher first, then the "
                          "student learns from it for train.assistant_fraction of its run (default half) and from "
                          "the teacher, online, for the rest")

"""Typed configuration of a training run: model, data stream, optimizer, schedule, EMA, checkpoints, logs.

Frozen dataclasses, one comment per field. A preset is a YAML file whose top-level keys are the
fields of :class:`TrainConfig`; ``data`` is a :class:`training.data_config.StreamConfig`::

    config = TrainConfig.from_yaml("configs/train/tiny.yaml", overrides=["optim.lr=1e-4"])

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the field
(``train.gradient_accumulation_steps must be >= 1, got 0``). An override is ``dotted.key=value`` with
the value parsed as YAML (``ema.enabled=false``, ``data.batch_size=4``, ``validation.every_steps=null``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data_config import ConfigError, StreamConfig, build_config

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "EMAConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainingConfig",
    "ValidationConfig",
    "ValidationLayout",
    "apply_overrides",
    "load_train_config",
]


@dataclass(frozen=True)
class ModelConfig:
    """Which SDXL to start from; only the adapter (and optional LoRA) trains."""

    base: str = "tiny"  # "tiny" (random tiny SDXL, offline) or a hub id / local folder in diffusers layout
    revision: str | None = None  # hub revision of ``base``
    vae: str | None = None  # a separate VAE (hub id / folder), e.g. madebyollin/sdxl-vae-fp16-fix
    vae_fp32: bool = (
        False  # keep the VAE in fp32 (the stock SDXL VAE overflows in fp16; the fp16-fix does not)
    )
    adapter: str | None = None  # start from these adapter weights (safetensors) instead of zero-init
    lora_rank: int = 0  # > 0: also train a LoRA of this rank on the base UNet's attention projections (peft)
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~30% slower
    attention_weight_scale: float = 1.0  # scale of the per-token region bias (docs/METHOD.md §3.4)
    region_cache_size: int = 4096  # region-text encodings kept in the LRU cache per process
    tiny_seed: int = 0  # seed of the random tiny models (the same on every rank)

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"model.lora_rank must be >= 0, got {self.lora_rank}")
        if self.region_cache_size < 0:
            raise ConfigError(f"model.region_cache_size must be >= 0, got {self.region_cache_size}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (a pure function of the step: nothing to checkpoint)."""

    lr: float = 1e-5  # peak learning rate
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    adam_8bit: bool = False  # bitsandbytes' 8-bit AdamW (as the release; runs on CPU too); needs bitsandbytes
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimizer steps
    schedule: Literal["constant", "cosine"] = (
        "constant"  # after warm-up; cosine decays to min_lr at max_steps
    )
    min_lr: float = 0.0  # floor of the cosine schedule
    max_grad_norm: float | None = (
        1.0  # clip the global gradient norm to this on every optimizer step; null: off
    )

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"optim.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")


@dataclass(frozen=True)
class TrainingConfig:
    """The loop: length, precision, accumulation, conditioning dropout, distribution."""

    max_steps: int = 1000  # optimizer steps (each = gradient_accumulation_steps micro-batches per rank)
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"  # frozen weights in this dtype; trained ones fp32
    caption_dropout: float = 0.1  # per sample: the caption becomes "" (encoded as inference encodes "")
    layout_dropout: float = 0.1  # per sample, independently: the layout becomes the empty layout
    distributed: Literal["ddp", "fsdp"] = (
        "ddp"  # DDP replicates the UNet; FSDP (torch's FSDP1) shards it, frozen weights and optimizer state
    )
    find_unused_parameters: bool = False  # DDP: needed only if some adapter parameter gets no gradient
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs
    noise_seed_offset: int = 0  # changes the noise / timestep / dropout draws without changing data order

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(
                f"train.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}"
            )
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(
                f"train.mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}"
            )
        for name in ("caption_dropout", "layout_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"train.distributed must be 'ddp' or 'fsdp', got {self.distributed!r}")


@dataclass(frozen=True)
class EMAConfig:
    """EMA of the trainable parameters (diffusers' EMAModel); used for validation, saved beside the raw weights."""

    enabled: bool = True
    decay: float = 0.99  # constant decay once updates start (the paper); see ``warmup``
    update_after_step: int = 100  # before this optimizer step the EMA just copies the weights
    warmup: bool = False  # diffusers' (1 + n) / (10 + n) ramp up to ``decay`` instead of a constant decay

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"ema.decay must be in [0, 1), got {self.decay}")
        if self.update_after_step < 0:
            raise ConfigError(f"ema.update_after_step must be >= 0, got {self.update_after_step}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Resumable checkpoints (accelerate state + stream state + step + adapter weights raw and EMA)."""

    every_steps: int | None = 1000  # save every N optimizer steps (and at the end); null: only at the end
    keep_last: int | None = 3  # delete older checkpoints beyond this many; null: keep all
    resume: str | None = None  # "latest" (in output_dir, if any), a checkpoint folder, or null: start fresh

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ConfigError(f"checkpoint.every_steps must be >= 1 or null, got {self.every_steps}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1 or null, got {self.keep_last}")


@dataclass(frozen=True)
class LogConfig:
    """Scalars to TensorBoard (and W&B) from the main rank."""

    every_steps: int = 10  # log scalars every N optimizer steps
    tensorboard: bool = True
    wandb: bool = False  # needs the wandb package; the run is named after output_dir
    project: str = "richlayout"  # TensorBoard run folder name / W&B project

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ConfigError(f"log.every_steps must be >= 1, got {self.every_steps}")


@dataclass(frozen=True)
class ValidationLayout:
    """One validation prompt: a caption and a layout (boxes in pixels of the validation image)."""

    caption: str
    boxes: tuple[tuple[float, float, float, float], ...]  # xyxy pixels
    labels: tuple[str, ...]  # one description per box

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.labels):
            raise ConfigError(
                f"validation.layouts: {len(self.boxes)} boxes but {len(self.labels)} labels for {self.caption!r}"
            )
        for b in self.boxes:
            if len(b) != 4 or not (b[2] > b[0] and b[3] > b[1]):
                raise ConfigError(
                    f"validation.layouts: box {list(b)} must be [x1, y1, x2, y2] with x2 > x1, y2 > y1"
                )


@dataclass(frozen=True)
class ValidationConfig:
    """Images generated with the EMA weights every N steps, saved with their layouts drawn."""

    every_steps: int | None = 500  # null: never (also skipped at the end)
    layouts: tuple[ValidationLayout, ...] = ()  # empty: the first samples of the training stream
    num_images: int = 2  # how many stream samples when ``layouts`` is empty
    height: int = 512
    width: int = 512
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ConfigError(f"validation.every_steps must be >= 1 or null, got {self.every_steps}")
        if self.height % 8 or self.width % 8 or self.height <= 0 or self.width <= 0:
            raise ConfigError(
                f"validation.height/width must be positive multiples of 8, got {self.height}x{self.width}"
            )
        if self.num_inference_steps < 1:
            raise ConfigError(f"validation.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        for layout in self.layouts:
            for b in layout.boxes:
                if b[0] < 0 or b[1] < 0 or b[2] > self.width or b[3] > self.height:
                    raise ConfigError(
                        f"validation.layouts: box {list(b)} lies outside the {self.width}x{self.height} image"
                    )


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run."""

    data: StreamConfig  # the training stream (training/data_config.py)
    output_dir: str = "runs/train"  # checkpoints/, adapter/, validation/ and logs/ go here
    seed: int = 0  # model init (tiny), noise, timesteps, dropout; the stream has its own data.seed
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from plain dicts/lists (a parsed YAML file); bad keys or values raise ConfigError."""
        return build_config(cls, d, "")

    @classmethod
    def from_yaml(cls, path: str, overrides: Mapping[str, Any] | Sequence[str] = ()) -> TrainConfig:
        """Read a YAML preset and apply overrides (see ``apply_overrides``)."""
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        try:
            return cls.from_dict(apply_overrides(d, overrides))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists, the inverse of ``from_dict``."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def apply_overrides(d: dict[str, Any], overrides: Mapping[str, Any] | Sequence[str]) -> dict[str, Any]:
    """A copy of ``d`` with each override set: ``{"a.b": value}``, or ``["a.b=value"]`` (value parsed as YAML)."""
    d = json.loads(json.dumps(d))
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} must look like key.subkey=value")
            items.append((key, yaml.safe_load(raw)))
    for key, value in items:
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node[leaf] = value
    return d


def load_train_config(path: str | Path, overrides: Mapping[str, Any] | Sequence[str] = ()) -> TrainConfig:
    """A YAML preset with overrides, e.g. ``load_train_config("configs/train/tiny.yaml", {"train.max_steps": 4})``."""
    return TrainConfig.from_yaml(str(path), overrides)

"""Typed configuration of a training run: model, data stream, optimizer, schedule, EMA, checkpoints, logs.

Frozen dataclasses, one comment per field. A preset is a YAML file whose top-level keys are the
fields of :class:`TrainConfig`; ``data`` is a :class:`training.data.config.StreamConfig`::

    config = TrainConfig.from_yaml("configs/train/tiny.yaml", overrides=["optim.lr=1e-4"])

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the file (or the
override) and the field (``configs/train/tiny.yaml: train.max_steps: must be >= 1 (got 0)``). An override
is ``dotted.key=value`` with the value parsed as YAML (``ema.enabled=false``, ``validation.every_steps=null``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from shards.config import (
    ConfigError,
    Float,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitFloat,
    build,
    load,
)
from training.data.config import StreamConfig
from training.model.config import ModelConfig

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "EMAConfig",
    "FSDPConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainingConfig",
    "ValidationConfig",
    "ValidationLayout",
    "load_train_config",
]

Decay = Annotated[Float, Field(ge=0, lt=1)]  # Adam betas, EMA decay: 1 would never forget


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (a pure function of the step: nothing to checkpoint)."""

    lr: PositiveFloat = 1e-5  # peak learning rate
    weight_decay: NonNegativeFloat = 1e-5
    betas: tuple[Decay, Decay] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    adam_8bit: bool = False  # bitsandbytes' 8-bit AdamW (as the release; runs on CPU too); needs bitsandbytes
    warmup_steps: NonNegativeInt = 0  # linear warm-up from 0 over this many optimizer steps
    schedule: Literal["constant", "cosine"] = (
        "constant"  # after warm-up; cosine decays to min_lr at max_steps
    )
    min_lr: NonNegativeFloat = 0.0  # floor of the cosine schedule
    max_grad_norm: PositiveFloat | None = (
        1.0  # clip the global gradient norm to this on every optimizer step; null: off
    )

    def __post_init__(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")


@dataclass(frozen=True)
class FSDPConfig:
    """FSDP2's precision (``train.distributed: fsdp``; training/trainer/fsdp.py): gathered and reduced dtypes."""

    param_dtype: Literal["auto", "fp32", "bf16"] = (
        "auto"  # the gathered weights' compute dtype and the frozen shards' storage; auto: train.mixed_precision's
    )
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # the dtype trainable gradients are reduce-scattered in


@dataclass(frozen=True)
class TrainingConfig:
    """The loop: length, precision, accumulation, conditioning dropout, distribution."""

    max_steps: PositiveInt = 1000  # optimizer steps (each = gradient_accumulation_steps micro-batches per rank)
    gradient_accumulation_steps: PositiveInt = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"  # frozen weights in this dtype; trained ones fp32
    caption_dropout: UnitFloat = 0.1  # per sample: the caption becomes "" (encoded as inference encodes "")
    layout_dropout: UnitFloat = 0.1  # per sample, independently: the layout becomes the empty layout
    distributed: Literal["ddp", "fsdp"] = (
        "ddp"  # DDP replicates the UNet; FSDP (torch's FSDP2) shards it, frozen weights and optimizer state
    )
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)  # used with distributed: fsdp only
    # DDP: off, every adapter weight has a gradient in every backward (the model's zero path, TRAINING.md);
    # on, DDP walks the autograd graph after each forward (measured no cheaper, 4% dearer on a dropped batch)
    find_unused_parameters: bool = False
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs
    noise_seed_offset: NonNegativeInt = 0  # changes the noise / timestep / dropout draws without changing data order


@dataclass(frozen=True)
class EMAConfig:
    """EMA of the trainable parameters (diffusers' EMAModel); used for validation, saved beside the raw weights."""

    enabled: bool = True
    decay: Decay = 0.99  # constant decay once updates start (the paper); see ``warmup``
    update_after_step: NonNegativeInt = 100  # before this optimizer step the EMA just copies the weights
    warmup: bool = False  # diffusers' (1 + n) / (10 + n) ramp up to ``decay`` instead of a constant decay


@dataclass(frozen=True)
class CheckpointConfig:
    """Resumable checkpoints (accelerate state + stream state + step + adapter weights raw and EMA)."""

    every_steps: PositiveInt | None = 1000  # save every N optimizer steps (and at the end); null: only at the end
    keep_last: PositiveInt | None = 3  # delete older checkpoints beyond this many; null: keep all
    resume: str | None = None  # "latest" (in output_dir, if any), a checkpoint folder, or null: start fresh


@dataclass(frozen=True)
class LogConfig:
    """Scalars to TensorBoard (and W&B) from the main rank."""

    every_steps: PositiveInt = 10  # log scalars every N optimizer steps
    tensorboard: bool = True
    wandb: bool = False  # needs the wandb package; the run is named after output_dir
    project: str = "richlayout"  # TensorBoard run folder name / W&B project


@dataclass(frozen=True)
class ValidationLayout:
    """One validation prompt: a caption and a layout (boxes in pixels of the validation image)."""

    caption: str
    boxes: tuple[tuple[NonNegativeFloat, NonNegativeFloat, NonNegativeFloat, NonNegativeFloat], ...]  # xyxy pixels
    labels: tuple[str, ...]  # one description per box

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.labels):
            raise ConfigError(f"{len(self.boxes)} boxes but {len(self.labels)} labels for {self.caption!r}")
        for b in self.boxes:
            if not (b[2] > b[0] and b[3] > b[1]):
                raise ConfigError(f"box {list(b)} must be [x1, y1, x2, y2] with x2 > x1, y2 > y1")


@dataclass(frozen=True)
class ValidationConfig:
    """Images generated with the EMA weights every N steps, saved with their layouts drawn."""

    every_steps: PositiveInt | None = 500  # null: never (also skipped at the end)
    layouts: tuple[ValidationLayout, ...] = ()  # empty: the first samples of the training stream
    num_images: PositiveInt = 2  # how many stream samples when ``layouts`` is empty
    height: PositiveInt = 512
    width: PositiveInt = 512
    num_inference_steps: PositiveInt = 30
    guidance_scale: NonNegativeFloat = 5.0
    scheduler: Literal["base", "ddim"] = "base"  # base: the base model's own scheduler; ddim: DDIM (the release's validation)
    seed: NonNegativeInt = 0

    def __post_init__(self) -> None:
        if self.height % 8 or self.width % 8:
            raise ConfigError(f"height/width must be multiples of 8, got {self.height}x{self.width}")
        for i, layout in enumerate(self.layouts):
            for b in layout.boxes:
                if b[2] > self.width or b[3] > self.height:
                    raise ConfigError(
                        f"layouts[{i}]: box {list(b)} lies outside the {self.width}x{self.height} image"
                    )


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run."""

    data: StreamConfig  # the training stream (training/data/config.py)
    output_dir: str = "runs/train"  # checkpoints/, adapter/, validation/ and logs/ go here
    seed: NonNegativeInt = 0  # model init (tiny), noise, timesteps, dropout; the stream has its own data.seed
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        # accelerate's save_state/load_state and the checkpoint manifest work on local files; a URI would
        # become a local folder named "s3:" on each node. Shards stream from URIs, checkpoints do not.
        for name, value in (("output_dir", self.output_dir), ("checkpoint.resume", self.checkpoint.resume)):
            if value and "://" in value:
                raise ConfigError(f"{name} {value!r} must be a local path (a node-local or mounted shared folder, "
                                  "not an fsspec URI); copy the finished run to object storage afterwards")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from plain dicts/lists (a parsed YAML file); bad keys or values raise ConfigError."""
        return build(cls, d)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | Sequence[str] = ()) -> TrainConfig:
        """Read a YAML preset and apply overrides (``["optim.lr=1e-4"]`` or ``{"optim.lr": 1e-4}``)."""
        return load(cls, path, overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists, the inverse of ``from_dict``."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def load_train_config(path: str | Path, overrides: Mapping[str, Any] | Sequence[str] = ()) -> TrainConfig:
    """A YAML preset with overrides, e.g. ``load_train_config("configs/train/tiny.yaml", {"train.max_steps": 4})``."""
    return TrainConfig.from_yaml(str(path), overrides)

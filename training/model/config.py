"""Which base model a run starts from and how its regional adapter is built: one config for the trainer,
``init_unet`` and the tiny builders (the model side must not import the trainer's config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field

from shards.config import Float, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt


@dataclass(frozen=True)
class MMDiTConfig:
    """The MM-DiT backbones' adapter and flow-matching recipe (docs/METHOD.md §10); UNet bases ignore it."""

    blocks: Literal["all", "joint", "every_other"] = "all"  # fusers on every block, the double-stream/joint ones, or every other
    heads: PositiveInt | None = None  # fuser heads of the host's head size; null: half the host's heads
    region_encoder: Literal["t5", "clip"] = "t5"  # region texts through the backbone's T5, or its CLIP(s) at 77 tokens
    region_tokens: PositiveInt = 128  # T5 tokens per region text (p95 of joined region texts: docs/METHOD.md §10.3)
    max_sequence_length: PositiveInt = 256  # T5 tokens of the caption (SD3's pipeline default; FLUX-dev's is 512)
    guidance: NonNegativeFloat = 3.5  # FLUX-dev's distilled guidance input, held at this value in training
    logit_mean: Annotated[Float, Field(ge=-5, le=5)] = 0.0  # timestep density: sigmoid(N(mean, std)) (SD3's, FLUX's)
    logit_std: Annotated[PositiveFloat, Field(le=5)] = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to start from; only the adapter (and optional LoRA) trains."""

    base: str = "tiny"  # "tiny" / "tiny-sd15" / "tiny-sd3" / "tiny-flux" (random tiny SDXL / SD1.5 / SD3.5 / FLUX.1, offline) or a hub id / local folder in diffusers layout; the backbone is read from its UNet config or model_index.json
    revision: str | None = None  # hub revision of ``base``
    vae: str | None = None  # a separate VAE (hub id / folder), e.g. madebyollin/sdxl-vae-fp16-fix
    vae_fp32: bool = (
        False  # keep the VAE in fp32 (the stock SDXL VAE overflows in fp16; the fp16-fix does not)
    )
    adapter: str | None = None  # start from these adapter weights (safetensors) instead of zero-init
    model_type: Literal["ca", "casa"] = "ca"  # fuser: regional cross-attention, or then regional self-attention too (training/model/casa.py)
    lora_rank: NonNegativeInt = 0  # > 0: also train a LoRA of this rank on the base UNet's attention projections (peft)
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~30% slower
    attention_weight_scale: NonNegativeFloat = 1.0  # scale of the per-token region bias (docs/METHOD.md §3.4)
    region_cache_size: NonNegativeInt = 4096  # region-text encodings kept in the LRU cache per process
    tiny_seed: NonNegativeInt = 0  # seed of the random tiny models (the same on every rank)
    mmdit: MMDiTConfig = field(default_factory=MMDiTConfig)  # SD3 / FLUX.1 bases only

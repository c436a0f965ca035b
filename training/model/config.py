"""Which base model a run starts from and how its regional adapter is built: one config for the trainer,
``init_unet`` and the tiny builders (the model side must not import the trainer's config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shards.config import NonNegativeFloat, NonNegativeInt


@dataclass(frozen=True)
class ModelConfig:
    """Which SDXL to start from; only the adapter (and optional LoRA) trains."""

    base: str = "tiny"  # "tiny" / "tiny-sd15" (random tiny SDXL / SD1.5, offline) or a hub id / local folder in diffusers layout; the backbone is read from its UNet config
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

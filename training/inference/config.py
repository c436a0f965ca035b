"""The ``generate`` section of a ``configs/eval`` preset: what to load and how to sample.

Checked when built (``shards.config``): ranges of every number, the image size, the device's spelling and a
refiner that would run no step, so a mistake is one error line before any model loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from shards.config import ConfigError, Float, NonNegativeFloat, NonNegativeInt, PositiveInt, UnitFloat
from training.layout.dataset import Fit
from training.layout.files import validate_size

__all__ = ["GenerateConfig"]

# torch.device spellings a config may give; anything else (a typo) is refused before torch imports.
_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


@dataclass(frozen=True)
class GenerateConfig:
    """What to load and how to sample (the ``generate`` section of a ``configs/eval`` preset)."""

    base: str = "hotshotco/SDXL-512"  # SDXL or SD1.5 hub id / diffusers folder (backbone from its UNet); "tiny" / "tiny-sd15": random, offline
    vae: str | None = None  # another VAE (hub id / folder), e.g. madebyollin/sdxl-vae-fp16-fix
    adapter: str | None = None  # adapter safetensors (ours) or the release's checkpoint; None: zero-init
    ema: str | None = None  # EMA adapter weights, loaded over ``adapter``
    lora: str | None = (
        None  # the trainer's LoRA file (lora.safetensors / lora_ema.safetensors), if it trained one
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    device: str = "auto"  # "auto": cuda when available, else cpu
    tiny_seed: NonNegativeInt = 0  # seed of the random tiny models (base: tiny)
    height: PositiveInt = 512  # output size when a layout line does not set it
    width: PositiveInt = 512
    num_inference_steps: PositiveInt = 50
    guidance_scale: NonNegativeFloat = 5.0
    # an SD1.5 base's guidance when set (the release: 7.5 for SD1.5, 4.5 for SDXL); None: guidance_scale
    sd15_guidance_scale: NonNegativeFloat | None = None
    scheduler: Literal["base", "ddim"] = "base"  # base: the base model's scheduler; ddim: DDIM (the release's SD1.5 sampling)
    scheduled_sampling_beta: UnitFloat = 1.0  # layout active for the first ceil(beta * steps) steps
    attention_weight_scale: NonNegativeFloat = 1.0  # scale of the per-token region bias
    # "": encoded, as training encodes a dropped caption; None (unset): the base pipeline's own (SDXL: zero
    # embeddings, what the release's pipeline does without a negative prompt)
    negative_prompt: str | None = ""
    seed: NonNegativeInt = 0  # image i uses seed + i unless its line sets "seed"
    max_objects: PositiveInt = 30  # more objects in a layout is an error
    max_slots: PositiveInt = 30  # region slots (the model's)
    # Box-to-latent-cell rule: "cover" (default) or "release", the release's rule its weights were trained
    # with (box ends rounded down, last latent row/column never in a box): bit-exact reproduction of its images (docs/METHOD.md §9).
    rasterize: Literal["cover", "release"] = "cover"
    lenient: bool = False  # the release's leniency: keep the first max_objects, clamp boxes, list prompts
    # --from-shards: how a sample's image maps to the generated one (training.layout.dataset): aspect kept,
    # or center_crop to max(height, width) square (the release's LAION evaluation dataset)
    dataset_fit: Fit = "aspect"
    refiner: str | None = None  # SDXL img2img refiner (hub id / folder, "tiny") run on each image; None: off
    refiner_strength: Annotated[Float, Field(gt=0, le=1)] = 0.3  # img2img strength of the refiner (the release: 0.3)
    refiner_steps: PositiveInt = 20  # refiner steps before strength (the release: 20)

    def __post_init__(self) -> None:
        validate_size(self.height, self.width)
        if not _DEVICE.match(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N, mps or xpu[:N], got {self.device!r}")
        # diffusers' img2img runs int(steps * strength) steps; 0 fails deep inside it with an IndexError.
        if self.refiner is not None and int(self.refiner_steps * self.refiner_strength) < 1:
            raise ConfigError(
                f"refiner_steps {self.refiner_steps} x refiner_strength {self.refiner_strength} leaves no "
                "refiner step (diffusers runs int(steps * strength)): raise either, or set refiner: null"
            )

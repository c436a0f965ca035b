"""One training step's inputs and loss: per-sample draws, UNet inputs from a batch, epsilon MSE.

Every random choice of a sample (noise, VAE latent noise, timestep, caption and layout dropout) comes from
a generator keyed by the run's seed and the sample's place in the stream's global order, its (epoch,
position) (the batch's ``stream_position``), so a resumed run, the same samples grouped into other
micro-batches, or delivered by another number of ranks or another batch size, draws the same (docs/METHOD.md
§6). That place is one delivery: a sample the stream repeats (``repeat/even_out``, at the positions past an
epoch's last sample) or delivers again in a later epoch sits at another position or epoch and draws anew; a
substitute for an unusable sample takes its slot's position (one delivery, one draw). Captions are encoded by the stock
pipeline's ``encode_prompt``; SDXL adds its pooled embedding and size ids, SD1.5 has neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from training.data.collate import normalize_pixels
from training.data.stream import derive_seed
from training.model.encoding import RegionTextEncoder, grounding_inputs_from_batch
from training.trainer.config import TrainConfig

__all__ = [
    "Frozen",
    "SampleDraws",
    "diffusion_loss",
    "sample_draws",
    "sample_seeds",
    "time_ids",
    "unet_inputs",
]

_NOISE = 7  # purpose tag mixed into the per-sample seeds (the stream uses 0..4)


@dataclass
class SampleDraws:
    """Per-sample random draws of one micro-batch."""

    noise: torch.Tensor  # (B, C, h, w) diffusion noise
    latent_noise: torch.Tensor  # (B, C, h, w) for sampling the VAE's latent distribution
    timesteps: torch.Tensor  # (B,) int64, uniform over the training timesteps
    drop_caption: list[bool]
    drop_layout: list[bool]


def sample_seeds(config: TrainConfig, stream_position: torch.Tensor | Sequence[Sequence[int]]) -> list[int]:
    """Seeds of the samples at ``stream_position``, (epoch, position) per sample (a batch's (B, 2) tensor).

    Keyed by the place in the global order only, not by the rank, world size or batch size that delivers it.
    """
    pairs = stream_position.tolist() if isinstance(stream_position, torch.Tensor) else stream_position
    offset = config.train.noise_seed_offset
    return [derive_seed(config.seed, _NOISE, offset, int(epoch), int(position)) for epoch, position in pairs]


def sample_draws(
    seeds: list[int], latent_shape: tuple[int, int, int], config: TrainConfig, n_timesteps: int
) -> SampleDraws:
    """Draw noise, timestep and dropout for each sample from its own seed (resume- and batching-invariant)."""
    noise, latent_noise, timesteps, drop_caption, drop_layout = [], [], [], [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        noise.append(torch.randn(latent_shape, generator=g))
        latent_noise.append(torch.randn(latent_shape, generator=g))
        timesteps.append(int(torch.randint(0, n_timesteps, (1,), generator=g)))
        u = torch.rand(2, generator=g).tolist()
        drop_caption.append(u[0] < config.train.caption_dropout)
        drop_layout.append(u[1] < config.train.layout_dropout)
    return SampleDraws(
        torch.stack(noise), torch.stack(latent_noise), torch.tensor(timesteps), drop_caption, drop_layout
    )


def time_ids(batch: dict) -> torch.Tensor:
    """SDXL's micro-conditioning per sample: original (h, w), crop (top, left), target (h, w)."""
    return torch.cat([batch["original_size"], batch["crops_coords_top_left"], batch["target_size"]], dim=1)


@dataclass
class Frozen:
    """The frozen parts a training step needs besides the UNet."""

    pipe: (
        StableDiffusionXLPipeline | StableDiffusionPipeline
    )  # encode_prompt: captions encoded as inference does
    region_encoder: RegionTextEncoder
    noise_scheduler: DDPMScheduler
    weight_dtype: torch.dtype
    attention_weight_scale: float

    @property
    def sdxl(self) -> bool:
        """Whether the base is SDXL (pooled text embedding and size ids as added conditions)."""
        return isinstance(self.pipe, StableDiffusionXLPipeline)


@torch.no_grad()
def unet_inputs(batch: dict, draws: SampleDraws, frozen: Frozen, device: torch.device) -> dict[str, Any]:
    """Everything the UNet call needs for one micro-batch, and the target noise."""
    vae = frozen.pipe.vae
    pixels = (
        batch["pixel_values"] if "pixel_values" in batch else normalize_pixels(batch["pixels"].to(device))
    )
    dist = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist
    latents = dist.mean + dist.std * draws.latent_noise.to(device=device, dtype=dist.mean.dtype)
    latents = (latents * vae.config.scaling_factor).float()

    captions = ["" if drop else c for c, drop in zip(batch["caption"], draws.drop_caption, strict=True)]
    encoded = frozen.pipe.encode_prompt(
        captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    prompt_embeds = encoded[0]
    encode = {
        "attention_weight_scale": frozen.attention_weight_scale,
        "device": device,
        "dtype": frozen.weight_dtype,
    }
    # A dropped layout is the empty layout (what inference feeds CFG's negative branch), built per sample.
    gligen = grounding_inputs_from_batch(
        batch, frozen.region_encoder, drop_layout=draws.drop_layout, **encode
    )
    noise = draws.noise.to(device)
    timesteps = draws.timesteps.to(device)
    noisy = frozen.noise_scheduler.add_noise(latents, noise, timesteps)
    inputs = {
        "sample": noisy.to(frozen.weight_dtype),
        "timestep": timesteps,
        "encoder_hidden_states": prompt_embeds.to(frozen.weight_dtype),
        "cross_attention_kwargs": {"gligen": gligen},
        "target": noise,
    }
    if frozen.sdxl:  # SDXL's encode_prompt returns (embeds, negative, pooled, negative pooled)
        inputs["added_cond_kwargs"] = {
            "text_embeds": encoded[2].to(frozen.weight_dtype),
            "time_ids": time_ids(batch).to(device=device, dtype=frozen.weight_dtype),
        }
    return inputs


def diffusion_loss(unet: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Epsilon-prediction MSE (the scheduler is epsilon-parameterised, as SDXL's and SD1.5's)."""
    kwargs = {k: v for k, v in inputs.items() if k != "target"}
    pred = unet(**kwargs, return_dict=False)[0]
    return F.mse_loss(pred.float(), inputs["target"].float(), reduction="mean")

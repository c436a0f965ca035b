"""Flow-matching training of the regional adapter on an MM-DiT (SD3 / SD3.5, FLUX.1): set-up and one step.

The loop (``training/trainer/loop.py``) is the UNets': for an SD3 or FLUX.1 base it takes the adapter config,
the model and the step's three functions from here (``is_flow``); data, accumulation, EMA, checkpoints and
resume are shared. docs/METHOD.md §10.4 has the recipe:

- Latents: ``(vae(x) - shift_factor) * scaling_factor`` (16 channels); FLUX's are packed 2 x 2 into tokens.
- Per sample, from its own generator (resume- and batching-invariant as the UNet path): noise, the VAE's
  latent noise, ``u = sigmoid(N(logit_mean, logit_std))`` (diffusers' ``compute_density_for_timestep_sampling``,
  logit-normal), caption and layout dropout.
- SD3: ``sigma`` is the scheduler's shifted table (``shift`` 3) at ``u * 1000``, as diffusers' SD3 training
  script; the transformer's timestep is ``1000 sigma``. FLUX: the resolution-shifted schedule of its
  inference, ``sigma = time_shift(mu, 1, u)`` with ``mu = calculate_shift(image tokens)`` from the scheduler's
  ``base_shift`` 0.5 / ``max_shift`` 1.15 between 256 and 4096 tokens; the timestep is ``sigma``, and FLUX-dev's
  distilled ``guidance`` input is held at ``model.mmdit.guidance`` (3.5, the pipeline's default).
- ``x_t = (1 - sigma) x_0 + sigma noise``; the transformer predicts the velocity ``noise - x_0``; MSE (the
  logit-normal weighting of SD3's recipe is uniform in sigma).
- Captions through the stock pipeline's ``encode_prompt`` ("" when dropped); region texts through the cached
  region encoder on the token grid (``data.regions.downscale: 16``), the empty layout when dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling

from training.data.collate import normalize_pixels
from training.model.adapter import adapter_config_of, set_adapter_trainable
from training.model.config import MMDiTConfig, ModelConfig
from training.model.encoding import RegionTextEncoder, grounding_inputs_from_batch
from training.model.lora import add_lora
from training.model.mmdit.adapter import LAYOUT_KEY, attach_mmdit_adapter, load_mmdit_adapter
from training.model.mmdit.config import MMDiTAdapterConfig, mmdit_backbone_of_base
from training.model.mmdit.encoding import TOKEN_PX, image_ids, pack_latents, region_text_encoder
from training.trainer.config import ConfigError, TrainConfig
from training.trainer.model_setup import Model, weight_dtype_of
from training.trainer.step import SampleDraws

__all__ = [
    "FlowFrozen",
    "build_flow_model",
    "flow_adapter_config",
    "is_flow",
    "load_flow_components",
    "transformer_inputs",
]


def is_flow(config: TrainConfig) -> bool:
    """Whether ``model.base`` is an MM-DiT (trained with flow matching here); checks the data grid then."""
    if mmdit_backbone_of_base(config.model.base, revision=config.model.revision) is None:
        return False
    cell = config.data.regions.downscale
    if cell != TOKEN_PX:
        raise ConfigError(
            f"data.regions.downscale is {cell} but model.base {config.model.base} is an MM-DiT: its regions "
            f"live on the token grid, set data.regions.downscale: {TOKEN_PX}"
        )
    v = config.validation
    if v.height % TOKEN_PX or v.width % TOKEN_PX:
        raise ConfigError(f"validation height/width must be multiples of {TOKEN_PX}, got {v.height}x{v.width}")
    return True


def flow_adapter_config(cfg: ModelConfig, backbone: str | None = None) -> MMDiTAdapterConfig:
    """The adapter to build: ``model.model_type`` and ``model.mmdit``'s shape, or ``model.adapter``'s own; a
    file of another type or backbone is a ConfigError naming both (the metadata only is read). ``backbone``:
    the base's, when known without reading ``model.base`` (a transformer built here, not loaded)."""
    backbone = backbone or mmdit_backbone_of_base(cfg.base, revision=cfg.revision)
    m = cfg.mmdit
    wanted = MMDiTAdapterConfig(
        backbone=backbone,
        model_type=cfg.model_type,
        blocks=m.blocks,
        heads=m.heads,
        region_encoder=m.region_encoder,
        region_tokens=m.region_tokens,
    )
    if not cfg.adapter:
        return wanted
    try:
        made = adapter_config_of(cfg.adapter)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"model.adapter {cfg.adapter}: cannot be read ({e})") from None
    if made.backbone != backbone:
        raise ConfigError(
            f"model.adapter {cfg.adapter} is a {made.backbone or 'UNet'} adapter but model.base {cfg.base} is {backbone}"
        )
    if made.model_type != cfg.model_type:
        raise ConfigError(
            f"model.adapter {cfg.adapter} is a {made.model_type} adapter but model.model_type is "
            f"{cfg.model_type}: set model.model_type={made.model_type}"
        )
    return made


def load_flow_components(cfg: ModelConfig) -> dict[str, Any]:
    """The stock pipeline's parts: the tiny random ones, or the base's (``StableDiffusion3Pipeline`` /
    ``FluxPipeline`` from a hub id or folder)."""
    from training.model.mmdit.config import MMDIT_TINY_BASES

    if cfg.base in MMDIT_TINY_BASES:
        from training.model.mmdit.tiny import tiny_mmdit_components

        return tiny_mmdit_components(cfg.base, cfg.tiny_seed)
    from diffusers import AutoencoderKL, FluxPipeline, StableDiffusion3Pipeline

    backbone = mmdit_backbone_of_base(cfg.base, revision=cfg.revision)
    pipeline_class = StableDiffusion3Pipeline if backbone == "sd3" else FluxPipeline
    extra = {"vae": AutoencoderKL.from_pretrained(cfg.vae)} if cfg.vae else {}
    return pipeline_class.from_pretrained(cfg.base, revision=cfg.revision, **extra).components


@dataclass
class FlowFrozen:
    """The frozen parts of a flow-matching step and the recipe's constants."""

    pipe: Any  # StableDiffusion3Pipeline | FluxPipeline: encode_prompt, the VAE, the scheduler's config
    region_encoder: RegionTextEncoder
    backbone: str  # "sd3" | "flux"
    recipe: MMDiTConfig
    weight_dtype: torch.dtype
    attention_weight_scale: float

    @property
    def latent_channels(self) -> int:
        return self.pipe.vae.config.latent_channels

    def step_functions(self) -> tuple[Callable, Callable, Callable]:
        """``(sample_draws, unet_inputs, diffusion_loss)`` with the UNet step's signatures."""

        def draws(seeds, latent_shape, config, n_timesteps):  # the loop's shape has the transformer's channels
            return flow_draws(seeds, (self.latent_channels, *latent_shape[1:]), config, self)

        return draws, lambda batch, d, frozen, device: flow_inputs(batch, d, self, device), flow_loss

    def sigma_of(self, u: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """The noise level of a density draw ``u`` in (0, 1) for an image of ``n_tokens`` transformer tokens."""
        scheduler = self.pipe.scheduler
        c = scheduler.config
        if self.backbone == "flux":
            mu = calculate_shift(n_tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
            return scheduler.time_shift(mu, 1.0, u)
        # SD3: diffusers' SD3 script indexes the training scheduler's (shifted) table at u * num_train_timesteps.
        sigmas = _train_sigmas(c)
        return sigmas[(u * c.num_train_timesteps).long().clamp(max=len(sigmas) - 1)]


def _train_sigmas(config) -> torch.Tensor:
    """The scheduler's training sigmas (1 -> 1/1000, shifted by ``shift``), as its constructor computes them."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config).sigmas


def flow_draws(
    seeds: list[int], latent_shape: tuple[int, int, int], config: TrainConfig, frozen: FlowFrozen
) -> SampleDraws:
    """Noise, latent noise, noise level and dropouts per sample from its own seed (``timesteps`` holds sigmas)."""
    c, h, w = latent_shape
    n_tokens = (h // 2) * (w // 2)
    m = frozen.recipe
    noise, latent_noise, sigmas, drop_caption, drop_layout = [], [], [], [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        noise.append(torch.randn(latent_shape, generator=g))
        latent_noise.append(torch.randn(latent_shape, generator=g))
        u = compute_density_for_timestep_sampling(
            "logit_normal", 1, logit_mean=m.logit_mean, logit_std=m.logit_std, generator=g
        )
        sigmas.append(frozen.sigma_of(u, n_tokens))
        p = torch.rand(2, generator=g).tolist()
        drop_caption.append(p[0] < config.train.caption_dropout)
        drop_layout.append(p[1] < config.train.layout_dropout)
    return SampleDraws(torch.stack(noise), torch.stack(latent_noise), torch.cat(sigmas), drop_caption, drop_layout)


@torch.no_grad()
def flow_inputs(batch: dict, draws: SampleDraws, frozen: FlowFrozen, device: torch.device) -> dict[str, Any]:
    """The transformer's keywords for one micro-batch and the velocity target (``target``)."""
    pipe, dtype = frozen.pipe, frozen.weight_dtype
    vae = pipe.vae
    pixels = batch["pixel_values"] if "pixel_values" in batch else normalize_pixels(batch["pixels"].to(device))
    dist = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist
    latents = dist.mean + dist.std * draws.latent_noise.to(device=device, dtype=dist.mean.dtype)
    x0 = ((latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).float()

    captions = ["" if drop else c for c, drop in zip(batch["caption"], draws.drop_caption, strict=True)]
    gligen = grounding_inputs_from_batch(
        batch,
        frozen.region_encoder,
        drop_layout=draws.drop_layout,
        attention_weight_scale=frozen.attention_weight_scale,
        device=device,
        dtype=dtype,
    )
    length = frozen.recipe.max_sequence_length
    if frozen.backbone == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions, None, None, device=device, do_classifier_free_guidance=False, max_sequence_length=length
        )
        return transformer_inputs(frozen, x0, draws, embeds, pooled, None, gligen)
    embeds, pooled, text_ids = pipe.encode_prompt(captions, None, device=device, max_sequence_length=length)
    return transformer_inputs(frozen, x0, draws, embeds, pooled, text_ids, gligen)


def transformer_inputs(
    frozen: FlowFrozen,
    x0: torch.Tensor,
    draws: SampleDraws,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    text_ids: torch.Tensor | None,
    gligen: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Noise the clean latents ``x0`` at the drawn levels; the backbone's keywords with the encoded caption
    (``embeds``, ``pooled``; FLUX's ``text_ids``), the layout and the velocity ``target``."""
    dtype, device = frozen.weight_dtype, x0.device
    noise = draws.noise.to(device)
    sigma = draws.timesteps.to(device=device, dtype=torch.float32)
    noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    target = noise - x0
    common = {
        "encoder_hidden_states": embeds.to(dtype),
        "pooled_projections": pooled.to(dtype),
        "joint_attention_kwargs": {LAYOUT_KEY: gligen},
    }
    if frozen.backbone == "sd3":
        return {"hidden_states": noisy.to(dtype), "timestep": sigma * 1000, **common, "target": target}
    h, w = noisy.shape[-2] // 2, noisy.shape[-1] // 2
    guidance = None
    if frozen.pipe.transformer.config.guidance_embeds:  # FLUX-dev: distilled guidance, held (docs/METHOD.md §10.4)
        guidance = torch.full((len(noisy),), frozen.recipe.guidance, device=device)
    return {
        "hidden_states": pack_latents(noisy).to(dtype),
        "timestep": sigma,
        "guidance": guidance,
        **common,
        "txt_ids": text_ids,
        "img_ids": image_ids(h, w, device=device),
        "target": pack_latents(target),
    }


def flow_loss(transformer: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """MSE between the predicted and the true velocity ``noise - x0``."""
    kwargs = {k: v for k, v in inputs.items() if k != "target"}
    pred = transformer(**kwargs, return_dict=False)[0]
    return F.mse_loss(pred.float(), inputs["target"].float(), reduction="mean")


def build_flow_model(config: TrainConfig, device: torch.device) -> Model:
    """Load the parts, attach the adapter (and LoRA), freeze the rest and place everything on ``device``."""
    weight_dtype = weight_dtype_of(config)
    m = config.model
    adapter = flow_adapter_config(m)
    components = load_flow_components(m)
    encoder = region_text_encoder(
        components, adapter.backbone, adapter.region_encoder, adapter.region_tokens, cache_size=m.region_cache_size
    )
    transformer = components["transformer"]
    try:
        attach_mmdit_adapter(transformer, adapter, encoder.hidden_size)
        if m.adapter:
            load_mmdit_adapter(transformer, m.adapter)
    except ValueError as e:  # another backbone, keys or shapes that do not match: named in the message
        raise ConfigError(f"model.adapter: {e}") from None
    params = set_adapter_trainable(transformer)
    if m.lora_rank:
        try:
            params += add_lora(transformer, m.lora_rank)
        except ValueError as e:
            raise ConfigError(f"model.lora_rank: {e}") from None
    if m.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    place = {"device": device} if weight_dtype == torch.float32 else {"device": device, "dtype": weight_dtype}
    # FSDP2 stores the frozen shards in its own param dtype (training/trainer/fsdp.py): as the UNet's, the
    # transformer stays as loaded until it is sharded.
    transformer.to(**({"device": device} if config.train.distributed == "fsdp" else place))
    for p in params:
        p.data = p.data.float()  # fp32 master weights; autocast computes in weight_dtype
    transformer.train()
    vae_dtype = torch.float32 if m.vae_fp32 else weight_dtype
    components["vae"].requires_grad_(False).to(device=device, **({} if vae_dtype == torch.float32 else {"dtype": vae_dtype}))
    for name, part in components.items():
        if name.startswith("text_encoder") and part is not None:
            part.requires_grad_(False).to(**place)
    from training.inference.mmdit import mmdit_stock_pipeline

    pipe = mmdit_stock_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    frozen = FlowFrozen(pipe, encoder, adapter.backbone, m.mmdit, weight_dtype, m.attention_weight_scale)
    return Model(transformer, params, frozen, pipe.scheduler.config.num_train_timesteps)

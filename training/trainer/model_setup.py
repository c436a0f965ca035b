"""The trainer's model side: the base model's parts, what trains and in which dtype, the optimizer, the LR schedule, EMA.

The backbone is the base model's (``training.model.adapter.backbone_of_base``: its UNet config): SDXL loads the
``StableDiffusionXLPipeline``'s parts (two text encoders), SD1.5 the ``StableDiffusionPipeline``'s (one).
Only the adapter (``unet.position_net`` and a ``fuser`` per transformer block, ``model.model_type``) and the
optional LoRA train, in fp32 master weights; the VAE, the text encoders and the base UNet are frozen in
the compute dtype.
bitsandbytes (8-bit AdamW) and peft (LoRA) are imported only when their option is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError

from training.inference.pipeline import stock_pipeline, text_models
from training.model.adapter import (
    AdapterConfig,
    adapter_config_of,
    attach_regional_adapter,
    backbone_of_base,
    load_adapter,
    set_adapter_trainable,
)
from training.model.encoding import RegionTextEncoder
from training.model.lora import add_lora
from training.trainer.config import ConfigError, EMAConfig, ModelConfig, OptimConfig, TrainConfig
from training.trainer.step import Frozen

__all__ = [
    "Model",
    "adapter_config",
    "build_model",
    "learning_rate",
    "load_components",
    "make_ema",
    "make_optimizer",
    "weight_dtype_of",
]


def load_components(cfg: ModelConfig) -> dict[str, Any]:
    """The base model's parts (its stock pipeline's constructor keys): tiny random ones, or a base model.

    SDXL (the UNet has the ``text_time`` addition embedding): ``StableDiffusionXLPipeline``'s keys; SD1.5:
    ``StableDiffusionPipeline``'s, without safety checker.
    """
    from training.model.tiny import TINY_BASES, tiny_components

    if cfg.base in TINY_BASES:
        return tiny_components(cfg.base, cfg.tiny_seed)
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = {"revision": cfg.revision}
    sdxl = backbone_of_base(cfg.base, revision=cfg.revision) == "sdxl"
    vae = (
        AutoencoderKL.from_pretrained(cfg.vae)
        if cfg.vae
        else AutoencoderKL.from_pretrained(cfg.base, subfolder="vae", **kw)
    )
    components = {
        "vae": vae,
        "text_encoder": CLIPTextModel.from_pretrained(cfg.base, subfolder="text_encoder", **kw),
        "tokenizer": CLIPTokenizer.from_pretrained(cfg.base, subfolder="tokenizer", **kw),
        "unet": UNet2DConditionModel.from_pretrained(cfg.base, subfolder="unet", **kw),
        "scheduler": DDPMScheduler.from_pretrained(cfg.base, subfolder="scheduler", **kw),
    }
    if sdxl:
        components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            cfg.base, subfolder="text_encoder_2", **kw
        )
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(cfg.base, subfolder="tokenizer_2", **kw)
    else:
        components.update(safety_checker=None, feature_extractor=None)
    return components


def adapter_config(cfg: ModelConfig) -> AdapterConfig:
    """The adapter to build: ``model.model_type``; a ``model.adapter`` file of another type or backbone is a
    ConfigError. Reads only the adapter's metadata and the base's UNet config: the trainer calls it before
    it writes anything."""
    if cfg.adapter:
        try:
            made = adapter_config_of(cfg.adapter)
        except (OSError, ValueError, TypeError, SafetensorError) as e:  # garbage file, bad metadata
            raise ConfigError(f"model.adapter {cfg.adapter}: cannot be read ({e})") from None
        if made.model_type != cfg.model_type:
            raise ConfigError(
                f"model.adapter {cfg.adapter} is a {made.model_type} adapter but model.model_type is "
                f"{cfg.model_type}: set model.model_type={made.model_type}"
            )
        if made.backbone is not None:  # recorded by our files: checked before any model loads
            try:
                backbone = backbone_of_base(cfg.base, revision=cfg.revision)
            except OSError as e:
                raise ConfigError(f"model.base {cfg.base}: no UNet config ({' '.join(str(e).split())})") from None
            if made.backbone != backbone:
                raise ConfigError(
                    f"model.adapter {cfg.adapter} is a {made.backbone} adapter but model.base {cfg.base} "
                    f"is {backbone}"
                )
        return made
    return AdapterConfig(model_type=cfg.model_type)


def weight_dtype_of(config: TrainConfig) -> torch.dtype:
    """The compute dtype of the frozen weights (``train.mixed_precision``)."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.train.mixed_precision]


@dataclass
class Model:
    """The UNet to train (not yet prepared), its trainable parameters and the frozen rest."""

    unet: UNet2DConditionModel
    params: list[torch.nn.Parameter]  # adapter, then LoRA; fp32
    frozen: Frozen
    n_timesteps: int  # the noise scheduler's training timesteps


def build_model(config: TrainConfig, device: torch.device) -> Model:
    """Load the parts, attach the adapter (and LoRA), freeze the rest and place everything on ``device``."""
    weight_dtype = weight_dtype_of(config)
    adapter = adapter_config(config.model)  # before any model loads: a mistake costs nothing
    components = load_components(config.model)
    unet = components["unet"]
    try:
        attach_regional_adapter(unet, adapter)
        if config.model.adapter:
            load_adapter(unet, config.model.adapter)
    except ValueError as e:  # another backbone, or keys that do not match: named in the message
        raise ConfigError(f"model.adapter: {e}") from None
    params = set_adapter_trainable(unet)
    if config.model.lora_rank:
        try:
            params += add_lora(unet, config.model.lora_rank)  # the adapter stays trainable
        except ValueError as e:  # a LoRA of another rank came with the adapter's checkpoint
            raise ConfigError(f"model.lora_rank: {e}") from None
    if config.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    to_compute = (
        {"device": device} if weight_dtype == torch.float32 else {"device": device, "dtype": weight_dtype}
    )
    # FSDP2 stores the frozen shards in its own param dtype (training/trainer/fsdp.py): the UNet stays as
    # loaded until it is sharded, never rounded through another dtype. Elsewhere frozen weights compute here.
    if config.train.distributed == "fsdp":
        unet.to(device=device)
    else:
        unet.to(**to_compute)
    for p in params:
        p.data = p.data.float()  # fp32 master weights; autocast computes in weight_dtype
    unet.train()
    vae_dtype = torch.float32 if config.model.vae_fp32 else weight_dtype
    components["vae"].requires_grad_(False).to(
        device=device, **({} if vae_dtype == torch.float32 else {"dtype": vae_dtype})
    )
    tokenizers, text_encoders = text_models(components)
    for encoder in text_encoders:
        encoder.requires_grad_(False).to(**to_compute)
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    if noise_scheduler.config.prediction_type != "epsilon":
        raise ValueError(
            f"{config.model.base}: scheduler prediction_type is {noise_scheduler.config.prediction_type!r}; "
            "this trainer's loss is epsilon-prediction MSE (SDXL's), use an epsilon-prediction base"
        )
    if config.validation.scheduler == "ddim":  # the pipeline's scheduler serves validation only
        components["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config)
    pipe = stock_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    frozen = Frozen(
        pipe=pipe,
        region_encoder=RegionTextEncoder(
            tokenizers, text_encoders, cache_size=config.model.region_cache_size
        ),
        noise_scheduler=noise_scheduler,
        weight_dtype=weight_dtype,
        attention_weight_scale=config.model.attention_weight_scale,
    )
    return Model(unet, params, frozen, noise_scheduler.config.num_train_timesteps)


def make_optimizer(
    params: list[torch.nn.Parameter], o: OptimConfig, sharded: bool = False
) -> torch.optim.Optimizer:
    """AdamW (torch's fused kernel unless the parameters are FSDP-sharded), or bitsandbytes' 8-bit AdamW."""
    kw = {"lr": o.lr, "betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay}
    if not o.adam_8bit:
        # The fused kernel runs the whole update in one pass: ~8x faster than the default on CPU for a
        # SDXL-width adapter (70 M parameters: 0.3 s instead of 2.3 s), and faster on GPUs too.
        return torch.optim.AdamW(params, fused=not sharded, **kw)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise RuntimeError("optim.adam_8bit needs bitsandbytes: pip install 'richlayout[bnb]'") from None
    return bnb.optim.AdamW8bit(params, **kw)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    o, total = config.optim, config.train.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_ema(params: list[torch.nn.Parameter], e: EMAConfig) -> EMAModel | None:
    """diffusers' EMA of the trainable parameters, or None when ``ema.enabled`` is off."""
    if not e.enabled:
        return None
    return EMAModel(
        params,
        decay=e.decay,
        min_decay=0.0 if e.warmup else e.decay,  # min = max: a constant decay once updates start
        update_after_step=e.update_after_step,
    )

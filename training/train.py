"""Train the regional-attention adapter on a frozen SDXL: one loop, read top to bottom.

Only the adapter (``unet.position_net`` and a ``fuser`` per transformer block, optionally LoRA on the
base attention) trains; the VAE, both text encoders and the base UNet are frozen. The recipe and the
public release's defects we do not repeat are in ``docs/METHOD.md`` §6.

Launch (accelerate starts torchrun-style workers; the config is the single source of truth)::

    # one process (CPU or one GPU)
    python -m training.train --config configs/train/tiny.yaml

    # one node, 8 GPUs (DDP)
    accelerate launch --multi_gpu --num_processes 8 -m training.train \\
        --config configs/train/sdxl512_8gpu.yaml

    # two nodes x 8 GPUs: run on every node, NODE_RANK = 0 and 1, MASTER_ADDR = node 0's address
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank $NODE_RANK \\
        --main_process_ip $MASTER_ADDR --main_process_port 29500 -m training.train \\
        --config configs/train/sdxl512_8gpu.yaml

    # FSDP instead of DDP (shards the UNet, frozen weights included, and the optimizer state)
    accelerate launch --multi_gpu --num_processes 8 -m training.train \\
        --config configs/train/sdxl512_8gpu.yaml --override train.distributed=fsdp

    # several processes on CPU (gloo), DDP or FSDP, as tests/test_train_ddp.py does
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m training.train --config ...

    # torchrun works too; resume from the newest checkpoint of output_dir
    torchrun --nproc_per_node 8 -m training.train --config configs/train/sdxl512_8gpu.yaml \\
        --override checkpoint.resume=latest

Precision, accumulation and the data split come from the config, not from accelerate's launch flags.
The effective batch is ``data.batch_size x train.gradient_accumulation_steps x number of processes``.

Each micro-batch: decode nothing, encode the images with the VAE, draw per sample (from a generator
keyed by the seed, the rank and the sample's index, so a resumed run draws the same) the noise, a
uniform timestep and the caption / layout dropout; encode captions as the SDXL pipeline does ("" for a
dropped one), region texts through the encoder's cache (``grounding_inputs_from_batch(drop_layout=...)``:
the empty layout for a dropped one); SDXL's micro-conditioning from each sample's original size, crop
offset and target size; epsilon MSE.

Options: ``model.lora_rank`` adds a LoRA (peft, diffusers' SDXL recipe) on the base UNet's attention
projections, trained with the adapter; ``optim.adam_8bit`` takes bitsandbytes' 8-bit AdamW;
``train.distributed: fsdp`` wraps the UNet with torch's FSDP (also on CPU processes, over gloo).

Outputs in ``output_dir``: ``config.yaml``, ``checkpoints/step_NNNNNNN/`` (accelerate state,
``adapter.safetensors``, ``adapter_ema.safetensors``, with LoRA ``lora.safetensors`` and
``lora_ema.safetensors``, under FSDP ``optimizer_shard_<rank>.bin``, ``stream_state.json``,
``trainer_state.json`` written last), ``adapter/`` (the final weights: ``adapter.safetensors``,
``adapter_ema.safetensors`` and with LoRA ``lora.safetensors``, ``lora_ema.safetensors``, diffusers' LoRA
files), ``validation/step_NNNNNNN_K.png`` (generated with the EMA weights, layout drawn) and ``logs/``
(TensorBoard: loss, lr, grad_norm, samples_per_s, stream/*).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    ProjectConfiguration,
    gather_object,
)
from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from shards.draw import draw_layout

from .adapter import (
    attach_regional_adapter,
    is_adapter_key,
    load_adapter,
    normalize_release_keys,
    set_adapter_trainable,
)
from .collate import normalize_pixels
from .encoding import RegionTextEncoder, grounding_inputs_from_batch
from .lora import add_lora, is_lora_key, lora_model_state, save_lora
from .layout_pipeline import LayoutPipeline
from .stream import build_loader, derive_seed, merge_states
from .train_config import ConfigError, ModelConfig, OptimConfig, TrainConfig, ValidationLayout

__all__ = [
    "TrainResult",
    "diffusion_loss",
    "learning_rate",
    "load_components",
    "main",
    "make_optimizer",
    "train",
    "unet_inputs",
]

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step_(\d{7})$")
TRAINER_STATE = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete
_NOISE = 7  # purpose tag mixed into the per-sample seeds (the stream uses 0..4)


@dataclass
class TrainResult:
    """What a finished ``train`` call leaves behind (paths are written by the main process)."""

    output_dir: Path
    adapter_path: Path  # final raw adapter weights (safetensors)
    ema_adapter_path: Path | None  # final EMA adapter weights, None when EMA is off
    step: int  # optimizer steps done, resumed ones included
    losses: list[float] = field(default_factory=list)  # this rank's loss per optimizer step of this call
    grad_norms: list[float] = field(default_factory=list)  # global gradient norm before clipping, per step
    checkpoint: Path | None = None  # the last checkpoint written
    validation_images: list[Path] = field(default_factory=list)
    adapter_state: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # this rank's raw adapter (and LoRA) weights (CPU, UNet state-dict keys)
    unet: torch.nn.Module | None = None  # the trained UNet (unwrapped, raw weights); None under FSDP
    lora_path: Path | None = None  # final raw LoRA weights (diffusers' LoRA file), None without LoRA
    ema_lora_path: Path | None = None  # final EMA LoRA weights


# ---------------------------------------------------------------------------------------------------
# Models


def load_components(cfg: ModelConfig) -> dict[str, Any]:
    """The SDXL parts (``StableDiffusionXLPipeline``'s constructor keys): tiny random ones, or a base model."""
    if cfg.base == "tiny":
        from .tiny import tiny_sdxl_components

        return tiny_sdxl_components(cfg.tiny_seed)
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = {"revision": cfg.revision}
    vae = (
        AutoencoderKL.from_pretrained(cfg.vae)
        if cfg.vae
        else AutoencoderKL.from_pretrained(cfg.base, subfolder="vae", **kw)
    )
    return {
        "vae": vae,
        "text_encoder": CLIPTextModel.from_pretrained(cfg.base, subfolder="text_encoder", **kw),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
            cfg.base, subfolder="text_encoder_2", **kw
        ),
        "tokenizer": CLIPTokenizer.from_pretrained(cfg.base, subfolder="tokenizer", **kw),
        "tokenizer_2": CLIPTokenizer.from_pretrained(cfg.base, subfolder="tokenizer_2", **kw),
        "unet": UNet2DConditionModel.from_pretrained(cfg.base, subfolder="unet", **kw),
        "scheduler": DDPMScheduler.from_pretrained(cfg.base, subfolder="scheduler", **kw),
    }


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


# ---------------------------------------------------------------------------------------------------
# Batches -> UNet inputs


@dataclass
class SampleDraws:
    """Per-sample random draws of one micro-batch."""

    noise: torch.Tensor  # (B, C, h, w) diffusion noise
    latent_noise: torch.Tensor  # (B, C, h, w) for sampling the VAE's latent distribution
    timesteps: torch.Tensor  # (B,) int64, uniform over the training timesteps
    drop_caption: list[bool]
    drop_layout: list[bool]


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

    pipe: StableDiffusionXLPipeline  # for encode_prompt (training encodes captions exactly as inference)
    region_encoder: RegionTextEncoder
    noise_scheduler: DDPMScheduler
    weight_dtype: torch.dtype
    attention_weight_scale: float


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
    prompt_embeds, _, pooled, _ = frozen.pipe.encode_prompt(
        captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
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
    return {
        "sample": noisy.to(frozen.weight_dtype),
        "timestep": timesteps,
        "encoder_hidden_states": prompt_embeds.to(frozen.weight_dtype),
        "added_cond_kwargs": {
            "text_embeds": pooled.to(frozen.weight_dtype),
            "time_ids": time_ids(batch).to(device=device, dtype=frozen.weight_dtype),
        },
        "cross_attention_kwargs": {"gligen": gligen},
        "target": noise,
    }


def diffusion_loss(unet: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Epsilon-prediction MSE (the scheduler is epsilon-parameterised, as SDXL's)."""
    kwargs = {k: v for k, v in inputs.items() if k != "target"}
    pred = unet(**kwargs, return_dict=False)[0]
    return F.mse_loss(pred.float(), inputs["target"].float(), reduction="mean")


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def is_fsdp(accelerator: Accelerator) -> bool:
    """Whether the UNet is wrapped by torch's FSDP (``train.distributed: fsdp`` with several processes)."""
    return accelerator.distributed_type == DistributedType.FSDP


def _is_trainable_key(key: str) -> bool:
    return is_adapter_key(key) or is_lora_key(key)


def _full_state_dict(unet: torch.nn.Module, rank0_only: bool):
    """FSDP's full (unsharded, CPU-offloaded) state-dict mode for ``unet``'s state_dict / load_state_dict."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only)
    return FSDP.state_dict_type(unet, StateDictType.FULL_STATE_DICT, config)


def trainable_state(accelerator: Accelerator, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full adapter (and LoRA) weights on CPU, on every rank; a collective under FSDP: call it on every rank."""
    if is_fsdp(accelerator):
        # Gathered unit by unit onto rank 0's CPU (the frozen weights too: FSDP1 state dicts come whole),
        # then only the trainable part is sent to the other ranks.
        with _full_state_dict(unet, rank0_only=True):
            full = unet.state_dict()
        box = [{k: v.detach().to(torch.float32, copy=True) for k, v in full.items() if _is_trainable_key(k)}]
        del full
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    state = accelerator.unwrap_model(unet).state_dict()
    # copy=True: on CPU in fp32 .float().cpu() would alias the live parameters, which the EMA swap changes.
    return {
        k: v.detach().to("cpu", torch.float32, copy=True).contiguous()
        for k, v in state.items()
        if _is_trainable_key(k)
    }


def load_trainable_state(
    accelerator: Accelerator, unet: torch.nn.Module, state: dict[str, torch.Tensor]
) -> None:
    """Copy full trainable weights (UNet state-dict keys) into the live model; a collective under FSDP."""
    if is_fsdp(accelerator):
        # Every rank holds the (small) state; FSDP copies each rank's shard out of it.
        with _full_state_dict(unet, rank0_only=False):
            result = unet.load_state_dict(state, strict=False)
    else:
        result = accelerator.unwrap_model(unet).load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"weights that are not the UNet's: {result.unexpected_keys[:3]}")


@contextmanager
def ema_weights(ema: EMAModel | None, params: list[torch.nn.Parameter]):
    """Temporarily swap the EMA weights into ``params`` (no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def save_weights(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Adapter-only safetensors with the release's key names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "richlayout-regional-adapter"})
    return path


def save_trainable(
    state: dict[str, torch.Tensor], folder: Path, suffix: str = ""
) -> tuple[Path, Path | None]:
    """``adapter{suffix}.safetensors`` (adapter keys) and, with LoRA, ``lora{suffix}.safetensors`` beside it."""
    adapter = save_weights(
        {k: v for k, v in state.items() if is_adapter_key(k)}, folder / f"adapter{suffix}.safetensors"
    )
    lora = None
    if any(is_lora_key(k) for k in state):
        lora = save_lora(state, folder / f"lora{suffix}.safetensors")
    return adapter, lora


def read_trainable(folder: Path, suffix: str = "") -> dict[str, torch.Tensor]:
    """What :func:`save_trainable` wrote, as UNet state-dict keys."""
    state = normalize_release_keys(load_file(str(folder / f"adapter{suffix}.safetensors")))
    lora = folder / f"lora{suffix}.safetensors"
    if lora.exists():
        state.update(lora_model_state(lora))
    return state


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if CHECKPOINT_RE.match(p.name) and (p / TRAINER_STATE).exists()]
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: ``latest`` may find none (fresh start), a path must exist."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(
            f"checkpoint.resume={resume!r}: no {TRAINER_STATE} there (incomplete or not a checkpoint)"
        )
    return path


@contextmanager
def _state_without_model(accelerator: Accelerator):
    """Hide the UNet and optimizer from accelerate's save_state / load_state under FSDP (no-op otherwise).

    There accelerate would write the whole wrapped UNet, frozen weights included, and FSDP's full optimizer
    state dict, which torch 2.14's FSDP1 keys wrongly when frozen and trainable parameters share flat
    parameters (use_orig_params): a resumed run then updated the weights differently from an uninterrupted
    one. The trainable weights go to their own files and each rank's optimizer shard to its own file.
    """
    if not is_fsdp(accelerator):
        yield
        return
    models, optimizers = accelerator._models, accelerator._optimizers
    accelerator._models, accelerator._optimizers = [], []
    try:
        yield
    finally:
        accelerator._models, accelerator._optimizers = models, optimizers


def _optimizer_shard(folder: Path, rank: int) -> Path:
    return folder / f"optimizer_shard_{rank}.bin"


def save_checkpoint(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    params: list[torch.nn.Parameter],
    ema: EMAModel | None,
    loader,
    step: int,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """accelerate state + adapter (and LoRA) raw / EMA + every rank's stream state + step; call on every rank.

    Under FSDP each rank also writes its optimizer shard (``optimizer`` is then required).
    """
    out = Path(config.output_dir) / "checkpoints" / f"step_{step:07d}"
    stream_state = merge_states(gather_object([loader.state_dict()]))
    with _state_without_model(accelerator):
        accelerator.save_state(str(out))  # the pre-hook drops the frozen UNet from it
    if is_fsdp(accelerator):
        # Local shards keyed by position: exact for a resume with the same processes and wrapping.
        torch.save(optimizer.state_dict(), _optimizer_shard(out, accelerator.process_index))
    raw = trainable_state(accelerator, unet)
    with ema_weights(ema, params):
        ema_state = trainable_state(accelerator, unet) if ema is not None else None
    if accelerator.is_main_process:
        save_trainable(raw, out)
        if ema_state is not None:
            save_trainable(ema_state, out, "_ema")
        (out / "stream_state.json").write_text(json.dumps(stream_state))
        trainer = {"step": step, "ema_optimization_step": ema.optimization_step if ema else None}
        (out / TRAINER_STATE).write_text(json.dumps(trainer))
        keep = config.checkpoint.keep_last
        if keep is not None:
            for old in checkpoints(Path(config.output_dir))[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return out


def register_checkpoint_hooks(accelerator: Accelerator) -> None:
    """Keep the frozen UNet out of accelerate's state: only the adapter (and LoRA) is saved (by us) and loaded.

    (Under FSDP the UNet is hidden from accelerate altogether: see ``_state_without_model``.)
    """

    def save_hook(models, weights, output_dir):
        weights.clear()  # accelerate then writes no model file

    def load_hook(models, input_dir):
        for model in models:
            state = read_trainable(Path(input_dir))
            result = accelerator.unwrap_model(model).load_state_dict(state, strict=False)
            if result.unexpected_keys:
                raise ValueError(
                    f"{input_dir}: weights that are not the UNet's: {result.unexpected_keys[:3]}"
                )
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------------------------------------------
# Validation


def stream_validation_layouts(batch: dict, n: int, config: TrainConfig) -> list[ValidationLayout]:
    """Validation prompts from the first samples of a training batch, boxes scaled to the validation size."""
    v = config.validation
    out = []
    for i in range(min(n, len(batch["caption"]))):
        h, w = (int(x) for x in batch["target_size"][i])
        k = int(batch["object_count"][i])
        scale = np.array([v.width / w, v.height / h] * 2)
        boxes = tuple(tuple(float(c) for c in b) for b in batch["object_boxes"][i, :k].numpy() * scale)
        out.append(ValidationLayout(batch["caption"][i], boxes, tuple(batch["object_texts"][i][:k])))
    return out


@torch.no_grad()
def generate_validation(
    pipe: LayoutPipeline, layouts: list[ValidationLayout], config: TrainConfig
) -> list[Image.Image]:
    """One image per layout (CFG's negative branch: "" and the empty layout), with the layout drawn on it."""
    v = config.validation
    images = []
    for i, layout in enumerate(layouts):
        image = pipe(
            layout.caption,
            boxes=np.array(layout.boxes, dtype=np.float64).reshape(-1, 4),
            labels=list(layout.labels),
            height=v.height,
            width=v.width,
            num_inference_steps=v.num_inference_steps,
            guidance_scale=v.guidance_scale,
            attention_weight_scale=config.model.attention_weight_scale,
            generator=torch.Generator().manual_seed(v.seed + i),
        ).images[0]
        images.append(draw_layout(image, layout.boxes, layout.labels))
    return images


# ---------------------------------------------------------------------------------------------------
# The loop


# FSDP units: each transformer block (its fuser and LoRA inside), each ResNet block and the position net;
# the root unit keeps only frozen weights. It must: FSDP1 leaves the root unsharded after a forward without
# backward (validation), and until the next backward its gathers return that stale copy, so the EMA
# swapped into the shards afterwards (checkpoint) would not be seen there.
FSDP_WRAP = ["BasicTransformerBlock", "ResnetBlock2D", "PositionNet"]


def make_accelerator(config: TrainConfig) -> Accelerator:
    """Accelerate with the config's precision, accumulation, distribution and trackers."""
    t, out = config.train, Path(config.output_dir)
    trackers = (["tensorboard"] if config.log.tensorboard else []) + (["wandb"] if config.log.wandb else [])
    kwargs: dict[str, Any] = {}
    plugin = None
    if t.distributed == "fsdp":
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=1,
            # use_orig_params: frozen and trainable parameters share FSDP's flat parameters.
            use_orig_params=True,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=FSDP_WRAP,
            state_dict_type="FULL_STATE_DICT",
        )
        kwargs["fsdp_plugin"] = plugin
    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=t.find_unused_parameters)],
        **kwargs,
    )
    if plugin is not None and accelerator.distributed_type != DistributedType.FSDP:
        kind = accelerator.distributed_type
        if kind == DistributedType.MULTI_CPU:
            # accelerate turns a plugin into FSDP on accelerators only and would silently run DDP on CPU
            # processes; torch's FSDP itself runs on CPU over gloo (tests/test_train_ddp.py), so wrap with it.
            # As accelerate does for accelerators: the process state says FSDP too (every AcceleratorState()
            # built later, e.g. by the prepared optimizer, copies it). Its CPU device "cpu:0" becomes "cpu":
            # FSDP's nested units (compute device "cpu") reject the other as their device_id ("Inconsistent
            # compute device and `device_id` on rank 0: cpu vs cpu:0").
            for state in (PartialState(), accelerator.state):
                state.distributed_type = DistributedType.FSDP
                state.device = torch.device("cpu")
            accelerator.state.fsdp_plugin = plugin
        elif kind == DistributedType.NO:
            log.warning("train.distributed=fsdp with a single process: nothing to shard, training unwrapped")
        else:
            raise ConfigError(f"train.distributed=fsdp is not supported with accelerate's {kind} setup")
    return accelerator


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Scalars of a nested dict as ``a.b`` keys (TensorBoard hparams take scalars and strings only)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = json.dumps(v)
    return out


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; returns where the weights are and the per-step losses.

    Callable several times in one process, but accelerate fixes the mixed precision at the first call.
    """
    accelerator = make_accelerator(config)
    device, is_main = accelerator.device, accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(config.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if config.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # Models: everything frozen in the compute dtype; the adapter (and LoRA) trainable, in fp32.
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        config.train.mixed_precision
    ]
    components = load_components(config.model)
    unet = components["unet"]
    attach_regional_adapter(unet)
    if config.model.adapter:
        load_adapter(unet, config.model.adapter)
    params = set_adapter_trainable(unet)
    if config.model.lora_rank:
        params += add_lora(unet, config.model.lora_rank)  # the adapter stays trainable
    if config.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    to_compute = (
        {"device": device} if weight_dtype == torch.float32 else {"device": device, "dtype": weight_dtype}
    )
    # FSDP flattens parameters into one dtype per unit and casts them for compute itself (its mixed
    # precision policy): the UNet stays fp32 there. Elsewhere the frozen weights take the compute dtype.
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
    for name in ("text_encoder", "text_encoder_2"):
        components[name].requires_grad_(False).to(**to_compute)
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    if noise_scheduler.config.prediction_type != "epsilon":
        raise ValueError(
            f"{config.model.base}: scheduler prediction_type is {noise_scheduler.config.prediction_type!r}; "
            "this trainer's loss is epsilon-prediction MSE (SDXL's), use an epsilon-prediction base"
        )
    pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    frozen = Frozen(
        pipe=pipe,
        region_encoder=RegionTextEncoder(
            (components["tokenizer"], components["tokenizer_2"]),
            (components["text_encoder"], components["text_encoder_2"]),
            cache_size=config.model.region_cache_size,
        ),
        noise_scheduler=noise_scheduler,
        weight_dtype=weight_dtype,
        attention_weight_scale=config.model.attention_weight_scale,
    )
    n_timesteps = noise_scheduler.config.num_train_timesteps

    # The model first, then the optimizer over the wrapped model's parameters (what FSDP requires).
    unet = accelerator.prepare(unet)
    fsdp = is_fsdp(accelerator)
    if fsdp:
        # The root's own parameters are named with one FSDP prefix, those of nested units with more.
        in_root = [
            n for n, p in unet.named_parameters() if p.requires_grad and n.count("_fsdp_wrapped_module") < 2
        ]
        if in_root:
            raise RuntimeError(f"FSDP: trainable parameters in the root unit (see FSDP_WRAP): {in_root[:3]}")
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = accelerator.prepare(make_optimizer(params, config.optim, sharded=fsdp))
    register_checkpoint_hooks(accelerator)
    ema = None
    if config.ema.enabled:
        e = config.ema
        ema = EMAModel(
            params,
            decay=e.decay,
            min_decay=0.0 if e.warmup else e.decay,  # min = max: a constant decay once updates start
            update_after_step=e.update_after_step,
        )

    # Resume: accelerate state (optimizer, scaler, RNG), adapter weights, EMA, stream position, step.
    step, stream_state = 0, None
    resume_from = resolve_resume(config.checkpoint.resume, out)
    if resume_from is not None:
        with _state_without_model(accelerator):
            accelerator.load_state(str(resume_from))
        if fsdp:
            load_trainable_state(accelerator, unet, read_trainable(resume_from))
            shard = torch.load(_optimizer_shard(resume_from, rank), map_location=device, weights_only=True)
            optimizer.load_state_dict(shard)
        trainer_state = json.loads((resume_from / TRAINER_STATE).read_text())
        step = trainer_state["step"]
        stream_state = json.loads((resume_from / "stream_state.json").read_text())
        if ema is not None and (resume_from / "adapter_ema.safetensors").exists():
            with ema_weights(ema, params):  # load the EMA files into the live params, copy them as the shadow
                load_trainable_state(accelerator, unet, read_trainable(resume_from, "_ema"))
                ema.shadow_params = [p.detach().clone() for p in params]
            ema.optimization_step = trainer_state["ema_optimization_step"]
        if is_main:
            log.info("resumed from %s at step %d", resume_from, step)
    loader = build_loader(config.data, rank=rank, world_size=world, state=stream_state)

    accelerator.init_trackers(config.log.project, config=_flat(config.to_dict()))

    accum, batch_size = config.train.gradient_accumulation_steps, config.data.batch_size
    samples_per_step = batch_size * accum * world
    result = TrainResult(
        output_dir=out,
        adapter_path=out / "adapter" / "adapter.safetensors",
        ema_adapter_path=out / "adapter" / "adapter_ema.safetensors" if ema else None,
        step=step,
        lora_path=out / "adapter" / "lora.safetensors" if config.model.lora_rank else None,
        ema_lora_path=out / "adapter" / "lora_ema.safetensors" if config.model.lora_rank and ema else None,
    )
    validation_layouts = list(config.validation.layouts)
    if is_main:
        log.info(
            "training %d adapter tensors (%.1f M params) on %d process(es); effective batch %d (%d x %d x %d)",
            len(params),
            sum(p.numel() for p in params) / 1e6,
            world,
            samples_per_step,
            batch_size,
            accum,
            world,
        )
    progress = tqdm(
        total=config.train.max_steps,
        initial=step,
        disable=not accelerator.is_local_main_process,
        desc="train",
    )
    micro, step_loss = step * accum, 0.0
    window_start, window_steps = time.perf_counter(), 0  # for samples/s, validation and checkpoints excluded
    while step < config.train.max_steps:
        for batch in loader:
            if not validation_layouts and is_main:
                validation_layouts = stream_validation_layouts(batch, config.validation.num_images, config)
            # Sample n of this rank gets its own seed: resuming, or regrouping samples into micro-batches,
            # draws the same noise, timestep and dropout for it.
            first = micro * batch_size
            seeds = [
                derive_seed(config.seed, _NOISE, config.train.noise_seed_offset, rank, first + j)
                for j in range(len(batch["caption"]))
            ]
            h, w = (int(x) // 8 for x in batch["target_size"][0])
            draws = sample_draws(seeds, (unet_channels(accelerator, unet), h, w), config, n_timesteps)
            with accelerator.accumulate(unet):
                inputs = unet_inputs(batch, draws, frozen, device)
                with accelerator.autocast():
                    loss = diffusion_loss(unet, inputs)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(step, config)
                    limit = config.optim.max_grad_norm or float("inf")
                    # Under FSDP the global norm needs every shard: accelerate hands the whole wrapped
                    # model to FSDP's own clip_grad_norm_ (frozen parameters have no gradient).
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters() if fsdp else params, limit)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            step_loss += loss.detach().item() / accum
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done.
            if ema is not None:
                ema.step(params)
            step += 1
            window_steps += 1
            progress.update(1)
            result.losses.append(step_loss)
            result.grad_norms.append(float(grad_norm))
            if step % config.log.every_steps == 0 or step == config.train.max_steps:
                elapsed = time.perf_counter() - window_start
                logs = {
                    "loss": accelerator.reduce(torch.tensor(step_loss, device=device), "mean").item(),
                    "lr": learning_rate(step - 1, config),
                    "grad_norm": float(grad_norm),
                    "samples_per_s": samples_per_step * window_steps / elapsed,
                }
                counters: dict[str, int] = {}
                for c in gather_object([loader.counters()]):
                    for k, v in c.items():
                        counters[k] = counters.get(k, 0) + v
                logs.update({f"stream/{k}": v for k, v in counters.items()})
                accelerator.log(logs, step=step)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                window_start, window_steps = time.perf_counter(), 0
            step_loss = 0.0
            every = config.validation.every_steps
            if every and (step % every == 0 or step == config.train.max_steps):
                result.validation_images += validate(
                    accelerator, unet, params, ema, frozen, validation_layouts, config, step
                )
                window_start, window_steps = time.perf_counter(), 0
            every = config.checkpoint.every_steps
            if (every and step % every == 0) or step == config.train.max_steps:
                result.checkpoint = save_checkpoint(
                    accelerator, unet, params, ema, loader, step, config, optimizer
                )
                window_start, window_steps = time.perf_counter(), 0
            if step >= config.train.max_steps:
                break
    progress.close()

    # Final weights: raw and EMA, adapter (and LoRA) only.
    raw = trainable_state(accelerator, unet)
    with ema_weights(ema, params):
        ema_state = trainable_state(accelerator, unet) if ema is not None else None
    if is_main:
        save_trainable(raw, result.adapter_path.parent)
        if ema_state is not None:
            save_trainable(ema_state, result.adapter_path.parent, "_ema")
        log.info("done at step %d: %s", step, result.adapter_path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result.step = step
    result.adapter_state = raw
    result.unet = None if fsdp else accelerator.unwrap_model(unet)  # FSDP: each rank holds a shard only
    return result


def unet_channels(accelerator: Accelerator, unet: torch.nn.Module) -> int:
    """Latent channels of the UNet."""
    return accelerator.unwrap_model(unet).config.in_channels


@contextmanager
def _generate_through(pipe: StableDiffusionXLPipeline, unet: torch.nn.Module | None):
    """Let ``pipe`` call ``unet`` (the FSDP-wrapped UNet) instead of its own module (no-op for None)."""
    if unet is None:
        yield
        return
    own = pipe.unet
    pipe.__dict__["unet"] = unet  # not the pipeline's __setattr__, which would rewrite its config
    try:
        yield
    finally:
        pipe.__dict__["unet"] = own


def validate(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    params: list[torch.nn.Parameter],
    ema: EMAModel | None,
    frozen: Frozen,
    layouts: list[ValidationLayout],
    config: TrainConfig,
    step: int,
) -> list[Path]:
    """Generate the validation images with the EMA weights; the main rank saves them and logs them.

    Without FSDP only the main rank generates. Under FSDP every rank runs the same generation through the
    wrapped UNet (each forward gathers the shards from all ranks), with the main rank's layouts.
    """
    paths: list[Path] = []
    fsdp = is_fsdp(accelerator)
    if fsdp:
        box = [layouts]
        torch.distributed.broadcast_object_list(box, src=0)
        layouts = box[0]
    if (accelerator.is_main_process or fsdp) and layouts:
        r = config.data.regions
        pipe = LayoutPipeline(
            frozen.pipe, max_objects=r.max_objs, max_regions=r.max_regions, max_slots=r.max_slots
        )
        unet.eval()
        with (
            ema_weights(ema, params),
            accelerator.autocast(),
            _generate_through(frozen.pipe, unet if fsdp else None),
        ):
            images = generate_validation(pipe, layouts, config)
        unet.train()
    if accelerator.is_main_process and layouts:
        folder = Path(config.output_dir) / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            paths.append(folder / f"step_{step:07d}_{i}.png")
            image.save(paths[-1])
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images(
                    {"validation": np.stack([np.asarray(im) for im in images])}, step, dataformats="NHWC"
                )
            elif tracker.name == "wandb":
                import wandb

                tracker.log(
                    {
                        "validation": [
                            wandb.Image(im, caption=lay.caption)
                            for im, lay in zip(images, layouts, strict=True)
                        ]
                    },
                    step=step,
                )
    accelerator.wait_for_everyone()
    return paths


# ---------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m training.train --config FILE [--override key=value ...]``; prints the result as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/train/tiny.yaml")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config field (dotted key, YAML value); repeatable",
    )
    args = parser.parse_args(argv)
    config = TrainConfig.from_yaml(args.config, args.override)

    logging.basicConfig(
        level=logging.INFO if PartialState().is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result = train(config)
    if PartialState().is_main_process:
        print(
            json.dumps(
                {
                    "step": result.step,
                    "adapter": str(result.adapter_path),
                    "ema_adapter": str(result.ema_adapter_path) if result.ema_adapter_path else None,
                    "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                    "final_loss": result.losses[-1] if result.losses else None,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

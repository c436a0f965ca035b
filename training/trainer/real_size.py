"""SDXL base 1.0's real configuration with random weights, built offline, for real-size checks.

The tiny parts (``training.model.tiny``) keep the code paths but hide shape, dtype and memory mistakes of the
real model. ``real_sdxl_components`` returns ``StableDiffusionXLPipeline``'s constructor keys with SDXL
base's UNet (2.6 B), VAE, both text encoders (CLIP ViT-L and OpenCLIP bigG) and DDPM scheduler configs, and
CLIP's real 49408-token BPE tokenizers written from open_clip's bundled vocabulary. Parameters are
created directly on the device in the compute dtype. ``flow_train_step`` takes one adapter step on a
real-size MM-DiT transformer (``training.model.mmdit.real``: SD3.5 medium, FLUX.1-dev) with random
encoder outputs. Used by ``tests/test_real_size.py`` and ``benchmarks/real_size.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from datagen.real_size import _building

SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # diffusers' misnomer: heads per level (64-dim heads)
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SDXL_VAE = dict(  # vae/config.json
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
)
SDXL_SCHEDULER = dict(  # scheduler/scheduler_config.json (the trainer makes a DDPMScheduler of it)
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
)
CLIP_BOS, CLIP_EOS = 49406, 49407


def write_clip_tokenizer_files(directory: str | Path) -> Path:
    """CLIP's vocab.json and merges.txt (49408 tokens), from the BPE file open_clip ships."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(t, t): i for t, i in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


def clip_tokenizers(directory: str | Path) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's two tokenizers: the same vocabulary, padded with <|endoftext|> and with "!" (the second)."""
    folder = write_clip_tokenizer_files(directory)
    # from_pretrained: transformers 5's constructor ignores vocab_file/merges_file (a 2-token vocabulary).
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="<|endoftext|>")
    tok_2 = CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!")
    return tok, tok_2


def _text_config(hidden: int, layers: int, heads: int, intermediate: int, act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=1280,
        hidden_act=act,
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,
        pad_token_id=1,
    )


def real_sdxl_components(
    tokenizer_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, vae_dtype=None
) -> dict:
    """``StableDiffusionXLPipeline``'s constructor keys at SDXL base's real sizes, random weights."""
    tok, tok_2 = clip_tokenizers(tokenizer_dir)
    with _building(device, dtype):
        unet = UNet2DConditionModel(**SDXL_UNET)
        text_encoder = CLIPTextModel(_text_config(768, 12, 12, 3072, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(1280, 32, 20, 5120, "gelu"))
    with _building(device, vae_dtype or dtype):  # the recipe's fp16-fix VAE runs in the compute dtype
        vae = AutoencoderKL(**SDXL_VAE)
    return {
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tok,
        "tokenizer_2": tok_2,
        "unet": unet.eval(),
        "scheduler": DDPMScheduler(**SDXL_SCHEDULER),
    }


def layout_batch(image, boxes, texts: list[str], caption: str, size: int = 512) -> dict:
    """A one-sample training batch (``training.data.collate``'s fields) of ``image`` resized to ``size``²."""
    import numpy as np
    from PIL import Image

    from training.data.augment import Augmented
    from training.data.collate import Example, collate
    from training.layout.regions import reorganize_regions

    h, w = image.shape[:2]
    pixels = np.array(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    scaled = np.asarray(boxes, dtype=np.float32) * np.array([size / w, size / h] * 2, dtype=np.float32)
    aug = Augmented(
        pixels=pixels, boxes=scaled, texts=list(texts), caption=caption, masks=None,
        object_index=np.arange(len(texts)), original_size=(h, w), crop_top_left=(0, 0),
        target_size=(size, size), flipped=False, flip_refused=False,
    )  # fmt: skip
    layout = reorganize_regions(scaled, list(texts), size, size)
    return collate([Example("real-size", aug, layout)], max_slots=30, max_objs=30)


def train_step(config, components: dict, batch: dict, device: str = "cpu") -> dict:
    """The trainer's model set-up (``build_model``) on ``components`` and one optimizer step on ``batch``.

    The same calls as ``training.train``'s loop body (draws, UNet inputs, autocast loss, backward, clip,
    AdamW), without accelerate. Returns the loss, the gradient norm, the trainable parameter count and
    the step's seconds.
    """
    import time
    from unittest import mock

    from training.trainer import model_setup
    from training.trainer.step import diffusion_loss, sample_draws, sample_seeds, unet_inputs

    dev = torch.device(device)
    with mock.patch.object(model_setup, "load_components", lambda cfg: components):
        model = model_setup.build_model(config, dev)
    optimizer = model_setup.make_optimizer(model.params, config.optim)
    n = len(batch["caption"])
    h, w = (int(x) // 8 for x in batch["target_size"][0])
    t0 = time.perf_counter()
    draws = sample_draws(sample_seeds(config, [(0, j) for j in range(n)]), (model.unet.config.in_channels, h, w), config,
                         model.n_timesteps)  # fmt: skip
    inputs = unet_inputs(batch, draws, model.frozen, dev)
    with torch.autocast(dev.type, dtype=model.frozen.weight_dtype, enabled=model.frozen.weight_dtype != torch.float32):
        loss = diffusion_loss(model.unet, inputs)
    loss.backward()
    for group in optimizer.param_groups:
        group["lr"] = model_setup.learning_rate(0, config)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.params, config.optim.max_grad_norm or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    return {
        "loss": float(loss.detach()),
        "grad_norm": float(grad_norm),
        "trainable_params": sum(p.numel() for p in model.params),
        "param_dtypes": sorted({str(p.dtype) for p in model.params}),
        "unet_dtype": str(next(p for p in model.unet.parameters() if not p.requires_grad).dtype),
        "gligen_shapes": {k: tuple(v.shape) for k, v in inputs["cross_attention_kwargs"]["gligen"].items()},
        "sample_shape": tuple(inputs["sample"].shape),
        "seconds": seconds,
    }


class _RandomTextEncoder(torch.nn.Module):
    """Stands in for T5-XXL (4.7 B; it would not fit 24 GB beside the transformer): random features of its
    width, drawn from the token ids, behind the region-text encoder's real tokenization and spans."""

    def __init__(self, width: int, device: str, dtype: torch.dtype) -> None:
        super().__init__()
        # where the features go (the encoder reads the device of a parameter)
        self.anchor = torch.nn.Parameter(torch.zeros((), device=device, dtype=dtype), requires_grad=False)
        self.width = width
        self.config = SimpleNamespace(hidden_size=width)  # what the region-text encoder reads of a model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        g = torch.Generator().manual_seed(int(input_ids.sum()))
        hidden = torch.randn(*input_ids.shape, self.width, generator=g).to(self.anchor)
        return SimpleNamespace(last_hidden_state=hidden)


def flow_train_step(
    config, transformer: torch.nn.Module, boxes, texts, size: int, device: str = "cpu", repeats: int = 1
) -> dict:
    """One adapter optimizer step on a real-size MM-DiT (``training.model.mmdit.real``) at ``size`` px.

    The trainer's own parts: the adapter of ``config.model`` attached and made trainable (fp32 master weights,
    the base frozen in its dtype), gradient checkpointing if set, its AdamW, the backbone's noise draws and
    keywords (``training.trainer.flow``), autocast, backward, clipping. In place of the frozen encoders
    (which do not fit beside the transformer on 24 GB): random clean latents for the VAE's, random caption
    features of the real sequence length and width, and region texts tokenized (tiny T5 vocabulary) and
    given random T5-XXL-wide features. ``repeats`` steps; returns the last one's loss, gradient norm and
    seconds, every step's seconds, and the parameter counts.
    """
    import time

    from training.model.adapter import set_adapter_trainable
    from training.model.encoding import RegionTextEncoder, grounding_inputs
    from training.model.mmdit.adapter import attach_mmdit_adapter, backbone_of_transformer
    from training.model.mmdit.encoding import token_layout
    from training.model.mmdit.real import CAPTION_TOKENS, real_scheduler
    from training.model.mmdit.tiny import tiny_t5_tokenizer
    from training.trainer import model_setup
    from training.trainer.flow import (
        FlowFrozen,
        flow_adapter_config,
        flow_draws,
        flow_loss,
        transformer_inputs,
    )
    from training.trainer.step import sample_seeds

    dev = torch.device(device)
    backbone = backbone_of_transformer(transformer)
    dtype = next(transformer.parameters()).dtype
    n_text, width = CAPTION_TOKENS[backbone], transformer.config.joint_attention_dim  # T5's width
    pooled_width = transformer.config.pooled_projection_dim
    m = config.model
    adapter = flow_adapter_config(m, backbone)
    encoder = RegionTextEncoder([tiny_t5_tokenizer()], [_RandomTextEncoder(width, device, dtype)],
                                n_tokens=adapter.region_tokens)  # fmt: skip
    attach_mmdit_adapter(transformer, adapter, width)
    params = set_adapter_trainable(transformer)
    for p in params:
        p.data = p.data.float()  # fp32 master weights; autocast computes in the base's dtype
    if m.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = model_setup.make_optimizer(params, config.optim)
    pipe = SimpleNamespace(scheduler=real_scheduler(backbone), transformer=transformer)
    frozen = FlowFrozen(pipe, encoder, backbone, m.mmdit, dtype, m.attention_weight_scale)

    latent = (16, size // 8, size // 8)
    seconds = []
    for step in range(repeats):  # the same step again: the first one pays the kernels' warm-up on GPUs
        t0 = time.perf_counter()
        draws = flow_draws(sample_seeds(config, [(0, step)]), latent, config, frozen)
        g = torch.Generator().manual_seed(step)
        x0 = torch.randn(1, *latent, generator=g).to(dev)
        embeds = torch.randn(1, n_text, width, generator=g).to(dev)
        pooled = torch.randn(1, pooled_width, generator=g).to(dev)
        text_ids = torch.zeros(n_text, 3, device=dev) if backbone == "flux" else None
        gligen = grounding_inputs([token_layout(boxes, texts, size, size)], encoder, device=dev, dtype=dtype)
        inputs = transformer_inputs(frozen, x0, draws, embeds, pooled, text_ids, gligen)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = flow_loss(transformer, inputs)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = model_setup.learning_rate(step, config)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds.append(time.perf_counter() - t0)
    n_base = sum(p.numel() for p in transformer.parameters()) - sum(p.numel() for p in params)
    return {
        "loss": float(loss.detach()),
        "grad_norm": float(grad_norm),
        "trainable_params": sum(p.numel() for p in params),
        "base_params": n_base,
        "param_dtypes": sorted({str(p.dtype) for p in params}),
        "base_dtype": str(dtype),
        "hidden_shape": tuple(inputs["hidden_states"].shape),
        "region_map": tuple(gligen["region_map"].shape),
        "seconds": seconds[-1],  # the last step's (the only one when repeats is 1)
        "step_seconds": seconds,
    }

"""Tiny, offline SD3 and FLUX.1 parts with random weights: the real diffusers / transformers classes, small configs.

As ``training.model.tiny`` does for SDXL: every class the MM-DiT path uses is built from a small config, so tests
and the CPU presets run without a download. The shapes keep what our code depends on:

- a 16-channel ``AutoencoderKL`` with the factor 8 (four blocks), the real scaling and shift factors;
- ``tiny-sd3``: ``SD3Transformer2DModel`` (patch 2, two joint blocks, the first with SD3.5's extra image-only
  attention, the last ``context_pre_only``, RMS q/k norm as SD3.5), CLIP-L and CLIP-G as two
  ``CLIPTextModelWithProjection`` (pooled sizes sum to ``pooled_projection_dim``), a T5 encoder as the third;
- ``tiny-flux``: ``FluxTransformer2DModel`` (two double-stream and two single-stream blocks, FLUX-dev's guidance
  embedding, a 3-axis RoPE whose axes sum to the head size), CLIP-L (``CLIPTextModel``, pooled) and T5;
- the T5 tokenizer is a Unigram model over whole pieces for ``TINY_WORDS`` and single characters (no BOS, EOS
  ``</s>``, pad ``<pad>`` as T5's), built in memory; the CLIP tokenizers are ``training.model.tiny``'s;
- the schedulers are the real configs: SD3's ``FlowMatchEulerDiscreteScheduler(shift=3)``, FLUX's dynamic
  resolution shift (``base_shift`` 0.5, ``max_shift`` 1.15 between 256 and 4096 tokens).

``MMDIT_TINY_BASES`` names them (``model.base`` / ``--base``): ``tiny-sd3``, ``tiny-flux``.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from training.model.mmdit.config import MMDIT_TINY_BASES
from training.model.mmdit.real import real_scheduler
from training.model.tiny import (
    BOS,
    EOS,
    PROJECTION_DIM,
    TEXT_HIDDEN,
    TINY_WORDS,
    _text_config,
    _vocab_and_merges,
    tiny_tokenizers,
    tiny_vae,
)

__all__ = [
    "T5_HIDDEN",
    "T5_MAX_LENGTH",
    "tiny_flux_components",
    "tiny_flux_transformer",
    "tiny_mmdit_components",
    "tiny_mmdit_pipeline",
    "tiny_mmdit_vae",
    "tiny_sd3_components",
    "tiny_sd3_transformer",
    "tiny_t5",
    "tiny_t5_tokenizer",
]

T5_HIDDEN = 64  # >= the two tiny CLIPs' 32 + 32: SD3 pads the CLIP features to the T5 width
T5_MAX_LENGTH = 128  # FLUX-dev's pipeline default is 512, SD3's 256; the tiny models keep sequences short
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:'\"!?-()/&"


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer (Unigram) over ``TINY_WORDS`` as whole pieces and single characters; no file needed."""
    # Unigram picks the segmentation of highest total score: a whole word (-1) beats its characters (-5 each).
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in TINY_WORDS] + [(c, -5.0) for c in _T5_CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def tiny_t5(seed: int = 0) -> T5EncoderModel:
    """T5 v1.1's encoder (gated GELU, as T5-XXL), tiny: width ``T5_HIDDEN``, two layers."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tiny_t5_tokenizer()),
        d_model=T5_HIDDEN,
        d_kv=16,
        d_ff=2 * T5_HIDDEN,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def tiny_mmdit_vae(backbone: str, seed: int = 0) -> AutoencoderKL:
    """The tiny SDXL VAE's shape (factor 8) with 16 latent channels and the backbone's scaling and shift."""
    scaling, shift = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}[backbone]
    # Without the config's private keys: its "_use_default_values" would reset the fields set here.
    config = {k: v for k, v in tiny_vae(seed).config.items() if not k.startswith("_")}
    config.update(latent_channels=16, scaling_factor=scaling, shift_factor=shift, use_quant_conv=False,
                  use_post_quant_conv=False)  # fmt: skip
    torch.manual_seed(seed)
    return AutoencoderKL.from_config(config).eval()


def tiny_sd3_transformer(seed: int = 0) -> SD3Transformer2DModel:
    """SD3.5-shaped transformer, tiny: patch 2, two joint blocks (the first with the dual attention)."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,  # width 64 = the 64 outputs of a 2 x 2 x 16 patch: the output is not rank-limited
        joint_attention_dim=T5_HIDDEN,
        caption_projection_dim=64,  # the transformer's width, as SD3's
        pooled_projection_dim=2 * PROJECTION_DIM,
        pos_embed_max_size=32,  # up to 32 x 32 tokens: 512 px
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()


def tiny_flux_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """FLUX.1-dev-shaped transformer, tiny: 2 double- and 2 single-stream blocks, guidance embedding."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2 x 2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,  # width 64 = the 64 packed channels of a token
        joint_attention_dim=T5_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN[0],
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def _clip_with_projection(hidden: int, seed: int) -> CLIPTextModelWithProjection:
    vocab, _ = _vocab_and_merges()
    torch.manual_seed(seed)
    config = _text_config(hidden, len(vocab), vocab[EOS], vocab[BOS], projection_dim=PROJECTION_DIM)
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_components(seed: int = 0) -> dict:
    """All components of a ``StableDiffusion3Pipeline``, tiny and random (its constructor's keys)."""
    tok, tok_2 = tiny_tokenizers()
    return {
        "transformer": tiny_sd3_transformer(seed),
        "scheduler": real_scheduler("sd3"),
        "vae": tiny_mmdit_vae("sd3", seed),
        "text_encoder": _clip_with_projection(TEXT_HIDDEN[0], seed),
        "tokenizer": tok,
        "text_encoder_2": _clip_with_projection(TEXT_HIDDEN[1], seed + 1),
        "tokenizer_2": tok_2,
        "text_encoder_3": tiny_t5(seed),
        "tokenizer_3": tiny_t5_tokenizer(),
    }


def tiny_flux_components(seed: int = 0) -> dict:
    """All components of a ``FluxPipeline``, tiny and random (its constructor's keys)."""
    vocab, _ = _vocab_and_merges()
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        _text_config(TEXT_HIDDEN[0], len(vocab), vocab[EOS], vocab[BOS], projection_dim=PROJECTION_DIM)
    ).eval()
    return {
        "scheduler": real_scheduler("flux"),
        "vae": tiny_mmdit_vae("flux", seed),
        "text_encoder": clip,
        "tokenizer": tiny_tokenizers()[0],
        "text_encoder_2": tiny_t5(seed),
        "tokenizer_2": tiny_t5_tokenizer(),
        "transformer": tiny_flux_transformer(seed),
    }


def tiny_mmdit_components(base: str, seed: int = 0) -> dict:
    """The pipeline components of a ``MMDIT_TINY_BASES`` name."""
    return tiny_sd3_components(seed) if MMDIT_TINY_BASES[base] == "sd3" else tiny_flux_components(seed)


def tiny_mmdit_pipeline(base: str, seed: int = 0) -> StableDiffusion3Pipeline | FluxPipeline:
    """The runnable stock pipeline of a ``MMDIT_TINY_BASES`` name."""
    components = tiny_mmdit_components(base, seed)
    if MMDIT_TINY_BASES[base] == "sd3":
        return StableDiffusion3Pipeline(**components)
    return FluxPipeline(**components)

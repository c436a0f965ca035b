"""Tiny, offline SDXL and SD1.5 parts with random weights: real diffusers / transformers classes, small configs.

No weights can be downloaded in tests or CI, so every model class the project uses is built here from a
small config. The shapes mirror SDXL where it matters to our code: two CLIP text encoders whose hidden
sizes sum to the UNet's ``cross_attention_dim``, the second one with a projection that feeds SDXL's
``text_time`` addition embedding, two ``CLIPTokenizer`` with ``model_max_length=77`` (SDXL needs it), and a
UNet with cross-attention transformer blocks at two resolutions.

Public API (stable; the trainer, generation pipeline and demo import it):

- ``tiny_tokenizers(directory=None) -> (CLIPTokenizer, CLIPTokenizer)``
- ``tiny_text_encoders(seed=0) -> (CLIPTextModel, CLIPTextModelWithProjection)``
- ``tiny_unet(seed=0) -> UNet2DConditionModel`` (SDXL-style ``text_time`` addition embedding)
- ``tiny_vae(seed=0) -> AutoencoderKL`` (downscale 8, like SDXL's)
- ``tiny_scheduler() -> EulerDiscreteScheduler`` (SDXL's betas)
- ``tiny_sdxl_components(seed=0, tokenizer_dir=None) -> dict`` and ``tiny_sdxl_pipeline(...)``
- ``benchmark_unet(seed=0)``: SDXL's real widths with one transformer layer per block (large: ~1 B params)
- SD1.5 (one CLIP text encoder, no addition embedding, conv projections, no attention at the lowest
  level, PNDM scheduler): ``tiny_sd15_unet``, ``tiny_sd15_text_encoder``, ``tiny_sd15_components``,
  ``tiny_sd15_pipeline``; its context width ``SD15_TEXT_HIDDEN`` differs from the tiny SDXL's on purpose
- ``TINY_BASES`` (``"tiny"``: SDXL, ``"tiny-sd15"``: SD1.5), ``tiny_components(base)``, ``tiny_pipeline(base)``

The tokenizer vocabulary is byte-level BPE: the 512 CLIP byte symbols plus whole-word merges for
``TINY_WORDS``, so common words are one token and any other word falls back to byte symbols.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

__all__ = [
    "SD15_TEXT_HIDDEN",
    "TINY_BASES",
    "TINY_WORDS",
    "TEXT_HIDDEN",
    "benchmark_unet",
    "tiny_components",
    "tiny_pipeline",
    "tiny_sd15_components",
    "tiny_sd15_pipeline",
    "tiny_sd15_text_encoder",
    "tiny_sd15_unet",
    "tiny_scheduler",
    "tiny_sdxl_components",
    "tiny_sdxl_pipeline",
    "tiny_text_encoders",
    "tiny_tokenizers",
    "tiny_unet",
    "tiny_vae",
    "write_tiny_tokenizer_files",
]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
# Hidden sizes of the two tiny text encoders; their sum is the tiny UNet's cross_attention_dim, as
# 768 + 1280 = 2048 in SDXL.
TEXT_HIDDEN = (32, 32)
PROJECTION_DIM = 32
# The tiny SD1.5's one text encoder (768 in SD1.5): not 64, so an SDXL adapter cannot fit it by accident.
SD15_TEXT_HIDDEN = 48
TINY_BASES = {"tiny": "sdxl", "tiny-sd15": "sd15"}  # model.base / --base names of the random tiny models
ADDITION_TIME_EMBED_DIM = 8

TINY_WORDS = tuple(
    """a an the of on in with and at to by its is are near next behind under over above below
    left right top bottom front back middle center side small large big tiny huge tall short old young
    red green blue yellow white black brown gray grey orange pink purple golden silver wooden metal
    dog cat bird horse cow sheep person man woman child boy girl people car bus truck bike bicycle
    boat plane train tree trees flower flowers grass sky cloud clouds sun water river sea lake beach
    road street building house window door wall floor table chair sofa bed lamp cup plate bowl
    bottle book phone computer laptop clock vase kite ball umbrella bag hat shirt dress jacket
    shoes hand face head hair eyes sitting standing running walking lying holding wearing looking
    shiny wet dry bright dark striped spotted fluffy furry smiling sleeping
    """.split()
)


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP-style byte-level BPE vocabulary with whole-word merges for ``TINY_WORDS``."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    # Merges grow each word from its end ("g</w>" -> "og</w>" -> "dog</w>"): at every step the only
    # applicable merge is the one at the word's end, so no two words' merges can conflict.
    for word in TINY_WORDS:
        suffix = word[-1] + "</w>"
        for char in reversed(word[:-1]):
            merges.append(f"{char} {suffix}")
            suffix = char + suffix
            tokens.append(suffix)
    vocab: dict[str, int] = {}
    for token in tokens + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return vocab, list(dict.fromkeys(merges))


def write_tiny_tokenizer_files(directory: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the tiny CLIP tokenizer into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


_default_dir: Path | None = None


def _default_tokenizer_dir() -> Path:
    """A per-process temporary folder holding the tokenizer files, removed at exit."""
    global _default_dir
    if _default_dir is None:
        _default_dir = Path(tempfile.mkdtemp(prefix="richlayout-tiny-tok-"))
        atexit.register(shutil.rmtree, _default_dir, True)
        write_tiny_tokenizer_files(_default_dir)
    return _default_dir


def tiny_tokenizers(directory: str | Path | None = None) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """The two SDXL tokenizers (the second pads with ``!`` as SDXL's does), written offline and loaded."""
    directory = write_tiny_tokenizer_files(directory) if directory is not None else _default_tokenizer_dir()
    # Without model_max_length=77 SDXL's pipeline overflows converting the default huge max length.
    tok = CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_LENGTH)
    tok_2 = CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_LENGTH, pad_token="!")
    return tok, tok_2


def _text_config(
    hidden: int, vocab_size: int, eos_id: int, bos_id: int, projection_dim: int
) -> CLIPTextConfig:
    """A two-layer CLIP text config with SDXL's 77-token context."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        hidden_act="gelu",
    )


def tiny_text_encoders(seed: int = 0) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's two text encoders, tiny: hidden sizes ``TEXT_HIDDEN``, the second with a projection."""
    vocab, _ = _vocab_and_merges()
    ids = dict(vocab_size=len(vocab), eos_id=vocab[EOS], bos_id=vocab[BOS])
    torch.manual_seed(seed)
    enc = CLIPTextModel(_text_config(TEXT_HIDDEN[0], projection_dim=PROJECTION_DIM, **ids))
    enc_2 = CLIPTextModelWithProjection(_text_config(TEXT_HIDDEN[1], projection_dim=PROJECTION_DIM, **ids))
    return enc.eval(), enc_2.eval()


def tiny_unet(seed: int = 0, *, sample_size: int = 8) -> UNet2DConditionModel:
    """SDXL-shaped UNet, tiny: two levels, cross-attention on both, ``text_time`` addition embedding."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=sum(TEXT_HIDDEN),
        norm_num_groups=1,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        # pooled text projection + 6 size/crop numbers, each time-embedded (as SDXL: 1280 + 6 * 256)
        projection_class_embeddings_input_dim=PROJECTION_DIM + 6 * ADDITION_TIME_EMBED_DIM,
    ).eval()


def benchmark_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL's real widths (320, 640, 1280) and 2048-dim context, one transformer layer per block."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=1,
        # diffusers' historical misnomer: this is the number of heads (64-dim heads, as SDXL)
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """An ``AutoencoderKL`` with SDXL's downscale factor 8 (four blocks) and 4 latent channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    ).eval()


def tiny_scheduler() -> EulerDiscreteScheduler:
    """SDXL's default scheduler: scaled-linear betas 0.00085-0.012 over 1000 steps, epsilon prediction."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


def tiny_sdxl_components(seed: int = 0, tokenizer_dir: str | Path | None = None) -> dict:
    """All components of a ``StableDiffusionXLPipeline``, tiny and random (same keys as its ``__init__``)."""
    tok, tok_2 = tiny_tokenizers(tokenizer_dir)
    enc, enc_2 = tiny_text_encoders(seed)
    return {
        "vae": tiny_vae(seed),
        "text_encoder": enc,
        "text_encoder_2": enc_2,
        "tokenizer": tok,
        "tokenizer_2": tok_2,
        "unet": tiny_unet(seed),
        "scheduler": tiny_scheduler(),
    }


def tiny_sdxl_pipeline(seed: int = 0, tokenizer_dir: str | Path | None = None) -> StableDiffusionXLPipeline:
    """A runnable tiny ``StableDiffusionXLPipeline`` (64x64 images in a fraction of a second on CPU)."""
    return StableDiffusionXLPipeline(**tiny_sdxl_components(seed, tokenizer_dir), add_watermarker=False)


def tiny_sd15_text_encoder(seed: int = 0) -> CLIPTextModel:
    """SD1.5's one text encoder (CLIP-L's ``CLIPTextModel``), tiny: hidden size ``SD15_TEXT_HIDDEN``."""
    vocab, _ = _vocab_and_merges()
    torch.manual_seed(seed)
    config = _text_config(SD15_TEXT_HIDDEN, len(vocab), vocab[EOS], vocab[BOS], projection_dim=PROJECTION_DIM)
    return CLIPTextModel(config).eval()


def tiny_sd15_unet(seed: int = 0, *, sample_size: int = 8) -> UNet2DConditionModel:
    """SD1.5-shaped UNet, tiny: cross-attention on all levels but the lowest, conv projections, no addition embedding."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,  # diffusers' misnomer: heads (SD1.5: 8 heads at every level)
        cross_attention_dim=SD15_TEXT_HIDDEN,
        norm_num_groups=8,
    ).eval()


def tiny_sd15_components(seed: int = 0, tokenizer_dir: str | Path | None = None) -> dict:
    """All components of a ``StableDiffusionPipeline``, tiny and random (no safety checker)."""
    tok, _ = tiny_tokenizers(tokenizer_dir)
    return {
        "vae": tiny_vae(seed),
        "text_encoder": tiny_sd15_text_encoder(seed),
        "tokenizer": tok,
        "unet": tiny_sd15_unet(seed),
        # SD1.5's scheduler config: PNDM over the scaled-linear betas SDXL shares
        "scheduler": PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        "safety_checker": None,
        "feature_extractor": None,
    }


def tiny_sd15_pipeline(seed: int = 0, tokenizer_dir: str | Path | None = None) -> StableDiffusionPipeline:
    """A runnable tiny ``StableDiffusionPipeline`` (64x64 images in a fraction of a second on CPU)."""
    return StableDiffusionPipeline(**tiny_sd15_components(seed, tokenizer_dir), requires_safety_checker=False)


def tiny_components(base: str, seed: int = 0) -> dict:
    """The pipeline components of a ``TINY_BASES`` name."""
    return tiny_sd15_components(seed) if TINY_BASES[base] == "sd15" else tiny_sdxl_components(seed)


def tiny_pipeline(base: str, seed: int = 0) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The runnable pipeline of a ``TINY_BASES`` name."""
    return tiny_sd15_pipeline(seed) if TINY_BASES[base] == "sd15" else tiny_sdxl_pipeline(seed)

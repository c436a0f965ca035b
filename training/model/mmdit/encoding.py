"""Layouts on the MM-DiT token grid and their region texts through the backbone's own encoder.

One transformer token covers ``TOKEN_PX`` = 16 x 16 pixels in both backbones (the VAE's factor 8 times SD3's
patch size 2, or FLUX's 2 x 2 packing of the latent). Region reorganization is
``training.layout.regions.reorganize_regions`` with ``downscale=16``: boxes are rasterized to tokens, not to
latent pixels, and the token order (row-major over ``H/16 x W/16``) is the one both transformers use
(SD3's ``PatchEmbed``, FLUX's ``_pack_latents``).

Region texts (docs/METHOD.md §10.3): by default the backbone's T5 (SD3's ``text_encoder_3``, FLUX's
``text_encoder_2``), ``region_tokens`` tokens per region text, since a region's text joins the descriptions of
every object covering it and CLIP's 77 cut those; ``region_encoder: clip`` takes the backbone's CLIP(s) at 77
tokens as the paper did (SD3: CLIP-L + CLIP-G, 2048 features as SDXL's; FLUX: CLIP-L, 768).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from training.layout.regions import RegionLayout, empty_layout, latent_grid, reorganize_regions
from training.model.encoding import N_TOKENS, RegionTextEncoder

__all__ = [
    "TOKEN_PX",
    "empty_token_layout",
    "image_ids",
    "pack_latents",
    "region_encoder_parts",
    "region_text_dim",
    "region_text_encoder",
    "token_grid",
    "token_layout",
]

TOKEN_PX = 16  # pixels per transformer token: VAE factor 8 x patch 2


def token_grid(height: int, width: int) -> tuple[int, int]:
    """Token grid ``(H/16, W/16)``; a side that is not a positive multiple of 16 is a ValueError."""
    return latent_grid(height, width, TOKEN_PX)


def token_layout(boxes, texts: list[str], height: int, width: int, **options) -> RegionLayout:
    """Region reorganization of a layout on the token grid (``reorganize_regions``' options pass through)."""
    return reorganize_regions(boxes, texts, height, width, downscale=TOKEN_PX, **options)


def empty_token_layout(height: int, width: int) -> RegionLayout:
    """The layout with no region on the token grid (CFG's negative branch, a dropped layout)."""
    return empty_layout(height, width, TOKEN_PX)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's token sequence of latents ``(B, C, h, w)``: 2 x 2 patches, row-major, ``(B, h/2 * w/2, 4C)``."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h_tokens: int, w_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """FLUX's RoPE positions of the image tokens, ``(h * w, 3)``: (0, row, column) in raster order."""
    rows = torch.arange(h_tokens, device=device).repeat_interleave(w_tokens)
    cols = torch.arange(w_tokens, device=device).repeat(h_tokens)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()


# (tokenizer, text encoder) component names of each backbone's T5 and CLIP(s), in the pipelines' keys.
_PARTS = {
    ("sd3", "t5"): (("tokenizer_3", "text_encoder_3"),),
    ("sd3", "clip"): (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
    ("flux", "t5"): (("tokenizer_2", "text_encoder_2"),),
    ("flux", "clip"): (("tokenizer", "text_encoder"),),
}


def region_encoder_parts(backbone: str, kind: str) -> tuple[tuple[str, str], ...]:
    """The pipeline components (tokenizer, encoder) that encode region texts for ``kind`` (``t5`` / ``clip``)."""
    return _PARTS[(backbone, kind)]


def region_text_encoder(
    components: Mapping, backbone: str, kind: str, n_tokens: int, *, cache_size: int = 1024, separator: str = "any"
) -> RegionTextEncoder:
    """The cached region-text encoder over the pipeline's own frozen tokenizer(s) and encoder(s)."""
    parts = region_encoder_parts(backbone, kind)
    missing = [enc for _, enc in parts if components.get(enc) is None]
    if missing:
        raise ValueError(
            f"region_encoder {kind} needs the {backbone} pipeline's {', '.join(missing)}, which is not loaded "
            "(SD3 without T5: use region_encoder: clip)"
        )
    tokens = N_TOKENS if kind == "clip" else n_tokens
    return RegionTextEncoder(
        [components[tok] for tok, _ in parts],
        [components[enc] for _, enc in parts],
        cache_size=cache_size,
        separator=separator,
        n_tokens=tokens,
    )


def region_text_dim(base: str, backbone: str, kind: str, *, revision: str | None = None) -> int:
    """Features per region-text token of a base, from its text encoders' configs only (no weights load)."""
    from transformers import AutoConfig

    total = 0
    for _, encoder in region_encoder_parts(backbone, kind):
        config = AutoConfig.from_pretrained(base, subfolder=encoder, revision=revision)
        total += config.d_model if kind == "t5" else config.hidden_size
    return total

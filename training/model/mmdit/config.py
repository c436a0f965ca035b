"""Which MM-DiT a base is, and the shape of its regional adapter (stored in the adapter file's metadata).

Imports only the fusers' constants (lazily), so ``training.model.adapter`` can ask it
whether a base or an adapter file is an MM-DiT one without an import cycle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BLOCK_CHOICES",
    "MMDIT_BACKBONES",
    "MMDIT_TINY_BASES",
    "REGION_ENCODERS",
    "TRANSFORMER_CLASSES",
    "MMDiTAdapterConfig",
    "mmdit_backbone_of_base",
]

MMDIT_BACKBONES = ("sd3", "flux")
MMDIT_TINY_BASES = {"tiny-sd3": "sd3", "tiny-flux": "flux"}  # model.base / --base names of the tiny builds
# diffusers' class of each backbone's transformer, as its transformer/config.json names it
TRANSFORMER_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
# "all": every block; "joint": the blocks with a text stream of their own (FLUX's double-stream blocks, every
# SD3 block); "every_other": blocks 0, 2, 4, ... of the backbone's blocks in execution order.
BLOCK_CHOICES = ("all", "joint", "every_other")
REGION_ENCODERS = ("t5", "clip")


@dataclass(frozen=True)
class MMDiTAdapterConfig:
    """Shape of an MM-DiT regional adapter; its fields are saved in the safetensors metadata."""

    backbone: str = "flux"  # "sd3" or "flux": read from the transformer when attached
    model_type: str = "ca"  # "ca": regional cross-attention; "casa": then regional self-attention too
    implementation: str = "packed"  # "packed" or "naive" (the release's form, a test reference)
    blocks: str = "all"  # where fusers sit (BLOCK_CHOICES)
    heads: int | None = None  # fuser heads of the host's head size; None: half the host's heads
    region_encoder: str = "t5"  # region texts through the backbone's T5 (long rich texts) or its CLIP(s), 77 tokens
    region_tokens: int = 128  # tokens per region text with T5 (CLIP: 77)
    text_dim: int | None = None  # features per region-text token; None: the region encoder's, set when attached
    context_dim: int | None = None  # the position net's output width; None: the fuser's inner width
    fourier_freqs: int = 8  # frequencies of the box embedding (8 -> 64 dims)
    hidden_dim: int = 512  # width of the position net's MLP

    def __post_init__(self) -> None:
        from training.model.attention import IMPLEMENTATIONS
        from training.model.casa import MODEL_TYPES

        for name, value, allowed in (
            ("backbone", self.backbone, MMDIT_BACKBONES),
            ("model_type", self.model_type, MODEL_TYPES),
            ("implementation", self.implementation, IMPLEMENTATIONS),
            ("blocks", self.blocks, BLOCK_CHOICES),
            ("region_encoder", self.region_encoder, REGION_ENCODERS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        for name in ("heads", "region_tokens", "text_dim", "context_dim", "fourier_freqs", "hidden_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def from_json(cls, text: str) -> MMDiTAdapterConfig:
        """The config of an adapter file's metadata; unknown fields are an error naming them."""
        fields = json.loads(text)
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown MM-DiT adapter config fields {unknown}")
        return cls(**fields)


def mmdit_backbone_of_base(base: str, *, revision: str | None = None) -> str | None:
    """``"sd3"`` / ``"flux"`` for a tiny name or a pipeline folder / hub id whose transformer is one; else None.

    Reads only ``model_index.json`` (or a transformer folder's ``config.json``): a base without one is not
    an MM-DiT, and the caller goes on with its UNet.
    """
    if base in MMDIT_TINY_BASES:
        return MMDIT_TINY_BASES[base]
    local = Path(base)
    if local.is_dir():
        for name in ("model_index.json", "config.json"):
            if (local / name).is_file():
                return _backbone_of_index(json.loads((local / name).read_text()))
        return None
    if base.count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HFValidationError

        path = hf_hub_download(base, "model_index.json", revision=revision)
    except (OSError, ValueError, HFValidationError):  # offline and not cached, or not a pipeline: not ours
        return None
    return _backbone_of_index(json.loads(Path(path).read_text()))


def _backbone_of_index(index: dict) -> str | None:
    """The backbone named by a pipeline's ``model_index.json`` or a transformer's ``config.json``."""
    name = index.get("_class_name")
    if name in TRANSFORMER_CLASSES:
        return TRANSFORMER_CLASSES[name]
    transformer = index.get("transformer")
    if isinstance(transformer, list) and len(transformer) == 2:
        return TRANSFORMER_CLASSES.get(transformer[1])
    return None

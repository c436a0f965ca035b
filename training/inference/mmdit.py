"""``LayoutPipeline``'s MM-DiT side: the stock ``StableDiffusion3Pipeline`` / ``FluxPipeline`` with the regional
adapter on their transformer (docs/METHOD.md §10.5).

The layout reaches the transformer as ``joint_attention_kwargs={LAYOUT_KEY: ...}`` (the stock pipelines pass
that dict to every transformer call); ``training.inference.pipeline.LayoutPipeline`` validates the call, builds
the regions on the token grid and removes the layout after the scheduled-sampling steps, as for the UNets.
Guidance differs per backbone:

- SD3: classifier-free guidance with a negative branch, as SDXL: the negative rows get the empty layout.
- FLUX.1-dev is guidance-distilled: ``guidance_scale`` is the distilled guidance input, one transformer call
  per step, no negative branch, so the layout is not guided by default. With ``true_cfg_scale > 1`` (and a
  negative prompt) FLUX's pipeline adds a second call per step, after the first: it gets the empty layout
  (:class:`AlternatingLayout`), true CFG of both prompt and layout, at twice the cost.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from training.model.adapter import adapter_config_of
from training.model.encoding import RegionTextEncoder
from training.model.mmdit.adapter import (
    attach_mmdit_adapter,
    backbone_of_transformer,
    is_mmdit,
    load_mmdit_adapter,
)
from training.model.mmdit.config import MMDiTAdapterConfig
from training.model.mmdit.encoding import region_text_encoder

__all__ = [
    "AlternatingLayout",
    "attach_to_pipeline",
    "denoiser",
    "is_mmdit_pipeline",
    "mmdit_pipeline_class",
    "mmdit_region_encoder",
    "mmdit_stock_pipeline",
]

log = logging.getLogger(__name__)


def is_mmdit_pipeline(pipe: object) -> bool:
    """Whether ``pipe`` is a stock pipeline around an SD3 / FLUX.1 transformer."""
    return is_mmdit(getattr(pipe, "transformer", None))


def denoiser(pipe: Any) -> torch.nn.Module:
    """The pipeline's UNet, or its MM-DiT's transformer."""
    return pipe.transformer if is_mmdit_pipeline(pipe) else pipe.unet


def mmdit_pipeline_class(backbone: str) -> type:
    """The stock pipeline of a backbone."""
    return StableDiffusion3Pipeline if backbone == "sd3" else FluxPipeline


def mmdit_stock_pipeline(components: dict[str, Any]) -> StableDiffusion3Pipeline | FluxPipeline:
    """The stock pipeline of a components dict: SD3 (three text encoders) or FLUX.1 (two)."""
    if "text_encoder_3" in components:
        return StableDiffusion3Pipeline(**components)
    return FluxPipeline(**{"image_encoder": None, "feature_extractor": None, **components})


def mmdit_region_encoder(pipe: Any, cache_size: int, separator: str = "any") -> RegionTextEncoder:
    """The region-text encoder the transformer's adapter was made with (its config: T5 or CLIP, token count)."""
    config: MMDiTAdapterConfig = pipe.transformer.regional_adapter_config
    return region_text_encoder(
        pipe.components, config.backbone, config.region_encoder, config.region_tokens,
        cache_size=cache_size, separator=separator,
    )


def attach_to_pipeline(
    pipe: Any,
    adapter: str | Path | None,
    ema: str | Path | None,
    adapter_config: MMDiTAdapterConfig | None,
) -> None:
    """Attach the adapter its weights' metadata names (if absent), then load ``adapter`` and, over it, ``ema``."""
    transformer = pipe.transformer
    if getattr(transformer, "position_net", None) is None:
        source = adapter or ema
        config = adapter_config
        ours = backbone_of_transformer(transformer)
        if config is None and source is not None:
            config = adapter_config_of(source)
            if config.backbone != ours:  # one error naming both, before any key is compared
                raise ValueError(
                    f"{source}: a {config.backbone or 'UNet'} adapter does not fit this {ours} model "
                    f"({type(transformer).__name__}): use the base model it was made for"
                )
        config = config or MMDiTAdapterConfig(backbone=ours)
        parts = region_text_encoder(pipe.components, config.backbone, config.region_encoder, config.region_tokens)
        attach_mmdit_adapter(transformer, config, parts.hidden_size)
    for source in (adapter, ema):
        if source is not None:
            report = load_mmdit_adapter(transformer, source)
            log.info("%s: loaded %d adapter tensors", source, report.loaded)


class AlternatingLayout:
    """FLUX's true CFG: the layout for the first transformer call of each step, the empty layout for the second.

    The stock pipeline calls the transformer for the prompt, then for the negative prompt, with the same
    ``joint_attention_kwargs``; the adapter's hook calls this object once per forward.
    """

    def __init__(self, positive: dict[str, torch.Tensor], negative: dict[str, torch.Tensor]) -> None:
        self.inputs = (positive, negative)
        self.calls = 0

    @classmethod
    def of_rows(cls, gligen: dict[str, torch.Tensor], rows: int) -> AlternatingLayout:
        """From CFG's grounding inputs: ``rows`` empty layouts, then ``rows`` copies of the layout."""
        return cls({k: v[rows:] for k, v in gligen.items()}, {k: v[:rows] for k, v in gligen.items()})

    def __call__(self) -> dict[str, torch.Tensor]:
        inputs = self.inputs[self.calls % 2]
        self.calls += 1
        return inputs

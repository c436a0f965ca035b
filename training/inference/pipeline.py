"""Layout-to-image generation on the stock ``StableDiffusionXLPipeline`` or ``StableDiffusionPipeline`` (docs/METHOD.md §7).

Nothing of diffusers' ``__call__`` is copied: the layout reaches the UNet as
``cross_attention_kwargs={"gligen": ...}`` (the hook where diffusers calls ``position_net`` and every
block's ``fuser``), and a step-end callback switches it off for scheduled sampling::

    pipe = LayoutPipeline.from_pretrained("hotshotco/SDXL-512", adapter="adapter/adapter.safetensors",
                                          ema="adapter/adapter_ema.safetensors", dtype=torch.float16)
    image = pipe("a beach at sunset", boxes=[[32, 40, 200, 300]], labels=["a red kite with a long tail"],
                 height=512, width=512, num_inference_steps=50, guidance_scale=5.0,
                 scheduled_sampling_beta=1.0, generator=torch.Generator().manual_seed(0)).images[0]

The backbone (SDXL or SD1.5) is the base model's, read from its UNet config: ``from_pretrained`` loads
the matching stock pipeline, and an adapter saved for the other backbone is an error naming both, raised
before the base model loads. The call is the same for both.

Semantics:

- Classifier-free guidance: the positive rows get the layout, the negative rows the empty layout (no
  region: every pixel's fuser output is ``x + null_text_feat``), as the layout dropout trained it. ``negative_prompt`` defaults to ``""``, encoded as
  training encodes a dropped caption (not SDXL's zeroed embeddings).
- ``scheduled_sampling_beta`` in [0, 1]: the layout is active for the first ``ceil(beta * T)`` denoising
  steps (``T`` = the pipeline's timesteps) and then removed, so the rest runs the base UNet exactly.
  ``beta = 0`` never passes the layout, and no layout (``boxes=None`` or empty) is the base SDXL.
- ``rasterize``: the box-to-latent-cell rule of region reorganization, ``"cover"`` (default) or
  ``"release"`` (the release's rule, which its weights were trained with: bit-exact reproduction of its
  images, docs/METHOD.md §9); set once in the constructor or per call. A pipeline built with
  ``rasterize="release"`` also follows the release's other layout rules: it splits a region's text only at
  the token of ``";"`` alone (``training.model.encoding.separator_ids``), and a layout with more regions
  than ``max_slots`` keeps the release's seeded draw of them (``training.layout.regions``; the seed is
  the call's ``region_seed``, by default the generator's seed).
- Bad input fails before any model runs with a ``ValueError`` (``training.layout.files.validate_layout``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline

from training.inference import mmdit
from training.layout.files import validate_layout, validate_size
from training.layout.regions import RASTERIZE_RULES, Rasterize, empty_layout, reorganize_regions
from training.model.adapter import (
    AdapterConfig,
    adapter_config_of,
    adapter_state_dict,
    attach_regional_adapter,
    backbone_of_base,
    backbone_of_unet,
    load_adapter,
)
from training.model.encoding import RegionTextEncoder, grounding_inputs
from training.model.lora import load_lora
from training.model.mmdit.adapter import LAYOUT_KEY
from training.model.mmdit.config import MMDIT_BACKBONES
from training.model.mmdit.encoding import TOKEN_PX

log = logging.getLogger(__name__)

__all__ = ["BasePipeline", "LayoutPipeline", "active_layout_steps", "load_adapter_weights", "stock_pipeline"]

BasePipeline = StableDiffusionXLPipeline | StableDiffusionPipeline


def stock_pipeline(components: dict[str, Any]) -> BasePipeline:
    """The stock diffusers pipeline of a components dict: SDXL with a second text encoder, else SD1.5.

    No watermarker (SDXL) and no safety checker (SD1.5): generated layouts are scored, not published.
    A ``transformer`` makes it SD3's or FLUX.1's (``training.inference.mmdit``).
    """
    if "transformer" in components:
        return mmdit.mmdit_stock_pipeline(components)
    if components.get("text_encoder_2") is not None:
        return StableDiffusionXLPipeline(**components, add_watermarker=False)
    parts = {"safety_checker": None, "feature_extractor": None, **components}
    return StableDiffusionPipeline(**parts, requires_safety_checker=False)


def active_layout_steps(beta: float, num_timesteps: int) -> int:
    """How many first steps keep the layout: ``ceil(beta * T)``, so any ``beta > 0`` grounds at least one."""
    # round() first: 0.7 * 10 is 7.000000000000001 in floating point.
    return math.ceil(round(beta * num_timesteps, 9))


def load_adapter_weights(unet: torch.nn.Module, path: str | Path, *, ema: bool = False) -> None:
    """Load an adapter by key names: ours, the release's extracted file, a whole-UNet file or a raw trainer
    checkpoint (``ema``: its EMA copy). Base-UNet keys are skipped (the base stays as loaded); a missing
    adapter weight or a key the model lacks (a ``casa`` file on a ``ca`` model) is an error naming them.
    """
    report = load_adapter(unet, path, ema=ema)
    log.info("%s: loaded %d adapter tensors", path, report.loaded)


class LayoutPipeline:
    """A stock SDXL / SD1.5 pipeline whose UNet carries the regional adapter, called with a layout."""

    def __init__(
        self,
        sdxl: BasePipeline,
        *,
        max_objects: int = 30,
        max_regions: int = 120,
        max_slots: int = 30,
        text_cache_size: int = 1024,
        rasterize: Rasterize = "cover",
    ) -> None:
        self.mmdit = mmdit.is_mmdit_pipeline(sdxl)
        if getattr(mmdit.denoiser(sdxl), "position_net", None) is None:
            raise ValueError(
                "the UNet has no regional adapter: use from_pretrained / from_sdxl, or attach one"
            )
        self.pipe = sdxl
        self.backbone = (
            sdxl.transformer.regional_adapter_config.backbone if self.mmdit else backbone_of_unet(sdxl.unet.config)
        )
        self.downscale = TOKEN_PX if self.mmdit else 8  # region cells: transformer tokens or latent pixels
        self.max_objects = max_objects
        self.max_regions = max_regions
        self.max_slots = max_slots
        self.rasterize = _check_rasterize(rasterize)
        # Region texts are static per image: the encoder caches them, so repeated labels encode once.
        separator = "release" if self.rasterize == "release" else "any"
        self.region_encoder = (
            mmdit.mmdit_region_encoder(sdxl, text_cache_size, separator)
            if self.mmdit
            else RegionTextEncoder(*text_models(sdxl.components), cache_size=text_cache_size, separator=separator)
        )

    @property
    def sdxl(self) -> BasePipeline:
        """The wrapped stock pipeline (the name predates SD1.5; ``pipe`` is the same object)."""
        return self.pipe

    @classmethod
    def from_sdxl(
        cls,
        sdxl: BasePipeline,
        adapter: str | Path | None = None,
        ema: str | Path | None = None,
        adapter_config: AdapterConfig | None = None,
        *,
        lora: str | Path | None = None,
        checkpoint_ema: bool = False,
        **kwargs: Any,
    ) -> LayoutPipeline:
        """Attach the adapter to ``sdxl.unet`` (if absent), then load ``adapter`` and, over it, ``ema`` weights.

        ``sdxl``: a stock SDXL or SD1.5 pipeline (``from_pipe`` is the same method). The fuser (``ca`` or
        ``casa``) is the one the weights' metadata (or keys) name; weights saved for the other backbone
        are an error naming both. ``checkpoint_ema``:
        ``adapter`` is a raw trainer checkpoint holding both copies; load its EMA weights.
        ``lora``: the trainer's LoRA file of the base attention (``lora.safetensors`` or
        ``lora_ema.safetensors``, when it trained with ``model.lora_rank``), loaded into the UNet.
        """
        if mmdit.is_mmdit_pipeline(sdxl):  # SD3 / FLUX.1: the adapter on the transformer
            mmdit.attach_to_pipeline(sdxl, adapter, ema, adapter_config)
            if adapter is not None or ema is not None:
                _check_finite(sdxl.transformer, ema or adapter)
            if lora is not None:
                load_lora(sdxl.transformer, lora)
            return cls(sdxl, **kwargs)
        unet = sdxl.unet
        if getattr(unet, "position_net", None) is None:
            source = adapter or ema
            config = adapter_config or (
                adapter_config_of(source, ema=checkpoint_ema and source == adapter)
                if source
                else AdapterConfig()
            )
            attach_regional_adapter(unet, config)
        if adapter is not None:
            load_adapter_weights(unet, adapter, ema=checkpoint_ema)
        if ema is not None:
            load_adapter_weights(unet, ema)
        if adapter is None and ema is None:
            log.warning("no adapter weights given: the adapter is freshly initialised (an exact no-op)")
        else:
            _check_finite(unet, ema or adapter)
        if lora is not None:
            load_lora(unet, lora)
        return cls(sdxl, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        base: str,
        adapter: str | Path | None = None,
        ema: str | Path | None = None,
        *,
        vae: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        variant: str | None = None,
        adapter_config: AdapterConfig | None = None,
        lora: str | Path | None = None,
        checkpoint_ema: bool = False,
        **kwargs: Any,
    ) -> LayoutPipeline:
        """Load a base SDXL or SD1.5 (hub id or folder; optionally another VAE), attach and load the adapter.

        The stock pipeline is the one of the base's backbone (its UNet config); an adapter file saved
        for the other backbone fails here, before the base model loads.
        """
        backbone = backbone_of_base(base)
        for source in (adapter, ema):
            if source is not None and Path(source).suffix == ".safetensors":
                made_for = adapter_config_of(source).backbone
                if made_for not in (None, backbone):
                    raise ValueError(
                        f"{source}: a {made_for} adapter cannot load into the {backbone} model {base}"
                    )
        extra: dict[str, Any] = {}
        if vae is not None:
            extra["vae"] = AutoencoderKL.from_pretrained(vae, torch_dtype=dtype)
        if backbone in MMDIT_BACKBONES:
            pipeline_class = mmdit.mmdit_pipeline_class(backbone)
        elif backbone == "sdxl":
            extra["add_watermarker"] = False
            pipeline_class = StableDiffusionXLPipeline
        else:
            extra.update(safety_checker=None, requires_safety_checker=False)
            pipeline_class = StableDiffusionPipeline
        sdxl = pipeline_class.from_pretrained(base, torch_dtype=dtype, variant=variant, **extra)
        if device is not None:
            sdxl = sdxl.to(device)
        return cls.from_sdxl(
            sdxl, adapter, ema, adapter_config, lora=lora, checkpoint_ema=checkpoint_ema, **kwargs
        )

    from_pipe = from_sdxl

    def to(self, device: str | torch.device) -> LayoutPipeline:
        """Move the models (the adapter with the UNet)."""
        self.sdxl.to(device)
        return self

    def _gligen(
        self,
        boxes: np.ndarray,
        labels: Sequence[str],
        height: int,
        width: int,
        rows: int,
        cfg: bool,
        scale: float,
        rasterize: Rasterize,
        seed: int,
    ) -> dict[str, torch.Tensor]:
        """The payload: ``rows`` copies of the layout, after as many empty layouts when CFG is on."""
        layout = reorganize_regions(
            boxes,
            list(labels),
            height,
            width,
            max_objs=self.max_objects,
            max_regions=self.max_regions,
            max_slots=self.max_slots,
            rasterize=rasterize,
            seed=seed,
            downscale=self.downscale,
        )
        if layout.n_regions > layout.n_slots:
            log.warning(
                "layout has %d regions; kept %d (max_slots: %s), the others get the null feature",
                layout.n_regions,
                layout.n_slots,
                f"the release's draw, seed {seed}" if rasterize == "release" else "the largest",
            )
        negative = [empty_layout(height, width, self.downscale)] * rows if cfg else []
        unet = mmdit.denoiser(self.sdxl)
        return grounding_inputs(
            negative + [layout] * rows,
            self.region_encoder,
            max_slots=self.max_slots,
            attention_weight_scale=scale,
            device=unet.device,
            dtype=unet.dtype,
        )

    def __call__(
        self,
        prompt: str | None = None,
        boxes: object = None,
        labels: Sequence[str] | None = None,
        negative_prompt: str | None = "",
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        scheduled_sampling_beta: float = 1.0,
        attention_weight_scale: float = 1.0,
        generator: torch.Generator | None = None,
        rasterize: Rasterize | None = None,
        region_seed: int | None = None,
        **sdxl_kwargs: Any,
    ) -> Any:
        """Generate one prompt with one layout; ``sdxl_kwargs`` go to the stock pipeline unchanged.

        Returns the stock pipeline's output (``.images``).
        ``boxes``: ``(N, 4)`` xyxy pixels of the output image; ``labels``: ``N`` descriptions.
        ``rasterize``: this call's box-to-cell rule (default: the constructor's). ``region_seed``: the
        release's draw of regions beyond ``max_slots`` under ``"release"`` (default: the generator's seed, else 0).
        ``negative_prompt=None``: the stock pipeline's own negative (SDXL: zero embeddings, as the release
        without a negative prompt).
        """
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError("prompt must be one string: the pipeline takes one layout per call")
        kwarg, key = ("joint_attention_kwargs", LAYOUT_KEY) if self.mmdit else ("cross_attention_kwargs", "gligen")
        if kwarg in sdxl_kwargs:
            raise ValueError(f"{kwarg} is set by the layout pipeline; pass boxes and labels")
        validate_size(height, width)
        if height % self.downscale or width % self.downscale:
            raise ValueError(f"height and width must be multiples of {self.downscale}, got {height}x{width}")
        rule = self.rasterize if rasterize is None else _check_rasterize(rasterize)
        if not (isinstance(scheduled_sampling_beta, int | float) and 0.0 <= scheduled_sampling_beta <= 1.0):
            raise ValueError(f"scheduled_sampling_beta must be in [0, 1], got {scheduled_sampling_beta!r}")
        if not math.isfinite(attention_weight_scale):
            raise ValueError(f"attention_weight_scale must be finite, got {attention_weight_scale!r}")
        if (boxes is None) != (labels is None):
            raise ValueError("pass boxes and labels together (or neither, for no layout)")
        box_array = validate_layout(
            [] if boxes is None else boxes, labels or [], height, width, max_objects=self.max_objects
        )

        attention: dict[str, Any] = {}
        if len(box_array) and scheduled_sampling_beta > 0:
            rows = sdxl_kwargs.get("num_images_per_prompt") or 1
            # FLUX: no negative rows; with true CFG a second call per step (mmdit.AlternatingLayout).
            true_cfg = self.backbone == "flux" and sdxl_kwargs.get("true_cfg_scale", 1.0) > 1 and negative_prompt is not None
            if self.mmdit:
                cfg = true_cfg or (self.backbone == "sd3" and guidance_scale > 1)
            else:
                cfg = guidance_scale > 1 and self.sdxl.unet.config.time_cond_proj_dim is None  # as SDXL decides
            if region_seed is None:
                region_seed = generator.initial_seed() if isinstance(generator, torch.Generator) else 0
            attention[key] = self._gligen(
                box_array, labels, height, width, rows, cfg, attention_weight_scale, rule, region_seed
            )
            if true_cfg:
                attention[key] = mmdit.AlternatingLayout.of_rows(attention[key], rows)
        user_callback = sdxl_kwargs.pop("callback_on_step_end", None)
        return self.sdxl(
            prompt=prompt or "",
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            callback_on_step_end=_layout_schedule(attention, scheduled_sampling_beta, user_callback, key),
            **{kwarg: attention},
            **sdxl_kwargs,
        )


def _check_finite(unet: torch.nn.Module, source: str | Path) -> None:
    """Adapter weights holding NaN or inf would make every image black: an error naming the file."""
    bad = [k for k, v in adapter_state_dict(unet).items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{source}: {len(bad)} adapter tensors hold NaN or inf, e.g. {bad[:3]}")


def _check_rasterize(rasterize: object) -> Rasterize:
    """``rasterize`` if it names a rule, else a ValueError listing the rules."""
    if rasterize not in RASTERIZE_RULES:
        raise ValueError(f"rasterize must be one of {list(RASTERIZE_RULES)}, got {rasterize!r}")
    return rasterize  # type: ignore[return-value]


def _layout_schedule(
    attention: dict[str, Any], beta: float, user_callback: Callable | None, key: str = "gligen"
) -> Callable:
    """A step-end callback removing the layout after the first ``active_layout_steps(beta, T)`` steps."""

    def callback(pipe: BasePipeline, step: int, timestep: Any, tensors: dict) -> dict:
        # The pipeline holds this very dict as its cross_attention_kwargs and the UNet copies it before
        # use, so removing the key here drops the layout from the next step on.
        if key in attention and step + 1 >= active_layout_steps(beta, pipe.num_timesteps):
            del attention[key]
        return user_callback(pipe, step, timestep, tensors) if user_callback is not None else tensors

    return callback


def text_models(components: dict[str, Any]) -> tuple[list, list]:
    """The pipeline's tokenizers and text encoders, in order: SDXL's two, SD1.5's one."""
    names = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
    pairs = [(components[t], components[e]) for t, e in names if components.get(e) is not None]
    return [t for t, _ in pairs], [e for _, e in pairs]

"""The regional adapter on a stock diffusers MM-DiT (SD3 / SD3.5, FLUX.1), attached through module hooks.

Where the fuser sits (docs/METHOD.md §10): right after each chosen block's joint attention, on the image
tokens of its output, before the block's adaLN gate and residual::

    joint attention -> [image part: fuser(a) = a + W_o Attn_region(W_q a, ...)] -> gate_msa * . -> + residual

- FLUX double-stream (``FluxTransformerBlock``) and SD3 joint blocks (``JointTransformerBlock``): the attention
  returns ``(image, text)``; the fuser rewrites the image part.
- FLUX single-stream (``FluxSingleTransformerBlock``): the attention runs over ``[text; image]`` and returns
  one sequence; the image tokens are its tail (the last ``h x w`` of the region map's token grid), and the
  fused tail goes on through the block's ``proj_out`` with the MLP branch.
- SD3.5's extra image-only attention (``attn2``) is left alone.

So the update reaches the stream through the block's own timestep-conditioned gate, as the UNet's fuser
sits between self- and cross-attention. The fuser is ``training.model.attention.RegionalCrossAttention`` (or
``casa``'s) unchanged: pixels are transformer tokens, and the region map is on the token grid (boxes
rasterized with ``downscale = 16``: VAE 8 x patch 2; ``training.model.mmdit.encoding``).

How the layout travels: the caller puts the grounding inputs (``grounding_inputs(...)`` on the token grid) in
``joint_attention_kwargs[LAYOUT_KEY]`` (the stock pipelines pass that dict to the transformer, and the
transformer to every block's attention). A forward pre-hook on the transformer runs ``position_net`` once and
puts its output in the dict; pre-hooks on every block attention take it out again (a processor never sees an
unknown keyword); post-hooks on the chosen attentions apply the fusers. Under gradient checkpointing a block
is recomputed with the same dict, so its hooks run again. No diffusers file is copied.

A fresh adapter leaves the output exactly unchanged (zero-initialised ``to_out`` and null features: ``a + 0``);
the empty layout has no region (every token gets ``a + null_text_feat``, zero when fresh).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from training.model.adapter import ADAPTER_FORMAT, LoadReport, check_adapter_keys, is_adapter_key
from training.model.attention import PositionNet, RegionalCrossAttention
from training.model.casa import RegionalCrossAndSelfAttention
from training.model.mmdit.config import MMDiTAdapterConfig

__all__ = [
    "LAYOUT_KEY",
    "attach_mmdit_adapter",
    "backbone_of_transformer",
    "fuser_sites",
    "is_mmdit",
    "load_mmdit_adapter",
    "mmdit_adapter_config_of",
]

log = logging.getLogger(__name__)

LAYOUT_KEY = "regional_layout"  # joint_attention_kwargs key: grounding inputs, or a callable returning them
_OBJS_KEY = "_regional_objs"  # the position net's output, on its way from the transformer to the blocks


def is_mmdit(model: nn.Module) -> bool:
    """Whether ``model`` is an MM-DiT transformer this adapter attaches to."""
    return isinstance(model, SD3Transformer2DModel | FluxTransformer2DModel)


def backbone_of_transformer(transformer: nn.Module) -> str:
    """``"sd3"`` or ``"flux"``; any other model is a ValueError naming its class."""
    if isinstance(transformer, SD3Transformer2DModel):
        return "sd3"
    if isinstance(transformer, FluxTransformer2DModel):
        return "flux"
    raise ValueError(f"{type(transformer).__name__} is not an MM-DiT transformer (SD3 or FLUX.1)")


def fuser_sites(transformer: nn.Module, blocks: str = "all") -> list[tuple[str, nn.Module]]:
    """The blocks that get a fuser, with their qualified names, in execution order."""
    backbone = backbone_of_transformer(transformer)
    joint = [(f"transformer_blocks.{i}", b) for i, b in enumerate(transformer.transformer_blocks)]
    single = []
    if backbone == "flux":
        single = [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(transformer.single_transformer_blocks)]
    if blocks == "joint":
        return joint
    sites = joint + single
    return sites[::2] if blocks == "every_other" else sites


def _host_dims(transformer: nn.Module) -> tuple[int, int, int]:
    """(width, heads, head size) of the transformer's attention."""
    heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    return heads * head_dim, heads, head_dim


def attach_mmdit_adapter(
    transformer: nn.Module, config: MMDiTAdapterConfig, text_dim: int, *, device: torch.device | str | None = None
) -> nn.Module:
    """Set ``transformer.position_net`` and a zero-initialised ``fuser`` on each chosen block, with the hooks.

    ``text_dim``: features per region-text token of the region encoder (``region_text_encoder(...).hidden_size``).
    ``config.backbone`` naming the other backbone is an error naming both. Returns the transformer (in place).
    ``device``: where the adapter lives (default: the transformer's; ``"cpu"`` beside a base on the meta
    device initialises an adapter from the base's config alone, as ``init_adapter`` does).
    """
    backbone = backbone_of_transformer(transformer)
    if config.backbone != backbone:
        raise ValueError(
            f"a {config.backbone} adapter cannot attach to a {backbone} transformer "
            f"({type(transformer).__name__}): use the base model it was made for"
        )
    if config.text_dim not in (None, text_dim):
        raise ValueError(
            f"the adapter was made for {config.text_dim}-dim region-text features, the region encoder gives "
            f"{text_dim} ({config.region_encoder}): use the base model it was made for"
        )
    if hasattr(transformer, "position_net"):
        raise ValueError("the transformer already has a regional adapter")
    width, host_heads, head_dim = _host_dims(transformer)
    heads = config.heads or max(1, host_heads // 2)
    context_dim = config.context_dim or heads * head_dim
    config = replace(config, text_dim=text_dim, heads=heads, context_dim=context_dim)
    param = next(transformer.parameters())
    place = {"device": device or param.device, "dtype": param.dtype}
    transformer.position_net = PositionNet(text_dim, context_dim, config.fourier_freqs, config.hidden_dim).to(**place)
    fuser_class = RegionalCrossAndSelfAttention if config.model_type == "casa" else RegionalCrossAttention
    sites = fuser_sites(transformer, config.blocks)
    for _, block in sites:
        block.fuser = fuser_class(width, context_dim, heads, head_dim, config.implementation).to(**place)
    handles = [transformer.register_forward_pre_hook(_transformer_pre_hook, with_kwargs=True)]
    fused = {id(block) for _, block in sites}
    for _, block in fuser_sites(transformer, "all"):
        for name, child in block.named_children():
            if not name.startswith("attn"):
                continue
            host = block if (name == "attn" and id(block) in fused) else None
            handles.append(child.register_forward_pre_hook(_attention_pre_hook(host), with_kwargs=True))
            if host is not None:
                handles.append(child.register_forward_hook(_attention_post_hook(block)))
    transformer.regional_adapter_config = config
    transformer._regional_hook_handles = handles
    log.info("attached regional adapter (%s, %s): position net + %d fusers", backbone, config.model_type, len(sites))
    return transformer


def _transformer_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Replace the layout in ``joint_attention_kwargs`` by the position net's output (once per forward)."""
    jak = kwargs.get("joint_attention_kwargs")
    if not jak or LAYOUT_KEY not in jak:
        return None
    jak = dict(jak)  # never the caller's dict: a pipeline passes the same one at every step
    layout = jak.pop(LAYOUT_KEY)
    if callable(layout):  # e.g. FLUX's true CFG: the layout, then the empty layout, per step
        layout = layout()
    if layout is not None:
        jak[_OBJS_KEY] = module.position_net(**layout)
    return args, {**kwargs, "joint_attention_kwargs": jak}


def _attention_pre_hook(block: nn.Module | None) -> Callable:
    """Take the position net's output out of an attention's keywords; keep it for the block's fuser."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if _OBJS_KEY not in kwargs:
            return None
        kwargs = dict(kwargs)
        objs = kwargs.pop(_OBJS_KEY)
        if block is not None:
            module._regional_pending = objs  # read (and dropped) by the post-hook of this same call
        return args, kwargs

    return hook


def _attention_post_hook(block: nn.Module) -> Callable:
    """Apply the block's fuser to the image tokens of its joint attention's output."""

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        objs = module.__dict__.pop("_regional_pending", None)
        if objs is None:
            return None
        n_image = objs["region_map"].shape[-2] * objs["region_map"].shape[-1]
        if isinstance(output, tuple):  # (image, text[, ip]): double-stream and SD3 joint blocks
            return (_fuse_tail(block.fuser, output[0], objs, n_image), *output[1:])
        return _fuse_tail(block.fuser, output, objs, n_image)  # single-stream: [text; image]

    return hook


def _fuse_tail(fuser: nn.Module, states: torch.Tensor, objs: dict, n_image: int) -> torch.Tensor:
    """``states`` with the fuser applied to its last ``n_image`` tokens (all of them for an image stream)."""
    if states.shape[1] < n_image:
        raise ValueError(
            f"the layout's token grid has {n_image} tokens but the attention output holds {states.shape[1]}: "
            "rasterize the layout with the transformer's token size (16 px)"
        )
    if states.shape[1] == n_image:
        return fuser(states, objs)
    split = states.shape[1] - n_image
    return torch.cat([states[:, :split], fuser(states[:, split:], objs)], dim=1)


def mmdit_adapter_config_of(path: str | Path) -> MMDiTAdapterConfig | None:
    """The MM-DiT config in an adapter file's metadata; None for a file without one (a UNet adapter)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != ADAPTER_FORMAT or "config" not in metadata:
        return None
    from training.model.adapter import adapter_config_of

    made = adapter_config_of(path)
    return made if isinstance(made, MMDiTAdapterConfig) else None


def load_mmdit_adapter(
    transformer: nn.Module, source: str | Path | Mapping[str, torch.Tensor], *, strict: bool = True
) -> LoadReport:
    """Load adapter weights by name; an adapter of another backbone is one error naming both, keys that do
    not match the model an error naming them (never dropped), shapes too."""
    ours = backbone_of_transformer(transformer)
    if isinstance(source, Mapping):
        name, state = "adapter weights", dict(source)
    else:
        name = str(source)
        from training.model.adapter import adapter_config_of

        made = adapter_config_of(source)
        if made.backbone is not None and made.backbone != ours:
            raise ValueError(
                f"{name}: a {made.backbone} adapter does not fit this {ours} model "
                f"({type(transformer).__name__}): use the base model it was made for"
            )
        state = load_file(str(source))
    model_state = transformer.state_dict()
    own = {k: v for k, v in model_state.items() if is_adapter_key(k)}
    if not own:
        raise ValueError("no adapter on this transformer: call attach_mmdit_adapter first")
    report = check_adapter_keys(model_state, state, source=name, strict=strict)
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{name}: adapter shape mismatch (another adapter config?): " + "; ".join(bad[:5]))
    transformer.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return report

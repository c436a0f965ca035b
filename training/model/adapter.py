"""Attach the regional adapter to a stock diffusers ``UNet2DConditionModel``; save and load only its weights.

diffusers' UNet already calls ``self.position_net(**gligen)`` and every ``BasicTransformerBlock`` calls
``self.fuser(hidden_states, objs)`` (after self-attention, before the text cross-attention) whenever
``cross_attention_kwargs`` holds a ``"gligen"`` key. So the adapter is two attributes set on a stock
model, no diffusers file copied (docs/METHOD.md §4, §5)::

    attach_regional_adapter(unet)                 # unet.position_net + block.fuser on all blocks
    params = set_adapter_trainable(unet)          # base frozen, adapter trainable
    unet(..., cross_attention_kwargs={"gligen": grounding_inputs(layouts, encoder)})
    save_adapter(unet, "adapter.safetensors")     # position_net.* and *.fuser.* only
    report = load_adapter(unet, "adapter.safetensors")

Key names are the public release's (``position_net.linears.{0,2,4}``, ``position_net.null_text_feature``,
``<block>.fuser.attn.{to_q,to_k,to_v,to_out.0}``, ``<block>.fuser.null_text_feat``), so its checkpoints
load by name; its ``unet.`` prefix and older ``null_positive_feature`` name are accepted too, and its raw
trainer checkpoints (``training.model.release_checkpoint``). ``AdapterConfig.model_type`` picks the fuser: ``ca``
or ``casa`` (``training.model.casa``); it is saved in the metadata, so loading builds the right one. Keys that do
not match the model are an error naming them (:func:`check_adapter_keys`), never dropped.
The backbone (``sdxl`` or ``sd15``) is read from the UNet's config (:func:`backbone_of_unet`: SDXL's
``text_time`` addition embedding) and saved beside the model type; an adapter made for the other backbone
is an error naming both, before any key is compared.
A freshly attached adapter leaves the UNet's output exactly unchanged (zero-initialised output
projections and null features).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from safetensors import safe_open
from safetensors.torch import save_file

from training.model.attention import IMPLEMENTATIONS, PositionNet, RegionalCrossAttention
from training.model.casa import MODEL_TYPES, RegionalCrossAndSelfAttention
from training.model.lora import is_lora_key, load_lora_state
from training.model.mmdit.config import MMDIT_BACKBONES, MMDiTAdapterConfig, mmdit_backbone_of_base
from training.model.release_checkpoint import read_checkpoint

__all__ = [
    "ADAPTER_FORMAT",
    "BACKBONES",
    "AdapterConfig",
    "LoadReport",
    "adapter_parameters",
    "adapter_state_dict",
    "attach_regional_adapter",
    "backbone_of_base",
    "backbone_of_unet",
    "check_adapter_keys",
    "is_adapter_key",
    "load_adapter",
    "model_type_of_keys",
    "normalize_release_keys",
    "read_state_dict",
    "save_adapter",
    "set_adapter_trainable",
    "set_implementation",
    "transformer_blocks",
]

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "richlayout-regional-adapter"
BACKBONES = ("sdxl", "sd15")  # the release's two: SDXL (two text encoders, 2048-dim) and SD1.5 (CLIP-L, 768)


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of the adapter; stored in the safetensors metadata."""

    text_dim: int | None = None  # text features per token; None: cross_attention_dim (SDXL 2048)
    fourier_freqs: int = 8  # frequencies of the box embedding (8 -> 64 dims)
    hidden_dim: int = 512  # width of the position net's MLP
    implementation: str = "packed"  # "packed" (fast) or "naive" (the release's form, a test reference)
    model_type: str = "ca"  # "ca": regional cross-attention; "casa": then regional self-attention
    backbone: str | None = None  # "sdxl" / "sd15", read from the UNet when attached; None: not recorded

    def __post_init__(self) -> None:
        if self.backbone is not None and self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")


@dataclass(frozen=True)
class LoadReport:
    """What a load matched: adapter keys absent from the source, source keys the model lacks, base keys skipped."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    loaded: int = 0
    ignored_base: int = 0  # base-UNet keys of a whole-UNet file: the base stays as loaded, frozen
    lora: int = 0  # base-attention LoRA tensors loaded (a release checkpoint trained with lora_rank)


def transformer_blocks(unet: torch.nn.Module) -> list[tuple[str, BasicTransformerBlock]]:
    """Every ``BasicTransformerBlock`` of the UNet with its qualified name (SDXL has 70)."""
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


def backbone_of_unet(unet_config: Mapping) -> str:
    """``"sdxl"`` for a UNet config with SDXL's ``text_time`` addition embedding (pooled text + size ids), else ``"sd15"``."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd15"


def backbone_of_base(base: str, *, revision: str | None = None, subfolder: str | None = "unet") -> str:
    """The backbone of a base model (tiny name, hub id, pipeline or UNet folder), from its UNet config only
    (an MM-DiT pipeline's ``sd3`` / ``flux`` from its ``model_index.json``)."""
    from training.model.tiny import TINY_BASES

    if base in TINY_BASES:
        return TINY_BASES[base]
    mmdit = mmdit_backbone_of_base(base, revision=revision)
    if mmdit is not None:
        return mmdit
    return backbone_of_unet(UNet2DConditionModel.load_config(base, subfolder=subfolder, revision=revision))


def attach_regional_adapter(
    unet: UNet2DConditionModel, config: AdapterConfig = AdapterConfig()
) -> UNet2DConditionModel:
    """Set ``unet.position_net`` and a zero-initialised ``fuser`` on every transformer block (in place).

    The backbone is the UNet's; a ``config.backbone`` naming the other one is an error.
    """
    backbone = backbone_of_unet(unet.config)
    if config.backbone not in (None, backbone):
        raise ValueError(
            f"a {config.backbone} adapter cannot attach to a {backbone} UNet "
            f"(cross_attention_dim {unet.config.cross_attention_dim}): use the base model it was made for"
        )
    config = replace(config, backbone=backbone)
    context_dim = unet.config.cross_attention_dim
    if not isinstance(context_dim, int):
        raise ValueError(f"expected one int cross_attention_dim, got {context_dim!r}")
    blocks = transformer_blocks(unet)
    if not blocks:
        raise ValueError("the UNet has no BasicTransformerBlock to attach a fuser to")
    param = next(unet.parameters())
    unet.position_net = PositionNet(
        config.text_dim or context_dim, context_dim, config.fourier_freqs, config.hidden_dim
    ).to(device=param.device, dtype=param.dtype)
    fuser_class = RegionalCrossAndSelfAttention if config.model_type == "casa" else RegionalCrossAttention
    for _, block in blocks:
        host = block.attn2 if block.attn2 is not None else block.attn1
        heads = host.heads
        block.fuser = fuser_class(
            block.attn1.query_dim, context_dim, heads, host.inner_dim // heads, config.implementation
        ).to(device=param.device, dtype=param.dtype)
    unet.regional_adapter_config = config
    log.info("attached regional adapter (%s): position net + %d fusers", config.model_type, len(blocks))
    return unet


def set_implementation(unet: torch.nn.Module, implementation: str) -> None:
    """Switch every fuser between ``"packed"`` and ``"naive"``."""
    for module in unet.modules():
        if isinstance(module, RegionalCrossAttention):
            module.implementation = implementation


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key belongs to the adapter (``position_net.*`` or ``*.fuser.*``)."""
    return key.startswith("position_net.") or ".fuser." in key


def adapter_parameters(unet: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Named adapter parameters."""
    return ((name, p) for name, p in unet.named_parameters() if is_adapter_key(name))


def set_adapter_trainable(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze the base UNet, unfreeze the adapter; return the trainable parameters."""
    unet.requires_grad_(False)
    params = [p for _, p in adapter_parameters(unet)]
    if not params:
        raise ValueError("no adapter parameters: call attach_regional_adapter(unet) first")
    for p in params:
        p.requires_grad_(True)
    return params


def adapter_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights only, keyed by the release's names."""
    return {k: v for k, v in unet.state_dict().items() if is_adapter_key(k)}


def save_adapter(unet: torch.nn.Module, path: str | Path) -> Path:
    """Write the adapter's weights (and its config as metadata) to a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(unet).items()}
    config = getattr(unet, "regional_adapter_config", None)
    metadata = {"format": ADAPTER_FORMAT}
    if config is not None:
        metadata["config"] = json.dumps(asdict(config))
    save_file(state, str(path), metadata=metadata)
    return path


def model_type_of_keys(keys: Iterator[str] | list[str]) -> str:
    """``"casa"`` when any fuser holds a self-attention (``*.fuser.self_attn.*``), else ``"ca"``."""
    return "casa" if any(".fuser.self_attn." in k for k in keys) else "ca"


def adapter_config_of(path: str | Path, *, ema: bool = False) -> AdapterConfig | MMDiTAdapterConfig:
    """The ``AdapterConfig`` stored in our adapter's metadata (an MM-DiT adapter's ``MMDiTAdapterConfig``); for
    other files, the model type of its keys."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
        if metadata.get("format") == ADAPTER_FORMAT and "config" in metadata:
            fields = json.loads(metadata["config"])
            if isinstance(fields, dict) and fields.get("backbone") in MMDIT_BACKBONES:
                return MMDiTAdapterConfig.from_json(metadata["config"])
            return AdapterConfig(**fields)
        return AdapterConfig(model_type=model_type_of_keys(keys))
    return AdapterConfig(model_type=model_type_of_keys(list(read_checkpoint(path, ema=ema))))


def normalize_release_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the release's key spellings (``unet.`` prefix, ``null_positive_feature``) to ours."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("unet.").replace(
            "position_net.null_positive_feature", "position_net.null_text_feature"
        )
        out[key] = value
    return out


def read_state_dict(
    source: str | Path | Mapping[str, torch.Tensor], *, ema: bool = False
) -> dict[str, torch.Tensor]:
    """UNet-keyed tensors from a mapping or file, the release's trainer formats included (``ema``: its EMA copy)."""
    return read_checkpoint(source, ema=ema)


def check_adapter_keys(model_keys, state_keys, *, source: str = "weights", strict: bool = True) -> LoadReport:
    """Match a state's keys to a model's: an error naming every key the model lacks (and, strict, missing).

    ``model_keys``: the model's state-dict keys (adapter and base); base keys present in the state are
    skipped (a whole-UNet file). Call it wherever adapter weights are loaded: a ``casa`` file into a ``ca``
    model, a typo'd key or a partial file must never load with weights silently dropped.
    """
    model_keys = set(model_keys)
    own = {k for k in model_keys if is_adapter_key(k)}
    state_keys = set(state_keys)
    missing = sorted(own - state_keys)
    unexpected = sorted(state_keys - model_keys)
    report = LoadReport(missing, unexpected, len(own & state_keys), len((state_keys & model_keys) - own))
    if unexpected or (strict and missing):
        hint = ""
        if model_type_of_keys(state_keys) != model_type_of_keys(own):
            hint = f" (a {model_type_of_keys(state_keys)} adapter for a {model_type_of_keys(own)} model?)"
        raise ValueError(
            f"{source}: keys do not match the model{hint}: {len(missing)} missing keys {missing}, "
            f"{len(unexpected)} unexpected keys {unexpected}"
        )
    return report


def _check_backbone(
    unet: torch.nn.Module, source: object, state: Mapping[str, torch.Tensor], name: str
) -> None:
    """An adapter made for the other backbone: one error naming both, not a list of mismatched keys.

    Our files record their backbone; for others (the release's) the text width of the position net's null
    feature tells, when the blocks differ too (same blocks, other width: the shape check reports it).
    """
    ours = backbone_of_unet(unet.config)
    theirs = None
    if isinstance(source, str | Path) and Path(source).suffix == ".safetensors":
        theirs = adapter_config_of(source).backbone
    n_pos = unet.position_net.fourier_freqs * 8  # sin and cos of 4 box coordinates per frequency
    width = state.get("position_net.null_text_feature")
    expected = unet.position_net.null_text_feature.shape[-1]
    if theirs is None and width is not None and width.shape[-1] != expected:
        own = {k for k in unet.state_dict() if is_adapter_key(k)}
        if {k for k in state if is_adapter_key(k)} != own:
            theirs = "another backbone's"
    if theirs in (None, ours):
        return
    got = f" (text features {width.shape[-1] - n_pos} per token)" if width is not None else ""
    raise ValueError(
        f"{name}: {theirs} adapter{got} does not fit this {ours} model (cross_attention_dim "
        f"{unet.config.cross_attention_dim}, text features {expected - n_pos}): use the base model it was made for"
    )


def load_adapter(
    unet: torch.nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    ema: bool = False,
) -> LoadReport:
    """Load adapter weights by name (base-UNet keys of a whole-UNet file are skipped, counted).

    Keys the model lacks are always an error naming them; with ``strict`` (the default) missing adapter
    keys are too, so no adapter weight is ever dropped or left fresh silently. ``ema``: a trainer
    checkpoint's EMA copy. A release checkpoint's base-attention LoRA loads as the UNet's LoRA
    (``training.model.lora.load_lora_state``); the UNet's own LoRA layers are matched by their plain names.
    """
    state = read_state_dict(source, ema=ema)
    lora = {k: state.pop(k) for k in [k for k in state if is_lora_key(k)]}
    model_state = {
        k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if not is_lora_key(k)
    }
    own = {k: v for k, v in model_state.items() if is_adapter_key(k)}
    if not own:
        raise ValueError("no adapter on this UNet: call attach_regional_adapter(unet) first")
    name = str(source) if not isinstance(source, Mapping) else "adapter weights"
    _check_backbone(unet, source, state, name)
    report = check_adapter_keys(model_state, state, source=name, strict=strict)
    matched = {k: v for k, v in state.items() if k in own}
    bad_shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in matched.items()
        if v.shape != own[k].shape
    ]
    if bad_shapes:
        raise ValueError(
            f"{name}: adapter shape mismatch (other base model or AdapterConfig?): "
            + "; ".join(bad_shapes[:5])
        )
    unet.load_state_dict(matched, strict=False)
    if report.ignored_base:
        log.info("%s: skipped %d base-UNet keys (the base stays frozen as loaded)", name, report.ignored_base)
    if lora:
        report = replace(report, lora=load_lora_state(unet, lora, source=name))
    return report

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
load by name; its ``unet.`` prefix and older ``null_positive_feature`` name are accepted too.
A freshly attached adapter leaves the UNet's output exactly unchanged (zero-initialised output
projections and null features).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from training.attention import IMPLEMENTATIONS, PositionNet, RegionalCrossAttention

__all__ = [
    "ADAPTER_FORMAT",
    "AdapterConfig",
    "LoadReport",
    "adapter_parameters",
    "adapter_state_dict",
    "attach_regional_adapter",
    "is_adapter_key",
    "load_adapter",
    "normalize_release_keys",
    "read_state_dict",
    "save_adapter",
    "set_adapter_trainable",
    "set_implementation",
    "transformer_blocks",
]

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "richlayout-regional-adapter"


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of the adapter; stored in the safetensors metadata."""

    text_dim: int | None = None  # text features per token; None: cross_attention_dim (SDXL 2048)
    fourier_freqs: int = 8  # frequencies of the box embedding (8 -> 64 dims)
    hidden_dim: int = 512  # width of the position net's MLP
    implementation: str = "packed"  # "packed" (fast) or "naive" (the release's form, a test reference)

    def __post_init__(self) -> None:
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")


@dataclass(frozen=True)
class LoadReport:
    """What a load matched: adapter keys absent from the source, and source keys that are no adapter key."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    loaded: int = 0


def transformer_blocks(unet: torch.nn.Module) -> list[tuple[str, BasicTransformerBlock]]:
    """Every ``BasicTransformerBlock`` of the UNet with its qualified name (SDXL has 70)."""
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


def attach_regional_adapter(
    unet: UNet2DConditionModel, config: AdapterConfig = AdapterConfig()
) -> UNet2DConditionModel:
    """Set ``unet.position_net`` and a zero-initialised ``fuser`` on every transformer block (in place)."""
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
    for _, block in blocks:
        host = block.attn2 if block.attn2 is not None else block.attn1
        heads = host.heads
        block.fuser = RegionalCrossAttention(
            block.attn1.query_dim, context_dim, heads, host.inner_dim // heads, config.implementation
        ).to(device=param.device, dtype=param.dtype)
    unet.regional_adapter_config = config
    log.info("attached regional adapter: position net + %d fusers", len(blocks))
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


def adapter_config_of(path: str | Path) -> AdapterConfig:
    """The ``AdapterConfig`` stored in an adapter safetensors' metadata (the default for other files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return AdapterConfig()
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") == ADAPTER_FORMAT and "config" in metadata:
        return AdapterConfig(**json.loads(metadata["config"]))
    return AdapterConfig()


def normalize_release_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the release's key spellings (``unet.`` prefix, ``null_positive_feature``) to ours."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("unet.").replace(
            "position_net.null_positive_feature", "position_net.null_text_feature"
        )
        out[key] = value
    return out


def read_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict from a mapping, a safetensors file, or a torch checkpoint (tensors only)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    # The release saved its extracted adapter with torch.save; weights_only refuses arbitrary pickles.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return dict(state)


def load_adapter(
    unet: torch.nn.Module, source: str | Path | Mapping[str, torch.Tensor], *, strict: bool = True
) -> LoadReport:
    """Load adapter weights by name; with ``strict``, fail on missing adapter keys or unexpected keys."""
    state = normalize_release_keys(read_state_dict(source))
    own = adapter_state_dict(unet)
    if not own:
        raise ValueError("no adapter on this UNet: call attach_regional_adapter(unet) first")
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    matched = {k: v for k, v in state.items() if k in own}
    bad_shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in matched.items()
        if v.shape != own[k].shape
    ]
    if bad_shapes:
        raise ValueError(
            "adapter shape mismatch (other base model or AdapterConfig?): " + "; ".join(bad_shapes[:5])
        )
    if strict and (missing or unexpected):
        raise ValueError(
            f"adapter load: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    unet.load_state_dict(matched, strict=False)
    return LoadReport(missing=missing, unexpected=unexpected, loaded=len(matched))

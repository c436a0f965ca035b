"""Read UNet / adapter weights as the public release's tools wrote them (docs/RELEASE.md).

Accepted, all as plain tensors (``torch.load(weights_only=True)``; no pickle of objects):

- our adapter safetensors, and a whole-UNet safetensors (diffusers' ``diffusion_pytorch_model.safetensors``);
- the release's extracted adapter (``misc_utils/extract_pn_and_fuser.py``: a ``.pth`` dict, ``unet.`` keys);
- raw Lightning / DeepSpeed trainer files: ``{"state_dict": ...}`` or ``{"module": ...}``, keys under
  ``_forward_module.`` and ``unet.`` (live weights) or ``ema_unet.module.`` (the EMA copy); ``ema`` chooses.

Keys of other trainer modules (``vae.``, ``text_encoder.``, ...) are not UNet weights: they are counted and
logged, never loaded. The result is keyed as ``UNet2DConditionModel.state_dict()`` names them, with the
release's older ``null_positive_feature`` spelled ``null_text_feature``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

__all__ = ["read_checkpoint", "select_unet_weights"]

log = logging.getLogger(__name__)

_WRAPPERS = ("state_dict", "module")  # Lightning's and DeepSpeed's top-level keys
_LIVE = ("unet.",)
_EMA = ("ema_unet.module.", "ema_unet.")  # longest first: the EMA wrapper may or may not keep .module


def _renamed(key: str) -> str:
    return key.replace("position_net.null_positive_feature", "position_net.null_text_feature")


def select_unet_weights(
    state: Mapping[str, object], *, ema: bool = False, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The UNet's tensors of a (possibly trainer-wrapped) state dict: live weights, or the EMA copy."""
    for wrapper in _WRAPPERS:
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    tensors = {k.removeprefix("_forward_module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(state):
        skipped = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        log.info("%s: ignored %d non-tensor entries (e.g. %s)", source, len(skipped), skipped[:3])
    has_live = any(k.startswith(_LIVE) for k in tensors)
    has_ema = any(k.startswith(_EMA) for k in tensors)
    if ema and not has_ema:
        raise ValueError(f"{source}: no EMA weights (no key starts with 'ema_unet.'); load the live weights")
    if not (has_live or has_ema):
        return {_renamed(k): v for k, v in tensors.items()}  # plain UNet / adapter keys
    prefixes = _EMA if ema else _LIVE
    out, others = {}, Counter()
    for key, value in tensors.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            others[key.split(".", 1)[0]] += 1
        else:
            out[_renamed(key[len(prefix) :])] = value
    if others:
        log.info("%s: ignored keys of other modules: %s", source, dict(sorted(others.items())))
    if not out:
        raise ValueError(f"{source}: no {'EMA' if ema else 'live'} UNet weights found")
    return out


def read_checkpoint(
    source: str | Path | Mapping[str, object], *, ema: bool = False
) -> dict[str, torch.Tensor]:
    """UNet tensors from a mapping, a safetensors file or a torch checkpoint (see the module docstring)."""
    if isinstance(source, Mapping):
        return select_unet_weights(source, ema=ema)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        state: object = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a pickle of objects, or not a torch file at all
            raise ValueError(
                f"{path}: not a tensors-only torch checkpoint ({err.__class__.__name__})"
            ) from err
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return select_unet_weights(state, ema=ema, source=str(path))

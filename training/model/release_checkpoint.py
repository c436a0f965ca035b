"""Read UNet / adapter weights as the public release's tools wrote them (docs/RELEASE.md).

Accepted, all as plain tensors (``torch.load(weights_only=True)``; no pickle of objects):

- our adapter safetensors, and a whole-UNet safetensors (diffusers' ``diffusion_pytorch_model.safetensors``);
- the release's extracted adapter (``misc_utils/extract_pn_and_fuser.py``: a ``.pth`` dict, ``unet.`` keys);
- raw Lightning / DeepSpeed trainer files: ``{"state_dict": ...}`` or ``{"module": ...}``, keys under
  ``_forward_module.`` and ``unet.`` (live weights) or ``ema_unet.module.`` (the EMA copy); ``ema`` chooses;
- the extract script's output of a checkpoint with an EMA copy: it replaces ``unet.`` in every key, so the
  live weights are plain (``position_net.*``) and the EMA copy is ``ema_module.*``; ``ema`` chooses too.

Keys of other trainer modules (``vae.``, ``text_encoder.``, ...) are not UNet weights: they are counted and
logged, never loaded. The result is keyed as ``UNet2DConditionModel.state_dict()`` names them, with the
release's older ``null_positive_feature`` spelled ``null_text_feature``.

The release's trainer may add a peft LoRA (``lora_rank``: ``LoraConfig(r, lora_alpha=r,
target_modules=["to_k", "to_q", "to_v", "to_out.0"])``) to the UNet that already holds the adapter, so
peft wraps the base attention *and* every fuser's (``fuser.attn.*``, casa's ``fuser.self_attn.*``) and its
files hold ``<module>.base_layer.{weight,bias}`` and ``<module>.lora_{A,B}.default.weight``. They are
resolved here (:func:`resolve_peft_lora`), so every reader of a release checkpoint sees plain names:

- ``base_layer`` keys become the plain ``<module>.weight`` / ``.bias``;
- a fuser's LoRA is merged into the fuser's weight (``W + (alpha / r) B A``, alpha = r in the release), so the
  adapter we write from it is a plain adapter;
- the base attention's LoRA is kept, unmerged, as ``<module>.lora_{A,B}.default.weight``: the names of our own
  LoRA (``training.model.lora``, adapter ``default``). ``training.model.adapter.load_adapter`` loads it into the UNet as
  a LoRA (adding one of its rank), and ``python -m training.init_unet --adapter CKPT`` writes it as our
  diffusers LoRA file ``lora.safetensors`` beside the adapter (what ``--lora`` loads). Converted rather than
  merged into the base, because we never write the base UNet: merged, it would be lost on saving.

Any other LoRA-like key (another adapter name, DoRA's magnitude, a typo) or an unpaired ``lora_A`` /
``lora_B`` is an error naming the keys, never dropped.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

__all__ = [
    "RELEASE_LORA_SCALE",
    "check_weights_file",
    "read_checkpoint",
    "resolve_peft_lora",
    "select_unet_weights",
]

log = logging.getLogger(__name__)

_WRAPPERS = ("state_dict", "module")  # Lightning's and DeepSpeed's top-level keys
_LIVE = ("unet.",)
_EMA = ("ema_unet.module.", "ema_unet.")  # longest first: the EMA wrapper may or may not keep .module
_EXTRACTED_EMA = "ema_module."  # "ema_unet.module." after the extract script's replace("unet.", "")
_EMA_COUNTER = "ema_unet.n_averaged"  # torch's AveragedModel's update count: not a UNet weight
RELEASE_LORA_SCALE = 1.0  # alpha / r of a merged LoRA: the release's LoraConfig sets lora_alpha = r
# peft's names of a wrapped Linear (one adapter, "default"): the base layer's tensors and the two factors.
_PEFT_KEY = re.compile(
    r"^(?P<module>.+)\.(?:base_layer\.(?P<param>weight|bias)|(?P<factor>lora_[AB])\.default\.weight)$"
)


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
    extracted_ema = {k for k in tensors if k.startswith(_EXTRACTED_EMA)}
    if ema and not (has_ema or extracted_ema):
        raise ValueError(
            f"{source}: no EMA weights (no key starts with 'ema_unet.' or 'ema_module.'); load the live weights"
        )
    if not (has_live or has_ema):  # plain UNet / adapter keys, and the extract script's EMA copy beside them
        if extracted_ema:
            if ema:
                picked = {k.removeprefix(_EXTRACTED_EMA): v for k, v in tensors.items() if k in extracted_ema}
            else:
                picked = {k: v for k, v in tensors.items() if k not in extracted_ema}
                log.info("%s: live weights loaded; its EMA copy (%d ema_module.* keys) is not (ema=True loads it)",
                         source, len(extracted_ema))  # fmt: skip
            if not picked:
                raise ValueError(f"{source}: no {'EMA' if ema else 'live'} weights beside its ema_module.* keys")
            tensors = picked
        return resolve_peft_lora({_renamed(k): v for k, v in tensors.items()}, source=source)
    prefixes = _EMA if ema else _LIVE
    out, others = {}, Counter()
    for key, value in tensors.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None or key == _EMA_COUNTER:
            others[key.split(".", 1)[0]] += 1
        else:
            out[_renamed(key[len(prefix) :])] = value
    if others:
        log.info("%s: ignored keys of other modules: %s", source, dict(sorted(others.items())))
    if not out:
        raise ValueError(f"{source}: no {'EMA' if ema else 'live'} UNet weights found")
    return resolve_peft_lora(out, source=source)


def _is_adapter_module(module: str) -> bool:
    # training.model.adapter.is_adapter_key's rule (that module imports this one)
    return module.startswith("position_net.") or ".fuser." in module


def resolve_peft_lora(
    state: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Plain names for a UNet state dict saved with peft's LoRA layers (see the module docstring).

    ``base_layer`` keys lose that part, a fuser's LoRA is merged into its weight, the base attention's LoRA
    stays as ``<module>.lora_{A,B}.default.weight``. Unknown or unpaired LoRA keys are an error naming them.
    """
    peft_keys = {k for k in state if "lora" in k or ".base_layer." in k}
    if not peft_keys:
        return dict(state)
    unknown = sorted(k for k in peft_keys if not _PEFT_KEY.match(k))
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} unknown LoRA keys {unknown} (expected peft's "
            "<module>.base_layer.weight/bias and <module>.lora_A/lora_B.default.weight)"
        )
    out = {k: v for k, v in state.items() if k not in peft_keys}
    factors: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key in sorted(peft_keys):
        match = _PEFT_KEY.match(key)
        if match["param"]:
            out[f"{match['module']}.{match['param']}"] = state[key]
        else:
            factors[match["module"]][match["factor"]] = state[key]
    unpaired = sorted(
        f"{module}.{'lora_B' if 'lora_A' in pair else 'lora_A'}.default.weight"
        for module, pair in factors.items()
        if len(pair) != 2
    )
    if unpaired:
        raise ValueError(f"{source}: {len(unpaired)} LoRA factors missing their pair: {unpaired}")
    merged = 0
    for module, pair in factors.items():
        a, b = pair["lora_A"], pair["lora_B"]
        if not _is_adapter_module(module):
            out[f"{module}.lora_A.default.weight"], out[f"{module}.lora_B.default.weight"] = a, b
            continue
        weight = out.get(f"{module}.weight")
        if weight is None:
            raise ValueError(f"{source}: LoRA of {module} without its weight {module}.base_layer.weight")
        if (b.shape[0], a.shape[1]) != tuple(weight.shape) or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{source}: LoRA of {module} does not fit its weight: lora_A {tuple(a.shape)}, "
                f"lora_B {tuple(b.shape)}, weight {tuple(weight.shape)}"
            )
        delta = b.double() @ a.double()
        out[f"{module}.weight"] = (weight.double() + RELEASE_LORA_SCALE * delta).to(weight.dtype)
        merged += 1
    log.info(
        "%s: peft LoRA: merged %d adapter modules' LoRA, kept %d base-attention LoRA modules",
        source,
        merged,
        len(factors) - merged,
    )
    return out


def read_checkpoint(
    source: str | Path | Mapping[str, object], *, ema: bool = False
) -> dict[str, torch.Tensor]:
    """UNet tensors from a mapping, a safetensors file or a torch checkpoint (see the module docstring)."""
    if isinstance(source, Mapping):
        return select_unet_weights(source, ema=ema)
    path = check_weights_file(source, "checkpoint")
    if path.suffix == ".safetensors":
        try:
            state: object = load_file(str(path))
        except (SafetensorError, OSError) as err:  # a data section that does not match its header
            raise ValueError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None
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


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def check_weights_file(path: str | Path, what: str = "weights") -> Path:
    """A weights file named by a user, checked before any model loads; returns its path.

    It must exist and be a file; a ``.safetensors`` file must have a header that parses (a garbage, empty
    or truncated file is refused here) and hold at least one tensor. Every failure is a ValueError naming
    the file. Torch files are read by :func:`read_checkpoint` (``weights_only``), which names them too.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what} {path}: no such file")
    if not path.is_file():
        raise ValueError(f"{what} {path}: not a file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                n_keys = len(list(f.keys()))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{what} {path}: not a safetensors file ({_first_line(err)})") from None
        if not n_keys:
            raise ValueError(f"{what} {path}: holds no tensors")
    return path

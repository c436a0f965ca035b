"""LoRA on the base UNet's attention (peft), saved and loaded as diffusers LoRA files.

The trainer's optional LoRA (``model.lora_rank``) follows diffusers' SDXL LoRA recipe; the files it writes
(``lora.safetensors``, ``lora_ema.safetensors`` beside the adapter) load here for generation, or with
``StableDiffusionXLPipeline.load_lora_weights(folder, weight_name=...)``.
A release checkpoint's base-attention LoRA (``training.model.release_checkpoint``) arrives with the same UNet key
names and loads through :func:`load_lora_state`; ``python -m training.init_unet --adapter CKPT`` writes it as
such a file.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file

__all__ = [
    "LORA_ADAPTER",
    "LORA_TARGETS",
    "add_lora",
    "is_lora_key",
    "load_lora",
    "load_lora_state",
    "lora_config",
    "lora_diffusers_state",
    "lora_model_state",
    "save_lora",
]

# A regex (peft full-matches it): every attention projection of the base UNet, none inside a fuser.
LORA_TARGETS = r"^(?!.*\.fuser\.).*\.(to_q|to_k|to_v|to_out\.0)$"
LORA_ADAPTER = "default"  # peft's adapter name of the trained LoRA


def lora_config(rank: int):
    """diffusers' SDXL LoRA recipe (train_text_to_image_lora_sdxl): alpha = rank, Gaussian A, zero B."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise RuntimeError("model.lora_rank > 0 needs peft: pip install 'richlayout[peft]'") from None
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)


def is_lora_key(key: str) -> bool:
    """Whether a UNet state-dict key is a LoRA weight (peft's ``lora_A`` / ``lora_B``)."""
    return ".lora_A." in key or ".lora_B." in key


def add_lora(unet: UNet2DConditionModel, rank: int) -> list[torch.nn.Parameter]:
    """Add a LoRA of ``rank`` to the base UNet's attention projections (not the adapter's); needs peft.

    Returns the LoRA parameters. A fresh LoRA leaves the UNet's output unchanged (B starts at zero).
    What was trainable stays trainable: peft freezes every parameter but its own. A LoRA of ``rank`` the
    UNet already holds (loaded with a release checkpoint) is kept, made trainable, not replaced.
    """
    held = {n: p for n, p in unet.named_parameters() if is_lora_key(n)}
    if held:
        ranks = {p.shape[0] for n, p in held.items() if ".lora_A." in n}
        if ranks != {rank}:
            raise ValueError(
                f"the UNet already holds a LoRA of rank {sorted(ranks)} (loaded with the adapter "
                f"weights, e.g. a release checkpoint): no LoRA of rank {rank} can be added "
                "(model.lora_rank: that rank or 0)"
            )
        return [p.requires_grad_(True) for p in held.values()]
    config = lora_config(rank)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    unet.add_adapter(config, adapter_name=LORA_ADAPTER)
    for p in trainable:
        p.requires_grad_(True)
    return [p for n, p in unet.named_parameters() if is_lora_key(n)]


def lora_diffusers_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA weights of a UNet state dict with diffusers' LoRA names (``<module>.lora.down.weight``).

    A LoRA file (``save_lora``) holds them under ``unet.``, as ``StableDiffusionXLPipeline.save_lora_weights``
    writes them and ``load_lora_weights`` (and :func:`load_lora`) reads them.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    peft_keys = {
        k.replace(f".{LORA_ADAPTER}.", "."): v
        for k, v in state.items()
        if is_lora_key(k) and f".{LORA_ADAPTER}." in k
    }
    return convert_state_dict_to_diffusers(peft_keys)


def lora_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A LoRA file (diffusers' layout) as UNet state-dict keys of the trained adapter (``...lora_A.default.weight``)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    state = load_file(str(path))
    unet_keys = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if len(unet_keys) != len(state) or not state:
        raise ValueError(f"{path}: not a UNet LoRA file (expected only 'unet.' keys)")
    peft_keys = convert_unet_state_dict_to_peft(unet_keys)
    return {re.sub(r"\.(lora_[AB])\.", rf".\1.{LORA_ADAPTER}.", k): v for k, v in peft_keys.items()}


def save_lora(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Write the LoRA weights of a UNet state dict as a diffusers LoRA file (with its LoraConfig)."""
    lora = lora_diffusers_state(state)
    rank = next(v.shape[0] for k, v in lora.items() if k.endswith(".lora.down.weight"))
    StableDiffusionXLPipeline.save_lora_weights(
        str(path.parent),
        unet_lora_layers=lora,
        weight_name=path.name,
        unet_lora_adapter_metadata=lora_config(rank).to_dict(),
    )
    return path


def load_lora_state(unet: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str = "LoRA") -> int:
    """Load LoRA weights keyed as the UNet names them (``...lora_A.default.weight``); returns their count.

    A UNet without LoRA gets one of the weights' rank (:func:`add_lora`). Every LoRA weight of the UNet
    must be in ``state`` and every weight of it must fit the UNet.
    """
    if not any(is_lora_key(k) for k, _ in unet.named_parameters()):
        add_lora(unet, next(v.shape[0] for k, v in state.items() if ".lora_A." in k))
    own = {k: p for k, p in unet.named_parameters() if is_lora_key(k)}
    if set(own) != set(state):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(
            f"{source}: LoRA keys differ from the UNet's: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    bad = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape
    ]
    if bad:
        raise ValueError(
            f"{source}: LoRA shapes differ from the UNet's (another rank?): " + "; ".join(bad[:3])
        )
    unet.load_state_dict(state, strict=False)
    return len(state)


def load_lora(unet: torch.nn.Module, path: str | Path) -> None:
    """Load a LoRA file written by the trainer into ``unet`` (adding a LoRA of the file's rank if it has none).

    Every LoRA weight of the UNet must be in the file and every weight of the file must fit the UNet.
    ``StableDiffusionXLPipeline.load_lora_weights(folder, weight_name=...)`` reads the same files.
    """
    load_lora_state(unet, lora_model_state(path), source=str(path))

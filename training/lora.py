"""LoRA on the base UNet's attention (peft), saved and loaded as diffusers LoRA files.

The trainer's optional LoRA (``model.lora_rank``) follows diffusers' SDXL LoRA recipe; the files it writes
(``lora.safetensors``, ``lora_ema.safetensors`` beside the adapter) load here for generation, or with
``StableDiffusionXLPipeline.load_lora_weights(folder, weight_name=...)``.
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
    What was trainable stays trainable: peft freezes every parameter but its own.
    """
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


def load_lora(unet: torch.nn.Module, path: str | Path) -> None:
    """Load a LoRA file written by the trainer into ``unet`` (adding a LoRA of the file's rank if it has none).

    Every LoRA weight of the UNet must be in the file and every weight of the file must fit the UNet.
    ``StableDiffusionXLPipeline.load_lora_weights(folder, weight_name=...)`` reads the same files.
    """
    state = lora_model_state(path)
    if not any(is_lora_key(k) for k, _ in unet.named_parameters()):
        rank = next(v.shape[0] for k, v in state.items() if ".lora_A." in k)
        add_lora(unet, rank)
    own = {k for k, _ in unet.named_parameters() if is_lora_key(k)}
    if own != set(state):
        raise ValueError(
            f"{path}: LoRA keys differ from the UNet's: {len(own - set(state))} missing "
            f"(e.g. {sorted(own - set(state))[:2]}), {len(set(state) - own)} unexpected "
            f"(e.g. {sorted(set(state) - own)[:2]})"
        )
    unet.load_state_dict(state, strict=False)

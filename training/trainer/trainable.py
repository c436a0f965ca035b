"""The trainable weights (adapter and optional LoRA): read from and into the live UNet, EMA swap, files.

Under FSDP the trainable tensors are gathered whole (and cut back into shards) by ``training.trainer.fsdp``,
so every function here that takes the UNet is a collective there: call it on every rank.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from training.model.adapter import (
    ADAPTER_FORMAT,
    AdapterConfig,
    check_adapter_keys,
    is_adapter_key,
    normalize_release_keys,
)
from training.model.lora import is_lora_key, lora_model_state, save_lora
from training.trainer.fsdp import full_state, is_sharded, load_full_state

__all__ = [
    "ema_weights",
    "is_trainable_key",
    "load_trainable_state",
    "read_trainable",
    "save_final_weights",
    "save_trainable",
    "save_weights",
    "trainable_state",
]


def is_trainable_key(key: str) -> bool:
    """Whether a UNet state-dict key is trained (adapter or LoRA)."""
    return is_adapter_key(key) or is_lora_key(key)


def trainable_state(accelerator: Accelerator, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full adapter (and LoRA) weights on CPU, on every rank; a collective under FSDP: call it on every rank."""
    return full_state(accelerator.unwrap_model(unet), is_trainable_key)


def _model_keys(accelerator: Accelerator, unet: torch.nn.Module) -> set[str]:
    """The live UNet's state-dict keys (FSDP2 keeps the names; nothing is gathered)."""
    return set(accelerator.unwrap_model(unet).state_dict().keys())


def load_trainable_state(
    accelerator: Accelerator, unet: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str = "weights"
) -> None:
    """Copy full trainable weights (UNet state-dict keys) into the live model; a collective under FSDP.

    A key the model lacks or an adapter key the state lacks (a ``casa`` checkpoint resumed as ``ca``, a
    partial file) is an error naming them (``source``: the checkpoint folder), before anything is loaded.
    """
    check_adapter_keys(_model_keys(accelerator, unet), state.keys(), source=source)
    if is_sharded(unet):  # every rank holds the (small) state and copies its own shard out of it
        unexpected = load_full_state(unet, state)
    else:
        unexpected = accelerator.unwrap_model(unet).load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"weights that are not the UNet's: {unexpected[:3]}")


@contextmanager
def ema_weights(ema: EMAModel | None, params: list[torch.nn.Parameter]):
    """Temporarily swap the EMA weights into ``params`` (no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def save_weights(state: dict[str, torch.Tensor], path: Path, config: AdapterConfig | None = None) -> Path:
    """Adapter-only safetensors with the release's key names (and ``config``, as ``save_adapter`` writes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": ADAPTER_FORMAT}
    if config is not None:  # the model type and backbone: generation builds the same adapter from the file
        metadata["config"] = json.dumps(asdict(config))
    save_file(state, str(path), metadata=metadata)
    return path


def save_trainable(
    state: dict[str, torch.Tensor], folder: Path, suffix: str = "", config: AdapterConfig | None = None
) -> tuple[Path, Path | None]:
    """``adapter{suffix}.safetensors`` (adapter keys) and, with LoRA, ``lora{suffix}.safetensors`` beside it."""
    adapter = save_weights(
        {k: v for k, v in state.items() if is_adapter_key(k)}, folder / f"adapter{suffix}.safetensors", config
    )
    lora = None
    if any(is_lora_key(k) for k in state):
        lora = save_lora(state, folder / f"lora{suffix}.safetensors")
    return adapter, lora


def read_trainable(folder: Path, suffix: str = "") -> dict[str, torch.Tensor]:
    """What :func:`save_trainable` wrote, as UNet state-dict keys."""
    state = normalize_release_keys(load_file(str(folder / f"adapter{suffix}.safetensors")))
    lora = folder / f"lora{suffix}.safetensors"
    if lora.exists():
        state.update(lora_model_state(lora))
    return state


def save_final_weights(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    params: list[torch.nn.Parameter],
    ema: EMAModel | None,
    folder: Path,
) -> dict[str, torch.Tensor]:
    """The main rank writes the raw and EMA trainable weights into ``folder``; returns the raw ones (every rank)."""
    raw = trainable_state(accelerator, unet)
    with ema_weights(ema, params):
        ema_state = trainable_state(accelerator, unet) if ema is not None else None
    if accelerator.is_main_process:
        config = getattr(accelerator.unwrap_model(unet), "regional_adapter_config", None)
        save_trainable(raw, folder, config=config)
        if ema_state is not None:
            save_trainable(ema_state, folder, "_ema", config=config)
    accelerator.wait_for_everyone()
    return raw

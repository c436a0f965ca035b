"""FSDP for the trainer: torch's FSDP2 (``fully_shard``) applied to the UNet or the MM-DiT transformer by us, the
same code on GPUs and CPUs.

``train.distributed: fsdp`` with several processes shards the UNet (or the SD3 / FLUX.1 transformer; "the
UNet" below stands for either) instead of replicating it (DDP). accelerate
still starts the processes and gives precision and accumulation, but the UNet never goes through
``accelerator.prepare`` (which would wrap it in DDP, or in accelerate's FSDP1 plugin on GPUs only):
:func:`shard_unet` calls ``fully_shard`` on it, so NCCL on GPUs and gloo on CPUs run one code path.

What is sharded, one FSDP unit (one all-gather, one reduce-scatter) each: every ``BasicTransformerBlock``
(its frozen attention and feed-forward, its trainable ``fuser`` and LoRA together: FSDP2 keeps
``requires_grad`` per parameter inside a unit and reduces only the gradients that exist), every
``ResnetBlock2D`` (frozen); on an MM-DiT every ``JointTransformerBlock`` (SD3), ``FluxTransformerBlock`` and
``FluxSingleTransformerBlock`` (FLUX.1), each with its fuser and LoRA; then the root (what is left:
convolutions or patch embedding, time embedding, norms and the trainable ``position_net``). Each parameter is split along dim 0 over the ranks (a ``DTensor``); the
optimizer and the EMA hold this rank's part only. The VAE and the text encoders are frozen and replicated.

Why the choices:
- Every rank must issue the units' collectives in the same order, whatever its data. A unit's
  reduce-scatter runs when the gradients of its inputs are done, so it must hang on the hidden-state
  chain, never on the region features alone: the first block's hidden states come from frozen layers
  and need no gradient, and on a rank whose micro-batch dropped every layout its fuser may not read the
  features, so its reduce-scatter would move to the end of the backward (two ranks deadlocked). A
  pre-hook makes the hidden states entering each trainable unit require a gradient (one extra
  input-gradient through the first block). The UNet's blocks get them as their first argument, the
  MM-DiT's as the keyword ``hidden_states`` (positional again under gradient checkpointing): the hook
  takes either. The ``position_net`` is off the chain for the same reason:
  it stays in the root unit, whose all-gather opens the backward and whose reduce-scatter closes it.
- ``reshard_after_forward=True`` on every unit, the root too: a forward without backward (validation) must
  leave no gathered copy behind, or the next training forward would reuse it after the EMA swap wrote
  other values into the shards.
- ``set_reduce_scatter_unused_params(True)``: a trainable parameter that got no gradient on one rank (a
  micro-batch whose every layout was dropped) is reduced as zeros, so the ranks' collectives always match
  (DDP's ``find_unused_parameters``, at no cost when every parameter has a gradient anyway).
- Precision (``train.fsdp``): frozen shards are stored, and every unit computes, in ``param_dtype``
  (``auto``: ``train.mixed_precision``'s dtype); trainable shards stay fp32 master weights; gradients are
  reduce-scattered in ``reduce_dtype``. fp16 is refused (accelerate's loss scaler is not FSDP2-aware).
  An MM-DiT's units do not cast their inputs to ``param_dtype``: the flow timestep is a float (SD3:
  ``1000 sigma``) that bf16 would round to a multiple of 4 above 512 before the sinusoidal embedding (999
  and 998 both to 1000), and FLUX's rotary cos / sin would enter every block in bf16, neither of which DDP
  under autocast does. They run under the trainer's autocast instead, seeing the dtypes DDP's blocks see,
  so an MM-DiT under FSDP refuses a bf16 ``param_dtype`` without bf16 autocast.
- Checkpoints hold full tensors: :func:`full_state` gathers the trainable tensors (a collective, the
  same key order on every rank) and :func:`gather_optimizer_state` the optimizer's, so an FSDP checkpoint
  is the same files as a DDP one (and resumes under either); :func:`load_full_state` and
  :func:`shard_optimizer_state` cut each rank's part out of the full tensors locally, nothing is sent.
All of these are the plain copy / state dict for a module that is not sharded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch.distributed.tensor import DTensor, distribute_tensor

from training.model.mmdit.adapter import is_mmdit
from training.trainer.config import ConfigError, TrainConfig

__all__ = [
    "FSDP_UNITS",
    "check_fsdp",
    "full_state",
    "gather_optimizer_state",
    "is_sharded",
    "load_full_state",
    "shard_optimizer_state",
    "shard_unet",
    "uses_fsdp",
]

log = logging.getLogger(__name__)

# One FSDP unit per module of these classes (see the module docstring); the root takes the rest.
FSDP_UNITS = (BasicTransformerBlock, ResnetBlock2D, JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock)
_HIDDEN = "hidden_states"  # the keyword the MM-DiT transformers pass each block's image stream under

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "no": torch.float32}


def uses_fsdp(config: TrainConfig, num_processes: int) -> bool:
    """Whether this run shards the UNet (``train.distributed: fsdp`` and more than one process)."""
    return config.train.distributed == "fsdp" and num_processes > 1


def check_fsdp(config: TrainConfig) -> None:
    """Refuse what FSDP2 cannot run here, naming the field (called before anything is built)."""
    if config.train.distributed != "fsdp":
        return
    if config.train.mixed_precision == "fp16":
        raise ConfigError(
            "train.distributed=fsdp: train.mixed_precision=fp16 needs a loss scaler that knows sharded "
            "gradients, which accelerate's is not; use bf16"
        )
    if config.optim.adam_8bit:
        raise ConfigError(
            "train.distributed=fsdp: optim.adam_8bit (bitsandbytes) cannot update sharded parameters; "
            "set optim.adam_8bit=false"
        )


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` was sharded by :func:`shard_unet` (its collectives need every rank)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_unet(unet: torch.nn.Module, config: TrainConfig, device: torch.device, world_size: int):
    """``fully_shard`` every unit of :data:`FSDP_UNITS`, then the root, over all ``world_size`` ranks (in place).

    The process group is accelerate's (NCCL or gloo); the trainable parameters afterwards are the sharded
    ones: take them (for the optimizer and the EMA) from the returned module.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    f, mixed = config.train.fsdp, config.train.mixed_precision
    param_dtype = _DTYPES[mixed if f.param_dtype == "auto" else f.param_dtype]
    mmdit = is_mmdit(unet)
    if mmdit and param_dtype not in (torch.float32, _DTYPES[mixed]):
        raise ConfigError(
            f"train.fsdp.param_dtype={f.param_dtype} with train.mixed_precision={mixed}: an MM-DiT's root runs "
            "its frozen layers under the trainer's autocast (its float timestep must not be rounded), "
            "set train.fsdp.param_dtype=auto"
        )
    for p in unet.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(param_dtype)  # frozen shards stored as they compute
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=_DTYPES[f.reduce_dtype])
    if mmdit:  # under autocast every unit sees the dtypes DDP's do (the module docstring)
        policy = replace(policy, cast_forward_inputs=False)
    mesh = init_device_mesh(device.type, (world_size,))
    units = [m for m in unet.modules() if isinstance(m, FSDP_UNITS)]
    for module in [*units, unet]:  # bottom-up: the root's unit takes what no block took
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    for module in units:
        if any(p.requires_grad for p in module.parameters()):
            # prepend: before FSDP's own pre-hook, which wraps the inputs that require a gradient.
            module.register_forward_pre_hook(_on_the_chain, prepend=True, with_kwargs=True)
    unet.set_reduce_scatter_unused_params(True)
    log.info(
        "FSDP2: %d units + root over %d ranks, compute %s, gradients reduced in %s",
        len(units), world_size, param_dtype, f.reduce_dtype,
    )  # fmt: skip
    return unet


def _on_the_chain(module, args, kwargs):
    """Make a unit's hidden-state input (its first argument, or the keyword ``hidden_states``) require a
    gradient (see the module docstring)."""
    if not torch.is_grad_enabled():
        return None
    if args:
        if _needs_grad(args[0]):
            return (args[0].detach().requires_grad_(), *args[1:]), kwargs
    elif _needs_grad(kwargs.get(_HIDDEN)):
        return args, {**kwargs, _HIDDEN: kwargs[_HIDDEN].detach().requires_grad_()}
    return None


def _needs_grad(x: object) -> bool:
    return torch.is_tensor(x) and x.is_floating_point() and not x.requires_grad


@torch.no_grad()
def full_state(module: torch.nn.Module, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The state-dict entries whose key ``keep`` accepts, whole, as fp32 CPU copies, on every rank.

    A collective when ``module`` is sharded (each kept tensor is all-gathered, in the state dict's key
    order, which every rank shares): call it on every rank. Copies: the EMA swap changes the live tensors.
    """
    out = {}
    for key, value in module.state_dict().items():
        if keep(key):
            if isinstance(value, DTensor):
                value = value.full_tensor()
            out[key] = value.detach().to("cpu", torch.float32, copy=True).contiguous()
    return out


@torch.no_grad()
def load_full_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy whole tensors (state-dict keys) into ``module``, each rank taking its own shard; returns the keys
    ``module`` lacks. Every rank must pass the same ``state``; nothing is sent between ranks."""
    live = module.state_dict()
    unexpected = [k for k in state if k not in live]
    for key, value in state.items():
        if key in unexpected:
            continue
        target = live[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)}, the model's is {tuple(target.shape)}")
        target.copy_(_like(value, target))
    return unexpected


def _like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` (whole) on ``target``'s device and dtype, cut to ``target``'s shard when it is a DTensor."""
    value = value.to(device=target.device, dtype=target.dtype)
    if isinstance(target, DTensor):
        # src_data_rank=None: every rank holds the whole tensor and keeps its own chunk, no broadcast.
        return distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
    return value


@torch.no_grad()
def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded tensor gathered whole onto the CPU: what DDP saves.

    A collective under FSDP (call it on every rank); parameters are keyed by position, the same under DDP
    and FSDP (``unet.parameters()`` order), so either loads the other's file.
    """
    state = optimizer.state_dict()
    gathered = {}
    for index in sorted(state["state"]):  # the same order on every rank
        gathered[index] = {
            k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in state["state"][index].items()
        }
    return {**state, "state": gathered}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A saved (whole) optimizer state with each tensor of a sharded parameter cut to this rank's shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        out[index] = {
            k: _like(v, param) if isinstance(param, DTensor) and tuple(v.shape) == tuple(param.shape) else v
            for k, v in entry.items()
        }
    return {**state, "state": out}

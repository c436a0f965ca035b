"""The trainer's accelerate set-up: precision, accumulation, DDP or FSDP, and the trackers.

FSDP is accelerate's: it shards on accelerators (several GPUs). accelerate does not turn CPU processes
into FSDP (it runs them as DDP), so ``train.distributed: fsdp`` with CPU processes is refused with a
config error rather than patched in; with a single process there is nothing to shard and the UNet
trains unwrapped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    ProjectConfiguration,
)

from training.trainer.config import ConfigError, TrainConfig

__all__ = [
    "FSDP_WRAP",
    "check_distributed",
    "check_fsdp_root",
    "init_trackers",
    "is_fsdp",
    "make_accelerator",
]

log = logging.getLogger(__name__)

# FSDP units: each transformer block (its fuser and LoRA inside), each ResNet block and the position net;
# the root unit keeps only frozen weights. It must: FSDP1 leaves the root unsharded after a forward without
# backward (validation), and until the next backward its gathers return that stale copy, so the EMA
# swapped into the shards afterwards (checkpoint) would not be seen there.
FSDP_WRAP = ["BasicTransformerBlock", "ResnetBlock2D", "PositionNet"]


def is_fsdp(accelerator: Accelerator) -> bool:
    """Whether the UNet is wrapped by torch's FSDP (``train.distributed: fsdp`` with several GPU processes)."""
    return accelerator.distributed_type == DistributedType.FSDP


def check_distributed(asked: str, kind: DistributedType) -> None:
    """Refuse a distribution accelerate will not give; warn when FSDP has nothing to shard."""
    if asked != "fsdp" or kind == DistributedType.FSDP:
        return
    if kind == DistributedType.NO:
        log.warning("train.distributed=fsdp with a single process: nothing to shard, training unwrapped")
    elif kind == DistributedType.MULTI_CPU:
        raise ConfigError(
            "train.distributed=fsdp: accelerate runs FSDP on GPUs only and these are CPU processes "
            "(it would silently run DDP); use train.distributed=ddp"
        )
    else:
        raise ConfigError(f"train.distributed=fsdp is not supported with accelerate's {kind} setup")


def make_accelerator(config: TrainConfig) -> Accelerator:
    """Accelerate with the config's precision, accumulation, distribution and trackers."""
    t, out = config.train, Path(config.output_dir)
    trackers = (["tensorboard"] if config.log.tensorboard else []) + (["wandb"] if config.log.wandb else [])
    kwargs: dict[str, Any] = {}
    if t.distributed == "fsdp":
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=1,
            # use_orig_params: frozen and trainable parameters share FSDP's flat parameters.
            use_orig_params=True,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=FSDP_WRAP,
            state_dict_type="FULL_STATE_DICT",
        )
    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=t.find_unused_parameters)],
        **kwargs,
    )
    check_distributed(t.distributed, accelerator.distributed_type)
    return accelerator


def check_fsdp_root(unet) -> None:
    """Refuse trainable parameters in FSDP's root unit (see ``FSDP_WRAP`` for why)."""
    # The root's own parameters are named with one FSDP prefix, those of nested units with more.
    in_root = [
        n for n, p in unet.named_parameters() if p.requires_grad and n.count("_fsdp_wrapped_module") < 2
    ]
    if in_root:
        raise RuntimeError(f"FSDP: trainable parameters in the root unit (see FSDP_WRAP): {in_root[:3]}")


def init_trackers(accelerator: Accelerator, config: TrainConfig, resumed_step: int) -> None:
    """Start the trackers; after a resume TensorBoard hides what the interrupted run logged past its step.

    The interrupted run may have logged steps after its last checkpoint; the resumed run logs them again.
    ``purge_step`` marks everything at or after ``resumed_step + 1`` in the earlier event files as
    superseded, so a reader (TensorBoard, ``EventAccumulator``) sees each step once.
    """
    init_kwargs = {"tensorboard": {"purge_step": resumed_step + 1}} if resumed_step else {}
    accelerator.init_trackers(config.log.project, config=_flat(config.to_dict()), init_kwargs=init_kwargs)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Scalars of a nested dict as ``a.b`` keys (TensorBoard hparams take scalars and strings only)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = json.dumps(v)
    return out

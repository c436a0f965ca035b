"""The trainer's accelerate set-up: precision, accumulation, processes, and the trackers.

accelerate starts the processes (DDP: it wraps the UNet when it is prepared). ``train.distributed: fsdp``
does not use accelerate's FSDP plugin (FSDP1, GPUs only: on CPU processes it silently runs DDP): the
trainer shards the UNet itself with torch's FSDP2 (``training/trainer/fsdp.py``), the same on GPUs and
CPUs. A launch with accelerate's own FSDP (``--use_fsdp``, an accelerate config with FSDP) is refused, so
the UNet is never wrapped twice; with a single process there is nothing to shard and it trains unwrapped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration

from training.trainer.config import ConfigError, TrainConfig
from training.trainer.fsdp import check_fsdp

__all__ = ["check_distributed", "init_trackers", "make_accelerator"]

log = logging.getLogger(__name__)

# Process set-ups the trainer runs: one process, or several over NCCL / gloo (DDP or our FSDP2).
_RUNS = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


def check_distributed(asked: str, kind: DistributedType) -> None:
    """Refuse a launch whose processes the trainer does not run; warn when FSDP has nothing to shard."""
    if kind == DistributedType.FSDP:
        raise ConfigError(
            "accelerate was launched with its FSDP plugin (--use_fsdp or an accelerate config with FSDP); "
            "the trainer shards the UNet itself: launch with --multi_gpu and set train.distributed=fsdp"
        )
    if asked != "fsdp":
        return
    if kind == DistributedType.NO:
        log.warning("train.distributed=fsdp with a single process: nothing to shard, training unwrapped")
    elif kind not in _RUNS:
        raise ConfigError(f"train.distributed=fsdp is not supported with accelerate's {kind} setup")


def make_accelerator(config: TrainConfig) -> Accelerator:
    """Accelerate with the config's precision, accumulation, distribution and trackers."""
    t, out = config.train, Path(config.output_dir)
    check_fsdp(config)
    trackers = (["tensorboard"] if config.log.tensorboard else []) + (["wandb"] if config.log.wandb else [])
    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=t.find_unused_parameters)],
    )
    check_distributed(t.distributed, accelerator.distributed_type)
    return accelerator


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

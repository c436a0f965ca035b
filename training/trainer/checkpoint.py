"""Resumable checkpoints: what a folder holds, its integrity manifest, saving, choosing one and resuming.

``checkpoints/step_NNNNNNN/`` holds the trainable weights raw and EMA (``adapter*.safetensors``, with LoRA
``lora*.safetensors``), the optimizer state (``optimizer.bin``; under FSDP gathered whole, the same file as
DDP's), every rank's stream position (``stream_state.json``), the step and what the run was
(``trainer_state.json``) and, written last and atomically, ``manifest.json``: each file's size and sha256.
A folder without a manifest is incomplete. On resume the manifest is checked: ``latest`` skips an
incomplete or damaged checkpoint with a warning naming the file and falls back to the newest intact one;
a checkpoint asked for by path that is damaged is refused by name. Nothing here is pickled: torch files
load with ``weights_only=True``, the rest is JSON and safetensors. No global RNG state is kept: every
random draw of the loop and the stream comes from a generator keyed by the seed and the sample
(``train_step.sample_seeds``), and fp16's loss scale is saved in ``trainer_state.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from diffusers.training_utils import EMAModel

from training.data.stream import merge_states
from training.trainer.config import TrainConfig
from training.trainer.fsdp import gather_optimizer_state, shard_optimizer_state
from training.trainer.trainable import (
    ema_weights,
    load_trainable_state,
    read_trainable,
    save_trainable,
    trainable_state,
)

__all__ = [
    "MANIFEST",
    "TRAINER_STATE",
    "CheckpointError",
    "CheckpointNotFound",
    "ResumeState",
    "checkpoints",
    "load_checkpoint",
    "read_resume_state",
    "resolve_resume",
    "save_checkpoint",
    "verify_checkpoint",
    "write_manifest",
]

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step_(\d{7})$")
MANIFEST = "manifest.json"  # written last: a checkpoint folder without it is incomplete
TRAINER_STATE = "trainer_state.json"
STREAM_STATE = "stream_state.json"
REQUIRED = (TRAINER_STATE, STREAM_STATE, "adapter.safetensors")


class CheckpointError(ValueError):
    """A checkpoint cannot be used (damaged, incomplete or from another setup); the message names the file."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """``checkpoint.resume`` names a folder that is not a checkpoint."""


# ---------------------------------------------------------------------------------------------------
# Integrity


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(f.fileno())  # on disk before the manifest vouches for it
    return h.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Record every file's size and sha256 in ``manifest.json``, atomically (the checkpoint is complete)."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(MANIFEST)
    }
    tmp = folder / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def verify_checkpoint(folder: Path) -> str | None:
    """The first problem of a checkpoint folder, naming the file (None: complete and intact)."""
    path = folder / MANIFEST
    if not path.exists():
        return f"{path}: missing (the checkpoint's save did not finish, or it predates manifests)"
    try:
        files = json.loads(path.read_text())["files"]
        records = {name: (int(r["size"]), str(r["sha256"])) for name, r in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{path}: malformed ({type(e).__name__}: {e})"
    for name in REQUIRED:
        if name not in records:
            return f"{path}: does not list {name}"
    for name, (size, digest) in records.items():
        file = folder / name
        if not file.is_file():
            return f"{file}: missing (listed in {MANIFEST})"
        if file.stat().st_size != size:
            return (
                f"{file}: {file.stat().st_size} bytes, {MANIFEST} recorded {size} (truncated or overwritten)"
            )
        if _sha256(file) != digest:
            return f"{file}: sha256 differs from the one {MANIFEST} recorded (damaged)"
    return None


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with a manifest) of a run, oldest first."""
    return [p for p in _step_folders(output_dir) if (p / MANIFEST).exists()]


def _step_folders(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if CHECKPOINT_RE.match(p.name) and p.is_dir())


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume from, verified; ``latest`` may find none (fresh start).

    ``latest`` skips incomplete and damaged checkpoints with a warning and takes the newest intact one;
    when checkpoints exist but every complete one is damaged it refuses rather than start over.
    A path must be an intact checkpoint.
    """
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        if not ((path / MANIFEST).exists() or (path / TRAINER_STATE).exists()):
            raise CheckpointNotFound(
                f"checkpoint.resume={resume!r}: not a checkpoint (no {MANIFEST} or {TRAINER_STATE} there)"
            )
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"checkpoint.resume={resume}: refusing a damaged checkpoint: {problem}")
        return path
    damaged = []
    for folder in reversed(_step_folders(output_dir)):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s, trying an older one: %s", folder.name, problem)
        if (folder / MANIFEST).exists():
            damaged.append(problem)
    if damaged:
        raise CheckpointError(f"checkpoint.resume=latest: no intact checkpoint: {'; '.join(damaged)}")
    return None


# ---------------------------------------------------------------------------------------------------
# Resume


@dataclass
class ResumeState:
    """What a checkpoint says about where the run was (read before anything is built)."""

    folder: Path
    step: int
    stream_state: dict
    trainer: dict[str, Any]  # trainer_state.json


@contextmanager
def _reading(path: Path):
    """Turn any failure to read ``path`` into a CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e


def _read_json(path: Path) -> Any:
    with _reading(path):
        return json.loads(path.read_text())


def read_resume_state(folder: Path, config: TrainConfig, world_size: int) -> ResumeState:
    """The step and stream position of ``folder``, on this run's world size and batch size.

    The stream's state is one position in the global sample order, the same on every rank, so a run
    saved on N processes with batch size B continues on M processes with batch size C exactly where that
    order stood (``training.data.stream``: the position is re-split over the new ranks). The optimizer step
    counter, and with it the LR schedule, goes on from ``step``; each step then sees M x C x accumulation
    samples. The per-sample draws (noise, timestep, dropout) are seeded by each sample's (epoch, position)
    in that order (``train_step.sample_seeds``), so they are the draws the old topology would have made.
    """
    trainer = _read_json(folder / TRAINER_STATE)
    path = folder / TRAINER_STATE
    with _reading(path):
        step = int(trainer["step"])
    for field, now in (("data.batch_size", config.data.batch_size), ("world_size", world_size)):
        saved = trainer.get(field)
        if saved is not None and saved != now:
            log.warning("%s: saved with %s=%s, this run has %s=%s: the stream goes on from the same position in "
                        "its global order, re-split over this run's processes and batches", path, field, saved, field, now)
    return ResumeState(folder, step, _read_json(folder / STREAM_STATE), trainer)


def load_checkpoint(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    ema: EMAModel | None,
    state: ResumeState,
) -> None:
    """Restore the trainable weights, their EMA, the optimizer and the loss scaler; call on every rank."""
    folder = state.folder
    with _reading(folder / "adapter.safetensors"):
        load_trainable_state(accelerator, unet, read_trainable(folder), source=str(folder))
    path = folder / "optimizer.bin"
    # Read onto the CPU: load_state_dict moves each tensor to its parameter's device (a multi-process CPU
    # run's device is "cpu:0", which torch.load cannot restore to).
    with _reading(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(shard_optimizer_state(optimizer, saved))  # FSDP: this rank's shards
    scaler = state.trainer.get("scaler")
    if scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(scaler)
    if ema is not None and (folder / "adapter_ema.safetensors").exists():
        with _reading(folder / "adapter_ema.safetensors"), ema_weights(ema, params):
            # Load the EMA files into the live params and copy them as the shadow.
            load_trainable_state(accelerator, unet, read_trainable(folder, "_ema"), source=str(folder))
            ema.shadow_params = [p.detach().clone() for p in params]
        ema.optimization_step = state.trainer["ema_optimization_step"]


def resolve_on_main(accelerator: Accelerator, resume: str | None, output_dir: Path) -> Path | None:
    """``resolve_resume`` on the main rank (it hashes every file once), its answer or error on every rank."""
    box: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            box[0] = ("ok", resolve_resume(resume, output_dir))
        except CheckpointError as e:
            box[0] = ("error", type(e).__name__, str(e))
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    if box[0][0] == "error":
        raise (CheckpointNotFound if box[0][1] == "CheckpointNotFound" else CheckpointError)(box[0][2])
    return box[0][1]


# ---------------------------------------------------------------------------------------------------
# Save


def save_checkpoint(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    ema: EMAModel | None,
    loader,
    step: int,
    config: TrainConfig,
) -> Path:
    """Write ``checkpoints/step_NNNNNNN`` (see the module docstring), the manifest last; call on every rank."""
    out = Path(config.output_dir) / "checkpoints" / f"step_{step:07d}"
    is_main = accelerator.is_main_process
    stream_state = merge_states(gather_object([loader.state_dict()]))
    if is_main and out.exists():
        shutil.rmtree(out)  # an earlier run's folder for this step: its files must not mix with ours
    accelerator.wait_for_everyone()
    raw = trainable_state(accelerator, unet)
    with ema_weights(ema, params):
        ema_state = trainable_state(accelerator, unet) if ema is not None else None
    optimizer_state = gather_optimizer_state(optimizer)  # a collective under FSDP
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(optimizer_state, out / "optimizer.bin")
        save_trainable(raw, out)
        if ema_state is not None:
            save_trainable(ema_state, out, "_ema")
        (out / STREAM_STATE).write_text(json.dumps(stream_state))
        trainer = {
            "step": step,
            "ema_optimization_step": ema.optimization_step if ema else None,
            "data.batch_size": config.data.batch_size,
            "world_size": accelerator.num_processes,
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
        (out / TRAINER_STATE).write_text(json.dumps(trainer))
    accelerator.wait_for_everyone()  # every rank's files are written before the manifest vouches for them
    if is_main:
        write_manifest(out)
        keep = config.checkpoint.keep_last
        if keep is not None:
            for old in checkpoints(Path(config.output_dir))[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return out

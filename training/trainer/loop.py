"""Train the regional-attention adapter on a frozen SDXL or SD1.5: one loop, read top to bottom, and its CLI.

Only the adapter (``unet.position_net`` and a ``fuser`` per transformer block, optionally LoRA on the
base attention) trains; the VAE, the text encoders and the base UNet are frozen. The backbone is the
``model.base``'s (SD1.5: ``configs/train/sd15_512_8gpu.yaml``; no pooled embedding, no size ids). The
recipe and the public release's defects we do not repeat are in ``docs/METHOD.md`` §6.

Launch (accelerate starts torchrun-style workers; the config is the single source of truth)::

    # one process (CPU or one GPU)
    python -m training.train --config configs/train/tiny.yaml

    # one node, 8 GPUs (DDP)
    accelerate launch --multi_gpu --num_processes 8 -m training.train \\
        --config configs/train/sdxl512_8gpu.yaml

    # two nodes x 8 GPUs: run on every node, NODE_RANK = 0 and 1, MASTER_ADDR = node 0's address
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank $NODE_RANK \\
        --main_process_ip $MASTER_ADDR --main_process_port 29500 -m training.train \\
        --config configs/train/sdxl512_8gpu.yaml

    # FSDP2 instead of DDP (shards the UNet, frozen weights included, and the optimizer state; CPUs too)
    accelerate launch --multi_gpu --num_processes 8 -m training.train \\
        --config configs/train/sdxl512_8gpu.yaml --override train.distributed=fsdp

    # several processes on CPU (gloo, DDP), as tests/test_train_ddp.py does
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m training.train --config ...

    # torchrun works too; resume from the newest intact checkpoint of output_dir (or --resume FOLDER)
    torchrun --nproc_per_node 8 -m training.train --config configs/train/sdxl512_8gpu.yaml --resume latest

Precision, accumulation and the data split come from the config, not from accelerate's launch flags.
The effective batch is ``data.batch_size x train.gradient_accumulation_steps x number of processes``.
A mistake in the config, an override, a dataset path or the checkpoint to resume prints one
``error: ...`` line naming the file, override or field, and exits 2; nothing is written before the
config, the data and the checkpoint are checked.

Each micro-batch (``training/trainer/step.py``): encode the images with the VAE, draw per sample (from a
generator keyed by the seed and the sample's (epoch, position) in the stream, so a resumed run draws the same
on any world size and batch size) the noise,
a uniform timestep and the caption / layout dropout; encode captions as the SDXL pipeline does ("" for a
dropped one), region texts through the encoder's cache (the empty layout for a dropped one); SDXL's
micro-conditioning from each sample's original size, crop offset and target size; epsilon MSE.

Options (``training/trainer/model_setup.py``): ``model.lora_rank`` adds a LoRA (peft, diffusers' SDXL recipe) on
the base UNet's attention projections, trained with the adapter; ``optim.adam_8bit`` takes bitsandbytes'
8-bit AdamW; ``train.distributed: fsdp`` shards the UNet with torch's FSDP2 (``training/trainer/fsdp.py``).

Outputs in ``output_dir``: ``config.yaml``, ``checkpoints/step_NNNNNNN/`` (``training/trainer/checkpoint.py``:
trainable weights raw and EMA, optimizer state, stream state, ``trainer_state.json`` and ``manifest.json``,
the files' sizes and sha256, written last), ``adapter/`` (the final weights: ``adapter.safetensors``,
``adapter_ema.safetensors`` and with LoRA ``lora.safetensors``, ``lora_ema.safetensors``, diffusers' LoRA
files), ``validation/step_NNNNNNN_K.png`` (generated with the EMA weights, layout drawn) and ``logs/``
(TensorBoard: loss, lr, grad_norm, samples_per_s, stream/*; a resumed run supersedes what the
interrupted one logged after its checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from training.trainer.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    import torch

__all__ = ["TrainResult", "load_cli_config", "main", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished ``train`` call leaves behind (paths are written by the main process)."""

    output_dir: Path
    adapter_path: Path  # final raw adapter weights (safetensors)
    ema_adapter_path: Path | None  # final EMA adapter weights, None when EMA is off
    step: int  # optimizer steps done, resumed ones included
    losses: list[float] = field(default_factory=list)  # this rank's loss per optimizer step of this call
    grad_norms: list[float] = field(default_factory=list)  # global gradient norm before clipping, per step
    checkpoint: Path | None = None  # the last checkpoint written
    validation_images: list[Path] = field(default_factory=list)
    adapter_state: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # this rank's raw adapter (and LoRA) weights (CPU, UNet state-dict keys)
    unet: torch.nn.Module | None = None  # the trained UNet (unwrapped, raw weights); None under FSDP
    lora_path: Path | None = None  # final raw LoRA weights (diffusers' LoRA file), None without LoRA
    ema_lora_path: Path | None = None  # final EMA LoRA weights


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; returns where the weights are and the per-step losses.

    Callable several times in one process, but accelerate fixes the mixed precision at the first call.
    Raises ConfigError / CheckpointError (naming the field or file) before writing anything.
    """
    # Imported here rather than at the top: diffusers imports bitsandbytes whenever it is installed (slow,
    # and it logs about missing kernels), so `--help` and config mistakes answer without them.
    import torch
    from tqdm.auto import tqdm

    from training.data.stream import build_loader
    from training.trainer.accelerator import init_trackers, make_accelerator
    from training.trainer.checkpoint import (
        CheckpointError,
        load_checkpoint,
        read_resume_state,
        resolve_on_main,
        save_checkpoint,
    )
    from training.trainer.flow import build_flow_model, flow_adapter_config, is_flow
    from training.trainer.fsdp import shard_unet, uses_fsdp
    from training.trainer.model_setup import (
        adapter_config,
        build_model,
        learning_rate,
        make_ema,
        make_optimizer,
    )
    from training.trainer.step import diffusion_loss, sample_draws, sample_seeds, unet_inputs
    from training.trainer.trainable import save_final_weights
    from training.trainer.validation import stream_validation_layouts, validate

    accelerator = make_accelerator(config)
    device, is_main = accelerator.device, accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out}: exists and is not a folder")

    # The checkpoint to resume from and the stream first: a mistake in either stops the run before
    # anything is written or loaded.
    resume_from = resolve_on_main(accelerator, config.checkpoint.resume, out)
    resumed = read_resume_state(resume_from, config, world) if resume_from else None
    step = resumed.step if resumed else 0
    flow = is_flow(config)  # an SD3 / FLUX.1 base trains with flow matching (training/trainer/flow.py)
    (flow_adapter_config if flow else adapter_config)(config.model)  # the adapter file against the config (cheap)
    try:  # the last check: the stream index it builds is kept in output_dir for a restart (rank 0 writes it)
        loader = build_loader(config.data, rank=rank, world_size=world, index_cache=str(out / "stream_index"))
    except (OSError, ConfigError) as e:
        raise ConfigError(str(e) if str(e).startswith("data") else f"data: {e}") from None
    if resumed:
        try:
            loader.load_state_dict(resumed.stream_state)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{resume_from / 'stream_state.json'}: {e}") from None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if config.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # Models: everything frozen in the compute dtype; the adapter (and LoRA) trainable, in fp32. The model
    # is wrapped (DDP) or sharded (FSDP2, by us) first, then the optimizer over its (sharded) parameters.
    model = (build_flow_model if flow else build_model)(config, device)
    frozen, n_timesteps = model.frozen, model.n_timesteps
    if flow:
        sample_draws, unet_inputs, diffusion_loss = frozen.step_functions()
    fsdp = uses_fsdp(config, world)
    unet = shard_unet(model.unet, config, device, world) if fsdp else accelerator.prepare(model.unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = accelerator.prepare(make_optimizer(params, config.optim, sharded=fsdp))
    ema = make_ema(params, config.ema)
    if resumed:
        load_checkpoint(accelerator, unet, params, optimizer, ema, resumed)
        if is_main:
            log.info("resumed from %s at step %d", resume_from, step)
    init_trackers(accelerator, config, step)

    accum, batch_size = config.train.gradient_accumulation_steps, config.data.batch_size
    samples_per_step = batch_size * accum * world
    lora, use_ema = bool(config.model.lora_rank), ema is not None
    result = TrainResult(
        output_dir=out,
        adapter_path=out / "adapter" / "adapter.safetensors",
        ema_adapter_path=out / "adapter" / "adapter_ema.safetensors" if use_ema else None,
        step=step,
        lora_path=out / "adapter" / "lora.safetensors" if lora else None,
        ema_lora_path=out / "adapter" / "lora_ema.safetensors" if lora and use_ema else None,
    )
    validation_layouts = list(config.validation.layouts)
    if is_main:
        log.info(
            "training %d adapter tensors (%.1f M params) on %d process(es); effective batch %d (%d x %d x %d)",
            len(params),
            sum(p.numel() for p in params) / 1e6,
            world,
            samples_per_step,
            batch_size,
            accum,
            world,
        )
    progress = tqdm(
        total=config.train.max_steps,
        initial=step,
        disable=not accelerator.is_local_main_process,
        desc="train",
    )
    latent_channels = accelerator.unwrap_model(unet).config.in_channels
    step_loss = 0.0
    window_start, window_steps = time.perf_counter(), 0  # for samples/s, validation and checkpoints excluded
    while step < config.train.max_steps:
        for batch in loader:
            if not validation_layouts and is_main:
                validation_layouts = stream_validation_layouts(batch, config.validation.num_images, config)
            # Each sample's seed is keyed by its (epoch, position) in the global order: resuming, regrouping
            # into micro-batches or re-splitting over other ranks / batch sizes draws the same for it.
            seeds = sample_seeds(config, batch["stream_position"])
            h, w = (int(x) // 8 for x in batch["target_size"][0])
            draws = sample_draws(seeds, (latent_channels, h, w), config, n_timesteps)
            with accelerator.accumulate(unet):
                if fsdp:  # reduce-scatter on the synchronising micro-batch only, as DDP's no_sync does
                    unet.set_requires_gradient_sync(accelerator.sync_gradients)
                inputs = unet_inputs(batch, draws, frozen, device)
                with accelerator.autocast():
                    loss = diffusion_loss(unet, inputs)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(step, config)
                    limit = config.optim.max_grad_norm or float("inf")
                    # Under FSDP the norm of sharded gradients is a collective (a DTensor): every rank clips.
                    grad_norm = accelerator.clip_grad_norm_(params, limit)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach().item() / accum
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done.
            if ema is not None:
                ema.step(params)
            step += 1
            window_steps += 1
            progress.update(1)
            result.losses.append(step_loss)
            result.grad_norms.append(float(grad_norm))
            if step % config.log.every_steps == 0 or step == config.train.max_steps:
                elapsed = time.perf_counter() - window_start
                logs = {
                    "loss": accelerator.reduce(torch.tensor(step_loss, device=device), "mean").item(),
                    "lr": learning_rate(step - 1, config),
                    "grad_norm": float(grad_norm),
                    "samples_per_s": samples_per_step * window_steps / elapsed,
                    **_stream_counters(loader),  # summed over the ranks (every rank gets here)
                }
                accelerator.log(logs, step=step)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                window_start, window_steps = time.perf_counter(), 0
            step_loss = 0.0
            every = config.validation.every_steps
            if every and (step % every == 0 or step == config.train.max_steps):
                result.validation_images += validate(
                    accelerator, unet, params, ema, frozen, validation_layouts, config, step
                )
                window_start, window_steps = time.perf_counter(), 0
            every = config.checkpoint.every_steps
            if (every and step % every == 0) or step == config.train.max_steps:
                result.checkpoint = save_checkpoint(
                    accelerator, unet, params, optimizer, ema, loader, step, config
                )
                window_start, window_steps = time.perf_counter(), 0
            if step >= config.train.max_steps:
                break
    progress.close()

    # Final weights: raw and EMA, adapter (and LoRA) only.
    raw = save_final_weights(accelerator, unet, params, ema, result.adapter_path.parent)
    if is_main:
        log.info("done at step %d: %s", step, result.adapter_path)
    accelerator.end_training()
    result.step = step
    result.adapter_state = raw
    result.unet = None if fsdp else accelerator.unwrap_model(unet)  # FSDP: each rank holds a shard only
    return result


def _stream_counters(loader) -> dict[str, int]:
    """Every rank's stream counters summed, as ``stream/<name>`` scalars; a collective."""
    from accelerate.utils import gather_object

    counters: dict[str, int] = {}
    for c in gather_object([loader.counters()]):
        for k, v in c.items():
            counters[f"stream/{k}"] = counters.get(f"stream/{k}", 0) + v
    return counters


# ---------------------------------------------------------------------------------------------------
# CLI


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def load_cli_config(path: str, overrides: list[str]) -> TrainConfig:
    """The config of a command line; every mistake raises ConfigError naming the file, override or field."""
    if Path(path).exists() and not Path(path).is_file():  # a folder, or a FIFO that would block open()
        raise ConfigError(f"--config {path}: not a regular file")
    try:
        with open(path) as f:
            yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {_one_line(e)}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path}: YAML nested too deep") from None
    for item in overrides:
        try:
            yaml.safe_load(item.partition("=")[2])
        except yaml.YAMLError as e:
            raise ConfigError(f"--override {item!r}: the value is not valid YAML: {_one_line(e)}") from None
        except RecursionError:
            raise ConfigError(f"--override {item[:40]!r}...: the value is nested too deep") from None
    try:
        return TrainConfig.from_yaml(path, overrides)
    except ConfigError as e:
        hit = [o for o in overrides if o.partition("=")[0] and o.partition("=")[0] in str(e)]
        if hit and "override" not in str(e):
            raise ConfigError(f"--override {hit[0]!r}: {e}") from None
        raise


def main(argv: list[str] | None = None) -> int:
    """``python -m training.train --config FILE [--override key=value ...] [--resume PATH|latest]``.

    Prints the result as JSON; a mistake in the config, the data or the checkpoint prints one ``error:``
    line and returns 2.
    """
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/train/tiny.yaml")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config field (dotted key, YAML value); repeatable",
    )
    parser.add_argument(
        "--resume",
        metavar="FOLDER|latest",
        help="resume from this checkpoint folder (refused if damaged) or the newest intact one of output_dir",
    )
    args = parser.parse_args(argv)
    overrides = list(args.override)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={json.dumps(args.resume)}")  # JSON is YAML
    # Only rank 0 of a multi-process launch reports (every rank fails the same way).
    reports = int(os.environ.get("RANK", "0")) == 0
    try:
        config = load_cli_config(args.config, overrides)
    except ConfigError as e:
        return _fail(e, reports)

    from training.trainer.checkpoint import CheckpointError

    logging.basicConfig(
        level=logging.INFO if reports else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = train(config)
    except (ConfigError, CheckpointError) as e:
        return _fail(e, reports)
    except OSError as e:  # a base model that cannot load (offline, no such folder), an unwritable output
        return _fail(e, reports)
    if reports:
        summary: dict[str, Any] = {
            "step": result.step,
            "adapter": str(result.adapter_path),
            "ema_adapter": str(result.ema_adapter_path) if result.ema_adapter_path else None,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "final_loss": result.losses[-1] if result.losses else None,
        }
        print(json.dumps(summary))
    return 0


def _fail(e: BaseException, reports: bool) -> int:
    if reports:
        print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

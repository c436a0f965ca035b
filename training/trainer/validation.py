"""Validation images during training: layouts from the config or the stream, generated with the EMA weights.

Each image is drawn with its layout and saved as ``validation/step_NNNNNNN_K.png``; the main rank logs them
to TensorBoard / W&B. Under FSDP every rank runs the same generation through the wrapped UNet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from diffusers.training_utils import EMAModel
from PIL import Image

from shards.draw import draw_layout
from training.inference.pipeline import LayoutPipeline, stock_pipeline
from training.trainer.config import TrainConfig, ValidationLayout
from training.trainer.fsdp import is_sharded
from training.trainer.step import Frozen
from training.trainer.trainable import ema_weights

__all__ = ["generate_validation", "stream_validation_layouts", "validate"]


def stream_validation_layouts(batch: dict, n: int, config: TrainConfig) -> list[ValidationLayout]:
    """Validation prompts from the first samples of a training batch, boxes scaled to the validation size."""
    v = config.validation
    out = []
    for i in range(min(n, len(batch["caption"]))):
        h, w = (int(x) for x in batch["target_size"][i])
        k = int(batch["object_count"][i])
        scale = np.array([v.width / w, v.height / h] * 2)
        boxes = tuple(tuple(float(c) for c in b) for b in batch["object_boxes"][i, :k].numpy() * scale)
        out.append(ValidationLayout(batch["caption"][i], boxes, tuple(batch["object_texts"][i][:k])))
    return out


@torch.no_grad()
def generate_validation(
    pipe: LayoutPipeline, layouts: list[ValidationLayout], config: TrainConfig
) -> list[Image.Image]:
    """One image per layout (CFG's negative branch: "" and the empty layout), with the layout drawn on it."""
    v = config.validation
    images = []
    for i, layout in enumerate(layouts):
        image = pipe(
            layout.caption,
            boxes=np.array(layout.boxes, dtype=np.float64).reshape(-1, 4),
            labels=list(layout.labels),
            height=v.height,
            width=v.width,
            num_inference_steps=v.num_inference_steps,
            guidance_scale=v.guidance_scale,
            attention_weight_scale=config.model.attention_weight_scale,
            generator=torch.Generator().manual_seed(v.seed + i),
        ).images[0]
        images.append(draw_layout(image, layout.boxes, layout.labels))
    return images


def validate(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    params: list[torch.nn.Parameter],
    ema: EMAModel | None,
    frozen: Frozen,
    layouts: list[ValidationLayout],
    config: TrainConfig,
    step: int,
) -> list[Path]:
    """Generate the validation images with the EMA weights; the main rank saves them and logs them.

    Without FSDP only the main rank generates. Under FSDP every rank runs the same generation through the
    wrapped UNet (each forward gathers the shards from all ranks), with the main rank's layouts.
    """
    paths: list[Path] = []
    fsdp = is_sharded(unet)
    if fsdp:
        box = [layouts]
        broadcast_object_list(box, from_process=0)
        layouts = box[0]
    if (accelerator.is_main_process or fsdp) and layouts:
        sdxl = frozen.pipe
        if fsdp and "unet" in sdxl.components:  # an MM-DiT pipeline holds the transformer sharded in place
            # A pipeline of the same parts around the wrapped UNet (each forward gathers the shards).
            sdxl = stock_pipeline({**frozen.pipe.components, "unet": unet})
            sdxl.set_progress_bar_config(disable=True)
        r = config.data.regions
        pipe = LayoutPipeline(
            sdxl, max_objects=r.max_objs, max_regions=r.max_regions, max_slots=r.max_slots, rasterize=r.rasterize
        )
        unet.eval()
        with ema_weights(ema, params), accelerator.autocast():
            images = generate_validation(pipe, layouts, config)
        unet.train()
    if accelerator.is_main_process and layouts:
        folder = Path(config.output_dir) / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            paths.append(folder / f"step_{step:07d}_{i}.png")
            image.save(paths[-1])
        _log_images(accelerator, images, layouts, step)
    accelerator.wait_for_everyone()
    return paths


def _log_images(accelerator: Accelerator, images: list[Image.Image], layouts, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images(
                {"validation": np.stack([np.asarray(im) for im in images])}, step, dataformats="NHWC"
            )
        elif tracker.name == "wandb":
            import wandb

            captioned = [
                wandb.Image(im, caption=lay.caption) for im, lay in zip(images, layouts, strict=True)
            ]
            tracker.log({"validation": captioned}, step=step)

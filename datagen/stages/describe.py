"""Stage 6, describe: a rich description of every object from the VLM looking at its crop.

As in the paper: the crop of each box of at least 32x32 px (area), resized to a 512 px shorter side,
with the paper's prompt; smaller boxes keep their detector phrase. Unlike its loop (one VLM call per
object), all crops of a batch, across images, go through batched generation. Very elongated boxes
take context from the image around them so the crop's aspect stays within what the VLM accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from shards.config import NonNegativeInt, PositiveFloat, PositiveInt

from ..models import ModelSpec, default_spec
from ..scoring import crop_box
from . import Batch, as_image, as_objects, run_rows
from .vlm import ask, clean_text, load_chat_vlm

STAGE = "describe"
# The paper's instruction (its public datagen script), verbatim.
PAPER_PROMPT = (
    "You are viewing an image. Please describe the content of the image in one sentence, focusing "
    "specifically on the spatial relationships between objects. Include detailed observations about all "
    "the objects and how they are positioned in relation to other objects in the image. Your response "
    "should be limited to this description, without any additional information"
)


@dataclass(frozen=True)
class DescribeConfig:
    """How object crops are described."""

    model: ModelSpec = field(default_factory=lambda: default_spec("vlm"))
    prompt: str = PAPER_PROMPT  # the VLM's instruction for each crop
    crop_short_side: PositiveInt = 512  # crops are resized to this shorter side (the paper's 512)
    max_crop_side: PositiveInt = 1536  # ... and their longer side capped to this (token cost)
    max_crop_aspect: PositiveFloat = 8.0  # longer/shorter side; beyond it the crop widens into its context
    min_crop_area: NonNegativeInt = 32 * 32  # boxes under this area (px) keep their phrase (the paper's rule)
    max_pixels: PositiveInt | None = None  # crops downscaled to at most this area for the VLM; None: as resized
    max_new_tokens: PositiveInt = 96  # description length cap in VLM tokens
    generate_batch_size: PositiveInt = 16  # crops per generate call
    batch_size: PositiveInt = 4  # rows per Ray batch (a hint for the pipeline)


class DescribeStage:
    """Fills ``description`` of every object of each ok row."""

    def __init__(self, config: DescribeConfig) -> None:
        self.config = config
        self.model, self.processor = load_chat_vlm(config.model)

    def __call__(self, batch: Batch) -> Batch:
        cfg = self.config

        def describe(rows: list[int]) -> dict[str, list]:
            objects = [as_objects(batch["objects"][i]) for i in rows]
            crops, where = [], []
            for k, objs in enumerate(objects):
                image = as_image(batch["image"][rows[k]]) if objs else None
                for j, crop in crops_to_describe(image, objs, cfg):
                    crops.append(crop)
                    where.append((k, j))
            answers = ask(self.model, self.processor, crops, cfg)
            for (k, j), answer in zip(where, answers, strict=True):
                text = clean_description(answer)
                if text is not None:
                    objects[k][j]["description"] = text
            return {"objects": objects}

        return run_rows(batch, STAGE, describe, ("objects",))


def crops_to_describe(image: np.ndarray | None, objects: list[dict], cfg: DescribeConfig) -> list[tuple[int, np.ndarray]]:
    """``(object index, crop)`` of each object of one image big enough to describe (any engine).

    Sets every object's ``description`` to its phrase first: what small boxes and empty answers keep.
    """
    crops = []
    for j, obj in enumerate(objects):
        obj["description"] = obj["phrase"]
        if box_area(obj["box"]) >= cfg.min_crop_area:
            crops.append((j, object_crop(image, obj["box"], cfg)))
    return crops


def clean_description(answer: str) -> str | None:
    """An answer as a description: whitespace collapsed; None (keep the phrase) when it has no letter."""
    text = clean_text(answer)
    return text if any(c.isalpha() for c in text) else None


def box_area(box: Sequence[float]) -> float:
    """Area of an xyxy box in px."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def object_crop(image: np.ndarray, box: Sequence[float], cfg: DescribeConfig) -> np.ndarray:
    """The crop the VLM sees: the box (widened to ``max_crop_aspect`` when very elongated), resized
    so its shorter side is ``crop_short_side`` and its longer side at most ``max_crop_side``."""
    x1, y1, x2, y2 = widen_to_aspect(box, image.shape[1], image.shape[0], cfg.max_crop_aspect)
    crop = Image.fromarray(crop_box(image, (x1, y1, x2, y2), at_least_one_pixel=True))
    w, h = crop.size
    scale = min(cfg.crop_short_side / min(w, h), cfg.max_crop_side / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(crop.resize(size, Image.BICUBIC))


def widen_to_aspect(box: Sequence[float], width: int, height: int, max_aspect: float) -> tuple[float, ...]:
    """Grow the shorter side of an xyxy box about its centre until long/short <= max_aspect,
    within the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    bw, bh = x2 - x1, y2 - y1
    if bw < bh and bh > max_aspect * bw:
        cx, half = (x1 + x2) / 2, min(bh / max_aspect, width) / 2
        x1, x2 = _fit(cx - half, cx + half, width)
    elif bh <= bw and bw > max_aspect * bh:
        cy, half = (y1 + y2) / 2, min(bw / max_aspect, height) / 2
        y1, y2 = _fit(cy - half, cy + half, height)
    return x1, y1, x2, y2


def _fit(lo: float, hi: float, limit: float) -> tuple[float, float]:
    """Shift [lo, hi] inside [0, limit] keeping its length (assumed <= limit)."""
    if lo < 0:
        lo, hi = 0.0, hi - lo
    if hi > limit:
        lo, hi = lo - (hi - limit), float(limit)
    return max(lo, 0.0), hi

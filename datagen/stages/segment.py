"""Stage 5, segment: a SAM mask for every object, prompted with its box.

As in the paper: segment-anything's SAM (ViT-H by default), box prompts, ``multimask_output=False``.
Unlike its loop, the images of a batch go through the image encoder together (the expensive part),
and each image's boxes go through ``SamPredictor.predict_torch`` in one call on that image's
embedding. Fills each object's ``mask`` (COCO RLE at the stored image's size), ``mask_score`` (SAM's
predicted IoU) and ``mask_box`` (the mask's tight box, None when empty). ``mask_agreement`` compares
that box with the prompt box; the filter stage holds the floor on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from segment_anything import SamPredictor

from shards import encode_mask, mask_to_box
from shards.config import PositiveInt
from shards.masks import box_iou_pairs

from ..models import ModelSpec, default_spec, load_model
from ..scoring import sam_box_masks, set_sam_embedding
from . import Batch, as_image, as_objects, run_rows

STAGE = "segment"


@dataclass(frozen=True)
class SegmentConfig:
    """How SAM is batched."""

    model: ModelSpec = field(default_factory=lambda: default_spec("segmenter"))
    encoder_batch_size: PositiveInt = 4  # images per image-encoder forward (ViT-H at 1024 px is heavy)
    max_boxes_per_call: PositiveInt = 64  # box prompts per mask-decoder call
    batch_size: PositiveInt = 8  # rows per Ray batch (a hint for the pipeline)


class SegmentStage:
    """Fills ``mask``, ``mask_score`` and ``mask_box`` of every object of each ok row."""

    def __init__(self, config: SegmentConfig) -> None:
        self.config = config
        self.sam, self.transform = load_model(config.model)  # float32 weights (see datagen.models)
        self.encoder_dtype = config.model.resolved_dtype()
        self.predictor = SamPredictor(self.sam)

    def __call__(self, batch: Batch) -> Batch:
        def segment(rows: list[int]) -> dict[str, list]:
            objects = [as_objects(batch["objects"][i]) for i in rows]
            todo = [k for k, objs in enumerate(objects) if objs]
            images = [as_image(batch["image"][rows[k]]) for k in todo]
            for k, image, embedding in zip(todo, images, self.embed(images), strict=True):
                objects[k] = self.masks(image, embedding, objects[k])
            return {"objects": objects}

        return run_rows(batch, STAGE, segment, ("objects",))

    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """SAM image embeddings (1, C, h, w) of each image, encoded ``encoder_batch_size`` at a time."""
        embeddings: list[torch.Tensor] = []
        step = max(1, self.config.encoder_batch_size)
        device = self.sam.device
        low_precision = self.encoder_dtype != torch.float32
        for start in range(0, len(images), step):
            inputs = torch.cat([self._input(im) for im in images[start : start + step]])
            with torch.autocast(device.type, dtype=self.encoder_dtype, enabled=low_precision):
                features = self.sam.image_encoder(inputs)
            embeddings.extend(features.float().split(1))
        return embeddings

    def _input(self, image: np.ndarray) -> torch.Tensor:
        """Resize the longest side to SAM's input size, normalise and pad (as SamPredictor.set_image)."""
        resized = torch.as_tensor(self.transform.apply_image(image), device=self.sam.device)
        return self.sam.preprocess(resized.permute(2, 0, 1)[None].float())

    @torch.inference_mode()
    def masks(self, image: np.ndarray, embedding: torch.Tensor, objects: list[dict]) -> list[dict]:
        """The objects of one image with their masks, every box prompted on the one embedding."""
        set_sam_embedding(self.predictor, embedding, image.shape[:2])
        boxes = np.array([o["box"] for o in objects], dtype=np.float32)
        masks, scores = sam_box_masks(self.predictor, boxes, self.config.max_boxes_per_call)
        self.predictor.reset_image()
        out = []
        for obj, mask, score in zip(objects, masks, scores, strict=True):
            mask_box = mask_to_box(mask)
            out.append(
                {
                    **obj,
                    "mask": encode_mask(mask),
                    "mask_score": float(score),
                    "mask_box": None if mask_box is None else list(mask_box),
                }
            )
        return out


def mask_agreement(
    boxes: Sequence[Sequence[float]], mask_boxes: Sequence[Sequence[float] | None]
) -> list[float]:
    """IoU of each prompt box with its mask's tight box; 0 for an empty mask (None)."""
    if not len(boxes):
        return []
    filled = [(0.0, 0.0, 0.0, 0.0) if m is None else m for m in mask_boxes]  # zero area: IoU 0
    return box_iou_pairs(boxes, filled).tolist()

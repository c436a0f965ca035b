"""SAM 2.1 as the segment stage's engine: a mask for every object, prompted with its box.

Chosen by the model: when ``stages.segment.model`` names a hub id or folder (no ``weights``) that loads
as transformers' ``Sam2Model`` (e.g. ``facebook/sam2.1-hiera-large``), ``SegmentStage`` hands its
objects to ``Sam2Segmenter``. As with segment-anything's SAM: the images go through the image encoder
``encoder_batch_size`` at a time (under autocast to the spec's dtype; weights stay float32, since box
prompts are pixel coordinates), then each image's boxes go through the prompt encoder and mask decoder
together, ``max_boxes_per_call`` at a time, ``multimask_output=False`` (the paper's choice for box
prompts). The mask's logits are resized to the stored image and cut at 0 (``Sam2Processor.post_process_masks``);
``mask_score`` is SAM 2's predicted IoU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import with_mask

MODEL_TYPE = "sam2"


def is_sam2(model: Any) -> bool:
    """Whether a loaded segmenter is transformers' SAM 2 (``Sam2Model``)."""
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


class Sam2Segmenter:
    """Mask fields for each object of each image, every box prompted on its image's embeddings."""

    def __init__(self, model, processor, config) -> None:
        self.model, self.processor, self.config = model, processor, config
        self.dtype = config.model.resolved_dtype()  # the image encoder's autocast dtype

    @torch.inference_mode()
    def segment(self, images: Sequence[np.ndarray], objects: Sequence[list[dict]]) -> list[list[dict]]:
        """``objects[k]`` of ``images[k]`` with their masks (each list non-empty)."""
        out: list[list[dict]] = []
        step = max(1, self.config.encoder_batch_size)
        for start in range(0, len(images), step):
            group = images[start : start + step]
            embeddings = self.embed(group)
            for k, image in enumerate(group):
                out.append(self.masks(image, [e[k : k + 1] for e in embeddings], objects[start + k]))
        return out

    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """SAM 2's image embeddings of ``images`` (one tensor per feature level, batch first), float32."""
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        device = self.model.device
        low_precision = self.dtype != torch.float32
        with torch.autocast(device.type, dtype=self.dtype, enabled=low_precision):
            embeddings = self.model.get_image_embeddings(pixels.to(device))
        return [e.float() for e in embeddings]

    @torch.inference_mode()
    def masks(self, image: np.ndarray, embeddings: list[torch.Tensor], objects: list[dict]) -> list[dict]:
        """The objects of one image with their masks, ``max_boxes_per_call`` box prompts per decoder call."""
        size = [list(image.shape[:2])]
        out: list[dict] = []
        step = max(1, self.config.max_boxes_per_call)
        for start in range(0, len(objects), step):
            part = objects[start : start + step]
            boxes = self.processor(
                input_boxes=[[o["box"] for o in part]], original_sizes=size, return_tensors="pt"
            )["input_boxes"]  # in the model's input frame
            pred = self.model(
                image_embeddings=embeddings, input_boxes=boxes.to(self.model.device), multimask_output=False
            )
            masks = self.processor.post_process_masks(pred.pred_masks.float().cpu(), size)[0][:, 0].numpy()
            scores = pred.iou_scores[0, :, 0].float().cpu().tolist()
            out.extend(with_mask(o, m, s) for o, m, s in zip(part, masks, scores, strict=True))
        return out

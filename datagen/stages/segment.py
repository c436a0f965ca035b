"""Stage 5, segment: a SAM mask for every object, prompted with its box.

As in the paper: segment-anything's SAM (ViT-H by default), box prompts, ``multimask_output=False``.
Unlike its loop, the images of a batch go through the image encoder together (the expensive part),
and each image's boxes go through ``SamPredictor.predict_torch`` in one call on that image's
embedding. Fills each object's ``mask`` (COCO RLE at the stored image's size), ``mask_score`` (SAM's
predicted IoU) and ``mask_box`` (the mask's tight box, None when empty). ``mask_agreement`` compares
that box with the prompt box; the filter stage holds the floor on it.

A hub id or folder as the model (no ``weights``), e.g. ``facebook/sam2.1-hiera-large``, runs SAM 2.1
(``segment_sam2``). Objects that arrive masked (SAM 3 grounds and segments in one, ``ground_sam3``) are
passed on as they are; ``model: null`` loads no segmenter at all and fails a row whose object has no
mask. The stage counts both kinds of object (``counts``: the run record's ``stages.segment.counts``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from segment_anything import SamPredictor

from shards.config import PositiveInt
from shards.masks import box_iou_pairs

from ..models import ModelSpec, default_spec, load_model
from ..scoring import sam_box_masks, set_sam_embedding
from . import Batch, as_image, as_objects, ok_rows, run_rows, with_mask
from .segment_sam2 import Sam2Segmenter, is_sam2

log = logging.getLogger(__name__)

STAGE = "segment"


@dataclass(frozen=True)
class SegmentConfig:
    """How SAM is batched."""

    model: ModelSpec | None = field(default_factory=lambda: default_spec("segmenter"))  # None: no segmenter,
    #   every object must arrive masked (a SAM 3 ground stage)
    encoder_batch_size: PositiveInt = 4  # images per image-encoder forward (ViT-H at 1024 px is heavy)
    max_boxes_per_call: PositiveInt = 64  # box prompts per mask-decoder call
    batch_size: PositiveInt = 8  # rows per Ray batch (a hint for the pipeline)


class SegmentStage:
    """Fills ``mask``, ``mask_score`` and ``mask_box`` of every object of each ok row."""

    def __init__(self, config: SegmentConfig) -> None:
        self.config = config
        self.counts: Counter = Counter()  # objects "segmented" here and "premasked" upstream, this process
        self.said_premasked = False
        self.sam2: Sam2Segmenter | None = None
        if config.model is None:
            return
        model, processor = load_model(config.model)  # float32 weights (see datagen.models)
        if is_sam2(model):
            self.sam2 = Sam2Segmenter(model, processor, config)
            return
        self.sam, self.transform = model, processor
        self.encoder_dtype = config.model.resolved_dtype()
        self.predictor = SamPredictor(self.sam)

    def __call__(self, batch: Batch) -> Batch:
        def segment(rows: list[int]) -> dict[str, list]:
            objects = [as_objects(batch["objects"][i]) for i in rows]
            todo = {k: [j for j, o in enumerate(objs) if o["mask"] is None] for k, objs in enumerate(objects)}
            todo = {k: js for k, js in todo.items() if js}
            if todo and self.config.model is None:
                k, js = next(iter(todo.items()))
                raise ValueError(f"object {objects[k][js[0]]['phrase']!r} has no mask and stages.segment.model is "
                                 "null (no segmenter): give the segment stage a model, or ground with SAM 3")
            images = [as_image(batch["image"][rows[k]]) for k in todo]
            done = self.segment_images(images, [[objects[k][j] for j in js] for k, js in todo.items()])
            for (k, js), masked in zip(todo.items(), done, strict=True):
                for j, obj in zip(js, masked, strict=True):
                    objects[k][j] = obj
            return {"objects": objects}

        before = {i: [o.get("mask") is not None for o in batch["objects"][i] or ()] for i in ok_rows(batch)}
        out = run_rows(batch, STAGE, segment, ("objects",))
        kept = [i for i in ok_rows(out) if i in before]
        self.counts.update(premasked=sum(sum(before[i]) for i in kept),
                           segmented=sum(len(before[i]) - sum(before[i]) for i in kept))
        if self.counts["premasked"] and not self.said_premasked:
            self.said_premasked = True  # once per process; the counts go to the run record
            log.info("segment: objects arrive masked (a ground-and-segment engine such as SAM 3): passed on as they are")
        return out

    def segment_images(self, images: Sequence[np.ndarray], objects: Sequence[list[dict]]) -> list[list[dict]]:
        """``objects[k]`` of ``images[k]`` with their masks: SAM 2.1 or segment-anything's SAM."""
        if not images:
            return []
        if self.sam2 is not None:
            return self.sam2.segment(images, objects)
        return [self.masks(im, emb, objs) for im, emb, objs in zip(images, self.embed(images), objects, strict=True)]

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
        return [with_mask(obj, mask, score) for obj, mask, score in zip(objects, masks, scores, strict=True)]


def mask_agreement(
    boxes: Sequence[Sequence[float]], mask_boxes: Sequence[Sequence[float] | None]
) -> list[float]:
    """IoU of each prompt box with its mask's tight box; 0 for an empty mask (None)."""
    if not len(boxes):
        return []
    filled = [(0.0, 0.0, 0.0, 0.0) if m is None else m for m in mask_boxes]  # zero area: IoU 0
    return box_iou_pairs(boxes, filled).tolist()

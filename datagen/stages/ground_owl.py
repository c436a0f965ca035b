"""The ground stage on OWLv2 (``Owlv2ForObjectDetection``, e.g. ``google/owlv2-base-patch16-ensemble``).

OWLv2 takes a list of text queries per image and scores every patch's box against each query, so each
tag is its own query: a box's ``phrase`` is the tag of its best query, with no token-to-tag assignment
(``text_threshold`` does not apply). Scores are the sigmoid of the query logits, as transformers'
``Owlv2ImageProcessor.post_process_object_detection`` computes them; a box is kept when its best score
exceeds ``box_threshold`` (OWLv2's scores run lower than GroundingDINO's: its model card uses 0.1).

Boxes: the image processor pads each image at the bottom and right to a square and resizes that to
the model's input (960 px for the real model), so the predicted boxes are relative to the padded square,
whose side is the longer side of the stored image; they are scaled by it and clipped to the image.
``image_size`` sets the square's side (the position embeddings are interpolated when it differs from
the model's own). Then the filters every ground engine shares (``ground.select_objects``).

Images are batched: ``forward_batch_size`` images per forward, each with its own tags; shorter tag
lists are padded with blank queries whose scores are never read. A tag longer than the text model's
16 tokens is truncated in its query (its phrase stays whole).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_convert

BLANK_QUERY = (
    " "  # pads an image's query list to the batch's longest (transformers' Owlv2Processor does alike)
)


class OwlDetector:
    """Phrase grounding with OWLv2: one query per tag, images batched."""

    def __init__(self, model: Any, processor: Any, config: Any) -> None:
        self.model, self.processor, self.config = model, processor, config
        self.max_tokens = int(model.config.text_config.max_position_embeddings)
        self.padded = bool(getattr(processor.image_processor, "do_pad", True))

    def detect(self, images: Sequence[np.ndarray], tags: Sequence[list[str]]) -> list[list[dict]]:
        """Objects for each image given its tags (``ground.GroundStage.detect``'s contract)."""
        from .ground import select_objects  # ground imports this module

        rows = [r for r, t in enumerate(tags) if t]
        found: dict[int, list[tuple]] = {}
        step = max(1, self.config.forward_batch_size)
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            for r, dets in zip(
                chunk, self._forward([images[r] for r in chunk], [tags[r] for r in chunk]), strict=True
            ):
                found[r] = dets
        return [select_objects(image, found.get(r, []), self.config) for r, image in enumerate(images)]

    @torch.inference_mode()
    def _forward(self, images: list[np.ndarray], tags: list[list[str]]) -> list[list[tuple]]:
        """(box xyxy px, score, tag) above ``box_threshold`` for each image."""
        width = max(len(t) for t in tags)
        queries = [q for t in tags for q in [*t, *[BLANK_QUERY] * (width - len(t))]]
        text = self.processor.tokenizer(
            queries, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        size = self.config.image_size
        sizes = {"size": {"height": size, "width": size}} if size else {}
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt", **sizes)[
            "pixel_values"
        ]
        device, dtype = self.model.device, self.model.dtype
        out = self.model(
            input_ids=text["input_ids"].to(device),
            attention_mask=text["attention_mask"].to(device),
            pixel_values=pixels.to(device=device, dtype=dtype),
            interpolate_pos_encoding=pixels.shape[-1] != self.model.config.vision_config.image_size,
        )
        probs = out.logits.float().sigmoid().cpu()  # (images, patches, width)
        boxes = box_convert(out.pred_boxes.float().cpu(), "cxcywh", "xyxy")  # relative to the padded square
        results = []
        for k, (image, row_tags) in enumerate(zip(images, tags, strict=True)):
            score, best = probs[k, :, : len(row_tags)].max(dim=1)  # blank queries' columns never read
            keep = (score > self.config.box_threshold).nonzero().flatten().tolist()
            h, w = image.shape[:2]
            # Padded at the bottom and right to a square of the longer side (without padding: stretched).
            scale = torch.tensor([max(h, w)] * 4 if self.padded else [w, h, w, h], dtype=torch.float32)
            results.append([(boxes[k, q] * scale, float(score[q]), row_tags[int(best[q])]) for q in keep])
        return results

"""SAM 3 as the ground stage's engine: each row's tags in, objects with boxes, masks and scores out.

Chosen by the model, not by a setting: when ``stages.ground.model`` loads as transformers' ``Sam3Model``
(``model_type`` "sam3", e.g. ``facebook/sam3``), ``GroundStage`` hands its rows to ``Sam3Grounder``.
SAM 3 grounds one noun phrase per batch row, so each image goes through the vision encoder once and its
embeddings are shared (expanded, not copied) by the rows of its phrases, ``forward_batch_size`` phrases
per DETR forward. Per image:

- an object's score is SAM 3's: the query's score times the phrase's presence score (what
  ``Sam3Processor.post_process_instance_segmentation`` keeps); it must exceed ``box_threshold``
  (``text_threshold`` is GroundingDINO's token rule and does not apply);
- each phrase's ``max_objects`` best queries above the threshold are the candidates, then the filters
  every ground engine shares (``ground.select_boxes``: box size bounds, class-agnostic NMS, same-phrase
  near-duplicates, the ``max_objects`` cap) choose among all phrases' candidates;
- boxes are SAM 3's, in the stored image's pixels; each kept object's mask is its query's mask logits
  resized to the stored image and cut at 0 (probability 0.5), stored as COCO RLE; ``mask_score`` is the
  instance score (SAM 3 predicts no separate mask IoU), ``mask_box`` the mask's tight box.

The segment stage then finds every object masked and skips it (``segment.py``).

The weights stay float32 (``datagen.models``: boxes come out normalised, where bfloat16 steps are ~4 px
of a 1024 px image); the vision encoder, most of the work, runs under autocast to the spec's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import clip_boxes_to_image

from . import new_object, with_mask

log = logging.getLogger(__name__)

class Sam3Grounder:
    """Objects (box, phrase, detector_score and the mask fields) for images and their phrases."""

    def __init__(self, model, processor, config) -> None:
        from .ground import select_boxes  # ground imports this module (ground.other_detector)

        self.model, self.processor, self.config = model, processor, config
        self.select_boxes = select_boxes  # the filters every ground engine shares
        self.dtype = config.model.resolved_dtype()  # the vision encoder's autocast dtype
        self.text_length = int(model.config.text_config.max_position_embeddings)

    def detect(self, images: Sequence[np.ndarray], tags: Sequence[list[str]]) -> list[list[dict]]:
        """Objects of each image given its (cleaned) tags; one vision pass per image with a phrase."""
        return [self.detect_one(image, phrases) if phrases else [] for image, phrases in zip(images, tags, strict=True)]

    @torch.inference_mode()
    def detect_one(self, image: np.ndarray, phrases: list[str]) -> list[dict]:
        cfg = self.config
        h, w = image.shape[:2]
        vision = self._vision(image)
        boxes, scores, names, masks = [], [], [], []
        step = max(1, cfg.forward_batch_size)
        for start in range(0, len(phrases), step):
            chunk = phrases[start : start + step]
            out = self._decode(vision, chunk)
            probs = out.pred_logits.float().sigmoid() * out.presence_logits.float().sigmoid()  # (rows, queries)
            for row, phrase in enumerate(chunk):
                above = (probs[row] > cfg.box_threshold).nonzero().flatten()
                best = above[probs[row, above].argsort(descending=True)[: cfg.max_objects]]
                boxes.append(out.pred_boxes[row, best].float())
                scores.append(probs[row, best])
                names.extend([phrase] * len(best))
                masks.append(out.pred_masks[row, best].float())  # low-resolution logits
        if not names:
            return []
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes[0].device)
        all_boxes = clip_boxes_to_image(torch.cat(boxes) * scale, (h, w)).cpu()
        all_scores = torch.cat(scores).cpu()
        keep = self.select_boxes(all_boxes, all_scores, names, w, h, cfg)
        if not keep:
            return []
        logits = torch.cat(masks)[keep]
        full = F.interpolate(logits[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        full = (full > 0).cpu().numpy()
        return [
            with_mask(new_object(all_boxes[i].tolist(), names[i], float(all_scores[i])), mask, float(all_scores[i]))
            for i, mask in zip(keep, full, strict=True)
        ]

    def _vision(self, image: np.ndarray):
        """SAM 3's vision embeddings of one image (batch of 1), float32."""
        pixels = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        device = self.model.device
        low_precision = self.dtype != torch.float32
        with torch.autocast(device.type, dtype=self.dtype, enabled=low_precision):
            vision = self.model.get_vision_features(pixel_values=pixels.to(device))
        vision.fpn_hidden_states = tuple(t.float() for t in vision.fpn_hidden_states)
        vision.fpn_position_encoding = tuple(t.float() for t in vision.fpn_position_encoding)
        return vision

    def _decode(self, vision, phrases: list[str]):
        """SAM 3's outputs for one image's embeddings and ``phrases``, one phrase per batch row."""
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        n = len(phrases)
        text = self.processor.tokenizer(
            phrases, padding="max_length", max_length=self.text_length, truncation=True, return_tensors="pt"
        )
        shared = Sam3VisionEncoderOutput(  # the image's embeddings as n rows, without copies
            fpn_hidden_states=tuple(t.expand(n, *t.shape[1:]) for t in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(t.expand(n, *t.shape[1:]) for t in vision.fpn_position_encoding),
        )
        device = self.model.device
        return self.model(
            vision_embeds=shared,
            input_ids=text["input_ids"].to(device),
            attention_mask=text["attention_mask"].to(device),
        )

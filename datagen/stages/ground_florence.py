"""The ground stage on Florence-2 (``Florence2ForConditionalGeneration``, native transformers weights such as
``florence-community/Florence-2-large``; no remote code).

Florence-2 grounds phrases by generating text: its ``<CAPTION_TO_PHRASE_GROUNDING>`` task answers
"phrase<loc_x1><loc_y1><loc_x2><loc_y2>..." with coordinates quantised to 1000 bins of the image's width
and height. Each tag is asked on its own (the caption is the tag), so every box it returns belongs to
exactly that tag whatever words the model writes before the box; the answer is parsed by the
processor's ``post_process_generation`` with the stored image's size, which puts the boxes in
stored-image pixels (the processor resizes the whole image, without padding, to its 768 px square).

**No scores.** Florence-2 gives no confidence: an object's ``detector_score`` is None (NaN in the shards
and the parquet index), and the score thresholds do not apply to it: not ``box_threshold`` nor
``text_threshold`` here, not the filter stage's ``min_detector_score`` (a missing score passes every
floor). NMS, the same-phrase dedupe and the ``max_objects`` cap rank its boxes by their place in the
answers instead: every tag's first box, then every tag's second box, and so on (tags in the row's order).
``image_size`` does not apply either: the model's number of image tokens fixes its input size.

Batching: the vision tower encodes ``forward_batch_size`` images at a time, once per image; then all
(image, tag) pairs go through ``generate`` ``forward_batch_size`` pairs at a time, each pair with its
image's features (``generate``'s ``mm_encoder_outputs``), decoded with the model's generation config
(beams and all) and at most ``MAX_NEW_TOKENS`` new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

TASK = "<CAPTION_TO_PHRASE_GROUNDING>"
MAX_NEW_TOKENS = 64  # a phrase and up to ~14 boxes of 4 location tokens for one tag


class FlorenceDetector:
    """Phrase grounding with Florence-2: one generated answer per (image, tag)."""

    def __init__(self, model: Any, processor: Any, config: Any) -> None:
        if getattr(processor.image_processor, "do_center_crop", False):
            raise ValueError(
                "Florence-2's image processor crops the image: its answers' bins would not map to the image"
            )
        self.model, self.processor, self.config = model, processor, config

    def detect(self, images: Sequence[np.ndarray], tags: Sequence[list[str]]) -> list[list[dict]]:
        """Objects for each image given its tags (``ground.GroundStage.detect``'s contract)."""
        from .ground import select_objects  # ground imports this module

        pairs = [(r, tag) for r, t in enumerate(tags) for tag in t]
        step = max(1, self.config.forward_batch_size)
        used = sorted({r for r, _ in pairs})
        features = {}
        for start in range(0, len(used), step):
            chunk = used[start : start + step]
            features.update(zip(chunk, self._encode([images[r] for r in chunk]), strict=True))
        found: list[list[tuple[list[float], int, str]]] = [[] for _ in images]
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            answers = self._generate([features[r] for r, _ in chunk], [tag for _, tag in chunk])
            for (r, tag), answer in zip(chunk, answers, strict=True):
                h, w = images[r].shape[:2]
                boxes = self.processor.post_process_generation(answer, task=TASK, image_size=(w, h))[TASK][
                    "bboxes"
                ]
                found[r].extend((box, k, tag) for k, box in enumerate(boxes))
        return [select_objects(image, _ranked(dets, tags[r]), self.config) for r, (image, dets) in
                enumerate(zip(images, found, strict=True))]  # fmt: skip

    @torch.inference_mode()
    def _encode(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """Each image's projected features (image tokens x width), as the language model reads them."""
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device=self.model.device, dtype=self.model.dtype)
        return list(self.model.get_image_features(pixel_values=pixels).pooler_output)

    @torch.inference_mode()
    def _generate(self, features: list[torch.Tensor], tags: list[str]) -> list[str]:
        """The grounding answer (text with location tokens) for each (image features, tag) pair."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        proc = self.processor
        tok = proc.tokenizer
        prompt = proc.task_prompts_with_input[TASK]
        # The processor's own layout: image tokens, <s>, the task's prompt with the tag, </s>.
        texts = [proc.image_token * proc.num_image_tokens + tok.bos_token + prompt.format(input=t) + tok.eos_token
                 for t in tags]  # fmt: skip
        enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(self.model.device)
        image = BaseModelOutputWithPooling(pooler_output=torch.stack(features))
        out = self.model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            mm_encoder_outputs={"image": image},
            max_new_tokens=MAX_NEW_TOKENS,
        )
        return proc.batch_decode(out, skip_special_tokens=False)


def _ranked(dets: list[tuple[list[float], int, str]], tags: list[str]) -> list[tuple]:
    """(box, None, tag) in rank order (k-th box of each tag before any (k+1)-th), for ``select_objects``."""
    order = {t: i for i, t in enumerate(tags)}
    ranked = sorted(dets, key=lambda d: (d[1], order[d[2]]))
    return [(torch.tensor(box, dtype=torch.float32), None, tag) for box, _, tag in ranked]

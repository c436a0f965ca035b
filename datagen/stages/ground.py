"""Stage 4, ground: GroundingDINO boxes for each row's ``tags``, as an ``objects`` column.

The detector is transformers' ``GroundingDinoForObjectDetection`` (real default: grounding-dino-tiny,
the paper's SwinT-OGC) prompted with the tags joined as "a . b . c ." (transformers' documented
format). Every box is assigned the one tag whose tokens score highest, so an object's ``phrase`` is
always exactly what the detector was asked (the paper's token-threshold decoding can glue parts of
several tags together). Then, as in the paper: box threshold 0.25, text threshold 0.2, class-agnostic
NMS at IoU 0.5; and beyond it: min/max box size, same-phrase near-duplicate removal, a cap on objects.
Images are batched through the detector; tags that overflow the text length go to a second prompt.
``engine: groundingdino-py`` runs IDEA's original code instead (``ground_gdino``, its own environment).
A SAM 3 model (``facebook/sam3``) grounds and segments in one (``ground_sam3``): its objects come masked.
The engine follows the loaded model's ``config.model_type``, so a preset names only the model:
"grounding-dino" and "mm-grounding-dino" (MM GroundingDINO, same processor and outputs) run here, "owlv2"
in ``ground_owl`` (a query per tag) and "florence2" in ``ground_florence`` (generated boxes, no scores).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_area, box_convert, clip_boxes_to_image, nms

from shards.config import NonNegativeFloat, PositiveInt, UnitFloat

from ..models import ModelSpec, default_spec, load_model
from . import Batch, as_image, new_object, run_rows

log = logging.getLogger(__name__)

STAGE = "ground"
ENGINES = ("transformers", "groundingdino-py")


@dataclass(frozen=True)
class GroundConfig:
    """Detector thresholds and box filters."""

    model: ModelSpec = field(default_factory=lambda: default_spec("detector"))
    engine: str = "transformers"  # "transformers" (GroundingDinoForObjectDetection) or "groundingdino-py"
    #                               (the original code, transformers<5 only: see ground_gdino)
    box_threshold: UnitFloat = 0.25  # a box's best tag score must exceed this (the paper's; Florence-2: none)
    text_threshold: UnitFloat = 0.2  # a tag counts only when one of its tokens exceeds this (the paper's;
    #                                  GroundingDINO-like models only: OWLv2 and Florence-2 score no tokens)
    nms_iou: UnitFloat = 0.5  # class-agnostic NMS IoU (the paper's value)
    min_box_side: NonNegativeFloat = 8.0  # px of the stored image; narrower or shorter boxes are dropped
    max_box_area: UnitFloat = 0.95  # fraction of the image; larger boxes (the whole frame) are dropped
    dedupe_containment: UnitFloat | None = 0.9  # drop a box this much inside a better box of the same phrase
    max_objects: PositiveInt = 30  # best-scoring boxes kept per image
    image_size: PositiveInt | None = None  # detector input shortest edge in px (OWLv2: the square's side;
    #                                        Florence-2: ignored); None: the processor's (800)
    forward_batch_size: PositiveInt = 8  # (image, prompt) pairs per detector forward
    batch_size: PositiveInt = 8  # rows per Ray batch (a hint for the pipeline)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"GroundConfig.engine {self.engine!r} is not one of {ENGINES}")


class GroundStage:
    """Adds ``objects`` (box, phrase, detector_score; other fields None) to each ok row."""

    def __init__(self, config: GroundConfig) -> None:
        self.config = config
        # SAM 3's ground-and-segment engine, OWLv2's or Florence-2's detector (other_detector), which batch
        # their own way; None: GroundingDINO-like, run here with packed prompts
        self.other: Any = None
        if config.engine == "groundingdino-py":
            from .ground_gdino import load_gdino  # needs transformers<5: imported only when chosen

            self.model = load_gdino(config.model)
            self.tokenizer, max_text_len = self.model.tokenizer, self.model.max_text_len
        else:
            self.model, self.processor = load_model(config.model)
            self.other = other_detector(self.model, self.processor, config)  # SAM 3, OWLv2, Florence-2
            if self.other is not None:
                return
            self.tokenizer, max_text_len = self.processor.tokenizer, self.model.config.max_text_len
        # Tokens available to the tags: the model's text length less [CLS] and [SEP].
        self.token_budget = int(max_text_len) - 2

    def __call__(self, batch: Batch) -> Batch:
        def ground(rows: list[int]) -> dict[str, list]:
            images = [as_image(batch["image"][i]) for i in rows]
            tags = [clean_tags(batch["tags"][i]) for i in rows]
            return {"objects": self.detect(images, tags)}

        return run_rows(batch, STAGE, ground, ("objects",))

    def detect(self, images: Sequence[np.ndarray], tags: Sequence[list[str]]) -> list[list[dict]]:
        """Objects for each image given its tags, batched over (image, prompt) pairs."""
        if self.other is not None:
            return self.other.detect(images, tags)
        pairs = [(r, chunk) for r, t in enumerate(tags) for chunk in self.pack_prompts(t)]
        found: list[list[tuple]] = [[] for _ in images]
        step = max(1, self.config.forward_batch_size)
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            detections = self._forward([images[r] for r, _ in chunk], [p for _, p in chunk])
            for (r, _), dets in zip(chunk, detections, strict=True):
                found[r].extend(dets)
        return [select_objects(images[r], dets, self.config) for r, dets in enumerate(found)]

    def pack_prompts(self, tags: list[str]) -> list[list[str]]:
        """Tags grouped greedily into prompts that fit the detector's text length."""
        if not tags:
            return []
        lengths = [len(ids) + 1 for ids in self.tokenizer(tags, add_special_tokens=False)["input_ids"]]
        prompts: list[list[str]] = []
        used = self.token_budget
        for tag, n in zip(tags, lengths, strict=True):
            if n > self.token_budget:
                log.warning("tag %r is longer than the detector's text length; skipped", tag)
            elif used + n > self.token_budget:
                prompts.append([tag])
                used = n
            else:
                prompts[-1].append(tag)
                used += n
        return prompts

    @torch.inference_mode()
    def _forward(self, images: list[np.ndarray], prompts: list[list[str]]) -> list[list[tuple]]:
        """(box xyxy px, score, phrase) above the thresholds for each (image, tags) pair."""
        cfg = self.config
        texts, spans = zip(*(prompt_text(p) for p in prompts), strict=True)
        text = self.tokenizer(
            list(texts), padding="longest", return_offsets_mapping=True, return_tensors="pt"
        )
        offsets = text.pop("offset_mapping")
        size = (cfg.image_size, cfg.image_size * 1333 // 800) if cfg.image_size else None
        if cfg.engine == "groundingdino-py":  # its forward tokenizes the texts itself, alike
            logits, boxes = self.model(images, texts, size)
        else:
            logits, boxes = self._predict(images, text, size)
        probs = logits.float().sigmoid().cpu()  # (pairs, queries, max_text_len)
        boxes = box_convert(boxes.float().cpu(), "cxcywh", "xyxy")  # relative to the image
        results = []
        for k, image in enumerate(images):
            member = token_membership(offsets[k], spans[k], probs.shape[-1])  # (tokens, tags)
            tag_scores = (probs[k][:, :, None] * member[None]).amax(dim=1)  # (queries, tags)
            score, best = tag_scores.max(dim=1)
            keep = (score > cfg.box_threshold) & (score > cfg.text_threshold)
            h, w = image.shape[:2]
            scaled = boxes[k] * torch.tensor([w, h, w, h], dtype=torch.float32)
            results.append(
                [
                    (scaled[q], float(score[q]), prompts[k][int(best[q])])
                    for q in keep.nonzero().flatten().tolist()
                ]
            )
        return results

    def _predict(
        self, images: list[np.ndarray], text: dict, size: tuple[int, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' detector: (logits, boxes cxcywh relative to each image) of each pair."""
        sizes = {"size": {"shortest_edge": size[0], "longest_edge": size[1]}} if size else {}
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt", **sizes)
        device, dtype = self.model.device, self.model.dtype
        inputs = {k: v.to(device) for k, v in {**text, **pixels}.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        out = self.model(**inputs)
        return out.logits, out.pred_boxes


GDINO_TYPES = ("grounding-dino", "mm-grounding-dino")  # model types GroundStage runs itself
# SAM 3 grounds and segments each phrase itself (its objects come masked); OWLv2 and Florence-2 detect.
OTHER_TYPES = {"sam3": ("ground_sam3", "Sam3Grounder"), "owlv2": ("ground_owl", "OwlDetector"),
               "florence2": ("ground_florence", "FlorenceDetector")}


def other_detector(model: Any, processor: Any, config: GroundConfig) -> Any:
    """The detector of a model that is not GroundingDINO-like (by ``config.model_type``), else None."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in GDINO_TYPES:
        return None
    if model_type not in OTHER_TYPES:
        known = [*GDINO_TYPES, *OTHER_TYPES]
        raise ValueError(f"ground model {config.model.name!r} is a {model_type!r} model; ground runs {known}")
    module, name = OTHER_TYPES[model_type]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)(model, processor, config)


def select_objects(image: np.ndarray, dets: Sequence[tuple], cfg: GroundConfig) -> list[dict]:
    """The objects kept of one image's ``(box xyxy px, score, phrase)`` detections: boxes clipped to the
    image, then ``select_boxes``. A detector without scores (Florence-2) gives None for every score and
    its detections in rank order: they are ranked so, and their objects keep no score."""
    if not dets:
        return []
    h, w = image.shape[:2]
    boxes = torch.stack([torch.as_tensor(d[0], dtype=torch.float32) for d in dets])
    boxes = clip_boxes_to_image(boxes, (h, w))
    unscored = dets[0][1] is None
    ranks = -torch.arange(len(dets), dtype=torch.float32)
    scores = ranks if unscored else torch.tensor([d[1] for d in dets], dtype=torch.float32)
    phrases = [d[2] for d in dets]
    keep = select_boxes(boxes, scores, phrases, w, h, cfg)
    return [new_object(boxes[i].tolist(), phrases[i], None if unscored else float(scores[i])) for i in keep]


def clean_tags(tags) -> list[str]:
    """Tags safe for a detector prompt: lowercase, no dots (the separator), unique, non-empty."""
    out: list[str] = []
    for t in [] if tags is None else tags:
        t = " ".join(str(t).replace(".", " ").lower().split())
        if t and t not in out:
            out.append(t)
    return out


def prompt_text(tags: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The detector prompt "a . b . c ." and each tag's character span in it."""
    spans, pos = [], 0
    for t in tags:
        spans.append((pos, pos + len(t)))
        pos += len(t) + 3  # " . "
    return " . ".join(tags) + " .", spans


def token_membership(offsets: torch.Tensor, spans: Sequence[tuple[int, int]], length: int) -> torch.Tensor:
    """(length, tags) float mask: 1 where a token's characters lie inside a tag's span."""
    member = torch.zeros(length, len(spans))
    n = min(len(offsets), length)
    start, end = offsets[:n, 0], offsets[:n, 1]
    for j, (s, e) in enumerate(spans):
        member[:n, j] = ((start >= s) & (end <= e) & (end > start)).float()
    return member


def select_boxes(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    phrases: Sequence[str],
    width: int,
    height: int,
    cfg: GroundConfig,
) -> list[int]:
    """Indices of the boxes kept, best score first: size bounds, class-agnostic NMS, same-phrase
    near-duplicates (a box mostly inside a better box of the same phrase, e.g. a dog's head boxed as
    "dog", which IoU-based NMS keeps), then the ``max_objects`` cap. Boxes are xyxy pixels."""
    if len(boxes) == 0:
        return []
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    min_side = max(cfg.min_box_side, 1e-6)
    ok = (bw >= min_side) & (bh >= min_side) & (box_area(boxes) <= cfg.max_box_area * width * height)
    candidates = ok.nonzero().flatten()
    order = candidates[nms(boxes[candidates].float(), scores[candidates].float(), cfg.nms_iou)].tolist()
    kept: list[int] = []
    for i in order:
        if cfg.dedupe_containment is not None and any(
            phrases[j] == phrases[i] and containment(boxes[i], boxes[j]) >= cfg.dedupe_containment
            for j in kept
        ):
            continue
        kept.append(i)
    return kept[: cfg.max_objects]


def containment(inner: torch.Tensor, outer: torch.Tensor) -> float:
    """The fraction of ``inner``'s area that lies inside ``outer`` (xyxy boxes)."""
    iw = (torch.minimum(inner[2], outer[2]) - torch.maximum(inner[0], outer[0])).clamp(min=0)
    ih = (torch.minimum(inner[3], outer[3]) - torch.maximum(inner[1], outer[1])).clamp(min=0)
    area = (inner[2] - inner[0]) * (inner[3] - inner[1])
    return float(iw * ih / area) if area > 0 else 0.0

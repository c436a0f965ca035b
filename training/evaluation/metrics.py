"""Layout-fidelity metrics (docs/METHOD.md §8): CropCLIP, CropPickScore, SAMIoU and FID.

Two protocols (``training.evaluate --protocol``):

- ``paper``: the paper's released evaluation code. CropCLIP is HF CLIP ViT-B/32
  (``openai/clip-vit-base-patch32``) ``logits_per_image`` = ``logit_scale * cosine`` (100 x cosine) of the
  crop of the box cast to int (floor, ``PIL.Image.crop``) and the text truncated at 77 tokens; a crop that
  fails preprocessing is skipped (NaN, not counted). CropPickScore is the same with PickScore's model and
  processor. SAMIoU prompts SAM with the int box; the mask's box is inclusive pixel indices
  ``[first_col, first_row, last_col, last_row]`` with no +1 in the IoU (a mask exactly filling a 10 px
  box scores 0.81).
- ``exact``: every object counts (a crop that cannot be scored scores 0 and carries an ``error``),
  crops rounded outward, mask boxes in pixel edges (a mask exactly filling its box scores 1); CropCLIP
  with open_clip's ViT-B-32 through the project's registry (``datagen.models``).

Both: a SAM score ``<= 0.5`` or an empty mask gives 0; each image is embedded once and all its boxes
decoded together; mean over the objects of an image, then over images (:func:`mean_per_image`).
The crop, CLIP and SAM code is shared with datagen (``datagen.scoring``). **FID** is torchmetrics'
``FrechetInceptionDistance`` (torch-fidelity's port of the TF Inception, comparable with published
FIDs), its weights read once from a local file (:func:`find_inception_weights`,
:func:`load_inception_state`: ``weights_only=True``) and handed to torch-fidelity from memory.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image

from datagen.models import DTYPES, ModelSpec, load_model
from datagen.scoring import (
    CLIP_MAX_TOKENS,
    SAM_SCORE_THRESHOLD,
    clip_crop_scores,
    crop_box,
    floor_box,
    sam_box_iou,
    sam_box_masks,
)
from training.evaluation.fid import (
    FidUnavailable,
    fid,
    find_inception_weights,
    load_inception_state,
    torch_device,
)

log = logging.getLogger(__name__)

__all__ = [
    "PROTOCOLS",
    "CropClipScorer",
    "FidUnavailable",
    "HfCropScorer",
    "ObjectScores",
    "SamIoUScorer",
    "fid",
    "find_inception_weights",
    "load_inception_state",
    "mean_per_image",
    "tiny_hf_clip",
]

Protocol = Literal["paper", "exact"]
PROTOCOLS = ("paper", "exact")
TINY = "tiny"  # an HF CLIP name that builds a tiny random CLIP offline (tests, the tiny preset)


@dataclass
class ObjectScores:
    """Scores of one image's objects, in layout order; ``errors[i]`` is None unless object ``i`` failed."""

    scores: np.ndarray  # (N,) float64; a failed object scores 0 (exact) or NaN when skipped (paper)
    errors: list[str | None]
    sam_scores: np.ndarray | None = None  # (N,) SAM's predicted IoU, SAMIoU only (NaN where not run)


def mean_per_image(table: pd.DataFrame, column: str, image_column: str = "image") -> float:
    """The paper's average: the mean over each image's objects, then the mean over images (NaN if none).

    NaN scores (objects the paper's protocol skips) are left out of both means.
    """
    if table.empty:
        return float("nan")
    return float(table.groupby(image_column, sort=False)[column].mean().mean())


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")


# ---------------------------------------------------------------------------------------------------
# CropCLIP (exact protocol: open_clip) and HF CLIP-style crop scores (paper CropCLIP, CropPickScore)


class CropClipScorer:
    """Exact-protocol CropCLIP: ``100 * cos(CLIP(crop), CLIP(description truncated to 77 tokens))``.

    ``spec``: an open_clip model in the project's registry (``datagen.models``), e.g.
    ``ModelSpec("clip", "ViT-B-32", weights="openai")``. Crops round outward; one with no pixel in the
    image scores 0 with its error.
    """

    def __init__(self, spec: ModelSpec, batch_size: int = 64) -> None:
        self.model, processor = load_model(spec)
        self.preprocess, self.tokenizer = processor.preprocess, processor.tokenizer
        self.batch_size = batch_size

    def __call__(
        self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray], labels: Sequence[Sequence[str]]
    ) -> list[ObjectScores]:
        """Score every object of every image; crops that fail score 0 with their error."""
        results = [ObjectScores(np.zeros(len(b)), [None] * len(b)) for b in boxes]
        crops, where, texts = [], [], []
        for i, (image, image_boxes, image_labels) in enumerate(zip(images, boxes, labels, strict=True)):
            for j, (box, label) in enumerate(zip(image_boxes, image_labels, strict=True)):
                try:
                    crops.append(crop_box(image, box))
                except ValueError as err:
                    results[i].errors[j] = f"crop_clip: {err}"
                    continue
                where.append((i, j))
                texts.append(str(label))
        scores = clip_crop_scores(self.model, self.preprocess, self.tokenizer, crops, texts, self.batch_size)
        for (i, j), value in zip(where, scores, strict=True):
            results[i].scores[j] = value
        return results


def tiny_hf_clip(seed: int = 0):
    """A tiny random transformers ``CLIPModel`` with a ``CLIPProcessor`` whose tokenizer is CLIP's real
    BPE (open_clip ships its vocabulary), built offline: the paper protocol's code path in tests."""
    import open_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    bpe = open_clip.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # HF's spelling
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=CLIP_MAX_TOKENS,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return model.eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _pooled(out) -> torch.Tensor:
    """The projected embedding of ``get_*_features`` (a tensor, or an output holding it in transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HfCropScorer:
    """``logit_scale * cos(crop, text)`` with a transformers ``CLIPModel``: CLIP's ``logits_per_image``.

    The paper's CropCLIP (``openai/clip-vit-base-patch32``, logit scale 100) and CropPickScore
    (``yuvalkirstain/PickScore_v1`` with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
    ``model`` / ``processor``: hub id or local folder (``processor`` defaults to ``model``), or "tiny".
    ``protocol="paper"``: int (floor) box, PIL crop, a crop that fails preprocessing is skipped (NaN);
    ``"exact"``: the outward crop, failures score 0. ``metric`` names the errors ("crop_clip", ...).
    """

    def __init__(self, model: str, processor: str | None = None, *, metric: str = "crop_clip",
                 protocol: Protocol = "paper", device: str = "auto", dtype: str = "float32",
                 batch_size: int = 64, revision: str | None = None) -> None:  # fmt: skip
        _check_protocol(protocol)
        log.info("loading %s's transformers CLIP %s (processor %s) on %s", metric, model, processor or model,
                 device)  # fmt: skip
        if model == TINY:
            # Each metric its own random weights, so a tiny run's CropCLIP and CropPickScore differ and a
            # mix-up between the two columns shows.
            self.model, self.processor = tiny_hf_clip(seed=zlib.crc32(metric.encode()))
        else:
            from transformers import AutoProcessor, CLIPModel

            self.model = CLIPModel.from_pretrained(model, revision=revision, dtype=DTYPES[dtype])
            self.processor = AutoProcessor.from_pretrained(processor or model)
        self.model = self.model.to(torch_device(device)).eval().requires_grad_(False)
        self.metric, self.protocol, self.batch_size = metric, protocol, max(1, batch_size)

    def _pixels(self, image: Image.Image, box: np.ndarray) -> torch.Tensor:
        """``(1, 3, S, S)`` pixel values of one object's crop; raises when the crop cannot be made."""
        if self.protocol == "paper":
            crop = image.crop(tuple(int(v) for v in floor_box(box)))  # PIL pads outside the image
            if crop.width < 1 or crop.height < 1:
                raise ValueError(f"empty crop of box {list(map(float, box))}")
        else:
            crop = crop_box(image, box)
        return self.processor(images=[crop], return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def scores(self, pixels: Sequence[torch.Tensor], texts: Sequence[str]) -> np.ndarray:
        """``logit_scale * cosine`` for each (pixel values, text) pair, float64; a text is encoded once."""
        param = next(self.model.parameters())
        unique = list(dict.fromkeys(texts))
        text_emb, image_emb = [], []
        for start in range(0, len(unique), self.batch_size):
            tokens = self.processor.tokenizer(
                unique[start : start + self.batch_size], padding=True, truncation=True,
                max_length=CLIP_MAX_TOKENS, return_tensors="pt",
            ).to(param.device)  # fmt: skip
            text_emb.append(_pooled(self.model.get_text_features(**tokens)).float())
        for start in range(0, len(pixels), self.batch_size):
            batch = torch.cat(list(pixels[start : start + self.batch_size])).to(param.device, param.dtype)
            image_emb.append(_pooled(self.model.get_image_features(pixel_values=batch)).float())
        text = torch.nn.functional.normalize(torch.cat(text_emb), dim=-1)
        image = torch.nn.functional.normalize(torch.cat(image_emb), dim=-1)
        index = {t: k for k, t in enumerate(unique)}
        cosine = (image * text[[index[t] for t in texts]]).sum(-1)
        return (self.model.logit_scale.exp().float() * cosine).cpu().double().numpy()

    def __call__(
        self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray], labels: Sequence[Sequence[str]]
    ) -> list[ObjectScores]:
        """Score every object of every image (see the class for what a failed crop gives)."""
        fail = np.nan if self.protocol == "paper" else 0.0
        word = f"{self.metric} skipped" if self.protocol == "paper" else self.metric
        results = [ObjectScores(np.full(len(b), fail), [None] * len(b)) for b in boxes]
        pixels, where, texts = [], [], []
        for i, (image, image_boxes, image_labels) in enumerate(zip(images, boxes, labels, strict=True)):
            for j, (box, label) in enumerate(zip(image_boxes, image_labels, strict=True)):
                try:
                    pixels.append(self._pixels(image, np.asarray(box, dtype=np.float64)))
                except Exception as err:  # noqa: BLE001 - the release skips any crop preprocessing rejects
                    results[i].errors[j] = f"{word}: {err}"
                    continue
                where.append((i, j))
                texts.append(str(label))
        if pixels:
            for (i, j), value in zip(where, self.scores(pixels, texts), strict=True):
                results[i].scores[j] = value
        return results


# ---------------------------------------------------------------------------------------------------
# SAMIoU


class SamIoUScorer:
    """SAMIoU with segment-anything's ``SamPredictor``: one ``set_image`` per image, all its boxes in one call.

    ``spec``: a segmenter in the project's registry, e.g. ``ModelSpec("segmenter", "vit_h", weights=...)``.
    ``protocol="paper"``: int (floor) box prompts, inclusive mask boxes; ``"exact"``: float boxes
    clipped to the image, pixel-edge mask boxes. A box with no area inside the image scores 0 with its error.
    """

    def __init__(
        self, spec: ModelSpec, score_threshold: float = SAM_SCORE_THRESHOLD, protocol: Protocol = "paper"
    ) -> None:
        from segment_anything import SamPredictor

        _check_protocol(protocol)
        sam, _ = load_model(spec)
        self.predictor = SamPredictor(sam)
        self.score_threshold = score_threshold
        self.protocol = protocol

    def __call__(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray]) -> list[ObjectScores]:
        """Score every object of every image."""
        return [
            self._score_image(image, np.asarray(b, dtype=np.float64).reshape(-1, 4))
            for image, b in zip(images, boxes, strict=True)
        ]

    def _score_image(self, image: Image.Image, boxes: np.ndarray) -> ObjectScores:
        n = len(boxes)
        result = ObjectScores(np.zeros(n), [None] * n, np.full(n, np.nan))
        w, h = image.size
        finite = np.isfinite(boxes).all(1)
        clipped = np.clip(np.where(finite[:, None], boxes, 0.0), 0, [w, h, w, h])
        valid = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        for j in np.nonzero(~valid)[0]:
            result.errors[j] = f"sam_iou: box {boxes[j].tolist()} has no area inside the {w}x{h} image"
        if not valid.any():
            return result
        paper = self.protocol == "paper"
        targets = np.stack([floor_box(b) for b in boxes[valid]]).astype(np.float64) if paper else boxes[valid]
        self.predictor.set_image(np.asarray(image.convert("RGB")))
        masks, sam_scores = sam_box_masks(self.predictor, targets if paper else clipped[valid])
        self.predictor.reset_image()
        for j, target, mask, score in zip(np.nonzero(valid)[0], targets, masks, sam_scores, strict=True):
            result.sam_scores[j] = score
            result.scores[j] = sam_box_iou(target, mask, score, self.score_threshold, inclusive=paper)
        return result

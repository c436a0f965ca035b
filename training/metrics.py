"""Layout-fidelity metrics (docs/METHOD.md §8): CropCLIP, SAMIoU and FID.

- **CropCLIP**: each object's box is cropped from the generated image and scored with CLIP ViT-B/32
  (OpenAI weights, open_clip's ``ViT-B-32``/``openai``) against its description truncated to 77 tokens:
  ``100 * cosine`` (CLIP's logit scale), not clamped. Crops and texts are encoded in batches.
- **SAMIoU**: segment-anything's SAM ViT-H is prompted with the layout box, ``multimask_output=False``.
  A SAM score ``<= 0.5`` or an empty mask gives 0, else the IoU of the layout box and the mask's tight
  box. Each image is embedded once and all its boxes are decoded in one batched call.
- Models load through the project's registry (``datagen.models.ModelSpec`` / ``load_model``): real
  weights, or the same architectures tiny and random (``backend="tiny"``) for tests.
- Averaging as the paper: mean over the objects of an image, then mean over images
  (:func:`mean_per_image`).
- Unlike the public release, every object is counted: an object that cannot be scored (empty crop,
  degenerate box, unreadable image) scores 0 and carries an ``error`` string that the report counts.
- **FID** of generated images against a reference folder, with torchvision's Inception v3 when its weights
  are on the local disk (:func:`find_inception_weights`); :class:`FidUnavailable` says what to do when not.

Scorers follow the batch-inference pattern: ``__init__`` loads the model, ``__call__`` scores a list of
images with their layouts and returns one :class:`ObjectScores` per image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision.ops import box_iou, masks_to_boxes

from datagen.models import ModelSpec, load_model

log = logging.getLogger(__name__)

__all__ = [
    "CLIP_MAX_TOKENS",
    "SAM_SCORE_THRESHOLD",
    "CropClipScorer",
    "FidUnavailable",
    "InceptionFeatures",
    "ObjectScores",
    "SamIoUScorer",
    "crop_box",
    "find_inception_weights",
    "frechet_distance",
    "mask_box",
    "mean_per_image",
    "sam_box_iou",
]

CLIP_MAX_TOKENS = 77
SAM_SCORE_THRESHOLD = 0.5  # the paper's: a SAM score at or below it means "no object found"
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision's IMAGENET1K_V1 weights file


@dataclass
class ObjectScores:
    """Scores of one image's objects, in layout order; ``errors[i]`` is None unless object ``i`` failed."""

    scores: np.ndarray  # (N,) float64; a failed object scores 0
    errors: list[str | None]
    sam_scores: np.ndarray | None = None  # (N,) SAM's predicted IoU, SAMIoU only (NaN where not run)


def _device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------------------------------------------
# Pure functions (hand-checked in tests)


def mask_box(mask: np.ndarray | torch.Tensor) -> np.ndarray | None:
    """Tight box ``[x1, y1, x2, y2]`` of a boolean ``(H, W)`` mask in pixel-edge coordinates, None if empty.

    torchvision's ``masks_to_boxes`` gives the centres of the extreme pixels; +1 on the far side turns
    them into edges, so a mask that exactly fills the box ``[x1, y1, x2, y2]`` returns that box.
    """
    mask = torch.as_tensor(np.asarray(mask, dtype=bool))
    if not mask.any():
        return None
    box = masks_to_boxes(mask[None])[0].double().numpy()
    box[2:] += 1.0
    return box


def sam_box_iou(
    box: Sequence[float], mask: np.ndarray, score: float, threshold: float = SAM_SCORE_THRESHOLD
) -> float:
    """SAMIoU of one object: 0 if ``score <= threshold`` or the mask is empty, else IoU(box, mask's tight box)."""
    if not score > threshold:  # also catches NaN
        return 0.0
    tight = mask_box(mask)
    if tight is None:
        return 0.0
    a = torch.as_tensor(np.asarray(box, dtype=np.float64)[None])
    return float(box_iou(a, torch.as_tensor(tight[None]))[0, 0])


def crop_box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The pixels of ``image`` the box overlaps (outward-rounded, clipped); ValueError if none."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"non-finite box {list(box)}")
    w, h = image.size
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(w, math.ceil(x2)), min(h, math.ceil(y2))
    if right <= left or bottom <= top:
        raise ValueError(f"empty crop: box {[x1, y1, x2, y2]} has no pixel inside the {w}x{h} image")
    return image.crop((left, top, right, bottom))


def mean_per_image(table: pd.DataFrame, column: str, image_column: str = "image") -> float:
    """The paper's average: the mean over each image's objects, then the mean over images (NaN if none)."""
    if table.empty:
        return float("nan")
    return float(table.groupby(image_column, sort=False)[column].mean().mean())


# ---------------------------------------------------------------------------------------------------
# CropCLIP


def _autocast(model: torch.nn.Module) -> torch.autocast:
    """Autocast to the model's dtype, so half-precision weights accept the float32 inputs of the transforms."""
    param = next(model.parameters())
    return torch.autocast(param.device.type, dtype=param.dtype, enabled=param.dtype != torch.float32)


class CropClipScorer:
    """CropCLIP: ``100 * cos(CLIP(crop), CLIP(description truncated to 77 tokens))`` per object.

    ``spec``: an open_clip model in the project's registry (``datagen.models``), e.g.
    ``ModelSpec("clip", "ViT-B-32", weights="openai")`` (the paper's ``openai/clip-vit-base-patch32``).
    """

    def __init__(self, spec: ModelSpec, batch_size: int = 64) -> None:
        self.model, processor = load_model(spec)
        self.preprocess, self.tokenizer = processor.preprocess, processor.tokenizer
        self.device = next(self.model.parameters()).device
        self.batch_size = batch_size

    @torch.inference_mode()
    def _embed(self, items: Sequence, encode, to_tensor) -> torch.Tensor:
        out = []
        for chunk in _batches(items, self.batch_size):
            with _autocast(self.model):
                out.append(encode(to_tensor(chunk).to(self.device)).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

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
        if not crops:
            return results
        unique = list(dict.fromkeys(texts))  # a description shared by several objects is encoded once
        # open_clip's tokenizer truncates to its context length (77) and keeps the end token.
        text_emb = self._embed(unique, self.model.encode_text, lambda chunk: self.tokenizer(list(chunk)))
        image_emb = self._embed(
            crops, self.model.encode_image, lambda chunk: torch.stack([self.preprocess(c) for c in chunk])
        )
        index = {t: k for k, t in enumerate(unique)}
        cosine = (image_emb * text_emb[[index[t] for t in texts]]).sum(-1).cpu().double().numpy()
        for (i, j), value in zip(where, cosine, strict=True):
            results[i].scores[j] = 100.0 * value
        return results


# ---------------------------------------------------------------------------------------------------
# SAMIoU


class SamIoUScorer:
    """SAMIoU with segment-anything's ``SamPredictor``: one ``set_image`` per image, all its boxes in one call.

    ``spec``: a segmenter in the project's registry, e.g. ``ModelSpec("segmenter", "vit_h", weights=...)``.
    """

    def __init__(self, spec: ModelSpec, score_threshold: float = SAM_SCORE_THRESHOLD) -> None:
        from segment_anything import SamPredictor

        sam, _ = load_model(spec)
        self.predictor = SamPredictor(sam)
        self.score_threshold = score_threshold

    @torch.inference_mode()
    def _masks(self, image: Image.Image, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, H, W)`` bool masks and ``(N,)`` SAM scores; the image is embedded once for all boxes."""
        predictor = self.predictor
        with _autocast(predictor.model):
            predictor.set_image(np.asarray(image.convert("RGB")))
            prompt = predictor.transform.apply_boxes_torch(
                torch.as_tensor(boxes, dtype=torch.float32, device=predictor.device), predictor.original_size
            )
            masks, scores, _ = predictor.predict_torch(None, None, boxes=prompt, multimask_output=False)
        predictor.reset_image()
        return masks[:, 0].cpu().numpy(), scores[:, 0].float().cpu().double().numpy()

    def __call__(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray]) -> list[ObjectScores]:
        """Score every object of every image; boxes with no area inside the image score 0 with their error."""
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
        masks, sam_scores = self._masks(image, clipped[valid])
        for j, mask, score in zip(np.nonzero(valid)[0], masks, sam_scores, strict=True):
            result.sam_scores[j] = score
            result.scores[j] = sam_box_iou(boxes[j], mask, score, self.score_threshold)
        return result


# ---------------------------------------------------------------------------------------------------
# FID


class FidUnavailable(RuntimeError):
    """FID cannot be computed here (no local Inception weights, or no reference images)."""


def find_inception_weights(path: str | None) -> Path:
    """The Inception v3 weights: ``path`` if given, else torchvision's file in the torch hub cache.

    Never downloads. Raises :class:`FidUnavailable` with instructions when the file is missing.
    """
    candidate = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if candidate.is_file():
        return candidate
    raise FidUnavailable(
        f"FID skipped: no Inception v3 weights at {candidate}. On a machine with internet, download "
        f"https://download.pytorch.org/models/{INCEPTION_FILE} and pass its path with "
        "--inception-weights (or fid.inception_weights in the preset)."
    )


class InceptionFeatures:
    """2048-d pool features of torchvision's Inception v3 (ImageNet weights) for FID.

    torchvision's network is not the TF-ported one of pytorch-fid / the FID papers, so absolute values
    are comparable between runs of this tool, not with published FIDs.
    """

    def __init__(self, weights: str | Path | None, device: str = "auto", batch_size: int = 32) -> None:
        from torchvision.models import inception_v3

        state = torch.load(
            find_inception_weights(str(weights) if weights else None), map_location="cpu", weights_only=True
        )
        # transform_input=True is what torchvision sets for these weights (trained on [-1, 1] inputs).
        net = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
        net.load_state_dict(state)
        net.fc = torch.nn.Identity()
        self.device = _device(device)
        self.net = net.to(self.device).eval()
        self.batch_size = batch_size
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``(N, 2048)`` float64 features."""
        feats = []
        for chunk in _batches(images, self.batch_size):
            x = torch.cat([self._to_tensor(im) for im in chunk])
            feats.append(self.net(((x - self.mean) / self.std).to(self.device)).double().cpu())
        return torch.cat(feats).numpy()

    @staticmethod
    def _to_tensor(image: Image.Image) -> torch.Tensor:
        """``(1, 3, 299, 299)`` in [0, 1]; each image is resized alone, so sizes may differ."""
        x = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)[None]
        return torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two ``(N, D)`` feature sets.

    ``tr(sqrtm(S_a S_b))`` is the sum of the square roots of the eigenvalues of ``S_a S_b`` (real and
    non-negative for covariance matrices), which avoids scipy's ``sqrtm``.
    """
    if len(features_a) < 2 or len(features_b) < 2:
        raise FidUnavailable("FID needs at least 2 images on each side")
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    eig = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(eig).sum())
    return max(value, 0.0)

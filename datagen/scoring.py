"""What datagen and evaluation both score with: the crop of a box, CLIP crop scores, SAM box prompts.

The datagen stages (segment, describe, score, filter) and the evaluation (``training.evaluation.metrics``) call
these, so a crop, a CLIP score or a SAM mask means the same on both sides. Pure box/mask geometry
(a mask's tight box, IoU of box pairs) lives in ``shards.masks``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from shards.masks import box_iou_pairs, mask_to_box

__all__ = [
    "CLIP_MAX_TOKENS",
    "SAM_SCORE_THRESHOLD",
    "clip_crop_scores",
    "crop_box",
    "floor_box",
    "pixel_box",
    "sam_box_iou",
    "sam_box_masks",
    "set_sam_embedding",
]

CLIP_MAX_TOKENS = 77  # CLIP's text context, start and end tokens included
SAM_SCORE_THRESHOLD = 0.5  # the paper's: a SAM score at or below it means "no object found"

ImageT = TypeVar("ImageT", np.ndarray, Image.Image)


def pixel_box(
    box: Sequence[float], width: int, height: int, *, at_least_one_pixel: bool = False
) -> tuple[int, int, int, int]:
    """The pixels ``[left, top, right, bottom)`` a float xyxy box overlaps: outward-rounded, clipped.

    ValueError for a non-finite box, or one with no pixel inside the image unless ``at_least_one_pixel``
    (then the nearest edge pixel: datagen always wants something to show the VLM / CLIP).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"non-finite box {list(box)}")
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(width, math.ceil(x2)), min(height, math.ceil(y2))
    if at_least_one_pixel:
        left, top = min(left, width - 1), min(top, height - 1)
        right, bottom = max(right, left + 1), max(bottom, top + 1)
    elif right <= left or bottom <= top:
        raise ValueError(f"empty crop: box {[x1, y1, x2, y2]} has no pixel inside the {width}x{height} image")
    return left, top, right, bottom


def crop_box(image: ImageT, box: Sequence[float], *, at_least_one_pixel: bool = False) -> ImageT:
    """The crop of an ``(H, W, C)`` array or a PIL image under :func:`pixel_box`, in the same type."""
    if isinstance(image, np.ndarray):
        h, w = image.shape[:2]
        left, top, right, bottom = pixel_box(box, w, h, at_least_one_pixel=at_least_one_pixel)
        return image[top:bottom, left:right]
    left, top, right, bottom = pixel_box(box, *image.size, at_least_one_pixel=at_least_one_pixel)
    return image.crop((left, top, right, bottom))


def floor_box(box: Sequence[float]) -> np.ndarray:
    """The paper's integer box: each coordinate floored (the release casts with ``int`` on >= 0 values)."""
    return np.floor(np.asarray(box, dtype=np.float64)).astype(np.int64)


@torch.inference_mode()
def clip_crop_scores(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    crops: Sequence[Image.Image],
    texts: Sequence[str],
    batch_size: int = 64,
) -> np.ndarray:
    """``100 * cosine`` of open_clip's crop and text embeddings for each (crop, text) pair, float64.

    The tokenizer truncates to CLIP's 77 tokens (keeping the end token). A text shared by several
    crops is encoded once.
    """
    if len(crops) != len(texts):
        raise ValueError(f"{len(crops)} crops but {len(texts)} texts")
    if not crops:
        return np.zeros(0)
    param = next(model.parameters())
    step = max(1, batch_size)

    def embed(items: Sequence, encode: Callable, to_input: Callable) -> torch.Tensor:
        out = [encode(to_input(items[i : i + step])).float() for i in range(0, len(items), step)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    unique = list(dict.fromkeys(texts))
    text = embed(unique, model.encode_text, lambda chunk: tokenizer(list(chunk)).to(param.device))
    image = embed(
        crops,
        model.encode_image,
        lambda chunk: torch.stack([preprocess(c) for c in chunk]).to(param.device, param.dtype),
    )
    index = {t: k for k, t in enumerate(unique)}
    cosine = (image * text[[index[t] for t in texts]]).sum(-1)
    return (100.0 * cosine).cpu().double().numpy()


def set_sam_embedding(predictor, embedding: torch.Tensor, size: tuple[int, int]) -> None:
    """Put a precomputed ``(1, C, h, w)`` image embedding of an ``(H, W)`` image into a ``SamPredictor``,
    as ``set_image`` would (datagen encodes the images of a batch together)."""
    h, w = size
    predictor.reset_image()
    predictor.features, predictor.original_size, predictor.is_image_set = embedding, (h, w), True
    transform = predictor.transform
    predictor.input_size = tuple(transform.get_preprocess_shape(h, w, transform.target_length))


@torch.inference_mode()
def sam_box_masks(
    predictor, boxes: np.ndarray, max_boxes_per_call: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """SAM's mask for each xyxy box prompt (``multimask_output=False``) on the predictor's current image.

    Returns ``(N, H, W)`` bool masks at the image's size and ``(N,)`` float64 SAM scores (predicted IoU).
    """
    h, w = predictor.original_size
    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), device=predictor.device)
    masks, scores = [np.zeros((0, h, w), bool)], [np.zeros(0)]
    step = max(1, max_boxes_per_call)
    for start in range(0, len(boxes_t), step):
        prompts = predictor.transform.apply_boxes_torch(boxes_t[start : start + step], (h, w))
        m, s, _ = predictor.predict_torch(None, None, boxes=prompts, multimask_output=False)
        masks.append(m[:, 0].cpu().numpy())
        scores.append(s[:, 0].float().cpu().double().numpy())
    return np.concatenate(masks), np.concatenate(scores)


def sam_box_iou(
    box: Sequence[float],
    mask: np.ndarray,
    score: float,
    threshold: float = SAM_SCORE_THRESHOLD,
    *,
    inclusive: bool = False,
) -> float:
    """SAMIoU of one object: 0 if ``score <= threshold`` or the mask is empty, else IoU(box, mask's box).

    ``inclusive=False``: the mask's box in pixel edges (a mask exactly filling a box gives 1).
    ``inclusive=True``: the paper's release, ``[first_col, first_row, last_col, last_row]`` pixel
    indices with no +1, so a mask exactly filling an ``n`` px square box gives ``((n - 1) / n) ** 2``.
    """
    if not score > threshold:  # also catches NaN
        return 0.0
    tight = mask_to_box(mask, inclusive=inclusive)
    if tight is None:
        return 0.0
    return float(box_iou_pairs([box], [tight])[0])

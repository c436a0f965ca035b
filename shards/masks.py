"""Masks as COCO run-length encoding (pycocotools), the form stored in shard JSON."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def encode_mask(mask: np.ndarray) -> dict:
    """Encode an (H, W) boolean mask as COCO RLE with a str ``counts`` (JSON-safe)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict) -> np.ndarray:
    """Decode COCO RLE (compressed str/bytes counts, or uncompressed list counts) to a bool (H, W) array."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    elif isinstance(counts, str):
        rle = {"size": [h, w], "counts": counts.encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight xyxy box (pixel edges, end exclusive) of a boolean mask, or None when it is empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        return None
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))

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


def _rle_runs(counts: str) -> list[int]:
    # COCO's compressed counts (rleFrString in maskApi.c): 5 bits per character offset by 48, a
    # continuation bit 0x20, a sign bit on the last character, runs past the second stored as deltas.
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x = k = 0
        more = True
        while more:
            if p >= len(counts):
                raise ValueError("counts end inside a run")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"counts hold {counts[p]!r} at character {p}, outside '0'..'o'")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def rle_problem(rle: object) -> str | None:
    """Why ``rle`` is not a sound COCO RLE, or None when pycocotools decodes it to exactly its size.

    pycocotools itself rejects runs that overflow the mask but silently returns uninitialized
    pixels for runs that fall short of ``h * w``, so the runs are summed here first.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        return "not a COCO RLE dict with 'size' and 'counts'"
    try:
        h, w = (int(v) for v in rle["size"])
    except (TypeError, ValueError):
        return f"size {rle['size']!r} is not [h, w]"
    counts = rle["counts"]
    try:
        if isinstance(counts, list):
            runs = [int(v) for v in counts]
        elif isinstance(counts, (str, bytes)):
            runs = _rle_runs(counts.decode("ascii") if isinstance(counts, bytes) else counts)
        else:
            return f"counts of type {type(counts).__name__}"
    except (ValueError, UnicodeDecodeError) as e:
        return f"counts do not parse: {e}"
    if any(r < 0 for r in runs):
        return "counts hold a negative run"
    if sum(runs) != h * w:
        return f"runs cover {sum(runs)} pixels, the size {h}x{w} has {h * w}"
    try:
        mask = decode_mask(rle)
    except (ValueError, TypeError) as e:
        return f"pycocotools cannot decode it: {e}"
    if mask.shape != (h, w):
        return f"decodes to shape {mask.shape}, size says {(h, w)}"
    return None


def mask_to_box(mask: np.ndarray, *, inclusive: bool = False) -> tuple[float, float, float, float] | None:
    """Tight xyxy box (pixel edges, end exclusive) of a boolean mask, or None when it is empty.

    ``inclusive=True``: the pixel indices of the first and last column/row instead (the paper's
    evaluation code), one pixel short of the edges on the far side.
    """
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        return None
    end = 0 if inclusive else 1
    return (float(xs[0]), float(ys[0]), float(xs[-1] + end), float(ys[-1] + end))


def box_iou_pairs(boxes_a, boxes_b) -> np.ndarray:
    """IoU of each pair ``(boxes_a[i], boxes_b[i])`` of xyxy boxes, float64; 0 where the union is empty."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)

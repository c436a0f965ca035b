"""The release's label format as shards: ``python -m shards from-release --labels DIR --images DIR OUT``.

The release (CC3M/LAION synthetic, RC-COCO) stores one ``label_<image>.json`` per image::

    {"caption": "...", "annos": [{"bbox": [x, y, w, h], "category_name": "dog", "caption": "<rich description>",
                                  "pred_score": 0.61, "mask": {"size": [h, w], "counts": "..."}}]}

Boxes and masks are in the size the image had when it was labelled (RC-COCO: 768 on the long side):
``label_size`` gives that long side; without it the masks' RLE size tells the scale, else boxes are pixels
of the image file. ``unpad``: LAION images were padded to a square; a square image's padding is cut off,
computed from its img2dataset ``<image>.json`` (original size) as the release does, else detected as uniform
border rows or columns (:func:`detect_padding`); boxes and masks shift with it. Every label ends as a
sample or a failed parquet row with its reason (no image, bad JSON, a field of the wrong form).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import safe_json
from .dataset import open_run
from .masks import decode_mask, encode_mask, mask_to_box
from .schema import ObjectRecord, SampleRecord
from .writer import DatasetWriter

log = logging.getLogger(__name__)

__all__ = ["detect_padding", "from_release"]

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def detect_padding(pixels: np.ndarray, tol: int = 8) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` uniform border of an (H, W, C) uint8 image, on one axis only.

    A border line is a full row (column) whose every pixel is within ``tol`` of the outermost line's median
    colour (JPEG noise), counted from each edge inward. Padding to a square adds lines on one axis, so only
    the axis with more such lines is reported; a uniform image has no padding.
    """
    arr = pixels.astype(np.int16)
    if arr.ndim == 2:
        arr = arr[..., None]

    def run(lines: np.ndarray) -> int:
        ref = np.median(lines[0], axis=0)
        uniform = np.abs(lines - ref).max(axis=(1, 2)) <= tol
        return len(uniform) if uniform.all() else int(np.argmin(uniform))

    top, bottom = run(arr), run(arr[::-1])
    cols = arr.transpose(1, 0, 2)
    left, right = run(cols), run(cols[::-1])
    if top >= arr.shape[0] or left >= arr.shape[1]:
        return (0, 0, 0, 0)
    return (0, top, 0, bottom) if top + bottom > left + right else (left, 0, right, 0)


def _meta_padding(image_path: Path, side: int) -> tuple[int, int, int, int] | None:
    """The padding of a square image from its img2dataset ``<image>.json`` (``original_width``/``_height``),
    computed as the release's ``remove_padded_border`` does; None without that file."""
    meta_path = image_path.with_suffix(".json")
    try:
        meta = safe_json.loads(meta_path.read_text(encoding="utf-8"))
        ow, oh = int(meta["original_width"]), int(meta["original_height"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if ow <= 0 or oh <= 0:
        return None
    pad = int(abs(oh - ow) / 2 * side / max(ow, oh))
    return (pad, 0, pad, 0) if oh > ow else (0, pad, 0, pad)


def _image_index(images: Path) -> dict[str, Path]:
    """Image stem -> path, under ``images`` (recursively: CC3M keeps images in numbered subfolders)."""
    index: dict[str, Path] = {}
    for path in sorted(images.rglob("*")):
        if path.suffix.lower() in _IMAGE_EXTS:
            index.setdefault(path.stem, path)
    return index


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _objects(
    label: dict, width: int, height: int, scale: float, pad: tuple[int, int, int, int]
) -> tuple[list[ObjectRecord], int]:
    """The objects of a label in pixels of the stored (unpadded) image; and how many fell outside it."""
    left, top, right, bottom = pad
    w, h = width - left - right, height - top - bottom
    annos = label.get("annos", [])
    if not isinstance(annos, list):
        raise ValueError("field 'annos' must be a list")
    objects, dropped = [], 0
    for i, a in enumerate(annos):
        where = f"annos[{i}]"
        if not isinstance(a, dict):
            raise ValueError(f"{where} must be an object")
        bbox = a.get("bbox")
        if not isinstance(bbox, list | tuple) or len(bbox) != 4:
            raise ValueError(f"{where}.bbox must be [x, y, w, h], got {bbox!r}")
        x, y, bw, bh = (_number(v, f"{where}.bbox") * scale for v in bbox)
        # A box more than 2% past the labelled image means the wrong scale, not rounding.
        if x < -0.02 * width or y < -0.02 * height or x + bw > 1.02 * width or y + bh > 1.02 * height:
            raise ValueError(
                f"{where}.bbox {bbox} (x {scale:.4g}) lies outside the {width}x{height} image: "
                "give the labelling size (--label-size, e.g. 768)"
            )
        box = np.clip([x - left, y - top, x + bw - left, y + bh - top], 0, [w, h, w, h])
        if box[2] <= box[0] or box[3] <= box[1]:
            dropped += 1  # in the padding, or no area
            continue
        mask = mask_box = None
        if a.get("mask") is not None:
            try:
                m = decode_mask(a["mask"])
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{where}.mask is not a COCO RLE: {err}") from None
            if m.shape != (height, width):
                m = np.asarray(Image.fromarray(m).resize((width, height), Image.NEAREST))
            m = m[top : height - bottom, left : width - right]
            mask, mask_box = encode_mask(m), mask_to_box(m)
        names = {k: a.get(k) for k in ("category_name", "caption")}
        for k, v in names.items():
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{where}.{k} must be a string, got {v!r}")
        score = a.get("pred_score")
        objects.append(
            ObjectRecord(
                box=tuple(float(v) for v in box),
                phrase=names["category_name"] or names["caption"] or "",
                description=names["caption"],
                detector_score=None if score is None else _number(score, f"{where}.pred_score"),
                mask=mask,
                mask_box=mask_box,
            )
        )
    return objects, dropped


def _scale(label: dict, width: int, height: int, label_size: int | None) -> float:
    if label_size is not None:
        return max(width, height) / label_size
    for a in label.get("annos") or []:
        size = a.get("mask", {}).get("size") if isinstance(a, dict) and isinstance(a.get("mask"), dict) else None
        if isinstance(size, list) and len(size) == 2 and min(size) > 0:
            return max(width, height) / max(size)
    return 1.0


def _convert(label_path: Path, image_path: Path, key: str, label_size: int | None, unpad: bool):
    """A label and its image as (record, image bytes, ext)."""
    try:
        label = safe_json.loads(label_path.read_text(encoding="utf-8"))  # a user's file: bounded nesting
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(label, dict):
        raise ValueError("the label must be a JSON object")
    caption = label.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"field 'caption' must be a string, got {caption!r}")
    data = image_path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        image = im.convert("RGB")
    width, height = image.size
    pad, pad_from = (0, 0, 0, 0), None
    if unpad and width == height:
        pad, pad_from = _meta_padding(image_path, width), "meta"
        if pad is None:
            pad, pad_from = detect_padding(np.asarray(image)), "detected"
    objects, dropped = _objects(label, width, height, _scale(label, width, height, label_size), pad)
    ext = "jpg" if image_path.suffix.lower() in (".jpg", ".jpeg") else image_path.suffix.lower().lstrip(".")
    if any(pad):
        left, top, right, bottom = pad
        image = image.crop((left, top, width - right, height - bottom))
        buf = io.BytesIO()
        image.save(buf, "JPEG" if ext == "jpg" else "PNG", quality=95)
        data, ext = buf.getvalue(), ext if ext == "jpg" else "png"
    record = SampleRecord(
        key=key,
        width=image.size[0],
        height=image.size[1],
        original_width=width,
        original_height=height,
        source=str(image_path),
        source_caption=caption,
        objects=tuple(objects),
        meta={"label": str(label_path), "padding": list(pad), "padding_from": pad_from, "dropped_objects": dropped},
    )
    return record, data, ext


def _key(name: str, label_path: Path, used: set[str]) -> str:
    key = _UNSAFE.sub("_", name)[:90] or "image"
    if key in used:  # two labels whose names differ only in unsafe characters, or in subfolders
        key = f"{key}_{hashlib.sha1(str(label_path).encode()).hexdigest()[:8]}"
    used.add(key)
    return key


def from_release(
    labels: str,
    images: str,
    out: str,
    *,
    label_size: int | None = None,
    unpad: bool = False,
    shard_size: int = 1000,
) -> dict:
    """Convert the release's ``label_<image>.json`` files and their images into a shard dataset; counts."""
    labels_dir, images_dir = Path(labels), Path(images)
    for name, folder in (("--labels", labels_dir), ("--images", images_dir)):
        if not folder.is_dir():
            raise ValueError(f"{name}: no folder {folder}")
    if label_size is not None and label_size < 1:
        raise ValueError(f"--label-size must be >= 1, got {label_size}")
    label_files = sorted(labels_dir.rglob("label_*.json"))
    if not label_files:
        raise ValueError(f"--labels: no label_<image>.json file under {labels_dir}")
    index = _image_index(images_dir)
    open_run(out, {"kind": "from-release", "label_size": label_size, "unpad": unpad, "shard_size": shard_size})
    used: set[str] = set()
    with DatasetWriter(out, shard_size) as writer:
        for label_path in tqdm(label_files, desc="from-release", unit="img", disable=len(label_files) < 100):
            name = label_path.stem[len("label_") :]
            key = _key(name, label_path, used)
            image_path = index.get(name)
            try:
                if image_path is None:
                    raise FileNotFoundError(f"no image {name}.jpg/.png/.webp under {images_dir}")
                writer.add(*_convert(label_path, image_path, key, label_size, unpad))
            except (OSError, ValueError) as err:
                # PIL's UnidentifiedImageError is an OSError; SchemaError is a ValueError.
                stage = "read" if isinstance(err, OSError) else "convert"
                writer.add_failure(key, str(image_path or label_path), stage, f"{label_path.name}: {err}")
                log.warning("from-release: %s: %s", label_path, err)
    return writer.counts

"""Layouts to generate from and to score against: input validation and the JSON-lines file format.

One layout per line (the paper's demo files use ``bboxes``; ``boxes`` is accepted too)::

    {"id": "beach", "caption": "a beach at sunset", "boxes": [[32, 40, 200, 300]], "labels": ["a red kite"],
     "height": 512, "width": 512, "seed": 3}

Only ``boxes``/``bboxes`` and ``labels`` are required. ``id`` names the image file (default: the line number,
``000000``); ``height``/``width`` are the pixel size the boxes refer to (default: the caller's); ``seed``
defaults to the caller's base seed plus the line number.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["LayoutRecord", "read_layouts", "validate_layout", "validate_size", "write_layouts"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KNOWN_KEYS = {"id", "caption", "prompt", "boxes", "bboxes", "labels", "height", "width", "seed"}


def validate_size(height: int, width: int) -> None:
    """Height and width must be positive multiples of 8 (the VAE's factor)."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int | np.integer) or value <= 0 or value % 8:
            raise ValueError(f"{name} must be a positive multiple of 8 (the VAE's downscale), got {value!r}")


def validate_layout(
    boxes: object, labels: Sequence[str], height: int, width: int, max_objects: int | None = None
) -> np.ndarray:
    """Check a layout against an image size; return the boxes as an ``(N, 4)`` float64 array.

    Raises ValueError naming the first problem: shape, box/label count, non-finite values, ``x2 <= x1`` or
    ``y2 <= y1``, a box outside ``[0, width] x [0, height]``, more than ``max_objects`` objects, a label
    that is not a string. Nothing is clipped or dropped silently.
    """
    validate_size(height, width)
    try:
        array = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"boxes must be an (N, 4) array of numbers: {err}") from None
    if array.size == 0:
        array = array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as [x1, y1, x2, y2] pixels, got shape {array.shape}")
    labels = list(labels)
    if len(labels) != len(array):
        raise ValueError(f"{len(array)} boxes but {len(labels)} labels: give one label per box")
    bad = [i for i, label in enumerate(labels) if not isinstance(label, str)]
    if bad:
        raise ValueError(f"labels {bad} are not strings")
    if max_objects is not None and len(array) > max_objects:
        raise ValueError(f"{len(array)} objects but the model takes at most {max_objects}")
    if not np.isfinite(array).all():
        raise ValueError(f"boxes {np.nonzero(~np.isfinite(array).all(1))[0].tolist()} contain NaN or inf")
    empty = np.nonzero((array[:, 2] <= array[:, 0]) | (array[:, 3] <= array[:, 1]))[0]
    if empty.size:
        i = int(empty[0])
        raise ValueError(f"box {i} {array[i].tolist()} has x2 <= x1 or y2 <= y1 (expected [x1, y1, x2, y2])")
    outside = np.nonzero((array[:, :2] < 0).any(1) | (array[:, 2] > width) | (array[:, 3] > height))[0]
    if outside.size:
        i = int(outside[0])
        raise ValueError(
            f"box {i} {array[i].tolist()} lies outside the {width}x{height} image (pixels, xyxy)"
        )
    return array


@dataclass(frozen=True)
class LayoutRecord:
    """One line of a layouts file."""

    id: str  # image file stem
    caption: str  # global prompt ("" if none)
    boxes: np.ndarray  # (N, 4) float64, xyxy pixels of a height x width image
    labels: tuple[str, ...]  # one description per box
    height: int
    width: int
    seed: int

    def to_json(self) -> dict:
        """The record as a JSON-ready dict (the format :func:`read_layouts` reads)."""
        return {
            "id": self.id,
            "caption": self.caption,
            "boxes": self.boxes.tolist(),
            "labels": list(self.labels),
            "height": self.height,
            "width": self.width,
            "seed": self.seed,
        }


def _record(obj: object, where: str, line_no: int, height: int, width: int, seed: int) -> LayoutRecord:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _KNOWN_KEYS)
    if unknown:
        log.warning("%s: ignoring unknown keys %s", where, unknown)
    if ("boxes" in obj) == ("bboxes" in obj):
        raise ValueError(f"{where}: give exactly one of 'boxes' or 'bboxes'")
    if "labels" not in obj:
        raise ValueError(f"{where}: missing 'labels'")
    record_id = str(obj.get("id", f"{line_no:06d}"))
    if not _ID.match(record_id):
        raise ValueError(
            f"{where}: 'id' {record_id!r} must be a file-name-safe string ([A-Za-z0-9._-], 128 max)"
        )
    caption = obj.get("caption", obj.get("prompt", "")) or ""
    if not isinstance(caption, str):
        raise ValueError(f"{where}: 'caption' must be a string")
    h, w = obj.get("height", height), obj.get("width", width)
    s = obj.get("seed", seed + line_no)
    if not isinstance(s, int) or isinstance(s, bool):
        raise ValueError(f"{where}: 'seed' must be an integer, got {s!r}")
    try:
        boxes = validate_layout(obj.get("boxes", obj.get("bboxes")), obj["labels"], h, w)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None
    return LayoutRecord(record_id, caption, boxes, tuple(obj["labels"]), int(h), int(w), s)


def read_layouts(path: str | Path, height: int = 512, width: int = 512, seed: int = 0) -> list[LayoutRecord]:
    """Read and validate a JSON-lines layouts file (blank lines skipped); errors name the file and line.

    ``height``/``width``/``seed`` are the defaults for records that do not set them.
    """
    path = Path(path)
    records: list[LayoutRecord] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            where = f"{path}:{line_no + 1}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON: {err}") from None
            records.append(_record(obj, where, line_no, height, width, seed))
    ids = [r.id for r in records]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate ids {duplicates[:5]} (each id names one image file)")
    return records


def write_layouts(records: Sequence[LayoutRecord], path: str | Path) -> Path:
    """Write records as JSON lines (what was generated, with every default resolved)."""
    path = Path(path)
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records), encoding="utf-8")
    return path

"""Layouts to generate from and to score against: the file formats, validation and the release's leniency.

A layouts file is one of (detected from its content):

- JSON lines, one layout per line (what ``python -m training.generate`` writes)::

    {"id": "beach", "caption": "a beach at sunset", "boxes": [[32, 40, 200, 300]], "labels": ["a red kite"],
     "height": 512, "width": 512, "seed": 3}

- one (pretty-printed) JSON object, as the release's ``demos/100002558.json``: ``{"bboxes": [...], "labels": [...]}``;
- a JSON array of such objects.

A ``.jsonl`` file is always read as JSON lines; any other name is read as one JSON value first.

Only ``boxes``/``bboxes`` and ``labels`` are required. ``id`` names the image file (default: the record's index,
``000000``; the file's stem for a single-object file); ``height``/``width`` are the pixel size the boxes refer to
(default: the caller's, 512x512 as the release's demo); ``seed`` defaults to the caller's base seed plus the
index. Every record is checked before any model loads; errors name the file and the line (``FILE:3``) or the
index (``FILE[3]``).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from shards import safe_json

log = logging.getLogger(__name__)

__all__ = [
    "MAX_SIDE",
    "LayoutRecord",
    "SkippedLayout",
    "check_unique",
    "layout_record",
    "MAX_SEED",
    "lenient_layout",
    "load_layouts",
    "read_layouts",
    "validate_layout",
    "validate_size",
    "write_layouts",
]

# Far above what SDXL generates (1024 px trained); a larger size is a units mistake (e.g. 800000x800000).
MAX_SIDE = 4096
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; a seed plus its index must stay below
# 100,000 layouts of 30 objects are about 150 MB of JSON; a larger file is a mistake (an image, a dataset).
MAX_FILE_BYTES = 256 * 2**20

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KNOWN_KEYS = {"id", "caption", "prompt", "boxes", "bboxes", "labels", "height", "width", "seed"}


def validate_size(height: int, width: int) -> None:
    """Height and width must be positive multiples of 8 (the VAE's factor), at most ``MAX_SIDE``."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0 or value % 8:
            raise ValueError(f"{name} must be a positive multiple of 8 (the VAE's downscale), got {value!r}")
        if value > MAX_SIDE:
            raise ValueError(f"{name} {value} is larger than {MAX_SIDE} pixels (boxes and sizes are pixels)")


def _box_array(boxes: object) -> np.ndarray:
    try:
        array = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"boxes must be an (N, 4) array of numbers: {err}") from None
    if array.size == 0:
        array = array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as [x1, y1, x2, y2] pixels, got shape {array.shape}")
    return array


def _json_numbers(value: object, what: str) -> None:
    """Refuse JSON strings, booleans and nulls where numbers belong (numpy would read "4" and true as 4.0 and 1.0)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(reversed(v))  # in order: the error names the first bad value
        elif isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{what} must hold numbers only, got {v!r}")


def _check_labels(labels: Sequence[str], n: int) -> list[str]:
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"{n} boxes but {len(labels)} labels: give one label per box")
    bad = [i for i, label in enumerate(labels) if not isinstance(label, str)]
    if bad:
        raise ValueError(f"labels {bad} are not strings")
    return labels


def validate_layout(
    boxes: object,
    labels: Sequence[str],
    height: int,
    width: int,
    max_objects: int | None = None,
    *,
    zero_area: bool = False,
) -> np.ndarray:
    """Check a layout against an image size; return the boxes as an ``(N, 4)`` float64 array.

    Raises ValueError naming the first problem: shape, box/label count, non-finite values, ``x2 <= x1`` or
    ``y2 <= y1``, a box outside ``[0, width] x [0, height]``, more than ``max_objects`` objects, a label
    that is not a string. Nothing is clipped or dropped silently (:func:`lenient_layout` does, with warnings).
    ``zero_area``: accept ``x2 == x1`` / ``y2 == y1`` (the paper's evaluation scores such a box; it cannot
    be generated).
    """
    validate_size(height, width)
    array = _box_array(boxes)
    _check_labels(labels, len(array))
    if max_objects is not None and len(array) > max_objects:
        raise ValueError(f"{len(array)} objects but the model takes at most {max_objects}")
    if not np.isfinite(array).all():
        raise ValueError(f"boxes {np.nonzero(~np.isfinite(array).all(1))[0].tolist()} contain NaN or inf")
    if zero_area:
        empty = np.nonzero((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1]))[0]
    else:
        empty = np.nonzero((array[:, 2] <= array[:, 0]) | (array[:, 3] <= array[:, 1]))[0]
    if empty.size:
        i = int(empty[0])
        rule = "x2 < x1 or y2 < y1" if zero_area else "x2 <= x1 or y2 <= y1"
        raise ValueError(f"box {i} {array[i].tolist()} has {rule} (expected [x1, y1, x2, y2])")
    outside = np.nonzero((array[:, :2] < 0).any(1) | (array[:, 2] > width) | (array[:, 3] > height))[0]
    if outside.size:
        i = int(outside[0])
        raise ValueError(
            f"box {i} {array[i].tolist()} lies outside the {width}x{height} image (pixels, xyxy)"
        )
    return array


def lenient_layout(
    boxes: object, labels: Sequence[str], height: int, width: int, max_objects: int, where: str = "layout"
) -> tuple[np.ndarray, list[str]]:
    """The release's inference leniency, with a warning for each change: keep the first ``max_objects``
    objects, clamp boxes to the image, drop boxes left without area. Shape, label and NaN errors still raise.
    """
    validate_size(height, width)
    array = _box_array(boxes)
    labels = _check_labels(labels, len(array))
    if not np.isfinite(array).all():
        raise ValueError(f"boxes {np.nonzero(~np.isfinite(array).all(1))[0].tolist()} contain NaN or inf")
    if len(array) > max_objects:
        log.warning("%s: %d objects, kept the first %d (the model's limit)", where, len(array), max_objects)
        array, labels = array[:max_objects], labels[:max_objects]
    clamped = np.clip(array, 0, [width, height, width, height])
    moved = np.nonzero((clamped != array).any(1))[0]
    if moved.size:
        log.warning("%s: boxes %s clamped to the %dx%d image", where, moved.tolist(), width, height)
    keep = (clamped[:, 2] > clamped[:, 0]) & (clamped[:, 3] > clamped[:, 1])
    if not keep.all():
        log.warning("%s: boxes %s have no area inside the image: dropped", where, np.nonzero(~keep)[0].tolist())
    return clamped[keep], [label for label, k in zip(labels, keep, strict=True) if k]


@dataclass(frozen=True)
class LayoutRecord:
    """One layout of a layouts file."""

    id: str  # image file stem
    caption: str  # global prompt ("" if none)
    boxes: np.ndarray  # (N, 4) float64, xyxy pixels of a height x width image
    labels: tuple[str, ...]  # one description per box
    height: int
    width: int
    seed: int
    dropped_objects: int = 0  # objects of the source left out (the model's limit, a crop), each logged

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


@dataclass(frozen=True)
class SkippedLayout:
    """A layout left out of a run (``skip_bad``): where it is and why."""

    where: str  # FILE:LINE or FILE[INDEX]
    index: int  # 0-based record index in the file
    error: str


def _record(
    obj: object,
    where: str,
    index: int,
    height: int,
    width: int,
    seed: int,
    max_objects: int | None,
    lenient: bool,
    default_id: str,
    zero_area: bool = False,
) -> list[LayoutRecord]:
    """The records of one layout object (one, or one per prompt for a lenient list of prompts)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _KNOWN_KEYS)
    if unknown:
        log.warning("%s: ignoring unknown keys %s", where, unknown)
    if ("boxes" in obj) == ("bboxes" in obj):
        raise ValueError(f"{where}: give exactly one of 'boxes' or 'bboxes'")
    if "labels" not in obj:
        raise ValueError(f"{where}: missing 'labels'")
    record_id = str(obj.get("id", default_id))
    if not _ID.match(record_id):
        raise ValueError(
            f"{where}: 'id' {record_id!r} must be a file-name-safe string ([A-Za-z0-9._-], 128 max)"
        )
    caption = obj.get("caption", obj.get("prompt", "")) or ""
    captions = [caption]
    if lenient and isinstance(caption, list):
        # The release's pipeline takes a list of prompts: one image per prompt, same layout and seed.
        captions = caption
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{where}: 'caption' must be a string or a non-empty list of strings")
    elif not isinstance(caption, str):
        raise ValueError(f"{where}: 'caption' must be a string (a list of prompts needs --lenient)")
    h, w = obj.get("height", height), obj.get("width", width)
    s = obj.get("seed", seed + index)
    if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_SEED:
        raise ValueError(f"{where}: 'seed' must be an integer in [0, 2**63), got {s!r}")
    boxes, labels = obj.get("boxes", obj.get("bboxes")), obj["labels"]
    if not isinstance(labels, list):
        raise ValueError(f"{where}: 'labels' must be a list of strings, got {type(labels).__name__}")
    try:
        _json_numbers(boxes, "boxes")
        if lenient:
            limit = max_objects if max_objects is not None else len(labels)
            boxes, labels = lenient_layout(boxes, labels, h, w, limit, where)
        else:
            boxes = validate_layout(boxes, labels, h, w, max_objects, zero_area=zero_area)
    except (ValueError, TypeError) as err:
        hint = ""
        if "lies outside" in str(err) and "height" not in obj and "width" not in obj:
            # The release's demos carry no size: say which size was assumed and how to change it.
            hint = f" (the layout gives no size, so this run's default {w}x{h} applies: set height/width in it or --set height=512 --set width=512)"
        raise ValueError(f"{where}: {err}{hint}") from None
    dropped = len(obj["labels"]) - len(labels)  # lenient: beyond max_objects, or no area in the image
    record = LayoutRecord(record_id, captions[0], boxes, tuple(labels), int(h), int(w), s, dropped)
    if len(captions) == 1:
        return [record]
    return [replace(record, id=f"{record_id}_p{j}", caption=c) for j, c in enumerate(captions)]


def _read_text(path: Path) -> str:
    """The file's text; a file that cannot be read or is not UTF-8 text is a ValueError naming it."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a layouts file")
    if path.exists() and not path.is_file():  # a FIFO or device: reading would block or never end
        raise ValueError(f"{path}: not a regular file (a pipe or device), not a layouts file")
    if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, more than a layouts file holds ({MAX_FILE_BYTES})")
    try:
        # utf-8-sig: a byte-order mark (some Windows editors write one) is not part of the JSON.
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such layouts file") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read the layouts file: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}): a layouts file is JSON") from None


def layout_record(obj: dict, where: str, index: int, seed: int, *, max_objects: int | None = None,
                  lenient: bool = False) -> list[LayoutRecord]:
    """The records of one layout mapping built in code (``training.layout.dataset``), checked as a file's line."""
    return _record(obj, where, index, obj["height"], obj["width"], seed, max_objects, lenient, obj["id"])


def _parse(path: Path) -> list[tuple[str, int, object]]:
    """``(where, index, parsed object or JSONDecodeError)`` per record, whatever the file's format.

    Parsed with ``shards.safe_json``: a file nested 100,000 deep or holding a 5,000-digit integer is bad
    JSON naming its line, not a RecursionError.
    """
    text = _read_text(path)
    if not text.strip():
        raise ValueError(f"{path}: no layouts (the file is empty)")
    if path.suffix.lower() != ".jsonl":
        try:  # one (pretty-printed) object as the release's demo files, or an array of them
            whole = safe_json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines, or broken: the line-by-line reading names the line
        if isinstance(whole, dict):
            return [(str(path), 0, whole)]
        if isinstance(whole, list):
            if not whole:
                raise ValueError(f"{path}: no layouts (the array is empty)")
            return [(f"{path}[{i}]", i, obj) for i, obj in enumerate(whole)]
    entries: list[tuple[str, int, object]] = []
    for line_no, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                entries.append((f"{path}:{line_no + 1}", line_no, safe_json.loads(line)))
            except json.JSONDecodeError as err:
                entries.append((f"{path}:{line_no + 1}", line_no, err))
    return entries


def check_unique(records: list[LayoutRecord], where: str) -> None:
    """Each id names one image file: duplicates are a ValueError naming a few."""
    duplicates = sorted(i for i, n in Counter(r.id for r in records).items() if n > 1)
    if duplicates:
        raise ValueError(f"{where}: duplicate ids {duplicates[:5]} (each id names one image file)")


def load_layouts(
    path: str | Path,
    height: int = 512,
    width: int = 512,
    seed: int = 0,
    *,
    max_objects: int | None = None,
    lenient: bool = False,
    skip_bad: bool = False,
    zero_area: bool = False,
) -> tuple[list[LayoutRecord], list[SkippedLayout]]:
    """Read and validate every layout of a file; return the records and the layouts skipped.

    ``max_objects``: the model's limit (more is an error, or with ``lenient`` the first ones are kept).
    ``lenient``: the release's inference leniency (:func:`lenient_layout`, a list of prompts).
    ``skip_bad``: a bad layout is logged and returned as skipped instead of stopping the run; a file
    with no good layout is still an error. ``zero_area``: accept boxes without area (scoring only).
    """
    path = Path(path)
    entries = _parse(path)
    single = len(entries) == 1 and entries[0][0] == str(path)
    records: list[LayoutRecord] = []
    skipped: list[SkippedLayout] = []
    for n, (where, index, obj) in enumerate(entries):
        default_id = path.stem if single and _ID.match(path.stem) else f"{index:06d}"
        try:
            if isinstance(obj, json.JSONDecodeError):
                raise ValueError(f"{where}: not JSON: {obj}")
            records.extend(
                _record(obj, where, index, height, width, seed, max_objects, lenient, default_id, zero_area)
            )
        except ValueError as err:
            if not skip_bad:
                raise
            log.warning("skipping layout %s", err)
            skipped.append(SkippedLayout(where, n, str(err)))
    if not records:
        raise ValueError(f"{path}: no valid layout ({len(skipped)} skipped)")
    check_unique(records, str(path))
    return records, skipped


def read_layouts(
    path: str | Path, height: int = 512, width: int = 512, seed: int = 0, *, zero_area: bool = False
) -> list[LayoutRecord]:
    """Read and validate a layouts file (any format above); the first bad layout raises, naming file and line.

    ``height``/``width``/``seed`` are the defaults for records that do not set them; ``zero_area`` as
    :func:`load_layouts`.
    """
    return load_layouts(path, height, width, seed, zero_area=zero_area)[0]


def write_layouts(records: Sequence[LayoutRecord], path: str | Path) -> Path:
    """Write records as JSON lines (what was generated, with every default resolved)."""
    path = Path(path)
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records), encoding="utf-8")
    return path

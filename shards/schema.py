"""The versioned sample record stored as ``{key}.json`` beside each image in a shard.

In memory an unknown value is ``None``. On disk (``schema_version`` 2) every field of every sample is
present with one JSON type, whatever the sample or the dataset kind, because readers that infer a
schema from the first samples (Hugging Face ``datasets``: the first 5 of the first tar) cannot widen a
``null`` column later: unknown strings are ``""``, unknown numbers are ``NaN`` (all numbers but the
sizes are floats), a missing mask is ``{"size": [0, 0], "counts": ""}``, a missing mask box is four
``NaN`` and ``meta`` is one JSON string (its keys differ per dataset kind); so an empty caption or
description reads back as ``None``. Python's ``json`` (webdataset, Ray, ``datasets``) reads ``NaN``;
strict RFC 8259 parsers do not. Version 1 (``null`` for unknowns, ``meta`` an object) still reads.
Validation names the key and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from . import safe_json

SCHEMA_VERSION = 2

# The parquet ``status`` of an input: kept as a sample, failed at ``error_stage``, or processed fine
# but dropped by a quality filter. Defined once here; every package compares against these names.
STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_FILTERED = "filtered"
STATUSES = (STATUS_OK, STATUS_FAILED, STATUS_FILTERED)

# The model stages of datagen between decode and write, in the order they run; with "decode",
# "write" (datagen) and "read"/"convert" (from-coco) they are the values of the parquet ``error_stage``.
STAGE_ORDER = ("tag", "caption", "ground", "segment", "describe", "score", "filter")

# Keys of ``SampleRecord.meta`` with a fixed meaning; each always holds the same type when present.
META_CAPTIONS = "captions"  # list[str]: every caption of the source (COCO has five); the trainer draws one
META_COCO_IMAGE_ID = "coco_id"  # int: the COCO image id (from-coco)
META_COCO_CATEGORY_IDS = "coco_category_ids"  # list[int]: the COCO category id of each object, in order
META_COCO_SUPERCATEGORIES = "coco_supercategories"  # list[str]: each object's supercategory ("" if none)
META_COCO_ANNOTATION_IDS = "coco_annotation_ids"  # list[int]: the COCO annotation id of each object, in order
META_COCO_FILE_NAME = "coco_file_name"  # str: the image's COCO file_name (to-coco writes it back)
# list[dict]: COCO crowd regions, which are not objects to describe: {"category_id": int, "name": str,
# "supercategory": str, "bbox": [x, y, w, h] (floats, pixels), "segmentation": RLE dict or null,
# "id": int (its COCO annotation id; absent in datasets converted before it was kept)}
META_COCO_CROWD = "coco_crowd"

# WebDataset splits a member name into key and extension at the first dot, and keys become file names
# in the tar: allow only a conservative set, no dots, no slashes.
KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{1,100}$")


def canonical_json(obj: Any, ensure_ascii: bool = True) -> bytes:
    """The canonical JSON bytes of ``obj``: sorted keys, no whitespace (same value, same bytes).

    ASCII-escaped by default, the form every fingerprint has hashed since the first release; the
    sample records use ``ensure_ascii=False`` (readable UTF-8 in the tars).
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=ensure_ascii).encode()


def json_sha256(obj: Any) -> str:
    """sha256 hex digest of ``canonical_json(obj)``: the project's one fingerprint of a JSON value."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


class SchemaError(ValueError):
    """A record does not satisfy the shard contract; the message names the key and the field."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key, else raise SchemaError."""
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise SchemaError(
            f"key {key!r}: field 'key' must match {KEY_RE.pattern} (letters, digits, '_' and '-', "
            "no dots or slashes, at most 100 characters)"
        )
    return key


def _finite(key: str, name: str, value: Any, optional: bool = True) -> float | None:
    if value is None:
        if optional:
            return None
        raise SchemaError(f"key {key!r}: field {name!r} is required")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SchemaError(f"key {key!r}: field {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise SchemaError(f"key {key!r}: field {name!r} must be finite, got {v!r}")
    return v


def _box(key: str, name: str, value: Any, width: int, height: int) -> tuple[float, float, float, float]:
    if value is None or len(value) != 4:
        raise SchemaError(f"key {key!r}: field {name!r} must be 4 numbers [x1, y1, x2, y2], got {value!r}")
    x1, y1, x2, y2 = (_finite(key, name, v, optional=False) for v in value)
    if x2 <= x1 or y2 <= y1:
        raise SchemaError(f"key {key!r}: field {name!r} needs x2 > x1 and y2 > y1, got {list(value)}")
    # A tolerance of one pixel's rounding: boxes come from float model outputs clipped to the image.
    eps = 1e-3
    if x1 < -eps or y1 < -eps or x2 > width + eps or y2 > height + eps:
        raise SchemaError(
            f"key {key!r}: field {name!r} {list(value)} lies outside the {width}x{height} image"
        )
    return (x1, y1, x2, y2)


@dataclass(frozen=True)
class ObjectRecord:
    """One grounded object of a sample; pixel coordinates refer to the stored image."""

    box: tuple[float, float, float, float]  # xyxy, float pixels of the stored image
    phrase: str  # the short phrase the detector was asked for
    description: str | None = None  # the rich description (VLM), None when not described
    detector_score: float | None = None
    mask: dict | None = None  # COCO RLE {"size": [h, w], "counts": str}, decodable by pycocotools
    mask_score: float | None = None  # SAM's predicted IoU
    mask_box: tuple[float, float, float, float] | None = None  # tight xyxy box of the mask
    clip_score: float | None = None  # 100 * cosine(CLIP(crop), CLIP(description))

    def validate(self, key: str, index: int, width: int, height: int) -> ObjectRecord:
        """Return a normalized copy, raising SchemaError naming ``objects[index].field``."""
        p = f"objects[{index}]"
        box = _box(key, f"{p}.box", self.box, width, height)
        if not isinstance(self.phrase, str):
            raise SchemaError(f"key {key!r}: field '{p}.phrase' must be a string, got {self.phrase!r}")
        if self.description is not None and not isinstance(self.description, str):
            raise SchemaError(f"key {key!r}: field '{p}.description' must be a string or null")
        mask = self.mask
        if mask is not None:
            size = mask.get("size") if isinstance(mask, dict) else None
            if size is None or not isinstance(mask.get("counts"), str):
                raise SchemaError(
                    f"key {key!r}: field '{p}.mask' must be a COCO RLE dict with 'size' and string 'counts'"
                )
            if list(size) != [height, width]:
                raise SchemaError(
                    f"key {key!r}: field '{p}.mask' has size {list(size)}, the image is [{height}, {width}] (h, w)"
                )
            mask = {"size": [int(size[0]), int(size[1])], "counts": mask["counts"]}
        mask_box = None if self.mask_box is None else _box(key, f"{p}.mask_box", self.mask_box, width, height)
        return ObjectRecord(
            box=box,
            phrase=self.phrase,
            description=self.description,
            detector_score=_finite(key, f"{p}.detector_score", self.detector_score),
            mask=mask,
            mask_score=_finite(key, f"{p}.mask_score", self.mask_score),
            mask_box=mask_box,
            clip_score=_finite(key, f"{p}.clip_score", self.clip_score),
        )


# The keys of an object dict in ``{key}.json``, in declaration order (pipelines carry objects as dicts).
OBJECT_FIELDS = tuple(f.name for f in fields(ObjectRecord))


@dataclass(frozen=True)
class SampleRecord:
    """The ``{key}.json`` member of a shard: image sizes, captions and objects."""

    key: str
    width: int  # of the stored image
    height: int
    original_width: int  # of the source image before any resize
    original_height: int
    source: str = ""  # where the input came from (path, URL, tar member)
    source_caption: str | None = None  # alt-text / given caption
    caption: str | None = None  # global caption written by the VLM
    objects: tuple[ObjectRecord, ...] = ()
    meta: dict = field(default_factory=dict)  # JSON-safe extras; the keys META_* above have fixed types
    schema_version: int = SCHEMA_VERSION

    def validate(self) -> SampleRecord:
        """Return a normalized copy or raise SchemaError naming the key and the field."""
        key = check_key(self.key)
        if self.schema_version > SCHEMA_VERSION:
            raise SchemaError(
                f"key {key!r}: schema_version {self.schema_version} is newer than this richlayout "
                f"understands ({SCHEMA_VERSION}); upgrade richlayout to read this dataset"
            )
        for name in ("width", "height", "original_width", "original_height"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SchemaError(f"key {key!r}: field {name!r} must be a positive integer, got {v!r}")
        for name in ("source_caption", "caption"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise SchemaError(f"key {key!r}: field {name!r} must be a string or null, got {v!r}")
        if not isinstance(self.meta, dict):
            raise SchemaError(f"key {key!r}: field 'meta' must be an object")
        objects = tuple(
            (o if isinstance(o, ObjectRecord) else ObjectRecord(**o)).validate(key, i, self.width, self.height)
            for i, o in enumerate(self.objects)
        )
        return SampleRecord(**{**{f.name: getattr(self, f.name) for f in fields(self)}, "objects": objects})

    def to_dict(self) -> dict:
        """The on-disk form (current ``schema_version``): every field present with its one JSON type."""
        return {
            "key": self.key,
            "width": self.width,
            "height": self.height,
            "original_width": self.original_width,
            "original_height": self.original_height,
            "source": self.source,
            "source_caption": self.source_caption or "",
            "caption": self.caption or "",
            "objects": [_object_to_disk(o) for o in self.objects],
            "meta": canonical_json(self.meta, ensure_ascii=False).decode(),
            "schema_version": SCHEMA_VERSION,
        }

    def to_json_bytes(self) -> bytes:
        """Deterministic JSON (sorted keys, no whitespace variance) so tars are byte-reproducible."""
        return canonical_json(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> SampleRecord:
        """Parse and validate a dict read from a shard (any version up to the current one); ``where``
        (e.g. the tar path) prefixes errors. The record comes back in memory form (``None`` = unknown)."""
        prefix = f"{where}: " if where else ""
        if not isinstance(d, dict):
            raise SchemaError(f"{prefix}sample JSON must be an object")
        key = d.get("key")
        version = d.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise SchemaError(f"{prefix}key {key!r}: field 'schema_version' missing or not an integer")
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"{prefix}key {key!r}: schema_version {version} is newer than this richlayout "
                f"understands ({SCHEMA_VERSION}); upgrade richlayout to read this dataset"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SchemaError(f"{prefix}key {key!r}: unknown fields {unknown}")
        try:
            values = _fields_from_disk(d, key, known) if version >= 2 else _fields_from_v1(d, key)
            return cls(**{**values, "schema_version": SCHEMA_VERSION}).validate()
        except SchemaError as e:
            raise SchemaError(f"{prefix}{e}") from None
        except TypeError as e:
            raise SchemaError(f"{prefix}key {key!r}: {e}") from None

    @classmethod
    def from_json_bytes(cls, data: bytes, where: str = "") -> SampleRecord:
        """Parse a ``{key}.json`` member."""
        try:
            d = safe_json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:  # nested too deep, a huge integer included
            raise SchemaError(f"{where}: not valid JSON: {e}") from None
        return cls.from_dict(d, where)


# What version 2 writes for an unknown mask (a real RLE's counts is never empty).
NO_MASK = {"size": [0, 0], "counts": ""}
_NAN = float("nan")


def _float_or_nan(v: float | None) -> float:
    return _NAN if v is None else float(v)


def _object_to_disk(o: ObjectRecord) -> dict:
    return {
        "box": [float(v) for v in o.box],
        "phrase": o.phrase,
        "description": o.description or "",
        "detector_score": _float_or_nan(o.detector_score),
        "mask": dict(NO_MASK) if o.mask is None else dict(o.mask),
        "mask_score": _float_or_nan(o.mask_score),
        "mask_box": [_NAN] * 4 if o.mask_box is None else [float(v) for v in o.mask_box],
        "clip_score": _float_or_nan(o.clip_score),
    }


def _typed(key: str, name: str, value: Any, kind: type, what: str) -> Any:
    # bool is an int to Python but a different column type to Arrow: refused like any other drift.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SchemaError(f"key {key!r}: field {name!r} must be {what} (schema_version 2), got {value!r}")
    return value


def _floats(key: str, name: str, value: Any) -> list[float]:
    if not isinstance(value, list) or len(value) != 4:
        raise SchemaError(f"key {key!r}: field {name!r} must be 4 floats (schema_version 2), got {value!r}")
    return [_typed(key, name, v, float, "4 floats") for v in value]


def _object_from_disk(key: str, i: int, o: Any) -> ObjectRecord:
    p = f"objects[{i}]"
    if not isinstance(o, dict) or set(o) != set(OBJECT_FIELDS):
        got = sorted(o) if isinstance(o, dict) else type(o).__name__
        raise SchemaError(f"key {key!r}: field {p!r} must hold exactly {sorted(OBJECT_FIELDS)}, got {got}")
    mask = o["mask"]
    if not isinstance(mask, dict) or set(mask) != {"size", "counts"}:
        raise SchemaError(f"key {key!r}: field '{p}.mask' must be {{'size', 'counts'}}, got {mask!r}")
    size = mask["size"]
    if not isinstance(size, list) or len(size) != 2:
        raise SchemaError(f"key {key!r}: field '{p}.mask.size' must be [h, w], got {size!r}")
    for v in size:
        _typed(key, f"{p}.mask.size", v, int, "2 integers")
    _typed(key, f"{p}.mask.counts", mask["counts"], str, "a string")
    mask_box = _floats(key, f"{p}.mask_box", o["mask_box"])
    scores = {
        name: _typed(key, f"{p}.{name}", o[name], float, "a float (NaN when unknown)")
        for name in ("detector_score", "mask_score", "clip_score")
    }
    return ObjectRecord(
        box=tuple(_floats(key, f"{p}.box", o["box"])),
        phrase=_typed(key, f"{p}.phrase", o["phrase"], str, "a string"),
        description=_typed(key, f"{p}.description", o["description"], str, "a string ('' when unknown)") or None,
        mask=None if mask["counts"] == "" else mask,
        mask_box=None if all(math.isnan(v) for v in mask_box) else tuple(mask_box),
        **{name: None if math.isnan(v) else v for name, v in scores.items()},
    )


def _fields_from_disk(d: dict, key: Any, known: set[str]) -> dict:
    """Version 2: every field present with its type; unknowns back to None, meta parsed."""
    missing = sorted(known - set(d))
    if missing:
        raise SchemaError(f"key {key!r}: fields {missing} are missing (schema_version 2 writes every field)")
    strings = {name: _typed(key, name, d[name], str, "a string") for name in ("source", "source_caption", "caption")}
    try:
        meta = safe_json.loads(_typed(key, "meta", d["meta"], str, "a JSON string"))
    except json.JSONDecodeError as e:
        raise SchemaError(f"key {key!r}: field 'meta' is not valid JSON: {e}") from None
    objects = _typed(key, "objects", d["objects"], list, "a list")
    return {
        **{name: d[name] for name in ("key", "width", "height", "original_width", "original_height")},
        "source": strings["source"],
        "source_caption": strings["source_caption"] or None,
        "caption": strings["caption"] or None,
        "objects": tuple(_object_from_disk(key, i, o) for i, o in enumerate(objects)),
        "meta": meta,
    }


def _fields_from_v1(d: dict, key: Any) -> dict:
    """Version 1: optional fields may be null, meta is an object."""
    objects = []
    for i, o in enumerate(d.get("objects") or []):
        bad = sorted(set(o) - set(OBJECT_FIELDS)) if isinstance(o, dict) else ["<not an object>"]
        if bad:
            raise SchemaError(f"key {key!r}: objects[{i}] has unknown fields {bad}")
        objects.append(ObjectRecord(**o))
    return {**d, "objects": tuple(objects)}


def hf_features(image_exts: tuple[str, ...] = ("jpg",)) -> Any:
    """The Hugging Face ``datasets.Features`` of shard tars (an image column per extension + ``json``),
    for ``load_dataset("webdataset", data_files=..., features=hf_features())``.

    Inference from the first 5 samples gives the same types for a JPEG-only dataset, except when none
    of them has an object (an empty list has no item type): pass these then. Pass ``("jpg", "png")``
    when PNG samples may come (from-python of arrays, from-release of PNG files): an inferred schema
    has one image column and would load such a sample's image as None. ``datasets`` is imported here
    only, on demand.
    """
    import datasets

    string, f64, i64 = datasets.Value("string"), datasets.Value("float64"), datasets.Value("int64")
    obj = {"box": datasets.List(f64), "clip_score": f64, "description": string, "detector_score": f64,
           "mask": {"counts": string, "size": datasets.List(i64)}, "mask_box": datasets.List(f64),
           "mask_score": f64, "phrase": string}  # fmt: skip
    record = {"caption": string, "height": i64, "key": string, "meta": string, "objects": datasets.List(obj),
              "original_height": i64, "original_width": i64, "schema_version": i64, "source": string,
              "source_caption": string, "width": i64}  # fmt: skip
    images = {ext: datasets.Image() for ext in image_exts}
    return datasets.Features({**images, "json": record, "__key__": string, "__url__": string})

"""Interchange with COCO: export shards as COCO instances JSON, import COCO (instances [+ stuff]
[+ captions]) as shards so COCO can be mixed into training as the paper does.

``from-coco`` records each image's COCO id and ``file_name``, each object's annotation id, category id
and supercategory, and the crowd regions in the sample's ``meta``; ``to-coco`` then writes those back,
so the export of a COCO-derived dataset scores against the original annotations and a round trip keeps
image ids, annotation ids and file names. Polygons are rasterized to the
shard's one mask form, COCO RLE (pycocotools ``frPyObjects``), so ``to-coco`` writes RLE where the
source had polygons: the same pixels (COCOeval's segm scores them alike), not the same vertices.
"""

from __future__ import annotations

import io
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from .dataset import ShardInfo, list_shards, open_run
from .masks import decode_mask, encode_mask, mask_to_box, rle_problem
from .paths import fs_and_root
from .reader import MAX_IMAGE_PIXELS, ShardReadError, checked_samples, to_sample
from .safe_json import loads as safe_loads
from .schema import (
    META_CAPTIONS,
    META_COCO_ANNOTATION_IDS,
    META_COCO_CATEGORY_IDS,
    META_COCO_CROWD,
    META_COCO_FILE_NAME,
    META_COCO_IMAGE_ID,
    META_COCO_SUPERCATEGORIES,
    ObjectRecord,
    SampleRecord,
    SchemaError,
)
from .validate import meta_problems
from .writer import DatasetWriter

log = logging.getLogger(__name__)



class CocoError(ValueError):
    """COCO input that cannot be converted; the message names the file and the field."""


def _coco_ids(rec: SampleRecord) -> tuple[int, list[int], list[str]] | None:
    """The source image id, category ids and supercategories recorded by from-coco, or None."""
    m = rec.meta
    image_id, cats, supers = m.get(META_COCO_IMAGE_ID), m.get(META_COCO_CATEGORY_IDS), m.get(META_COCO_SUPERCATEGORIES)
    if not isinstance(image_id, int) or not isinstance(cats, list) or len(cats) != len(rec.objects):
        return None
    supers = supers if isinstance(supers, list) and len(supers) == len(cats) else [""] * len(cats)
    return image_id, cats, supers


def _shard_entries(dataset: str, shard: ShardInfo, bad_masks: list[str], bad_samples: list[str]) -> list[dict]:
    """One entry per sound sample of a shard: the image, its objects and the source ids. The shard is read
    whole and checked against its stats (ShardReadError otherwise); a bad sample or mask is named in
    ``bad_samples`` / ``bad_masks`` (kept only when the shard as a whole is sound)."""
    entries, masks, samples = [], [], []
    for raw in checked_samples(dataset, shard):
        try:
            rec, ext = (s := to_sample(raw)).record, s.image_ext
            why = meta_problems(rec)
        except (KeyError, SchemaError) as e:
            why = [e.args[0] if isinstance(e, KeyError) else str(e)]
        if why:
            samples.append(f"shard {shard.name} key {raw.key}: {'; '.join(why)}")
            continue
        objects = []
        for i, obj in enumerate(rec.objects):
            mask = obj.mask
            why = None if mask is None else rle_problem(mask)
            if why:
                masks.append(f"shard {shard.name} key {rec.key} objects[{i}].mask: {why}")
                mask = None
            objects.append((obj, mask))
        entries.append({"rec": rec, "ext": ext, "objects": objects, "ids": _coco_ids(rec)})
    bad_masks += masks
    bad_samples += samples
    return entries


def _annotation(image_id: int, cat: int, box, mask: dict | None, crowd: int, extra: dict) -> dict:
    x1, y1, x2, y2 = box
    ann = {"image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
           "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd, **extra}
    if mask is not None:
        ann["segmentation"] = {"size": mask["size"], "counts": mask["counts"]}
        ann["area"] = float(mask_utils.area({**mask, "counts": mask["counts"].encode()}))
    return ann


def to_coco(dataset: str, out: str) -> dict:
    """Write a COCO instances JSON for a dataset; returns counts and what was left out.

    A dataset made by from-coco keeps its COCO image ids, file names, annotation ids, category ids and
    supercategories, and its crowd regions come back as ``iscrowd`` annotations. Any other dataset
    numbers images and annotations 1..N, names each image ``{key}.{ext}`` (its tar member) and makes one
    category per distinct detector phrase. Each annotation keeps the rich description and the scores as
    extra fields, which COCO tools ignore. Each complete shard is read whole and checked against its
    stats file; one that cannot be read, is missing its tar or differs from its stats is left out
    (``skipped_shards``: name -> reason), a sample that is not sound is left out (``bad_samples``), a
    mask pycocotools cannot decode is left off its annotation (``bad_masks``); shards without a stats
    file are not read (``incomplete_shards``).
    """
    skipped: dict[str, str] = {}
    bad_masks: list[str] = []
    bad_samples: list[str] = []
    entries: list[dict] = []
    shards = list_shards(dataset)
    for s in shards:
        if not s.complete:
            continue
        try:
            entries.extend(_shard_entries(dataset, s, bad_masks, bad_samples))
        except ShardReadError as e:
            skipped[s.name] = str(e)
            log.warning("to-coco: shard %s left out: %s", s.name, e)
    source_ids = [e["ids"][0] for e in entries if e["ids"] is not None]
    keep_ids = bool(entries) and len(source_ids) == len(entries) and len(set(source_ids)) == len(entries)
    images, annotations, categories = [], [], {}  # categories: id -> (name, supercategory)
    phrase_ids: dict[str, int] = {}
    crowd = 0
    for n, e in enumerate(entries, start=1):
        rec, meta = e["rec"], e["rec"].meta
        image_id = e["ids"][0] if keep_ids else n
        file_name = meta.get(META_COCO_FILE_NAME) if keep_ids else None
        images.append({"id": image_id, "file_name": file_name or f"{rec.key}.{e['ext']}", "width": rec.width,
                       "height": rec.height, "caption": rec.caption, "source_caption": rec.source_caption,
                       "source": rec.source})
        ann_ids = meta.get(META_COCO_ANNOTATION_IDS) or [None] * len(e["objects"])
        for i, (obj, mask) in enumerate(e["objects"]):
            if keep_ids:
                cat = int(e["ids"][1][i])
                categories.setdefault(cat, (obj.phrase, str(e["ids"][2][i])))
            else:
                cat = phrase_ids.setdefault(obj.phrase, len(phrase_ids) + 1)
                categories.setdefault(cat, (obj.phrase, ""))
            extra = {"description": obj.description, "detector_score": obj.detector_score,
                     "clip_score": obj.clip_score, "mask_score": obj.mask_score}
            annotations.append((ann_ids[i], _annotation(image_id, cat, obj.box, mask, 0, extra)))
        if keep_ids:
            for c in meta.get(META_COCO_CROWD) or []:
                categories.setdefault(int(c["category_id"]), (c["name"], c["supercategory"]))
                x, y, w, h = c["bbox"]
                annotations.append((c.get("id"), _annotation(image_id, int(c["category_id"]), (x, y, x + w, y + h),
                                                             c["segmentation"], 1, {})))
                crowd += 1
    # The source's annotation ids when every annotation has one and none repeats; else 1..N for all.
    ids = [i for i, _ in annotations]
    keep_ann_ids = keep_ids and None not in ids and len(set(ids)) == len(ids)
    for n, (source_id, ann) in enumerate(annotations, start=1):
        ann["id"] = source_id if keep_ann_ids else n
    coco = {
        "info": {"description": f"richlayout export of {dataset}"},
        "images": images,
        "annotations": [ann for _, ann in annotations],
        "categories": [{"id": i, "name": n, "supercategory": sc} for i, (n, sc) in sorted(categories.items())],
    }
    fs, path = fs_and_root(out)
    with fs.open(path, "w") as f:
        json.dump(coco, f)
    return {"images": len(images), "annotations": len(annotations) - crowd, "crowd": crowd,
            "source_ids": keep_ids, "skipped_shards": skipped, "bad_masks": bad_masks, "bad_samples": bad_samples,
            "incomplete_shards": [s.name for s in shards if not s.complete]}


def _segmentation_mask(seg, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as a bool (h, w) mask."""
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, h, w)
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    if isinstance(seg, dict):
        return decode_mask(seg)
    raise ValueError(f"unsupported segmentation of type {type(seg).__name__}")


_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # the formats a shard stores as they are


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # JSON has no NaN; Python reads it


def _shown(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _key(image_id: int) -> str:
    return f"coco{int(image_id):012d}"


def _load(path: str | None, option: str) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise CocoError(f"{option} {path}: no such file")
    try:
        d = safe_loads(p.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # too deep or a huge integer included
        raise CocoError(f"{option} {path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CocoError(f"{option} {path}: expected a JSON object with COCO's lists")
    return d


def _list(d: dict, key: str, path: str) -> list[dict]:
    value = d.get(key)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise CocoError(f"{path}: field {key!r} must be a list of objects")
    return value


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _unique_ids(items: list[dict], key: str, path: str) -> None:
    seen: set = set()
    for item in items:
        if not _is_int(item.get("id")):
            raise CocoError(f"{path}: an entry of {key!r} has no integer 'id': {_shown(item)}")
        if item["id"] in seen:
            raise CocoError(f"{path}: {key} id {item['id']!r} appears more than once")
        seen.add(item["id"])


def _categories(sources: list[tuple[dict, str]]) -> dict[int, dict]:
    """Category id -> {"name", "supercategory"} over instances and stuff; a clash is an error."""
    cats: dict[int, dict] = {}
    for d, path in sources:
        for c in _list(d, "categories", path):
            if not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
                raise CocoError(f"{path}: a category lacks an integer 'id' or a string 'name': {_shown(c)}")
            entry = {"name": c["name"], "supercategory": str(c.get("supercategory") or "")}
            if cats.get(c["id"], entry) != entry:
                raise CocoError(f"{path}: category id {c['id']!r} is defined twice, as {cats[c['id']]} and {entry}")
            cats[c["id"]] = entry
    return cats


def _objects_for(
    img: dict, anns: list[dict], cats: dict[int, dict], min_area_frac: float
) -> tuple[list[ObjectRecord], dict]:
    """The objects of an image and the ``meta`` entries that tie them back to COCO."""
    h, w = img["height"], img["width"]
    objects, cat_ids, supers, crowd, ann_ids = [], [], [], [], []
    for a in anns:
        cat = cats[a["category_id"]]
        x, y, bw, bh = a["bbox"]
        seg = a.get("segmentation")
        # Crowd regions label many instances with one box: not a single object to describe, but kept
        # in meta so the export scores like the original annotations.
        if a.get("iscrowd", 0):
            rle = encode_mask(_segmentation_mask(seg, h, w)) if seg else None
            crowd.append({"category_id": int(a["category_id"]), "name": cat["name"],
                          "supercategory": cat["supercategory"], "bbox": [float(v) for v in (x, y, bw, bh)],
                          "segmentation": rle, **({"id": a["id"]} if _is_int(a.get("id")) else {})})
            continue
        x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)
        if x2 <= x1 or y2 <= y1 or (x2 - x1) * (y2 - y1) < min_area_frac * w * h:
            continue
        mask = mask_box = None
        if seg:
            m = _segmentation_mask(seg, h, w)
            mask, mask_box = encode_mask(m), mask_to_box(m)
        objects.append(
            ObjectRecord(box=(x1, y1, x2, y2), phrase=cat["name"], description=cat["name"], mask=mask,
                         mask_box=mask_box)
        )
        cat_ids.append(int(a["category_id"]))
        supers.append(cat["supercategory"])
        ann_ids.append(a.get("id"))
    meta = {META_COCO_CATEGORY_IDS: cat_ids, META_COCO_SUPERCATEGORIES: supers, META_COCO_CROWD: crowd}
    if all(map(_is_int, ann_ids)):  # else to-coco numbers this dataset's annotations afresh
        meta[META_COCO_ANNOTATION_IDS] = ann_ids
    return objects, meta


def from_coco(
    instances: str,
    images: str,
    out: str,
    captions: str | None = None,
    stuff: str | None = None,
    shard_size: int = 1000,
    min_area_frac: float = 0.0,
) -> dict:
    """Convert COCO annotations + image folder into a shard dataset; returns counts.

    All captions of an image are kept in ``meta["captions"]`` (the trainer draws one per read);
    ``source_caption`` holds the first. Descriptions are the category names, since COCO has no
    rich descriptions. The COCO ids go to ``meta`` (``META_*``). A missing or unreadable image becomes
    a failure row, not a crash. Bad input (a missing file, invalid JSON, duplicate image ids) raises
    CocoError before anything is written.
    """
    if shard_size < 1:
        raise CocoError(f"--shard-size must be at least 1, got {shard_size}")
    inst = _load(instances, "--instances")
    stuff_d = _load(stuff, "--stuff")
    caps = _load(captions, "--captions")
    if not Path(images).is_dir():
        raise CocoError(f"--images {images}: no such folder")
    imgs = _list(inst, "images", instances)
    for img in imgs:
        if not all(_is_int(img.get(k)) for k in ("id", "width", "height")) or not isinstance(img.get("file_name"), str):
            raise CocoError(f"{instances}: image {_shown(img)} lacks a string 'file_name' or integer 'id'/'width'/'height'")
    _unique_ids(imgs, "images", instances)
    sources = [(inst, instances)] + ([(stuff_d, stuff)] if stuff_d is not None else [])
    cats = _categories(sources)
    anns_by_image: dict[int, list[dict]] = {}
    for src, path in sources:
        for a in _list(src, "annotations", path):
            bbox = a.get("bbox")
            if not _is_int(a.get("category_id")) or a["category_id"] not in cats or not _is_int(a.get("image_id")) \
                    or not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
                raise CocoError(f"{path}: annotation {_shown(a.get('id'))} needs a known integer category_id, an "
                                "integer image_id and a 4-number bbox")
            anns_by_image.setdefault(a.get("image_id"), []).append(a)
    caps_by_image: dict[int, list[str]] = {}
    for c in _list(caps, "annotations", captions) if caps is not None else []:
        if not _is_int(c.get("image_id")):
            raise CocoError(f"{captions}: caption {_shown(c.get('id'))} has no integer image_id")
        caps_by_image.setdefault(c["image_id"], []).append(str(c.get("caption", "")).strip())

    config = {
        "kind": "from-coco",
        "instances": Path(instances).name,
        "stuff": stuff and Path(stuff).name,
        "captions": captions and Path(captions).name,
        "shard_size": shard_size,
        "min_area_frac": min_area_frac,
    }
    open_run(out, config)
    imgs = sorted(imgs, key=lambda i: i["id"])
    with DatasetWriter(out, shard_size) as writer:
        for img in tqdm(imgs, desc="from-coco", unit="img", disable=len(imgs) < 100):
            key, source = _key(img["id"]), str(Path(images) / img["file_name"])
            try:
                writer.add(*_coco_sample(img, key, source, caps_by_image, anns_by_image, cats, min_area_frac))
            except (OSError, SchemaError, ValueError, KeyError, TypeError, IndexError) as e:
                # PIL's UnidentifiedImageError is an OSError: unreadable bytes count as a read failure;
                # pycocotools answers a malformed polygon with TypeError or IndexError.
                stage = "read" if isinstance(e, OSError) else "convert"
                writer.add_failure(key, source, stage, f"{type(e).__name__}: {e}")
                log.warning("from-coco: %s: %s", source, e)
    return writer.counts


def _coco_sample(img: dict, key: str, source: str, caps_by_image: dict, anns_by_image: dict, cats: dict,
                 min_area_frac: float) -> tuple[SampleRecord, bytes, str]:
    """One COCO image as a sample: its record, the image bytes and their extension."""
    name = img["file_name"]
    if name.startswith("/") or ".." in Path(name).parts:
        raise ValueError(f"file_name {name!r} leaves the --images folder: not read")
    if not Path(source).is_file():  # missing, or a named pipe that would block the conversion forever
        raise FileNotFoundError(2, "no such file" if not Path(source).exists() else "not a regular file", source)
    data = Path(source).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:  # PIL's own limit, above ours: raised inside open()
            raise ValueError(str(e)) from None
        with im:
            w, h = im.size
            # The stored extension is the format's, whatever the file is called (a PNG named .jpg).
            ext = _EXTS.get(im.format)
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"image is {w}x{h} = {w * h} pixels, more than {MAX_IMAGE_PIXELS} (shards.reader.MAX_IMAGE_PIXELS)")
    if ext is None:
        raise ValueError(f"image format {im.format} is not stored as it is (JPEG, PNG or WebP)")
    if (w, h) != (img["width"], img["height"]):
        raise ValueError(f"image is {w}x{h}, the annotations say {img['width']}x{img['height']}")
    cap_list = caps_by_image.get(img["id"], [])
    objects, coco_meta = _objects_for(img, anns_by_image.get(img["id"], []), cats, min_area_frac)
    rec = SampleRecord(
        key=key,
        width=int(img["width"]),
        height=int(img["height"]),
        original_width=int(img["width"]),
        original_height=int(img["height"]),
        source=source,
        source_caption=cap_list[0] if cap_list else None,
        objects=tuple(objects),
        meta={META_CAPTIONS: cap_list, META_COCO_IMAGE_ID: int(img["id"]), META_COCO_FILE_NAME: name, **coco_meta},
    )
    return rec, data, ext

"""Interchange with COCO: export shards as COCO instances JSON, import COCO (instances [+ stuff]
[+ captions]) as shards so COCO can be mixed into training as the paper does."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from .dataset import build_index, open_run
from .paths import fs_and_root
from .masks import decode_mask, encode_mask, mask_to_box
from .reader import iter_samples
from .schema import ObjectRecord, SampleRecord, SchemaError
from .writer import ShardWriter

log = logging.getLogger(__name__)


def to_coco(dataset: str, out: str) -> dict:
    """Write a COCO instances JSON for a dataset; returns counts.

    Categories are the distinct detector phrases. Each annotation keeps the rich description and the
    scores as extra fields, which COCO tools ignore.
    """
    images, annotations, categories = [], [], {}
    for image_id, sample in enumerate(iter_samples(dataset), start=1):
        rec = sample.record
        images.append(
            {
                "id": image_id,
                "file_name": f"{rec.key}.{sample.image_ext}",
                "width": rec.width,
                "height": rec.height,
                "caption": rec.caption,
                "source_caption": rec.source_caption,
                "source": rec.source,
            }
        )
        for obj in rec.objects:
            cat = categories.setdefault(obj.phrase, len(categories) + 1)
            x1, y1, x2, y2 = obj.box
            ann = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cat,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
                "description": obj.description,
                "detector_score": obj.detector_score,
                "clip_score": obj.clip_score,
                "mask_score": obj.mask_score,
            }
            if obj.mask is not None:
                ann["segmentation"] = {"size": obj.mask["size"], "counts": obj.mask["counts"]}
                ann["area"] = float(mask_utils.area({**obj.mask, "counts": obj.mask["counts"].encode()}))
            annotations.append(ann)
    coco = {
        "info": {"description": f"richlayout export of {dataset}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in categories.items()],
    }
    fs, path = fs_and_root(out)
    with fs.open(path, "w") as f:
        json.dump(coco, f)
    return {"images": len(images), "annotations": len(annotations)}


def _segmentation_mask(seg, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as a bool (h, w) mask."""
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, h, w)
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    if isinstance(seg, dict):
        return decode_mask(seg)
    raise ValueError(f"unsupported segmentation of type {type(seg).__name__}")


def _key(image_id: int) -> str:
    return f"coco{int(image_id):012d}"


def _load(path: str | None) -> dict | None:
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def _objects_for(img: dict, anns: list[dict], cats: dict[int, str], min_area_frac: float) -> list[ObjectRecord]:
    h, w = img["height"], img["width"]
    objects = []
    for a in anns:
        # Crowd regions label many instances with one box: not a single object to describe.
        if a.get("iscrowd", 0):
            continue
        x, y, bw, bh = a["bbox"]
        x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)
        if x2 <= x1 or y2 <= y1 or (x2 - x1) * (y2 - y1) < min_area_frac * w * h:
            continue
        mask = mask_box = None
        if "segmentation" in a and a["segmentation"]:
            m = _segmentation_mask(a["segmentation"], h, w)
            mask, mask_box = encode_mask(m), mask_to_box(m)
        name = cats[a["category_id"]]
        objects.append(
            ObjectRecord(box=(x1, y1, x2, y2), phrase=name, description=name, mask=mask, mask_box=mask_box)
        )
    return objects


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
    rich descriptions. A missing or unreadable image becomes a failure row, not a crash.
    """
    inst = _load(instances)
    stuff_d = _load(stuff)
    caps = _load(captions)
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    anns_by_image: dict[int, list[dict]] = {}
    for src in (inst, stuff_d):
        if src is None:
            continue
        cats.update({c["id"]: c["name"] for c in src["categories"]})
        for a in src["annotations"]:
            anns_by_image.setdefault(a["image_id"], []).append(a)
    caps_by_image: dict[int, list[str]] = {}
    for c in (caps or {}).get("annotations", []):
        caps_by_image.setdefault(c["image_id"], []).append(c["caption"].strip())

    config = {
        "kind": "from-coco",
        "instances": Path(instances).name,
        "stuff": stuff and Path(stuff).name,
        "captions": captions and Path(captions).name,
        "shard_size": shard_size,
        "min_area_frac": min_area_frac,
    }
    open_run(out, config)
    counts = {"samples": 0, "failures": 0, "shards": 0}
    imgs = sorted(inst["images"], key=lambda i: i["id"])
    writer = None
    for n, img in enumerate(tqdm(imgs, desc="from-coco", unit="img", disable=len(imgs) < 100)):
        if n % shard_size == 0:
            if writer is not None:
                writer.close()
            writer = ShardWriter(out, n // shard_size)
            counts["shards"] += 1
        key, source = _key(img["id"]), str(Path(images) / img["file_name"])
        try:
            data = Path(source).read_bytes()
            ext = Path(img["file_name"]).suffix.lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            with Image.open(io.BytesIO(data)) as im:
                if im.size != (img["width"], img["height"]):
                    raise ValueError(
                        f"image is {im.size[0]}x{im.size[1]}, the annotations say {img['width']}x{img['height']}"
                    )
            cap_list = caps_by_image.get(img["id"], [])
            rec = SampleRecord(
                key=key,
                width=int(img["width"]),
                height=int(img["height"]),
                original_width=int(img["width"]),
                original_height=int(img["height"]),
                source=source,
                source_caption=cap_list[0] if cap_list else None,
                objects=tuple(_objects_for(img, anns_by_image.get(img["id"], []), cats, min_area_frac)),
                meta={"captions": cap_list, "coco_id": int(img["id"])},
            )
            writer.add(rec, data, ext)
            counts["samples"] += 1
        except (OSError, SchemaError, ValueError, KeyError) as e:
            # PIL's UnidentifiedImageError is an OSError: unreadable bytes count as a read failure.
            stage = "read" if isinstance(e, OSError) else "convert"
            writer.add_failure(key, source, stage, f"{type(e).__name__}: {e}")
            counts["failures"] += 1
            log.warning("from-coco: %s: %s", source, e)
    if writer is not None:
        writer.close()
    build_index(out)
    return counts


"""Make one training example from a sample: decode, check the size, augment, reorganize into regions.

Every random choice (crop, flip, caption, K-object draw, region sampling) comes from the generator
the caller passes, one per sample, so an example depends only on its sample and its seed.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
from PIL import Image

from shards.reader import Sample
from shards.schema import ObjectRecord, SampleRecord
from training.data.augment import augment
from training.data.collate import Example
from training.data.config import DatasetSpec, StreamConfig
from training.layout.regions import reorganize_regions

# What Pillow raises for bytes that are not a decodable image (the stream counts these as undecodable).
DECODE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


def object_text(o: ObjectRecord) -> str:
    """The text an object is trained with: its rich description, else its detector phrase."""
    return o.description if o.description else o.phrase


def pick_caption(record: SampleRecord, spec: DatasetSpec, rng: np.random.Generator) -> str:
    """The global caption: one of ``meta["captions"]`` (COCO keeps all five), else the chosen field."""
    captions = record.meta.get("captions")
    if isinstance(captions, list) and captions:
        return str(captions[int(rng.integers(len(captions)))])
    first, second = (
        (record.caption, record.source_caption)
        if spec.caption == "caption"
        else (record.source_caption, record.caption)
    )
    return first or second or ""


class SizeMismatch(ValueError):
    """The decoded image's size disagrees with the record's, so its boxes cannot be trusted."""


def make_example(sample: Sample, spec: DatasetSpec, cfg: StreamConfig, rng: np.random.Generator) -> Example:
    """Decode, augment and reorganize one sample with its own generator."""
    rec = sample.record
    image = Image.open(io.BytesIO(sample.image_bytes))
    if image.size != (rec.width, rec.height):
        raise SizeMismatch(
            f"{sample.url} key {rec.key!r}: image is {image.size[0]}x{image.size[1]}, "
            f"the record says {rec.width}x{rec.height}"
        )
    r = cfg.regions
    # Sampling K objects here (with the sample's generator) makes reorganization's own cap a no-op.
    k = min(spec.augment.max_objects or r.max_objs, r.max_objs)
    aug = augment(
        image,
        np.array([o.box for o in rec.objects], dtype=np.float64).reshape(-1, 4),
        [object_text(o) for o in rec.objects],
        pick_caption(rec, spec, rng),
        replace(spec.augment, max_objects=k),
        rng,
        original_size=(rec.original_height, rec.original_width),
        masks=[o.mask for o in rec.objects] if spec.augment.masks else None,
    )
    layout = reorganize_regions(
        aug.boxes,
        aug.texts,
        *aug.target_size,
        max_objs=r.max_objs,
        max_regions=r.max_regions,
        max_slots=r.max_slots,
        rng=rng,
        rasterize=r.rasterize,
        downscale=r.downscale,
    )
    return Example(key=rec.key, aug=aug, layout=layout)

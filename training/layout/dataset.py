"""Layouts from a dataset's samples: what ``python -m training.generate --from-shards`` generates again.

Each sample's image is mapped to the generated image by a *fit*, applied alike to its boxes and, for the
ground truth ``generate`` saves beside the images, to its pixels (:func:`sample_fit`):

- ``aspect`` (default): the aspect ratio is kept, the long side becomes ``long_side`` and each side is
  rounded to a multiple of 8 (the release instead white-pads RC-COCO images to a square and crops the
  result back);
- ``center_crop``: the short side becomes ``long_side`` and the middle ``long_side`` x ``long_side`` square
  is kept, as the release's LAION evaluation dataset (``SmallestMaxSize`` then ``CenterCrop``, boxes less
  than 30 % visible dropped, as its ``min_visibility=0.3``).

Objects beyond the model's ``max_objects`` are left out, the first ones kept, as the release's datasets
and pipeline do; boxes the fit leaves without area (or below the visibility floor) are left out too. Each
is logged and counted in the record's ``dropped_objects`` (``generate.json`` sums them): a dataset is not a
hand-written layout, so its overflow is not an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from training.layout.files import LayoutRecord, SkippedLayout, check_unique, layout_record

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["FITS", "Fit", "SampleFit", "layouts_from_dataset", "sample_fit"]

Fit = Literal["aspect", "center_crop"]
FITS: tuple[str, ...] = ("aspect", "center_crop")
MIN_VISIBILITY = 0.3  # the release's LAION evaluation crop: a box less visible than this is dropped


@dataclass(frozen=True)
class SampleFit:
    """One sample's image -> the generated image: resize to ``resized``, then keep ``width`` x ``height``
    from ``(left, top)``."""

    resized: tuple[int, int]  # (width, height) after the resize
    left: int
    top: int
    width: int
    height: int

    def boxes(self, boxes: np.ndarray, source: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """``source``-pixel boxes in the output's pixels, clipped, and which boxes are kept: area left,
        and (after a crop) at least ``MIN_VISIBILITY`` of their resized area inside the crop."""
        sx, sy = self.resized[0] / source[0], self.resized[1] / source[1]
        scaled = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * [sx, sy, sx, sy]
        moved = scaled - [self.left, self.top, self.left, self.top]
        clipped = np.clip(moved, 0, [self.width, self.height, self.width, self.height])
        area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        if (self.left, self.top) != (0, 0) or self.resized != (self.width, self.height):
            full = (scaled[:, 2] - scaled[:, 0]) * (scaled[:, 3] - scaled[:, 1])
            keep &= area >= MIN_VISIBILITY * np.where(full > 0, full, np.inf)
        return clipped, keep

    def image(self, image: Image.Image) -> Image.Image:
        """The sample's pixels as the generated image's ground truth."""
        resized = image.resize(self.resized)
        return resized.crop((self.left, self.top, self.left + self.width, self.top + self.height))


def sample_fit(width: int, height: int, long_side: int, fit: Fit = "aspect") -> SampleFit:
    """The fit of a ``width`` x ``height`` image (module docstring)."""
    if fit == "aspect":
        scale = long_side / max(width, height)
        w, h = (max(8, round(side * scale / 8) * 8) for side in (width, height))
        return SampleFit((w, h), 0, 0, w, h)
    if fit == "center_crop":
        scale = long_side / min(width, height)
        w, h = (max(long_side, round(side * scale)) for side in (width, height))
        return SampleFit((w, h), (w - long_side) // 2, (h - long_side) // 2, long_side, long_side)
    raise ValueError(f"fit must be one of {list(FITS)}, got {fit!r}")


def layouts_from_dataset(
    dataset: str,
    long_side: int = 512,
    seed: int = 0,
    *,
    fit: Fit = "aspect",
    limit: int | None = None,
    max_objects: int | None = None,
    lenient: bool = False,
    skip_bad: bool = False,
) -> tuple[list[LayoutRecord], list[SkippedLayout]]:
    """The layouts of a dataset's samples (``shards.iter_samples``), to generate them again and score
    the result against the dataset.

    Boxes follow the ``fit`` (module docstring); labels are the rich descriptions (the detector phrase when
    there is none); the caption is the VLM caption, else the source caption. Ids are the sample keys;
    seeds ``seed + index``. Objects beyond ``max_objects`` are left out, the first ones kept, with a warning.
    """
    from shards import iter_samples

    records: list[LayoutRecord] = []
    skipped: list[SkippedLayout] = []
    for index, sample in enumerate(iter_samples(dataset)):
        if limit is not None and index >= limit:
            break
        rec = sample.record
        where = f"{dataset} key {rec.key!r}"
        geometry = sample_fit(rec.width, rec.height, long_side, fit)
        objects = list(rec.objects)
        boxes, keep = geometry.boxes(np.array([o.box for o in objects]), (rec.width, rec.height))
        if not keep.all():
            log.warning("%s: objects %s have no area (or under %d%% visible) in the %s fit: left out",
                        where, np.nonzero(~keep)[0].tolist(), round(MIN_VISIBILITY * 100), fit)  # fmt: skip
        objects, boxes = [o for o, k in zip(objects, keep, strict=True) if k], boxes[keep]
        if max_objects is not None and len(objects) > max_objects:
            log.warning("%s: %d objects, kept the first %d (the model's limit), as the release does",
                        where, len(objects), max_objects)  # fmt: skip
            objects, boxes = objects[:max_objects], boxes[:max_objects]
        obj = {
            "id": rec.key,
            "caption": rec.caption or rec.source_caption or "",
            "boxes": boxes.tolist(),
            "labels": [o.description or o.phrase for o in objects],
            "height": geometry.height,
            "width": geometry.width,
        }
        try:
            made = layout_record(obj, where, index, seed, max_objects=max_objects, lenient=lenient)
        except ValueError as err:
            if not skip_bad:
                raise
            log.warning("skipping layout %s", err)
            skipped.append(SkippedLayout(where, index, str(err)))
            continue
        dropped = len(rec.objects) - len(objects)
        records.extend(replace(r, dropped_objects=r.dropped_objects + dropped) for r in made)
    if not records:
        raise ValueError(f"{dataset}: no sample to take a layout from ({len(skipped)} skipped)")
    check_unique(records, dataset)
    return records, skipped

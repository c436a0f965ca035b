"""The object rows of an evaluation: each layout's objects scored by the chosen metrics, then summarized.

``Scorers.build`` loads only the metrics a config turns on (``evaluate.metrics``); ``score_chunk`` scores
the objects of a few images together (each image embedded once); ``summarize`` gives the paper's
averages (mean over each image's objects, then over images) with counts, failures by reason and sizes.

A missing image (``image`` None, ``image_error`` set): under ``paper`` its objects are left out of every
average (NaN), as the paper's evaluation skips an image it cannot find; under ``exact`` they score 0.
An unreadable image scores 0 under both, with its error. Every object keeps its row either way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from training.layout.files import LayoutRecord

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from training.evaluation.metrics import SamIoUScorer

__all__ = ["METRICS", "MISSING", "Metric", "Scorers", "object_rows", "score_chunk", "summarize"]

Metric = Literal["crop_clip", "crop_pick", "sam_iou"]
METRICS: tuple[str, ...] = ("crop_clip", "crop_pick", "sam_iou")
MISSING = "missing image"  # the reason an image's objects carry when its file is not found


def object_rows(
    record: LayoutRecord, image: Image.Image | None, image_error: str | None, metrics: Sequence[str],
    protocol: str = "paper",
) -> list[dict]:  # fmt: skip
    """The object rows of one image before scoring (boxes in the image's pixels)."""
    boxes = record.boxes
    size = (record.width, record.height)
    if image is not None and image.size != size:
        scale = np.array([image.width / record.width, image.height / record.height] * 2)
        boxes = boxes * scale
        size = image.size
    missing = image_error is not None and image_error.startswith(MISSING)
    unscored = np.nan if missing and protocol == "paper" else 0.0
    rows = []
    for j, (box, label) in enumerate(zip(boxes, record.labels, strict=True)):
        rows.append(
            {
                "image": record.id,
                "object": j,
                "label": label,
                "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3],
                "image_width": size[0],
                "image_height": size[1],
                **dict.fromkeys(metrics, unscored),
                "sam_score": np.nan,
                "error": image_error,
            }
        )  # fmt: skip
    return rows


@dataclass
class Scorers:
    """The crop scorers by column name (crop_clip, crop_pick) and the SAMIoU scorer (None: off)."""

    crops: dict[str, Callable]
    sam: SamIoUScorer | None
    protocol: str = "paper"

    @property
    def metrics(self) -> list[str]:
        """The columns these scorers fill, in order."""
        return [*self.crops, *(["sam_iou"] if self.sam is not None else [])]

    @classmethod
    def build(cls, cfg: Any) -> Scorers:
        """The scorers of an ``EvalConfig``'s protocol, only the metrics ``cfg.metrics`` turns on."""
        from training.evaluation.metrics import CropClipScorer, HfCropScorer, SamIoUScorer

        hf = dict(protocol=cfg.protocol, device=cfg.hf_device, batch_size=cfg.clip_batch_size)

        def load(key: str, model: str, processor: str | None, metric: str) -> HfCropScorer:
            try:
                return HfCropScorer(model, processor, metric=metric, **hf)
            except OSError as err:  # not a folder, not in the cache offline, no such hub id
                raise ValueError(f"evaluate.{key}: cannot load {model!r}: {err}".splitlines()[0]) from err

        crops: dict[str, Callable] = {}
        if "crop_clip" in cfg.metrics:
            if cfg.protocol == "paper":
                crops["crop_clip"] = load("paper_clip", cfg.paper_clip, None, "crop_clip")
            else:
                crops["crop_clip"] = CropClipScorer(cfg.clip, cfg.clip_batch_size)
        if "crop_pick" in cfg.metrics:
            crops["crop_pick"] = load("pickscore", cfg.pickscore, cfg.pickscore_processor, "crop_pick")
        sam = SamIoUScorer(cfg.sam, cfg.sam_score_threshold, cfg.protocol) if "sam_iou" in cfg.metrics else None
        return cls(crops, sam, cfg.protocol)


def score_chunk(
    chunk: list[tuple[LayoutRecord, Image.Image | None, str | None]], scorers: Scorers
) -> list[dict]:
    """The scored object rows of a few images (loaded, or None with the reason)."""
    metrics = scorers.metrics
    rows_per_image = [object_rows(r, image, error, metrics, scorers.protocol) for r, image, error in chunk]
    scored = [
        (rows, image) for rows, (_, image, _) in zip(rows_per_image, chunk, strict=True) if image is not None
    ]
    if scored:
        images = [image for _, image in scored]
        boxes = [
            np.array([[r["x1"], r["y1"], r["x2"], r["y2"]] for r in rows]).reshape(-1, 4)
            for rows, _ in scored
        ]
        labels = [[r["label"] for r in rows] for rows, _ in scored]
        results = {name: scorer(images, boxes, labels) for name, scorer in scorers.crops.items()}
        if scorers.sam is not None:
            results["sam_iou"] = scorers.sam(images, boxes)
        for k, (rows, _) in enumerate(scored):
            for j, row in enumerate(rows):
                errors = []
                for name, per_image in results.items():
                    row[name] = per_image[k].scores[j]
                    errors.append(per_image[k].errors[j])
                if "sam_iou" in results:
                    row["sam_score"] = results["sam_iou"][k].sam_scores[j]
                row["error"] = "; ".join(e for e in errors if e) or None
    return [row for rows in rows_per_image for row in rows]


def summarize(table: pd.DataFrame, n_images: int) -> dict:
    """The summary: paper averages, counts, failures by reason, breakdown by size."""
    from training.evaluation.metrics import mean_per_image

    metrics = [m for m in METRICS if m in table]
    failed = table[table["error"].notna()]
    reasons = Counter(e.split(":")[0] for err in failed["error"] for e in err.split("; "))
    by_size = {}
    for bucket in ("small", "medium", "large"):
        part = table[table["size"] == bucket]
        by_size[bucket] = {"objects": len(part)} | {
            m: float(part[m].mean()) if part[m].notna().any() else None for m in metrics
        }
    missing = table.loc[table["error"].fillna("").str.startswith(MISSING), "image"].nunique()
    return {
        # The paper's averages: each image's objects first, then the images (skipped objects left out).
        **{m: mean_per_image(table, m) for m in metrics},
        # Object-weighted means, for reference only: images with many objects weigh more.
        "object_mean": {m: float(table[m].mean()) for m in metrics},
        "metrics": metrics,
        "images": n_images,
        "images_missing": int(missing),
        "images_with_objects": int(table["image"].nunique()),
        "objects": len(table),
        "failed_objects": len(failed),
        # objects left out of an average (the paper protocol skips crops that fail, and missing images)
        "skipped_objects": {m: int(table[m].isna().sum()) for m in metrics},
        "failures_by_reason": dict(sorted(reasons.items())),
        "by_size": by_size,  # means over the objects of each size bucket
    }

"""Score generated images against their layouts: ``python -m training.evaluate --images DIR --layouts FILE``.

For each layout line (``training.layout.files``) the image ``DIR/<id>.png`` (or .jpg/.jpeg/.webp) is scored
with CropCLIP, CropPickScore and SAMIoU (``training.evaluation.metrics``) under ``--protocol paper`` (the default: the
paper's released evaluation code, comparable with its table) or ``--protocol exact`` (every object
counted, pixel-edge boxes); FID against ``--reference`` when Inception weights are on the local disk.
Writes into ``--out`` (default ``DIR/eval``):

- ``objects.parquet`` (or ``.csv``): one row per object: image, object, label, box, size bucket,
  ``crop_clip``, ``crop_pick``, ``sam_iou``, ``sam_score``, ``error`` (None unless the object could not
  be scored; a crop the paper protocol skips has a NaN score and a "... skipped" error);
- ``summary.json``: the protocol, the paper's averages (mean over each image's objects, then over
  images), object counts, failures by reason, the breakdown by object size, FID or why it was skipped.

A missing image scores 0 for each of its objects and is reported. Boxes are in the pixels of the
layout's ``height`` x ``width``; an image of another size has its boxes scaled to it. Examples::

    python -m training.evaluate --preset paper --images gen/ --layouts gen/layouts.jsonl --reference coco_val/
    python -m training.evaluate --preset tiny --images /tmp/gen --layouts /tmp/gen/layouts.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args, get_type_hints

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from datagen.models import ModelSpec
from datagen.scoring import SAM_SCORE_THRESHOLD
from shards.config import ConfigError, PositiveInt, UnitFloat
from training.inference.generate import add_preset_arguments, config_from_args, run_cli
from training.layout.files import LayoutRecord, read_layouts

# training.evaluation.metrics (transformers, open_clip, torch-fidelity behind it) and pandas are imported by the
# functions that score, so `--help` and a config mistake answer without them.
if TYPE_CHECKING:
    import pandas as pd

    from training.evaluation.metrics import HfCropScorer, SamIoUScorer

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "FidConfig", "evaluate", "main", "size_buckets"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
COCO_AREAS = (32.0**2, 96.0**2)  # COCO's small / medium / large limits, in pixels


@dataclass(frozen=True)
class FidConfig:
    """FID against a folder of reference images (skipped with a message when impossible)."""

    reference: str | None = None  # folder of reference images (e.g. the real images of the layouts)
    inception_weights: str | None = None  # torch-fidelity's Inception .pth; None: the torch hub cache's file
    batch_size: PositiveInt = 32
    device: str = "auto"
    feature: Literal[64, 192, 768, 2048] = 2048  # Inception feature size (2048: the published FID; 64/192/768 for quick checks)


@dataclass(frozen=True)
class EvalConfig:
    """The ``evaluate`` section of a ``configs/eval`` preset."""

    protocol: Literal["paper", "exact"] = "paper"  # paper: the release's metric code; exact: ours
    # paper protocol: CropCLIP's transformers CLIP and CropPickScore's model / processor (hub id,
    # local folder or "tiny"); pickscore None: no CropPickScore
    paper_clip: str = "openai/clip-vit-base-patch32"
    pickscore: str | None = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    hf_device: str = "auto"  # where the transformers CLIP models run
    clip: ModelSpec = ModelSpec("clip", "ViT-B-32", weights="openai", dtype="float32")  # exact: CropCLIP
    sam: ModelSpec = ModelSpec(  # SAMIoU's model (segment-anything ViT-H)
        "segmenter",
        "vit_h",
        weights="hf-hub:ybelkada/segment-anything/checkpoints/sam_vit_h_4b8939.pth",
        dtype="float32",
    )
    clip_batch_size: PositiveInt = 64  # crops / texts per CLIP forward
    chunk_images: PositiveInt = 16  # images loaded and scored together (bounds memory)
    sam_score_threshold: UnitFloat = SAM_SCORE_THRESHOLD  # SAM score <= this scores 0 (the paper: 0.5)
    size_scheme: Literal["coco", "relative"] = (
        "coco"  # coco: box area vs 32^2 / 96^2 px; relative: area fraction
    )
    relative_limits: tuple[UnitFloat, UnitFloat] = (0.02, 0.2)  # relative scheme: small < a <= medium < b <= large
    table_format: Literal["parquet", "csv"] = "parquet"
    height: PositiveInt = 512  # the size layout boxes refer to when a line does not say
    width: PositiveInt = 512
    fid: FidConfig = field(default_factory=FidConfig)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOL_CHOICES:
            raise ConfigError(f"protocol must be one of {PROTOCOL_CHOICES}, got {self.protocol!r}")
        if self.clip.kind != "clip" or self.sam.kind != "segmenter":
            raise ConfigError("evaluate.clip must be a 'clip' model spec and evaluate.sam a 'segmenter'")
        lo, hi = self.relative_limits
        if not 0 < lo < hi < 1:
            raise ConfigError(f"relative_limits must satisfy 0 < a < b < 1, got {self.relative_limits}")


# The --protocol choices, read from the config's field so the parser needs no training.evaluation.metrics (whose
# PROTOCOLS it equals: tests/test_cli_help.py checks).
PROTOCOL_CHOICES = get_args(get_type_hints(EvalConfig)["protocol"])


def size_buckets(areas: np.ndarray, fractions: np.ndarray, cfg: EvalConfig) -> list[str]:
    """``small`` / ``medium`` / ``large`` per object: COCO pixel areas or fractions of the image area."""
    values, (lo, hi) = (areas, COCO_AREAS) if cfg.size_scheme == "coco" else (fractions, cfg.relative_limits)
    return [("small", "medium", "large")[int(v >= lo) + int(v >= hi)] for v in values]


def _find_image(images: Path, record_id: str) -> Path | None:
    return next(
        (images / f"{record_id}{s}" for s in IMAGE_SUFFIXES if (images / f"{record_id}{s}").is_file()), None
    )


def _load(images: Path, record: LayoutRecord) -> tuple[Image.Image | None, str | None]:
    path = _find_image(images, record.id)
    if path is None:
        return None, f"missing image: no {record.id}{{{','.join(IMAGE_SUFFIXES)}}} in {images}"
    try:
        with Image.open(path) as im:
            return im.convert("RGB"), None
    except (OSError, UnidentifiedImageError) as err:
        return None, f"unreadable image {path}: {err}"


def _rows(
    record: LayoutRecord, image: Image.Image | None, image_error: str | None, metrics: Sequence[str]
) -> list[dict]:
    """The object rows of one image before scoring (boxes in the image's pixels)."""
    boxes = record.boxes
    size = (record.width, record.height)
    if image is not None and image.size != size:
        scale = np.array([image.width / record.width, image.height / record.height] * 2)
        boxes = boxes * scale
        size = image.size
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
                **dict.fromkeys(metrics, 0.0),
                "sam_score": np.nan,
                "error": image_error,
            }
        )  # fmt: skip
    return rows


@dataclass
class Scorers:
    """The crop scorers by column name (crop_clip, crop_pick) and the SAMIoU scorer."""

    crops: dict[str, Callable]
    sam: SamIoUScorer

    @classmethod
    def build(cls, cfg: EvalConfig) -> Scorers:
        """The scorers of a config's protocol; CropPickScore only when ``cfg.pickscore`` is set."""
        from training.evaluation.metrics import CropClipScorer, HfCropScorer, SamIoUScorer

        hf = dict(protocol=cfg.protocol, device=cfg.hf_device, batch_size=cfg.clip_batch_size)

        def load(key: str, model: str, processor: str | None, metric: str) -> HfCropScorer:
            try:
                return HfCropScorer(model, processor, metric=metric, **hf)
            except OSError as err:  # not a folder, not in the cache offline, no such hub id
                raise ValueError(f"evaluate.{key}: cannot load {model!r}: {err}".splitlines()[0]) from err

        if cfg.protocol == "paper":
            crops = {"crop_clip": load("paper_clip", cfg.paper_clip, None, "crop_clip")}
        else:
            crops = {"crop_clip": CropClipScorer(cfg.clip, cfg.clip_batch_size)}
        if cfg.pickscore is not None:
            crops["crop_pick"] = load("pickscore", cfg.pickscore, cfg.pickscore_processor, "crop_pick")
        return cls(crops, SamIoUScorer(cfg.sam, cfg.sam_score_threshold, cfg.protocol))


def _score_chunk(
    chunk: list[tuple[LayoutRecord, Image.Image | None, str | None]], scorers: Scorers
) -> list[dict]:
    metrics = [*scorers.crops, "sam_iou"]
    rows_per_image = [_rows(record, image, error, metrics) for record, image, error in chunk]
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
        results["sam_iou"] = scorers.sam(images, boxes)
        for k, (rows, _) in enumerate(scored):
            for j, row in enumerate(rows):
                errors = []
                for name, per_image in results.items():
                    row[name] = per_image[k].scores[j]
                    errors.append(per_image[k].errors[j])
                row["sam_score"] = results["sam_iou"][k].sam_scores[j]
                row["error"] = "; ".join(e for e in errors if e) or None
    return [row for rows in rows_per_image for row in rows]


def _fid(cfg: FidConfig, images_dir: Path, records: list[LayoutRecord]) -> dict:
    """``{"fid": value, ...}`` or ``{"fid": None, "fid_skipped": reason}``."""
    from training.evaluation.metrics import FidUnavailable, fid

    if cfg.reference is None:
        return {"fid": None, "fid_skipped": "no reference folder (--reference)"}
    if not Path(cfg.reference).is_dir():
        return {"fid": None, "fid_skipped": f"reference folder {cfg.reference} does not exist"}
    ref_paths = sorted(p for p in Path(cfg.reference).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    gen_paths = [p for p in (_find_image(images_dir, r.id) for r in records) if p is not None]
    try:
        value = fid(gen_paths, ref_paths, cfg.inception_weights, cfg.device, cfg.batch_size, cfg.feature)
    except FidUnavailable as err:
        log.warning("%s", err)
        return {"fid": None, "fid_skipped": str(err)}
    return {"fid": value, "fid_images": len(gen_paths), "fid_reference_images": len(ref_paths),
            "fid_feature": cfg.feature}  # fmt: skip


def summarize(table: pd.DataFrame, n_images: int) -> dict:
    """The summary: paper averages, counts, failures by reason, breakdown by size."""
    from training.evaluation.metrics import mean_per_image

    metrics = [m for m in ("crop_clip", "crop_pick", "sam_iou") if m in table]
    failed = table[table["error"].notna()]
    reasons = Counter(e.split(":")[0] for err in failed["error"] for e in err.split("; "))
    by_size = {}
    for bucket in ("small", "medium", "large"):
        part = table[table["size"] == bucket]
        by_size[bucket] = {"objects": len(part)} | {
            m: float(part[m].mean()) if part[m].notna().any() else None for m in metrics
        }
    return {
        # The paper's averages: each image's objects first, then the images (skipped objects left out).
        **{m: mean_per_image(table, m) for m in metrics},
        # Object-weighted means, for reference only: images with many objects weigh more.
        "object_mean": {m: float(table[m].mean()) for m in metrics},
        "images": n_images,
        "images_with_objects": int(table["image"].nunique()),
        "objects": len(table),
        "failed_objects": len(failed),
        # objects left out of an average (the paper protocol skips crops that fail), per metric
        "skipped_objects": {m: int(table[m].isna().sum()) for m in metrics},
        "failures_by_reason": dict(sorted(reasons.items())),
        "by_size": by_size,  # means over the objects of each size bucket
    }


def evaluate(cfg: EvalConfig, images: str | Path, layouts: str | Path, out: str | Path | None = None) -> dict:
    """Score every object of every layout; write the table and summary into ``out``; return the summary."""
    import pandas as pd

    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"--images {images} is not a folder")
    records = read_layouts(layouts, cfg.height, cfg.width)
    out = Path(out) if out is not None else images / "eval"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    scorers = Scorers.build(cfg)
    rows: list[dict] = []
    for first in tqdm(range(0, len(records), cfg.chunk_images), desc="evaluate", unit="chunk"):
        chunk = [(r, *_load(images, r)) for r in records[first : first + cfg.chunk_images]]
        rows += _score_chunk(chunk, scorers)
    table = pd.DataFrame(rows)
    if table.empty:
        raise ValueError(f"{layouts}: no objects to score")
    area = (table["x2"] - table["x1"]) * (table["y2"] - table["y1"])
    table["area_fraction"] = area / (table["image_width"] * table["image_height"])
    table["size"] = size_buckets(area.to_numpy(), table["area_fraction"].to_numpy(), cfg)
    table_path = out / f"objects.{cfg.table_format}"
    if cfg.table_format == "parquet":
        table.to_parquet(table_path, index=False)
    else:
        table.to_csv(table_path, index=False)
    summary = {"protocol": cfg.protocol, **summarize(table, len(records))}
    summary.update(_fid(cfg.fid, images, records))
    summary.update(
        size_scheme=cfg.size_scheme,
        seconds=round(time.perf_counter() - start, 3),
        table=str(table_path),
        config=dataclasses.asdict(cfg),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if summary["failed_objects"]:
        log.warning("%d of %d objects could not be scored: %s", summary["failed_objects"],
                    summary["objects"], summary["failures_by_reason"])  # fmt: skip
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True, help="folder of generated images named <id>.png")
    p.add_argument("--layouts", required=True, help="the layouts file (JSON lines) the images were made from")
    p.add_argument("--out", default=None, help="output folder (default: IMAGES/eval)")
    add_preset_arguments(p, "evaluate")
    p.add_argument(
        "--protocol", choices=PROTOCOL_CHOICES,
        help="paper: the paper's released metric code (default); exact: every object counted, pixel-edge boxes",
    )  # fmt: skip
    p.add_argument("--reference", help="folder of reference images for FID")
    p.add_argument("--inception-weights", help="torch-fidelity's Inception weights (.pth) for FID")
    p.add_argument(
        "--format", choices=("parquet", "csv"), dest="table_format", help="per-object table format"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; prints the summary JSON (without the config)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = [
        f"{key}={json.dumps(value)}"
        for key, value in (
            ("protocol", args.protocol),
            ("fid.reference", args.reference),
            ("fid.inception_weights", args.inception_weights),
            ("table_format", args.table_format),
        )
        if value is not None
    ]
    return run_cli(
        lambda: evaluate(
            config_from_args(EvalConfig, args, "evaluate", overrides), args.images, args.layouts, args.out
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())

"""Score generated images against their layouts: ``python -m training.evaluate --images DIR --layouts FILE``.

For each layout line (``training.layout.files``) the image ``DIR/<id>.png`` (or .jpg/.jpeg/.webp) is scored
object by object (``training.evaluation.scoring``, ``training.evaluation.metrics``) and the set of images
against a reference set (``training.evaluation.fid``). Writes into ``--out`` (default ``DIR/eval``):

- ``objects.parquet`` (or ``.csv``): one row per object: image, object, label, box, size bucket, one
  column per metric, ``sam_score``, ``error`` (None unless the object could not be scored; a crop the
  paper protocol skips has a NaN score and a "... skipped" error);
- ``summary.json``: the protocol, the paper's averages (mean over each image's objects, then over
  images), object counts, missing images, failures by reason, the breakdown by size, FID or why it was skipped.

``--protocol layoutsam`` scores LayoutSAM-Eval instead (``training.evaluation.layoutsam``; ``--layouts`` its parquet).

Boxes are in the pixels of the layout's ``height`` x ``width``; an image of another size has its boxes
scaled to it. A folder holding none of the layouts' images is an error, not a table of zeros. Examples::

    python -m training.evaluate --preset paper --images gen/ --layouts gen/layouts.jsonl --reference coco_val/
    python -m training.evaluate --preset release --images gen/ --layouts gen/layouts.jsonl   # gen/unrefined/
    python -m training.evaluate --preset tiny --images /tmp/gen --layouts /tmp/gen/layouts.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args, get_type_hints

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from datagen.models import TINY_KINDS, ModelSpec
from datagen.scoring import SAM_SCORE_THRESHOLD
from shards.config import ConfigError, PositiveInt, UnitFloat
from training.evaluation.layoutsam import LAYOUTSAM, LayoutSamConfig
from training.evaluation.scoring import METRICS, MISSING, Metric, Scorers, score_chunk, summarize
from training.inference.presets import add_preset_arguments, config_from_args, run_cli
from training.layout.files import LayoutRecord, read_layouts

# training.evaluation.metrics (transformers, open_clip, torch-fidelity behind it) and pandas are imported by the
# functions that score, so `--help` and a config mistake answer without them.

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

    # paper: the release's metric code; exact: ours; layoutsam: LayoutSAM-Eval's VLM questions (its section)
    protocol: Literal["paper", "exact", "layoutsam"] = "paper"
    # the per-object metrics computed (a metric left out loads no model); FID runs when fid.reference is set
    metrics: tuple[Metric, ...] = ("crop_clip", "crop_pick", "sam_iou")
    # final: DIR/<id>.png; unrefined: DIR/unrefined/<id>.png, the images before generate's refiner (the
    # paper's table scores those: the release's evaluation reads its *_non_refined.png files)
    image_set: Literal["final", "unrefined"] = "final"
    # paper protocol: CropCLIP's transformers CLIP and CropPickScore's model / processor (hub id,
    # local folder or "tiny")
    paper_clip: str = "openai/clip-vit-base-patch32"
    pickscore: str = "yuvalkirstain/PickScore_v1"
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
    layoutsam: LayoutSamConfig = field(default_factory=LayoutSamConfig)  # protocol layoutsam only

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOL_CHOICES:
            raise ConfigError(f"protocol must be one of {PROTOCOL_CHOICES}, got {self.protocol!r}")
        if self.clip.kind != "clip" or self.sam.kind != "segmenter":
            raise ConfigError("evaluate.clip must be a 'clip' model spec and evaluate.sam a 'segmenter'")
        if self.layoutsam.vlm.kind != "vlm":
            raise ConfigError("evaluate.layoutsam.vlm must be a 'vlm' model spec", "layoutsam.vlm")
        if not self.metrics or len(set(self.metrics)) != len(self.metrics):
            raise ConfigError(f"metrics must name each of {list(METRICS)} at most once, and one at least",
                              "metrics")  # fmt: skip
        lo, hi = self.relative_limits
        if not 0 < lo < hi < 1:
            raise ConfigError(f"relative_limits must satisfy 0 < a < b < 1, got {self.relative_limits}")


# The --protocol choices, read from the config's field so the parser needs no training.evaluation.metrics (whose
# PROTOCOLS it equals, and LAYOUTSAM: tests/test_cli_help.py checks).
PROTOCOL_CHOICES = get_args(get_type_hints(EvalConfig)["protocol"])


def size_buckets(areas: np.ndarray, fractions: np.ndarray, cfg: EvalConfig) -> list[str]:
    """``small`` / ``medium`` / ``large`` per object: COCO pixel areas or fractions of the image area."""
    values, (lo, hi) = (areas, COCO_AREAS) if cfg.size_scheme == "coco" else (fractions, cfg.relative_limits)
    return [("small", "medium", "large")[int(v >= lo) + int(v >= hi)] for v in values]


def _find_image(images: Path, record_id: str) -> Path | None:
    return next(
        (images / f"{record_id}{s}" for s in IMAGE_SUFFIXES if (images / f"{record_id}{s}").is_file()), None
    )


def _fid_state(cfg: FidConfig) -> tuple[dict | None, str | None]:
    """The Inception weights FID will use, read once now (before any scoring), or why FID is skipped.

    A file named by the user (``--inception-weights``) that cannot be read, or a ``--reference`` that is not
    a folder, is an error naming it; without a reference FID is skipped, as without weights in the cache.
    """
    from training.evaluation.fid import FidUnavailable, find_inception_weights, load_inception_state

    if cfg.reference is not None and not Path(cfg.reference).is_dir():
        raise ValueError(f"--reference {cfg.reference}: not a folder of reference images")
    weights = Path(cfg.inception_weights) if cfg.inception_weights is not None else None
    if weights is not None and not weights.is_file():
        what = "not a regular file" if weights.exists() else "no such file"
        raise ValueError(f"--inception-weights {weights}: {what}")
    if cfg.reference is None and cfg.inception_weights is None:
        return None, "no reference folder (--reference)"
    try:
        path = find_inception_weights(cfg.inception_weights)
    except FidUnavailable as err:  # no file in the torch hub cache: nothing was asked by name
        return None, str(err)
    try:
        state = load_inception_state(path)
    except FidUnavailable as err:
        raise ValueError(f"--inception-weights: {err}") from None
    if cfg.reference is None:
        return None, "no reference folder (--reference)"
    for path in _reference_images(cfg):  # headers only: a garbage or bomb file is named before any scoring
        try:
            Image.open(path).close()
        except (OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"--reference: cannot read image {path}: {err}") from None
    return state, None


def _reference_images(cfg: FidConfig) -> list[Path]:
    """The reference folder's images: regular files only (a FIFO named x.png would block the read)."""
    folder = Path(cfg.reference)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _fid(cfg: FidConfig, state: dict | None, skipped: str | None, gen_paths: list[Path]) -> dict:
    """``{"fid": value, ...}`` or ``{"fid": None, "fid_skipped": reason}``."""
    from training.evaluation.fid import FidUnavailable, fid

    if state is None:
        if cfg.reference is not None:
            log.warning("FID skipped: %s", skipped)
        return {"fid": None, "fid_skipped": skipped}
    ref_paths = _reference_images(cfg)
    try:
        value = fid(gen_paths, ref_paths, None, cfg.device, cfg.batch_size, cfg.feature, state=state)
    except ValueError as err:  # weights of another network, an unreadable image: named
        prefix = "" if str(err).startswith("FID") else "--inception-weights: " if cfg.inception_weights else "FID: "
        raise ValueError(f"{prefix}{err}") from None
    except FidUnavailable as err:
        log.warning("%s", err)
        return {"fid": None, "fid_skipped": str(err)}
    return {"fid": value, "fid_images": len(gen_paths), "fid_reference_images": len(ref_paths),
            "fid_feature": cfg.feature}  # fmt: skip


def _image_folder(cfg: EvalConfig, images: Path, records: list[LayoutRecord]) -> tuple[Path, dict]:
    """The folder scored (``image_set``) and each record's image file (None: missing); an error when the
    folder holds none of them (an empty folder, another run's images, a typo)."""
    folder = images / "unrefined" if cfg.image_set == "unrefined" else images
    if not folder.is_dir():
        raise ValueError(f"--images {folder} is not a folder" + (
            " (image_set unrefined: generate with a refiner writes it)" if cfg.image_set == "unrefined" else ""))  # fmt: skip
    found = {r.id: _find_image(folder, r.id) for r in records}
    if not any(found.values()):
        held = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        ids = ", ".join(r.id for r in records[:3]) + (", ..." if len(records) > 3 else "")
        raise ValueError(
            f"--images {folder}: none of the {len(records)} layouts' images is there (looked for {ids} "
            f"with {'/'.join(IMAGE_SUFFIXES)}; the folder holds {held} image files): nothing to score"
        )
    return folder, found


def _out_folder(images: Path, out: str | Path | None) -> Path:
    """``--out`` (default ``IMAGES/eval``), refused when it exists and is not a folder."""
    out = Path(out) if out is not None else images / "eval"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    return out


def _load(path: Path | None, folder: Path, record: LayoutRecord) -> tuple[Image.Image | None, str | None]:
    """One record's image, or None and why (missing, unreadable)."""
    if path is None:
        return None, f"{MISSING}: no {record.id}{{{','.join(IMAGE_SUFFIXES)}}} in {folder}"
    try:
        with Image.open(path) as im:
            return im.convert("RGB"), None
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        return None, f"unreadable image: {path}: {err}"


def evaluate(cfg: EvalConfig, images: str | Path, layouts: str | Path, out: str | Path | None = None) -> dict:
    """Score every object of every layout; write the table and summary into ``out``; return the summary.

    Everything a run needs is checked before any model loads: the layouts, the image folder (at least one
    of the layouts' images must be there), the output folder and FID's reference and weights.
    """
    import pandas as pd

    images = Path(images)
    if not images.is_dir():
        raise ValueError(f"--images {images} is not a folder")
    if cfg.protocol == LAYOUTSAM:
        return _evaluate_layoutsam(cfg, images, layouts, out)
    records = read_layouts(layouts, cfg.height, cfg.width, zero_area=cfg.protocol == "paper")
    folder, found = _image_folder(cfg, images, records)
    out = _out_folder(images, out)
    fid_state, fid_skipped = _fid_state(cfg.fid)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    scorers = Scorers.build(cfg)
    rows: list[dict] = []
    loaded: list[Path] = []  # the images FID compares: those that could be read
    for first in tqdm(range(0, len(records), cfg.chunk_images), desc="evaluate", unit="chunk"):
        chunk = [(r, *_load(found[r.id], folder, r)) for r in records[first : first + cfg.chunk_images]]
        loaded += [found[r.id] for r, image, _ in chunk if image is not None]
        rows += score_chunk(chunk, scorers)
    fid_summary = _fid(cfg.fid, fid_state, fid_skipped, loaded)
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
    summary = {"protocol": cfg.protocol, "image_folder": str(folder), **summarize(table, len(records))}
    summary.update(fid_summary)
    summary.update(
        size_scheme=cfg.size_scheme,
        seconds=round(time.perf_counter() - start, 3),
        table=str(table_path),
        config=dataclasses.asdict(cfg),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if summary["images_missing"]:
        what = "left out of the averages" if cfg.protocol == "paper" else "scored 0"
        log.warning("%d of %d images missing in %s: their objects are %s", summary["images_missing"],
                    len(records), folder, what)  # fmt: skip
    if summary["failed_objects"]:
        log.warning("%d of %d objects could not be scored: %s", summary["failed_objects"],
                    summary["objects"], summary["failures_by_reason"])  # fmt: skip
    return summary


def _evaluate_layoutsam(cfg: EvalConfig, images: Path, layouts: str | Path, out: str | Path | None) -> dict:
    """The LayoutSAM-Eval protocol (``training.evaluation.layoutsam``) on the benchmark's parquet rows."""
    from training.evaluation.layoutsam import benchmark_rows, evaluate_layoutsam

    rows = benchmark_rows(layouts)
    folder, found = _image_folder(cfg, images, rows)  # type: ignore[arg-type]  # rows have ids
    return evaluate_layoutsam(cfg, rows, found, _out_folder(images, out), lambda path, r: _load(path, folder, r))


HELP_METRICS = """\
metrics (per object, then the mean over each image's objects, then over images):
  crop_clip   CropCLIP: 100 x cosine of CLIP's embeddings of the object's crop and its label.
              paper: transformers CLIP ViT-B/32 (evaluate.paper_clip); exact: open_clip ViT-B-32 (evaluate.clip)
  crop_pick   CropPickScore: the same with PickScore (evaluate.pickscore, evaluate.pickscore_processor)
  sam_iou     SAMIoU: IoU of the box with the box of SAM's mask prompted by it (evaluate.sam);
              0 when SAM's score <= evaluate.sam_score_threshold (0.5) or the mask is empty
  fid         FID of the images against --reference's (Inception v3, torch-fidelity's weights:
              --inception-weights or the torch hub cache; never downloaded)

protocols (--protocol):
  paper  the paper's released evaluation code, comparable with its table: boxes cast to int (floor),
         a crop that cannot be scored is skipped (NaN, out of the averages), a missing image is skipped,
         a zero-area box is scored as there (its crops skipped, SAMIoU 0), mask boxes inclusive
         (a mask exactly filling a 10 px box scores 0.81)
  exact  every object counts: crops rounded outward, a crop or image that cannot be scored scores 0
         (with its error), mask boxes in pixel edges (a mask filling its box scores 1)
  layoutsam  LayoutSAM-Eval (--layouts its parquet; images --resolution square): a VLM (--vlm) asked per
         box if the region is present, then if colour, texture and shape match; box-weighted means

turning metrics on and off:
  --metrics crop_clip,sam_iou            only these (the default: crop_clip,crop_pick,sam_iou);
                                         also --set 'metrics=[crop_clip]' or `metrics:` in a preset
  --reference DIR                        FID on (off without a reference folder)
  --preset paper|release|tiny            paper and release compute all three and FID with --reference;
                                         release scores IMAGES/unrefined (the paper's table scores the
                                         images before the refiner: --set image_set=final for the refined)
"""


def _metrics(text: str) -> list[str]:
    """``--metrics``'s comma-separated names, each one of METRICS."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: name metrics among {', '.join(METRICS)}, comma-separated")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description=__doc__.split("\n")[0],
        epilog=HELP_METRICS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", required=True, help="folder of generated images named <id>.png")
    p.add_argument("--layouts", required=True, help="the layouts file (JSON lines) the images were made from")
    p.add_argument("--out", default=None, help="output folder (default: IMAGES/eval)")
    add_preset_arguments(p, "evaluate")
    p.add_argument(
        "--protocol", choices=PROTOCOL_CHOICES,
        help="paper: the paper's released metric code (default); exact: every object counted, pixel-edge boxes",
    )  # fmt: skip
    p.add_argument(
        "--metrics", type=_metrics, help=f"comma-separated per-object metrics to compute (of {', '.join(METRICS)})"
    )
    p.add_argument("--reference", help="folder of reference images for FID (turns FID on)")
    p.add_argument("--inception-weights", help="torch-fidelity's Inception weights (.pth) for FID")
    p.add_argument(
        "--format", choices=("parquet", "csv"), dest="table_format", help="per-object table format"
    )
    p.add_argument("--resolution", type=int, help="layoutsam: the generated images' side (default 512)")
    p.add_argument("--vlm", help="layoutsam: the VLM, a hub id or folder (or tiny-qwen2.5-vl, offline)")
    p.add_argument("--vlm-engine", choices=("transformers", "minicpm"), help="layoutsam: how the VLM runs")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="layoutsam with --vlm-engine minicpm only: run the model repository's code")  # fmt: skip
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
            ("metrics", args.metrics),
            ("layoutsam.resolution", args.resolution),
            ("layoutsam.vlm.name", args.vlm),
            ("layoutsam.vlm.backend", None if args.vlm is None else "tiny" if args.vlm in TINY_KINDS else "hf"),
            ("layoutsam.engine", args.vlm_engine),
            ("layoutsam.trust_remote_code", args.trust_remote_code),
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

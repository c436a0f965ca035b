"""LayoutSAM / LayoutSAM-Eval parquet rows as layouts: what ``training.generate --layouts FILE.parquet`` reads
and ``training.evaluate --protocol layoutsam`` scores against.

CreatiLayout's benchmark (``HuiZhang0812/LayoutSAM-eval``, Apache-2.0) is parquet with the columns
``image`` (not read here: we score generated images), ``image_id``, ``width``, ``height``,
``global_caption``, ``bbox_list``, ``region_captions``, ``detail_region_captions`` (the last three Python
literals held as strings: xyxy pixel boxes of the ``width`` x ``height`` image, and one text per box) and
``file_name``. A path is one parquet file or a folder of them (or a ``datasets`` save), streamed in batches
by ``shards.layoutsam_io``; the literals are parsed, bounded, by ``shards.layoutsam.parse_literal``.

As the benchmark's loader: ``int(width)``, ``int(height)``, each box coordinate ``round(x / width, 3)``
(y by the height); its generation scripts give the model the *detailed* region captions as the region texts
and the global caption as the prompt, and save each image under the row's ``file_name`` (here its stem, the
record id: ``DIR/<stem>.png``). A row that does not parse is an error naming file, row and column (with
``skip_bad``: skipped and listed, as a bad layout of any layouts file).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from shards.layoutsam import parse_literal
from shards.layoutsam_io import iter_rows, source_files
from shards.paths import url_for
from training.layout.files import LayoutRecord, SkippedLayout, check_unique, layout_record

log = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "LayoutSamRow",
    "is_layoutsam",
    "layoutsam_records",
    "read_layoutsam",
]

COLUMNS = ("image_id", "width", "height", "global_caption", "bbox_list", "region_captions",
           "detail_region_captions", "file_name")  # fmt: skip
BATCH_ROWS = 1024  # rows per parquet batch: the file is streamed, never held whole


@dataclass(frozen=True)
class LayoutSamRow:
    """One benchmark row, parsed and checked."""

    id: str  # the stem of file_name: names the generated image
    file_name: str
    image_id: str
    where: str  # FILE[row N] (N counted from 0 in that file)
    index: int  # the row's place among all rows read (0-based, bad rows counted): its seed's offset
    caption: str  # global_caption: the prompt
    boxes: np.ndarray  # (N, 4) float64 xyxy normalised by width/height, rounded to 3 decimals as the loader
    regions: tuple[str, ...]  # region_captions: the presence question's subject
    details: tuple[str, ...]  # detail_region_captions: the region texts generated from and asked about
    width: int
    height: int


def is_layoutsam(path: str | Path) -> bool:
    """Whether a ``--layouts`` path is LayoutSAM data: a ``.parquet`` / ``.arrow`` file or a folder."""
    path = Path(path)
    return path.suffix.lower() in (".parquet", ".arrow") or path.is_dir()


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _side(raw: dict, column: str) -> int:
    value = raw[column]
    if not _number(value) or int(value) < 1:
        raise ValueError(f"{column}: expected a positive number of pixels, got {value!r}")
    return int(value)  # the loader's int()


def _texts(raw: dict, column: str, n: int) -> tuple[str, ...]:
    texts = parse_literal(raw[column], column)
    if len(texts) != n:
        raise ValueError(f"{column}: {len(texts)} texts for {n} boxes in bbox_list")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{column}: entries {bad[:5]} are not strings")
    return tuple(texts)


def _row(raw: dict, where: str, index: int) -> LayoutSamRow:
    try:
        file_name = raw["file_name"]
        stem = PurePosixPath(file_name).stem if isinstance(file_name, str) else ""
        if not stem or PurePosixPath(file_name).name != file_name:
            raise ValueError(f"file_name: expected a file name without folders, got {file_name!r}")
        width, height = _side(raw, "width"), _side(raw, "height")
        boxes = parse_literal(raw["bbox_list"], "bbox_list")
        for i, box in enumerate(boxes):
            if not isinstance(box, list | tuple) or len(box) != 4 or not all(map(_number, box)):
                raise ValueError(f"bbox_list: box {i} is not 4 finite numbers [x1, y1, x2, y2]: {box!r}"[:300])
        normalised = [[round(x1 / width, 3), round(y1 / height, 3), round(x2 / width, 3), round(y2 / height, 3)]
                      for x1, y1, x2, y2 in boxes]  # fmt: skip
        caption = raw["global_caption"]
        if not isinstance(caption, str):
            raise ValueError(f"global_caption: expected a string, got {type(caption).__name__}")
        return LayoutSamRow(
            id=stem,
            file_name=file_name,
            image_id=str(raw["image_id"]),
            where=where,
            index=index,
            caption=caption,
            boxes=np.array(normalised, dtype=np.float64).reshape(-1, 4),
            regions=_texts(raw, "region_captions", len(boxes)),
            details=_texts(raw, "detail_region_captions", len(boxes)),
            width=width,
            height=height,
        )
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _raw_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    """``(where, raw row)`` of every file, streamed by ``shards.layoutsam_io`` (parquet, or a ``datasets``
    save's Arrow files); the ``image`` column is never read."""
    fs, files = source_files(str(path))
    for file in files:
        missing = [c for c in COLUMNS if c not in file.columns]
        if missing:
            what = f"{url_for(fs, file.path)}: no column {missing} (LayoutSAM columns: {', '.join(COLUMNS)})"
            if Path(path).is_dir():  # a folder is read as LayoutSAM: say what else it could have been
                what = f"{path}: is a folder, not a layouts file, and not LayoutSAM parquet ({what})"
            raise ValueError(what)
    for _, file, row, raw in iter_rows(fs, files, list(COLUMNS), batch_size=BATCH_ROWS):
        yield f"{url_for(fs, file.path)}[row {row}]", raw


def read_layoutsam(path: str | Path, *, skip_bad: bool = False) -> tuple[list[LayoutSamRow], list[SkippedLayout]]:
    """Every row of a LayoutSAM parquet file (or folder), parsed; a bad row raises naming file, row and
    column, or with ``skip_bad`` is returned as skipped. No row, or two rows of one file_name stem (each
    names one image), is an error."""
    rows: list[LayoutSamRow] = []
    skipped: list[SkippedLayout] = []
    for n, (where, raw) in enumerate(_raw_rows(path)):
        try:
            rows.append(_row(raw, where, n))
        except ValueError as err:
            if not skip_bad:
                raise
            log.warning("skipping LayoutSAM row %s", err)
            skipped.append(SkippedLayout(where, n, str(err)))
    if not rows:
        raise ValueError(f"{path}: no valid LayoutSAM row ({len(skipped)} skipped)")
    check_unique(rows, str(path))  # type: ignore[arg-type]  # rows have ids as records do
    return rows, skipped


def layoutsam_records(
    path: str | Path,
    height: int = 512,
    width: int = 512,
    seed: int = 0,
    *,
    max_objects: int | None = None,
    lenient: bool = False,
    skip_bad: bool = False,
) -> tuple[list[LayoutRecord], list[SkippedLayout]]:
    """The rows as layouts to generate (``training.layout.files.load_layouts``'s signature and rules).

    Each row's normalised boxes scaled to the generated ``width`` x ``height`` (the benchmark generates one
    square size for every row), the detailed region captions as the labels, the global caption as the
    prompt, the file_name stem as the id, ``seed + row index`` as the seed. Checked as any layout: a box
    without area at that size, or more than ``max_objects``, is an error (or lenient / skipped).
    """
    rows, skipped = read_layoutsam(path, skip_bad=skip_bad)
    records: list[LayoutRecord] = []
    scale = np.array([width, height, width, height], dtype=np.float64)
    for row in rows:
        obj = {"id": row.id, "caption": row.caption, "boxes": (row.boxes * scale).tolist(),
               "labels": list(row.details), "height": height, "width": width}  # fmt: skip
        where = f"{row.where}: bbox_list scaled to {width}x{height}"  # the field its checks are about
        try:
            records += layout_record(obj, where, row.index, seed, max_objects=max_objects, lenient=lenient)
        except ValueError as err:
            if not skip_bad:
                raise
            log.warning("skipping layout %s", err)
            skipped.append(SkippedLayout(row.where, row.index, str(err)))
    if not records:
        raise ValueError(f"{path}: no valid layout ({len(skipped)} skipped)")
    return records, skipped

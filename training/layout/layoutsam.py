"""LayoutSAM / LayoutSAM-Eval parquet rows as layouts: what ``training.generate --layouts FILE.parquet`` reads
and ``training.evaluate --protocol layoutsam`` scores against.

CreatiLayout's benchmark (``HuiZhang0812/LayoutSAM-eval``, Apache-2.0) is parquet with the columns
``image`` (not read here: we score generated images), ``image_id``, ``width``, ``height``,
``global_caption``, ``bbox_list``, ``region_captions``, ``detail_region_captions`` (the last three Python
literals held as strings: xyxy pixel boxes of the ``width`` x ``height`` image, and one text per box) and
``file_name``. A path is one parquet file or a folder of them (read in name order), streamed in batches.

As the benchmark's loader: ``int(width)``, ``int(height)``, each box coordinate ``round(x / width, 3)``
(y by the height); its generation scripts give the model the *detailed* region captions as the region texts
and the global caption as the prompt, and save each image under the row's ``file_name`` (here its stem, the
record id: ``DIR/<stem>.png``). A row that does not parse is an error naming file, row and column (with
``skip_bad``: skipped and listed, as a bad layout of any layouts file).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from training.layout.files import LayoutRecord, SkippedLayout, check_unique, layout_record

__all__ = [
    "COLUMNS",
    "LayoutSamRow",
    "is_layoutsam",
    "layoutsam_records",
    "parse_literal",
    "read_layoutsam",
]

COLUMNS = ("image_id", "width", "height", "global_caption", "bbox_list", "region_captions",
           "detail_region_captions", "file_name")  # fmt: skip
# The benchmark's longest literal is a few kB; a megabyte is a mistake (or an attack on the parser).
MAX_LITERAL_CHARS = 2**20
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
    """Whether a ``--layouts`` path is LayoutSAM parquet: a ``.parquet`` file or a folder."""
    path = Path(path)
    return path.suffix.lower() == ".parquet" or path.is_dir()


def parse_literal(text: object, column: str) -> list:
    """A Python-literal list held in a string column (``ast.literal_eval``, never ``eval``), bounded.

    A list column (an already-parsed variant of the dataset) is taken as it is. Longer than
    ``MAX_LITERAL_CHARS``, nested past the parser's limit, not a literal or not a list: ValueError.
    """
    if isinstance(text, list | tuple):
        return list(text)
    if not isinstance(text, str):
        raise ValueError(f"{column}: expected a string holding a list, got {type(text).__name__}")
    if len(text) > MAX_LITERAL_CHARS:
        raise ValueError(f"{column}: {len(text)} characters, more than {MAX_LITERAL_CHARS}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
        raise ValueError(f"{column}: not a Python literal: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(value, list | tuple):
        raise ValueError(f"{column}: expected a list, got {type(value).__name__}")
    return list(value)


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


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".parquet" and p.is_file())
        if not files:
            raise ValueError(f"{path}: a folder without .parquet files (LayoutSAM layouts are parquet)")
        return files
    if not path.is_file():
        raise ValueError(f"{path}: no such parquet file" if not path.exists() else f"{path}: not a regular file")
    return [path]


def _raw_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, raw row)`` of every file, streamed; the ``image`` column is never read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in _files(path):
        try:
            reader = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{file}: not a readable parquet file: {' '.join(str(err).split())}") from None
        missing = [c for c in COLUMNS if c not in reader.schema_arrow.names]
        if missing:
            raise ValueError(f"{file}: no column {missing} (LayoutSAM columns: {', '.join(COLUMNS)})")
        n = 0
        try:
            for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS)):
                for raw in batch.to_pylist():
                    yield f"{file}[row {n}]", raw
                    n += 1
        except pa.ArrowException as err:
            raise ValueError(f"{file}: cannot read row {n} on: {' '.join(str(err).split())}") from None


def read_layoutsam(path: str | Path, *, skip_bad: bool = False) -> tuple[list[LayoutSamRow], list[SkippedLayout]]:
    """Every row of a LayoutSAM parquet file (or folder), parsed; a bad row raises naming file, row and
    column, or with ``skip_bad`` is returned as skipped. No row, or two rows of one file_name stem (each
    names one image), is an error."""
    rows: list[LayoutSamRow] = []
    skipped: list[SkippedLayout] = []
    for n, (where, raw) in enumerate(_raw_rows(Path(path))):
        try:
            rows.append(_row(raw, where, n))
        except ValueError as err:
            if not skip_bad:
                raise
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
            skipped.append(SkippedLayout(row.where, row.index, str(err)))
    if not records:
        raise ValueError(f"{path}: no valid layout ({len(skipped)} skipped)")
    return records, skipped

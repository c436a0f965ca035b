"""LayoutSAM (CreatiLayout's dataset) in and out: ``python -m shards from-layoutsam SRC OUT [--images DIR]``
and ``python -m shards to-layoutsam DATASET OUT``.

LayoutSAM's rows (LayoutSAM-Eval's parquet, the training split's parquet, a ``datasets`` save): ``image``
(the Hugging Face Image feature, ``{bytes, path}``; absent in the training split, whose rows name SA-1B
images by ``file_name``), ``image_id``, ``width``, ``height``, ``global_caption``, and three Python-literal
strings: ``bbox_list`` (xyxy boxes in pixels of ``width`` x ``height``), ``region_captions`` and
``detail_region_captions`` (one string per box).

In: each row becomes a sample (the region caption the object's phrase, the detailed caption its
description, ``global_caption`` the caption, no mask; ``file_name``, ``image_id`` and the source file and
row in ``meta``) or a failed row saying why: ``convert`` for a string that is not such a literal (parsed
with ``ast.literal_eval``, at most ``MAX_LITERAL_CHARS``), lists of different lengths, a box more than a
pixel outside the image or without area; ``read`` for an image missing or undecodable. An image of
another size than the row's but the same aspect ratio (within 1%: a resized SA-1B copy) is used with its
boxes scaled to it (``original_width/height`` keep the row's size); another aspect ratio fails the row.
Shards are consecutive runs of ``shard_size`` rows, so a rerun resumes: complete shards are skipped.

Out: one parquet per complete shard that holds samples (``train-NNNNNN.parquet``), LayoutSAM's columns and types with the ``datasets`` features in the
schema metadata, so ``load_dataset("parquet", ...)`` decodes ``image`` as a PIL image. Boxes are pixels of
the stored image; a missing description is written as the phrase.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import math
import re
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .dataset import build_index, list_shards, open_run, read_stats
from .layoutsam_io import ImageSource, SourceFile, iter_rows, source_files
from .paths import fs_and_root, join, url_for
from .reader import MAX_IMAGE_PIXELS, ShardReadError, checked_samples, to_sample
from .schema import ObjectRecord, SampleRecord, SchemaError
from .writer import ShardWriter

log = logging.getLogger(__name__)

__all__ = ["LAYOUTSAM_SCHEMA", "from_layoutsam", "parse_literal", "to_layoutsam"]

# Keys of ``SampleRecord.meta`` this conversion writes (and to-layoutsam reads back).
META_FILE_NAME = "layoutsam_file_name"  # str: the row's file_name
META_IMAGE_ID = "layoutsam_image_id"  # the row's image_id as it was (an int in LayoutSAM-Eval)
META_ROW = "layoutsam_row"  # {"file": source file relative to SRC, "row": the row's index in it}

MAX_LITERAL_CHARS = 1 << 20  # a row of 100 boxes with 2,000-character captions is 200 KB
ANNOTATIONS = ("image_id", "global_caption", "detail_region_captions", "region_captions", "bbox_list",
               "width", "height", "file_name")  # fmt: skip
REQUIRED = ("bbox_list", "region_captions", "detail_region_captions", "width", "height")
_ASPECT_TOLERANCE = 0.01  # a resized copy keeps the aspect ratio within rounding to whole pixels
_BOX_TOLERANCE = 1.0  # pixels a box may pass the image edge by (rounding); it is clipped
_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

# LayoutSAM-Eval's columns, in its order and with its types (its dataset card's features).
LAYOUTSAM_SCHEMA = pa.schema([
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("image_id", pa.int64()), ("global_caption", pa.string()), ("detail_region_captions", pa.string()),
    ("region_captions", pa.string()), ("bbox_list", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("file_name", pa.string()),
])  # fmt: skip
# What ``datasets`` writes into the schema metadata so a reader knows ``image`` is an Image feature.
_HF_FEATURES = {"image": {"_type": "Image"}, **{
    f.name: {"dtype": str(f.type), "_type": "Value"} for f in LAYOUTSAM_SCHEMA if f.name != "image"}}  # fmt: skip
LAYOUTSAM_SCHEMA = LAYOUTSAM_SCHEMA.with_metadata({"huggingface": json.dumps({"info": {"features": _HF_FEATURES}})})


def parse_literal(text: object, column: str) -> list:
    """The list a Python-literal string holds (a list already parsed, as a variant of the dataset may store
    it, as it is); ValueError naming ``column`` for anything else: null, longer than ``MAX_LITERAL_CHARS``,
    not a literal (``literal_eval`` builds nothing but literals, and Python's parser refuses more than 200
    nested brackets), not a list."""
    if isinstance(text, list | tuple):
        return list(text)
    if not isinstance(text, str):
        raise ValueError(f"{column} must be a string holding a Python list, got {type(text).__name__}")
    if len(text) > MAX_LITERAL_CHARS:
        raise ValueError(f"{column} is {len(text)} characters long, more than {MAX_LITERAL_CHARS}: not parsed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # an invalid escape in a caption (Python 3.12+)
            warnings.simplefilter("ignore", DeprecationWarning)  # the same before 3.12
            value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        shown = text if len(text) <= 60 else text[:57] + "..."
        why = _ADDRESS.sub("", " ".join(str(e).split()))  # "<ast.Call object at 0x7f...>": the same on every run
        raise ValueError(f"{column} is not a Python literal ({type(e).__name__}: {why[:200]}): {shown!r}") from None
    if not isinstance(value, list | tuple):
        raise ValueError(f"{column} must hold a list, got {type(value).__name__}")
    return list(value)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _boxes(text: object) -> list[list[float]]:
    value = parse_literal(text, "bbox_list")
    if not all(isinstance(b, list | tuple) and len(b) == 4 and all(map(_is_number, b)) for b in value):
        raise ValueError(f"bbox_list must be a list of [x1, y1, x2, y2] number lists, got {str(value)[:80]!r}")
    return [[float(v) for v in b] for b in value]


def _strings(text: object, column: str) -> list[str]:
    value = parse_literal(text, column)
    if not all(isinstance(s, str) for s in value):
        raise ValueError(f"{column} must be a list of strings, got {str(value)[:80]!r}")
    return list(value)


def _check_box(i: int, box: list[float], w: int, h: int) -> list[float]:
    """The box clipped to the image; ValueError for one further outside than rounding, or without area."""
    x1, y1, x2, y2 = box
    t = _BOX_TOLERANCE
    if x1 < -t or y1 < -t or x2 > w + t or y2 > h + t:
        raise ValueError(f"bbox_list[{i}] {box} lies outside the {w}x{h} image")
    x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"bbox_list[{i}] {box} has no area (needs x2 > x1 and y2 > y1 inside the image)")
    return [x1, y1, x2, y2]


def _annotations(row: dict) -> tuple[int, int, list, list[str], list[str], str | None]:
    """The row's size, boxes (clipped) and texts, checked; ValueError saying what is wrong."""
    w, h = row["width"], row["height"]
    if not all(_is_number(v) and float(v).is_integer() and v > 0 for v in (w, h)):
        raise ValueError(f"width and height must be positive integers, got {w!r} x {h!r}")
    w, h = int(w), int(h)
    boxes = _boxes(row["bbox_list"])
    phrases = _strings(row["region_captions"], "region_captions")
    details = _strings(row["detail_region_captions"], "detail_region_captions")
    if not len(boxes) == len(phrases) == len(details):
        raise ValueError(f"bbox_list has {len(boxes)} boxes, region_captions {len(phrases)} and "
                         f"detail_region_captions {len(details)} captions: one each per region")  # fmt: skip
    caption = row["global_caption"]
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"global_caption must be a string, got {type(caption).__name__}")
    return w, h, [_check_box(i, b, w, h) for i, b in enumerate(boxes)], phrases, details, caption


def _image(data: bytes) -> tuple[bytes, str, int, int]:
    """The image as stored (JPEG, PNG and WebP as they are, others as PNG) and its size; OSError when it
    does not decode, ValueError beyond ``MAX_IMAGE_PIXELS``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ValueError(str(e)) from None
        except UnidentifiedImageError:  # its message names a BytesIO's address
            raise OSError(f"{len(data)} bytes that Pillow cannot identify as an image") from None
        with im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ValueError(f"image is {w}x{h} = {w * h} pixels, more than {MAX_IMAGE_PIXELS} "
                                 "(shards.reader.MAX_IMAGE_PIXELS)")  # fmt: skip
            ext = _EXTS.get(im.format)
            if im.format == "JPEG":
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # decoded at 1/8: a cut-off file still fails
            im.load()
            if ext is None:
                buf = io.BytesIO()
                im.convert("RGB").save(buf, "PNG")
                data, ext = buf.getvalue(), "png"
    return data, ext, w, h


def _sample(row: dict, key: str, source: str, meta: dict, images: ImageSource | None):
    """One row as (record, image bytes, ext); ValueError / OSError saying why not."""
    w, h, boxes, phrases, details, caption = _annotations(row)
    embedded = row.get("image")
    if isinstance(embedded, dict) and embedded.get("bytes"):
        data = embedded["bytes"]
    elif images is not None and isinstance(row["file_name"], str):
        data, _ = images.read(row["file_name"])
    else:
        raise FileNotFoundError("the row has no image bytes" + ("" if images is not None else " and no --images was given")
                                + ("" if isinstance(row["file_name"], str) else " (and no file_name)"))  # fmt: skip
    data, ext, iw, ih = _image(data)
    if (iw, ih) != (w, h) and abs(iw / ih - w / h) > _ASPECT_TOLERANCE * (w / h):
        raise ValueError(f"image is {iw}x{ih}, the row says {w}x{h}: another aspect ratio, so another image")
    sx, sy = iw / w, ih / h  # 1 unless the image is a resized copy
    objects = tuple(
        ObjectRecord(box=(b[0] * sx, b[1] * sy, min(b[2] * sx, iw), min(b[3] * sy, ih)), phrase=p, description=d or None)
        for b, p, d in zip(boxes, phrases, details, strict=True)
    )
    record = SampleRecord(key=key, width=iw, height=ih, original_width=w, original_height=h, source=source,
                          caption=caption or None, objects=objects, meta=meta)  # fmt: skip
    return record, data, ext


def _key(n: int, file_name: object) -> str:
    stem = file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0] if isinstance(file_name, str) else ""
    return f"{n:09d}-{_UNSAFE.sub('_', stem)}"[:100].rstrip("-")


def _image_id(v: object) -> object:
    return v if isinstance(v, int | str) and not isinstance(v, bool) else None if v is None else str(v)


def from_layoutsam(src: str, out: str, images: str | None = None, *, shard_size: int = 1000,
                   batch_size: int = 64) -> dict:  # fmt: skip
    """Convert LayoutSAM rows (module doc) into a shard dataset; returns counts (``resumed_shards``: complete
    shards of an earlier run with the same source and settings, kept). ValueError for a source that
    cannot be used at all (no data file, a file lacking LayoutSAM's columns, no images for its rows)."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    fs, files = source_files(src)
    for f in files:
        missing = [c for c in REQUIRED if c not in f.columns]
        if missing:
            raise ValueError(f"{url_for(fs, f.path)}: has no column {', '.join(missing)}; LayoutSAM's columns are "
                             f"image, {', '.join(ANNOTATIONS)}")  # fmt: skip
        if "image" not in f.columns and images is None:
            raise ValueError(f"{url_for(fs, f.path)}: has no image column (LayoutSAM's training split names SA-1B "
                             "images by file_name): give --images, a folder of the images or SA-1B's tars")  # fmt: skip
    config = {"kind": "from-layoutsam", "files": [[f.name, f.size] for f in files], "shard_size": shard_size,
              "images": images and images.rstrip("/").rsplit("/", 1)[-1]}  # fmt: skip
    open_run(out, config)
    done = {s.id: s for s in list_shards(out) if s.complete}
    start = 0
    while start // shard_size in done:  # a killed run's complete shards: their rows are not read again
        start += shard_size
    source = None
    if images is not None:
        names = (r["file_name"] for _, _, _, r in iter_rows(fs, files, ["file_name"], 4096, start)
                 if isinstance(r["file_name"], str))  # fmt: skip
        source = ImageSource(images, names)
    counts = {"samples": 0, "failures": 0, "shards": 0, "resumed_shards": 0}
    for s in done.values():
        st = read_stats(out, s)
        counts["samples"], counts["failures"] = counts["samples"] + st["samples"], counts["failures"] + st["failures"]
        counts["shards"] += 1
        counts["resumed_shards"] += 1
    total = sum(f.num_rows for f in files) if all(f.num_rows is not None for f in files) else None
    writer: ShardWriter | None = None
    rows = iter_rows(fs, files, ["image", *ANNOTATIONS], batch_size, start)
    for n, file, i, row in tqdm(rows, desc="from-layoutsam", unit="row", total=total, initial=start,
                                disable=total is not None and total < 100):  # fmt: skip
        sid = n // shard_size
        if sid in done:  # a complete shard after an incomplete one: read, not rewritten
            continue
        if writer is None or writer.name != f"{sid:06d}":
            _close(writer, counts)
            writer = ShardWriter(out, sid)
        _add(writer, n, file, i, row, url_for(fs, file.path), source)
    _close(writer, counts)
    build_index(out)
    counts["image_problems"] = dict(source.problems) if source is not None else {}
    return counts


def _add(writer: ShardWriter, n: int, file: SourceFile, i: int, row: dict, url: str, images: ImageSource | None):
    key, source = _key(n, row["file_name"]), f"{url}#row={i}"
    meta = {META_FILE_NAME: row["file_name"] if isinstance(row["file_name"], str) else "",
            META_IMAGE_ID: _image_id(row["image_id"]), META_ROW: {"file": file.name, "row": i}}  # fmt: skip
    try:
        writer.add(*_sample(row, key, source, meta, images))
    except (OSError, ValueError) as e:  # SchemaError is a ValueError; PIL's UnidentifiedImageError an OSError
        stage = "read" if isinstance(e, OSError) else "convert"
        writer.add_failure(key, source, stage, f"{type(e).__name__}: {e}")
        log.debug("from-layoutsam: %s: %s", source, e)


def _close(writer: ShardWriter | None, counts: dict) -> None:
    if writer is not None and not writer.closed:
        stats = writer.close()
        counts["samples"] += stats.samples
        counts["failures"] += stats.failures
        counts["shards"] += 1


# --- to-layoutsam -------------------------------------------------------------------------------------------


def _number(v: float) -> int | float:
    """A box coordinate as LayoutSAM writes them: whole pixels as ints, else two decimals."""
    return int(v) if float(v).is_integer() else round(float(v), 2)


def layoutsam_row(record: SampleRecord, image: bytes, ext: str, position: int) -> dict:
    """One sample as a LayoutSAM row: boxes in pixels of the stored image, the phrase as the region
    caption, the description (the phrase when there is none) as the detailed caption, the caption (else
    the source caption) as ``global_caption``; ``image_id`` and ``file_name`` from a LayoutSAM import's
    meta, else ``position`` and ``{key}.{ext}``."""
    objs = record.objects
    image_id = record.meta.get(META_IMAGE_ID)
    file_name = record.meta.get(META_FILE_NAME) or f"{record.key}.{ext}"
    return {
        "image": {"bytes": image, "path": file_name},
        "image_id": image_id if isinstance(image_id, int) and not isinstance(image_id, bool) else position,
        "global_caption": record.caption or record.source_caption or "",
        "detail_region_captions": repr([o.description or o.phrase for o in objs]),
        "region_captions": repr([o.phrase for o in objs]),
        "bbox_list": repr([[_number(v) for v in o.box] for o in objs]),
        "width": record.width,
        "height": record.height,
        "file_name": file_name,
    }


def to_layoutsam(dataset: str, out: str, row_group_size: int = 100) -> dict:
    """Write each complete shard of ``dataset`` that holds samples as ``out/train-NNNNNN.parquet`` (its shard's
    name; LayoutSAM's columns); returns counts. A shard is written to a temporary name and renamed once its
    tar checked out against its stats file (``checked_samples``); one that did not is left out
    (``skipped_shards``: name -> why), a sample that does not read is left out and named (``bad_samples``).
    A shard without samples gives no file: ``datasets`` cannot read a parquet file without rows. ValueError
    when ``out`` already holds parquet files (a previous export's would mix with this one's)."""
    fs, root = fs_and_root(out)
    if fs.exists(root) and any(p.endswith(".parquet") for p in fs.find(root)):
        raise ValueError(f"{out}: already holds parquet files; give a new or empty folder")
    fs.makedirs(root, exist_ok=True)
    shards = list_shards(dataset)
    skipped: dict[str, str] = {}
    bad: list[str] = []
    rows, files = 0, 0
    for shard in tqdm([s for s in shards if s.complete], desc="to-layoutsam", unit="shard", disable=len(shards) < 10):
        tmp = join(root, f".{shard.name}.parquet.partial")
        try:
            written = _write_shard(dataset, shard, fs, tmp, rows, row_group_size, bad)
        except ShardReadError as e:
            skipped[shard.name] = str(e)
            log.warning("to-layoutsam: shard %s left out: %s", shard.name, e)
            written = 0
        if written:
            fs.mv(tmp, join(root, f"train-{shard.name}.parquet"))
            rows, files = rows + written, files + 1
        elif fs.exists(tmp):
            fs.rm(tmp)
    return {"rows": rows, "files": files, "skipped_shards": skipped, "bad_samples": bad,
            "incomplete_shards": [s.name for s in shards if not s.complete]}  # fmt: skip


def _write_shard(dataset: str, shard, fs, path: str, position: int, row_group_size: int, bad: list[str]) -> int:
    """The shard's samples as LayoutSAM rows in ``path`` (only once there is one); how many."""
    batch: list[dict] = []
    written = 0
    with contextlib.ExitStack() as stack:
        pw = None
        for raw in checked_samples(dataset, shard):
            try:
                s = to_sample(raw)
            except (KeyError, SchemaError) as e:
                bad.append(f"{shard.name} {raw.key}: {e}")
                continue
            batch.append(layoutsam_row(s.record, s.image_bytes, s.image_ext, position + written))
            written += 1
            if len(batch) == row_group_size:
                pw = pw or stack.enter_context(pq.ParquetWriter(stack.enter_context(fs.open(path, "wb")), LAYOUTSAM_SCHEMA))
                pw.write_table(pa.Table.from_pylist(batch, schema=LAYOUTSAM_SCHEMA))
                batch = []
        if batch:
            pw = pw or stack.enter_context(pq.ParquetWriter(stack.enter_context(fs.open(path, "wb")), LAYOUTSAM_SCHEMA))
            pw.write_table(pa.Table.from_pylist(batch, schema=LAYOUTSAM_SCHEMA))
    return written

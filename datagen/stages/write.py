"""The last stage: turn rows into shard entries, and write one shard through ``shards.ShardWriter``.

``pack`` runs on the workers right after the model stages: it encodes each ok row's image as JPEG and
validates its record, so only compact, already-checked entries travel to the writer. ``write_shard``
is the body of the one Ray task per shard: every input of the shard ends there as a sample or as a
parquet row (failed or filtered), and a record that breaks the shard contract becomes a failure row
with ``error_stage="write"`` rather than a lost input.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import Field

from shards import (
    OBJECT_FIELDS,
    STATUS_FAILED,
    STATUS_FILTERED,
    STATUS_OK,
    ObjectRecord,
    SampleRecord,
    SchemaError,
    ShardWriter,
)
from shards.paths import fs_and_root, join, shard_name, url_for
from shards.reader import raw_samples

log = logging.getLogger(__name__)

STAGE = "write"
_SIZE_COLUMNS = ("width", "height", "original_width", "original_height")


@dataclass(frozen=True)
class WriteConfig:
    """How samples are stored."""

    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 95  # for images that are re-encoded (resized, rotated or not JPEG at the source)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Deterministic baseline JPEG of an RGB array (same pixels, same bytes)."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality, optimize=False, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


def _record(row: dict) -> SampleRecord:
    objects = tuple(ObjectRecord(**{k: o.get(k) for k in OBJECT_FIELDS}) for o in row.get("objects") or ())
    return SampleRecord(
        key=row["key"],
        width=int(row["width"]),
        height=int(row["height"]),
        original_width=int(row["original_width"]),
        original_height=int(row["original_height"]),
        source=row["source"],
        source_caption=row.get("source_caption"),
        caption=row.get("caption"),
        objects=objects,
        meta=dict(row.get("meta") or {}),
    ).validate()


def _sizes(row: dict) -> dict:
    return {k: None if row.get(k) is None else int(row[k]) for k in _SIZE_COLUMNS}


def pack_row(row: dict, config: WriteConfig) -> dict:
    """One row of the pipeline -> a compact, JSON-safe-plus-bytes entry for ``write_shard``."""
    base = {"key": row["key"], "source": row["source"]}
    status = row.get("status") or STATUS_FAILED
    if status != STATUS_OK:
        return {**base, "status": status, "error_stage": row.get("error_stage") or "unknown",
                "error": row.get("error") or "no reason recorded", "columns": _sizes(row)}
    try:
        record = _record(row)
    except (SchemaError, TypeError, ValueError) as e:
        return {**base, "status": STATUS_FAILED, "error_stage": STAGE, "error": f"{type(e).__name__}: {e}",
                "columns": _sizes(row)}
    image = row.get("source_jpeg") or encode_jpeg(row["image"], config.jpeg_quality)
    return {**base, "status": STATUS_OK, "record": record.to_dict(), "image": image, "ext": "jpg"}


def pack(batch: dict, config: WriteConfig) -> list[dict]:
    """Every row of a columnar batch, packed."""
    n = len(batch["key"])
    return [pack_row({k: v[i] for k, v in batch.items()}, config) for i in range(n)]


def _existing_entries(dataset: str, shard_id: int, replaced: set[str]) -> list[dict]:
    """The entries of a complete shard that a retry keeps (every row not being reprocessed)."""
    fs, root = fs_and_root(dataset)
    name = shard_name(shard_id)
    with fs.open(join(root, f"{name}.parquet"), "rb") as f:
        df = pd.read_parquet(f)
    members: dict[str, dict[str, bytes]] = {}
    for raw in raw_samples([url_for(fs, join(root, f"{name}.tar"))]):
        if raw.key not in replaced:
            members.setdefault(raw.key, {}).update(raw.members)
    kept = []
    for row in df.to_dict("records"):
        if row["key"] in replaced:
            continue
        row = {k: (None if pd.isna(v) else v) for k, v in row.items()}
        if row["status"] == STATUS_OK:
            m = members[row["key"]]
            rec = SampleRecord.from_json_bytes(m["json"], where=f"{name}.tar")
            kept.append({"key": row["key"], "source": row["source"], "status": STATUS_OK, "record": rec.to_dict(),
                         "image": m[row["image_ext"]], "ext": row["image_ext"]})
        else:
            kept.append({"key": row["key"], "source": row["source"], "status": row["status"],
                         "error_stage": row["error_stage"], "error": row["error"], "columns": _sizes(row)})
    return kept


def write_shard(dataset: str, shard_id: int, entries: list[dict], keep_existing: bool = False) -> dict:
    """Write shard ``shard_id`` from packed entries; returns its stats as a dict.

    ``keep_existing`` (``--retry-failed``): the shard exists and ``entries`` replace some of its rows;
    the others are carried over. Its stats file is removed first, so a crash mid-rewrite leaves an
    incomplete shard that the next run redoes from the inputs.
    """
    if keep_existing:
        carried = _existing_entries(dataset, shard_id, {e["key"] for e in entries})
        fs, root = fs_and_root(dataset)
        stats_path = join(root, f"{shard_name(shard_id)}.stats.json")
        if fs.exists(stats_path):
            fs.rm(stats_path)
        entries = carried + list(entries)
    writer = ShardWriter(dataset, shard_id)
    for e in entries:
        if e["status"] == STATUS_OK:
            try:
                writer.add(SampleRecord.from_dict(e["record"]), e["image"], e["ext"])
                continue
            except SchemaError as err:
                e = {**e, "status": STATUS_FAILED, "error_stage": STAGE, "error": f"SchemaError: {err}", "columns": {}}
        status = e["status"] if e["status"] in (STATUS_FAILED, STATUS_FILTERED) else STATUS_FAILED
        columns = {k: v for k, v in (e.get("columns") or {}).items() if v is not None}
        writer.add_failure(e["key"], e["source"], e["error_stage"], e["error"], status=status, **columns)
    return writer.close().__dict__

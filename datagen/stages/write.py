"""The last stage: turn rows into shard entries, store them as parts, and seal a shard from its parts.

``pack`` runs on the workers right after the model stages: it encodes each ok row's image as JPEG and
validates its record. ``write_part`` stores one packed chunk beside the output
(``<output>/_parts/<run token>/<shard>/<start>.tar``: entries as JSON plus image members, no pickle),
so image bytes go from the worker to storage, never through the driver. Every function here receives
the run's ``shards.dataset.DatasetHandle`` (or a URI, opened on the spot); parts are named by their path
in its filesystem. ``seal_shard`` is the body of
the one Ray task per shard: it reads the shard's parts and calls ``write_shard``, where every input
ends as a sample or as a parquet row (failed or filtered); a record that breaks the shard contract
becomes a failure row with ``error_stage="write"`` rather than a lost input.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
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
from shards.dataset import DatasetHandle, as_handle
from shards.paths import join, shard_name, write_atomic
from shards.reader import raw_samples
from shards.writer import build_tar

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


def _existing_entries(dataset: DatasetHandle, shard_id: int, replaced: set[str]) -> list[dict]:
    """The entries of a complete shard that a retry keeps (every row not being reprocessed)."""
    name = shard_name(shard_id)
    with dataset.fs.open(dataset.shard_path(shard_id, "parquet"), "rb") as f:
        df = pd.read_parquet(f)
    members: dict[str, dict[str, bytes]] = {}
    for raw in raw_samples([dataset.url(f"{name}.tar")]):
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


def write_shard(dataset: str | DatasetHandle, shard_id: int, entries: list[dict], keep_existing: bool = False) -> dict:
    """Write shard ``shard_id`` from packed entries; returns its stats as a dict.

    ``keep_existing`` (``--retry-failed``): the shard exists and ``entries`` replace some of its rows;
    the others are carried over. Its stats file is removed first, so a crash mid-rewrite leaves an
    incomplete shard that the next run redoes from the inputs.
    """
    dataset = as_handle(dataset)
    if keep_existing:
        carried = _existing_entries(dataset, shard_id, {e["key"] for e in entries})
        stats_path = dataset.shard_path(shard_id, "stats.json")
        if dataset.fs.exists(stats_path):
            dataset.fs.rm(stats_path)
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


PARTS_DIR = "_parts"  # under the output: chunk parts waiting for their shard to be sealed
_ENTRIES = "entries.json"


def parts_dir(dataset: str | DatasetHandle, token: str, shard_id: int) -> str:
    """The folder of one run's parts of one shard (the run token keeps two runs' parts apart), as a
    path in the dataset's filesystem."""
    return as_handle(dataset).path(PARTS_DIR, token, shard_name(shard_id))


def write_part(dataset: str | DatasetHandle, folder: str, start: int, entries: list[dict]) -> str:
    """Store the packed entries of the chunk starting at input ``start`` in ``folder`` (``parts_dir``);
    returns the part's path.

    A deterministic tar (``entries.json`` + one member per image), written to a temporary name and
    renamed: a reader sees a whole part or none, and whoever writes a part writes the same bytes.
    """
    fs = as_handle(dataset).fs
    members, meta = [], []
    for i, e in enumerate(entries):
        meta.append({k: v for k, v in e.items() if k != "image"})
        if "image" in e:
            members.append((f"{i:06d}.img", bytes(e["image"])))
    members.append((_ENTRIES, json.dumps(meta, sort_keys=True).encode()))
    fs.makedirs(folder, exist_ok=True)
    path = join(folder, f"{start:09d}.tar")
    write_atomic(fs, path, build_tar(members))
    return path


def read_part(dataset: str | DatasetHandle, path: str) -> list[dict]:
    """The entries of one part (a path ``write_part`` returned), images put back."""
    with as_handle(dataset).fs.open(path, "rb") as f:
        data = f.read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    entries = json.loads(members[_ENTRIES])
    for i, e in enumerate(entries):
        image = members.get(f"{i:06d}.img")
        if image is not None:
            e["image"] = image
    return entries


def seal_shard(dataset: str | DatasetHandle, shard_id: int, parts: list[str], keep_existing: bool = False,
               fingerprint: str | None = None) -> dict:
    """Write shard ``shard_id`` from its parts (in input order), then remove them; returns its stats.

    Safe against a second writer of the same shard (a restarted run while an orphaned task of a killed
    one still runs): every file of a shard is written to a temporary name and renamed, and the same
    inputs under the same configuration give the same bytes, so either writer's files are the shard.
    ``fingerprint`` is the run's configuration: when ``run.json`` says another one now (``--new-run``
    since), this writer's rows are stale and nothing is written (``{"superseded": True}``): ``run.json``
    is read now, not taken from the handle's run record, which is the driver's at the run's start.
    """
    dataset = as_handle(dataset)
    if fingerprint is not None:
        run = dataset.read_run() or {}
        if run.get("fingerprint") != fingerprint:
            log.warning("shard %s not sealed: %s now belongs to another configuration", shard_name(shard_id), dataset.uri)
            return {"shard": shard_name(shard_id), "superseded": True}
    entries = [e for p in parts for e in read_part(dataset, p)]
    stats = write_shard(dataset, shard_id, entries, keep_existing)
    if parts:
        try:
            dataset.fs.rm(parts[0].rsplit("/", 1)[0], recursive=True)
        except FileNotFoundError:  # another writer of this run's parts removed them first
            pass
    return stats

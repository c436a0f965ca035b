"""Write one shard: ``NNNNNN.tar`` (WebDataset), ``NNNNNN.parquet`` (one row per input) and, last,
``NNNNNN.stats.json`` (its presence means the shard is complete).

A shard is buffered in memory and written on ``close()``: members are sorted by key and carry fixed
metadata, so the same samples always give the same bytes, whatever order the workers produced them in.
One Ray task writes one shard, so a shard (about a thousand images) fits in one worker's memory.

Each sample's row in the parquet also says where its members lie in the tar (``OFFSET_COLUMNS``), so a
reader can fetch one sample with one byte range (``shards.offsets``) instead of reading the tar.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd

from .dataset import DatasetHandle, as_handle, build_index
from .paths import dump_json, join, shard_name, write_atomic

# The status names live in schema (no heavy imports there); re-exported for ``from shards.writer import``.
from .schema import (  # noqa: F401
    SCHEMA_VERSION,
    STATUS_FAILED,
    STATUS_FILTERED,
    STATUS_OK,
    STATUSES,
    SampleRecord,
    SchemaError,
    check_key,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# Parquet columns, in order; one row per input sample, failures included.
PARQUET_COLUMNS = {
    "key": "string",
    "source": "string",
    "status": "string",
    "error_stage": "string",
    "error": "string",
    "width": "Int64",
    "height": "Int64",
    "original_width": "Int64",
    "original_height": "Int64",
    "num_objects": "Int64",
    "mean_clip_score": "Float64",
    "min_clip_score": "Float64",
    "mean_detector_score": "Float64",
    "mean_mask_score": "Float64",
    "image_ext": "string",
    "image_bytes": "Int64",
}

# Where a sample's members lie in the tar, in bytes from its start (null in rows without a sample). Not in
# PARQUET_COLUMNS: shards written before these columns existed stay complete, and their readers scan the
# tar's headers instead (docs/DESIGN.md, "The on-disk contract").
OFFSET_COLUMNS = {
    "tar_offset": "Int64",  # the sample's first member header: its members run from here, headers included
    "image_offset": "Int64",  # the image's data (``image_bytes`` long)
    "json_offset": "Int64",  # the JSON record's data
    "json_bytes": "Int64",
}


@dataclass(frozen=True)
class ShardStats:
    """The content of ``NNNNNN.stats.json``."""

    shard: str
    samples: int
    failures: int
    filtered: int
    objects: int
    failures_by_stage: dict
    tar_bytes: int
    tar_sha256: str
    schema_version: int = SCHEMA_VERSION


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: byte-reproducible tars do not depend on who wrote them or when.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def build_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic tar of ``(name, data)`` members, sorted by name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in sorted(members, key=lambda m: m[0]):
            _tar_member(tar, name, data)
    return buf.getvalue()


def member_offsets(fileobj) -> Iterator[tarfile.TarInfo]:
    """The member headers of a seekable tar, each with ``offset`` (its first header block, a GNU long
    name's included) and ``offset_data``; the data is skipped by seeking, never read. Raises tarfile's
    errors (and OSError) at a damaged header, after the members before it."""
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        while (info := tar.next()) is not None:
            tar.members = []  # nothing is extracted: the headers need not be remembered
            yield info


def _offset_rows(tar_bytes: bytes) -> dict[str, dict]:
    """``OFFSET_COLUMNS`` per key of a tar this module built (names ``{key}.{ext}``)."""
    rows: dict[str, dict] = {}
    for info in member_offsets(io.BytesIO(tar_bytes)):
        key, ext = info.name.split(".", 1)
        row = rows.setdefault(key, {"tar_offset": info.offset})
        if ext == "json":
            row["json_offset"], row["json_bytes"] = info.offset_data, info.size
        else:
            row["image_offset"] = info.offset_data
    return rows


class ShardWriter:
    """Collects the samples and failures of one shard, then writes its three files.

    >>> with ShardWriter("out", 0) as w:          # doctest: +SKIP
    ...     w.add(record, jpeg_bytes, "jpg")
    ...     w.add_failure("k2", "img/2.jpg", "decode", "truncated JPEG")
    """

    def __init__(self, dataset: str | DatasetHandle, shard_id: int):
        handle = as_handle(dataset)
        self.fs, self.root = handle.fs, handle.root
        self.name = shard_name(shard_id)
        self._samples: dict[str, tuple[SampleRecord, bytes, str]] = {}
        self._rows: dict[str, dict] = {}
        self.closed = False

    def _claim(self, key: str) -> None:
        check_key(key)
        if key in self._rows:
            raise SchemaError(f"shard {self.name}: key {key!r}: field 'key' is duplicated in this shard")

    def add(self, record: SampleRecord, image: bytes, ext: str = "jpg") -> None:
        """Add a sample: a record (validated here) and the encoded image bytes."""
        ext = ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise SchemaError(f"key {record.key!r}: field 'image_ext' must be one of {IMAGE_EXTS}, got {ext!r}")
        self._claim(record.key)
        record = record.validate()
        self._samples[record.key] = (record, image, ext)
        objs = record.objects
        self._rows[record.key] = {
            "key": record.key,
            "source": record.source,
            "status": STATUS_OK,
            "width": record.width,
            "height": record.height,
            "original_width": record.original_width,
            "original_height": record.original_height,
            "num_objects": len(objs),
            "mean_clip_score": _mean([o.clip_score for o in objs]),
            "min_clip_score": min((o.clip_score for o in objs if o.clip_score is not None), default=None),
            "mean_detector_score": _mean([o.detector_score for o in objs]),
            "mean_mask_score": _mean([o.mask_score for o in objs]),
            "image_ext": ext,
            "image_bytes": len(image),
        }

    def add_failure(
        self,
        key: str,
        source: str,
        stage: str,
        error: str,
        status: str = STATUS_FAILED,
        **columns: object,
    ) -> None:
        """Record an input that did not become a sample: which stage, and why."""
        if status not in (STATUS_FAILED, STATUS_FILTERED):
            raise ValueError(f"key {key!r}: failure status must be 'failed' or 'filtered', got {status!r}")
        unknown = set(columns) - set(PARQUET_COLUMNS)
        if unknown:
            raise ValueError(f"key {key!r}: unknown parquet columns {sorted(unknown)}")
        self._claim(key)
        self._rows[key] = {
            **columns,
            "key": key,
            "source": source,
            "status": status,
            "error_stage": stage,
            "error": str(error),
        }

    def __len__(self) -> int:
        return len(self._rows)

    def table(self, offsets: dict[str, dict] | None = None) -> pd.DataFrame:
        """The parquet rows so far, sorted by key, with the fixed column types; with ``offsets`` (key ->
        ``OFFSET_COLUMNS``, from the tar) the offset columns too."""
        rows = [{**self._rows[k], **(offsets or {}).get(k, {})} for k in sorted(self._rows)]
        columns = {**PARQUET_COLUMNS, **(OFFSET_COLUMNS if offsets is not None else {})}
        return pd.DataFrame(rows, columns=list(columns)).astype(columns)

    def close(self) -> ShardStats:
        """Write tar, parquet, then stats (atomically, last). Returns the stats."""
        if self.closed:
            raise RuntimeError(f"shard {self.name} already written")
        members = []
        for key, (record, image, ext) in self._samples.items():
            members.append((f"{key}.{ext}", image))
            members.append((f"{key}.json", record.to_json_bytes()))
        tar_bytes = build_tar(members)
        self.fs.makedirs(self.root, exist_ok=True)
        # Tar and parquet are rewritten whole on a redo; only the stats file marks completion. Each file
        # is replaced atomically: a second writer of the same shard never leaves a half-written one.
        write_atomic(self.fs, join(self.root, f"{self.name}.tar"), tar_bytes)
        df = self.table(_offset_rows(tar_bytes))
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        write_atomic(self.fs, join(self.root, f"{self.name}.parquet"), buf.getvalue())
        failed = df[df.status != STATUS_OK]
        stats = ShardStats(
            shard=self.name,
            samples=len(self._samples),
            failures=int((df.status == STATUS_FAILED).sum()),
            filtered=int((df.status == STATUS_FILTERED).sum()),
            objects=sum(len(r.objects) for r, _, _ in self._samples.values()),
            failures_by_stage=dict(sorted(Counter(failed.error_stage.astype(str)).items())),
            tar_bytes=len(tar_bytes),
            tar_sha256=hashlib.sha256(tar_bytes).hexdigest(),
        )
        write_atomic(self.fs, join(self.root, f"{self.name}.stats.json"), dump_json(stats.__dict__))
        self.closed = True
        log.debug("wrote shard %s: %d samples, %d failures", self.name, stats.samples, stats.failures)
        return stats

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception nothing is written: without stats the shard stays incomplete and is redone.
        if exc_type is None and not self.closed:
            self.close()


class DatasetWriter:
    """Writes a stream of inputs as consecutive shards of ``shard_size`` inputs and counts them.

    Each input ends as exactly one ``add`` (a sample) or ``add_failure`` (a failed row); a new shard
    starts every ``shard_size`` inputs. ``close`` seals the last shard and rebuilds ``index.json``.
    The converters (from-coco, from-release, write_dataset) share it.
    """

    def __init__(self, dataset: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.dataset, self.shard_size = dataset, shard_size
        self.counts = {"samples": 0, "failures": 0, "shards": 0}
        self._inputs = 0
        self._shard: ShardWriter | None = None

    def _next_input(self) -> ShardWriter:
        if self._inputs % self.shard_size == 0:
            if self._shard is not None:
                self._shard.close()
            self._shard = ShardWriter(self.dataset, self._inputs // self.shard_size)
            self.counts["shards"] += 1
        self._inputs += 1
        return self._shard

    def add(self, record: SampleRecord, image: bytes, ext: str = "jpg") -> None:
        """The next input is a sample."""
        self._next_input().add(record, image, ext)
        self.counts["samples"] += 1

    def add_failure(self, key: str, source: str, stage: str, error: str) -> None:
        """The next input is a failed row."""
        self._next_input().add_failure(key, source, stage, error)
        self.counts["failures"] += 1

    def close(self) -> dict[str, int]:
        """Seal the last shard, rebuild the dataset index, return the counts."""
        if self._shard is not None and not self._shard.closed:
            self._shard.close()
        build_index(self.dataset)
        return dict(self.counts)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # As ShardWriter: on an exception the open shard stays incomplete (no stats) and is not indexed.
        if exc_type is None:
            self.close()

"""The stream's index of its datasets: every usable sample's byte range, its JSON checked and filtered once.

``build_index(config)`` lists each dataset's complete shards and finds each sample's byte range
(``shards.offsets.shard_spans``: the parquet's offsets, else one scan of the tar's headers; a tar whose
size differs from its stats file is not used). It then reads each sample's JSON record (one byte range
each, asked for concurrently on object stores and HTTP), checks it and applies the dataset's filters. The
samples that pass are the stream's, numbered dataset by dataset, shard by shard, in tar order; every other
one is counted by reason: ``error/corrupt_shard``, ``error/missing_member``, ``error/bad_json``,
``filtered/too_few_objects``, ``filtered/too_many_objects``. Each rank builds the same index (the JSON
bytes are about 1% of a shard's), once per loader.

A dataset on an HTTP server that ignores byte ranges (``python -m http.server``) has its tars copied
once, each with one streamed GET, into the folder ``scratch()`` returns (a temporary folder of the
loader's), and is read from there.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from shards.dataset import DatasetError, ShardInfo, list_shards, read_stats
from shards.offsets import local_copy, read_ranges, serves_ranges, shard_spans
from shards.schema import SampleRecord, SchemaError
from training.data.config import ConfigError, DatasetSpec, FilterConfig, StreamConfig
from training.data.examples import object_text

log = logging.getLogger(__name__)

_THREADS = 8  # shards indexed at once: object stores answer slowly, not heavily


def keep_objects(record: SampleRecord, f: FilterConfig) -> SampleRecord:
    """The record with only the objects that pass the object-level floors."""
    area = record.width * record.height

    def ok(o) -> bool:
        x1, y1, x2, y2 = o.box
        return (
            (f.min_clip_score is None or (o.clip_score is not None and o.clip_score >= f.min_clip_score))
            and (
                f.min_detector_score is None
                or (o.detector_score is not None and o.detector_score >= f.min_detector_score)
            )
            and len(object_text(o).split()) >= f.min_description_words
            and (x2 - x1) * (y2 - y1) >= f.min_box_area_frac * area
        )

    objects = tuple(o for o in record.objects if ok(o))
    return record if len(objects) == len(record.objects) else replace(record, objects=objects)


def filter_reason(record: SampleRecord, f: FilterConfig) -> str | None:
    """Why a record (its objects already filtered) is left out, as a counter key; None: it is kept."""
    n = len(record.objects)
    if n < f.min_objects:
        return "filtered/too_few_objects"
    if f.max_objects is not None and n > f.max_objects:
        return "filtered/too_many_objects"
    return None


def complete_shards(spec: DatasetSpec, index: int) -> list[ShardInfo]:
    """The complete shards (the stats file marks completion) of ``datasets[index]``.

    A dataset that does not exist or has no complete shard raises ConfigError naming the field.
    """
    where = f"datasets[{index}].path: dataset {spec.path!r}"
    try:
        shards = [s for s in list_shards(spec.path) if s.complete and s.has_tar]
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist") from None
    except OSError as e:
        raise ConfigError(f"{where} cannot be listed: {e}") from None
    if not shards:
        raise ConfigError(f"{where} has no complete shard (NNNNNN.tar with NNNNNN.stats.json)")
    return shards


@dataclass(frozen=True)
class ShardEntry:
    """The usable samples of one shard: where to read them, and what was left out."""

    url: str  # the tar the ranges refer to (a local copy for an HTTP server without byte ranges)
    start: np.ndarray  # int64 per usable sample, in tar order
    end: np.ndarray
    found: int  # samples in the tar, usable or not
    counts: Counter  # left out, by reason
    first_problem: dict[str, str]  # reason -> one message, for the log


def index_shard(spec: DatasetSpec, shard: ShardInfo, read_url: str | None = None) -> ShardEntry:
    """One shard's entry: its spans, each sample's JSON read, checked and filtered."""
    counts: Counter = Counter()
    first: dict[str, str] = {}

    def left_out(reason: str, message: str) -> None:
        counts[reason] += 1
        first.setdefault(reason, message)

    z = np.zeros(0, dtype=np.int64)
    try:
        stats = read_stats(spec.path, shard)
    except (OSError, DatasetError) as e:
        left_out("error/corrupt_shard", f"{shard.stats}: {e}")
        return ShardEntry(read_url or shard.tar, z, z, 0, counts, first)
    spans = shard_spans(shard, stats, read_url)
    for reason, message in spans.problems:
        left_out(f"error/{reason}", message)
    keep = np.zeros(len(spans), dtype=bool)
    datas = read_ranges(spans.url, spans.json_start, spans.json_end) if len(spans) else []
    for i, (key, data) in enumerate(zip(spans.keys, datas, strict=True)):
        where = f"{shard.tar} key {key!r}"
        if isinstance(data, Exception):
            left_out("error/corrupt_shard", f"{where}: JSON unreadable: {data}")
            continue
        try:
            record = SampleRecord.from_json_bytes(data, where=where)
        except SchemaError as e:
            left_out("error/bad_json", str(e))
            continue
        if record.key != key:
            left_out("error/bad_json", f"{where}: field 'key' is {record.key!r}, not its member name's")
            continue
        reason = filter_reason(keep_objects(record, spec.filters), spec.filters)
        if reason:
            counts[reason] += 1
        else:
            keep[i] = True
    return ShardEntry(spans.url, spans.start[keep], spans.end[keep], len(spans), counts, first)


@dataclass(frozen=True)
class StreamIndex:
    """The usable samples of every dataset (module doc); sample ids run over ``start``/``end``."""

    urls: tuple[str, ...]  # per shard, all datasets in order
    shard_sizes: tuple[int, ...]  # usable samples per shard
    dataset_shards: tuple[int, ...]  # shards per dataset
    start: np.ndarray  # int64 per sample id: its byte range in its shard's tar
    end: np.ndarray
    shard_first: np.ndarray  # per shard, its first sample id
    counts: dict[str, int]  # left out when indexing, by reason (every rank finds the same)
    identity: tuple  # what a resume must find unchanged: per shard its URL, samples found and usable

    def locate(self, ids: np.ndarray) -> np.ndarray:
        """The shard of each sample id."""
        return np.searchsorted(self.shard_first, ids, side="right") - 1


def build_index(config: StreamConfig, scratch: Callable[[], str]) -> StreamIndex:
    """The index of ``config``'s datasets (module doc); a dataset without a usable sample is a ConfigError."""
    shards = [complete_shards(d, i) for i, d in enumerate(config.datasets)]
    jobs = []
    for i, (spec, listed) in enumerate(zip(config.datasets, shards, strict=True)):
        folder = None
        if not serves_ranges(listed[0].tar):
            log.warning("dataset %r: its server ignores byte ranges; copying its %d tars once", spec.path, len(listed))
            folder = scratch()
        jobs += [(i, spec, s, folder) for s in listed]

    def run(job) -> ShardEntry:
        i, spec, s, folder = job
        return index_shard(spec, s, local_copy(s.tar, folder, f"{i}-{s.name}.tar") if folder else None)

    with ThreadPoolExecutor(max_workers=min(_THREADS, len(jobs))) as pool:
        entries = list(pool.map(run, jobs))
    counts: Counter = Counter()
    for i, spec in enumerate(config.datasets):
        mine = [e for job, e in zip(jobs, entries, strict=True) if job[0] == i]
        lost: Counter = sum((e.counts for e in mine), Counter())
        counts += lost
        usable = sum(len(e.start) for e in mine)
        log.info("dataset %r: %d samples in %d shards, %d usable; left out: %s",
                 spec.path, sum(e.found for e in mine), len(mine), usable, dict(sorted(lost.items())) or "none")
        for reason, message in sorted({k: v for e in mine for k, v in e.first_problem.items()}.items()):
            log.warning("dataset %r: %d left out (%s), for example: %s", spec.path, lost[reason], reason, message)
        if not usable:
            raise ConfigError(
                f"datasets[{i}].path: dataset {spec.path!r} has no usable sample (left out: "
                f"{dict(sorted(lost.items())) or 'none'}); check the filters and the shards (`python -m shards validate`)"
            )
    sizes = [len(e.start) for e in entries]
    return StreamIndex(
        urls=tuple(e.url for e in entries),
        shard_sizes=tuple(sizes),
        dataset_shards=tuple(len(s) for s in shards),
        start=np.concatenate([e.start for e in entries]),
        end=np.concatenate([e.end for e in entries]),
        shard_first=np.cumsum([0, *sizes])[:-1],
        counts=dict(sorted(counts.items())),
        identity=tuple((job[2].tar, e.found, len(e.start)) for job, e in zip(jobs, entries, strict=True)),
    )

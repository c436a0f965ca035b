"""The stream's index of its datasets: every usable sample's byte range, its JSON checked and filtered once.

``build_index(config)`` lists each dataset's complete shards and finds each sample's byte range
(``shards.offsets.shard_spans``: the parquet's offsets, else one scan of the tar's headers; a tar whose
size differs from its stats file is not used). It then reads each sample's JSON record (one byte range
each, asked for concurrently on object stores and HTTP), checks it and applies the dataset's filters. The
samples that pass are the stream's, numbered dataset by dataset, shard by shard, in tar order; every other
one is counted by reason: ``error/corrupt_shard``, ``error/missing_member``, ``error/bad_json``,
``filtered/too_few_objects``, ``filtered/too_many_objects``.

``shared_index(config)`` is what the loader calls, once per loader, in the process that builds it (not in
its DataLoader workers, which receive the index with their dataset). When ``torch.distributed`` is
initialized with more than one process and this loader is that process's rank, the index is built once per
job, not once per rank: rank 0 builds it and broadcasts it (``StreamIndex.to_bytes``: numpy arrays and a
JSON header in an npz, nothing unpickled) to the other ranks, which read no JSON range at all (a 1M-sample
dataset on S3 with 16 ranks: 1M range GETs at start-up instead of 16M). Every rank must then build its loader
(it is a collective). A build that fails on rank 0 raises the same error (type and message) on every rank;
while rank 0 works, it broadcasts a heartbeat every ``HEARTBEAT_S`` seconds so that no collective waits near
the process group's timeout (NCCL's default is 10 minutes). Without a process group, or with one of one
process, each loader builds its own. With a cache folder (``build_loader(index_cache=...)``), the index
is kept there for the next start (``training.data.index_cache``: keyed by the shards and filters, checked
before it is trusted).

A dataset on an HTTP server that ignores byte ranges (``python -m http.server``) has its tars copied
once, each with one streamed GET, into the folder ``scratch()`` returns (a temporary folder of the
loader's), and is read from there; with a shared index each rank copies them into its own folder (a rank
on another node cannot read rank 0's).
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

import numpy as np

from shards.dataset import DatasetError, ShardInfo, list_shards, read_stats
from shards.offsets import local_copy, read_ranges, serves_ranges, shard_spans
from shards.schema import SampleRecord, SchemaError
from training.data.config import ConfigError, DatasetSpec, FilterConfig, StreamConfig
from training.data.examples import object_text
from training.data.index_cache import index_key, read_cached, write_cached

log = logging.getLogger(__name__)

_THREADS = 8  # shards indexed at once: object stores answer slowly, not heavily
HEARTBEAT_S = 30.0  # while rank 0 builds a shared index: seconds between its "still working" broadcasts
_FORMAT = 1  # of StreamIndex.to_bytes


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

    def to_bytes(self) -> bytes:
        """The index as an npz: its arrays, and its strings and counters as one JSON header array."""
        header = {"format": _FORMAT, "urls": list(self.urls), "counts": self.counts,
                  "tars": [tar for tar, _, _ in self.identity]}
        buf = io.BytesIO()
        np.savez(
            buf,
            header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            shard_sizes=np.asarray(self.shard_sizes, dtype=np.int64),
            dataset_shards=np.asarray(self.dataset_shards, dtype=np.int64),
            start=self.start,
            end=self.end,
            shard_first=self.shard_first,
            found=np.asarray([found for _, found, _ in self.identity], dtype=np.int64),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> StreamIndex:
        """The index ``to_bytes`` wrote; ValueError when ``data`` is not one (checked, never unpickled)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
            header = json.loads(a["header"].tobytes())
            if header.get("format") != _FORMAT:
                raise ValueError(f"format {header.get('format')!r}, expected {_FORMAT}")
            sizes = [int(n) for n in a["shard_sizes"]]
            urls, tars, found = header["urls"], header["tars"], [int(n) for n in a["found"]]
            index = cls(
                urls=tuple(str(u) for u in urls),
                shard_sizes=tuple(sizes),
                dataset_shards=tuple(int(n) for n in a["dataset_shards"]),
                start=a["start"],
                end=a["end"],
                shard_first=a["shard_first"],
                counts={str(k): int(v) for k, v in header["counts"].items()},
                identity=tuple((str(t), f, n) for t, f, n in zip(tars, found, sizes, strict=True)),
            )
            if any(a[k].dtype != np.int64 or a[k].ndim != 1 for k in a if k != "header"):
                raise ValueError("its arrays are not one-dimensional int64")
        except (KeyError, TypeError, AttributeError, OSError, zipfile.BadZipFile, ValueError) as e:
            raise ValueError(f"not a stream index: {type(e).__name__}: {e}") from None
        # Consistency, so that a damaged index fails here rather than as wrong byte ranges later.
        n = len(index.urls)
        if not (len(tars) == len(index.shard_first) == n == sum(index.dataset_shards)
                and len(index.start) == len(index.end) == sum(sizes)
                and index.shard_first.tolist() == np.cumsum([0, *sizes])[:-1].tolist()):
            raise ValueError("not a stream index: its shard and sample counts disagree")
        return index


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


def cached_index(config: StreamConfig, scratch: Callable[[], str], cache: str | None) -> StreamIndex:
    """``build_index``, or with a ``cache`` folder the index stored there for these datasets, shards and
    filters (``training.data.index_cache``), else built and stored there."""
    if cache is None:
        return build_index(config, scratch)
    key = index_key(config, [complete_shards(d, i) for i, d in enumerate(config.datasets)], _FORMAT)
    data = read_cached(cache, key)
    if data is not None:
        try:
            index = StreamIndex.from_bytes(data)
        except ValueError as e:
            log.warning("stream index cache in %s for key %s: %s; building the index again", cache, key, e)
        else:
            log.info("stream index: %d samples from the cache in %s", len(index.start), cache)
            return _own_copies(index, scratch)
    index = build_index(config, scratch)
    write_cached(cache, key, index.to_bytes())
    return index


def shared_index(
    config: StreamConfig, scratch: Callable[[], str], rank: int, world_size: int, cache: str | None = None
) -> StreamIndex:
    """``cached_index`` once per job: on rank 0, broadcast to the other ranks of the default process group
    (module doc); the loader of ``rank`` of ``world_size`` calls it. Without such a group, cached_index."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and (rank, world_size) == (dist.get_rank(), dist.get_world_size())):
        return cached_index(config, scratch, cache)
    # NCCL moves CUDA tensors only; gloo (and a "cpu:gloo,cuda:nccl" group) moves CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def send(status: int, payload: bytes = b"") -> None:
        dist.broadcast(torch.tensor([status, len(payload)], dtype=torch.int64, device=device), src=0)
        if payload:
            dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device), src=0)

    if rank == 0:
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(cached_index, config, scratch, cache)
            while not wait([future], timeout=HEARTBEAT_S).done:
                send(_WORKING)
        error = future.exception()
        if error is None:
            index = future.result()
            send(_BUILT, index.to_bytes())
            return index
        kind = next((name for name, cls in _SENT_ERRORS.items() if isinstance(error, cls)), None)
        message = str(error) if kind else f"rank 0 could not build the stream index: {type(error).__name__}: {error}"
        send(_FAILED, json.dumps({"type": kind or "RuntimeError", "message": message}).encode())
        raise error
    while True:
        head = torch.zeros(2, dtype=torch.int64, device=device)
        dist.broadcast(head, src=0)
        status, length = head.tolist()
        if status != _WORKING:
            break
    data = torch.empty(length, dtype=torch.uint8, device=device)
    if length:
        dist.broadcast(data, src=0)
    payload = data.cpu().numpy().tobytes()
    if status == _FAILED:
        sent = json.loads(payload)
        raise _SENT_ERRORS.get(sent["type"], RuntimeError)(sent["message"])
    return _own_copies(StreamIndex.from_bytes(payload), scratch)


_WORKING, _BUILT, _FAILED = 0, 1, 2  # rank 0's status broadcasts
# The errors of a failed build that every rank raises as rank 0 did (the trainer reports them as config errors).
_SENT_ERRORS = {"ConfigError": ConfigError, "ValueError": ValueError, "OSError": OSError}


def _own_copies(index: StreamIndex, scratch: Callable[[], str]) -> StreamIndex:
    """``index`` (rank 0's) with rank 0's local copies of tars (a shard whose URL is not its tar's) replaced
    by this rank's own."""
    copied = [i for i, (url, (tar, _, _)) in enumerate(zip(index.urls, index.identity, strict=True)) if url != tar]
    if not copied:
        return index
    log.warning("%d tars on a server that ignores byte ranges: copying them once on this rank too", len(copied))
    folder = scratch()
    with ThreadPoolExecutor(max_workers=min(_THREADS, len(copied))) as pool:
        paths = list(pool.map(
            lambda i: local_copy(index.identity[i][0], folder, os.path.basename(index.urls[i])), copied))
    urls = list(index.urls)
    for i, path in zip(copied, paths, strict=True):
        urls[i] = path
    return replace(index, urls=tuple(urls))

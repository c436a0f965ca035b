"""Stream shards into training batches: split, shuffle, mix, decode, augment, reorganize, collate.

The trainer's side::

    loader = build_loader(config, rank, world_size)          # a StreamLoader
    loader.load_state_dict(saved)                             # optional, on resume
    while loader.epoch < epochs:
        for batch in loader:                                  # len(loader) batches, the same on every rank
            ...
            state = loader.state_dict()                       # with the checkpoint (see merge_states)
        log(loader.counters())                                # errors by reason, filtered samples

Each DataLoader worker runs these stages (open_clip's ``get_wds_dataset``, as small generators)::

    per dataset:  worker_shard_passes -> read_shards -> parse_samples -> filter_samples -> shuffle
    then:         mix -> enumerate -> skip (resume) -> examples (decode, augment, reorganize) -> batches

Determinism. Every random choice comes from a generator seeded by (seed, epoch, rank, worker, ...):
the shard order and split, each dataset's shuffle buffer, the mixture draws, and per sample (keyed by
its position in the worker's mixed stream) the crop, flip, K-object draw and region sampling. The same
config, world size and worker count give the same batches, run after run.

Epochs have a fixed length: ``epoch_samples // (world_size * workers * batch_size)`` batches per
worker, so every rank yields exactly ``len(loader)`` batches and no DDP rank waits for another. A
worker whose shards run out before that starts another pass over a freshly drawn shard subset; in
resampled mode the shards are drawn with replacement and never run out.

Split (non-resampled mode). Each pass, every rank shuffles the shard list with the same seed and
worker ``g = rank * workers + worker`` takes shards ``g, g + n, g + 2n, ...`` (``n`` workers in all),
so the workers' shards are disjoint and together cover the dataset once. When every worker's share
holds exactly its batches' worth of samples, the epoch yields every sample exactly once.

Errors. A shard that cannot be read, a member missing its pair, a bad JSON record, an undecodable
image or a size mismatch is counted by reason (``loader.counters()``), logged at most once per
``log_interval_s`` per reason and worker, and skipped. ``max_consecutive_errors`` failures in a row
(a bug, not bad data), or a worker whose shards yield no usable sample at all, raise.

Resumption guarantee. ``state_dict()`` records, per rank and per worker, how far into its mixed
stream the last batch handed to the trainer reached (prefetched batches do not count). Loaded into a
loader with the same config, shard list, world size, worker count and batch size, over unchanged shard
files and the same numpy / Pillow / torch versions, it continues with exactly the batch that would have
come next, batch N+1 after N, on every rank, and then the same batches as an uninterrupted run: nothing
is replayed or skipped, whatever was filtered or failed before. This holds in both modes (resampled or
not), within and across epochs, with ``num_workers`` 0 and 1 interchangeable, and also when the trainer
stops iterating mid-epoch and iterates again in the same process; ``counters()`` continue as if
uninterrupted too. How: a batch's position depends only on deterministic reading, parsing and
filtering, so a resumed worker skips (reads and parses, but does not decode) the samples before its
position, and the physical workers are rotated so the DataLoader's round-robin starts with the worker
that owes batch N+1. With another world size, worker count, batch size, config or shard list the state
cannot be mapped exactly: ``load_state_dict`` raises, or with ``strict=False`` starts the next epoch
(the rest of the interrupted epoch is skipped). Each rank's state is its own; ``merge_states`` gathers
them into one checkpoint entry. Not covered: a shard file rewritten in place under the same name.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.dataset import list_shards, read_stats
from shards.reader import RawSample, Sample, raw_samples, to_sample
from shards.schema import SampleRecord, SchemaError

from .augment import augment
from .collate import Example, collate, normalize_pixels
from .data_config import ConfigError, DatasetSpec, FilterConfig, StreamConfig
from .regions import reorganize_regions

log = logging.getLogger(__name__)

STATE_VERSION = 1
_META = "__stream__"  # batch entry that carries the worker's position and counters to the main process

# Purposes mixed into seeds so that no two generators share a stream.
_SHARDS, _SHUFFLE, _MIX, _SAMPLE, _RESAMPLE = range(5)


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers, independent of PYTHONHASHSEED (unlike ``hash``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


# ---------------------------------------------------------------------------------------------------
# Error policy


class ErrorPolicy:
    """Counts skipped samples by reason, logs at a limited rate, and stops on a run of failures.

    The counters are plain ``Counter`` keys: ``error/<reason>``, ``filtered/<reason>`` and
    ``augment/flip_refused``; they travel to the main process with each batch.
    """

    def __init__(self, log_interval_s: float, max_consecutive: int, where: str = ""):
        self.counts: Counter = Counter()
        self.log_interval_s = log_interval_s
        self.max_consecutive = max_consecutive
        self.where = where
        self._consecutive = 0
        self._last_log: dict[str, float] = {}
        self._unlogged: Counter = Counter()
        self._mark: Counter = Counter()

    def error(self, reason: str, exn: BaseException) -> None:
        """Count and maybe log one failure; raise when too many fail in a row."""
        self.counts[f"error/{reason}"] += 1
        self._consecutive += 1
        now = time.monotonic()
        if now - self._last_log.get(reason, -math.inf) >= self.log_interval_s:
            log.warning(
                "%sskipped (%s, %d so far, %d not logged): %s",
                self.where,
                reason,
                self.counts[f"error/{reason}"],
                self._unlogged[reason],
                exn,
            )
            self._last_log[reason] = now
            self._unlogged[reason] = 0
        else:
            self._unlogged[reason] += 1
        if self._consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.where}{self._consecutive} samples failed in a row (last: {reason}: {exn}); "
                "this is a bug or an unreadable dataset, not a few bad samples"
            ) from exn

    def handler(self, reason: str, stop: bool = False) -> Callable[[Exception], bool]:
        """A webdataset-style handler: count the exception under ``reason``, then continue or stop."""

        def handle(exn: Exception) -> bool:
            self.error(reason, exn)
            return not stop

        return handle

    def success(self) -> None:
        """A sample made it through: the run of failures is over."""
        self._consecutive = 0

    def mark(self) -> None:
        """Start counting afresh for ``since_mark`` (after a resumed worker skipped its replay)."""
        self._mark = self.counts.copy()

    def since_mark(self) -> dict[str, int]:
        """Counts since ``mark``."""
        return dict(self.counts - self._mark)

    def note(self, key: str) -> None:
        """Count an event that is not an error (a filtered sample, a refused flip)."""
        self.counts[key] += 1


# ---------------------------------------------------------------------------------------------------
# Shard lists


def dataset_urls(spec: DatasetSpec) -> list[str]:
    """The tar URLs of a dataset's complete shards (the stats file marks completion)."""
    urls = [s.tar for s in list_shards(spec.path) if s.complete and s.has_tar]
    if not urls:
        raise ConfigError(f"dataset {spec.path!r} has no complete shard (NNNNNN.tar with NNNNNN.stats.json)")
    return urls


def dataset_size(spec: DatasetSpec) -> int:
    """Samples in a dataset's complete shards, from their stats files."""
    return sum(
        read_stats(spec.path, s)["samples"] for s in list_shards(spec.path) if s.complete and s.has_tar
    )


def split_shards(
    urls: list[str], seed: int, rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """This worker's disjoint share of a shard list shuffled identically on every rank with ``seed``."""
    order = list(urls)
    random.Random(seed).shuffle(order)
    return order[rank * num_workers + worker :: world_size * num_workers]


# ---------------------------------------------------------------------------------------------------
# Worker stages: each takes an iterator and returns one.


@dataclass(frozen=True)
class WorkerContext:
    """Who this worker is and where its stream starts."""

    seed: int
    epoch: int
    rank: int
    world_size: int
    worker: int  # logical worker id (see StreamLoader: rotated on resume)
    num_workers: int
    start: int  # position in the mixed stream to resume from
    batches: int  # batches to yield

    def seed_for(self, purpose: int, *parts: int) -> int:
        """The seed of one generator of this worker in this epoch."""
        return derive_seed(self.seed, purpose, self.epoch, self.rank, self.worker, *parts)

    @property
    def name(self) -> str:
        return f"rank {self.rank} worker {self.worker}: "


def worker_shard_passes(
    urls: list[str], ds: int, ctx: WorkerContext, resampled: bool
) -> Iterator[tuple[int, Iterator[str]]]:
    """Endless passes ``(pass, shard URLs)``: disjoint shares, or one endless draw with replacement."""
    if resampled:
        rng = random.Random(ctx.seed_for(_RESAMPLE, ds))
        yield 0, (rng.choice(urls) for _ in itertools.count())
        return
    for p in itertools.count():
        # Not ctx.seed_for: the order must be the same on every rank and worker for the split to be disjoint.
        order_seed = derive_seed(ctx.seed, _SHARDS, ctx.epoch, ds, p)
        share = split_shards(urls, order_seed, ctx.rank, ctx.world_size, ctx.worker, ctx.num_workers)
        yield p, iter(share)


def read_shards(urls: Iterable[str], policy: ErrorPolicy) -> Iterator[RawSample]:
    """Raw samples from each tar in turn; a shard that fails to open or breaks mid-stream is counted.

    The samples read before the fault are kept: the tar stream is broken only past it.
    """
    return raw_samples(urls, on_error=lambda exn: policy.error("corrupt_shard", exn))


def parse_samples(raws: Iterable[RawSample], policy: ErrorPolicy) -> Iterator[Sample]:
    """Validated records with their (still encoded) image; pairs with a member missing are counted."""
    for raw in raws:
        try:
            sample = to_sample(raw)
        except KeyError as exn:
            policy.error("missing_member", exn)
            continue
        except SchemaError as exn:
            policy.error("bad_json", exn)
            continue
        policy.success()
        yield sample


def _object_text(o) -> str:
    return o.description if o.description else o.phrase


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
            and len(_object_text(o).split()) >= f.min_description_words
            and (x2 - x1) * (y2 - y1) >= f.min_box_area_frac * area
        )

    objects = tuple(o for o in record.objects if ok(o))
    return record if len(objects) == len(record.objects) else replace(record, objects=objects)


def filter_samples(samples: Iterable[Sample], f: FilterConfig, policy: ErrorPolicy) -> Iterator[Sample]:
    """Drop objects below the floors, then samples with too few or too many objects left."""
    for s in samples:
        record = keep_objects(s.record, f)
        n = len(record.objects)
        if n < f.min_objects:
            policy.note("filtered/too_few_objects")
        elif f.max_objects is not None and n > f.max_objects:
            policy.note("filtered/too_many_objects")
        else:
            yield s if record is s.record else replace(s, record=record)


class ShardProgress:
    """Raises when ``limit`` shards in a row give no usable sample, instead of looping forever."""

    def __init__(self, limit: int, what: str):
        self.limit = limit
        self.what = what
        self.since_sample = 0

    def shards(self, urls: Iterable[str]) -> Iterator[str]:
        """Pass the URLs through, counting them."""
        for url in urls:
            self.since_sample += 1
            if self.since_sample > self.limit:
                raise RuntimeError(
                    f"{self.what}: {self.limit} shards in a row gave no usable sample; check the filters "
                    "and the shards (`python -m shards validate`)"
                )
            yield url

    def samples(self, samples: Iterable[Sample]) -> Iterator[Sample]:
        """Pass the samples through; each one resets the count."""
        for s in samples:
            self.since_sample = 0
            yield s


def dataset_stream(
    ds: int, spec: DatasetSpec, urls: list[str], cfg: StreamConfig, ctx: WorkerContext, policy: ErrorPolicy
) -> Iterator[Sample]:
    """One dataset's endless, filtered, shuffled samples for this worker."""
    progress = ShardProgress(3 * len(urls) + 10 if cfg.resampled else len(urls), f"{ctx.name}{spec.path!r}")
    for p, shard_urls in worker_shard_passes(urls, ds, ctx, cfg.resampled):
        stream = read_shards(progress.shards(shard_urls), policy)
        stream = parse_samples(stream, policy)
        stream = filter_samples(stream, spec.filters, policy)
        stream = progress.samples(stream)
        if cfg.shuffle_buffer > 0:
            # Shuffled within a pass, so the buffer drains at the pass's end and no sample of the next
            # pass overtakes one of this pass (which would break "every sample once per epoch").
            rng = random.Random(ctx.seed_for(_SHUFFLE, ds, p))
            stream = wds.filters.shuffle(cfg.shuffle_buffer, cfg.shuffle_initial, rng=rng)(stream)
        yield from stream


def mix(
    streams: list[Iterator[Sample]], weights: list[float], rng: np.random.Generator
) -> Iterator[tuple[int, Sample]]:
    """``(dataset index, sample)`` drawn from the streams in proportion to ``weights``."""
    p = np.asarray(weights, dtype=np.float64) / sum(weights)
    while True:
        # Drawn in blocks: one rng.choice per sample would cost more than the rest of this stage.
        for i in rng.choice(len(streams), size=1024, p=p):
            yield int(i), next(streams[i])


def pick_caption(record: SampleRecord, spec: DatasetSpec, rng: np.random.Generator) -> str:
    """The global caption: one of ``meta["captions"]`` (COCO keeps all five), else the chosen field."""
    captions = record.meta.get("captions")
    if isinstance(captions, list) and captions:
        return str(captions[int(rng.integers(len(captions)))])
    first, second = (
        (record.caption, record.source_caption)
        if spec.caption == "caption"
        else (record.source_caption, record.caption)
    )
    return first or second or ""


class SizeMismatch(ValueError):
    """The decoded image's size disagrees with the record's, so its boxes cannot be trusted."""


def make_example(sample: Sample, spec: DatasetSpec, cfg: StreamConfig, rng: np.random.Generator) -> Example:
    """Decode, augment and reorganize one sample with its own generator."""
    rec = sample.record
    image = Image.open(io.BytesIO(sample.image_bytes))
    if image.size != (rec.width, rec.height):
        raise SizeMismatch(
            f"{sample.url} key {rec.key!r}: image is {image.size[0]}x{image.size[1]}, "
            f"the record says {rec.width}x{rec.height}"
        )
    r = cfg.regions
    # Sampling K objects here (with the sample's generator) makes reorganization's own cap a no-op.
    k = min(spec.augment.max_objects or r.max_objs, r.max_objs)
    aug = augment(
        image,
        np.array([o.box for o in rec.objects], dtype=np.float64).reshape(-1, 4),
        [_object_text(o) for o in rec.objects],
        pick_caption(rec, spec, rng),
        replace(spec.augment, max_objects=k),
        rng,
        original_size=(rec.original_height, rec.original_width),
        masks=[o.mask for o in rec.objects] if spec.augment.masks else None,
    )
    layout = reorganize_regions(
        aug.boxes,
        aug.texts,
        *aug.target_size,
        max_objs=r.max_objs,
        max_regions=r.max_regions,
        max_slots=r.max_slots,
        rng=rng,
    )
    return Example(key=rec.key, aug=aug, layout=layout)


_DECODE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


def skip(items: Iterable, n: int, policy: ErrorPolicy) -> Iterator:
    """Drop the first ``n`` items (read and parsed, never decoded), then mark the counters.

    The counts up to the mark were reported by the run that produced the skipped batches, so batches
    from here on report only what follows.
    """
    it = iter(items)
    for _ in itertools.islice(it, n):
        pass
    policy.mark()
    yield from it


def examples(
    items: Iterable[tuple[int, int, Sample]], cfg: StreamConfig, ctx: WorkerContext, policy: ErrorPolicy
) -> Iterator[tuple[int, Example]]:
    """``(position, Example)`` for each ``(position, dataset, sample)``; failures are counted and skipped."""
    for pos, ds, sample in items:
        rng = np.random.default_rng(ctx.seed_for(_SAMPLE, pos))
        try:
            ex = make_example(sample, cfg.datasets[ds], cfg, rng)
        except SizeMismatch as exn:
            policy.error("size_mismatch", exn)
            continue
        except _DECODE_ERRORS as exn:
            policy.error("undecodable_image", RuntimeError(f"{sample.url} key {sample.record.key!r}: {exn}"))
            continue
        except Exception as exn:  # noqa: BLE001  counted; a systematic bug trips max_consecutive_errors
            policy.error("augment_error", RuntimeError(f"{sample.url} key {sample.record.key!r}: {exn!r}"))
            continue
        policy.success()
        if ex.aug.flip_refused:
            policy.note("augment/flip_refused")
        yield pos, ex


def batches(
    items: Iterable[tuple[int, Example]], cfg: StreamConfig, ctx: WorkerContext, policy: ErrorPolicy
) -> Iterator[dict]:
    """``ctx.batches`` collated batches, each tagged with the worker, its stream position and counters."""
    items = iter(items)
    for _ in range(ctx.batches):
        chunk = list(itertools.islice(items, cfg.batch_size))
        batch = collate([ex for _, ex in chunk], cfg.regions.max_slots, cfg.regions.max_objs)
        batch[_META] = {
            "worker": ctx.worker,
            "position": chunk[-1][0] + 1,
            "counts": policy.since_mark(),
        }
        yield batch


def worker_batches(cfg: StreamConfig, urls: list[list[str]], ctx: WorkerContext) -> Iterator[dict]:
    """The whole pipeline of one worker, as a list of stages."""
    policy = ErrorPolicy(cfg.log_interval_s, cfg.max_consecutive_errors, ctx.name)
    sources = [dataset_stream(i, spec, urls[i], cfg, ctx, policy) for i, spec in enumerate(cfg.datasets)]
    stream = mix(sources, [d.weight for d in cfg.datasets], np.random.default_rng(ctx.seed_for(_MIX)))
    stream = ((pos, ds, s) for pos, (ds, s) in enumerate(stream))
    stream = skip(stream, ctx.start, policy)
    stream = examples(stream, cfg, ctx, policy)
    return batches(stream, cfg, ctx, policy)


# ---------------------------------------------------------------------------------------------------
# The DataLoader side: one epoch's plan, the workers' dataset, and the stateful loader


@dataclass(frozen=True)
class EpochPlan:
    """What every worker of one rank needs to run (or resume) an epoch."""

    epoch: int
    rank: int
    world_size: int
    workers: int  # logical workers, >= 1 (num_workers=0 runs one in the main process)
    batches_per_worker: int
    starts: tuple[int, ...]  # per logical worker, position in its mixed stream to resume from
    done: tuple[int, ...]  # per logical worker, batches already delivered this epoch
    rotation: int  # physical worker p plays logical worker (p + rotation) % workers


class EpochStream(IterableDataset):
    """The IterableDataset the DataLoader's workers iterate: one epoch of batches per worker."""

    def __init__(self, cfg: StreamConfig, urls: list[list[str]], plan: EpochPlan):
        super().__init__()
        self.cfg, self.urls, self.plan = cfg, urls, plan

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        p = self.plan
        worker = ((info.id if info else 0) + p.rotation) % p.workers
        ctx = WorkerContext(
            seed=self.cfg.seed,
            epoch=p.epoch,
            rank=p.rank,
            world_size=p.world_size,
            worker=worker,
            num_workers=p.workers,
            start=p.starts[worker],
            batches=p.batches_per_worker - p.done[worker],
        )
        return worker_batches(self.cfg, self.urls, ctx)


# Fields that change how the stream is logged or moved, not which batches it yields.
_NOT_IN_FINGERPRINT = (
    "num_workers",
    "log_interval_s",
    "max_consecutive_errors",
    "prefetch_factor",
    "pin_memory",
)


class StreamLoader:
    """Fixed-length epochs of collated batches for one rank, with a resumable state.

    Iterating yields the rest of the current epoch (``len(self)`` batches in all, the same on every
    rank) and then moves ``epoch`` on. Batch ``i`` of an epoch comes from logical worker ``i % W``.
    After ``load_state_dict`` the physical workers are rotated so that the first batch comes from the
    worker that owes batch ``N``, which is how the continuation is exact (see the module docstring).
    """

    def __init__(self, config: StreamConfig, rank: int = 0, world_size: int = 1, epoch: int = 0):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.workers = max(1, config.num_workers)
        self.urls = [dataset_urls(d) for d in config.datasets]
        total = world_size * self.workers
        if not config.resampled:
            for spec, urls in zip(config.datasets, self.urls, strict=True):
                if len(urls) < total:
                    raise ConfigError(
                        f"dataset {spec.path!r} has {len(urls)} shards for {total} workers "
                        f"({world_size} ranks x {self.workers}): use resampled mode, fewer workers, or more shards"
                    )
        epoch_samples = config.epoch_samples or sum(dataset_size(d) for d in config.datasets)
        self.batches_per_worker = epoch_samples // (total * config.batch_size)
        if self.batches_per_worker < 1:
            raise ConfigError(
                f"epoch_samples={epoch_samples} is less than one batch of {config.batch_size} per worker "
                f"({total} workers)"
            )
        cfg = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
        ident = {
            "config": cfg,
            "world_size": world_size,
            "workers": self.workers,
            "urls": self.urls,
            "batches_per_worker": self.batches_per_worker,
        }
        self.fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        self._finished: Counter = Counter()  # counts of completed epochs (and restored ones)
        self.epoch = epoch
        self._start_epoch(epoch)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.batches_per_worker * self.workers

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches = 0  # delivered to the trainer in this epoch
        self._positions = [0] * self.workers
        self._epoch_counts = [Counter() for _ in range(self.workers)]  # from earlier DataLoaders
        self._live = [Counter() for _ in range(self.workers)]  # from the current DataLoader

    def _next_epoch(self) -> None:
        self._finished.update(self._current_counts())
        self._start_epoch(self.epoch + 1)

    def _current_counts(self) -> Counter:
        total = Counter()
        for c in itertools.chain(self._epoch_counts, self._live):
            total.update(c)
        return total

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless it is already the current one (resumed or not)."""
        if epoch != self.epoch:
            self._finished.update(self._current_counts())
            self._start_epoch(epoch)

    def counters(self) -> dict[str, int]:
        """Skipped samples by reason since training began, for the trainer's logs.

        Keys: ``error/<reason>`` (corrupt_shard, missing_member, bad_json, undecodable_image,
        size_mismatch, augment_error), ``filtered/<reason>`` and ``augment/flip_refused``. They count
        what the workers met up to the last batch handed out, prefetching aside, and survive resumption.
        """
        return dict(sorted((self._finished + self._current_counts()).items()))

    def _plan(self) -> EpochPlan:
        n, w = self.batches, self.workers
        return EpochPlan(
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            workers=w,
            batches_per_worker=self.batches_per_worker,
            starts=tuple(self._positions),
            done=tuple(n // w + (1 if i < n % w else 0) for i in range(w)),
            rotation=n % w,
        )

    def __iter__(self) -> Iterator[dict]:
        if self.batches >= len(self):
            self._next_epoch()
        for i in range(self.workers):
            self._epoch_counts[i].update(self._live[i])
            self._live[i] = Counter()
        cfg = self.config
        loader = DataLoader(
            EpochStream(cfg, self.urls, self._plan()),
            batch_size=None,
            num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
            pin_memory=cfg.pin_memory,
        )
        for batch in loader:
            meta = batch.pop(_META)
            worker = meta["worker"]
            if worker != self.batches % self.workers:
                raise RuntimeError(
                    f"batch {self.batches} came from worker {worker}, expected {self.batches % self.workers}: "
                    "the DataLoader must return batches in order (in_order=True)"
                )
            self._positions[worker] = meta["position"]
            self._live[worker] = Counter(meta["counts"])
            self.batches += 1
            if cfg.pixel_format == "float":
                # Here rather than in the workers: uint8 crosses shared memory at a quarter of the bytes.
                batch["pixel_values"] = normalize_pixels(batch.pop("pixels"))
            yield batch
        self._next_epoch()

    def state_dict(self) -> dict:
        """This rank's stream state, JSON-safe and small; save it with the checkpoint."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "epoch": self.epoch,
            "batches": self.batches,
            "ranks": {
                str(self.rank): {
                    "positions": list(self._positions),
                    "worker_counts": [
                        dict(a + b) for a, b in zip(self._epoch_counts, self._live, strict=True)
                    ],
                    "finished_counts": dict(self._finished),
                }
            },
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue exactly where ``state`` left off (see the module docstring for the guarantee).

        When ``state`` was made with another config, shard list, world size, worker count or batch
        size, or lacks this rank: raise ValueError, or with ``strict=False`` log a warning and start
        the epoch after the interrupted one.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r}, expected {STATE_VERSION}")
        entry = state["ranks"].get(str(self.rank))
        problem = None
        if state["fingerprint"] != self.fingerprint:
            problem = (
                "the stream state was saved with another config, shard list, world size, worker count "
                "or batch size"
            )
        elif entry is None:
            problem = f"the stream state has no entry for rank {self.rank} (save merge_states of every rank)"
        if problem:
            if strict:
                raise ValueError(f"{problem}; load it with strict=False to start the next epoch instead")
            log.warning("%s: starting epoch %d from its beginning", problem, state["epoch"] + 1)
            self._finished = Counter(entry["finished_counts"]) if entry else Counter()
            self._start_epoch(state["epoch"] + (1 if state["batches"] else 0))
            return
        self._start_epoch(state["epoch"])
        self.batches = state["batches"]
        self._positions = list(entry["positions"])
        self._epoch_counts = [Counter(c) for c in entry["worker_counts"]]
        self._finished = Counter(entry["finished_counts"])


def merge_states(states: list[dict]) -> dict:
    """One state for all ranks from each rank's ``state_dict()`` (e.g. ``all_gather_object``'s list)."""
    first = states[0]
    for s in states[1:]:
        for k in ("version", "fingerprint", "epoch", "batches"):
            if s[k] != first[k]:
                raise ValueError(f"rank states disagree on {k!r}: {first[k]!r} != {s[k]!r}")
    return {**first, "ranks": {r: e for s in states for r, e in s["ranks"].items()}}


def build_loader(
    config: StreamConfig, rank: int = 0, world_size: int = 1, epoch: int = 0, state: dict | None = None
) -> StreamLoader:
    """The training stream of one rank: iterate it for an epoch's batches; ``state`` resumes exactly.

    Do not pass the result through ``accelerator.prepare``: the stream is already split by rank.
    Move batches to the device yourself (``pin_memory`` in the config helps).
    """
    loader = StreamLoader(config, rank=rank, world_size=world_size, epoch=epoch)
    if state is not None:
        loader.load_state_dict(state)
    return loader


def main(argv: list[str] | None = None) -> int:
    """``python -m training.stream CONFIG.yaml``: print a few batches of a stream and its counters."""
    import argparse

    ap = argparse.ArgumentParser(
        description="Iterate a training stream (a StreamConfig YAML) and summarize it."
    )
    ap.add_argument("config", help="YAML file with the StreamConfig fields")
    ap.add_argument("--batches", type=int, default=4, help="batches to show")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world-size", type=int, default=1)
    args = ap.parse_args(argv)
    loader = build_loader(StreamConfig.from_yaml(args.config), rank=args.rank, world_size=args.world_size)
    print(f"{len(loader)} batches per epoch on rank {args.rank} of {args.world_size}")
    for i, batch in zip(range(args.batches), loader, strict=False):
        slots = batch["slot_mask"].sum(1).tolist()
        print(f"batch {i}: keys {batch['key']} objects {batch['object_count'].tolist()} slots {slots}")
    print(json.dumps({"state": loader.state_dict(), "counters": loader.counters()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

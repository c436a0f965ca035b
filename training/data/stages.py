"""The worker side of the training stream: small generator stages, each taking an iterator and returning one.

Each DataLoader worker runs (open_clip's ``get_wds_dataset``, as plain generators)::

    per dataset:  worker_shard_passes -> read_shards -> parse_samples -> filter_samples -> shuffle
    then:         mix -> enumerate -> skip (resume) -> examples (decode, augment, reorganize) -> batches

``worker_batches`` chains them for one worker; ``EpochStream`` (the DataLoader's dataset) runs it in
each worker for the ``EpochPlan`` that ``training.data.stream`` (the loader and its resume state) made. The determinism, split and resumption rules are in that module's
docstring; the seeds here follow them: every generator is seeded by (seed, purpose, epoch, rank,
worker, ...) through ``derive_seed``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from shards.reader import RawSample, Sample, raw_samples, to_sample
from shards.schema import SampleRecord, SchemaError
from training.data.collate import Example, collate
from training.data.config import ConfigError, DatasetSpec, FilterConfig, StreamConfig
from training.data.errors import ErrorPolicy
from training.data.examples import DECODE_ERRORS, SizeMismatch, make_example, object_text

META = "__stream__"  # batch entry that carries the worker's position and counters to the main process

# Purposes mixed into seeds so that no two generators share a stream.
_SHARDS, _SHUFFLE, _MIX, _SAMPLE, _RESAMPLE = range(5)


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers, independent of PYTHONHASHSEED (unlike ``hash``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def split_shards(
    urls: list[str], seed: int, rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """This worker's disjoint share of a shard list shuffled identically on every rank with ``seed``."""
    order = list(urls)
    random.Random(seed).shuffle(order)
    return order[rank * num_workers + worker :: world_size * num_workers]


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


def mixture_probabilities(weights: list[float], names: list[str] | None = None) -> np.ndarray:
    """Each dataset's share of the mixture; a weight that is not a finite number > 0 raises ConfigError.

    The error names ``datasets[i].weight`` (and the dataset's path when ``names`` are given): an
    infinite weight would turn every share into NaN, and numpy's message would not say whose.
    """
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            whose = f" (dataset {names[i]!r})" if names else ""
            raise ConfigError(f"datasets[{i}].weight{whose} must be a finite number > 0, got {w!r}")
    total = sum(weights)
    if not math.isfinite(total):
        raise ConfigError(f"datasets[].weight: the weights {list(weights)} sum to {total}; scale them down")
    return np.asarray(weights, dtype=np.float64) / total


def mix(
    streams: list[Iterator[Sample]], weights: list[float], rng: np.random.Generator
) -> Iterator[tuple[int, Sample]]:
    """``(dataset index, sample)`` drawn from the streams in proportion to ``weights``."""
    if len(weights) != len(streams):
        raise ValueError(f"mix got {len(streams)} streams and {len(weights)} weights")
    p = mixture_probabilities(weights)
    while True:
        # Drawn in blocks: one rng.choice per sample would cost more than the rest of this stage.
        for i in rng.choice(len(streams), size=1024, p=p):
            yield int(i), next(streams[i])


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
        except DECODE_ERRORS as exn:
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
        batch[META] = {
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
# The entry point of each DataLoader worker


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

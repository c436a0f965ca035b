"""The worker side of the training stream: the batches of one rank that fall to one DataLoader worker.

Local batch ``k`` of a segment (the batches one DataLoader delivers) goes to worker ``k % workers``, so
the DataLoader's round robin hands them to the trainer in order. For each of its batches a worker runs::

    positions (training.data.plan.rank_positions) -> sample ids (Plan.sample_ids)
      -> read_samples: one byte range per sample (shards.offsets), parsed by the one tar reader
      -> examples: record checked (shards.reader.to_sample), objects filtered (index.keep_objects),
         decoded, augmented, reorganized into regions (training.data.examples) -> collate

Errors. A sample that cannot be read, parsed, decoded or augmented is counted by reason
(``training.data.errors.ErrorPolicy``) and its slot gets a substitute drawn for its position
(``Plan.substitute``, counted as ``repeat/substitute``), so every batch keeps its size and every rank its
batch count; ``max_consecutive_errors`` failures in a row raise. Slots past an exact epoch's last sample
(repeats that even out the ranks) are counted as ``repeat/even_out``.

Determinism. A batch depends only on its positions: the sample there and a generator seeded by (seed,
epoch, position, attempt) for its crop, flip, K objects and regions. Which worker, rank or world size
produced it does not matter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shards.offsets import read_ranges, span_sample
from shards.reader import RawSample, ShardReadError, to_sample
from shards.schema import SchemaError
from training.data.collate import Example, collate
from training.data.config import StreamConfig
from training.data.errors import ErrorPolicy
from training.data.examples import DECODE_ERRORS, SizeMismatch, make_example
from training.data.index import StreamIndex, filter_reason, keep_objects
from training.data.plan import Plan, rank_positions

META = "__stream__"  # batch entry that carries the batch's number and counters to the main process


@dataclass(frozen=True)
class Segment:
    """What one DataLoader delivers: the rest of an epoch from ``position``, for one rank."""

    epoch: int
    position: int  # the epoch's position the segment starts at
    batches: int  # global batches in the segment (each rank delivers this many)
    rank: int
    world_size: int
    batch_size: int


def read_samples(index: StreamIndex, ids: np.ndarray) -> list[RawSample | Exception]:
    """The raw sample of each id, one byte range each (one request per shard holding several)."""
    shards = index.locate(ids)
    out: list[RawSample | Exception] = [RuntimeError("not read")] * len(ids)
    for s in np.unique(shards):
        where = np.flatnonzero(shards == s)
        url = index.urls[s]
        starts, ends = index.start[ids[where]], index.end[ids[where]]
        for i, start, data in zip(where, starts, read_ranges(url, starts, ends), strict=True):
            if isinstance(data, Exception):
                out[i] = ShardReadError(url, f"bytes at {start}: {type(data).__name__}: {data}")
                continue
            try:
                out[i] = span_sample(data, url, int(start))
            except ShardReadError as e:
                out[i] = e
    return out


class Examples:
    """Makes the example of one slot, counting failures on ``policy``."""

    def __init__(self, cfg: StreamConfig, index: StreamIndex, plan: Plan, policy: ErrorPolicy):
        self.cfg, self.index, self.plan, self.policy = cfg, index, plan, policy
        self.shard_dataset = np.repeat(np.arange(len(index.dataset_shards)), index.dataset_shards)

    def make(self, sample_id: int, raw: RawSample | Exception, epoch: int, position: int, attempt: int) -> Example | None:
        """The example, or None after counting why there is none."""
        policy = self.policy
        if isinstance(raw, Exception):
            policy.error("corrupt_shard", raw)
            return None
        try:
            sample = to_sample(raw)
        except KeyError as exn:
            policy.error("missing_member", exn)
            return None
        except SchemaError as exn:
            policy.error("bad_json", exn)
            return None
        spec = self.cfg.datasets[int(self.shard_dataset[self.index.locate(np.int64(sample_id))])]
        record = keep_objects(sample.record, spec.filters)
        if filter_reason(record, spec.filters):
            policy.error("corrupt_shard", RuntimeError(f"{raw.url} key {raw.key!r}: no longer passes the filters "
                                                       "it passed when indexed: the tar changed"))
            return None
        rng = np.random.default_rng(self.plan.sample_seed(epoch, position, attempt))
        where = f"{sample.url} key {record.key!r}"
        try:
            ex = make_example(replace(sample, record=record), spec, self.cfg, rng)
        except SizeMismatch as exn:
            policy.error("size_mismatch", exn)
            return None
        except DECODE_ERRORS as exn:
            policy.error("undecodable_image", RuntimeError(f"{where}: {exn}"))
            return None
        except Exception as exn:  # noqa: BLE001  counted; a systematic bug trips max_consecutive_errors
            policy.error("augment_error", RuntimeError(f"{where}: {exn!r}"))
            return None
        policy.success()
        if ex.aug.flip_refused:
            policy.note("augment/flip_refused")
        return ex

    def slot(self, sample_id: int, raw: RawSample | Exception, epoch: int, position: int) -> Example:
        """The slot's example, or a substitute's when the sample there is unusable."""
        ex, attempt = self.make(sample_id, raw, epoch, position, 0), 0
        while ex is None:
            attempt += 1
            sub = self.plan.substitute(epoch, position, attempt)
            self.policy.note("repeat/substitute")
            ex = self.make(sub, read_samples(self.index, np.array([sub]))[0], epoch, position, attempt)
        return ex


def worker_batches(cfg: StreamConfig, index: StreamIndex, plan: Plan, seg: Segment, worker: int, workers: int
                   ) -> Iterator[dict]:
    """The batches of ``seg`` that fall to ``worker`` of ``workers``, in order (module doc)."""
    policy = ErrorPolicy(cfg.log_interval_s, cfg.max_consecutive_errors, f"rank {seg.rank} worker {worker}: ")
    examples = Examples(cfg, index, plan, policy)
    for k in range(worker, seg.batches, workers):
        positions = rank_positions(seg.position, k, seg.rank, seg.world_size, seg.batch_size)
        ids, repeats = plan.sample_ids(seg.epoch, positions)
        if repeats.any():
            policy.note("repeat/even_out", int(repeats.sum()))
        raws = read_samples(index, ids)
        made = [examples.slot(int(i), raw, seg.epoch, int(p)) for i, raw, p in zip(ids, raws, positions, strict=True)]
        batch = collate(made, cfg.regions.max_slots, cfg.regions.max_objs)
        # (epoch, position) of each sample: the same whatever the world size, for per-sample seeds.
        batch["stream_position"] = torch.from_numpy(np.stack([np.full_like(positions, seg.epoch), positions], 1))
        batch[META] = {"batch": k, "counts": policy.since_mark()}
        policy.mark()
        yield batch


class EpochStream(IterableDataset):
    """The IterableDataset the DataLoader's workers iterate: their share of one segment's batches."""

    def __init__(self, cfg: StreamConfig, index: StreamIndex, plan: Plan, seg: Segment):
        super().__init__()
        self.cfg, self.index, self.plan, self.seg = cfg, index, plan, seg

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return worker_batches(self.cfg, self.index, self.plan, self.seg, worker, workers)

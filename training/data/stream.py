"""Stream shards into training batches: the loader of one rank, its fixed-length epochs and resume state.

The trainer's side::

    loader = build_loader(config, rank, world_size)          # a StreamLoader
    loader.load_state_dict(saved)                             # optional, on resume
    while loader.epoch < epochs:
        for batch in loader:                                  # len(loader) batches, the same on every rank
            ...
            state = loader.state_dict()                       # with the checkpoint (see merge_states)
        log(loader.counters())                                # errors by reason, filtered samples

Each DataLoader worker runs the generator stages of ``training.data.stages`` (read with
``shards.reader``, parse, filter, shuffle, mix, skip on resume, make examples with
``training.data.examples``, batch); errors are counted by ``training.data.errors.ErrorPolicy``. This
module is the loader: it plans each epoch, runs the workers and keeps the resume state::

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

import itertools
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator

import yaml
from torch.utils.data import DataLoader

from shards.dataset import ShardInfo, list_shards, read_stats
from shards.schema import json_sha256
from training.data.collate import normalize_pixels
from training.data.config import ConfigError, DatasetSpec, StreamConfig
from training.data.stages import META, EpochPlan, EpochStream, derive_seed, mixture_probabilities

__all__ = ["StreamLoader", "build_loader", "complete_shards", "dataset_size", "derive_seed", "merge_states"]

log = logging.getLogger(__name__)

STATE_VERSION = 1


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


def dataset_size(spec: DatasetSpec, shards: list[ShardInfo]) -> int:
    """Samples in a dataset's complete shards, from their stats files."""
    total = 0
    for s in shards:
        try:
            total += int(read_stats(spec.path, s)["samples"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"dataset {spec.path!r}: stats file {s.stats} has no readable 'samples' count ({e!r}); "
                "check it with `python -m shards validate`, or set epoch_samples"
            ) from None
    return total


# ---------------------------------------------------------------------------------------------------
# The stateful loader


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
        mixture_probabilities([d.weight for d in config.datasets], [d.path for d in config.datasets])
        shards = [complete_shards(d, i) for i, d in enumerate(config.datasets)]
        self.urls = [[s.tar for s in ds] for ds in shards]
        total = world_size * self.workers
        if not config.resampled:
            for spec, urls in zip(config.datasets, self.urls, strict=True):
                if len(urls) < total:
                    raise ConfigError(
                        f"dataset {spec.path!r} has {len(urls)} shards for {total} workers "
                        f"({world_size} ranks x {self.workers}): use resampled mode, fewer workers, or more shards"
                    )
        epoch_samples = config.epoch_samples or sum(
            dataset_size(d, ds) for d, ds in zip(config.datasets, shards, strict=True)
        )
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
        self.fingerprint = json_sha256(ident)
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
            meta = batch.pop(META)
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
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"stream state version {got!r}, expected {STATE_VERSION}")
        missing = [k for k in ("fingerprint", "epoch", "batches", "ranks") if k not in state]
        if missing:
            raise ValueError(f"stream state lacks {missing} (pass the loader's state_dict() or merge_states)")
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
    """``python -m training.data.stream CONFIG.yaml``: print a few batches of a stream and its counters."""
    import argparse

    ap = argparse.ArgumentParser(
        description="Iterate a training stream (a StreamConfig YAML) and summarize it."
    )
    ap.add_argument("config", help="YAML file with the StreamConfig fields")
    ap.add_argument("--batches", type=int, default=4, help="batches to show")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world-size", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        config = StreamConfig.from_yaml(args.config)
    except (OSError, yaml.YAMLError, ConfigError) as e:
        return _fail(f"{args.config}: {e}")
    try:
        loader = build_loader(config, rank=args.rank, world_size=args.world_size)
        print(f"{len(loader)} batches per epoch on rank {args.rank} of {args.world_size}")
        for i, batch in zip(range(args.batches), loader, strict=False):
            slots = batch["slot_mask"].sum(1).tolist()
            print(f"batch {i}: keys {batch['key']} objects {batch['object_count'].tolist()} slots {slots}")
    except (ConfigError, ValueError, RuntimeError) as e:
        # A worker's exception arrives wrapped with its traceback; its own message is the last line.
        return _fail(f"{args.config}: {str(e).strip().splitlines()[-1]}")
    print(json.dumps({"state": loader.state_dict(), "counters": loader.counters()}))
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

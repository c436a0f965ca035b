"""Stream shards into training batches: the loader of one rank, its epochs and its resume state.

The trainer's side::

    loader = build_loader(config, rank, world_size)          # a StreamLoader
    loader.load_state_dict(saved)                             # optional, on resume (any world size)
    while training:
        for batch in loader:                                  # the rest of the epoch, as many on every rank
            ...
            state = merge_states(gather(loader.state_dict())) # with the checkpoint
        log(loader.counters())                                # errors, filtered samples, repeats

The parts: ``training.data.index`` (which samples there are: byte ranges, JSON checked and filtered once
per loader, or under torch.distributed once per job by rank 0 and broadcast), ``training.data.plan`` (the
global order: the sample at each position of an epoch) and ``training.data.stages`` (the batches each
DataLoader worker makes). Read them for the details.

Epochs. With ``resampled: false`` and no ``epoch_samples`` an epoch is one pass over every dataset:
every sample that passes the filters is delivered exactly once over all ranks and workers, whatever the
shard sizes, and the last global batch is filled up with fewer than ``world_size x batch_size`` repeats
(``repeat/even_out``) so that every rank delivers ``len(loader)`` batches and no DDP rank waits for
another. Mixture weights apply to resampled streams only (``StreamConfig`` refuses them otherwise).
With ``epoch_samples`` an epoch is that many positions of an endless sequence of passes (or, resampled,
of independent draws weighted by dataset): ``epoch_samples // (world_size x batch_size)`` global batches.

Counters (``counters()``, since training began, surviving resumption; summed over ranks they are
exact): what the workers met in the batches handed out (``error/<reason>``, ``repeat/even_out``,
``repeat/substitute``: a stand-in for an unusable sample, ``augment/flip_refused``), and, on rank 0 once
per epoch, what the index left out (``error/<reason>``, ``filtered/<reason>``).

Resumption. The state is a global position, the same on every rank: the epoch, the position in its
sequence that the batches handed to the trainer reached (prefetched ones do not count) and the global
batches delivered, plus each rank's counters. Loaded into a loader with the same config and shards, it
continues with the next position of the interrupted run's global order, nothing replayed or skipped, on
any world size, worker count and batch size (the remaining positions are split over the new ranks; the
counters of the old ranks go to the new rank 0 when the world size changed). With the same world size
and batch size the batches are those of an uninterrupted run, bit for bit (a sample's augmentation is
seeded by its position), given unchanged shard files and the same numpy / Pillow / torch versions; this
holds too when the trainer stops iterating and iterates again in one process. Each batch carries
``stream_position`` ((epoch, position) per sample), for draws of the trainer's that should not depend
on the world size either. With another config
(``num_workers``, ``batch_size``, logging and prefetching aside) or another shard list
``load_state_dict`` raises, or with ``strict=False`` starts the next epoch. Not covered: a shard file
rewritten in place under the same name (its byte ranges would point elsewhere; such a sample fails its
checks and is counted and substituted).
"""


from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator

import yaml
from torch.utils.data import DataLoader

from shards.schema import json_sha256
from training.data.collate import normalize_pixels
from training.data.config import ConfigError, StreamConfig
from training.data.index import shared_index
from training.data.plan import Plan, derive_seed, mixture_probabilities
from training.data.stages import META, EpochStream, Segment

__all__ = ["StreamLoader", "build_loader", "derive_seed", "merge_states"]

log = logging.getLogger(__name__)

STATE_VERSION = 2

# Fields that change how the stream is split, logged or moved, not the global order it delivers.
_NOT_IN_FINGERPRINT = (
    "num_workers",
    "batch_size",
    "log_interval_s",
    "max_consecutive_errors",
    "prefetch_factor",
    "pin_memory",
    "pixel_format",
)
_STATE_KEYS = ("fingerprint", "epoch", "position", "batches", "world_size", "ranks")


class StreamLoader:
    """Epochs of collated batches for one rank, with a resumable state (module doc).

    Iterating yields the rest of the current epoch (``len(self)`` batches in all, the same on every
    rank) and then moves ``epoch`` on.
    """

    def __init__(
        self, config: StreamConfig, rank: int = 0, world_size: int = 1, epoch: int = 0, index_cache: str | None = None
    ):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.config, self.rank, self.world_size = config, rank, world_size
        mixture_probabilities([d.weight for d in config.datasets], [d.path for d in config.datasets])
        self._scratch: tempfile.TemporaryDirectory | None = None
        self.index = shared_index(config, self._scratch_folder, rank, world_size, index_cache)  # rank 0's, under DDP
        self.plan = Plan(
            list(self.index.shard_sizes),
            list(self.index.dataset_shards),
            seed=config.seed,
            block=config.shuffle_buffer,
            resampled=config.resampled,
            epoch_samples=config.epoch_samples,
            weights=[d.weight for d in config.datasets],
        )
        self.global_batch = world_size * config.batch_size
        if self.plan.batches(0, self.global_batch) < 1:
            raise ConfigError(
                f"epoch_samples={config.epoch_samples} is less than one global batch of {self.global_batch} "
                f"({world_size} ranks x batch_size {config.batch_size})"
            )
        cfg = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
        self.fingerprint = json_sha256({"config": cfg, "shards": self.index.identity})
        self._counts: Counter = Counter()  # handed out so far (restored ones included)
        self._start_epoch(epoch)

    def _scratch_folder(self) -> str:
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="richlayout-stream-")
        return self._scratch.name

    def __len__(self) -> int:
        """Batches of the current epoch on this rank (the same on every rank)."""
        return self.batches + self.plan.batches(self.position, self.global_batch)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0  # in the epoch's sequence, reached by the batches handed out
        self.batches = 0  # global batches handed out in this epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless it is already the current one (resumed or not)."""
        if epoch != self.epoch:
            self._start_epoch(epoch)

    def counters(self) -> dict[str, int]:
        """This rank's counts since training began, for the trainer's logs (module doc, "Counters")."""
        return dict(sorted(self._counts.items()))

    def __iter__(self) -> Iterator[dict]:
        if self.plan.batches(self.position, self.global_batch) == 0:
            self._start_epoch(self.epoch + 1)
        cfg = self.config
        seg = Segment(
            epoch=self.epoch,
            position=self.position,
            batches=self.plan.batches(self.position, self.global_batch),
            rank=self.rank,
            world_size=self.world_size,
            batch_size=cfg.batch_size,
        )
        loader = DataLoader(
            EpochStream(cfg, self.index, self.plan, seg),
            batch_size=None,
            num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
            pin_memory=cfg.pin_memory,
        )
        for k, batch in enumerate(loader):
            meta = batch.pop(META)
            if meta["batch"] != k:
                raise RuntimeError(
                    f"batch {k} of the segment came as batch {meta['batch']}: "
                    "the DataLoader must return batches in order (in_order=True)"
                )
            if self.position == 0 and self.rank == 0:
                self._counts.update(self.index.counts)  # once per epoch, for every rank
            self._counts.update(meta["counts"])
            self.position = min(seg.position + (k + 1) * self.global_batch, self.plan.length)
            self.batches += 1
            if cfg.pixel_format == "float":
                # Here rather than in the workers: uint8 crosses shared memory at a quarter of the bytes.
                batch["pixel_values"] = normalize_pixels(batch.pop("pixels"))
            yield batch
        self._start_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        """This rank's stream state, JSON-safe and small; ``merge_states`` of every rank's is the checkpoint's."""
        epoch, position, batches = self.epoch, self.position, self.batches
        if self.plan.batches(position, self.global_batch) == 0:
            epoch, position, batches = epoch + 1, 0, 0  # a finished epoch: the next one starts
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "position": position,
            "batches": batches,
            "world_size": self.world_size,
            "batch_size": self.config.batch_size,
            "ranks": {str(self.rank): {"counts": dict(self._counts)}},
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue where ``state`` left off, on this loader's world size, workers and batch size (module doc).

        When ``state`` was made with another config or shard list, or lacks ranks it needs: raise
        ValueError, or with ``strict=False`` log a warning and start the epoch after the interrupted one.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            why = " (per-worker positions, saved before the global order): resume with the code that saved it" if got == 1 else ""
            raise ValueError(f"stream state version {got!r}, expected {STATE_VERSION}{why}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"stream state lacks {missing} (pass the loader's state_dict() or merge_states)")
        ranks, old_world = state["ranks"], state["world_size"]
        needed = [str(self.rank)] if old_world == self.world_size else [str(r) for r in range(old_world)]
        absent = [r for r in needed if r not in ranks]
        problem = None
        if state["fingerprint"] != self.fingerprint:
            problem = "the stream state was saved with another config or shard list"
        elif absent:
            problem = f"the stream state has no entry for rank(s) {', '.join(absent)} (save merge_states of every rank)"
        elif not 0 <= state["position"] <= self.plan.length:
            problem = f"the stream state's position {state['position']} is outside the epoch's {self.plan.length}"
        counts: Counter = Counter()
        if old_world == self.world_size:
            counts.update(ranks.get(str(self.rank), {}).get("counts", {}))
        elif self.rank == 0:  # the old ranks' counts live on in the new rank 0
            for entry in ranks.values():
                counts.update(entry.get("counts", {}))
        self._counts = counts
        if problem:
            if strict:
                raise ValueError(f"{problem}; load it with strict=False to start the next epoch instead")
            log.warning("%s: starting epoch %d from its beginning", problem, state["epoch"] + 1)
            self._start_epoch(state["epoch"] + (1 if state["position"] else 0))
            return
        self._start_epoch(state["epoch"])
        self.position, self.batches = state["position"], state["batches"]


def merge_states(states: list[dict]) -> dict:
    """One state for all ranks from each rank's ``state_dict()`` (e.g. ``all_gather_object``'s list)."""
    first = states[0]
    for s in states[1:]:
        for k in ("version", "fingerprint", "epoch", "position", "batches", "world_size"):
            if s[k] != first[k]:
                raise ValueError(f"rank states disagree on {k!r}: {first[k]!r} != {s[k]!r}")
    return {**first, "ranks": {r: e for s in states for r, e in s["ranks"].items()}}


def build_loader(
    config: StreamConfig,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    state: dict | None = None,
    index_cache: str | None = None,
) -> StreamLoader:
    """The training stream of one rank: iterate it for an epoch's batches; ``state`` resumes exactly.

    ``index_cache``: a local folder where the index is kept for a restart (``training.data.index_cache``).

    Do not pass the result through ``accelerator.prepare``: the stream is already split by rank.
    Move batches to the device yourself (``pin_memory`` in the config helps).
    """
    loader = StreamLoader(config, rank=rank, world_size=world_size, epoch=epoch, index_cache=index_cache)
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

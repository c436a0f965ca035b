"""The stream's global sample order: which sample sits at each position of an epoch, and who delivers it.

Pure functions of the index's sizes, the config and the seed (no I/O), so tests check epochs without
decoding a sample. Sample ids number the samples that passed the index (``training.data.index``):
dataset by dataset, shard by shard, in tar order.

Positions. An epoch is a sequence of positions, the same whatever the world size, worker count or batch
size; global batch ``k`` holds positions ``[p0 + k*G, p0 + (k+1)*G)`` from the position ``p0`` its
DataLoader started at, ``G = world_size * batch_size``, and rank ``r`` takes its ``r``-th slice of
``batch_size``. So a resume at position ``p`` continues the same sequence on any world size, worker count
or batch size, and augmentation, seeded per position, gives the same example there.

- Exact epochs (``resampled: false``, no ``epoch_samples``): epoch ``e`` is pass ``e``, one position per
  sample (``pass_order``). The last global batch is filled with repeats of the pass's first positions:
  fewer than ``G`` (``world_size x batch_size``), flagged so the workers count them.
- ``epoch_samples`` without resampling: the passes follow each other endlessly and epoch ``e`` is
  positions ``[e*S, (e+1)*S)`` of that sequence; an epoch holds ``S // G`` global batches and its last
  ``S % G`` positions are not delivered (they are next pass's business). Nothing repeats within a pass.
- Resampled: the sample at each position is drawn on its own (a dataset by ``weight``, then one of its
  samples uniformly), from a generator seeded by (seed, epoch, position); ``S // G`` batches per epoch.

A pass's order: the shards in an order drawn for the pass, their samples in tar order, then shuffled
within consecutive blocks of ``shuffle_buffer`` positions (MosaicML streaming's block shuffle): a
window as wide as a shuffle buffer, and consecutive positions mostly in the same few shards.
"""

from __future__ import annotations

import math

import numpy as np

from training.data.config import ConfigError

# Purposes mixed into seeds so that no two generators share a stream.
_SHARDS, _RESAMPLE, _SAMPLE, _SUBSTITUTE = range(4)


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers, independent of PYTHONHASHSEED (unlike ``hash``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def mixture_probabilities(weights: list[float], names: list[str] | None = None) -> np.ndarray:
    """Each dataset's share of a resampled mixture; a weight that is not a finite number > 0 raises ConfigError.

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


def pass_order(shard_sizes: list[int] | np.ndarray, seed: int, q: int, block: int) -> np.ndarray:
    """The sample ids of pass ``q`` in their order (module doc): shards shuffled, then blocks of ``block``."""
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    rng = np.random.default_rng(derive_seed(seed, _SHARDS, q))
    first = np.cumsum(sizes) - sizes
    perm = rng.permutation(len(sizes))
    order = np.concatenate([np.arange(first[s], first[s] + sizes[s]) for s in perm] or [np.zeros(0, np.int64)])
    if block > 1 and len(order) > 1:
        # Block number plus a uniform draw: sorting keeps blocks in place and shuffles inside each.
        keys = np.arange(len(order)) // block + rng.random(len(order))
        order = order[np.argsort(keys, kind="stable")]
    return order


def rank_positions(start: int, k: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """The positions of rank ``rank``'s batch ``k`` of a segment that started at position ``start``."""
    first = start + k * world_size * batch_size + rank * batch_size
    return np.arange(first, first + batch_size, dtype=np.int64)


class Plan:
    """The order of one stream (module doc): epoch length, batches left, the sample at each position."""

    def __init__(
        self,
        shard_sizes: list[int],
        dataset_shards: list[int],
        seed: int,
        block: int,
        resampled: bool = False,
        epoch_samples: int | None = None,
        weights: list[float] | None = None,
    ):
        """``shard_sizes``: samples per shard, all datasets in order; ``dataset_shards``: shards per dataset."""
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.samples = int(self.shard_sizes.sum())
        bounds = np.cumsum([0, *dataset_shards])
        first = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        self.dataset_first = first[bounds]  # per dataset its first id, then the total
        self.seed, self.block, self.resampled, self.epoch_samples = seed, block, resampled, epoch_samples
        self.cum_weights = np.cumsum(mixture_probabilities(weights or [1.0] * len(dataset_shards)))
        self._orders: dict[int, np.ndarray] = {}

    @property
    def exact(self) -> bool:
        """Whether an epoch is one pass, every sample once (module doc)."""
        return not self.resampled and self.epoch_samples is None

    @property
    def length(self) -> int:
        """Positions per epoch, repeats not counted."""
        return self.samples if self.exact else int(self.epoch_samples)

    def batches(self, position: int, global_batch: int) -> int:
        """Global batches left in an epoch from ``position`` on, ``global_batch`` samples each."""
        left = self.length - position
        if left <= 0:
            return 0
        return -(-left // global_batch) if self.exact else left // global_batch

    def order(self, q: int) -> np.ndarray:
        """Pass ``q``'s order (the last two are kept: an epoch of ``epoch_samples`` spans two passes)."""
        if q not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[q] = pass_order(self.shard_sizes, self.seed, q, self.block)
        return self._orders[q]

    def sample_ids(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sample id at each position of ``epoch``, and which of them are repeats that even out the
        ranks (exact epochs only: positions past the pass)."""
        positions = np.asarray(positions, dtype=np.int64)
        repeats = np.zeros(len(positions), dtype=bool)
        if self.resampled:
            return np.array([self._draw(epoch, int(p)) for p in positions], dtype=np.int64), repeats
        if self.exact:
            repeats = positions >= self.samples
            return self.order(epoch)[np.where(repeats, (positions - self.samples) % self.samples, positions)], repeats
        absolute = epoch * int(self.epoch_samples) + positions
        ids = np.empty(len(positions), dtype=np.int64)
        for q in np.unique(absolute // self.samples):
            here = absolute // self.samples == q
            ids[here] = self.order(int(q))[absolute[here] % self.samples]
        return ids, repeats

    def _draw(self, epoch: int, position: int) -> int:
        u = np.random.default_rng(derive_seed(self.seed, _RESAMPLE, epoch, position)).random(2)
        d = min(int(np.searchsorted(self.cum_weights, u[0], side="right")), len(self.cum_weights) - 1)
        lo, hi = self.dataset_first[d], self.dataset_first[d + 1]
        return int(lo + min(int(u[1] * (hi - lo)), hi - lo - 1))

    def substitute(self, epoch: int, position: int, attempt: int) -> int:
        """The sample that stands in for an unusable one at ``position`` (try ``attempt``), drawn uniformly."""
        rng = np.random.default_rng(derive_seed(self.seed, _SUBSTITUTE, epoch, position, attempt))
        return int(rng.integers(self.samples))

    def sample_seed(self, epoch: int, position: int, attempt: int = 0) -> int:
        """The seed of the example made at ``position`` (its crop, flip, K objects, region draws)."""
        return derive_seed(self.seed, _SAMPLE, epoch, position, attempt)

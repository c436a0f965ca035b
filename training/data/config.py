"""Typed configuration of the training data stream: datasets, filters, augmentation, batching.

Frozen dataclasses with a YAML-friendly shape: ``StreamConfig.from_dict(yaml.safe_load(f))`` builds
the nested objects from plain dicts and lists through ``shards.config.build``, which rejects unknown
keys and out-of-range values by dotted field.

The paper's recipe (docs/METHOD.md §6) as a preset::

    datasets:
      - {path: data/coco, weight: 1,
         filters: {min_objects: 1, max_objects: 30, min_box_area_frac: 0.01},
         augment: {scale: [1.0, 1.1], min_visibility: 0.1, max_objects: 30}}
      - {path: data/synthetic, weight: 2,
         augment: {min_visibility: 0.3, max_objects: 20}}
    resampled: true            # weights mix resampled streams; without, an epoch reads each dataset once
    epoch_samples: 256000
    batch_size: 2
    num_workers: 4
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field

from shards.config import (
    ClipScore,
    ConfigError,
    Float,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitFloat,
    build,
    load,
)


@dataclass(frozen=True)
class FilterConfig:
    """Filters on a sample's JSON, applied before the image is decoded.

    Object-level floors drop objects; the sample is then kept only when its remaining object count
    lies in ``[min_objects, max_objects]``. A missing score (null) never passes a floor that is set.
    """

    min_objects: NonNegativeInt = 1  # samples with fewer objects left after the object filters are skipped
    max_objects: NonNegativeInt | None = None  # samples with more objects (before K-sampling) are skipped
    min_clip_score: ClipScore | None = None  # drop objects whose CLIP crop score is below this
    min_detector_score: UnitFloat | None = None  # drop objects whose detector score is below this
    min_description_words: NonNegativeInt = 0  # drop objects whose text (description, else phrase) is shorter
    min_box_area_frac: UnitFloat = 0.0  # drop objects whose box covers less of the stored image than this

    def __post_init__(self) -> None:
        if self.max_objects is not None and self.max_objects < self.min_objects:
            raise ConfigError(f"max_objects ({self.max_objects}) must be >= min_objects ({self.min_objects})")


@dataclass(frozen=True)
class AugmentConfig:
    """Shorter-side resize, crop and horizontal flip; boxes and masks follow the pixels."""

    size: tuple[PositiveInt, PositiveInt] = (512, 512)  # output (height, width) in pixels; need not be square
    # Extra zoom, uniform in [lo, hi], on top of the cover resize; below 1 the image would not cover the crop.
    scale: tuple[Annotated[Float, Field(ge=1)], Annotated[Float, Field(ge=1)]] = (1.0, 1.0)
    crop: Literal["random", "center"] = "random"
    flip_prob: UnitFloat = 0.5  # a flip is skipped when a text's left/right cannot be swapped safely
    min_visibility: UnitFloat = 0.3  # drop objects with less of their box area inside the crop
    max_objects: PositiveInt | None = 20  # at most K objects, sampled with the sample's seeded generator
    masks: bool = False  # decode and transform the object masks (costly; regions use boxes only)

    def __post_init__(self) -> None:
        h, w = self.size
        if h <= 0 or w <= 0 or h % 8 or w % 8:
            raise ConfigError(f"size must be positive multiples of 8 (the latent grid), got {list(self.size)}")
        lo, hi = self.scale
        if not lo <= hi:
            raise ConfigError(f"scale must satisfy lo <= hi, got {list(self.scale)}")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset folder (local path or fsspec URI) and how to draw from it."""

    path: str  # dataset folder or URI; its complete shards (stats file present) are used
    weight: PositiveFloat = 1.0  # relative share of this dataset in a resampled stream's mixture (resampled only)
    filters: FilterConfig = field(default_factory=FilterConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    caption: Literal["caption", "source_caption"] = "caption"  # which field; falls back to the other


@dataclass(frozen=True)
class RegionConfig:
    """Caps of region reorganization (docs/METHOD.md §2.5) and the padded slot count."""

    max_objs: PositiveInt = 30
    max_regions: PositiveInt = 120
    max_slots: PositiveInt = 30  # region tensors are padded (or cut) to this many slots
    # Box-to-cell rule (training/layout/regions.py): "cover" (default) or "release", the release's rule (box ends
    # rounded down, the last latent row/column never in a box), so a fine-tune of the release's weights sees the cells they saw.
    rasterize: Literal["cover", "release"] = "cover"
    # Pixels per region-map cell: 8 for the UNets' latent grid, 16 for an MM-DiT's token grid (VAE 8 x patch 2).
    downscale: Literal[8, 16] = 8


@dataclass(frozen=True)
class StreamConfig:
    """The whole data stream: what to read, how to shuffle and mix, how to batch."""

    datasets: tuple[DatasetSpec, ...]
    batch_size: PositiveInt = 2  # per rank
    num_workers: NonNegativeInt = 2  # DataLoader workers per rank; 0 runs the stream in the main process
    # Draw each sample independently (datasets by weight) instead of reading every dataset once per epoch.
    resampled: bool = False
    # Samples per epoch over all ranks; None: one pass over every dataset, each usable sample exactly once.
    epoch_samples: PositiveInt | None = None
    # Without resampling: the pass's order is shuffled within consecutive blocks of this many samples (after
    # the shard order is drawn); 0 or 1: shards in a drawn order, their samples in tar order.
    shuffle_buffer: NonNegativeInt = 1000
    seed: NonNegativeInt = 0
    regions: RegionConfig = field(default_factory=RegionConfig)
    log_interval_s: NonNegativeFloat = 60.0  # at most one log line per error reason and worker in this interval
    max_consecutive_errors: PositiveInt = 200  # more failures in a row means a bug, not bad data: raise
    prefetch_factor: PositiveInt = 2
    pin_memory: bool = False
    # "float": batches hold pixel_values, float32 in [-1, 1], made in the loader's main process.
    # "uint8": they hold pixels, uint8; the trainer calls training.data.collate.normalize_pixels on the device.
    pixel_format: Literal["float", "uint8"] = "float"

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ConfigError("datasets must list at least one dataset")
        if self.resampled and self.epoch_samples is None:
            raise ConfigError("resampled mode has no natural epoch: set epoch_samples")
        weighted = [i for i, d in enumerate(self.datasets) if d.weight != 1.0]
        if weighted and not self.resampled:
            i = weighted[0]
            raise ConfigError(
                f"datasets[{i}].weight is {self.datasets[i].weight}: mixture weights apply to resampled streams "
                "only (set resampled: true and epoch_samples); without resampling an epoch reads every dataset once"
            )
        sizes = {tuple(d.augment.size) for d in self.datasets}
        if len(sizes) > 1:
            raise ConfigError(f"every dataset must augment to the same size to batch together, got {sorted(sizes)}")
        cell = self.regions.downscale
        if any(side % cell for size in sizes for side in size):
            raise ConfigError(f"augment.size {list(next(iter(sizes)))} must be multiples of regions.downscale {cell}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamConfig:
        """Build from plain dicts/lists (a parsed YAML file); bad keys or values raise ConfigError."""
        return build(cls, d)

    @classmethod
    def from_yaml(cls, path: str) -> StreamConfig:
        """Read a YAML preset; errors name the file and the field."""
        return load(cls, path)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists, the inverse of ``from_dict``."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

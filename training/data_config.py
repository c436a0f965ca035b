"""Typed configuration of the training data stream: datasets, filters, augmentation, batching.

Frozen dataclasses with a YAML-friendly shape: ``StreamConfig.from_dict(yaml.safe_load(f))`` builds
the nested objects from plain dicts and lists, and rejects unknown keys by name.

The paper's recipe (docs/METHOD.md §6) as a preset::

    datasets:
      - {path: data/coco, weight: 1,
         filters: {min_objects: 1, max_objects: 30, min_box_area_frac: 0.01},
         augment: {scale: [1.0, 1.1], min_visibility: 0.1, max_objects: 30}}
      - {path: data/synthetic, weight: 2,
         augment: {min_visibility: 0.3, max_objects: 20}}
    batch_size: 2
    num_workers: 4
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass(frozen=True)
class FilterConfig:
    """Filters on a sample's JSON, applied before the image is decoded.

    Object-level floors drop objects; the sample is then kept only when its remaining object count
    lies in ``[min_objects, max_objects]``. A missing score (null) never passes a floor that is set.
    """

    min_objects: int = 1  # samples with fewer objects left after the object filters are skipped
    max_objects: int | None = None  # samples with more objects (before K-sampling) are skipped
    min_clip_score: float | None = None  # drop objects whose CLIP crop score is below this
    min_detector_score: float | None = None  # drop objects whose detector score is below this
    min_description_words: int = 0  # drop objects whose text (description, else phrase) is shorter
    min_box_area_frac: float = 0.0  # drop objects whose box covers less of the stored image than this

    def __post_init__(self) -> None:
        if self.min_objects < 0:
            raise ConfigError(f"filters.min_objects must be >= 0, got {self.min_objects}")
        if self.max_objects is not None and self.max_objects < self.min_objects:
            raise ConfigError(
                f"filters.max_objects ({self.max_objects}) must be >= min_objects ({self.min_objects})"
            )


@dataclass(frozen=True)
class AugmentConfig:
    """Shorter-side resize, crop and horizontal flip; boxes and masks follow the pixels."""

    size: tuple[int, int] = (512, 512)  # output (height, width) in pixels; need not be square
    scale: tuple[float, float] = (1.0, 1.0)  # extra zoom, uniform in [lo, hi], on top of the cover resize
    crop: Literal["random", "center"] = "random"
    flip_prob: float = 0.5  # a flip is skipped when a text's left/right cannot be swapped safely
    min_visibility: float = 0.3  # drop objects with less of their box area inside the crop
    max_objects: int | None = 20  # at most K objects, sampled with the sample's seeded generator
    masks: bool = False  # decode and transform the object masks (costly; regions use boxes only)

    def __post_init__(self) -> None:
        h, w = self.size
        if h <= 0 or w <= 0 or h % 8 or w % 8:
            raise ConfigError(
                f"augment.size must be positive multiples of 8 (the latent grid), got {self.size}"
            )
        lo, hi = self.scale
        if not 1.0 <= lo <= hi:
            # Below 1 the resized image would no longer cover the crop.
            raise ConfigError(f"augment.scale must satisfy 1 <= lo <= hi, got {self.scale}")
        if self.crop not in ("random", "center"):
            raise ConfigError(f"augment.crop must be 'random' or 'center', got {self.crop!r}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"augment.flip_prob must be in [0, 1], got {self.flip_prob}")
        if not 0.0 <= self.min_visibility <= 1.0:
            raise ConfigError(f"augment.min_visibility must be in [0, 1], got {self.min_visibility}")
        if self.max_objects is not None and self.max_objects < 1:
            raise ConfigError(f"augment.max_objects must be >= 1 or null, got {self.max_objects}")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset folder (local path or fsspec URI) and how to draw from it."""

    path: str  # dataset folder or URI; its complete shards (stats file present) are used
    weight: float = 1.0  # relative share of this dataset in the mixture
    filters: FilterConfig = field(default_factory=FilterConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    caption: Literal["caption", "source_caption"] = "caption"  # which field; falls back to the other

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ConfigError(f"datasets[{self.path!r}].weight must be > 0, got {self.weight}")


@dataclass(frozen=True)
class RegionConfig:
    """Caps of region reorganization (docs/METHOD.md §2.5) and the padded slot count."""

    max_objs: int = 30
    max_regions: int = 120
    max_slots: int = 30  # region tensors are padded (or cut) to this many slots


@dataclass(frozen=True)
class StreamConfig:
    """The whole data stream: what to read, how to shuffle and mix, how to batch."""

    datasets: tuple[DatasetSpec, ...]
    batch_size: int = 2  # per rank
    num_workers: int = 2  # DataLoader workers per rank; 0 runs the stream in the main process
    resampled: bool = False  # draw shards with replacement instead of splitting them by node and worker
    epoch_samples: int | None = None  # samples per epoch over all ranks; None: the datasets' sample count
    shuffle_buffer: int = 1000  # samples held per dataset and worker for shuffling (0: no shuffle)
    shuffle_initial: int = 100  # samples buffered before the first is emitted
    seed: int = 0
    regions: RegionConfig = field(default_factory=RegionConfig)
    log_interval_s: float = 60.0  # at most one log line per error reason and worker in this interval
    max_consecutive_errors: int = 200  # more failures in a row means a bug, not bad data: raise
    prefetch_factor: int = 2
    pin_memory: bool = False
    # "float": batches hold pixel_values, float32 in [-1, 1], made in the loader's main process.
    # "uint8": they hold pixels, uint8; the trainer calls training.collate.normalize_pixels on the device.
    pixel_format: Literal["float", "uint8"] = "float"

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ConfigError("datasets must list at least one dataset")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.epoch_samples is not None and self.epoch_samples < 1:
            raise ConfigError(f"epoch_samples must be >= 1 or null, got {self.epoch_samples}")
        if self.resampled and self.epoch_samples is None:
            raise ConfigError("resampled mode has no natural epoch: set epoch_samples")
        if self.shuffle_buffer < 0 or self.shuffle_initial < 0:
            raise ConfigError("shuffle_buffer and shuffle_initial must be >= 0")
        if self.pixel_format not in ("float", "uint8"):
            raise ConfigError(f"pixel_format must be 'float' or 'uint8', got {self.pixel_format!r}")
        sizes = {d.augment.size for d in self.datasets}
        if len(sizes) > 1:
            raise ConfigError(
                f"every dataset must augment to the same size to batch together, got {sorted(sizes)}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamConfig:
        """Build from plain dicts/lists (a parsed YAML file); unknown keys raise ConfigError."""
        return build_config(cls, d, "stream")

    @classmethod
    def from_yaml(cls, path: str) -> StreamConfig:
        """Read a YAML preset."""
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f))

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists, the inverse of ``from_dict``."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def build_config(cls: type, d: Any, where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a dict, recursing by field type; errors name the field path."""
    name = where or "config"
    if not isinstance(d, dict):
        raise ConfigError(f"{name} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"{name}: unknown keys {unknown} (known: {sorted(fields)})")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{name}: {e}") from None
    except ConfigError as e:
        # __post_init__ checks know their field, not where their section sits in the file.
        if not where:
            raise
        raise ConfigError(f"{where}: {e}") from None


def _convert(tp: Any, v: Any, where: str) -> Any:
    """Check ``v`` against type ``tp`` (dataclass, tuple, Literal, Optional, scalar) and convert lists to tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build_config(tp, v, where)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, v, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {v!r} matches none of {args}")
    if origin is Literal:
        if v not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {v!r}")
        return v
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {v!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], x, f"{where}[{i}]") for i, x in enumerate(v))
        if len(v) != len(args):
            raise ConfigError(f"{where} must have {len(args)} items, got {v!r}")
        return tuple(_convert(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v, strict=True)))
    if tp is float:
        # YAML reads "1e-5" (no dot) as a string; accept ints and such strings for float fields.
        if isinstance(v, bool):
            raise ConfigError(f"{where} must be a number, got {v!r}")
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {v!r}") from None
    if tp in (int, bool, str) and type(v) is not tp:
        raise ConfigError(f"{where} must be {tp.__name__}, got {v!r}")
    return v

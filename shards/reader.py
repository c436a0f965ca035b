"""Read samples back with the stock ``webdataset`` package."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import webdataset as wds
from PIL import Image

from .dataset import tar_urls
from .masks import decode_mask
from .schema import SampleRecord
from .writer import IMAGE_EXTS


@dataclass(frozen=True)
class Sample:
    """A sample as read from a shard: the record and the encoded image."""

    record: SampleRecord
    image_bytes: bytes
    image_ext: str
    url: str

    def image(self) -> Image.Image:
        """The decoded RGB image."""
        with Image.open(io.BytesIO(self.image_bytes)) as im:
            return im.convert("RGB")

    def masks(self) -> list[np.ndarray | None]:
        """Each object's mask as a bool (H, W) array, None where the object has none."""
        return [None if o.mask is None else decode_mask(o.mask) for o in self.record.objects]


def _image_member(sample: dict) -> tuple[str, bytes]:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    raise KeyError(f"{sample.get('__url__')}: key {sample.get('__key__')!r} has no image member")


def to_sample(sample: dict) -> Sample:
    """Turn a raw webdataset dict (bytes per extension) into a validated Sample."""
    url = sample.get("__url__", "")
    if "json" not in sample:
        raise KeyError(f"{url}: key {sample.get('__key__')!r} has no json member")
    record = SampleRecord.from_json_bytes(sample["json"], where=f"{url} key {sample.get('__key__')!r}")
    ext, data = _image_member(sample)
    return Sample(record=record, image_bytes=data, image_ext=ext, url=url)


def iter_samples(dataset_or_urls: str | list[str], handler=wds.reraise_exception) -> Iterator[Sample]:
    """Iterate every sample of a dataset folder (complete shards) or of an explicit list of tar URLs."""
    urls = tar_urls(dataset_or_urls) if isinstance(dataset_or_urls, str) else list(dataset_or_urls)
    if not urls:
        return
    ds = wds.WebDataset(urls, shardshuffle=False, handler=handler, empty_check=False).map(
        to_sample, handler=handler
    )
    yield from ds

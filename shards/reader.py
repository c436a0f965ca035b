"""The one tar reader of the project: raw members grouped by key, and typed samples on top of it.

What it yields. ``raw_samples(urls)`` opens each tar URL (local path or fsspec URI) in turn and
streams it once, front to back, yielding a ``RawSample`` per run of consecutive members that share a
key: ``key`` (the member name up to the first '.' of its last path component, directories kept, as
webdataset's ``base_plus_ext`` splits it: ``evil/x.jpg`` -> ``evil/x``, ``../x.jpg`` -> ``../x``; a
name without '.' is its own key with extension ``""``), ``url``, ``members`` (extension exactly as
stored -> bytes) and ``names`` (the member names exactly as stored, in tar order). A member whose
extension the current sample already holds starts a new sample, so a key stored twice comes out
twice (callers that care count keys). Only regular files are members; directories and links are
left out. ``tar_samples(fileobj, url)`` does the same for one already open tar (validation hashes
the bytes it reads). A shard that cannot be opened, a corrupt header, a member cut short, or an
archive without its end-of-archive marker (tarfile stops quietly at a cut-off header) raises
``ShardReadError`` naming the URL *after* yielding every sample read before the fault; with
``on_error`` ``raw_samples`` hands it the error and goes on with the next URL instead.

``iter_samples`` is the typed API on top: ``Sample`` (validated record + encoded image) per sample.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

from .dataset import tar_urls
from .masks import decode_mask
from .paths import fs_and_root
from .schema import SampleRecord
from .writer import IMAGE_EXTS


class ShardReadError(RuntimeError):
    """A tar that cannot be opened or read to its end; the message starts with its URL."""

    def __init__(self, url: str, detail: str):
        super().__init__(f"{url}: {detail}")
        self.url = url


@dataclass(frozen=True)
class RawSample:
    """One key's members as stored in one tar."""

    key: str  # member name before the extension, directories kept (``evil/x`` stays visible)
    url: str  # the tar it came from
    members: dict[str, bytes]  # extension exactly as stored ("jpg", "json", "JPG", "") -> content
    names: tuple[str, ...]  # the member names exactly as stored, in tar order


class _EndAwareTarInfo(tarfile.TarInfo):
    """Records on the TarFile why its iteration ended.

    tarfile ends iteration quietly at a missing, cut-off or garbled header after the first member,
    so a truncated shard would look complete; this notes the reason instead of losing it.
    """

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            # The marker is two zero blocks; the first one was just read.
            rest = tf.fileobj.read(tarfile.BLOCKSIZE)
            ok = len(rest) == tarfile.BLOCKSIZE and not rest.strip(b"\0")
            tf.end_problem = None if ok else "truncated: the end-of-archive marker is cut short"
            raise
        except tarfile.EmptyHeaderError:
            tf.end_problem = f"truncated: no end-of-archive marker after byte {tf.offset}"
            raise
        except tarfile.HeaderError as e:
            tf.end_problem = f"truncated or corrupt after byte {tf.offset}: {e or type(e).__name__}"
            raise


# webdataset's ``base_plus_ext`` rule, spelled out here so that reading shards never imports
# webdataset (which imports torch): the key runs to the first '.' of the last path component.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_name(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member name as webdataset splits it; ``(name, "")`` without a '.'."""
    m = _KEY_EXT.match(name)
    return (name, "") if m is None else (m.group(1), m.group(2))


def tar_samples(fileobj: BinaryIO, url: str) -> Iterator[RawSample]:
    """The samples of one open tar stream, in order; raises ShardReadError after the readable ones."""
    key, members, names = None, {}, []
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndAwareTarInfo) as tar:
            for info in tar:
                if not info.isreg():
                    continue
                data = tar.extractfile(info).read()
                k, ext = split_name(info.name)
                if k != key or ext in members:
                    if key is not None:
                        yield RawSample(key, url, members, tuple(names))
                    key, members, names = k, {}, []
                members[ext] = data
                names.append(info.name)
                tar.members = []  # a streamed tar need not remember its members
            # Set while reading headers (also the first, inside open); unset would mean none ended the loop.
            problem = getattr(tar, "end_problem", "truncated: no end-of-archive marker")
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    if key is not None:
        yield RawSample(key, url, members, tuple(names))
    if problem:
        raise ShardReadError(url, problem)


def raw_samples(
    urls: Iterable[str], on_error: Callable[[ShardReadError], None] | None = None
) -> Iterator[RawSample]:
    """The samples of each tar URL in turn; a bad shard raises, or goes to ``on_error`` and is left."""
    for url in urls:
        try:
            fs, path = fs_and_root(url)
            with fs.open(path, "rb") as f:
                yield from tar_samples(f, url)
        except ShardReadError as e:
            if on_error is None:
                raise
            on_error(e)
        except (OSError, ValueError) as e:  # could not open it
            err = ShardReadError(url, f"{type(e).__name__}: {e}")
            if on_error is None:
                raise err from e
            on_error(err)


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


def to_sample(raw: RawSample) -> Sample:
    """A validated Sample from a raw one; KeyError for a missing member, SchemaError for a bad record."""
    if "json" not in raw.members:
        raise KeyError(f"{raw.url}: key {raw.key!r} has no json member")
    record = SampleRecord.from_json_bytes(raw.members["json"], where=f"{raw.url} key {raw.key!r}")
    ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
    if ext is None:
        raise KeyError(f"{raw.url}: key {raw.key!r} has no image member")
    return Sample(record=record, image_bytes=raw.members[ext], image_ext=ext, url=raw.url)


def iter_samples(dataset_or_urls: str | list[str]) -> Iterator[Sample]:
    """Every sample of a dataset folder (complete shards) or of an explicit list of tar URLs.

    Raises ShardReadError for an unreadable shard, KeyError / SchemaError for a bad sample.
    """
    urls = tar_urls(dataset_or_urls) if isinstance(dataset_or_urls, str) else list(dataset_or_urls)
    for raw in raw_samples(urls):
        yield to_sample(raw)

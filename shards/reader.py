"""The one tar reader of the project: raw members grouped by key, and typed samples on top of it.

What it yields. ``raw_samples(urls)`` opens each tar URL (local path or fsspec URI) in turn and
streams it once, front to back, yielding a ``RawSample`` per run of consecutive members that share a
key: ``key`` (the member name up to the first '.' of its last path component, directories kept, as
webdataset's ``base_plus_ext`` splits it: ``evil/x.jpg`` -> ``evil/x``, ``../x.jpg`` -> ``../x``; a
name without '.' is its own key with extension ``""``), ``url``, ``members`` (extension exactly as
stored -> bytes) and ``names`` (the member names exactly as stored, in tar order). Over HTTP the tar
is one GET read as a stream (``paths.open_sequential``), so servers without byte ranges serve it too.
``tar_samples(fileobj, url)`` does the same for one already open tar.

What it refuses. A key stored twice (consecutive or not) is used once: the later copy is left out.
Links (symbolic or hard), devices and FIFOs are not read (a directory entry holds nothing and is
passed over). Both are *problems*: with a ``problems`` list they are appended there (validation lists
them), without one they raise ``ShardReadError`` naming each after the good samples were yielded. A
member that would make its sample hold more than ``MAX_SAMPLE_BYTES`` is not read (a gzip-compressed
tar can hold a 1 GiB member in 1 MB) and ends the tar's reading. A shard that cannot be opened, a
corrupt header, a member cut short, or an archive without its end-of-archive marker (tarfile stops
quietly at a cut-off header) raises ``ShardReadError`` naming the URL *after* yielding every sample
read before the fault; with ``on_error`` the readers hand it the error and go on with the next tar.

Trust (docs/DESIGN.md, "Trust model"). ``shard_samples(dataset, shards)`` reads complete shards
checked against their stats files: a shard whose tar is missing is an error naming it, a tar whose
size differs from its stats is refused before a sample is read, and a tar read to its end is hashed
as it streams and refused when its sha256 differs (after its samples were yielded: a caller that must
not use a damaged shard's samples holds them until the shard ends, as ``to-coco`` does). A caller
that stops early (a capped read) has had the size checked, not the hash. ``raw_samples`` over bare
URLs has no stats to check against.

``iter_samples`` is the typed API on top: ``Sample`` (validated record + encoded image) per sample;
``Sample.image()`` refuses an image of more than ``MAX_IMAGE_PIXELS`` pixels from its header.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

from .dataset import ShardInfo, list_shards, read_stats
from .masks import decode_mask, rle_problem
from .paths import fs_and_root, open_sequential
from .schema import SampleRecord, SchemaError
from .writer import IMAGE_EXTS

# What the members of one sample may hold together: our writer stores one image (at most a few MB)
# and a small JSON per key; a bigger member is hostile or broken and is refused unread.
MAX_SAMPLE_BYTES = 256 * 2**20
# The largest image ``Sample.image()`` decodes (100 megapixels = 300 MB as RGB): checked from the header.
MAX_IMAGE_PIXELS = 100_000_000
_BLOCK = 1 << 20  # bytes read at a time when draining a tar to hash it


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


class HashingReader:
    """A read-only file wrapper that hashes (sha256) and counts every byte read through it."""

    def __init__(self, fileobj: BinaryIO):
        self._f = fileobj
        self._sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read the rest (a tar's padding after its end marker counts in its size and hash)."""
        while self.read(_BLOCK):
            pass

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


@dataclass(frozen=True)
class TarProblem:
    """A member of a tar that readers leave out: a later copy of a key, or a member that is not a file."""

    key: str | None  # the key it would have given (None: not a file)
    member: str  # its name exactly as stored
    message: str

    def __str__(self) -> str:
        return f"member {self.member!r}: {self.message}"


_NOT_READ = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
             tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}


def _not_read(info: tarfile.TarInfo) -> TarProblem:
    kind = _NOT_READ.get(info.type, f"of type {info.type!r}")
    target = f" to {info.linkname!r}" if info.issym() or info.islnk() else ""
    return TarProblem(None, info.name, f"is {kind}{target}, not a file: not read")


def _later_copy(key: str, info: tarfile.TarInfo) -> TarProblem:
    return TarProblem(key, info.name, f"key {key!r} is stored twice: this later copy is not used")


def tar_samples(
    fileobj: BinaryIO, url: str, problems: list[TarProblem] | None = None, max_sample_bytes: int = MAX_SAMPLE_BYTES
) -> Iterator[RawSample]:
    """The samples of one open tar stream, in order; raises ShardReadError after the readable ones.

    Duplicate keys and members that are not files are problems (see the module doc): appended to
    ``problems`` when given, else raised together at the end.
    """
    key, members, names, held = None, {}, [], 0
    seen: set[str] = set()
    skipping = None  # the key of a later copy being left out
    found: list[TarProblem] = []
    problem = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndAwareTarInfo) as tar:
            for info in tar:
                tar.members = []  # a streamed tar need not remember its members
                if info.isdir():
                    continue
                if not info.isreg():
                    found.append(_not_read(info))
                    continue
                k, ext = split_name(info.name)
                if k == skipping:
                    found.append(_later_copy(k, info))
                    continue
                new = k != key or ext in members
                if new:
                    if key is not None:
                        seen.add(key)
                        yield RawSample(key, url, members, tuple(names))
                    key, members, names, held = None, {}, [], 0  # the key is taken once a member is read
                    if k in seen:
                        skipping = k
                        found.append(_later_copy(k, info))
                        continue
                    skipping = None
                if held + info.size > max_sample_bytes:
                    # Not read: in a compressed tar a member of this size may inflate from a few bytes.
                    problem = (f"member {info.name!r} is {info.size} bytes, more than the {max_sample_bytes} bytes a "
                               "sample may hold (shards.reader.MAX_SAMPLE_BYTES): not read, nor the rest of the tar")
                    key = None
                    break
                data = tar.extractfile(info).read()
                key = k
                held += len(data)
                members[ext] = data
                names.append(info.name)
            else:
                # Set while reading headers (also the first, inside open); unset would mean none ended the loop.
                problem = getattr(tar, "end_problem", "truncated: no end-of-archive marker")
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    if key is not None:
        yield RawSample(key, url, members, tuple(names))
    if problems is not None:
        problems.extend(found)
        found = []
    if problem or found:
        raise ShardReadError(url, "; ".join([*([problem] if problem else []), *map(str, found)]))


def _read_url(url: str) -> Iterator[RawSample]:
    try:
        f = open_sequential(url)
    except (OSError, ValueError) as e:  # could not open it
        raise ShardReadError(url, f"{type(e).__name__}: {e}") from e
    with f:
        yield from tar_samples(f, url)


def raw_samples(
    urls: Iterable[str], on_error: Callable[[ShardReadError], None] | None = None
) -> Iterator[RawSample]:
    """The samples of each tar URL in turn; a bad shard raises, or goes to ``on_error`` and is left."""
    for url in urls:
        try:
            yield from _read_url(url)
        except ShardReadError as e:
            if on_error is None:
                raise
            on_error(e)


def checked_samples(dataset: str, shard: ShardInfo) -> Iterator[RawSample]:
    """The samples of one complete shard, its tar checked against its stats file (module doc, "Trust")."""
    if not shard.complete:
        raise ShardReadError(shard.tar, "incomplete: it has no stats file (the run did not finish it)")
    if not shard.has_tar:
        raise ShardReadError(shard.tar, "its tar is missing, though its stats file says the shard is complete")
    try:
        stats = read_stats(dataset, shard)
        expected_size, expected_sha = stats.get("tar_bytes"), stats["tar_sha256"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ShardReadError(shard.tar, f"its stats file is unreadable ({type(e).__name__}: {e})") from None
    fs, path = fs_and_root(shard.tar)
    try:
        size = fs.size(path)
    except (OSError, ValueError) as e:
        raise ShardReadError(shard.tar, f"{type(e).__name__}: {e}") from e
    if expected_size is not None and size != expected_size:
        raise ShardReadError(shard.tar, f"holds {size} bytes but its stats file recorded {expected_size}: "
                                        "damaged (truncated or overwritten), not read")
    try:
        f = open_sequential(shard.tar)
    except (OSError, ValueError) as e:
        raise ShardReadError(shard.tar, f"{type(e).__name__}: {e}") from e
    with f:
        hashed = HashingReader(f)
        yield from tar_samples(hashed, shard.tar)
        try:
            hashed.drain()
        except (OSError, ValueError) as e:
            raise ShardReadError(shard.tar, f"{type(e).__name__}: {e}") from e
    if hashed.hexdigest() != expected_sha:
        raise ShardReadError(shard.tar, f"its sha256 {hashed.hexdigest()[:12]}... differs from "
                                        f"{str(expected_sha)[:12]}... in its stats file: changed after it was "
                                        "written, not trusted")


def shard_samples(
    dataset: str, shards: Iterable[ShardInfo] | None = None, on_error: Callable[[ShardReadError], None] | None = None
) -> Iterator[RawSample]:
    """The samples of a dataset's complete shards (``shards``: those, default every complete one), each
    checked against its stats (``checked_samples``); a bad shard raises, or goes to ``on_error``."""
    for shard in [s for s in list_shards(dataset) if s.complete] if shards is None else shards:
        try:
            yield from checked_samples(dataset, shard)
        except ShardReadError as e:
            if on_error is None:
                raise
            on_error(e)


class ImageRefused(ValueError):
    """An image not decoded because of its size; the message names the tar and the key."""


@dataclass(frozen=True)
class Sample:
    """A sample as read from a shard: the record and the encoded image."""

    record: SampleRecord
    image_bytes: bytes
    image_ext: str
    url: str

    def image(self) -> Image.Image:
        """The decoded RGB image; ``ImageRefused`` for more than ``MAX_IMAGE_PIXELS`` pixels (from the
        header, before decoding: a few KB of PNG can claim gigapixels)."""
        where = f"{self.url} key {self.record.key!r}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
                with Image.open(io.BytesIO(self.image_bytes)) as im:
                    w, h = im.size
                    if w * h > MAX_IMAGE_PIXELS:
                        raise ImageRefused(f"{where}: image is {w}x{h} = {w * h} pixels, more than "
                                           f"{MAX_IMAGE_PIXELS} (shards.reader.MAX_IMAGE_PIXELS): not decoded")
                    return im.convert("RGB")
        except Image.DecompressionBombError as e:  # PIL's own, larger limit, hit inside open()
            raise ImageRefused(f"{where}: {e}") from None

    def masks(self) -> list[np.ndarray | None]:
        """Each object's mask as a bool (H, W) array, None where the object has none; ValueError naming
        the object for an RLE pycocotools would decode to garbage (``masks.rle_problem``)."""
        for i, o in enumerate(self.record.objects):
            why = None if o.mask is None else rle_problem(o.mask)
            if why:
                raise ValueError(f"{self.url} key {self.record.key!r}: objects[{i}].mask: {why}")
        return [None if o.mask is None else decode_mask(o.mask) for o in self.record.objects]


def to_sample(raw: RawSample) -> Sample:
    """A validated Sample from a raw one; KeyError for a missing member, SchemaError for a bad record, a
    record whose ``key`` is not its member name, or more than one image (which one would be meant?)."""
    if "json" not in raw.members:
        raise KeyError(f"{raw.url}: key {raw.key!r} has no json member")
    where = f"{raw.url} key {raw.key!r}"
    record = SampleRecord.from_json_bytes(raw.members["json"], where=where)
    if record.key != raw.key:
        raise SchemaError(f"{where}: field 'key' is {record.key!r}, not its member name's {raw.key!r}")
    exts = [e for e in IMAGE_EXTS if e in raw.members]
    if not exts:
        raise KeyError(f"{raw.url}: key {raw.key!r} has no image member")
    if len(exts) > 1:
        raise SchemaError(f"{where}: holds {len(exts)} images ({', '.join(exts)}); a sample has one")
    return Sample(record=record, image_bytes=raw.members[exts[0]], image_ext=exts[0], url=raw.url)


def iter_samples(dataset_or_urls: str | list[str]) -> Iterator[Sample]:
    """Every sample of a dataset folder (its complete shards, each checked against its stats file) or
    of an explicit list of tar URLs (nothing to check against).

    Raises ShardReadError for an unreadable or damaged shard, KeyError / SchemaError for a bad sample.
    """
    raws = shard_samples(dataset_or_urls) if isinstance(dataset_or_urls, str) else raw_samples(dataset_or_urls)
    for raw in raws:
        yield to_sample(raw)

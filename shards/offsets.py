"""Where each sample of a shard lies in its tar, and reading one sample by its byte range.

A training stream reads samples in an order of its own, spread over many shards; reading whole tars for
a few samples each would multiply the bytes read by the number of readers. So a sample is read as one
byte range: its members, headers included, which ``shards.reader.tar_samples`` parses as a small tar.

Where the ranges come from (``shard_spans``). The parquet's ``OFFSET_COLUMNS`` (``shards.writer`` writes
them since the on-disk contract's offset note in docs/DESIGN.md), checked before they are trusted: as many
rows as the stats file's ``samples``, ranges in order, inside the tar and not overlapping. A shard written
before those columns existed, or whose columns do not add up, has its tar's headers scanned once
(``writer.member_offsets``: the data is skipped by seeking, not read), and its members grouped into
samples as the reader groups them. Either way the tar's size is first checked against its stats file: a
tar of another size is damaged and none of its samples is used. The tar's sha256 is not checked (that
would read it whole): ``python -m shards validate`` does.

Reading (``read_ranges``, ``span_sample``). Local and other synchronous filesystems open each file once
per call; object stores and HTTP ask for the ranges concurrently (``fs.cat_ranges``). A range answered
with another length is an error: an HTTP server that ignores ``Range`` (``python -m http.server``) sends
the whole file, which ``serves_ranges`` tells before any sample is read, so the caller can copy such tars
(``local_copy``, one streamed GET through ``paths.open_sequential``) and read ranges from the copy.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from fsspec.asyn import AsyncFileSystem
from fsspec.core import url_to_fs

from .dataset import ShardInfo
from .paths import is_http, join, open_sequential
from .reader import MAX_SAMPLE_BYTES, RawSample, ShardReadError, split_name, tar_samples
from .writer import IMAGE_EXTS, OFFSET_COLUMNS, STATUS_OK, member_offsets

log = logging.getLogger(__name__)

_END = b"\0" * (2 * tarfile.BLOCKSIZE)  # the end-of-archive marker a span lacks
_COPY_BLOCK = 1 << 20


def _padded(n):
    """``n`` bytes (an int or an int64 array) rounded up to whole tar blocks."""
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


@dataclass(frozen=True)
class ShardSpans:
    """The samples of one tar as byte ranges, in tar order, and what was left out and why."""

    url: str  # the tar the ranges refer to
    keys: tuple[str, ...]
    start: np.ndarray  # int64: the sample's first member header
    end: np.ndarray  # int64: the end of its last member's (padded) data
    json_start: np.ndarray  # int64: its JSON record's data
    json_end: np.ndarray
    # (reason, message) per left-out part: "missing_member" (a key without its JSON or image), "bad_json"
    # (two images), "corrupt_shard" (a damaged tar, a link, a key stored twice, an oversized sample).
    problems: tuple[tuple[str, str], ...] = ()
    source: str = "parquet"  # "parquet" (the writer's offsets) or "scan" (the tar's headers)

    def __len__(self) -> int:
        return len(self.keys)


def _empty(url: str, problems: list[tuple[str, str]], source: str) -> ShardSpans:
    z = np.zeros(0, dtype=np.int64)
    return ShardSpans(url, (), z, z, z, z, tuple(problems), source)


@dataclass
class _Group:
    """The members of one key as the reader groups them (a run of consecutive members)."""

    key: str
    start: int
    end: int = 0
    data: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (data offset, size)


def _spans_from_groups(url: str, groups: list[_Group], problems: list[tuple[str, str]]) -> ShardSpans:
    keys, rows = [], []
    for g in groups:
        images = [e for e in IMAGE_EXTS if e in g.data]
        if "json" not in g.data or not images:
            problems.append(("missing_member", f"{url}: key {g.key!r} has no {'json' if images else 'image'} member"))
        elif len(images) > 1:
            problems.append(("bad_json", f"{url}: key {g.key!r} holds {len(images)} images; a sample has one"))
        elif g.end - g.start > MAX_SAMPLE_BYTES + 8 * tarfile.BLOCKSIZE:  # the reader would refuse it unread
            problems.append(("corrupt_shard", f"{url}: key {g.key!r} holds {g.end - g.start} bytes, more than "
                                              f"a sample may (shards.reader.MAX_SAMPLE_BYTES): not read"))
        else:
            offset, size = g.data["json"]
            keys.append(g.key)
            rows.append((g.start, g.end, offset, offset + size))
    a = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    return ShardSpans(url, tuple(keys), a[:, 0], a[:, 1], a[:, 2], a[:, 3], tuple(problems), "scan")


def scan_spans(url: str) -> ShardSpans:
    """The samples of a tar from its headers (the data is skipped by seeking), grouped as
    ``shards.reader.tar_samples`` groups members: a run of one key, a repeated key's later copy left out."""
    fs, path = url_to_fs(url)
    groups: list[_Group] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    skipping = None  # a key whose later copy is being left out, as the reader leaves it
    size = fs.size(path)
    try:
        with fs.open(path, "rb") as f:
            for info in member_offsets(f):
                if info.isdir():
                    continue
                if not info.isreg():
                    problems.append(("corrupt_shard", f"{url}: member {info.name!r} is not a file: not read"))
                    continue
                if info.offset_data + info.size > size:
                    raise tarfile.ReadError(f"member {info.name!r} runs past the end of the file")
                key, ext = split_name(info.name)
                g = groups[-1] if groups else None
                if key == skipping or g is None or g.key != key or ext in g.data:
                    if key in seen:
                        skipping = key
                        problems.append(("corrupt_shard", f"{url}: member {info.name!r}: key {key!r} is stored "
                                                          "twice: this later copy is not used"))
                        continue
                    skipping = None
                    seen.add(key)
                    g = _Group(key, info.offset)
                    groups.append(g)
                g.data[ext] = (info.offset_data, info.size)
                g.end = info.offset_data + _padded(info.size)
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        problems.append(("corrupt_shard", f"{url}: {type(e).__name__}: {e} (the samples before it are used)"))
    return _spans_from_groups(url, groups, problems)


def _parquet_spans(url: str, parquet: bytes, samples: int, tar_bytes: int) -> ShardSpans | str:
    """The spans the writer recorded, or why they cannot be trusted."""
    try:
        df = pd.read_parquet(io.BytesIO(parquet))
    except Exception as e:  # noqa: BLE001 — pyarrow raises several types for a damaged file
        return f"parquet unreadable ({type(e).__name__})"
    missing = sorted(set(OFFSET_COLUMNS) - set(df.columns))
    if missing:
        return "parquet has no offset columns (written before they existed)"
    df = df[df.status == STATUS_OK]
    cols = ["tar_offset", "image_offset", "image_bytes", "json_offset", "json_bytes"]
    if len(df) != samples or df[cols].isna().any().any():
        return f"parquet has {len(df)} sample rows with offsets, the stats file {samples} samples"
    df = df.sort_values("tar_offset")
    a = {c: df[c].to_numpy(dtype=np.int64) for c in cols}
    start = a["tar_offset"]
    image_end, json_end = a["image_offset"] + a["image_bytes"], a["json_offset"] + a["json_bytes"]
    end = _padded(np.maximum(image_end, json_end))
    ok = (
        (start >= 0).all()
        and (a["image_offset"] > start).all()
        and (a["json_offset"] > start).all()
        and (np.minimum(a["image_bytes"], a["json_bytes"]) >= 0).all()
        and (end[:-1] <= start[1:]).all()
        and (end <= tar_bytes).all()
    )
    if not ok:
        return "parquet offsets do not fit the tar (out of order, overlapping or past its end)"
    keys = tuple(df.key.astype(str))
    return ShardSpans(url, keys, start, end, a["json_offset"], json_end)


def shard_spans(shard: ShardInfo, stats: dict, read_url: str | None = None) -> ShardSpans:
    """The byte ranges of a complete shard's samples (module doc), its tar checked against ``stats``.

    ``read_url``: where the tar is read from, when not ``shard.tar`` (a local copy of it).
    """
    url = read_url or shard.tar
    fs, path = url_to_fs(url)
    tar_bytes = stats.get("tar_bytes")
    try:
        size = fs.size(path)
    except (OSError, ValueError) as e:
        return _empty(url, [("corrupt_shard", f"{shard.tar}: {type(e).__name__}: {e}")], "parquet")
    if tar_bytes is not None and size != tar_bytes:
        why = f"{shard.tar}: holds {size} bytes but its stats file recorded {tar_bytes}: damaged, not read"
        return _empty(url, [("corrupt_shard", why)], "parquet")
    why = "no parquet"
    if shard.has_parquet:
        pfs, ppath = url_to_fs(shard.parquet)
        try:
            found = _parquet_spans(url, pfs.cat_file(ppath), int(stats["samples"]), size)
        except (OSError, ValueError) as e:
            found = f"parquet unreadable ({type(e).__name__}: {e})"
        if isinstance(found, ShardSpans):
            return found
        why = found
    log.info("%s: %s; scanning the tar's headers", shard.tar, why)
    return scan_spans(url)


def read_ranges(url: str, starts: Iterable[int], ends: Iterable[int]) -> list[bytes | Exception]:
    """The bytes ``[start, end)`` of a file for each range (an exception in place of a failed one)."""
    fs, path = url_to_fs(url)
    starts, ends = [int(s) for s in starts], [int(e) for e in ends]
    if isinstance(fs, AsyncFileSystem):
        out = fs.cat_ranges([path] * len(starts), starts, ends, on_error="return")
    else:
        out = []
        try:
            with fs.open(path, "rb") as f:
                for s, e in zip(starts, ends, strict=True):
                    f.seek(s)
                    out.append(f.read(e - s))
        except (OSError, ValueError) as exc:
            out += [exc] * (len(starts) - len(out))
    return [
        d if isinstance(d, Exception) or len(d) == e - s
        else OSError(f"{url}: asked for bytes {s}-{e}, got {len(d)} bytes"
                     + (" (the server ignores byte ranges)" if len(d) > e - s else " (the file is shorter)"))
        for d, s, e in zip(out, starts, ends, strict=True)
    ]


def span_sample(data: bytes, url: str, start: int) -> RawSample:
    """The one sample held by the bytes of a span (read at ``start`` of ``url``); ShardReadError when they
    hold anything else (the tar changed after its offsets were recorded)."""
    found = []
    try:
        found = list(tar_samples(io.BytesIO(data + _END), url))
    except ShardReadError as e:
        raise ShardReadError(url, f"the {len(data)} bytes at {start}: {str(e).removeprefix(url + ': ')}") from None
    if len(found) != 1:
        raise ShardReadError(url, f"the {len(data)} bytes at {start} hold {len(found)} samples, not one: the tar "
                                  "changed after its offsets were recorded")
    return found[0]


def serves_ranges(url: str) -> bool:
    """Whether ``url``'s server answers a byte range with just those bytes (always, off HTTP)."""
    fs, path = url_to_fs(url)
    if not is_http(fs):
        return True
    got = read_ranges(url, [0], [tarfile.BLOCKSIZE])[0]
    if isinstance(got, Exception) and "ignores byte ranges" not in str(got):
        raise got
    return not isinstance(got, Exception)


def local_copy(url: str, folder: str, name: str) -> str:
    """Copy ``url`` into ``folder/name`` with one streamed read (``paths.open_sequential``); its path."""
    path = join(folder, name)
    with open_sequential(url) as src, open(path, "wb") as dst:
        while block := src.read(_COPY_BLOCK):
            dst.write(block)
    return path

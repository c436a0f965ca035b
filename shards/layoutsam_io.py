"""Reading LayoutSAM's files without holding them (``shards.layoutsam`` converts what this reads).

Rows: the parquet files of LayoutSAM / LayoutSAM-Eval, or the ``.arrow`` files of a ``datasets``
``save_to_disk`` folder, read a batch at a time (parquet row groups, Arrow record batches), so a
2.7-million-row source never sits in memory; a resumed import skips whole files and row groups by their
row counts instead of reading them.

Images of rows without an embedded one (LayoutSAM's training split names SA-1B images by
``file_name``): ``ImageSource`` over ``--images``, a folder (``folder/file_name``) and/or SA-1B's tar
files (local or fsspec), joined on the member's base name. The tars are indexed once by their member
headers (``shards.writer.member_offsets``: data is skipped, not read; an object store streams each tar
once), keeping only the members some row asks for (64-bit hashes of their names, 22 bytes per wanted
image, not the names); each image is then one byte range. Nothing is extracted to disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import stat
import tarfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .paths import fs_and_root, is_local, join, url_for
from .reader import MAX_SAMPLE_BYTES
from .writer import member_offsets

log = logging.getLogger(__name__)

__all__ = ["ImageSource", "SourceFile", "iter_rows", "source_files"]

DATA_EXTS = (".parquet", ".arrow")


@dataclass(frozen=True)
class SourceFile:
    """One data file of the source: its path in ``fs``, its name relative to the source, its columns and
    (parquet) its row count, from the footer."""

    path: str
    name: str
    size: int
    columns: tuple[str, ...]
    num_rows: int | None


def _arrow_batches(f) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """A ``datasets`` ``.arrow`` file (IPC stream format; the random-access file format read too)."""
    try:
        reader = pa.ipc.open_stream(f)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        f.seek(0)
        reader = pa.ipc.open_file(f)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def source_files(src: str) -> tuple[object, list[SourceFile]]:
    """The filesystem and the data files of ``src`` (a file, or a folder searched recursively, sorted);
    ValueError naming ``src`` or the file when there is none or one cannot be read as parquet / Arrow."""
    fs, root = fs_and_root(src)
    if not fs.exists(root):
        raise ValueError(f"{src}: no such file or folder")
    if fs.isdir(root):
        paths = sorted(p for p in fs.find(root) if p.endswith(DATA_EXTS))
        if not paths:
            raise ValueError(f"{src}: holds no .parquet or .arrow file (LayoutSAM's parquet files, or a "
                             "datasets save_to_disk folder)")  # fmt: skip
    else:
        paths = [root]
    files = []
    for p in paths:
        name = posixpath.relpath(p, root) if p != root else posixpath.basename(p)
        try:
            with fs.open(p, "rb") as f:
                if p.endswith(".arrow"):
                    schema, num_rows = _arrow_batches(f)[0], None
                else:
                    meta = pq.ParquetFile(f).metadata
                    schema, num_rows = meta.schema.to_arrow_schema(), meta.num_rows
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{url_for(fs, p)}: not a readable {p.rsplit('.', 1)[-1]} file ({e})") from None
        files.append(SourceFile(p, name, int(fs.size(p)), tuple(schema.names), num_rows))
    return fs, files


def _file_batches(fs, file: SourceFile, columns: list[str], batch_size: int, start: int) -> Iterator[pa.RecordBatch]:
    """The file's rows from row ``start`` on, ``batch_size`` at a time; parquet row groups that end
    before ``start`` are not read."""
    with fs.open(file.path, "rb") as f:
        if file.path.endswith(".arrow"):
            seen = 0
            for batch in _arrow_batches(f)[1]:
                batch = batch.select(columns)
                lo, seen = max(0, start - seen), seen + len(batch)
                for off in range(lo, len(batch), batch_size):
                    yield batch.slice(off, min(batch_size, len(batch) - off))
            return
        pf = pq.ParquetFile(f)
        groups, first = [], 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first + n > start:
                groups.append(g)
            else:
                first += n
        skip = start - first
        for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=columns):
            if skip >= len(batch):
                skip -= len(batch)
                continue
            yield batch.slice(skip)
            skip = 0


def iter_rows(fs, files: list[SourceFile], columns: list[str], batch_size: int = 64,
              start: int = 0) -> Iterator[tuple[int, SourceFile, int, dict]]:  # fmt: skip
    """``(global row, file, row in file, row dict)`` for every row from global row ``start`` on, in file
    order; only ``columns`` that a file has are read (an absent one is None in the dict)."""
    n = 0
    for file in files:
        if file.num_rows is not None and n + file.num_rows <= start:
            n += file.num_rows
            continue
        present = [c for c in columns if c in file.columns]
        row_in_file = max(0, start - n) if file.num_rows is not None else 0
        n += row_in_file
        for batch in _file_batches(fs, file, present, batch_size, row_in_file):
            for row in batch.to_pylist():
                if n >= start:
                    yield n, file, row_in_file, {c: row.get(c) for c in columns}
                n += 1
                row_in_file += 1


def name_hash(name: str) -> int:
    """A 64-bit hash of an image name: the tar index keeps these, not the names."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


class ImageSource:
    """The images ``--images`` supplies, by ``file_name``: SA-1B tars (a ``.tar`` file, or the ``.tar``
    files directly in a folder) joined on the member's base name, and a folder's ``folder/file_name``.

    ``wanted``: the file names rows will ask for; only those members are indexed. ``problems``: tar ->
    why it could not be read to its end (its members before the fault are indexed)."""

    def __init__(self, images: str, wanted: Iterator[str]):
        self.images = images
        self.fs, self.root = fs_and_root(images)
        if not self.fs.exists(self.root):
            raise ValueError(f"--images {images}: no such folder or tar file")
        self.folder = self.fs.isdir(self.root)
        self.tars = _tars(self.fs, self.root) if self.folder else [self.root]
        if not self.folder and not self.root.endswith(".tar"):
            raise ValueError(f"--images {images}: neither a folder nor a .tar file")
        self.problems: dict[str, str] = {}
        self._index(np.unique(np.fromiter((name_hash(n) for n in wanted), dtype=np.uint64)))

    def _index(self, wanted: np.ndarray) -> None:
        # Compact columns while scanning (a list of tuples would cost ~150 bytes per image).
        cols = {"hash": array("Q"), "tar": array("q"), "offset": array("q"), "size": array("q")}
        for t, path in enumerate(self.tars):
            try:
                with self.fs.open(path, "rb") as f:
                    for info in member_offsets(f):
                        if not info.isreg():  # a link, device or folder is never read
                            continue
                        h = name_hash(posixpath.basename(info.name))
                        i = int(np.searchsorted(wanted, np.uint64(h)))
                        if i < len(wanted) and wanted[i] == h:
                            for k, v in zip(cols, (h, t, info.offset_data, info.size), strict=True):
                                cols[k].append(v)
            except (tarfile.TarError, OSError, EOFError) as e:
                self.problems[url_for(self.fs, path)] = f"{type(e).__name__}: {e}"
                log.warning("--images: %s could not be read to its end: %s", url_for(self.fs, path), e)
        hashes = np.frombuffer(cols["hash"], dtype=np.uint64) if cols["hash"] else np.zeros(0, np.uint64)
        order = np.argsort(hashes, kind="stable")  # the first tar holding a name wins
        self._hashes = hashes[order]
        self._tars, self._offsets, self._sizes = (np.asarray(cols[k], dtype=np.int64)[order]
                                                  for k in ("tar", "offset", "size"))  # fmt: skip
        log.info("--images: %d wanted images found in %d tar(s)", len(hashes), len(self.tars))

    def read(self, file_name: str) -> tuple[bytes, str]:
        """The image's bytes and where they came from; FileNotFoundError (or another OSError) saying why
        not, ValueError for a name that would leave the folder or an image over ``MAX_SAMPLE_BYTES``."""
        h = np.uint64(name_hash(posixpath.basename(file_name)))
        i = int(np.searchsorted(self._hashes, h))
        if i < len(self._hashes) and self._hashes[i] == h:
            tar, offset, size = self.tars[int(self._tars[i])], int(self._offsets[i]), int(self._sizes[i])
            if size > MAX_SAMPLE_BYTES:
                raise ValueError(f"{url_for(self.fs, tar)} member {file_name}: {size} bytes, more than "
                                 f"{MAX_SAMPLE_BYTES} (shards.reader.MAX_SAMPLE_BYTES): not read")
            data = self.fs.cat_file(tar, start=offset, end=offset + size)  # one byte range
            if len(data) != size:
                raise OSError(f"{url_for(self.fs, tar)} member {file_name}: cut short ({len(data)} of {size} bytes)")
            return data, f"{url_for(self.fs, tar)}:{file_name}"
        if self.folder:
            if file_name.startswith("/") or ".." in file_name.split("/"):
                raise ValueError(f"file_name {file_name!r} leaves the --images folder: not read")
            path = join(self.root, file_name)
            if self.fs.exists(path):
                info = self.fs.info(path)
                if info["type"] != "file" or (is_local(self.fs) and not _regular(path)):
                    raise OSError(f"{url_for(self.fs, path)}: not a regular file: not read")
                if int(info.get("size") or 0) > MAX_SAMPLE_BYTES:
                    raise ValueError(f"{url_for(self.fs, path)}: more than {MAX_SAMPLE_BYTES} bytes: not read")
                return self.fs.cat_file(path), url_for(self.fs, path)
        where = f"{len(self.tars)} tar(s)" + (" or the folder" if self.folder else "")
        bad = f"; {len(self.problems)} tar(s) could not be read to their end" if self.problems else ""
        raise FileNotFoundError(f"image {file_name!r} is not in --images {self.images} ({where}{bad})")


def _tars(fs, root: str) -> list[str]:
    """The ``.tar`` files directly in a folder, sorted. Locally the folder is scanned, not listed into
    memory: an extracted SA-1B folder holds 11 million images."""
    if is_local(fs):
        with os.scandir(root) as entries:
            return sorted(join(root, e.name) for e in entries if e.name.endswith(".tar") and e.is_file())
    return sorted(p for p in fs.ls(root, detail=False) if p.endswith(".tar"))


def _regular(path: str) -> bool:
    """A local path that is a regular file: a named pipe would block the import forever."""
    return stat.S_ISREG(Path(path).stat().st_mode)

"""What every input reader of a run produces and shares: :class:`InputItem`, the image extensions and
column names readers look for, and the small helpers both ``datagen.inputs`` (folders, lists) and
``datagen.img2dataset_inputs`` (img2dataset's output) use. Kept apart so neither imports the other's
readers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import fsspec
import pyarrow as pa
from PIL import Image

log = logging.getLogger(__name__)

Image.init()
# Every extension of a format Pillow can open (.gif's first frame, .bmp, .tiff, .jpe, ...): decode tries them all.
IMAGE_EXTS = tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))
# Columns tried, in order, when a list does not name its path and caption columns.
PATH_COLUMNS = ("path", "image_path", "filepath", "file", "url", "image_url", "URL", "image")
CAPTION_COLUMNS = ("caption", "text", "alt_text", "alt", "TEXT", "title")
# img2dataset's parquet output format stores the encoded image in a binary column named by its format.
BYTES_COLUMNS = ("jpg", "jpeg", "png", "webp", "image_bytes", "image")


class InputError(ValueError):
    """An input location that cannot be listed; the message names it and says what was expected."""


# What reading a list (parquet, CSV) or a download log raises for a file that is not one: pyarrow's
# ArrowInvalid (a ValueError) or OSError, pandas' EmptyDataError and ParserError (ValueErrors), bad UTF-8.
TABLE_ERRORS = (ValueError, OSError, EOFError, pa.ArrowException)


def table_failure(e: BaseException, path: str) -> str:
    """One line saying why the list or log at ``path`` could not be read (no traceback, no path twice)."""
    kind = "parquet file" if path.lower().endswith(".parquet") else "CSV/TSV list"
    text = (str(e).splitlines() or [""])[0][:200]
    if type(e).__name__ == "EmptyDataError":
        return f"empty {kind} (no header line naming its columns)"
    return f"not a readable {kind} ({type(e).__name__}: {text.rstrip('.')})"


@dataclass(frozen=True)
class InputItem:
    """One input image: where its bytes are and what identifies it. JSON-safe (travels to workers)."""

    key: str  # stable sample key (shards.check_key-safe)
    source: str  # human-readable identity: path, URL, ``tar#member`` or ``parquet#row``
    uri: str  # the file holding the bytes: the image itself, a tar, or a parquet file
    caption: str | None = None  # source caption / alt-text, when the input has one
    offset: int | None = None  # tar member: byte offset of the data in the tar
    size: int | None = None  # tar member: data size in bytes
    row_group: int | None = None  # parquet with embedded bytes: row group ...
    row: int | None = None  # ... and row inside it
    column: str | None = None  # ... and the binary column
    meta: dict = field(default_factory=dict)  # JSON-safe extras kept in the sample (e.g. the URL)
    failure: str | None = None  # known at listing (img2dataset could not download it): decode records it
    original_width: int | None = None  # the true original size when the source knows it (img2dataset
    original_height: int | None = None  # resized the image it stored)

    def to_dict(self) -> dict:
        """A JSON-ready dict (the form shipped to the decode workers)."""
        return asdict(self)


@dataclass(frozen=True)
class Entry:
    """An input before keys are assigned: its identity (hashed into the key) and its stem."""

    identity: str
    stem: str
    item: dict  # the InputItem fields other than the key


def stem(name: str) -> str:
    """A file name's stem as WebDataset keys it: the base name before its first dot."""
    base = name.rsplit("/", 1)[-1]
    return base.split(".", 1)[0]


# The kinds of file an input folder may hold that are never opened: reading a named pipe blocks forever,
# a socket or device is no image, and a link to a folder would walk the folder twice.
_NOT_A_FILE = {"directory": "a link to a folder (not followed)", "other": "not a regular file (a named pipe, "
               "socket or device, or a link to one): not read"}


def not_a_file(fs: fsspec.AbstractFileSystem, path: str, kind: str) -> str | None:
    """Why the entry ``path`` of a listing (``kind``: its listed type) must not be opened, or None for a
    regular file. A local symlink is listed as "other": the file it points to decides."""
    if kind == "file":
        return None
    try:
        kind = fs.info(path)["type"]  # a path (not a listing entry) follows symlinks
    except FileNotFoundError:
        return "a broken link (what it points to does not exist): not read"
    except OSError as e:
        return f"cannot be inspected ({e.strerror or e}): not read"
    return None if kind == "file" else _NOT_A_FILE.get(kind, _NOT_A_FILE["other"])


def list_files(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, str | None]:
    """Every entry under ``root`` that is not a folder (recursive), sorted: path -> None for a regular
    file, else why it is not read (``not_a_file``)."""
    found = fs.find(root, detail=True)
    return {p: not_a_file(fs, p, found[p].get("type", "file")) for p in sorted(found)}


# A caption or JSON sidecar larger than this is not read: img2dataset writes a few hundred bytes, and a
# compressed tar could hold a gigabyte of one in a few kilobytes.
SIDECAR_BYTES = 1 << 20


def read_text(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """A small text file (a caption, a sidecar), undecodable bytes replaced; None (logged) for one larger
    than ``SIDECAR_BYTES``, which is not read."""
    with fs.open(path, "rb") as f:
        data = f.read(SIDECAR_BYTES + 1)
    if len(data) > SIDECAR_BYTES:
        log.warning("%s: more than %d bytes, not read as a caption or sidecar", path, SIDECAR_BYTES)
        return None
    return data.decode("utf-8", errors="replace").strip()


def cell_text(value) -> str:
    """A list cell as text: "" for None and NaN (a missing value), else ``str(value).strip()``."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def pick_column(columns: Iterable[str], wanted: str | None, candidates: tuple[str, ...], what: str, where: str) -> str | None:
    """The column named ``wanted`` (an error when absent), else the first of ``candidates`` present."""
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise InputError(f"{where}: no column {wanted!r} for the {what} (columns: {columns})")
        return wanted
    return next((c for c in candidates if c in columns), None)

"""What every input reader of a run produces and shares: :class:`InputItem`, the image extensions and
column names readers look for, and the small helpers both ``datagen.inputs`` (folders, lists) and
``datagen.img2dataset_inputs`` (img2dataset's output) use. Kept apart so neither imports the other's
readers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import fsspec
from PIL import Image

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


def read_text(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A small text file (a caption), undecodable bytes replaced."""
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace").strip()


def pick_column(columns: Iterable[str], wanted: str | None, candidates: tuple[str, ...], what: str, where: str) -> str | None:
    """The column named ``wanted`` (an error when absent), else the first of ``candidates`` present."""
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise InputError(f"{where}: no column {wanted!r} for the {what} (columns: {columns})")
        return wanted
    return next((c for c in candidates if c in columns), None)

"""List the inputs of a run: an image folder, img2dataset output, or a parquet/CSV list; local or fsspec.

Each input becomes an :class:`InputItem` with a stable key derived from its source identity (a path
relative to the input, a tar member, a list entry), so a re-run lists the same keys in the same order
and :func:`assign_shards` puts them in the same shards. Listing reads only metadata (directory
listings, tar headers, small caption members, parquet footers); image bytes are read later by the
decode stage, on the workers. img2dataset's layouts are read by ``datagen.img2dataset_inputs``; this
module recognises them and reads folders and parquet/CSV lists itself.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Iterator

import fsspec
import pandas as pd
import pyarrow.parquet as pq
from braceexpand import braceexpand
from fsspec.core import url_to_fs

from shards.paths import unreachable, url_for

from .img2dataset_inputs import (
    download_log,
    embedded_entries,
    files_entries,
    is_download_log,
    is_img2dataset_parquet,
    sidecar,
    tar_entries,
    url_meta,
)
from .input_items import (
    BYTES_COLUMNS,
    CAPTION_COLUMNS,
    IMAGE_EXTS,
    PATH_COLUMNS,
    TABLE_ERRORS,
    Entry,
    InputError,
    InputItem,
    cell_text,
    list_files,
    not_a_file,
    pick_column,
    read_text,
    stem,
    table_failure,
)

log = logging.getLogger(__name__)

# The public names of input listing; the item types and column names live in datagen.input_items.
__all__ = [
    "BYTES_COLUMNS",
    "CAPTION_COLUMNS",
    "IMAGE_EXTS",
    "PATH_COLUMNS",
    "InputError",
    "InputItem",
    "assign_shards",
    "inputs_digest",
    "list_inputs",
    "make_key",
]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_STEM_CHARS = 40  # key = sanitized stem (<= 40) + "-" + 16 hex digits: at most 57 characters
_HASH_CHARS = 16  # 64 bits: a collision among 10^8 inputs has odds below 1 in 3000


def make_key(identity: str, stem: str) -> str:
    """A short sanitized stem plus a 64-bit hash of the identity: readable, stable, unique."""
    clean = _UNSAFE.sub("_", stem).strip("_-")[:_STEM_CHARS] or "img"
    return f"{clean}-{hashlib.sha256(identity.encode()).hexdigest()[:_HASH_CHARS]}"


def _expand(uri: str) -> list[str]:
    """Brace patterns (``{00000..00099}.tar``, as webdataset and img2dataset write them) expanded."""
    return list(braceexpand(uri)) if "{" in uri else [uri]


def _rel(root: str, path: str) -> str:
    return posixpath.relpath(path, root) if path.startswith(root.rstrip("/") + "/") else path.rsplit("/", 1)[-1]


def _failed(fs: fsspec.AbstractFileSystem, path: str, rel: str, why: str) -> Entry:
    """A file of an input folder that is not an image input: a failed row saying why."""
    return Entry(rel, stem(rel), {"source": url_for(fs, path), "uri": "", "caption": None, "meta": {}, "failure": why})


def _sidecar_text(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    try:
        return read_text(fs, path)
    except OSError as e:  # the image is still an input; its caption is named as missing
        log.warning("%s: unreadable (%s); the image goes on without it", url_for(fs, path), e.strerror or e)
        return None


def _folder_entries(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[Entry]:
    """Every file under ``root`` (recursive), sorted by relative path: an image is an input, its sibling
    .txt its caption and .json its metadata; any other file is a failed input ("not an image"), and so is
    anything that is not a regular file (a named pipe, socket, device or broken link: never opened, a
    pipe would block the run), so every file of the folder is accounted for."""
    files = list_files(fs, root)
    regular = {p for p, why in files.items() if why is None}
    images = [p for p in regular if p.rpartition(".")[1] and f".{p.rpartition('.')[2].lower()}" in IMAGE_EXTS]
    sidecars = {f"{p.rpartition('.')[0]}.{ext}" for p in images for ext in ("txt", "json")} & regular
    for path, why in files.items():
        base, dot, ext = path.rpartition(".")
        rel = _rel(root, path)
        if why is not None:
            yield _failed(fs, path, rel, why)
            continue
        if not dot or f".{ext.lower()}" not in IMAGE_EXTS:
            if path not in sidecars:
                yield _failed(fs, path, rel, "not an image")
            continue
        if path.rsplit("/", 1)[-1].startswith("."):
            # WebDataset keys a member by the name before its first dot: ".x.jpg" and "..jpg" have none
            # (and are hidden files): recorded as a failed input rather than dropped unseen.
            yield _failed(fs, path, rel, "skipped: file name starts with a dot (hidden, no WebDataset key)")
            continue
        txt, meta = f"{base}.txt", {}
        caption = _sidecar_text(fs, txt) if txt in sidecars else None
        if f"{base}.json" in sidecars:
            meta = url_meta(sidecar(_sidecar_text(fs, f"{base}.json")))
        yield Entry(rel, stem(rel), {"source": url_for(fs, path), "uri": url_for(fs, path), "caption": caption, "meta": meta})


def _table_entries(
    fs: fsspec.AbstractFileSystem, path: str, rel: str, path_column: str | None, caption_column: str | None
) -> Iterator[Entry]:
    """A parquet/CSV list: a path-or-URL column (or img2dataset's embedded image bytes) + a caption."""
    where = url_for(fs, path)
    base_dir = url_for(fs, posixpath.dirname(path))
    try:
        if path.lower().endswith(".parquet"):
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                schema = pf.schema_arrow
                names = list(schema.names)
                binary = [n for n in BYTES_COLUMNS if n in names and str(schema.field(n).type) in ("binary", "large_binary")]
                if binary and path_column is None:
                    yield from list(embedded_entries(pf, where, rel, binary[0], caption_column))
                    return
                df = pf.read(columns=None).to_pandas()
        else:
            with fs.open(path, "rb") as f:
                sep = "\t" if path.lower().endswith(".tsv") else ","
                df = pd.read_csv(io.BytesIO(f.read()), sep=sep, dtype=str, keep_default_na=False)
    except TABLE_ERRORS as e:
        raise InputError(f"{where}: {table_failure(e, path)}") from None
    col = pick_column(df.columns, path_column, PATH_COLUMNS, "image path or URL", where)
    if col is None:
        raise InputError(
            f"{where}: no image path/URL column; name one with inputs.path_column (tried {list(PATH_COLUMNS)}, "
            f"columns: {list(df.columns)})"
        )
    cap = pick_column(df.columns, caption_column, CAPTION_COLUMNS, "caption", where)
    for i, value in enumerate(df[col].tolist()):
        value = cell_text(value)
        raw = None if cap is None else df[cap].iloc[i]
        caption = None if raw is None or (isinstance(raw, float) and raw != raw) else str(raw)  # NaN: none
        if not value:
            # An empty cell still is an input: it fails in decode with a clear reason instead of vanishing.
            yield Entry(f"{rel}#row{i}", f"row{i}", {"source": f"{where}#row{i}", "uri": "", "caption": caption, "meta": {}})
            continue
        is_url = "://" in value
        uri = value if is_url or value.startswith("/") else posixpath.join(base_dir, value)
        meta = {"url": value} if is_url else {}
        yield Entry(value, stem(value.split("?", 1)[0]), {"source": uri, "uri": uri, "caption": caption, "meta": meta})


def _entries(uri: str, path_column: str | None, caption_column: str | None) -> Iterator[Entry]:
    fs, root = url_to_fs(uri)
    root = root.rstrip("/") or root
    if any(ch in root for ch in "*?["):
        matches = sorted(fs.glob(root))
        if not matches:
            raise InputError(f"{uri}: the pattern matches nothing")
        for m in matches:
            yield from _entries(url_for(fs, m), path_column, caption_column)
        return
    if not fs.exists(root):
        raise InputError(f"{uri}: {unreachable(fs, root) or 'no such file or folder'}")
    kind = fs.info(root).get("type", "file")
    if kind not in ("file", "directory") and (why := not_a_file(fs, root, kind)) is not None:
        raise InputError(f"{uri}: {why}")
    name = root.rsplit("/", 1)[-1]
    lower = name.lower()
    # Over HTTP a folder's listing page is a file too: a name we would not read as a file is a folder.
    if fs.isfile(root) and (lower.endswith((".tar", ".parquet", ".csv", ".tsv", *IMAGE_EXTS)) or not fs.isdir(root)):
        if lower.endswith(".tar"):
            yield from tar_entries(fs, root, name)
        elif lower.endswith((".parquet", ".csv", ".tsv")):
            yield from _table_entries(fs, root, name, path_column, caption_column)
        elif lower.endswith(IMAGE_EXTS):
            yield Entry(name, stem(name), {"source": url_for(fs, root), "uri": url_for(fs, root), "caption": None, "meta": {}})
        else:
            raise InputError(f"{uri}: expected a folder, a .tar, a .parquet/.csv/.tsv list or an image file")
        return
    listing = {e["name"]: e.get("type", "file") for e in fs.ls(root, detail=True)}
    top = sorted(listing)
    # Entries never opened: a named pipe would block the run, and a folder named like a tar is no tar.
    odd = {}
    for p, kind in listing.items():
        if kind == "directory":
            if p.rstrip("/").lower().endswith((".tar", ".parquet")):
                odd[p] = "a folder named like a file (.tar or .parquet): not read"
        elif kind != "file" and (why := not_a_file(fs, p, kind)) is not None:
            odd[p] = why
    tars = [p for p in top if p.lower().endswith(".tar") and p not in odd]
    parquets = [p for p in top if p.lower().endswith(".parquet") and p not in odd]
    img2dataset = True
    if tars:
        # img2dataset webdataset output: the .parquet beside each tar is its download log, not an input.
        for t in tars:
            log_path = t[: -len(".tar")] + ".parquet"
            yield from tar_entries(fs, t, _rel(root, t), download_log(fs, log_path) if log_path in parquets else None)
    elif logs := [p for p in parquets if {p[:-8], f"{p[:-8]}/"} & set(top) and is_download_log(fs, p)]:
        # img2dataset "files" output: NNNNN/ holds the images, NNNNN.parquet its download log.
        for p in logs:
            folder = p[: -len(".parquet")]
            yield from files_entries(fs, folder, _rel(root, folder), download_log(fs, p))
    elif parquets and is_img2dataset_parquet(fs, parquets[0]):
        for p in parquets:
            yield from _table_entries(fs, p, _rel(root, p), path_column, caption_column)
    else:
        img2dataset = False
        yield from _folder_entries(fs, root)  # lists (and fails) what is not a file itself
    if img2dataset:
        for p, why in sorted(odd.items()):
            rel = _rel(root, p.rstrip("/"))
            yield _failed(fs, p.rstrip("/"), rel, why)


def list_inputs(uris: str | Iterable[str], path_column: str | None = None, caption_column: str | None = None) -> list[InputItem]:
    """Every input of ``uris`` in a stable order, each with its stable key.

    A repeated identity (the same URL twice in a list) is still an input of its own: its key hashes
    the identity plus its occurrence number, so nothing is merged away silently.
    """
    uris = [uris] if isinstance(uris, str) else list(uris)
    if not uris:
        raise InputError("no input given")
    seen: Counter[str] = Counter()
    keys: dict[str, str] = {}
    items = []
    for uri in (u for given in uris for u in _expand(given)):
        for e in _entries(uri, path_column, caption_column):
            n = seen[e.identity]
            seen[e.identity] += 1
            identity = e.identity if n == 0 else f"{e.identity}#{n}"
            key = make_key(identity, e.stem)
            if key in keys:  # 64-bit hash collision: astronomically rare, but never merge two inputs
                raise InputError(f"inputs {keys[key]!r} and {identity!r} map to the same key {key!r}")
            keys[key] = identity
            items.append(InputItem(key=key, **e.item))
    if not items:
        raise InputError(f"{', '.join(uris)}: no images found (looked for image files Pillow opens, e.g. "
                         ".jpg .png .webp .gif .bmp .tiff, and .tar, .parquet, .csv)")
    return items


def assign_shards(n_items: int, samples_per_shard: int) -> list[tuple[int, int, int]]:
    """``(shard_id, start, stop)`` for ``n_items`` inputs in order: fixed-size shards, so reruns agree."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    return [(i // samples_per_shard, i, min(i + samples_per_shard, n_items)) for i in range(0, n_items, samples_per_shard)]


def inputs_digest(items: list[InputItem]) -> str:
    """sha256 over the ordered keys: two listings that would shard differently never share it."""
    h = hashlib.sha256()
    for it in items:
        h.update(it.key.encode() + b"\n")
    return h.hexdigest()

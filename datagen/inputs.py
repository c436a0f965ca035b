"""List the inputs of a run: an image folder, img2dataset output, or a parquet/CSV list; local or fsspec.

Each input becomes an :class:`InputItem` with a stable key derived from its source identity (a path
relative to the input, a tar member, a list entry), so a re-run lists the same keys in the same order
and :func:`assign_shards` puts them in the same shards. Listing reads only metadata (directory
listings, tar headers, small caption members, parquet footers); image bytes are read later by the
decode stage, on the workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import fsspec
import pandas as pd
import pyarrow.parquet as pq
from braceexpand import braceexpand
from fsspec.core import url_to_fs
from PIL import Image

from shards.paths import unreachable, url_for

log = logging.getLogger(__name__)

Image.init()
# Every extension of a format Pillow can open (.gif's first frame, .bmp, .tiff, .jpe, ...): decode tries them all.
IMAGE_EXTS = tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))
# Columns tried, in order, when a list does not name its path and caption columns.
PATH_COLUMNS = ("path", "image_path", "filepath", "file", "url", "image_url", "URL", "image")
CAPTION_COLUMNS = ("caption", "text", "alt_text", "alt", "TEXT", "title")
# img2dataset's parquet output format stores the encoded image in a binary column named by its format.
BYTES_COLUMNS = ("jpg", "jpeg", "png", "webp", "image_bytes", "image")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_STEM_CHARS = 40  # key = sanitized stem (<= 40) + "-" + 16 hex digits: at most 57 characters
_HASH_CHARS = 16  # 64 bits: a collision among 10^8 inputs has odds below 1 in 3000


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
class _Entry:
    """An input before keys are assigned: its identity (hashed into the key) and its stem."""

    identity: str
    stem: str
    item: dict


def make_key(identity: str, stem: str) -> str:
    """A short sanitized stem plus a 64-bit hash of the identity: readable, stable, unique."""
    clean = _UNSAFE.sub("_", stem).strip("_-")[:_STEM_CHARS] or "img"
    return f"{clean}-{hashlib.sha256(identity.encode()).hexdigest()[:_HASH_CHARS]}"


def _expand(uri: str) -> list[str]:
    """Brace patterns (``{00000..00099}.tar``, as webdataset and img2dataset write them) expanded."""
    return list(braceexpand(uri)) if "{" in uri else [uri]


def _rel(root: str, path: str) -> str:
    return posixpath.relpath(path, root) if path.startswith(root.rstrip("/") + "/") else path.rsplit("/", 1)[-1]


def _stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.split(".", 1)[0]


def _read_text(fs: fsspec.AbstractFileSystem, path: str) -> str:
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace").strip()


def _sidecar(data: bytes) -> dict:
    """An img2dataset ``.json`` sidecar as a dict ({} when it is not a JSON object)."""
    try:
        d = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def _url_meta(d: dict) -> dict:
    """The source URL of a sidecar, when it has one."""
    return {"url": d["url"]} if isinstance(d.get("url"), str) else {}


def _folder_entries(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[_Entry]:
    """Every file under ``root`` (recursive), sorted by relative path: an image is an input, its sibling
    .txt its caption and .json its metadata; any other file is a failed input ("not an image"), so every
    file of the folder is accounted for."""
    files = sorted(fs.find(root))
    present = set(files)
    images = [p for p in files if p.rpartition(".")[1] and f".{p.rpartition('.')[2].lower()}" in IMAGE_EXTS]
    sidecars = {f"{p.rpartition('.')[0]}.{ext}" for p in images for ext in ("txt", "json")}
    for path in files:
        base, dot, ext = path.rpartition(".")
        rel = _rel(root, path)
        if not dot or f".{ext.lower()}" not in IMAGE_EXTS:
            if path not in sidecars:
                yield _Entry(rel, _stem(rel), {"source": url_for(fs, path), "uri": "", "caption": None, "meta": {},
                                               "failure": "not an image"})
            continue
        if path.rsplit("/", 1)[-1].startswith("."):
            # WebDataset keys a member by the name before its first dot: ".x.jpg" and "..jpg" have none
            # (and are hidden files): recorded as a failed input rather than dropped unseen.
            yield _Entry(rel, _stem(rel), {"source": url_for(fs, path), "uri": "", "caption": None, "meta": {},
                                           "failure": "skipped: file name starts with a dot (hidden, no WebDataset key)"})
            continue
        txt, meta = f"{base}.txt", {}
        caption = _read_text(fs, txt) if txt in present else None
        if f"{base}.json" in present:
            with fs.open(f"{base}.json", "rb") as f:
                meta = _url_meta(_sidecar(f.read()))
        yield _Entry(rel, _stem(rel), {"source": url_for(fs, path), "uri": url_for(fs, path), "caption": caption, "meta": meta})


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value is not None and value == value and int(value) > 0 else None  # NaN != NaN
    except (TypeError, ValueError):
        return None


def _original_size(row: dict) -> dict:
    """img2dataset's ``original_width`` / ``original_height`` as InputItem fields, when both are known."""
    w, h = _int_or_none(row.get("original_width")), _int_or_none(row.get("original_height"))
    return {"original_width": w, "original_height": h} if w and h else {}


def _download_failure(row: dict) -> str | None:
    """The reason img2dataset recorded for a row it could not download (None: it succeeded)."""
    status = row.get("status")
    if status is None or status == "success":
        return None
    return f"img2dataset {status}: {row.get('error_message') or 'no error message'}"


def _failed_download(identity: str, key: str, row: dict, fallback: str) -> _Entry:
    """A row img2dataset failed to download, as a failed input named by its URL (else ``fallback``)."""
    url = row.get("url") if isinstance(row.get("url"), str) else None
    return _Entry(identity, key, {"source": url or fallback, "uri": "", "caption": row.get("caption"),
                                  "meta": {"url": url} if url else {}, "failure": _download_failure(row)})


def _download_log(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, dict]:
    """img2dataset's parquet beside a tar: key -> its row (status, error_message, url, caption, sizes)."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        wanted = ("key", "status", "error_message", "url", "caption", "original_width", "original_height")
        columns = [c for c in wanted if c in pf.schema_arrow.names]
        if "key" not in columns:
            return {}
        rows = pf.read(columns=columns).to_pylist()
    return {str(r["key"]): r for r in rows if r.get("key") is not None}


def _tar_entries(fs: fsspec.AbstractFileSystem, path: str, rel: str, log_rows: dict | None = None) -> Iterator[_Entry]:
    """The samples of one WebDataset tar (img2dataset's format): image member + .txt caption + .json.

    Samples come sorted by key, not in member order (img2dataset writes members as downloads
    complete), and ``log_rows`` (its parquet) adds the rows it failed to download as failed inputs:
    the same URL list lists the same inputs in the same order whatever the download went like.
    """
    log_rows = log_rows or {}
    groups: dict[str, dict] = {}
    order: list[str] = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            name = m.name
            # WebDataset's rule: the key is everything before the first dot of the base name.
            dirname, base = posixpath.split(name)
            stem, _, ext = base.partition(".")
            key = posixpath.join(dirname, stem)
            if key not in groups:
                groups[key] = {}
                order.append(key)
            g = groups[key]
            ext = ext.lower()
            if f".{ext}" in IMAGE_EXTS and "image" not in g:
                g["image"] = (name, m.offset_data, m.size)
            elif ext == "txt":
                g["caption"] = tar.extractfile(m).read().decode("utf-8", errors="replace").strip()
            elif ext == "json":
                d = _sidecar(tar.extractfile(m).read())
                g["meta"], g["sizes"] = _url_meta(d), _original_size(d)
    missing = [k for k in order if "image" not in groups[k]]
    if missing:
        log.warning("%s: %d samples have no image member and are skipped (first: %r)", path, len(missing), missing[0])
    failed = {k: r for k, r in log_rows.items() if k not in groups and _download_failure(r)}
    for key in sorted([k for k in order if "image" in groups[k]] + list(failed)):
        if key in failed:
            yield _failed_download(f"{rel}/{key}", key, failed[key], f"{url_for(fs, path)}#{key}")
            continue
        g = groups[key]
        name, offset, size = g["image"]
        yield _Entry(
            f"{rel}/{key}",
            key,
            {
                "source": f"{url_for(fs, path)}#{name}",
                "uri": url_for(fs, path),
                "caption": g.get("caption"),
                "offset": offset,
                "size": size,
                "meta": g.get("meta", {}),
                **(_original_size(log_rows.get(key, {})) or g.get("sizes", {})),
            },
        )


def _pick(columns: Iterable[str], wanted: str | None, candidates: tuple[str, ...], what: str, where: str) -> str | None:
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise InputError(f"{where}: no column {wanted!r} for the {what} (columns: {columns})")
        return wanted
    return next((c for c in candidates if c in columns), None)


def _table_entries(
    fs: fsspec.AbstractFileSystem, path: str, rel: str, path_column: str | None, caption_column: str | None
) -> Iterator[_Entry]:
    """A parquet/CSV list: a path-or-URL column (or img2dataset's embedded image bytes) + a caption."""
    where = url_for(fs, path)
    base_dir = url_for(fs, posixpath.dirname(path))
    if path.lower().endswith(".parquet"):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            names = list(schema.names)
            binary = [n for n in BYTES_COLUMNS if n in names and str(schema.field(n).type) in ("binary", "large_binary")]
            if binary and path_column is None:
                yield from _embedded_entries(pf, where, rel, binary[0], caption_column)
                return
            df = pf.read(columns=None).to_pandas()
    else:
        with fs.open(path, "rb") as f:
            sep = "\t" if path.lower().endswith(".tsv") else ","
            df = pd.read_csv(io.BytesIO(f.read()), sep=sep, dtype=str, keep_default_na=False)
    col = _pick(df.columns, path_column, PATH_COLUMNS, "image path or URL", where)
    if col is None:
        raise InputError(
            f"{where}: no image path/URL column; name one with inputs.path_column (tried {list(PATH_COLUMNS)}, "
            f"columns: {list(df.columns)})"
        )
    cap = _pick(df.columns, caption_column, CAPTION_COLUMNS, "caption", where)
    for i, value in enumerate(df[col].tolist()):
        value = "" if value is None else str(value).strip()
        caption = None if cap is None or df[cap].iloc[i] is None else str(df[cap].iloc[i])
        if not value:
            # An empty cell still is an input: it fails in decode with a clear reason instead of vanishing.
            yield _Entry(f"{rel}#row{i}", f"row{i}", {"source": f"{where}#row{i}", "uri": "", "caption": caption, "meta": {}})
            continue
        is_url = "://" in value
        uri = value if is_url or value.startswith("/") else posixpath.join(base_dir, value)
        meta = {"url": value} if is_url else {}
        yield _Entry(value, _stem(value.split("?", 1)[0]), {"source": uri, "uri": uri, "caption": caption, "meta": meta})


def _embedded_entries(pf: pq.ParquetFile, where: str, rel: str, column: str, caption_column: str | None) -> Iterator[_Entry]:
    """img2dataset's parquet output: one row per image, the encoded bytes in ``column``."""
    names = pf.schema_arrow.names
    cap = _pick(names, caption_column, CAPTION_COLUMNS, "caption", where)
    wanted = (cap, "key", "url", "status", "error_message", "original_width", "original_height")
    extra = [c for c in wanted if c is not None and c in names]
    entries = []
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        t = pf.read_row_group(rg, columns=extra).to_pydict() if extra else {}
        keys, urls = t.get("key", [None] * n), t.get("url", [None] * n)
        for r in range(n):
            stem = str(keys[r]) if keys[r] else f"row{rg}_{r}"
            url = urls[r]
            row = {c: t[c][r] for c in t}
            failure = _download_failure(row)
            entries.append(_Entry(
                f"{rel}#{stem}",
                stem,
                {
                    # A failed download has no bytes here: its URL is what names it (as for a tar's).
                    "source": url if failure and isinstance(url, str) else f"{where}#{stem}",
                    "uri": where,
                    "caption": t[cap][r] if cap else None,
                    "row_group": rg,
                    "row": r,
                    "column": column,
                    "meta": {"url": url} if isinstance(url, str) else {},
                    **({"failure": failure} if failure else _original_size(row)),
                },
            ))
    # By key, not by row: img2dataset writes rows as downloads complete.
    yield from sorted(entries, key=lambda e: e.stem)


def _is_img2dataset_parquet(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    with fs.open(path, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return any(n in names for n in BYTES_COLUMNS[:4])


def _is_download_log(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    with fs.open(path, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return {"key", "status"} <= set(names) and not any(n in names for n in BYTES_COLUMNS[:4])


def _files_entries(fs: fsspec.AbstractFileSystem, folder: str, rel: str, log_rows: dict) -> Iterator[_Entry]:
    """One folder of img2dataset's "files" output, by key as its tars are: the images with their .txt
    caption and .json sidecar, plus the rows of its download log that it failed to download."""
    names = {p.rsplit("/", 1)[-1]: p for p in fs.find(folder)}
    images = {_stem(n): p for n, p in names.items() if f".{n.rpartition('.')[2].lower()}" in IMAGE_EXTS}
    failed = {k: r for k, r in log_rows.items() if k not in images and _download_failure(r)}
    for key in sorted([*images, *failed]):
        if key in failed:
            yield _failed_download(f"{rel}/{key}", key, failed[key], f"{url_for(fs, folder)}#{key}")
            continue
        path, meta, sizes = images[key], {}, {}
        caption = _read_text(fs, names[f"{key}.txt"]) if f"{key}.txt" in names else None
        if f"{key}.json" in names:
            with fs.open(names[f"{key}.json"], "rb") as f:
                d = _sidecar(f.read())
            meta, sizes = _url_meta(d), _original_size(d)
        yield _Entry(f"{rel}/{key}", key, {"source": url_for(fs, path), "uri": url_for(fs, path), "caption": caption,
                                           "meta": meta, **(_original_size(log_rows.get(key, {})) or sizes)})


def _entries(uri: str, path_column: str | None, caption_column: str | None) -> Iterator[_Entry]:
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
    name = root.rsplit("/", 1)[-1]
    lower = name.lower()
    # Over HTTP a folder's listing page is a file too: a name we would not read as a file is a folder.
    if fs.isfile(root) and (lower.endswith((".tar", ".parquet", ".csv", ".tsv", *IMAGE_EXTS)) or not fs.isdir(root)):
        if lower.endswith(".tar"):
            yield from _tar_entries(fs, root, name)
        elif lower.endswith((".parquet", ".csv", ".tsv")):
            yield from _table_entries(fs, root, name, path_column, caption_column)
        elif lower.endswith(IMAGE_EXTS):
            yield _Entry(name, _stem(name), {"source": url_for(fs, root), "uri": url_for(fs, root), "caption": None, "meta": {}})
        else:
            raise InputError(f"{uri}: expected a folder, a .tar, a .parquet/.csv/.tsv list or an image file")
        return
    top = sorted(p for p in fs.ls(root, detail=False))
    tars = [p for p in top if p.lower().endswith(".tar")]
    parquets = [p for p in top if p.lower().endswith(".parquet")]
    if tars:
        # img2dataset webdataset output: the .parquet beside each tar is its download log, not an input.
        for t in tars:
            log_path = t[: -len(".tar")] + ".parquet"
            yield from _tar_entries(fs, t, _rel(root, t), _download_log(fs, log_path) if log_path in top else None)
    elif logs := [p for p in parquets if {p[:-8], f"{p[:-8]}/"} & set(top) and _is_download_log(fs, p)]:
        # img2dataset "files" output: NNNNN/ holds the images, NNNNN.parquet its download log.
        for p in logs:
            folder = p[: -len(".parquet")]
            yield from _files_entries(fs, folder, _rel(root, folder), _download_log(fs, p))
    elif parquets and _is_img2dataset_parquet(fs, parquets[0]):
        for p in parquets:
            yield from _table_entries(fs, p, _rel(root, p), path_column, caption_column)
    else:
        yield from _folder_entries(fs, root)


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

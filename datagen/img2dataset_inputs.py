"""Read img2dataset's output as inputs: its WebDataset tars, its parquet output (embedded image bytes),
its "files" layout (``NNNNN/`` folders) and the download log (parquet) beside each, which adds the
rows it failed to download as failed inputs. Samples come sorted by key, not in the order downloads
completed, and each input's identity (what its sample key hashes) is img2dataset's own key (a row
without one: its file and row), so the same URL list gives the same keys whatever the download went
like and whichever output format it was written in (webdataset, parquet or files).
``datagen.inputs`` decides which layout a location holds and calls these readers.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator

import fsspec
import pyarrow.parquet as pq

from shards.paths import open_sequential, url_for
from shards.safe_json import loads as safe_loads

from .input_items import (
    BYTES_COLUMNS,
    CAPTION_COLUMNS,
    IMAGE_EXTS,
    SIDECAR_BYTES,
    TABLE_ERRORS,
    Entry,
    InputError,
    list_files,
    pick_column,
    read_text,
    stem,
    table_failure,
)

log = logging.getLogger(__name__)


def sidecar(data: bytes | str | None) -> dict:
    """An img2dataset ``.json`` sidecar as a dict ({} when it is not a JSON object, or was not read)."""
    if data is None:
        return {}
    try:
        d = safe_loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):  # nested too deep or a huge integer included
        return {}
    return d if isinstance(d, dict) else {}


def url_meta(d: dict) -> dict:
    """The source URL of a sidecar, when it has one."""
    return {"url": d["url"]} if isinstance(d.get("url"), str) else {}


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


def _failed_download(identity: str, key: str, row: dict, fallback: str) -> Entry:
    """A row img2dataset failed to download, as a failed input named by its URL (else ``fallback``)."""
    url = row.get("url") if isinstance(row.get("url"), str) else None
    return Entry(identity, key, {"source": url or fallback, "uri": "", "caption": row.get("caption"),
                                 "meta": {"url": url} if url else {}, "failure": _download_failure(row)})


def download_log(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, dict]:
    """img2dataset's parquet beside a tar: key -> its row (status, error_message, url, caption, sizes).
    A log that cannot be read is an InputError naming it (its failed downloads would be lost)."""
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            wanted = ("key", "status", "error_message", "url", "caption", "original_width", "original_height")
            columns = [c for c in wanted if c in pf.schema_arrow.names]
            if "key" not in columns:
                return {}
            rows = pf.read(columns=columns).to_pylist()
    except TABLE_ERRORS as e:
        raise InputError(f"{url_for(fs, path)}: img2dataset's download log: {table_failure(e, path)}") from None
    return {str(r["key"]): r for r in rows if r.get("key") is not None}


def _group_members(tar: tarfile.TarFile, groups: dict[str, dict], order: list[str], others: list[str]) -> None:
    """Group a streamed tar's members by WebDataset key: the image's place, the caption and the sidecar."""
    for m in tar:
        tar.members = []  # a streamed tar need not remember its members
        if not m.isfile():
            if not m.isdir():
                others.append(m.name)
            continue
        name = m.name
        # WebDataset's rule: the key is everything before the first dot of the base name.
        dirname, base = posixpath.split(name)
        member_stem, _, ext = base.partition(".")
        key = posixpath.join(dirname, member_stem)
        if key not in groups:
            groups[key] = {}
            order.append(key)
        g = groups[key]
        ext = ext.lower()
        if f".{ext}" in IMAGE_EXTS and "image" not in g:
            g["image"] = (name, m.offset_data, m.size)
        elif ext in ("txt", "json") and m.size > SIDECAR_BYTES:
            log.warning("%s: member %r is %d bytes, not read as a %s sidecar", tar.name, name, m.size, ext)
        elif ext == "txt":
            g["caption"] = tar.extractfile(m).read().decode("utf-8", errors="replace").strip()
        elif ext == "json":
            d = sidecar(tar.extractfile(m).read())
            g["meta"], g["sizes"] = url_meta(d), _original_size(d)


def tar_entries(fs: fsspec.AbstractFileSystem, path: str, rel: str, log_rows: dict | None = None) -> Iterator[Entry]:
    """The samples of one WebDataset tar (img2dataset's format): image member + .txt caption + .json.

    Samples come sorted by key, not in member order (img2dataset writes members as downloads
    complete), and ``log_rows`` (its parquet) adds the rows it failed to download as failed inputs:
    the same URL list lists the same inputs in the same order whatever the download went like.
    """
    log_rows = log_rows or {}
    groups: dict[str, dict] = {}
    order: list[str] = []
    others: list[str] = []
    # Read as one stream, front to back (offsets are known all the same): over HTTP one GET, so servers
    # without byte ranges serve the listing of a tar of any size.
    try:
        with open_sequential(url_for(fs, path)) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            _group_members(tar, groups, order, others)
    except (OSError, EOFError, tarfile.TarError) as e:
        raise InputError(f"{url_for(fs, path)}: not a readable tar ({type(e).__name__}: {e})") from None
    if others:
        log.warning("%s: %d members are not files (links, devices, folders) and are not inputs (first: %r)",
                    path, len(others), others[0])
    missing = [k for k in order if "image" not in groups[k]]
    if missing:
        log.warning("%s: %d samples have no image member and are skipped (first: %r)", path, len(missing), missing[0])
    failed = {k: r for k, r in log_rows.items() if k not in groups and _download_failure(r)}
    for key in sorted([k for k in order if "image" in groups[k]] + list(failed)):
        if key in failed:
            yield _failed_download(key, key, failed[key], f"{url_for(fs, path)}#{key}")
            continue
        g = groups[key]
        name, offset, size = g["image"]
        yield Entry(
            key,  # img2dataset's key: the same in its parquet and files outputs
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


def embedded_entries(pf: pq.ParquetFile, where: str, rel: str, column: str, caption_column: str | None) -> Iterator[Entry]:
    """img2dataset's parquet output: one row per image, the encoded bytes in ``column``."""
    names = pf.schema_arrow.names
    cap = pick_column(names, caption_column, CAPTION_COLUMNS, "caption", where)
    wanted = (cap, "key", "url", "status", "error_message", "original_width", "original_height")
    extra = [c for c in wanted if c is not None and c in names]
    entries = []
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        t = pf.read_row_group(rg, columns=extra).to_pydict() if extra else {}
        keys, urls = t.get("key", [None] * n), t.get("url", [None] * n)
        for r in range(n):
            row_stem = str(keys[r]) if keys[r] else f"row{rg}_{r}"
            url = urls[r]
            row = {c: t[c][r] for c in t}
            failure = _download_failure(row)
            entries.append(Entry(
                row_stem if keys[r] else f"{rel}#{row_stem}",  # img2dataset's key, as its tars and files
                row_stem,
                {
                    # A failed download has no bytes here: its URL is what names it (as for a tar's).
                    "source": url if failure and isinstance(url, str) else f"{where}#{row_stem}",
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


def _columns(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """A parquet file's column names; none for a file that is not parquet (the folder is then listed as
    a plain folder, where it is a failed "not an image" row)."""
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).schema_arrow.names
    except TABLE_ERRORS:
        return []


def is_img2dataset_parquet(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether a parquet file is img2dataset's parquet output (an image-bytes column)."""
    return any(n in _columns(fs, path) for n in BYTES_COLUMNS[:4])


def is_download_log(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether a parquet file is img2dataset's download log (key + status, no image bytes)."""
    names = _columns(fs, path)
    return {"key", "status"} <= set(names) and not any(n in names for n in BYTES_COLUMNS[:4])


def files_entries(fs: fsspec.AbstractFileSystem, folder: str, rel: str, log_rows: dict) -> Iterator[Entry]:
    """One folder of img2dataset's "files" output, by key as its tars are: the images with their .txt
    caption and .json sidecar, plus the rows of its download log that it failed to download."""
    files = list_files(fs, folder)
    names = {p.rsplit("/", 1)[-1]: p for p, why in files.items() if why is None}
    images = {stem(n): p for n, p in names.items() if f".{n.rpartition('.')[2].lower()}" in IMAGE_EXTS}
    failed = {k: r for k, r in log_rows.items() if k not in images and _download_failure(r)}
    for p, why in files.items():
        if why is not None:  # never opened (a named pipe would block the run): a failed row saying why
            name = p.rsplit("/", 1)[-1]
            yield Entry(f"{rel}/{name}", stem(name), {"source": url_for(fs, p), "uri": "", "caption": None,
                                                      "meta": {}, "failure": why})
    for key in sorted([*images, *failed]):
        if key in failed:
            yield _failed_download(key, key, failed[key], f"{url_for(fs, folder)}#{key}")
            continue
        path, meta, sizes = images[key], {}, {}
        caption = read_text(fs, names[f"{key}.txt"]) if f"{key}.txt" in names else None
        if f"{key}.json" in names:
            d = sidecar(read_text(fs, names[f"{key}.json"]))
            meta, sizes = url_meta(d), _original_size(d)
        yield Entry(key, key, {"source": url_for(fs, path), "uri": url_for(fs, path), "caption": caption,
                                          "meta": meta, **(_original_size(log_rows.get(key, {})) or sizes)})

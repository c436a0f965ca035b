"""Read img2dataset's output as inputs: its WebDataset tars, its parquet output (embedded image bytes),
its "files" layout (``NNNNN/`` folders) and the download log (parquet) beside each, which adds the
rows it failed to download as failed inputs. Samples come sorted by key, not in the order downloads
completed, so the same URL list lists the same inputs whatever the download went like.
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

from shards.paths import url_for

from .input_items import BYTES_COLUMNS, CAPTION_COLUMNS, IMAGE_EXTS, Entry, pick_column, read_text, stem

log = logging.getLogger(__name__)


def sidecar(data: bytes) -> dict:
    """An img2dataset ``.json`` sidecar as a dict ({} when it is not a JSON object)."""
    try:
        d = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
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
    """img2dataset's parquet beside a tar: key -> its row (status, error_message, url, caption, sizes)."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        wanted = ("key", "status", "error_message", "url", "caption", "original_width", "original_height")
        columns = [c for c in wanted if c in pf.schema_arrow.names]
        if "key" not in columns:
            return {}
        rows = pf.read(columns=columns).to_pylist()
    return {str(r["key"]): r for r in rows if r.get("key") is not None}


def tar_entries(fs: fsspec.AbstractFileSystem, path: str, rel: str, log_rows: dict | None = None) -> Iterator[Entry]:
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
            member_stem, _, ext = base.partition(".")
            key = posixpath.join(dirname, member_stem)
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
                d = sidecar(tar.extractfile(m).read())
                g["meta"], g["sizes"] = url_meta(d), _original_size(d)
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
        yield Entry(
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
                f"{rel}#{row_stem}",
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


def is_img2dataset_parquet(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether a parquet file is img2dataset's parquet output (an image-bytes column)."""
    with fs.open(path, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return any(n in names for n in BYTES_COLUMNS[:4])


def is_download_log(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether a parquet file is img2dataset's download log (key + status, no image bytes)."""
    with fs.open(path, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return {"key", "status"} <= set(names) and not any(n in names for n in BYTES_COLUMNS[:4])


def files_entries(fs: fsspec.AbstractFileSystem, folder: str, rel: str, log_rows: dict) -> Iterator[Entry]:
    """One folder of img2dataset's "files" output, by key as its tars are: the images with their .txt
    caption and .json sidecar, plus the rows of its download log that it failed to download."""
    names = {p.rsplit("/", 1)[-1]: p for p in fs.find(folder)}
    images = {stem(n): p for n, p in names.items() if f".{n.rpartition('.')[2].lower()}" in IMAGE_EXTS}
    failed = {k: r for k, r in log_rows.items() if k not in images and _download_failure(r)}
    for key in sorted([*images, *failed]):
        if key in failed:
            yield _failed_download(f"{rel}/{key}", key, failed[key], f"{url_for(fs, folder)}#{key}")
            continue
        path, meta, sizes = images[key], {}, {}
        caption = read_text(fs, names[f"{key}.txt"]) if f"{key}.txt" in names else None
        if f"{key}.json" in names:
            with fs.open(names[f"{key}.json"], "rb") as f:
                d = sidecar(f.read())
            meta, sizes = url_meta(d), _original_size(d)
        yield Entry(f"{rel}/{key}", key, {"source": url_for(fs, path), "uri": url_for(fs, path), "caption": caption,
                                          "meta": meta, **(_original_size(log_rows.get(key, {})) or sizes)})

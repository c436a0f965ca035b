"""Where things live in a dataset folder (local path or fsspec URI), and atomic small-file writes.

The project's one fsspec helper: every package turns a path or URL into a filesystem, a path in it,
an open file or a URL for another process through these functions. Imports only fsspec.
"""

from __future__ import annotations

import json
import posixpath
import uuid

import fsspec
from fsspec.core import url_to_fs

RUN_FILE = "run.json"
INDEX_FILE = "index.json"
SHARD_DIGITS = 6


def shard_name(shard_id: int) -> str:
    """``000042`` for shard 42."""
    return f"{shard_id:0{SHARD_DIGITS}d}"


def fs_and_root(dataset: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the root path inside it for a local path or fsspec URI.

    fsspec caches one filesystem per URL scheme and options, and object stores (s3fs, gcsfs) cache
    the listings they made. Other processes write the shards (Ray workers, a killed run's driver),
    so a listing cached by this process would hide them: each call starts from a fresh listing of
    ``root`` and its parents (a single LIST request, no effect on local paths).
    """
    fs, root = url_to_fs(str(dataset))
    root = root.rstrip("/") or root
    fs.invalidate_cache(root)
    return fs, root


def join(root: str, *parts: str) -> str:
    """Join with '/' (fsspec paths are posix-style on every filesystem)."""
    return posixpath.join(root, *parts)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem, where paths can be handed to tools that read files directly."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def url_for(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path usable by another process: plain path locally, else the filesystem's full URL.

    ``unstrip_protocol`` knows each filesystem's form: HTTP paths already are URLs (no second
    ``http://``), object stores get their scheme back.
    """
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def unreachable(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """Why ``path`` could not be reached at all (TLS, refused connection), or None (it is just missing).

    HTTP's ``exists()`` answers False for any error; ``info()`` keeps the error as the cause of its
    FileNotFoundError, where an HTTP status (404) means missing and anything else means unreachable.
    """
    try:
        fs.info(path)
    except Exception as e:  # noqa: BLE001 - each backend raises its own types
        cause = e.__cause__ if isinstance(e, FileNotFoundError) else e
        if cause is not None and not isinstance(cause, FileNotFoundError) and getattr(cause, "status", None) is None:
            return f"{type(cause).__name__}: {cause}"
    return None


def storage_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean object storage or an HTTP server could not be used at all: no credentials,
    an endpoint that does not answer, a certificate not trusted. A setup mistake: CLIs print one line."""
    found: list[type[BaseException]] = []
    try:
        from botocore import exceptions as boto

        found += [boto.NoCredentialsError, boto.PartialCredentialsError, boto.NoRegionError, boto.EndpointConnectionError]
    except ImportError:  # no s3fs installed
        pass
    try:
        from aiohttp import ClientConnectorError

        found.append(ClientConnectorError)
    except ImportError:
        pass
    return tuple(found)


def open_url(url: str, mode: str = "rb"):
    """Open a local path or fsspec URL; a missing file raises FileNotFoundError naming it."""
    fs, path = url_to_fs(str(url))
    return fs.open(path, mode)


def is_http(fs: fsspec.AbstractFileSystem) -> bool:
    """True for fsspec's HTTP(S) filesystem."""
    return bool({"http", "https"} & set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)))


def open_sequential(url: str, mode: str = "rb"):
    """Open a file to read once, front to back: over HTTP(S) one GET read as a stream, so a server that
    answers no byte ranges (``python -m http.server``) serves files of any size; elsewhere ``open_url``.
    fsspec's random-access HTTP file asks for ranges past its first 5 MB block and fails there."""
    fs, path = url_to_fs(str(url))
    if is_http(fs):
        return fs.open(path, mode, block_size=0)
    if is_local(fs) and fs.info(path)["type"] != "file":  # a path follows symlinks to what they name
        # A named pipe would block the reader forever, a device never end: neither is opened.
        raise IsADirectoryError(21, "not a regular file (a folder, named pipe, socket or device)", str(url))
    return fs.open(path, mode)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so readers see the old file or the whole new one, never a part.

    Locally a rename is atomic. On object stores a single PUT is already all-or-nothing, and a
    rename would be a copy, so write in place there.
    """
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def dump_json(obj: object) -> bytes:
    """Deterministic, human-readable JSON."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()

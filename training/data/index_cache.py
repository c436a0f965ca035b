"""A local file of the stream's index, so that a restart does not read every sample's JSON range again.

``training.data.index.shared_index`` (with a cache folder) looks for ``FOLDER/stream-index-<key>.npz``
(``StreamIndex.to_bytes``) and its sidecar ``.json`` (size and sha256). The key (``index_key``) is a sha256
of the index format, each dataset's path and filters, and each complete shard's name, tar size and stats
file: a shard added or completed, a tar of another size, other stats or other filters give another key, so
a stale index is never found. (A tar rewritten in place with the same size and stats is not seen, as
resumption does not see it.) A file is checked before it is trusted: its size and sha256 against the
sidecar, then ``StreamIndex.from_bytes``'s checks; a damaged one is built again, with a warning naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fsspec.core import url_to_fs

from shards.dataset import ShardInfo, read_stats
from shards.schema import json_sha256
from training.data.config import StreamConfig

log = logging.getLogger(__name__)

_THREADS = 8  # stats files and tar sizes asked for at once (object stores answer slowly, not heavily)


def index_key(config: StreamConfig, shards: list[list[ShardInfo]], index_format: int) -> str:
    """The cache key of ``config``'s index over its datasets' complete ``shards`` (module doc)."""
    jobs = [(spec.path, s) for spec, listed in zip(config.datasets, shards, strict=True) for s in listed]

    def describe(job) -> list:
        path, s = job
        fs, tar = url_to_fs(s.tar)
        try:
            stats = json_sha256(read_stats(path, s))
        except (OSError, ValueError) as e:  # indexed as corrupt: the key records that it was
            stats = f"unreadable: {type(e).__name__}"
        return [s.name, int(fs.size(tar)), stats]

    with ThreadPoolExecutor(max_workers=max(1, min(_THREADS, len(jobs)))) as pool:
        described = list(pool.map(describe, jobs))
    datasets, k = [], 0
    for spec, listed in zip(config.to_dict()["datasets"], shards, strict=True):
        datasets.append({"path": spec["path"], "filters": spec["filters"], "shards": described[k : k + len(listed)]})
        k += len(listed)
    return json_sha256({"format": index_format, "datasets": datasets})


def read_cached(folder: str, key: str) -> bytes | None:
    """The cached index bytes for ``key``, checked against their sidecar; None when absent or damaged."""
    path, sidecar = _paths(folder, key)
    if not path.exists() and not sidecar.exists():
        return None
    try:
        meta = json.loads(sidecar.read_text())
        data = path.read_bytes()
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError(f"its size or sha256 differs from {sidecar.name}'s")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("stream index cache %s is damaged (%s: %s); building the index again", path, type(e).__name__, e)
        return None
    return data


def write_cached(folder: str, key: str, data: bytes) -> None:
    """Store ``data`` for ``key``: the file, then its sidecar, each written whole and renamed into place."""
    path, sidecar = _paths(folder, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, content in ((path, data),
                            (sidecar, json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
                             .encode())):
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        tmp.write_bytes(content)
        tmp.replace(target)


def _paths(folder: str, key: str) -> tuple[Path, Path]:
    path = Path(folder) / f"stream-index-{key}.npz"
    return path, path.with_suffix(".json")

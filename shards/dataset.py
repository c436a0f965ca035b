"""A dataset folder: its shards (complete or not), ``index.json`` and ``run.json``, through one handle.

``DatasetHandle.open(uri)`` resolves a local path or fsspec URI to its filesystem and root once; a run
that writes a dataset (``DatasetHandle.create``) opens one handle at its start, checks there that the
folder can be written, and passes the handle down (it pickles, filesystem included, so Ray tasks receive
it as it is). The handle keeps the filesystem, the root and, once ``open_run`` checked it, the run
record; it keeps no listing: ``shards()`` lists the folder afresh on every call, because other processes
(Ray workers, a killed run) write shards and an object store's cached listing would hide them.

The module functions (``list_shards``, ``read_stats``, ``read_run``, ``open_run``, ``build_index``,
``tar_urls``) take a handle or a URI (opened on the spot) for callers that look once. ``run.json`` and
stats files are checked for the shape the writers give them before use: a file of another shape is a
``DatasetError`` naming the file and the field, never a KeyError or TypeError further on.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import uuid
from dataclasses import dataclass, field, replace

import fsspec

from .paths import (
    INDEX_FILE,
    RUN_FILE,
    dump_json,
    fs_and_root,
    is_local,
    join,
    shard_name,
    storage_errors,
    url_for,
    write_atomic,
)
from .safe_json import loads as safe_loads
from .schema import SCHEMA_VERSION, json_sha256

log = logging.getLogger(__name__)

_SHARD_FILE = re.compile(r"^(\d{6})\.(tar|parquet|stats\.json)$")
_COUNTS = ("samples", "failures", "filtered", "objects")  # the counts of a stats file, summed by the index


class DatasetError(ValueError):
    """A dataset folder that cannot be used as asked (not writable, a file in its place), or one of its
    files (``run.json``, a stats file) that is not what the writers write: the message names the file
    and the field."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard's files; ``complete`` when its stats file exists."""

    name: str
    tar: str
    parquet: str
    stats: str
    complete: bool
    has_tar: bool
    has_parquet: bool

    @property
    def id(self) -> int:
        return int(self.name)


@dataclass(frozen=True)
class DatasetHandle:
    """One dataset folder, resolved once: its URI, filesystem and root, and its checked run record."""

    uri: str  # as the user gave it: what messages name
    fs: fsspec.AbstractFileSystem = field(repr=False)
    root: str  # the folder's path inside ``fs``
    run: dict | None = field(default=None, repr=False, compare=False)  # run.json, once open_run checked it

    @classmethod
    def open(cls, uri: str) -> DatasetHandle:
        """The handle of ``uri`` (nothing is read or written); an unknown scheme is a DatasetError."""
        try:
            fs, root = fs_and_root(str(uri))
        except (ValueError, ImportError) as e:  # fsspec: "Protocol not known", or its package missing
            raise DatasetError(f"{uri}: not a usable location ({e})") from None
        return cls(str(uri), fs, root)

    @classmethod
    def create(cls, uri: str) -> DatasetHandle:
        """The handle of a dataset to write at ``uri``, checked before any work: a folder or nothing yet,
        and writable. The check writes a probe file there and removes it, and a local folder it had to
        make too (a run stopped by its inputs leaves no empty output behind)."""
        handle = cls.open(uri).check_folder()
        made = _missing_folders(handle) if is_local(handle.fs) else []
        probe = handle.path(f".write-check-{uuid.uuid4().hex}")
        try:
            handle.fs.makedirs(handle.root, exist_ok=True)
            with handle.fs.open(probe, "wb") as f:
                f.write(b"")
            handle.fs.rm(probe)
            for folder in made:  # deepest first
                handle.fs.rmdir(folder)
        except storage_errors():
            raise  # no credentials, no endpoint: the CLIs name these as they are
        except (OSError, NotImplementedError, ValueError) as e:
            raise DatasetError(f"{uri}: cannot be written ({_why_not_written(handle.fs, e)})") from None
        return handle

    def check_folder(self) -> DatasetHandle:
        """``self`` unless an existing file stands where the folder should be (DatasetError)."""
        if self.exists() and not self.fs.isdir(self.root):
            raise DatasetError(f"{self.uri}: is an existing file, not a dataset folder (give a new folder, or the "
                               "folder of a previous run to resume it)")
        return self

    def path(self, *parts: str) -> str:
        """A path inside the dataset, in its filesystem."""
        return join(self.root, *parts)

    def url(self, *parts: str) -> str:
        """A path inside the dataset usable by another process or library (``paths.url_for``)."""
        return url_for(self.fs, self.path(*parts))

    def shard_path(self, shard_id: int, kind: str) -> str:
        """The path of shard ``shard_id``'s ``tar``, ``parquet`` or ``stats.json``."""
        return self.path(f"{shard_name(shard_id)}.{kind}")

    def _fresh(self) -> None:
        # Listings an object store client cached (of the root and its parents) are dropped: each
        # look at the folder asks the store again (a single LIST; nothing on local paths).
        self.fs.invalidate_cache(self.root)

    def exists(self) -> bool:
        """Whether the folder exists now."""
        self._fresh()
        return self.fs.exists(self.root)

    def shards(self, missing_ok: bool = False) -> list[ShardInfo]:
        """Every shard, sorted, each marked complete (stats present) or not, from a listing made now
        (never cached: see the module doc). A folder that does not exist is FileNotFoundError, or no
        shards with ``missing_ok``."""
        if not self.exists():
            if missing_ok:
                return []
            raise FileNotFoundError(f"dataset {self.uri!r} does not exist")
        found: dict[str, set[str]] = {}
        for path in self.fs.ls(self.root, detail=False):
            m = _SHARD_FILE.match(path.rstrip("/").rsplit("/", 1)[-1])
            if m:
                found.setdefault(m.group(1), set()).add(m.group(2))
        return [
            ShardInfo(
                name=name,
                tar=self.url(f"{name}.tar"),
                parquet=self.url(f"{name}.parquet"),
                stats=self.url(f"{name}.stats.json"),
                complete="stats.json" in kinds,
                has_tar="tar" in kinds,
                has_parquet="parquet" in kinds,
            )
            for name, kinds in sorted(found.items())
        ]

    def read_stats(self, shard: ShardInfo) -> dict:
        """The checked stats file of a complete shard (``check_stats``)."""
        return check_stats(_read_json(self.fs, self.shard_path(shard.id, "stats.json"), shard.stats), shard.stats)

    def read_run(self) -> dict | None:
        """``run.json`` as it is now on storage, checked (``check_run``), or None when there is none yet."""
        self._fresh()
        path = self.path(RUN_FILE)
        if not self.fs.exists(path):
            return None
        return check_run(_read_json(self.fs, path, self.url(RUN_FILE)), self.url(RUN_FILE))

    def open_run(self, config: dict, extra: dict | None = None, new_run: bool = False) -> DatasetHandle:
        """This handle with its run record: ``run.json`` created for ``config``, or the existing one
        checked to have the same fingerprint.

        ``config`` is what defines the output (models, prompts, thresholds); ``extra`` (package versions,
        host, time) is recorded but not fingerprinted. A mismatch is refused unless ``new_run`` is set,
        which starts over: existing shards are deleted so no shard mixes two configurations.
        """
        self.fs.makedirs(self.root, exist_ok=True)
        fp = fingerprint(config)
        existing = self.read_run()
        if existing is not None and existing["fingerprint"] != fp:
            if not new_run:
                changed = config_diff(existing["config"], config)
                shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
                raise RunMismatchError(
                    f"{self.uri}: run.json was written by a different configuration "
                    f"(fingerprint {existing['fingerprint'][:12]} != {fp[:12]}"
                    + (f"; differs in {shown}" if changed else "") + "); use the same config "
                    "to resume, another output folder, or --new-run to discard the existing shards"
                )
            for s in self.shards():
                for kind in ("stats.json", "tar", "parquet"):
                    path = self.shard_path(s.id, kind)
                    if self.fs.exists(path):
                        self.fs.rm(path)
            log.warning("%s: configuration changed, existing shards removed (--new-run)", self.uri)
            existing = None
        if existing is None:
            existing = {"fingerprint": fp, "config": config, **(extra or {})}
            write_atomic(self.fs, self.path(RUN_FILE), dump_json(existing))
        return replace(self, run=existing)

    def build_index(self) -> dict:
        """Rebuild ``index.json`` (shard -> counts, totals) from the stats files, and write it."""
        shards = {}
        for s in self.shards():
            if s.complete:
                st = self.read_stats(s)
                shards[s.name] = {k: st[k] for k in (*_COUNTS, "tar_sha256")}
        totals = {k: sum(v[k] for v in shards.values()) for k in _COUNTS}
        index = {"schema_version": SCHEMA_VERSION, "shards": shards, "totals": totals}
        write_atomic(self.fs, self.path(INDEX_FILE), dump_json(index))
        return index


def _missing_folders(handle: DatasetHandle) -> list[str]:
    """The local folders, from the root up, that do not exist yet."""
    missing, folder = [], handle.root
    while folder and not handle.fs.exists(folder):
        missing.append(folder)
        parent = posixpath.dirname(folder)
        folder = "" if parent == folder else parent
    return missing


def _why_not_written(fs: fsspec.AbstractFileSystem, e: BaseException) -> str:
    if isinstance(e, NotImplementedError):  # fsspec's HTTP filesystem (and other read-only ones)
        return f"{type(fs).__name__} is read-only; give a local folder or an object store URI such as s3://bucket/folder"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


# --- the shape of run.json and of a stats file --------------------------------------------------------


def _read_json(fs: fsspec.AbstractFileSystem, path: str, where: str) -> object:
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        return safe_loads(data)
    except ValueError as e:  # bad JSON, bad UTF-8, nested too deep, an integer too long (safe_json)
        raise DatasetError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _kind(v: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), f"a {type(v).__name__}")


def _require(record: dict, name: str, ok, expected: str, where: str, optional: bool = False) -> None:
    if name not in record:
        if not optional:
            raise DatasetError(f"{where}: field {name!r} is missing (expected {expected})")
    elif not ok(record[name]):
        raise DatasetError(f"{where}: field {name!r} must be {expected}, got {_kind(record[name])} "
                           f"{_shown(record[name])}")


def _object(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: must hold a JSON object, got {_kind(value)} {_shown(value)}")
    return value


def check_stats(stats: object, where: str) -> dict:
    """``stats`` (a parsed ``NNNNNN.stats.json``) if it has the shape ``ShardWriter`` writes: the counts,
    ``failures_by_stage`` and ``tar_sha256`` (``tar_bytes`` too, when recorded); else DatasetError naming
    ``where`` and the field. Whether the values match the shard is ``shards.validate``'s business."""
    record = _object(stats, where)
    for name in _COUNTS:
        _require(record, name, _is_count, "a count (an integer >= 0)", where)
    _require(record, "failures_by_stage", lambda v: isinstance(v, dict) and all(map(_is_count, v.values())),
             "an object of stage -> count", where)
    _require(record, "tar_sha256", lambda v: isinstance(v, str), "a sha256 (hex string)", where)
    _require(record, "tar_bytes", _is_count, "a size in bytes (an integer >= 0)", where, optional=True)
    return record


def check_run(run: object, where: str) -> dict:
    """``run`` (a parsed ``run.json``) if it holds a ``fingerprint`` string and a ``config`` object, the
    fields resumes compare; else DatasetError naming ``where`` and the field."""
    record = _object(run, where)
    _require(record, "fingerprint", lambda v: isinstance(v, str), "a string (sha256 of the config)", where)
    _require(record, "config", lambda v: isinstance(v, dict), "an object (the run's configuration)", where)
    return record


# --- for callers that look once: a handle or a URI ---------------------------------------------------


def as_handle(dataset: str | DatasetHandle) -> DatasetHandle:
    """``dataset`` if it is a handle, else the handle of that URI."""
    return dataset if isinstance(dataset, DatasetHandle) else DatasetHandle.open(dataset)


def list_shards(dataset: str | DatasetHandle) -> list[ShardInfo]:
    """Every shard of a dataset, from a listing made now (``DatasetHandle.shards``)."""
    return as_handle(dataset).shards()


def tar_urls(dataset: str | DatasetHandle, complete_only: bool = True) -> list[str]:
    """The tar paths/URLs of a dataset's shards, for webdataset or Ray."""
    return [s.tar for s in list_shards(dataset) if s.has_tar and (s.complete or not complete_only)]


def read_stats(dataset: str | DatasetHandle, shard: ShardInfo) -> dict:
    """The checked stats file of a complete shard."""
    return as_handle(dataset).read_stats(shard)


def build_index(dataset: str | DatasetHandle) -> dict:
    """Rebuild ``index.json`` from the stats files, and write it."""
    return as_handle(dataset).build_index()


def read_run(dataset: str | DatasetHandle) -> dict | None:
    """The checked ``run.json``, or None when the dataset has none yet."""
    return as_handle(dataset).read_run()


def open_run(dataset: str | DatasetHandle, config: dict, extra: dict | None = None, new_run: bool = False) -> dict:
    """Create or check ``run.json`` (``DatasetHandle.open_run``); returns the run record."""
    return as_handle(dataset).open_run(config, extra, new_run).run


def fingerprint(config: dict) -> str:
    """sha256 of the canonical JSON of a config: what makes two runs the same run."""
    return json_sha256(config)


class RunMismatchError(RuntimeError):
    """The dataset was made by a different configuration than the one asked for."""


def config_diff(old: object, new: object, path: str = "") -> list[str]:
    """``"a.b: old -> new"`` for each field that differs between two JSON configs (nested mappings
    are walked; any other value is compared whole; a missing field shows as ``(absent)``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                out.append(f"{where}: {_shown(old.get(key), key in old)} -> {_shown(new.get(key), key in new)}")
            else:
                out += config_diff(old[key], new[key], where)
        return out
    return [] if old == new else [f"{path or '(config)'}: {_shown(old)} -> {_shown(new)}"]


def _shown(value: object, present: bool = True) -> str:
    if not present:
        return "(absent)"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."

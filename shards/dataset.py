"""A dataset folder: its shards (complete or not), ``index.json`` and ``run.json``."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from .paths import INDEX_FILE, RUN_FILE, dump_json, fs_and_root, join, url_for, write_atomic
from .schema import SCHEMA_VERSION, json_sha256

log = logging.getLogger(__name__)

_SHARD_FILE = re.compile(r"^(\d{6})\.(tar|parquet|stats\.json)$")


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


def list_shards(dataset: str) -> list[ShardInfo]:
    """Every shard of a dataset, sorted, each marked complete (stats present) or not."""
    fs, root = fs_and_root(dataset)
    if not fs.exists(root):
        raise FileNotFoundError(f"dataset {dataset!r} does not exist")
    found: dict[str, set[str]] = {}
    for path in fs.ls(root, detail=False):
        m = _SHARD_FILE.match(path.rstrip("/").rsplit("/", 1)[-1])
        if m:
            found.setdefault(m.group(1), set()).add(m.group(2))
    return [
        ShardInfo(
            name=name,
            tar=url_for(fs, join(root, f"{name}.tar")),
            parquet=url_for(fs, join(root, f"{name}.parquet")),
            stats=url_for(fs, join(root, f"{name}.stats.json")),
            complete="stats.json" in kinds,
            has_tar="tar" in kinds,
            has_parquet="parquet" in kinds,
        )
        for name, kinds in sorted(found.items())
    ]


def tar_urls(dataset: str, complete_only: bool = True) -> list[str]:
    """The tar paths/URLs of a dataset's shards, for webdataset or Ray."""
    return [s.tar for s in list_shards(dataset) if s.has_tar and (s.complete or not complete_only)]


def read_stats(dataset: str, shard: ShardInfo) -> dict:
    """The parsed stats file of a complete shard."""
    fs, _ = fs_and_root(dataset)
    with fs.open(fs_and_root(shard.stats)[1], "rb") as f:
        return json.load(f)


def build_index(dataset: str) -> dict:
    """Rebuild ``index.json`` (shard -> counts, totals) from the stats files, and write it."""
    fs, root = fs_and_root(dataset)
    shards = {}
    for s in list_shards(dataset):
        if not s.complete:
            continue
        st = read_stats(dataset, s)
        shards[s.name] = {k: st[k] for k in ("samples", "failures", "filtered", "objects", "tar_sha256")}
    totals = {
        k: sum(v[k] for v in shards.values()) for k in ("samples", "failures", "filtered", "objects")
    }
    index = {"schema_version": SCHEMA_VERSION, "shards": shards, "totals": totals}
    write_atomic(fs, join(root, INDEX_FILE), dump_json(index))
    return index


def fingerprint(config: dict) -> str:
    """sha256 of the canonical JSON of a config: what makes two runs the same run."""
    return json_sha256(config)


class RunMismatchError(RuntimeError):
    """The dataset was made by a different configuration than the one asked for."""


def read_run(dataset: str) -> dict | None:
    """The parsed ``run.json``, or None when the dataset has none yet."""
    fs, root = fs_and_root(dataset)
    path = join(root, RUN_FILE)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.load(f)


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


def open_run(dataset: str, config: dict, extra: dict | None = None, new_run: bool = False) -> dict:
    """Create ``run.json`` for ``config``, or check that an existing one has the same fingerprint.

    ``config`` is what defines the output (models, prompts, thresholds); ``extra`` (package versions,
    host, time) is recorded but not fingerprinted. A mismatch is refused unless ``new_run`` is set,
    which starts over: existing shards are deleted so no shard mixes two configurations.
    """
    fs, root = fs_and_root(dataset)
    fs.makedirs(root, exist_ok=True)
    fp = fingerprint(config)
    existing = read_run(dataset)
    if existing is not None and existing.get("fingerprint") != fp:
        if not new_run:
            changed = config_diff(existing.get("config", {}), config)
            shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
            raise RunMismatchError(
                f"{dataset}: run.json was written by a different configuration "
                f"(fingerprint {existing.get('fingerprint', '?')[:12]} != {fp[:12]}"
                + (f"; differs in {shown}" if changed else "") + "); use the same config "
                "to resume, another output folder, or --new-run to discard the existing shards"
            )
        for s in list_shards(dataset):
            for p in (s.stats, s.tar, s.parquet):
                path = fs_and_root(p)[1]
                if fs.exists(path):
                    fs.rm(path)
        log.warning("%s: configuration changed, existing shards removed (--new-run)", dataset)
        existing = None
    if existing is None:
        run = {"fingerprint": fp, "config": config, **(extra or {})}
        write_atomic(fs, join(root, RUN_FILE), dump_json(run))
        return run
    return existing

"""Check every shard of a dataset against the contract and list each problem with shard and key."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass

import pandas as pd
from PIL import Image

from .dataset import ShardInfo, list_shards
from .paths import fs_and_root
from .schema import SampleRecord, SchemaError
from .writer import IMAGE_EXTS, STATUS_FAILED, STATUS_FILTERED, STATUS_OK


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset."""

    shard: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"shard {self.shard}" + (f" key {self.key}" if self.key else "")
        return f"{where}: {self.message}"


def _read_bytes(url: str) -> bytes:
    fs, path = fs_and_root(url)
    with fs.open(path, "rb") as f:
        return f.read()


def _tar_members(data: bytes, shard: str, problems: list[Problem]) -> dict[str, dict[str, bytes]]:
    """Group members by key; a truncated or corrupt tar is reported, keeping what could be read."""
    by_key: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = m.name.rsplit("/", 1)[-1]
                key, _, ext = name.partition(".")
                f = tar.extractfile(m)
                content = f.read() if f is not None else b""
                if len(content) != m.size:
                    raise tarfile.ReadError(f"member {m.name} is truncated")
                by_key.setdefault(key, {})[ext] = content
            # tarfile stops quietly at a cut-off header past the first member: a complete archive
            # ends with two zero blocks right after the last member.
            end = tar.offset
            if len(data) < end + 1024 or data[end : end + 1024].strip(b"\0"):
                raise tarfile.ReadError(f"truncated: no end-of-archive marker after byte {end}")
    except (tarfile.TarError, EOFError, OSError) as e:
        problems.append(Problem(shard, None, f"tar is unreadable or truncated: {e}"))
    return by_key


def _check_samples(shard: str, by_key: dict[str, dict[str, bytes]], problems: list[Problem]) -> dict[str, SampleRecord]:
    records = {}
    for key, members in sorted(by_key.items()):
        if "json" not in members:
            problems.append(Problem(shard, key, "json member is missing"))
            continue
        images = [e for e in members if e in IMAGE_EXTS]
        if len(images) != 1:
            problems.append(Problem(shard, key, f"expected one image member, found {sorted(members)}"))
            continue
        try:
            rec = SampleRecord.from_json_bytes(members["json"], where=f"shard {shard}")
        except SchemaError as e:
            problems.append(Problem(shard, key, str(e)))
            continue
        if rec.key != key:
            problems.append(Problem(shard, key, f"json field 'key' is {rec.key!r}, member name says {key!r}"))
        try:
            with Image.open(io.BytesIO(members[images[0]])) as im:
                size = im.size
        except Exception as e:  # noqa: BLE001 — PIL raises many types for bad bytes
            problems.append(Problem(shard, key, f"image does not decode: {e}"))
            continue
        if size != (rec.width, rec.height):
            problems.append(Problem(shard, key, f"image is {size[0]}x{size[1]}, json says {rec.width}x{rec.height}"))
        records[key] = rec
    return records


def _check_parquet(shard: ShardInfo, keys: set[str], problems: list[Problem]) -> pd.DataFrame | None:
    try:
        df = pd.read_parquet(io.BytesIO(_read_bytes(shard.parquet)))
    except Exception as e:  # noqa: BLE001 — pyarrow raises several types for a bad file
        problems.append(Problem(shard.name, None, f"parquet unreadable: {e}"))
        return None
    dup = df.key[df.key.duplicated()].tolist()
    for k in dup:
        problems.append(Problem(shard.name, k, "key appears twice in parquet"))
    bad_status = set(df.status) - {STATUS_OK, STATUS_FAILED, STATUS_FILTERED}
    if bad_status:
        problems.append(Problem(shard.name, None, f"parquet has unknown status values {sorted(bad_status)}"))
    ok = set(df.key[df.status == STATUS_OK])
    for k in sorted(ok - keys):
        problems.append(Problem(shard.name, k, "parquet says ok but the sample is not in the tar"))
    for k in sorted(keys - ok):
        problems.append(Problem(shard.name, k, "sample in the tar has no ok row in parquet"))
    for k in df.key[(df.status != STATUS_OK) & (df.error_stage.isna() | df.error.isna())]:
        problems.append(Problem(shard.name, k, "failure row without error_stage/error"))
    return df


def _check_stats(shard: ShardInfo, tar_bytes: bytes, records: dict, df: pd.DataFrame | None, problems: list[Problem]) -> None:
    try:
        stats = json.loads(_read_bytes(shard.stats))
    except Exception as e:  # noqa: BLE001
        problems.append(Problem(shard.name, None, f"stats unreadable: {e}"))
        return
    expect = {
        "samples": len(records),
        "objects": sum(len(r.objects) for r in records.values()),
        "tar_bytes": len(tar_bytes),
        "tar_sha256": hashlib.sha256(tar_bytes).hexdigest(),
    }
    if df is not None:
        expect["failures"] = int((df.status == STATUS_FAILED).sum())
        expect["filtered"] = int((df.status == STATUS_FILTERED).sum())
    for k, v in expect.items():
        if stats.get(k) != v:
            problems.append(Problem(shard.name, None, f"stats {k} is {stats.get(k)!r}, the shard has {v!r}"))


def validate_shard(shard: ShardInfo) -> list[Problem]:
    """Every problem of one shard (empty list when it is sound)."""
    problems: list[Problem] = []
    if not shard.complete:
        problems.append(Problem(shard.name, None, "incomplete: no stats file (the run did not finish this shard)"))
    if not shard.has_tar or not shard.has_parquet:
        missing = [n for n, h in (("tar", shard.has_tar), ("parquet", shard.has_parquet)) if not h]
        problems.append(Problem(shard.name, None, f"missing {' and '.join(missing)}"))
        return problems
    tar_bytes = _read_bytes(shard.tar)
    by_key = _tar_members(tar_bytes, shard.name, problems)
    records = _check_samples(shard.name, by_key, problems)
    df = _check_parquet(shard, set(by_key), problems)
    if shard.complete:
        _check_stats(shard, tar_bytes, records, df, problems)
    return problems


def validate_dataset(dataset: str) -> list[Problem]:
    """Every problem of every shard of a dataset."""
    shards = list_shards(dataset)
    if not shards:
        return [Problem("-", None, f"{dataset} holds no shards")]
    return [p for s in shards for p in validate_shard(s)]

"""Check every shard of a dataset against the contract and list each problem with shard, key and member.

Validation reads each tar with the project's one tar reader (``shards.reader.tar_samples``), so it
sees the keys every loader sees: a member stored under a directory, an absolute path or ``..`` is
reported by its full name, a key stored twice, a link or any member that is not a file is named, and
every mask RLE is decoded with pycocotools. The tar is streamed once (hashed as it is read, never held
whole), so its size and sha256 are compared with its stats file as well.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import pandas as pd
from PIL import Image

from .dataset import ShardInfo, check_stats, list_shards, read_stats
from .masks import rle_problem
from .paths import fs_and_root, open_sequential, url_for
from .reader import (
    MAX_IMAGE_PIXELS,
    HashingReader,
    RawSample,
    ShardReadError,
    TarProblem,
    raw_samples,
    tar_samples,
)
from .safe_json import loads as safe_loads
from .schema import (
    META_CAPTIONS,
    META_COCO_ANNOTATION_IDS,
    META_COCO_CATEGORY_IDS,
    META_COCO_CROWD,
    META_COCO_FILE_NAME,
    META_COCO_IMAGE_ID,
    META_COCO_SUPERCATEGORIES,
    STATUS_FAILED,
    STATUS_FILTERED,
    STATUS_OK,
    SampleRecord,
    SchemaError,
    check_key,
)
from .writer import IMAGE_EXTS, PARQUET_COLUMNS

_HASH_BLOCK = 1 << 20  # bytes read at a time when hashing a tar


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset."""

    shard: str
    key: str | None
    message: str
    member: str | None = None  # the tar member at fault, its name exactly as stored

    def __str__(self) -> str:
        where = f"shard {self.shard}" + (f" key {self.key}" if self.key else "")
        where += f" member {self.member!r}" if self.member else ""
        return f"{where}: {self.message}"


def _read_bytes(url: str) -> bytes:
    fs, path = fs_and_root(url)
    with fs.open(path, "rb") as f:
        return f.read()


def _valid_key(key: str) -> bool:
    try:
        check_key(key)
    except SchemaError:
        return False
    return True


def _check_names(shard: str, raw: RawSample, problems: list[Problem]) -> None:
    """Member names the writer never produces: readers would see other keys than the records say."""
    for name in raw.names:
        if name.startswith("/") or ".." in name.split("/"):
            problems.append(Problem(shard, raw.key, "member name is absolute or holds '..'", name))
        elif "/" in name:
            problems.append(Problem(shard, raw.key, f"member name has a directory part: readers see key {raw.key!r}", name))
        elif not _valid_key(raw.key):
            problems.append(Problem(shard, raw.key, "member name gives an invalid key", name))


def _check_masks(shard: str, key: str, rec: SampleRecord, problems: list[Problem]) -> None:
    for i, obj in enumerate(rec.objects):
        if obj.mask is not None:
            why = rle_problem(obj.mask)
            if why:
                problems.append(Problem(shard, key, f"objects[{i}].mask: {why}", f"{key}.json"))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def meta_problems(rec: SampleRecord) -> list[str]:
    """The META_* keys of ``rec.meta`` that do not hold their fixed type (lists per object: one each)."""
    m, n, out = rec.meta, len(rec.objects), []
    per_object = {META_COCO_CATEGORY_IDS: _is_int, META_COCO_ANNOTATION_IDS: _is_int,
                  META_COCO_SUPERCATEGORIES: lambda v: isinstance(v, str)}
    for name, ok in per_object.items():
        if name in m and not (isinstance(m[name], list) and len(m[name]) == n and all(map(ok, m[name]))):
            out.append(f"meta.{name} must hold one {'int' if ok is _is_int else 'str'} per object ({n})")
    if META_CAPTIONS in m and not (isinstance(m[META_CAPTIONS], list) and all(isinstance(c, str) for c in m[META_CAPTIONS])):
        out.append(f"meta.{META_CAPTIONS} must be a list of strings")
    if META_COCO_IMAGE_ID in m and not _is_int(m[META_COCO_IMAGE_ID]):
        out.append(f"meta.{META_COCO_IMAGE_ID} must be an integer")
    if META_COCO_FILE_NAME in m and not isinstance(m[META_COCO_FILE_NAME], str):
        out.append(f"meta.{META_COCO_FILE_NAME} must be a string")
    crowd = m.get(META_COCO_CROWD, [])
    if not isinstance(crowd, list) or not all(isinstance(c, dict) for c in crowd):
        return [*out, f"meta.{META_COCO_CROWD} must be a list of objects"]
    for i, c in enumerate(crowd):
        seg = c.get("segmentation")
        if seg is None:
            why = None
        elif not isinstance(seg, dict) or not isinstance(seg.get("counts"), str):
            why = "must be a compressed RLE (string counts) or null"
        else:
            why = rle_problem(seg)
        bbox = c.get("bbox")
        if not _is_int(c.get("category_id")) or not isinstance(bbox, list) or len(bbox) != 4 or \
                not all(map(_is_number, bbox)) or not isinstance(c.get("name"), str) or \
                not isinstance(c.get("supercategory"), str) or ("id" in c and not _is_int(c["id"])):
            out.append(f"meta.{META_COCO_CROWD}[{i}] needs an integer category_id (and id, if any), a 4-number bbox "
                       "and string name and supercategory")
        elif why:
            out.append(f"meta.{META_COCO_CROWD}[{i}].segmentation: {why}")
    return out


def _check_sample(shard: str, raw: RawSample, problems: list[Problem]) -> SampleRecord | None:
    """The record of a sound sample; each problem of an unsound one is appended, and None returned."""
    key, members = raw.key, raw.members
    name = dict(zip(members, raw.names, strict=False))
    if not _valid_key(key):
        return None  # _check_names reports the member
    for ext in sorted(e for e in members if e != "json" and e not in IMAGE_EXTS):
        problems.append(Problem(shard, key, "member of an unknown kind (expected json and one image)", name.get(ext)))
    if "json" not in members:
        problems.append(Problem(shard, key, "json member is missing"))
        return None
    images = [e for e in members if e in IMAGE_EXTS]
    if len(images) != 1:
        problems.append(Problem(shard, key, f"expected one image member, found {sorted(members)}"))
        return None
    try:
        rec = SampleRecord.from_json_bytes(members["json"], where=f"shard {shard}")
    except SchemaError as e:
        problems.append(Problem(shard, key, str(e), f"{key}.json"))
        return None
    if rec.key != key:
        problems.append(Problem(shard, key, f"json field 'key' is {rec.key!r}, member name says {key!r}", f"{key}.json"))
    _check_masks(shard, key, rec, problems)
    problems.extend(Problem(shard, key, why, f"{key}.json") for why in meta_problems(rec))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(io.BytesIO(members[images[0]])) as im:
                size = w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    problems.append(Problem(shard, key, f"image is {w}x{h} = {w * h} pixels, more than {MAX_IMAGE_PIXELS} "
                                                        "(shards.reader.MAX_IMAGE_PIXELS): not decoded", f"{key}.{images[0]}"))
                    return None
                if im.format == "JPEG":  # an eighth of the pixels, every byte of the entropy-coded data still read
                    im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
                im.load()  # a file cut short opens (the header is whole) but does not decode
    except Exception as e:  # noqa: BLE001 — PIL raises many types for bad bytes (a bomb's header included)
        problems.append(Problem(shard, key, f"image does not decode: {e}", f"{key}.{images[0]}"))
        return None
    if size != (rec.width, rec.height):
        problems.append(Problem(shard, key, f"image is {size[0]}x{size[1]}, json says {rec.width}x{rec.height}"))
    return rec


def _tar_problem(shard: str, p: TarProblem) -> Problem:
    return Problem(shard, p.key, p.message, p.member)


def _check_tar(shard: ShardInfo, problems: list[Problem]) -> tuple[dict, set[str]] | None:
    """Stream the tar once: each sample checked, the whole hashed. Returns what the stats should say
    (samples, objects, tar_bytes, tar_sha256) and every key the readers see; None if it cannot be opened."""
    try:
        f = open_sequential(shard.tar)
    except (OSError, ValueError) as e:
        problems.append(Problem(shard.name, None, f"tar cannot be opened: {type(e).__name__}: {e}"))
        return None
    samples, objects, keys, found = 0, 0, set(), []
    with f:
        hashed = HashingReader(f)
        try:
            for raw in tar_samples(hashed, shard.tar, found):
                keys.add(raw.key)
                _check_names(shard.name, raw, problems)
                rec = _check_sample(shard.name, raw, problems)
                if rec is not None:
                    samples, objects = samples + 1, objects + len(rec.objects)
        except ShardReadError as e:
            problems.append(Problem(shard.name, None, f"tar is unreadable or truncated: {e}"))
        try:
            hashed.drain()
        except (OSError, ValueError) as e:
            problems.append(Problem(shard.name, None, f"tar cannot be read to its end: {type(e).__name__}: {e}"))
    problems.extend(_tar_problem(shard.name, p) for p in found)
    return {"samples": samples, "objects": objects, "tar_bytes": hashed.size, "tar_sha256": hashed.hexdigest()}, keys


def _check_parquet(shard: ShardInfo, keys: set[str], problems: list[Problem]) -> pd.DataFrame | None:
    try:
        df = pd.read_parquet(io.BytesIO(_read_bytes(shard.parquet)))
    except Exception as e:  # noqa: BLE001 — pyarrow raises several types for a bad file
        problems.append(Problem(shard.name, None, f"parquet unreadable: {e}"))
        return None
    missing = sorted(set(PARQUET_COLUMNS) - set(df.columns))
    if missing:
        problems.append(Problem(shard.name, None, f"parquet lacks columns {missing}"))
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


def _check_stats(shard: ShardInfo, expect: dict, df: pd.DataFrame | None, problems: list[Problem]) -> None:
    try:
        stats = check_stats(safe_loads(_read_bytes(shard.stats)), shard.stats)  # its shape, naming file and field
    except Exception as e:  # noqa: BLE001
        problems.append(Problem(shard.name, None, f"stats unreadable: {e}"))
        return
    expect = dict(expect)
    if df is not None:
        expect["failures"] = int((df.status == STATUS_FAILED).sum())
        expect["filtered"] = int((df.status == STATUS_FILTERED).sum())
    if "tar_bytes" not in stats:
        del expect["tar_bytes"]  # stats written before the size was recorded: the sha256 still checks it
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
    checked = _check_tar(shard, problems)
    if checked is None:
        return problems
    expect, keys = checked
    df = _check_parquet(shard, keys, problems)
    if shard.complete:
        _check_stats(shard, expect, df, problems)
    return problems


def validate_dataset(dataset: str) -> list[Problem]:
    """Every problem of every shard of a dataset."""
    shards = list_shards(dataset)
    if not shards:
        return [Problem("-", None, f"{dataset} holds no shards")]
    return [p for s in shards for p in validate_shard(s)]


def shard_problem(dataset: str, info: ShardInfo, verify: bool = False, stats: dict | None = None) -> str | None:
    """Why a shard whose stats file exists cannot be trusted, or None when it can: its tar or parquet
    missing, the tar's size not the one its stats recorded (``verify``: nor its sha256). The datagen
    resume redoes such a shard; ``shards info`` flags it. ``stats``: already read by the caller."""
    if not info.has_tar:
        return "its tar is missing"
    if not info.has_parquet:
        return "its parquet is missing"
    if stats is None:
        try:
            stats = read_stats(dataset, info)
        except (OSError, ValueError) as e:
            return f"its stats file is unreadable ({e})"
    fs, tar = fs_and_root(info.tar)
    expected = stats.get("tar_bytes")
    if expected is None:
        # Stats from before the size was recorded: a truncated tar fails to read to its end.
        problem = _unreadable_tar(fs, tar)
        if problem:
            return problem
    else:
        try:
            actual = fs.size(tar)
        except OSError as e:  # a link to nowhere: listed, but not there
            return f"its tar cannot be read ({e.strerror or e})"
        if actual != expected:
            return f"its tar holds {actual} bytes but its stats recorded {expected} (truncated or overwritten)"
    if verify:
        digest = _sha256(fs, tar)
        if digest != stats.get("tar_sha256"):
            return f"its tar's sha256 {digest[:12]} differs from {str(stats.get('tar_sha256'))[:12]} in its stats"
    return None


def _sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _unreadable_tar(fs, path: str) -> str | None:
    try:
        for _ in raw_samples([url_for(fs, path)]):
            pass
    except ShardReadError as e:
        return f"its tar is unreadable ({e})"
    return None

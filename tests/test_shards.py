"""The shard contract: records, writer, reader, validation, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from shards import (
    ObjectRecord,
    SampleRecord,
    SchemaError,
    ShardWriter,
    build_index,
    decode_mask,
    encode_mask,
    iter_samples,
    list_shards,
    mask_to_box,
    open_run,
    validate_dataset,
)
from shards.__main__ import main as cli
from shards.dataset import RunMismatchError


def jpeg(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_record(key: str, w: int = 48, h: int = 32, n_obj: int = 2) -> SampleRecord:
    objs = []
    for i in range(n_obj):
        m = np.zeros((h, w), bool)
        m[2 + i : 10 + i, 3 : 20 + i] = True
        objs.append(
            ObjectRecord(
                box=(3.0, 2.0 + i, 20.5 + i, 10.0 + i),
                phrase=f"thing{i}",
                description=f"a red thing number {i} on the left",
                detector_score=0.5 + i / 10,
                mask=encode_mask(m),
                mask_score=0.9,
                mask_box=mask_to_box(m),
                clip_score=25.0 + i,
            )
        )
    return SampleRecord(
        key=key,
        width=w,
        height=h,
        original_width=w * 2,
        original_height=h * 2,
        source=f"/data/{key}.jpg",
        source_caption="alt text",
        caption="a caption",
        objects=tuple(objs),
        meta={"captions": ["a", "b"]},
    )


def write_dataset(root: Path, n: int = 5, shard_id: int = 0, failures: int = 1) -> list[SampleRecord]:
    recs = [make_record(f"k{shard_id}_{i:03d}") for i in range(n)]
    with ShardWriter(str(root), shard_id) as w:
        for i, r in enumerate(reversed(recs)):  # insertion order must not matter
            w.add(r, jpeg(r.width, r.height, seed=i), "jpg")
        for j in range(failures):
            w.add_failure(f"bad{shard_id}_{j}", f"/data/bad{j}.jpg", "decode", "OSError: truncated")
    return recs


def test_mask_rle_round_trip_and_tight_box():
    m = np.zeros((7, 9), bool)
    m[1:4, 2:6] = True
    rle = encode_mask(m)
    assert isinstance(rle["counts"], str) and rle["size"] == [7, 9]
    assert np.array_equal(decode_mask(rle), m)
    assert mask_to_box(m) == (2.0, 1.0, 6.0, 4.0)
    assert mask_to_box(np.zeros((3, 3), bool)) is None


def test_record_json_round_trip_every_field():
    r = make_record("abc-1_x").validate()
    back = SampleRecord.from_json_bytes(r.to_json_bytes())
    assert back == r
    d = json.loads(r.to_json_bytes())
    # optional fields are present with their one type (schema_version 2): "", NaN, the empty mask
    r2 = SampleRecord(key="k", width=4, height=4, original_width=4, original_height=4,
                      objects=(ObjectRecord(box=(0, 0, 1, 1), phrase="p"),))
    d2 = json.loads(r2.validate().to_json_bytes())
    assert d2["caption"] == "" and d2["objects"][0]["mask"] == {"size": [0, 0], "counts": ""}
    assert np.isnan(d2["objects"][0]["clip_score"]) and d2["meta"] == "{}"
    assert d["schema_version"] == 2


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(key="a.b"), "'key'"),
        (dict(key="a/b"), "'key'"),
        (dict(key="a b"), "'key'"),
        (dict(width=0), "'width'"),
        (dict(objects=(ObjectRecord(box=(0, 0, float("nan"), 5), phrase="p"),)), "objects[0].box"),
        (dict(objects=(ObjectRecord(box=(5, 0, 5, 5), phrase="p"),)), "objects[0].box"),
        (dict(objects=(ObjectRecord(box=(0, 0, 49, 5), phrase="p"),)), "outside"),
        (dict(objects=(ObjectRecord(box=(0, 0, 4, 4), phrase="p", mask=encode_mask(np.ones((5, 5), bool))),)), "objects[0].mask"),
        (dict(objects=(ObjectRecord(box=(0, 0, 4, 4), phrase="p", clip_score=float("inf")),)), "clip_score"),
    ],
)
def test_bad_records_name_key_and_field(change, field):
    base = dict(key="good", width=48, height=32, original_width=48, original_height=32)
    with pytest.raises(SchemaError) as e:
        SampleRecord(**{**base, **change}).validate()
    assert field in str(e.value)
    assert "key" in str(e.value)


def test_newer_schema_version_refused_with_clear_message():
    d = json.loads(make_record("k").validate().to_json_bytes())
    d["schema_version"] = 99
    with pytest.raises(SchemaError, match="newer than this richlayout understands"):
        SampleRecord.from_dict(d)


def test_duplicate_key_in_shard_refused(tmp_path):
    w = ShardWriter(str(tmp_path), 0)
    w.add(make_record("same"), jpeg(48, 32))
    with pytest.raises(SchemaError, match="duplicated"):
        w.add_failure("same", "x", "decode", "boom")


def test_writer_files_parquet_stats_and_index(tmp_path):
    recs = write_dataset(tmp_path, n=4, failures=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.parquet", "000000.stats.json", "000000.tar"]
    df = pd.read_parquet(tmp_path / "000000.parquet")
    assert len(df) == 6 and list(df.key) == sorted(df.key)
    assert (df.status == "ok").sum() == 4 and (df.status == "failed").sum() == 2
    ok = df[df.status == "ok"].iloc[0]
    assert ok.num_objects == 2 and ok.mean_clip_score == pytest.approx(25.5) and ok.min_clip_score == 25.0
    stats = json.loads((tmp_path / "000000.stats.json").read_text())
    assert stats["samples"] == 4 and stats["failures"] == 2 and stats["objects"] == 8
    assert stats["failures_by_stage"] == {"decode": 2}
    assert stats["tar_sha256"] == hashlib.sha256((tmp_path / "000000.tar").read_bytes()).hexdigest()
    write_dataset(tmp_path, n=2, shard_id=1, failures=0)
    index = build_index(str(tmp_path))
    assert index["totals"] == {"samples": 6, "failures": 2, "filtered": 0, "objects": 12}
    assert json.loads((tmp_path / "index.json").read_text()) == index
    assert [s.complete for s in list_shards(str(tmp_path))] == [True, True]
    assert len(recs) == 4


def test_same_samples_give_identical_tar_bytes(tmp_path):
    write_dataset(tmp_path / "a")
    write_dataset(tmp_path / "b")
    a, b = (tmp_path / "a/000000.tar").read_bytes(), (tmp_path / "b/000000.tar").read_bytes()
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()
    with tarfile.open(tmp_path / "a/000000.tar") as t:
        members = t.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}


def test_read_back_with_our_reader_and_stock_webdataset_and_tarfile(tmp_path):
    recs = {r.key: r.validate() for r in write_dataset(tmp_path)}
    got = {s.record.key: s for s in iter_samples(str(tmp_path))}
    assert set(got) == set(recs)
    for k, s in got.items():
        assert s.record == recs[k]
        assert s.image().size == (48, 32)
        masks = s.masks()
        assert masks[0].shape == (32, 48) and np.array_equal(masks[0], decode_mask(recs[k].objects[0].mask))
    raw = list(wds.WebDataset(str(tmp_path / "000000.tar"), shardshuffle=False))
    assert sorted(r["__key__"] for r in raw) == sorted(recs)
    assert all(set(r) >= {"jpg", "json"} for r in raw)
    with tarfile.open(tmp_path / "000000.tar") as t:
        names = t.getnames()
    assert len(names) == 2 * len(recs)


def test_read_with_ray_read_webdataset(tmp_path):
    ray = pytest.importorskip("ray")
    recs = write_dataset(tmp_path, n=3)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        import ray.data

        rows = ray.data.read_webdataset(str(tmp_path / "000000.tar"), decoder=None).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["__key__"] for r in rows) == sorted(r.key for r in recs)
    for r in rows:
        assert SampleRecord.from_json_bytes(r["json"]).key == r["__key__"]


def test_validate_clean_dataset_and_cli(tmp_path, capsys):
    write_dataset(tmp_path)
    assert validate_dataset(str(tmp_path)) == []
    assert cli(["validate", str(tmp_path)]) == 0
    assert cli(["info", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{"):])
    assert info["samples"] == 5 and info["failures"] == 1 and info["inputs"] == 6


def test_validate_reports_truncated_tar_and_missing_json_by_name(tmp_path, capsys):
    write_dataset(tmp_path, shard_id=0)
    write_dataset(tmp_path, shard_id=1)
    t0 = tmp_path / "000000.tar"
    t0.write_bytes(t0.read_bytes()[:3000])
    # Rebuild shard 1's tar without one JSON member.
    t1 = tmp_path / "000001.tar"
    with tarfile.open(t1) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(t1, "w") as t:
        for m, data in members:
            if m.name != "k1_002.json":
                t.addfile(m, io.BytesIO(data))
    problems = [str(p) for p in validate_dataset(str(tmp_path))]
    assert any(p.startswith("shard 000000:") and "truncated" in p for p in problems)
    assert any(p.startswith("shard 000001 key k1_002:") and "json member is missing" in p for p in problems)
    assert cli(["validate", str(tmp_path)]) == 1
    assert "k1_002" in capsys.readouterr().out


def test_validate_reports_incomplete_shard_and_stat_mismatch(tmp_path):
    write_dataset(tmp_path, shard_id=0)
    write_dataset(tmp_path, shard_id=1)
    (tmp_path / "000001.stats.json").unlink()
    st = json.loads((tmp_path / "000000.stats.json").read_text())
    st["samples"] = 99
    (tmp_path / "000000.stats.json").write_text(json.dumps(st))
    problems = [str(p) for p in validate_dataset(str(tmp_path))]
    assert "shard 000001: incomplete: no stats file (the run did not finish this shard)" in problems
    assert "shard 000000: stats samples is 99, the shard has 5" in problems


def test_validate_reports_parquet_tar_disagreement(tmp_path):
    write_dataset(tmp_path)
    p = tmp_path / "000000.parquet"
    df = pd.read_parquet(p)
    df = df[df.key != "k0_001"]
    df.to_parquet(p)
    problems = [str(p) for p in validate_dataset(str(tmp_path))]
    assert "shard 000000 key k0_001: sample in the tar has no ok row in parquet" in problems


def test_run_json_fingerprint_refuses_other_config(tmp_path):
    run = open_run(str(tmp_path), {"a": 1}, extra={"versions": {"x": "1"}})
    assert open_run(str(tmp_path), {"a": 1})["fingerprint"] == run["fingerprint"]
    write_dataset(tmp_path)
    with pytest.raises(RunMismatchError, match="different configuration"):
        open_run(str(tmp_path), {"a": 2})
    open_run(str(tmp_path), {"a": 2}, new_run=True)
    assert list_shards(str(tmp_path)) == []


def test_fsspec_memory_filesystem_round_trip():
    url = "memory://rl-test/ds"
    recs = write_dataset_url(url)
    shards = list_shards(url)
    assert [s.complete for s in shards] == [True]
    assert validate_dataset(url) == []
    assert build_index(url)["totals"]["samples"] == len(recs)


def write_dataset_url(url: str) -> list[SampleRecord]:
    recs = [make_record(f"m{i}") for i in range(3)]
    with ShardWriter(url, 0) as w:
        for r in recs:
            w.add(r, jpeg(r.width, r.height))
    return recs


def test_cli_help_on_every_command(capsys):
    for cmd in ([], ["validate"], ["info"], ["to-coco"], ["from-coco"], ["report"], ["index"]):
        with pytest.raises(SystemExit) as e:
            cli([*cmd, "--help"])
        assert e.value.code == 0
    assert "from-coco" in capsys.readouterr().out


def test_network_is_blocked_in_tests():
    import socket

    s = socket.socket()
    try:
        with pytest.raises(ConnectionRefusedError, match="offline"):
            s.connect(("203.0.113.7", 443))  # TEST-NET-3: never routed
    finally:
        s.close()


# --- what readers see, canonical JSON, paths, CLI mistakes ------------------------------------------


def _rewrite_tar(path: Path, change) -> None:
    """Rewrite a shard's tar with ``change(members) -> members`` ((name, bytes) pairs)."""
    from shards.writer import build_tar

    with tarfile.open(path) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    path.write_bytes(build_tar(change(members)))


def reseal(tar: Path) -> None:
    """Record a rewritten tar's size and sha256 in its stats file, as if it had been written that way:
    what readers then find is the content's fault, not a changed file's."""
    import hashlib

    stats = tar.with_name(tar.name.replace(".tar", ".stats.json"))
    data = tar.read_bytes()
    d = json.loads(stats.read_text())
    stats.write_text(json.dumps({**d, "tar_bytes": len(data), "tar_sha256": hashlib.sha256(data).hexdigest()}))


def test_validate_names_members_under_directories_absolute_or_dotdot(tmp_path):
    write_dataset(tmp_path)

    def add_evil(members):
        extra = [(f"{prefix}{n}", d) for n, d in members if n.startswith("k0_001.") for prefix in ("evil/",)]
        extra += [("../k0_009.json", b"{}"), ("/abs/k0_010.json", b"{}")]
        return members + extra

    _rewrite_tar(tmp_path / "000000.tar", add_evil)
    problems = [str(p) for p in validate_dataset(str(tmp_path))]
    assert "shard 000000 key evil/k0_001 member 'evil/k0_001.jpg': member name has a directory part: " \
           "readers see key 'evil/k0_001'" in problems
    assert "shard 000000 key evil/k0_001 member 'evil/k0_001.json': member name has a directory part: " \
           "readers see key 'evil/k0_001'" in problems
    assert "shard 000000 key ../k0_009 member '../k0_009.json': member name is absolute or holds '..'" in problems
    assert "shard 000000 key /abs/k0_010 member '/abs/k0_010.json': member name is absolute or holds '..'" in problems


def test_validate_reports_a_key_stored_twice(tmp_path):
    write_dataset(tmp_path)
    # the same member twice (build_tar sorts: the copy follows the first): readers use the first only
    _rewrite_tar(tmp_path / "000000.tar", lambda ms: ms + [("k0_000.json", dict(ms)["k0_000.json"])])
    with tarfile.open(tmp_path / "000000.tar") as t:
        names = t.getnames()
    assert names.count("k0_000.json") == 2
    problems = [str(p) for p in validate_dataset(str(tmp_path))]
    assert "shard 000000 key k0_000 member 'k0_000.json': key 'k0_000' is stored twice: this later copy is " \
           "not used" in problems, problems


def test_validate_decodes_every_mask_and_names_shard_key_object(tmp_path):
    write_dataset(tmp_path)

    def break_mask(members):
        out = []
        for name, data in members:
            if name == "k0_002.json":
                d = json.loads(data)
                # pycocotools decodes this one run to uninitialized pixels past the first
                d["objects"][1]["mask"]["counts"] = "1"
                data = json.dumps(d).encode()
            out.append((name, data))
        return out

    _rewrite_tar(tmp_path / "000000.tar", break_mask)
    problems = [str(p) for p in validate_dataset(str(tmp_path))]
    assert "shard 000000 key k0_002 member 'k0_002.json': objects[1].mask: runs cover 1 pixels, " \
           "the size 32x48 has 1536" in problems


def test_rle_problem_accepts_pycocotools_output_and_names_each_fault():
    from shards.masks import rle_problem

    rng = np.random.default_rng(0)
    for _ in range(50):
        m = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.random()
        assert rle_problem(encode_mask(m)) is None
    assert rle_problem({"size": [4, 5], "counts": ""}) == "runs cover 0 pixels, the size 4x5 has 20"
    assert rle_problem({"size": [4, 5], "counts": "a!"}) == "counts do not parse: counts hold '!' at character 1, outside '0'..'o'"
    assert rle_problem({"size": [2, 2], "counts": [1, 2, 1]}) is None
    assert rle_problem({"size": [2, 2], "counts": [1, -2, 5]}) == "counts hold a negative run"
    assert rle_problem({"counts": "0d0"}) == "not a COCO RLE dict with 'size' and 'counts'"


def test_canonical_json_and_its_hash_are_the_fingerprint():
    from shards import canonical_json, fingerprint, json_sha256

    assert canonical_json({"b": [1, 2.5], "a": "é"}) == b'{"a":"\\u00e9","b":[1,2.5]}'
    assert canonical_json({"a": "é"}, ensure_ascii=False) == '{"a":"é"}'.encode()
    assert json_sha256({"b": 1, "a": 2}) == hashlib.sha256(b'{"a":2,"b":1}').hexdigest()
    assert fingerprint({"x": [1, {"y": None}]}) == json_sha256({"x": [1, {"y": None}]})


def test_url_for_gives_each_filesystem_its_own_url():
    from fsspec.implementations.http import HTTPFileSystem
    from fsspec.implementations.memory import MemoryFileSystem

    from shards.paths import fs_and_root, join, url_for

    http = HTTPFileSystem()
    assert url_for(http, "http://127.0.0.1:8000/ds/000000.tar") == "http://127.0.0.1:8000/ds/000000.tar"
    fs, root = fs_and_root("https://example.org/data/ds/")
    assert url_for(fs, join(root, "000001.tar")) == "https://example.org/data/ds/000001.tar"
    assert url_for(MemoryFileSystem(), "/rl/ds/000000.tar") == "memory:///rl/ds/000000.tar"
    fs, root = fs_and_root("/tmp/ds")
    assert url_for(fs, join(root, "x.tar")) == "/tmp/ds/x.tar"


def test_shards_schema_and_paths_import_without_pandas_or_torch():
    import subprocess
    import sys

    code = ("import sys, shards.schema, shards.paths; from shards import STATUS_OK, OBJECT_FIELDS;"
            "print(sorted(m for m in ('pandas', 'torch', 'webdataset', 'pycocotools') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_status_names_and_object_fields_have_one_definition():
    import shards
    import shards.writer
    from shards import schema

    assert shards.writer.STATUS_OK is schema.STATUS_OK and shards.STATUSES == ("ok", "failed", "filtered")
    assert schema.OBJECT_FIELDS == ("box", "phrase", "description", "detector_score", "mask", "mask_score",
                                    "mask_box", "clip_score")


def test_info_flags_a_tar_whose_size_differs_from_its_stats(tmp_path, capsys):
    write_dataset(tmp_path, shard_id=0)
    write_dataset(tmp_path, shard_id=1)
    t1 = tmp_path / "000001.tar"
    size = t1.stat().st_size
    t1.write_bytes(t1.read_bytes()[:4096])
    assert cli(["info", str(tmp_path), "--json"]) == 1
    cap = capsys.readouterr()
    info = json.loads(cap.out[cap.out.index("{"):])
    assert info["damaged_shards"] == {"000001": f"its tar holds 4096 bytes but its stats recorded {size} (truncated or overwritten)"}
    assert f"shard 000001: its tar holds 4096 bytes but its stats recorded {size}" in cap.err
    # stats from before tar_bytes was recorded stay readable; info (the same check as datagen's resume)
    # then reads the tar to its end and still finds it cut short; validate checks the sha256
    st = json.loads((tmp_path / "000001.stats.json").read_text())
    del st["tar_bytes"]
    (tmp_path / "000001.stats.json").write_text(json.dumps(st))
    assert cli(["info", str(tmp_path)]) == 1
    assert "shard 000001: its tar is unreadable" in capsys.readouterr().err
    problems = [str(p) for p in validate_dataset(str(tmp_path)) if "stats" in str(p)]
    fields = [p.split(" is ")[0] for p in problems]
    assert "shard 000001: stats tar_sha256" in fields and "shard 000001: stats tar_bytes" not in fields


@pytest.mark.parametrize("command", ["validate", "info", "index", "to-coco", "report"])
def test_cli_missing_dataset_is_one_error_line_and_exit_2(tmp_path, capsys, command):
    missing = str(tmp_path / "nope")
    extra = {"to-coco": [str(tmp_path / "o.json")], "report": ["--out", str(tmp_path / "r.html")]}
    assert cli([command, missing, *extra.get(command, [])]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {missing}: no such dataset folder\n"
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "r.html").exists()


def test_cli_run_as_a_module_answers_a_mistake_without_traceback(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "shards", "validate", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'nope'}: no such dataset folder\n"

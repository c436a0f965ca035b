"""Hostile datasets against every ``python -m shards`` reader: validate, info, to-coco and report (its
statistics, tables and gallery; the figures are left out, they read nothing the tables do not).

A dataset of two shards: shard 000000 is damaged in one way per case, shard 000001 stays sound. Each
entry point must exit as the case expects, naming the shard (and key) where it answers 1, and go on
with shard 000001: no traceback, no hang, nothing it used from a damaged shard without saying so.
What each command checks (docs/DESIGN.md, "Trust model"): validate everything; info sizes and the
files present; to-coco and report whatever they read, each tar hashed against its stats file as it
streams (so a changed byte is refused), each sample and record parsed. to-coco reads no image and no
parquet, report no image beyond its gallery: damage only there is validate's to find (0 below).

Case ids start with the class of failure the case guards against beyond tracebacks and hangs:
``lost``, ``silent`` or ``security``. from-coco's hostile inputs are at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from hostile_fixture import cli, error_line, image_bytes, link, members, special, tar_bytes
from PIL import Image
from test_shards import reseal, write_dataset

import shards.report as report
from shards.__main__ import main as shards_cli

pytestmark = pytest.mark.timeout(60)

K = "k0_001"  # the key a sample-level case damages


@pytest.fixture(autouse=True)
def _no_figures(monkeypatch):
    monkeypatch.setattr(report, "FIGURES", {})


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base") / "ds"
    write_dataset(root, n=3, shard_id=0)
    write_dataset(root, n=2, shard_id=1)
    return root


# --- how shard 000000 is damaged -------------------------------------------------------------------------


def _tar(ds: Path) -> Path:
    return ds / "000000.tar"


def _rewrite(ds: Path, change, seal: bool = True) -> None:
    """Rewrite shard 000000's tar as ``change(members) -> members``; resealed: its stats then agree."""
    _tar(ds).write_bytes(tar_bytes(change(members(_tar(ds)))))
    if seal:
        reseal(_tar(ds))


def _json(ds: Path, change) -> None:
    """Shard 000000's k0_001.json rewritten as ``change(dict)`` (a dict, or bytes for raw content)."""
    def edit(ms):
        out = []
        for name, data in ms:
            if name == f"{K}.json":
                d = change(json.loads(data))
                data = d if isinstance(d, bytes) else json.dumps(d).encode()
            out.append((name, data))
        return out
    _rewrite(ds, edit)


def _obj(change):
    def edit(d):
        d["objects"][0] = change(d["objects"][0]) or d["objects"][0]
        return d
    return edit


def _set(field, value):
    return lambda d: {**d, field: value}


def _meta(change):
    def edit(d):
        meta = json.loads(d["meta"])
        change(meta)
        return {**d, "meta": json.dumps(meta)}
    return edit


def _flip(ds: Path, marker: bytes) -> None:
    data = bytearray(_tar(ds).read_bytes())
    at = data.index(marker)
    data[at] ^= 0x01
    _tar(ds).write_bytes(bytes(data))


def _stats(ds: Path, change) -> None:
    p = ds / "000000.stats.json"
    new = change(json.loads(p.read_text()))
    p.write_bytes(new if isinstance(new, bytes) else json.dumps(new).encode())


def _parquet(ds: Path, change) -> None:
    p = ds / "000000.parquet"
    change_to = change(pd.read_parquet(p))
    if isinstance(change_to, bytes):
        p.write_bytes(change_to)
    else:
        change_to.to_parquet(p)


def _swap_tar(ds: Path, make) -> None:
    _tar(ds).unlink()
    make(_tar(ds))


def _beside(extra: list) -> callable:
    """Members added right after k0_001's own, so they belong to its sample (not a later copy)."""
    def change(ms):
        at = max(i for i, (n, _) in enumerate(ms) if n.startswith(K)) + 1
        return ms[:at] + extra + ms[at:]
    return change


def _image(ds: Path, data: bytes, ext: str = "jpg") -> None:
    _rewrite(ds, lambda ms: [(f"{K}.{ext}", data) if n == f"{K}.jpg" else (n, d) for n, d in ms])


SHARD = "shard 000000"
BADJSON = f"key '{K}': "  # to-coco and report name the key of a bad sample
TAR = "000000.tar: "
SIZE = "bytes but its stats"
SHA = "in its stats file: changed after it was written, not trusted"


# (id, damage, validate text, info text or None (exit 0), to-coco text or None, report text or None)
CASES = [
    # the tar as a file
    ("lost-tar-cut-in-half", lambda ds: _tar(ds).write_bytes(_tar(ds).read_bytes()[:5000]),
     "tar is unreadable or truncated", SIZE, SIZE, SIZE),
    ("lost-tar-emptied", lambda ds: _tar(ds).write_bytes(b""), "tar is unreadable or truncated", SIZE, SIZE, SIZE),
    ("lost-tar-missing", lambda ds: _tar(ds).unlink(), "missing tar", "its tar is missing", "its tar is missing",
     "its tar is missing"),
    ("silent-tar-garbage-same-size", lambda ds: _tar(ds).write_bytes(os.urandom(_tar(ds).stat().st_size)),
     "tar is unreadable or truncated", None, TAR, TAR),  # unreadable before its hash is known
    ("silent-byte-flipped-in-json", lambda ds: _flip(ds, b"a red thing number 1"), "stats tar_sha256 is", None, SHA, SHA),
    ("silent-byte-flipped-in-image", lambda ds: _flip(ds, b"JFIF"), "stats tar_sha256 is", None, SHA, SHA),
    ("silent-byte-flipped-in-header", lambda ds: _flip(ds, b"k0_002.json"), "tar is unreadable", None, TAR, TAR),
    ("silent-bytes-appended", lambda ds: _tar(ds).write_bytes(_tar(ds).read_bytes() + b"\0" * 512),
     "stats tar_bytes is", SIZE, SIZE, SIZE),
    ("silent-tar-rewritten-unsealed", lambda ds: _rewrite(ds, lambda ms: ms[:-2], seal=False), "stats", SIZE, SIZE, SIZE),
    ("lost-tar-is-a-folder", lambda ds: _swap_tar(ds, lambda p: p.mkdir()), "tar cannot be opened", SIZE, SIZE, SIZE),
    ("lost-tar-is-a-fifo", lambda ds: _swap_tar(ds, os.mkfifo), "tar cannot be opened", SIZE, SIZE, SIZE),
    ("lost-tar-links-dev-zero", lambda ds: _swap_tar(ds, lambda p: os.symlink("/dev/zero", p)), "tar cannot be opened",
     SIZE, SIZE, SIZE),
    ("lost-tar-links-nowhere", lambda ds: _swap_tar(ds, lambda p: os.symlink(p.parent / "gone", p)),
     "tar cannot be opened", "its tar cannot be read (No such file or directory)", "No such file", "No such file"),
    # the members (resealed: the stats agree, the content is hostile)
    ("silent-key-twice-later", lambda ds: _rewrite(ds, lambda ms: ms + ms[:2]), "is stored twice", None,
     "is stored twice", "is stored twice"),
    ("silent-key-twice-adjacent", lambda ds: _rewrite(ds, lambda ms: ms[:2] + ms[:2] + ms[2:]), "is stored twice", None,
     "is stored twice", "is stored twice"),
    ("silent-json-key-not-member-name", lambda ds: _json(ds, _set("key", "k0_000")), "json field 'key' is 'k0_000'",
     None, "not its member name's", "not its member name's"),
    ("security-symlink-member", lambda ds: _rewrite(ds, lambda ms: ms + [link("k0_009.jpg", "/etc/passwd")]),
     "is a symbolic link to '/etc/passwd'", None, "symbolic link", "symbolic link"),
    ("security-hardlink-member", lambda ds: _rewrite(ds, lambda ms: ms + [link("k0_009.json", "k0_000.json", True)]),
     "is a hard link", None, "hard link", "hard link"),
    ("security-fifo-member", lambda ds: _rewrite(ds, lambda ms: ms + [special("k0_009.jpg", tarfile.FIFOTYPE)]),
     "is a FIFO", None, "a FIFO", "a FIFO"),
    ("security-device-member", lambda ds: _rewrite(ds, lambda ms: ms + [special("k0_009.jpg", tarfile.CHRTYPE)]),
     "character device", None, "character device", "character device"),
    ("silent-member-in-a-folder", lambda ds: _rewrite(ds, lambda ms: [(f"evil/{n}" if n.startswith(K) else n, d)
                                                                      for n, d in ms]),
     "member name has a directory part", None, "not its member name's", "not its member name's"),
    ("security-absolute-member", lambda ds: _rewrite(ds, lambda ms: [(f"/abs/{n}" if n.startswith(K) else n, d)
                                                                     for n, d in ms]),
     "member name is absolute", None, "not its member name's", "not its member name's"),
    ("lost-json-member-missing", lambda ds: _rewrite(ds, lambda ms: [m for m in ms if m[0] != f"{K}.json"]),
     "json member is missing", None, "has no json member", "has no json member"),
    ("lost-image-member-missing", lambda ds: _rewrite(ds, lambda ms: [m for m in ms if m[0] != f"{K}.jpg"]),
     "expected one image member", None, "has no image member", "has no image member"),
    ("silent-two-images", lambda ds: _rewrite(ds, _beside([(f"{K}.png", image_bytes("PNG", 48, 32))])),
     "expected one image member", None, "holds 2 images", "holds 2 images"),
    ("silent-unknown-member", lambda ds: _rewrite(ds, _beside([(f"{K}.txt", b"x")])),
     "member of an unknown kind", None, None, None),
    ("silent-folder-member", lambda ds: _rewrite(ds, lambda ms: [special("d", tarfile.DIRTYPE), *ms]), None, None, None,
     None),
    ("silent-image-garbage", lambda ds: _image(ds, b"\xff\xd8 not really"), "image does not decode", None, None,
     "cannot be drawn"),
    ("silent-image-cut-short", lambda ds: _image(ds, image_bytes("JPEG", 48, 32)[:-300]), "image does not decode", None,
     None, "cannot be drawn"),
    ("silent-image-other-size", lambda ds: _image(ds, image_bytes("JPEG", 20, 10)), "image is 20x10, json says 48x32",
     None, None, "cannot be drawn (ValueError: draw_layout: mask 0 has shape (32, 48), the image is (10, 20)"),
    ("security-image-bomb", lambda ds: _image(ds, _bomb(40000, 40000), "png"), "exceeds limit", None, None,
     "exceeds limit"),  # PIL's own refusal, raised inside Image.open
    ("security-image-bomb-below-pil-limit", lambda ds: _image(ds, _bomb(12000, 10000), "png"),
     "image is 12000x10000 = 120000000 pixels, more than 100000000", None, None, "pixels, more than 100000000"),
    ("silent-gzip-tar-sealed", lambda ds: (_tar(ds).write_bytes(tar_bytes(members(_tar(ds)), mode="w:gz")), reseal(_tar(ds))),
     None, None, None, None),
    # the sample JSON, every field of the wrong kind (resealed)
    *[(f"silent-json-{name}", (lambda c: lambda ds: _json(ds, c))(change), "not valid JSON" if bad else "key",
       None, BADJSON, BADJSON) for name, change, bad in [
        ("garbage", lambda d: b"\x00\x01garbage", True),
        ("invalid-utf8", lambda d: b'{"key": "\xff\xfe"}', True),
        ("empty", lambda d: b"", True),
        ("array", lambda d: b"[1, 2]", False),
        ("string", lambda d: b'"k0_001"', False),
        ("null", lambda d: b"null", False),
        ("nested-100000", lambda d: b"[" * 100_000 + b"]" * 100_000, True),
        ("integer-5000-digits", lambda d: json.dumps(d).replace('"width": 48', '"width": ' + "4" * 5000).encode(), True),
        ("width-string", _set("width", "48"), False),
        ("width-negative", _set("width", -1), False),
        ("width-zero", _set("width", 0), False),
        ("width-bool", _set("width", True), False),
        ("width-float", _set("width", 48.5), False),
        ("width-nan", _set("width", float("nan")), False),
        ("width-missing", lambda d: {k: v for k, v in d.items() if k != "width"}, False),
        ("unknown-field", _set("extra", 1), False),
        ("key-int", _set("key", 7), False),
        ("schema-version-string", _set("schema_version", "2"), False),
        ("schema-version-future", _set("schema_version", 999), False),
        ("schema-version-missing", lambda d: {k: v for k, v in d.items() if k != "schema_version"}, False),
        ("objects-object", _set("objects", {}), False),
        ("objects-strings", _set("objects", ["x"]), False),
        ("caption-int", _set("caption", 5), False),
        ("source-null", _set("source", None), False),
        ("meta-object", _set("meta", {}), False),
        ("meta-not-json", _set("meta", "{not json"), False),
        ("meta-nested-100000", _set("meta", "[" * 100_000 + "]" * 100_000), False),
        ("meta-huge-integer", _set("meta", '{"n": ' + "1" * 5000 + "}"), False),
        ("box-missing", _obj(lambda o: o.pop("box") and None), False),
        ("box-three-numbers", _obj(lambda o: o.update(box=[1.0, 2.0, 3.0])), False),
        ("box-strings", _obj(lambda o: o.update(box=["1", "2", "3", "4"])), False),
        ("box-nan", _obj(lambda o: o.update(box=[float("nan"), 2.0, 3.0, 4.0])), False),
        ("box-inverted", _obj(lambda o: o.update(box=[20.0, 2.0, 3.0, 10.0])), False),
        ("box-outside", _obj(lambda o: o.update(box=[3.0, 2.0, 4800.0, 10.0])), False),
        ("phrase-int", _obj(lambda o: o.update(phrase=5)), False),
        ("description-list", _obj(lambda o: o.update(description=["a"])), False),
        ("score-string", _obj(lambda o: o.update(detector_score="0.5")), False),
        ("score-infinite", _obj(lambda o: o.update(clip_score=float("inf"))), False),
        ("mask-counts-int", _obj(lambda o: o["mask"].update(counts=5)), False),
        ("mask-size-wrong", _obj(lambda o: o["mask"].update(size=[1, 1])), False),
        ("mask-box-two", _obj(lambda o: o.update(mask_box=[1.0, 2.0])), False),
    ]],
    # valid records whose content readers must still check
    ("silent-mask-runs-short", lambda ds: _json(ds, _obj(lambda o: o["mask"].update(counts="1"))),
     "objects[0].mask: runs cover 1 pixels", None, None, "objects[0].mask: runs cover 1 pixels"),
    ("silent-coco-meta-wrong", lambda ds: _json(ds, _meta(lambda m: m.update(coco_id=5, coco_category_ids=[1]))),
     "meta.coco_category_ids must hold one int per object (2)", None, "meta.coco_category_ids", None),
    ("silent-coco-crowd-wrong", lambda ds: _json(ds, _meta(lambda m: m.update(coco_crowd=[{"bbox": "x"}]))),
     "meta.coco_crowd[0] needs", None, "meta.coco_crowd[0] needs", None),
    # the stats file
    ("lost-stats-garbage", lambda ds: _stats(ds, lambda s: b"\x00 garbage"), "stats unreadable", "unreadable",
     "its stats file is unreadable", "its stats file is unreadable"),
    ("lost-stats-a-list", lambda ds: _stats(ds, lambda s: [s]), "stats unreadable", "", "its stats file is unreadable",
     "its stats file is unreadable"),
    ("lost-stats-count-string", lambda ds: _stats(ds, lambda s: {**s, "samples": "3"}), "field 'samples' must be a count", "",
     "its stats file is unreadable", "its stats file is unreadable"),
    ("lost-stats-no-sha", lambda ds: _stats(ds, lambda s: {k: v for k, v in s.items() if k != "tar_sha256"}),
     "field 'tar_sha256' is missing", "", "its stats file is unreadable", "its stats file is unreadable"),
    ("lost-stats-nested-100000", lambda ds: _stats(ds, lambda s: b"[" * 100_000 + b"]" * 100_000), "stats unreadable",
     "", "its stats file is unreadable", "its stats file is unreadable"),
    ("lost-stats-integer-5000-digits", lambda ds: _stats(ds, lambda s: b'{"samples": ' + b"3" * 5000 + b"}"),
     "stats unreadable", "", "its stats file is unreadable", "its stats file is unreadable"),
    ("silent-stats-sha-of-another-tar", lambda ds: _stats(ds, lambda s: {**s, "tar_sha256": hashlib.sha256(b"x").hexdigest()}),
     "stats tar_sha256 is", None, SHA, SHA),
    ("silent-stats-size-wrong", lambda ds: _stats(ds, lambda s: {**s, "tar_bytes": s["tar_bytes"] + 1}), "stats tar_bytes",
     SIZE, SIZE, SIZE),
    ("lost-stats-missing", lambda ds: (ds / "000000.stats.json").unlink(), "incomplete", None, None, None),
    # the parquet index
    ("lost-parquet-garbage", lambda ds: _parquet(ds, lambda df: b"PAR1 garbage"), "parquet unreadable", None, None,
     "parquet unreadable"),
    ("lost-parquet-missing", lambda ds: (ds / "000000.parquet").unlink(), "missing parquet", "its parquet is missing",
     None, "parquet missing"),
    ("lost-parquet-column-missing", lambda ds: _parquet(ds, lambda df: df.drop(columns=["status"])),
     "parquet lacks columns ['status']", None, None, "parquet lacks columns ['status']"),
    ("silent-parquet-unknown-status", lambda ds: _parquet(ds, lambda df: df.assign(status="maybe")),
     "parquet has unknown status values ['maybe']", None, None, "status is not one of"),
    ("silent-parquet-width-text", lambda ds: _parquet(ds, lambda df: df.assign(width="wide")),
     None, None, None, "not of the writer's types"),
    ("lost-parquet-row-dropped", lambda ds: _parquet(ds, lambda df: df[df.key != K]),
     "sample in the tar has no ok row in parquet", None, None, None),
    ("silent-parquet-row-twice", lambda ds: _parquet(ds, lambda df: pd.concat([df, df[df.key == K]])),
     "key appears twice in parquet", None, None, None),
]


def _bomb(w: int, h: int) -> bytes:
    from test_hostile_inputs import _png_claiming

    return _png_claiming(w, h)


@pytest.fixture
def damaged(base, tmp_path, request) -> Path:
    ds = tmp_path / "ds"
    shutil.copytree(base, ds)
    request.param(ds)
    return ds


def _names(text: str | None, out: str) -> None:
    assert text is not None and text in out and "000000" in out, (text, out)


@pytest.mark.parametrize("damaged, expect", [pytest.param(c[1], c[2], id=c[0]) for c in CASES], indirect=["damaged"])
def test_validate_names_every_damage(damaged, expect, capsys):
    code, out, err = cli(shards_cli, ["validate", str(damaged)], capsys)
    if expect is None:  # nothing the contract forbids (a folder entry holds nothing; a sealed gzip tar is a tar)
        assert code == 0, out
        return
    assert code == 1 and err.endswith(f"problem(s) in {damaged}\n")
    _names(expect, out)
    assert all(line.startswith(SHARD) for line in out.splitlines()), out  # shard 000001 is sound


@pytest.mark.parametrize("damaged, expect", [pytest.param(c[1], c[3], id=c[0]) for c in CASES], indirect=["damaged"])
def test_info_names_what_it_checks(damaged, expect, capsys):
    code, out, err = cli(shards_cli, ["info", "--json", str(damaged)], capsys)
    info = json.loads(out)
    if expect is None:
        assert code == 0 and info["damaged_shards"] == {}, err
        return
    assert code == 1 and list(info["damaged_shards"]) == ["000000"], out
    assert expect in info["damaged_shards"]["000000"] and err.startswith("shard 000000: ")


@pytest.mark.parametrize("damaged, expect", [pytest.param(c[1], c[4], id=c[0]) for c in CASES], indirect=["damaged"])
def test_to_coco_leaves_out_and_names_damage_and_goes_on(damaged, expect, capsys, tmp_path):
    out_json = tmp_path / "c.json"
    code, out, err = cli(shards_cli, ["to-coco", str(damaged), str(out_json)], capsys)
    files = {i["file_name"] for i in json.loads(out_json.read_text())["images"]}
    assert {"k1_000.jpg", "k1_001.jpg"} <= files  # the sound shard, whatever happened to the other
    if expect is None:
        assert code == 0, err
        return
    assert code == 1 and err.splitlines()[-1].startswith("error: "), err
    _names(expect, err)
    assert f"{K}.jpg" not in files or "shard 000000 left out" not in err


@pytest.mark.parametrize("damaged, expect", [pytest.param(c[1], c[5], id=c[0]) for c in CASES], indirect=["damaged"])
def test_report_leaves_out_and_names_damage_exit_1(damaged, expect, capsys, tmp_path):
    page = tmp_path / "r.html"
    code, _, err = cli(report.main, [str(damaged), "--out", str(page), "--gallery", "8"], capsys)
    assert page.exists() and "k1_001 (48x32)" in page.read_text()  # the sound shard is in the gallery
    if expect is None:
        assert code == 0, err
        return
    assert code == 1 and err.splitlines()[-1].startswith("error: "), err
    _names(expect, err)


# --- from-coco: hostile COCO files and images --------------------------------------------------------------


def _coco(tmp_path: Path) -> tuple[dict, Path]:
    imgs = tmp_path / "images"
    imgs.mkdir()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(imgs / "a.jpg")
    Image.new("RGB", (32, 24), (4, 5, 6)).save(imgs / "b.png")
    inst = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                       {"id": 2, "file_name": "b.png", "width": 32, "height": 24}],
            "categories": [{"id": 7, "name": "cat", "supercategory": "animal"}],
            "annotations": [{"id": 11, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 10], "iscrowd": 0},
                            {"id": 12, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 0,
                             "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]}]}
    return inst, imgs


def _from_coco(tmp_path, capsys, inst) -> tuple[int, str, str]:
    path = tmp_path / "inst.json"
    path.write_bytes(inst if isinstance(inst, bytes) else json.dumps(inst).encode())
    return cli(shards_cli, ["from-coco", "--instances", str(path), "--images", str(tmp_path / "images"),
                            str(tmp_path / "out")], capsys)


COCO_ERRORS = [  # (id, change(inst) -> inst or bytes, the error after "error: <file>: ")
    ("not-json", lambda d: b"{nope", "not valid JSON"),
    ("nested-100000", lambda d: b"[" * 100_000 + b"]" * 100_000, "not valid JSON (nested deeper than 64 levels)"),
    ("integer-5000-digits", lambda d: json.dumps(d).replace('"id": 1,', '"id": ' + "1" * 5000 + ",", 1).encode(),
     "not valid JSON (an integer of 5000 digits (more than 64))"),
    ("a-list", lambda d: b"[]", "expected a JSON object with COCO's lists"),
    ("images-not-a-list", lambda d: {**d, "images": {}}, "field 'images' must be a list of objects"),
    ("image-id-string", lambda d: {**d, "images": [{**d["images"][0], "id": "1"}]}, "lacks a string 'file_name'"),
    ("image-id-list", lambda d: {**d, "images": [{**d["images"][0], "id": [1]}]}, "lacks a string 'file_name'"),
    ("image-width-float", lambda d: {**d, "images": [{**d["images"][0], "width": 40.0}]}, "lacks a string 'file_name'"),
    ("file-name-int", lambda d: {**d, "images": [{**d["images"][0], "file_name": 5}]}, "lacks a string 'file_name'"),
    ("duplicate-image-ids", lambda d: {**d, "images": d["images"] + d["images"][:1]}, "images id 1 appears more than once"),
    ("category-id-list", lambda d: {**d, "categories": [{"id": [7], "name": "cat"}]}, "a category lacks an integer 'id'"),
    ("category-twice", lambda d: {**d, "categories": d["categories"] + [{"id": 7, "name": "dog"}]},
     "category id 7 is defined twice"),
    ("annotation-unknown-category", lambda d: {**d, "annotations": [{**d["annotations"][0], "category_id": 99}]},
     "needs a known integer category_id"),
    ("annotation-category-list", lambda d: {**d, "annotations": [{**d["annotations"][0], "category_id": [7]}]},
     "needs a known integer category_id"),
    ("annotation-image-id-list", lambda d: {**d, "annotations": [{**d["annotations"][0], "image_id": [1]}]},
     "an integer image_id"),
    ("bbox-strings", lambda d: {**d, "annotations": [{**d["annotations"][0], "bbox": ["2", 3, 10, 10]}]},
     "a 4-number bbox"),
    ("bbox-three", lambda d: {**d, "annotations": [{**d["annotations"][0], "bbox": [2, 3, 10]}]}, "a 4-number bbox"),
    ("bbox-bool", lambda d: {**d, "annotations": [{**d["annotations"][0], "bbox": [True, 3, 10, 10]}]},
     "a 4-number bbox"),
    ("bbox-nan", lambda d: {**d, "annotations": [{**d["annotations"][0], "bbox": [float("nan"), 3, 10, 10]}]},
     "a 4-number bbox"),
    ("bbox-infinite", lambda d: {**d, "annotations": [{**d["annotations"][0], "bbox": [2, 3, float("inf"), 10]}]},
     "a 4-number bbox"),
]


@pytest.mark.parametrize("change, why", [c[1:] for c in COCO_ERRORS], ids=[f"silent-coco-{c[0]}" for c in COCO_ERRORS])
def test_from_coco_refuses_a_bad_coco_file_with_one_error_line(tmp_path, capsys, change, why):
    inst, _ = _coco(tmp_path)
    code, _, err = _from_coco(tmp_path, capsys, change(inst))
    assert code == 2 and why in error_line(err) and str(tmp_path / "inst.json") in err
    assert not (tmp_path / "out").exists()


COCO_ROWS = [  # (id, change(inst, images folder), {key: failure error start, or None for a sample})
    ("file-name-escapes", lambda d, p: d["images"][0].update(file_name="../images/a.jpg"),
     {"coco000000000001": "ValueError: file_name '../images/a.jpg' leaves the --images folder"}),
    ("file-name-absolute", lambda d, p: d["images"][0].update(file_name=str(p / "a.jpg")),
     {"coco000000000001": "ValueError: file_name"}),
    ("image-missing", lambda d, p: (p / "a.jpg").unlink(), {"coco000000000001": "FileNotFoundError: [Errno 2] no such file"}),
    ("image-is-a-fifo", lambda d, p: ((p / "a.jpg").unlink(), os.mkfifo(p / "a.jpg")),
     {"coco000000000001": "FileNotFoundError: [Errno 2] not a regular file"}),
    ("image-is-a-folder", lambda d, p: ((p / "a.jpg").unlink(), (p / "a.jpg").mkdir()),
     {"coco000000000001": "FileNotFoundError: [Errno 2] not a regular file"}),
    ("image-garbage", lambda d, p: (p / "a.jpg").write_bytes(b"garbage"), {"coco000000000001": "UnidentifiedImageError"}),
    ("image-wrong-size", lambda d, p: d["images"][0].update(width=41), {"coco000000000001": "ValueError: image is 40x30"}),
    ("image-bomb", lambda d, p: ((p / "a.jpg").write_bytes(_bomb(40000, 40000)), d["images"][0].update(width=40000, height=40000)),
     {"coco000000000001": "ValueError: Image size (1600000000 pixels) exceeds limit"}),
    ("image-gif", lambda d, p: Image.new("RGB", (40, 30)).save(p / "a.jpg", "GIF"),
     {"coco000000000001": "ValueError: image format GIF is not stored as it is"}),
    ("png-named-jpg", lambda d, p: Image.new("RGB", (40, 30)).save(p / "a.jpg", "PNG"), {}),
    ("polygon-two-points", lambda d, p: d["annotations"][1].update(segmentation=[[1, 1, 6, 1]]),
     {"coco000000000002": "TypeError: Argument 'bb' has incorrect type"}),
    ("polygon-strings", lambda d, p: d["annotations"][1].update(segmentation=[["a", "b", "c", "d", "e", "f"]]),
     {"coco000000000002": ""}),
    ("segmentation-a-string", lambda d, p: d["annotations"][1].update(segmentation="x"),
     {"coco000000000002": "ValueError: unsupported segmentation of type str"}),
    ("rle-of-another-size", lambda d, p: d["annotations"][1].update(segmentation={"size": [5, 5], "counts": [25]}),
     {"coco000000000002": "SchemaError"}),
]


@pytest.mark.parametrize("change, failures", [c[1:] for c in COCO_ROWS], ids=[f"lost-coco-{c[0]}" for c in COCO_ROWS])
def test_from_coco_makes_a_failure_row_of_each_bad_image_and_keeps_the_rest(tmp_path, capsys, change, failures):
    inst, imgs = _coco(tmp_path)
    change(inst, imgs)
    code, out, err = _from_coco(tmp_path, capsys, inst)
    assert code == 0, err
    df = pd.read_parquet(tmp_path / "out" / "000000.parquet").set_index("key")
    assert sorted(df.index) == ["coco000000000001", "coco000000000002"]  # one row per image, whatever happened
    got = {k: df.loc[k, "error"] for k in df.index if df.loc[k, "status"] == "failed"}
    assert sorted(got) == sorted(failures) and all(got[k].startswith(w) for k, w in failures.items()), got
    assert out.startswith(f"wrote {tmp_path / 'out'}: {2 - len(failures)} samples, {len(failures)} failures")

"""Hugging Face ``datasets`` reads our shards with ``load_dataset("webdataset", ...)`` (offline).

It infers the column types from the first 5 samples of the first tar and cannot widen a ``null``
column later, so every ``{key}.json`` field must keep one type across samples and dataset kinds
(schema_version 2). Each test checks that every row loads and equals what ``iter_samples`` reads.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from shards import (
    ObjectRecord,
    SampleRecord,
    ShardWriter,
    encode_mask,
    iter_samples,
    mask_to_box,
    validate_dataset,
)
from shards.coco import from_coco
from shards.dataset import build_index, open_run, tar_urls
from shards.release import from_release
from shards.schema import hf_features
from shards.user_dataset import write_dataset

datasets = pytest.importorskip("datasets")


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _bare(key: str, n_obj: int) -> SampleRecord:
    """What datagen writes when the caption, describe, segment and score stages gave nothing."""
    objs = tuple(ObjectRecord(box=(1.0, 2.0, 10.0 + i, 12.0), phrase=f"thing{i}") for i in range(n_obj))
    return SampleRecord(key=key, width=32, height=24, original_width=64, original_height=48, source=f"/in/{key}.jpg",
                        objects=objs)  # fmt: skip


def _filled(key: str, i: int) -> SampleRecord:
    m = np.zeros((24, 32), bool)
    m[3:9, 4 : 12 + i] = True
    obj = ObjectRecord(box=(4.0, 3.0, 12.5 + i, 9.0), phrase="dog", description=f"a brown dog number {i}",
                       detector_score=0.5 + i / 100, mask=encode_mask(m), mask_score=0.875,
                       mask_box=mask_to_box(m), clip_score=-3.25 + i)  # fmt: skip
    return SampleRecord(key=key, width=32, height=24, original_width=32, original_height=24, source=f"/in/{key}.jpg",
                        source_caption="alt", caption=f"caption {i}", objects=(obj, obj),
                        meta={"url": f"https://example.com/{i}.jpg"})  # fmt: skip


def _datagen_style(root) -> list[SampleRecord]:
    """Seven samples full of unknowns first (one without objects), then three with every field filled."""
    recs = [_bare(f"a{i:02d}", n_obj=0 if i == 3 else 2) for i in range(7)] + [_filled(f"b{i:02d}", i) for i in range(3)]
    open_run(str(root), {"kind": "test-datagen"})
    with ShardWriter(str(root), 0) as w:
        for n, r in enumerate(recs):
            w.add(r, _jpeg(r.width, r.height, n), "jpg")
    build_index(str(root))
    return recs


def _coco(tmp_path):
    """Six images without crowd regions or captions, then one with both (meta changes shape late)."""
    imgs = tmp_path / "coco_images"
    imgs.mkdir()
    images, anns = [], []
    for i in range(7):
        Image.new("RGB", (40, 30), (10 * i, 20, 30)).save(imgs / f"{i}.jpg")
        images.append({"id": 100 + i, "file_name": f"{i}.jpg", "width": 40, "height": 30})
        anns.append({"id": 10 + i, "image_id": 100 + i, "category_id": 18, "bbox": [2, 3, 10, 10], "iscrowd": 0,
                     "segmentation": [[2, 3, 12, 3, 12, 13, 2, 13]]})  # fmt: skip
    anns.append({"id": 99, "image_id": 106, "category_id": 1, "bbox": [20, 0, 12, 24], "iscrowd": 1,
                 "segmentation": {"size": [30, 40], "counts": [600, 288, 312]}})  # fmt: skip
    inst = {"images": images, "annotations": anns,
            "categories": [{"id": 18, "name": "dog", "supercategory": "animal"}, {"id": 1, "name": "person"}]}
    caps = {"annotations": [{"image_id": 106, "caption": "a dog"}, {"image_id": 106, "caption": "a pup"}]}
    (tmp_path / "inst.json").write_text(json.dumps(inst))
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    out = tmp_path / "coco"
    from_coco(str(tmp_path / "inst.json"), str(imgs), str(out), captions=str(tmp_path / "caps.json"))
    return out


def _load(tmp_path, roots, features=None) -> list[dict]:
    tars = [u for r in roots for u in tar_urls(str(r))]
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", features=features,
                               cache_dir=str(tmp_path / "hf_cache"))  # fmt: skip
    # What datasets inferred is what hf_features() declares.
    assert ds.features == (features or hf_features())
    return list(ds)


def _same(a, b) -> bool:
    """Equal JSON values, NaN equal to NaN (unknown numbers are NaN on disk)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def _check_rows(rows: list[dict], roots) -> None:
    """Every sample of ``roots`` is a row whose json is the member's and whose record is iter_samples'."""
    expected = {(s.url, s.record.key): s for r in roots for s in iter_samples(str(r))}
    assert len(rows) == len(expected)
    for row in rows:
        s = expected.pop((row["__url__"], row["__key__"]))
        assert _same(row["json"], json.loads(s.record.to_json_bytes()))
        assert SampleRecord.from_dict(row["json"]) == s.record
        assert np.array_equal(np.asarray(row[s.image_ext].convert("RGB")), np.asarray(s.image()))
    assert not expected


def test_datagen_style_dataset_with_unknowns_first_loads_every_row(tmp_path):
    root = tmp_path / "dg"
    recs = _datagen_style(root)
    assert validate_dataset(str(root)) == []
    rows = _load(tmp_path, [root])
    _check_rows(rows, [root])
    by_key = {row["__key__"]: SampleRecord.from_dict(row["json"]) for row in rows}
    assert by_key == {r.key: r.validate() for r in recs}
    assert by_key["a00"].caption is None and by_key["a00"].objects[0].mask is None
    assert by_key["b02"].objects[0].clip_score == -1.25 and by_key["b02"].meta == {"url": "https://example.com/2.jpg"}


def test_from_coco_dataset_keeps_meta_that_appears_late(tmp_path):
    root = _coco(tmp_path)
    assert validate_dataset(str(root)) == []
    rows = _load(tmp_path, [root])
    _check_rows(rows, [root])
    meta = {row["__key__"]: json.loads(row["json"]["meta"]) for row in rows}
    assert meta["coco000000000106"]["captions"] == ["a dog", "a pup"]
    assert [c["name"] for c in meta["coco000000000106"]["coco_crowd"]] == ["person"]
    assert meta["coco000000000100"] == {"captions": [], "coco_annotation_ids": [10], "coco_category_ids": [18],
                                        "coco_crowd": [], "coco_file_name": "0.jpg", "coco_id": 100,
                                        "coco_supercategories": ["animal"]}  # fmt: skip


def _release(tmp_path):
    labels, images, out = tmp_path / "labels", tmp_path / "rel_images", tmp_path / "release"
    labels.mkdir()
    images.mkdir()
    Image.new("RGB", (32, 24), (5, 6, 7)).save(images / "r1.jpg")
    (labels / "label_r1.json").write_text(json.dumps({"caption": "a cat", "annos": [
        {"bbox": [2, 2, 10, 10], "category_name": "cat", "caption": "a grey cat", "pred_score": 0.7}]}))
    from_release(str(labels), str(images), str(out))
    return out


def _python(tmp_path):
    path = tmp_path / "p.jpg"
    Image.new("RGB", (32, 24), (9, 9, 9)).save(path)
    out = tmp_path / "python"
    write_dataset([{"image_path": str(path), "caption": "c", "bboxes": [[1, 1, 9, 9]], "labels": ["a box"]}], str(out))
    return out


def test_mixed_kinds_in_one_call_load_every_row_with_their_meta(tmp_path):
    # from-coco first: its unknown scores and its meta keys must not decide the others' columns.
    dg = tmp_path / "dg"
    _datagen_style(dg)
    roots = [_coco(tmp_path), dg, _release(tmp_path), _python(tmp_path)]
    for r in roots:
        assert validate_dataset(str(r)) == []
    rows = _load(tmp_path, roots)
    _check_rows(rows, roots)
    meta = {row["__key__"]: json.loads(row["json"]["meta"]) for row in rows}
    assert meta["b01"] == {"url": "https://example.com/1.jpg"}
    assert meta["r1"]["padding"] == [0, 0, 0, 0] and meta["coco000000000106"]["coco_id"] == 106
    assert {k: v for k, v in meta.items() if k.startswith("a")} == dict.fromkeys(
        [f"a{i:02d}" for i in range(7)], {})


def test_no_objects_in_the_first_samples_loads_with_the_declared_features(tmp_path):
    root = tmp_path / "empty_first"
    recs = [_bare(f"a{i:02d}", 0) for i in range(6)] + [_filled("b00", 0)]
    with ShardWriter(str(root), 0) as w:
        for n, r in enumerate(recs):
            w.add(r, _jpeg(r.width, r.height, n), "jpg")
    build_index(str(root))
    rows = _load(tmp_path, [root], features=hf_features())
    _check_rows(rows, [root])
    assert [len(row["json"]["objects"]) for row in rows] == [0] * 6 + [2]


def test_png_samples_beside_jpeg_load_with_both_image_columns_declared(tmp_path):
    dg, arrays = tmp_path / "dg", tmp_path / "arrays"
    _datagen_style(dg)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 24, 32), dtype=np.uint8)
    write_dataset([{"image": pixels, "caption": "c", "bboxes": [[1, 1, 9, 9]], "labels": ["a box"]}], str(arrays))
    assert [s.image_ext for s in iter_samples(str(arrays))] == ["png"]
    rows = _load(tmp_path, [dg, arrays], features=hf_features(("jpg", "png")))
    _check_rows(rows, [dg, arrays])
    assert [row["jpg"] is None for row in rows] == [False] * 10 + [True]


def _v1_bytes(rec: SampleRecord) -> bytes:
    """The same record as schema_version 1 wrote it: null for unknowns, meta an object."""
    d = json.loads(rec.to_json_bytes())
    objs = [{**o, "description": o["description"] or None, "mask": o["mask"] if o["mask"]["counts"] else None,
             "mask_box": None if math.isnan(o["mask_box"][0]) else o["mask_box"],
             **{k: None if math.isnan(o[k]) else o[k] for k in ("detector_score", "mask_score", "clip_score")}}
            for o in d["objects"]]  # fmt: skip
    v1 = {**d, "caption": d["caption"] or None, "source_caption": d["source_caption"] or None, "objects": objs,
          "meta": json.loads(d["meta"]), "schema_version": 1}  # fmt: skip
    return json.dumps(v1, sort_keys=True).encode()


def test_version_1_records_still_read_and_are_what_datasets_could_not_load(tmp_path):
    from shards.writer import build_tar

    recs = [_bare(f"a{i:02d}", 2) for i in range(6)] + [_filled("b00", 0)]
    for r in recs:
        assert SampleRecord.from_json_bytes(_v1_bytes(r)) == r.validate()
    members = [(f"{r.key}.json", _v1_bytes(r)) for r in recs] + [(f"{r.key}.jpg", _jpeg(32, 24, 0)) for r in recs]
    tar = tmp_path / "v1.tar"
    tar.write_bytes(build_tar(members))
    assert [s.record for s in iter_samples([str(tar)])] == [r.validate() for r in recs]
    # The old form is the failure this schema fixes: nulls in the first 5 rows fix the column as null.
    with pytest.raises(datasets.exceptions.DatasetGenerationError) as e:
        datasets.load_dataset("webdataset", data_files={"train": [str(tar)]}, split="train",
                              cache_dir=str(tmp_path / "hf_cache"))  # fmt: skip
    assert "to null" in str(e.value.__cause__)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d.update(caption=None), "'caption' must be a string"),
        (lambda d: d.update(meta={}), "'meta' must be a JSON string"),
        (lambda d: d["objects"][0].update(clip_score=1), "'objects[0].clip_score' must be a float"),
        (lambda d: d["objects"][0].update(mask=None), "'objects[0].mask'"),
        (lambda d: d["objects"][0].pop("mask_box"), "'objects[0]' must hold exactly"),
        (lambda d: d.pop("caption"), "fields ['caption'] are missing"),
    ],
)
def test_version_2_type_drift_is_refused_naming_the_field(change, field):
    d = json.loads(_bare("k", 1).to_json_bytes())
    change(d)
    with pytest.raises(ValueError, match="key 'k'") as e:
        SampleRecord.from_dict(d, where="000000.tar")
    assert field in str(e.value) and str(e.value).startswith("000000.tar: ")


def test_validate_names_a_v2_field_that_drifted_to_null(tmp_path):
    from test_shards import _rewrite_tar

    root = tmp_path / "dg"
    _datagen_style(root)

    def null_caption(members):
        return [(n, json.dumps({**json.loads(d), "caption": None}).encode() if n == "b01.json" else d)
                for n, d in members]  # fmt: skip

    _rewrite_tar(root / "000000.tar", null_caption)
    problems = [str(p) for p in validate_dataset(str(root)) if "b01" in str(p)]
    assert problems == ["shard 000000 key b01 member 'b01.json': shard 000000: key 'b01': field 'caption' must be "
                        "a string (schema_version 2), got None"]  # fmt: skip

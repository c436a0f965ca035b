"""COCO interchange: export checked with pycocotools, import round trip."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
from test_shards import write_dataset

from shards import decode_mask, iter_samples, validate_dataset
from shards.__main__ import main as cli
from shards.coco import to_coco


def test_to_coco_masks_equal_pycocotools_annToMask(tmp_path):
    recs = {r.key: r.validate() for r in write_dataset(tmp_path / "ds", n=3)}
    out = tmp_path / "coco.json"
    assert cli(["to-coco", str(tmp_path / "ds"), str(out)]) == 0
    coco = COCO(str(out))
    assert len(coco.getImgIds()) == 3 and len(coco.getAnnIds()) == 6
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["thing0", "thing1"]
    for img in coco.loadImgs(coco.getImgIds()):
        rec = recs[img["file_name"].split(".")[0]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        for ann, obj in zip(anns, rec.objects, strict=True):
            assert np.array_equal(coco.annToMask(ann).astype(bool), decode_mask(obj.mask))
            x1, y1, x2, y2 = obj.box
            assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
            assert ann["description"] == obj.description


def _coco_fixture(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(imgs / "a.jpg")
    Image.new("RGB", (20, 20), (1, 2, 3)).save(imgs / "b.jpg")
    inst = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.jpg", "width": 20, "height": 20},
            {"id": 3, "file_name": "missing.jpg", "width": 20, "height": 20},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            # polygon: the rectangle x 2..12, y 3..13
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 10], "iscrowd": 0,
             "segmentation": [[2, 3, 12, 3, 12, 13, 2, 13]], "area": 100},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 20, 20, 20], "iscrowd": 0,
             "segmentation": [], "area": 400},  # runs past the image: clipped to 30..40, 20..30
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1,
             "segmentation": {"size": [20, 20], "counts": [0, 25, 375]}, "area": 25},
        ],
    }
    stuff = {"categories": [{"id": 92, "name": "grass"}],
             "annotations": [{"id": 9, "image_id": 2, "category_id": 92, "bbox": [0, 10, 20, 10],
                              "iscrowd": 0, "segmentation": {"size": [20, 20], "counts": [10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]}}]}
    caps = {"annotations": [{"image_id": 1, "caption": "A cat. "}, {"image_id": 1, "caption": "a dog"}]}
    for name, d in (("inst", inst), ("stuff", stuff), ("caps", caps)):
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
    return imgs


def test_from_coco_round_trip(tmp_path):
    imgs = _coco_fixture(tmp_path)
    out = tmp_path / "ds"
    code = cli(["from-coco", "--instances", str(tmp_path / "inst.json"), "--stuff", str(tmp_path / "stuff.json"),
                "--captions", str(tmp_path / "caps.json"), "--images", str(imgs), "--shard-size", "2", str(out)])
    assert code == 0
    assert validate_dataset(str(out)) == []
    samples = {s.record.meta["coco_id"]: s.record for s in iter_samples(str(out))}
    assert sorted(samples) == [1, 2]
    a = samples[1]
    assert a.meta["captions"] == ["A cat.", "a dog"] and a.source_caption == "A cat."
    assert [o.phrase for o in a.objects] == ["cat", "dog"]
    assert a.objects[0].box == (2.0, 3.0, 12.0, 13.0) and a.objects[0].mask_box == (2.0, 3.0, 12.0, 13.0)
    assert decode_mask(a.objects[0].mask).sum() == 100
    assert a.objects[1].box == (30.0, 20.0, 40.0, 30.0) and a.objects[1].mask is None
    b = samples[2]
    assert [o.phrase for o in b.objects] == ["grass"]  # the crowd annotation is skipped
    # the missing image is a counted failure row, not a crash
    import pandas as pd
    df = pd.concat(pd.read_parquet(p) for p in sorted(out.glob("*.parquet")))
    bad = df[df.status == "failed"]
    assert list(bad.key) == ["coco000000000003"] and bad.error_stage.iloc[0] == "read"
    # export again and compare masks
    to_coco(str(out), str(tmp_path / "again.json"))
    again = json.loads((tmp_path / "again.json").read_text())
    # the three objects, and the crowd region back as an iscrowd annotation (item 5 of the COCO-ids issue)
    assert len([a for a in again["annotations"] if not a["iscrowd"]]) == 3
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in again["annotations"] if a["iscrowd"]] == [
        (2, 2, [0.0, 0.0, 5.0, 5.0])
    ]


# --- COCO ids kept, scoring against the original, CLI mistakes, damaged shards ----------------------


def _scorable_fixture(tmp_path):
    """COCO with non-consecutive image and category ids, supercategories, polygons and a crowd region."""
    imgs = tmp_path / "images"
    imgs.mkdir()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(imgs / "a.jpg")
    Image.new("RGB", (32, 24), (1, 2, 3)).save(imgs / "b.jpg")
    inst = {
        "images": [{"id": 139, "file_name": "a.jpg", "width": 40, "height": 30},
                   {"id": 785, "file_name": "b.jpg", "width": 32, "height": 24}],
        "categories": [{"id": 18, "name": "dog", "supercategory": "animal"},
                       {"id": 62, "name": "chair", "supercategory": "furniture"},
                       {"id": 1, "name": "person", "supercategory": "person"}],
        "annotations": [
            {"id": 10, "image_id": 139, "category_id": 18, "bbox": [2, 3, 10, 10], "iscrowd": 0, "area": 100,
             "segmentation": [[2, 3, 12, 3, 12, 13, 2, 13]]},
            {"id": 11, "image_id": 139, "category_id": 62, "bbox": [20, 5, 15, 20], "iscrowd": 0, "area": 300,
             "segmentation": [[20, 5, 35, 5, 35, 25, 20, 25]]},
            {"id": 12, "image_id": 785, "category_id": 18, "bbox": [4, 4, 12, 8], "iscrowd": 0, "area": 96,
             "segmentation": [[4, 4, 16, 4, 16, 12, 4, 12]]},
            {"id": 13, "image_id": 785, "category_id": 1, "bbox": [20, 0, 12, 24], "iscrowd": 1, "area": 288,
             "segmentation": {"size": [24, 32], "counts": [480, 288]}},
        ],
    }
    (tmp_path / "inst.json").write_text(json.dumps(inst))
    return imgs


def test_to_coco_of_a_from_coco_dataset_scores_ap_1_against_the_original(tmp_path):
    from pycocotools.cocoeval import COCOeval

    imgs = _scorable_fixture(tmp_path)
    ds, out = tmp_path / "ds", tmp_path / "export.json"
    assert cli(["from-coco", "--instances", str(tmp_path / "inst.json"), "--images", str(imgs), str(ds)]) == 0
    rec = {s.record.meta["coco_id"]: s.record for s in iter_samples(str(ds))}[785]
    assert rec.meta["coco_category_ids"] == [18] and rec.meta["coco_supercategories"] == ["animal"]
    assert [(c["category_id"], c["name"], c["supercategory"], c["bbox"]) for c in rec.meta["coco_crowd"]] == [
        (1, "person", "person", [20.0, 0.0, 12.0, 24.0])]
    assert cli(["to-coco", str(ds), str(out)]) == 0
    export = json.loads(out.read_text())
    assert sorted(i["id"] for i in export["images"]) == [139, 785]
    assert export["categories"] == [{"id": 1, "name": "person", "supercategory": "person"},
                                    {"id": 18, "name": "dog", "supercategory": "animal"},
                                    {"id": 62, "name": "chair", "supercategory": "furniture"}]
    crowd = [a for a in export["annotations"] if a["iscrowd"]]
    assert [(a["image_id"], a["category_id"], a["bbox"], a["area"]) for a in crowd] == [
        (785, 1, [20.0, 0.0, 12.0, 24.0], 288.0)]
    gt = COCO(str(tmp_path / "inst.json"))
    dets = [{**a, "score": 1.0} for a in export["annotations"] if not a["iscrowd"]]
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(gt, gt.loadRes([{k: v for k, v in d.items() if k != "id"} for d in dets]), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == 1.0, iou_type  # AP@[.5:.95]


def test_to_coco_of_other_datasets_numbers_images_and_phrases(tmp_path):
    write_dataset(tmp_path / "ds", n=2)
    n = to_coco(str(tmp_path / "ds"), str(tmp_path / "o.json"))
    assert n["source_ids"] is False and n["crowd"] == 0
    export = json.loads((tmp_path / "o.json").read_text())
    assert [i["id"] for i in export["images"]] == [1, 2]
    assert export["categories"] == [{"id": 1, "name": "thing0", "supercategory": ""},
                                    {"id": 2, "name": "thing1", "supercategory": ""}]


def _from_coco_args(tmp_path, imgs, **change):
    args = {"--instances": str(tmp_path / "inst.json"), "--images": str(imgs)}
    args.update(change)
    return ["from-coco", *[x for kv in args.items() for x in kv], str(tmp_path / "out")]


def test_from_coco_mistakes_are_one_error_line_exit_2_and_write_nothing(tmp_path, capsys):
    imgs = _scorable_fixture(tmp_path)
    inst = json.loads((tmp_path / "inst.json").read_text())
    dup = {**inst, "images": inst["images"] + [{"id": 139, "file_name": "b.jpg", "width": 32, "height": 24}]}
    (tmp_path / "dup.json").write_text(json.dumps(dup))
    (tmp_path / "broken.json").write_text('{"images": [')
    cases = [
        (_from_coco_args(tmp_path, imgs, **{"--instances": str(tmp_path / "none.json")}),
         f"error: --instances {tmp_path / 'none.json'}: no such file\n"),
        (_from_coco_args(tmp_path, imgs, **{"--instances": str(tmp_path / "dup.json")}),
         f"error: {tmp_path / 'dup.json'}: images id 139 appears more than once\n"),
        (_from_coco_args(tmp_path, tmp_path / "no_images"), f"error: --images {tmp_path / 'no_images'}: no such folder\n"),
        (_from_coco_args(tmp_path, imgs, **{"--captions": str(tmp_path / "caps.json")}),
         f"error: --captions {tmp_path / 'caps.json'}: no such file\n"),
    ]
    for argv, expected in cases:
        assert cli(argv) == 2, argv
        assert capsys.readouterr().err == expected
        assert not (tmp_path / "out").exists()
    assert cli(_from_coco_args(tmp_path, imgs, **{"--instances": str(tmp_path / "broken.json")})) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --instances {tmp_path / 'broken.json'}: not valid JSON") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_to_coco_missing_output_folder_is_an_error_line(tmp_path, capsys):
    write_dataset(tmp_path / "ds", n=1)
    out = tmp_path / "no" / "such" / "coco.json"
    assert cli(["to-coco", str(tmp_path / "ds"), str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out}: the output folder {out.parent} does not exist\n"


def test_to_coco_skips_a_damaged_shard_and_exits_1_naming_it(tmp_path, capsys):
    ds = tmp_path / "ds"
    write_dataset(ds, n=3, shard_id=0)
    write_dataset(ds, n=3, shard_id=1)
    t1 = ds / "000001.tar"
    t1.write_bytes(t1.read_bytes()[:3000])
    out = tmp_path / "coco.json"
    assert cli(["to-coco", str(ds), str(out)]) == 1
    err = capsys.readouterr().err
    size = json.loads((ds / "000001.stats.json").read_text())["tar_bytes"]
    assert f"shard 000001 left out: {t1}: holds 3000 bytes but its stats file recorded {size}: damaged " \
           "(truncated or overwritten), not read" in err
    assert err.splitlines()[-1] == f"error: 1 shard(s) and 0 sample(s) could not be read and are not in {out}"
    export = json.loads(out.read_text())
    assert sorted(i["file_name"] for i in export["images"]) == ["k0_000.jpg", "k0_001.jpg", "k0_002.jpg"]


def test_to_coco_leaves_out_a_mask_pycocotools_cannot_decode(tmp_path, capsys):
    from test_shards import _rewrite_tar, reseal

    ds = tmp_path / "ds"
    write_dataset(ds, n=2)

    def break_mask(members):
        out = []
        for name, data in members:
            if name == "k0_001.json":
                d = json.loads(data)
                d["objects"][0]["mask"]["counts"] = "1"
                data = json.dumps(d).encode()
            out.append((name, data))
        return out

    _rewrite_tar(ds / "000000.tar", break_mask)
    reseal(ds / "000000.tar")  # written that way: the mask is at fault, not a changed tar
    assert cli(["to-coco", str(ds), str(tmp_path / "o.json")]) == 0
    assert "mask left out: shard 000000 key k0_001 objects[0].mask: runs cover 1 pixels" in capsys.readouterr().err
    coco = COCO(str(tmp_path / "o.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == 4 and sum("segmentation" in a for a in anns) == 3


def test_from_coco_into_a_dataset_of_another_config_is_an_error_line(tmp_path, capsys):
    imgs = _scorable_fixture(tmp_path)
    assert cli(_from_coco_args(tmp_path, imgs)) == 0
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    capsys.readouterr()
    assert cli(_from_coco_args(tmp_path, imgs, **{"--shard-size": "1"})) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'out'}: ") and "different configuration" in err
    assert err.count("\n") == 1 and sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_validate_checks_the_coco_meta_of_each_sample(tmp_path):
    from test_shards import _rewrite_tar

    imgs = _scorable_fixture(tmp_path)
    ds = tmp_path / "out"
    assert cli(_from_coco_args(tmp_path, imgs)) == 0
    assert validate_dataset(str(ds)) == []

    def break_meta(members):
        out = []
        for name, data in members:
            if name == "coco000000000785.json":
                d = json.loads(data)
                meta = json.loads(d["meta"])  # schema_version 2 stores meta as a JSON string
                meta["coco_category_ids"] = [18, 1]  # one object, two ids
                meta["coco_crowd"][0]["segmentation"]["counts"] = "1"
                data = json.dumps({**d, "meta": json.dumps(meta)}).encode()
            out.append((name, data))
        return out

    _rewrite_tar(ds / "000000.tar", break_meta)
    problems = [str(p) for p in validate_dataset(str(ds)) if "meta" in str(p)]
    where = "shard 000000 key coco000000000785 member 'coco000000000785.json'"
    assert problems == [f"{where}: meta.coco_category_ids must hold one int per object (1)",
                        f"{where}: meta.coco_crowd[0].segmentation: runs cover 1 pixels, the size 24x32 has 768"]


def test_to_coco_into_a_folder_is_an_error_line(tmp_path, capsys):
    write_dataset(tmp_path / "ds", n=1)
    assert cli(["to-coco", str(tmp_path / "ds"), str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: is a folder; give the path of the file to write\n"

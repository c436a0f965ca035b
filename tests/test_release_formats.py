"""Datasets in the release's forms written as shards: a user's Python items (write_dataset, from-python) and
the release's label_<image>.json files (from-release), each item accounted for and read back with iter_samples."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from shards import decode_mask, encode_mask, iter_samples
from shards.__main__ import main as shards_main
from shards.release import detect_padding, from_release
from shards.user_dataset import write_dataset

RNG = np.random.default_rng(0)


def _rows(dataset):
    return pd.read_parquet(dataset / "000000.parquet").set_index("key")


def _item(h=24, w=32):
    image = RNG.integers(0, 256, (3, h, w)).astype(np.float32) / 255  # the release's (c, h, w) in [0, 1]
    masks = np.zeros((2, h, w), np.float32)
    masks[0, 2:10, 4:20] = 1
    masks[1, 12:, :] = 1
    return {"image": image, "caption": "a dog on grass", "bboxes": np.array([[4, 2, 20, 10], [0, 12, 32, 24]]),
            "masks": masks, "labels": ["a brown dog", "green grass"]}  # fmt: skip


class MapDataset:
    """Map-style, as a torch Dataset: index 2 fails to load, index 3 has one label too few."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            raise OSError("disk error on item 2")
        item = dict(self.items[0 if i == 3 else i])
        if i == 3:
            item["labels"] = item["labels"][:1]
        return item


def test_write_dataset_round_trips_and_accounts_for_every_item(tmp_path):
    first = _item()
    path = tmp_path / "photo.png"
    Image.fromarray(RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    second = {"image_path": str(path), "caption": "x", "bboxes": [[1, 2, 47, 40]], "labels": ["a wall"]}
    out = tmp_path / "ds"
    counts = write_dataset(MapDataset([first, second]), str(out), shard_size=3)
    assert counts == {"items": 4, "samples": 2, "failures": 2, "shards": 2}
    samples = {s.record.key: s for s in iter_samples(str(out))}
    assert sorted(samples) == ["000000000", "000000001"]
    a = samples["000000000"]
    assert np.array_equal(np.asarray(a.image()), np.round(first["image"] * 255).astype(np.uint8).transpose(1, 2, 0))
    assert [o.box for o in a.record.objects] == [(4, 2, 20, 10), (0, 12, 32, 24)]
    assert [o.description for o in a.record.objects] == first["labels"] and a.record.source_caption == "a dog on grass"
    assert all(np.array_equal(m, t > 0.5) for m, t in zip(a.masks(), first["masks"], strict=True))
    assert a.record.objects[0].mask_box == (4, 2, 20, 10)
    b = samples["000000001"]
    assert b.image_bytes == path.read_bytes() and b.record.source == str(path) and b.masks() == [None]
    failed = pd.concat([_rows(out), pd.read_parquet(out / "000001.parquet").set_index("key")])
    failed = failed[failed.status == "failed"]
    assert failed.error_stage.to_dict() == {"000000002": "read", "000000003": "convert"}
    assert "disk error on item 2" in failed.error["000000002"]
    assert "field 'labels' must be 2 strings" in failed.error["000000003"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"image": np.zeros((24, 32, 3), np.float32)}, "must have shape (c, h, w)"),
        ({"image": np.full((3, 24, 32), -1.0, np.float32)}, "float values must be in [0, 1]"),
        ({"bboxes": [[0, 0, 40, 10], [0, 12, 32, 24]]}, "lies outside the 32x24 image"),
        ({"masks": np.zeros((2, 8, 8))}, "field 'masks' must have shape (N, h, w) = (2, 24, 32)"),
        ({"image": None, "image_path": "/nonexistent.jpg"}, "No such file"),
    ],
)
def test_a_bad_item_is_a_failed_row_naming_the_field(tmp_path, change, reason):
    counts = write_dataset(iter([{**_item(), **change}, _item()]), str(tmp_path / "ds"))
    assert (counts["samples"], counts["failures"]) == (1, 1)
    assert reason in _rows(tmp_path / "ds").error["000000000"]


def test_a_failing_iterator_is_recorded_and_ends_the_run(tmp_path):
    def items():
        yield _item()
        raise RuntimeError("the loader broke")

    counts = write_dataset(items(), str(tmp_path / "ds"))
    assert (counts["items"], counts["samples"], counts["failures"]) == (2, 1, 1)
    assert "RuntimeError: the loader broke" in _rows(tmp_path / "ds").error["000000001"]


def test_from_python_cli(tmp_path, monkeypatch, capsys):
    module = tmp_path / "my_data.py"
    module.write_text("import numpy as np\n"
                      "def items():\n"
                      "    image = np.zeros((3, 16, 16), np.uint8)\n"
                      "    return [{'image': image, 'caption': 'c', 'bboxes': [[0, 0, 8, 8]], 'labels': ['a']}] * 3\n"
                      "def broken():\n"
                      "    raise KeyError('split')\n")  # fmt: skip
    out = tmp_path / "ds"
    assert shards_main(["from-python", f"{module}:items", str(out)]) == 0
    assert "3 samples, 0 failures of 3 items" in capsys.readouterr().out
    monkeypatch.syspath_prepend(str(tmp_path))
    assert shards_main(["from-python", "my_data:items", str(tmp_path / "ds2")]) == 0
    assert [s.record.key for s in iter_samples(str(tmp_path / "ds2"))] == ["000000000", "000000001", "000000002"]
    for spec, message in [("my_data", "expected module:function"), ("no_such_module:f", "cannot import 'no_such_module'"),
                          ("my_data:nothing", "has no function 'nothing'"),
                          ("my_data:broken", "my_data:broken() raised KeyError: 'split'")]:  # fmt: skip
        assert shards_main(["from-python", spec, str(tmp_path / "ds3")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (spec, err)


def test_detect_padding_exact():
    content = RNG.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    padded = np.full((64, 64, 3), 255, np.uint8)
    padded[12:52] = content
    padded[:12] = np.clip(255 - RNG.integers(0, 5, (12, 64, 3)), 0, 255)  # JPEG-like noise in the border
    assert detect_padding(padded) == (0, 12, 0, 12)
    side = np.zeros((48, 48, 3), np.uint8)
    side[:, 5:41] = RNG.integers(1, 256, (48, 36, 3))
    assert detect_padding(side) == (5, 0, 7, 0)
    assert detect_padding(np.full((16, 16, 3), 9, np.uint8)) == (0, 0, 0, 0)
    assert detect_padding(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)) == (0, 0, 0, 0)


def _write_label(folder, name, label):
    path = folder / f"label_{name}.json"
    path.write_text(label if isinstance(label, str) else json.dumps(label))


def test_from_release_scales_unpads_and_records_every_failure(tmp_path, capsys):
    labels, images, out = tmp_path / "labels", tmp_path / "images", tmp_path / "ds"
    (labels / "sub").mkdir(parents=True)
    (images / "00000").mkdir(parents=True)
    # RC-COCO style: a 96x64 image labelled at 768 on the long side (boxes and mask x 96/768 = 1/8).
    Image.fromarray(RNG.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(images / "00000" / "1001.png")
    mask = np.zeros((512, 768), bool)
    mask[160:480, 80:320] = True
    _write_label(labels / "sub", "1001", {"caption": "two cats", "annos": [
        {"bbox": [80, 160, 240, 320], "category_name": "cat", "caption": "a grey cat asleep", "pred_score": 0.61,
         "mask": encode_mask(mask)}]})  # fmt: skip
    # LAION style: a 64x64 image padded from 64x40 with white rows, boxes in the padded image.
    padded = np.full((64, 64, 3), 255, np.uint8)
    padded[12:52] = RNG.integers(0, 200, (40, 64, 3))
    Image.fromarray(padded).save(images / "2002.png")
    _write_label(labels, "2002", {"caption": "a kite", "annos": [
        {"bbox": [8, 20, 16, 16], "category_name": "kite", "caption": "a red kite"},
        {"bbox": [0, 0, 64, 10], "category_name": "pad", "caption": "only padding"}]})  # fmt: skip
    # The same, with its img2dataset meta file: the padding comes from the original size (64x40 -> 12 rows).
    Image.fromarray(padded).save(images / "2003.png")
    (images / "2003.json").write_text(json.dumps({"original_width": 320, "original_height": 200}))
    _write_label(labels, "2003", {"caption": "a kite", "annos": [{"bbox": [8, 20, 16, 16], "category_name": "kite"}]})
    _write_label(labels, "3003", {"caption": "no image", "annos": []})
    Image.fromarray(padded).save(images / "4004.png")
    _write_label(labels, "4004", "{not json")
    Image.fromarray(padded).save(images / "5005.png")
    _write_label(labels, "5005", {"caption": "", "annos": [{"bbox": [500, 0, 100, 10], "category_name": "x"}]})

    assert shards_main(["from-release", "--labels", str(labels), "--images", str(images), "--unpad", str(out)]) == 0
    assert "3 samples, 3 failures, 1 shards" in capsys.readouterr().out
    samples = {s.record.key: s for s in iter_samples(str(out))}
    coco = samples["1001"].record
    assert (coco.width, coco.height, coco.source_caption) == (96, 64, "two cats")
    (cat,) = coco.objects
    assert (cat.box, cat.phrase, cat.description, cat.detector_score) == ((10, 20, 40, 60), "cat", "a grey cat asleep", 0.61)
    assert cat.mask_box == (10, 20, 40, 60) and decode_mask(cat.mask).sum() == 30 * 40
    laion = samples["2002"].record
    assert (laion.width, laion.height, laion.original_width, laion.original_height) == (64, 40, 64, 64)
    assert [o.box for o in laion.objects] == [(8, 8, 24, 24)] and laion.meta["dropped_objects"] == 1
    assert laion.meta["padding"] == [0, 12, 0, 12] and laion.meta["padding_from"] == "detected"
    from_meta = samples["2003"].record
    assert from_meta.meta["padding"] == [0, 12, 0, 12] and from_meta.meta["padding_from"] == "meta"
    assert [o.box for o in from_meta.objects] == [(8, 8, 24, 24)] and from_meta.height == 40
    assert np.array_equal(np.asarray(samples["2002"].image()), padded[12:52])
    rows = _rows(out)
    failed = rows[rows.status == "failed"]
    assert failed.error_stage.to_dict() == {"3003": "read", "4004": "convert", "5005": "convert"}
    assert "no image 3003" in failed.error["3003"] and "not JSON" in failed.error["4004"]
    assert "annos[0].bbox [500, 0, 100, 10]" in failed.error["5005"] and "--label-size" in failed.error["5005"]


def test_from_release_explicit_label_size_and_cli_mistakes(tmp_path, capsys):
    labels, images = tmp_path / "labels", tmp_path / "images"
    labels.mkdir()
    images.mkdir()
    Image.new("RGB", (48, 32)).save(images / "7.jpg")
    _write_label(labels, "7", {"caption": "c", "annos": [{"bbox": [96, 64, 192, 128], "category_name": "box"}]})
    counts = from_release(str(labels), str(images), str(tmp_path / "ds"), label_size=768)
    assert counts == {"samples": 1, "failures": 0, "shards": 1}
    (sample,) = iter_samples(str(tmp_path / "ds"))
    assert sample.record.objects[0].box == (6, 4, 18, 12) and sample.image_ext == "jpg"
    for argv, message in [(["--labels", str(tmp_path / "none"), "--images", str(images)], "--labels: no folder"),
                          (["--labels", str(images), "--images", str(images)], "no label_<image>.json file")]:  # fmt: skip
        assert shards_main(["from-release", *argv, str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_torch_tensors_are_accepted_as_the_release_returns_them(tmp_path):
    torch = pytest.importorskip("torch")
    item = _item()
    tensors = {**item, "image": torch.from_numpy(item["image"]), "bboxes": torch.tensor(item["bboxes"], dtype=torch.int16),
               "masks": torch.from_numpy(item["masks"])}  # fmt: skip
    write_dataset([tensors], str(tmp_path / "ds"))
    (sample,) = iter_samples(str(tmp_path / "ds"))
    assert [o.box for o in sample.record.objects] == [(4, 2, 20, 10), (0, 12, 32, 24)]
    assert np.array_equal(sample.masks()[0], item["masks"][0] > 0.5)


def test_from_release_counts_a_label_nested_too_deep_as_a_failure_and_goes_on(tmp_path):
    """A label nested 100,000 deep is a failure row (shards.safe_json), not a RecursionError ending the run."""
    labels, images = tmp_path / "labels", tmp_path / "images"
    labels.mkdir()
    images.mkdir()
    Image.new("RGB", (64, 64)).save(images / "deep.jpg")
    (labels / "label_deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert shards_main(["from-release", "--labels", str(labels), "--images", str(images), str(tmp_path / "out")]) == 0
    rows = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "out").glob("*.parquet"))])
    assert list(rows["status"]) == ["failed"] and "nested deeper than 64 levels" in rows["error"].iloc[0]

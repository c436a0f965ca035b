"""The two CLIs end to end on tiny models: generate images + overlays, then score every object."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from training.evaluation import evaluate
from training.inference import generate
from training.layout.dataset import layouts_from_dataset
from training.layout.files import read_layouts

LAYOUTS = [
    {"id": "beach", "caption": "a beach", "boxes": [[0, 0, 32, 32], [16, 8, 64, 60]],
     "labels": ["a red kite", "a dog lying on the sand"]},
    {"bboxes": [[4, 4, 60, 20]], "labels": ["a blue car"], "seed": 7},  # the paper's demo key
    {"id": "street", "boxes": [[0, 0, 8, 8], [0, 32, 64, 64]], "labels": ["a cat", "a road"]},
]  # fmt: skip


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    layouts = root / "layouts.jsonl"
    layouts.write_text("".join(json.dumps(x) + "\n" for x in LAYOUTS))
    out = root / "out"
    assert generate.main(["--tiny", "--layouts", str(layouts), "--out", str(out)]) == 0
    return out


def test_generate_writes_images_overlays_and_resolved_layouts(generated):
    for name in ("beach", "000001", "street"):
        with Image.open(generated / f"{name}.png") as im:
            assert im.size == (64, 64)
        with Image.open(generated / "overlays" / f"{name}.png") as im:
            assert im.size == (64, 64)
    records = read_layouts(generated / "layouts.jsonl")
    assert [(r.id, r.seed, len(r.boxes)) for r in records] == [("beach", 0, 2), ("000001", 7, 1), ("street", 2, 2)]
    assert json.loads((generated / "generate.json").read_text())["objects"] == 5


def test_generate_rejects_a_bad_layout_before_loading_models(tmp_path, capsys):
    layouts = tmp_path / "bad.jsonl"
    layouts.write_text(json.dumps({"boxes": [[0, 0, 80, 8]], "labels": ["a"]}) + "\n")
    assert generate.main(["--tiny", "--layouts", str(layouts), "--out", str(tmp_path / "o")]) == 2
    assert f"error: {layouts}:1" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("protocol", ["paper", "exact"])
def test_evaluate_counts_every_object_and_writes_reports(generated, tmp_path, monkeypatch, capsys, protocol):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights anywhere
    images = tmp_path / "images"
    images.mkdir()
    for name in ("beach", "000001"):  # "street" is missing: its 2 objects must still be counted
        Image.open(generated / f"{name}.png").resize((128, 128)).save(images / f"{name}.png")  # boxes scale x2
    reference = tmp_path / "ref"
    reference.mkdir()
    out = tmp_path / "eval"
    argv = ["--tiny", "--images", str(images), "--layouts", str(generated / "layouts.jsonl"), "--out", str(out),
            "--reference", str(reference), "--protocol", protocol]  # fmt: skip
    assert evaluate.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)

    table = pd.read_csv(out / "objects.csv")
    assert len(table) == 5 and table.groupby("image").size().to_dict() == {"000001": 1, "beach": 2, "street": 2}
    beach = table[table["image"] == "beach"].iloc[0]
    assert [beach.x1, beach.y1, beach.x2, beach.y2, beach.image_width] == [0, 0, 64, 64, 128]
    street = table[table["image"] == "street"]
    assert street["error"].str.startswith("missing image").all()
    if protocol == "paper":  # the paper's evaluation skips an image it cannot find: out of every average
        assert street[["crop_clip", "crop_pick", "sam_iou"]].isna().all().all()
    else:  # every object counts: 0
        assert (street[["crop_clip", "crop_pick", "sam_iou"]] == 0).all().all()
    assert table.loc[table["image"] != "street", "error"].isna().all()

    summary = json.loads((out / "summary.json").read_text())
    assert printed["objects"] == summary["objects"] == 5 and summary["images_missing"] == 1
    assert summary["protocol"] == protocol
    assert summary["skipped_objects"]["crop_clip"] == (2 if protocol == "paper" else 0)
    assert summary["failed_objects"] == 2 and summary["failures_by_reason"] == {"missing image": 2}
    per_image = table.groupby("image")["crop_clip"].mean().mean()  # NaN groups drop out of pandas' mean
    assert summary["crop_clip"] == pytest.approx(per_image)
    present = table[table["image"] != "street"].groupby("image")["sam_iou"].mean()
    expected = present.mean() if protocol == "paper" else present.sum() / 3
    assert summary["sam_iou"] == pytest.approx(expected)
    assert sum(b["objects"] for b in summary["by_size"].values()) == 5
    # Relative buckets (tiny preset: < 2% small, < 20% medium): 8x8 of 64x64 is 1.6%, the others larger.
    assert table.set_index(["image", "object"]).loc[("street", 0), "size"] == "small"
    assert summary["fid"] is None and "Inception v3 weights" in summary["fid_skipped"]
    assert np.isfinite(summary["sam_iou"])


def _tiny_dataset(root):
    """Two samples, 80x48 and 48x48, written with the shard writer (what --from-shards reads)."""
    import io

    from shards import ObjectRecord, SampleRecord, ShardWriter

    with ShardWriter(str(root), 0) as writer:
        for key, (w, h) in (("wide", (80, 48)), ("square", (48, 48))):
            buf = io.BytesIO()
            Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
            objects = (ObjectRecord(box=(0, 8, 40, 48), phrase="kite", description="a red kite"),
                       ObjectRecord(box=(40, 0, 48, 8), phrase="sun"))  # fmt: skip
            record = SampleRecord(key=key, width=w, height=h, original_width=w, original_height=h,
                                  caption="a beach", objects=objects)  # fmt: skip
            writer.add(record, buf.getvalue(), "png")
    return root


def test_generate_from_shards_with_a_refiner_saves_both_and_the_ground_truth(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights anywhere
    dataset, out = _tiny_dataset(tmp_path / "ds"), tmp_path / "gen"
    argv = ["--tiny", "--from-shards", str(dataset), "--limit", "1", "--out", str(out), "--refiner", "tiny",
            "--refiner-strength", "0.5", "--refiner-steps", "2"]  # fmt: skip
    assert generate.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 1 and summary["refined"] and summary["reference"] == str(out / "reference")
    (record,) = read_layouts(out / "layouts.jsonl")  # the first sample only (--limit 1), aspect kept
    assert (record.id, record.width, record.height, record.caption) == ("square", 64, 64, "a beach")
    assert record.labels == ("a red kite", "sun")  # description, else the detector phrase
    np.testing.assert_allclose(record.boxes, np.array([[0, 8, 40, 48], [40, 0, 48, 8]]) * 64 / 48)
    refined, unrefined = (np.asarray(Image.open(p / "square.png")) for p in (out, out / "unrefined"))
    assert refined.shape == unrefined.shape == (64, 64, 3) and not np.array_equal(refined, unrefined)
    with Image.open(out / "reference" / "square.png") as im:
        assert im.size == (64, 64) and im.getpixel((5, 5)) == (200, 30, 30)
    wide, _ = layouts_from_dataset(str(dataset), 64)
    assert [(r.id, r.width, r.height) for r in wide] == [("square", 64, 64), ("wide", 64, 40)]
    # What evaluate needs to score against the same dataset: the layouts and the real images beside them.
    argv = ["--tiny", "--images", str(out / "reference"), "--layouts", str(out / "layouts.jsonl"), "--out",
            str(tmp_path / "eval")]  # fmt: skip
    assert evaluate.main(argv) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["objects"] == 2 and scored["failed_objects"] == 0


def test_generate_release_demo_file_and_bad_layouts(tmp_path, monkeypatch, capsys):
    # One tiny pipeline for the three runs (as the tiny preset builds it): the test is about the layouts.
    pipe = generate.load_pipeline(generate.GenerateConfig(base="tiny", device="cpu", dtype="float32", max_objects=8,
                                                          max_slots=8))  # fmt: skip
    monkeypatch.setattr(generate, "load_pipeline", lambda cfg: pipe)
    demo = tmp_path / "100002558.json"
    bad = {"bboxes": [[0, 0, 80, 8]], "labels": ["a"]}  # outside the tiny preset's 64x64
    demo.write_text(json.dumps([{"bboxes": [[4, 4, 60, 30]], "labels": ["a boat"]}, bad], indent=4))
    out = tmp_path / "o"
    assert generate.main(["--tiny", "--layouts", str(demo), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {demo}[1]: box 0") and not out.exists()
    assert generate.main(["--tiny", "--layouts", str(demo), "--out", str(out), "--skip-bad-layouts"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 1 and [s["where"] for s in summary["skipped"]] == [f"{demo}[1]"]
    assert (out / "000000.png").is_file() and not (out / "000001.png").exists()
    assert generate.main(["--tiny", "--layouts", str(demo), "--out", str(tmp_path / "l"), "--lenient"]) == 0
    assert json.loads(capsys.readouterr().out)["objects"] == 2  # the bad box clamped to the image
    assert read_layouts(tmp_path / "l" / "layouts.jsonl")[1].boxes.tolist() == [[0, 0, 64, 8]]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "error: give a layouts file (--layouts) or a dataset (--from-shards)"),
        (["--from-shards", "/nonexistent/ds"], "error: dataset '/nonexistent/ds' does not exist"),
        (["--layouts", "/nonexistent.json"], "error: /nonexistent.json: no such layouts file"),
        (["--layouts", "x.json", "--set", "refiner_strength=2"], "error: override refiner_strength=2: generate.refiner_strength: must be in (0, 1] (got 2)"),
    ],
)
def test_generate_cli_mistakes_are_one_error_line(tmp_path, capsys, argv, message):
    assert generate.main(["--tiny", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_generate_from_shards_keeps_the_first_max_objects_with_a_warning_and_counts_the_rest(tmp_path, capsys, caplog):
    import io

    from shards import ObjectRecord, SampleRecord, ShardWriter

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 120, 200)).save(buf, "PNG")
    objects = tuple(ObjectRecord(box=(4 * i, 4 * i, 4 * i + 16, 4 * i + 16), phrase=f"thing {i}") for i in range(10))
    with ShardWriter(str(tmp_path / "ds"), 0) as writer:
        writer.add(SampleRecord(key="busy", width=64, height=64, original_width=64, original_height=64,
                                caption="ten things", objects=objects), buf.getvalue(), "png")  # fmt: skip
    out = tmp_path / "gen"
    assert generate.main(["--tiny", "--from-shards", str(tmp_path / "ds"), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["objects"] == 8 and summary["objects_dropped"] == 2  # the tiny model takes at most 8
    (record,) = read_layouts(out / "layouts.jsonl")
    assert record.labels == tuple(f"thing {i}" for i in range(8))
    assert "10 objects, kept the first 8" in caplog.text


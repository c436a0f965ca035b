"""The two CLIs end to end on tiny models: generate images + overlays, then score every object."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from training import evaluate, generate
from training.layouts import read_layouts

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


def test_evaluate_counts_every_object_and_writes_reports(generated, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights anywhere
    images = tmp_path / "images"
    images.mkdir()
    for name in ("beach", "000001"):  # "street" is missing: its 2 objects must still be counted
        Image.open(generated / f"{name}.png").resize((128, 128)).save(images / f"{name}.png")  # boxes scale x2
    reference = tmp_path / "ref"
    reference.mkdir()
    out = tmp_path / "eval"
    argv = ["--tiny", "--images", str(images), "--layouts", str(generated / "layouts.jsonl"), "--out", str(out),
            "--reference", str(reference)]  # fmt: skip
    assert evaluate.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)

    table = pd.read_csv(out / "objects.csv")
    assert len(table) == 5 and table.groupby("image").size().to_dict() == {"000001": 1, "beach": 2, "street": 2}
    beach = table[table["image"] == "beach"].iloc[0]
    assert [beach.x1, beach.y1, beach.x2, beach.y2, beach.image_width] == [0, 0, 64, 64, 128]
    street = table[table["image"] == "street"]
    assert (street[["crop_clip", "sam_iou"]] == 0).all().all() and street["error"].str.startswith("missing image").all()
    assert table.loc[table["image"] != "street", "error"].isna().all()

    summary = json.loads((out / "summary.json").read_text())
    assert printed["objects"] == summary["objects"] == 5
    assert summary["failed_objects"] == 2 and summary["failures_by_reason"] == {"missing image": 2}
    per_image = table.groupby("image")["crop_clip"].mean().mean()
    assert summary["crop_clip"] == pytest.approx(per_image)
    assert sum(b["objects"] for b in summary["by_size"].values()) == 5
    # Relative buckets (tiny preset: < 2% small, < 20% medium): 8x8 of 64x64 is 1.6%, the others larger.
    assert table.set_index(["image", "object"]).loc[("street", 0), "size"] == "small"
    assert summary["fid"] is None and "Inception v3 weights" in summary["fid_skipped"]
    assert np.isfinite(summary["sam_iou"])

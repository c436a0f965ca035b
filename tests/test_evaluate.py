"""``python -m training.evaluate`` end to end on tiny models under both protocols, with the paper
protocol's transformers CLIP loaded from a local folder and FID from a local (random) Inception file."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_metrics import random_inception_weights

from training.evaluation import evaluate
from training.evaluation.metrics import mean_per_image, tiny_hf_clip

LAYOUTS = [
    {"id": "a", "boxes": [[0, 0, 32, 32], [10.2, 3, 10.8, 20]], "labels": ["a red kite", "a thin pole"]},
    {"id": "b", "boxes": [[4.5, 4.5, 60.5, 20.5]], "labels": ["a blue car"]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    (root / "layouts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in LAYOUTS))
    rng = np.random.default_rng(0)
    for name in ("images", "reference"):
        (root / name).mkdir()
        for layout in LAYOUTS:
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{layout['id']}.png")
    model, processor = tiny_hf_clip()
    model.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    random_inception_weights(root / "inception.pth")
    return root


def _run(root, out, capsys, *extra):
    argv = ["--tiny", "--images", str(root / "images"), "--layouts", str(root / "layouts.jsonl"),
            "--out", str(out), "--set", f"paper_clip={root / 'clip'}", "--set", f"pickscore={root / 'clip'}",
            "--set", f"pickscore_processor={root / 'clip'}", *extra]  # fmt: skip
    code = evaluate.main(argv)
    captured = capsys.readouterr()
    return code, captured


def test_paper_protocol_skips_failed_crops_and_names_itself(setup, tmp_path, capsys):
    out = tmp_path / "paper"
    code, captured = _run(setup, out, capsys, "--reference", str(setup / "reference"),
                          "--inception-weights", str(setup / "inception.pth"), "--set", "fid.feature=64")  # fmt: skip
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == json.loads(captured.out)["protocol"] == "paper"
    table = pd.read_csv(out / "objects.csv")
    assert list(table["image"]) == ["a", "a", "b"]
    # The int box [10, 3, 10, 20] of the pole has no width: skipped (NaN, not 0) by CropCLIP and CropPickScore.
    pole = table.iloc[1]
    assert np.isnan(pole.crop_clip) and np.isnan(pole.crop_pick) and "crop_clip skipped" in pole.error
    assert summary["skipped_objects"] == {"crop_clip": 1, "crop_pick": 1, "sam_iou": 0}
    assert summary["failures_by_reason"] == {"crop_clip skipped": 1, "crop_pick skipped": 1}
    # Mean per image, then over images, of the scored objects only: image a is its kite alone.
    kite, car = table.loc[0, "crop_clip"], table.loc[2, "crop_clip"]
    assert summary["crop_clip"] == pytest.approx((kite + car) / 2) == mean_per_image(table, "crop_clip")
    assert summary["crop_pick"] == pytest.approx(summary["crop_clip"])  # the same tiny model for both
    assert np.isfinite(summary["sam_iou"]) and summary["sam_iou"] >= 0
    assert np.isfinite(summary["fid"]) and summary["fid_feature"] == 64 and summary["fid_images"] == 2


def test_exact_protocol_counts_every_object_with_open_clip(setup, tmp_path, capsys):
    out = tmp_path / "exact"
    code, captured = _run(setup, out, capsys, "--protocol", "exact")
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    table = pd.read_csv(out / "objects.csv")
    assert summary["protocol"] == "exact" and summary["config"]["protocol"] == "exact"
    # Outward rounding gives the pole [10, 3, 11, 20]: scored, nothing skipped or failed.
    assert table[["crop_clip", "crop_pick", "sam_iou"]].notna().all().all() and table["error"].isna().all()
    assert summary["skipped_objects"] == {"crop_clip": 0, "crop_pick": 0, "sam_iou": 0}
    assert summary["fid"] is None and "no reference folder" in summary["fid_skipped"]


def test_a_bad_protocol_is_one_error_line(setup, tmp_path, capsys):
    code, captured = _run(setup, tmp_path / "x", capsys, "--set", "protocol=release")
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "protocol" in err[0]


def test_a_model_folder_that_does_not_exist_is_one_error_line(setup, tmp_path, capsys):
    code, captured = _run(setup, tmp_path / "x", capsys, "--set", f"paper_clip={tmp_path / 'nope'}")
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: evaluate.paper_clip: cannot load")


def test_help_names_each_metric_what_each_protocol_computes_and_how_to_turn_each_on_or_off(capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    for words in ("crop_clip", "CropCLIP", "crop_pick", "CropPickScore", "sam_iou", "SAMIoU", "fid", "FID",
                  "paper", "exact", "skipped", "scores 0", "--metrics crop_clip,sam_iou", "--reference DIR",
                  "FID on", "image_set", "unrefined"):  # fmt: skip
        assert words in text, words

"""CropCLIP, SAMIoU and FID on hand-computed cases, and the tiny scorers' batching and failure counting."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from datagen.models import ModelSpec
from training.metrics import (
    CropClipScorer,
    FidUnavailable,
    SamIoUScorer,
    crop_box,
    find_inception_weights,
    frechet_distance,
    mask_box,
    mean_per_image,
    sam_box_iou,
)


def _mask(h, w, box):
    m = np.zeros((h, w), dtype=bool)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = True
    return m


def test_mask_exactly_filling_the_box_gives_iou_1():
    box = [10, 20, 30, 25]
    assert mask_box(_mask(40, 40, box)).tolist() == [10, 20, 30, 25]
    assert sam_box_iou(box, _mask(40, 40, box), score=0.9) == 1.0


def test_half_mask_gives_half_iou():
    # Mask covers the left half of a 10x10 box: IoU = 50 / 100.
    assert sam_box_iou([0, 0, 10, 10], _mask(20, 20, [0, 0, 5, 10]), score=0.9) == pytest.approx(0.5)


def test_sam_score_at_threshold_or_empty_mask_gives_0():
    box = [10, 10, 30, 30]
    full = _mask(40, 40, box)
    assert sam_box_iou(box, full, score=0.5) == 0.0
    assert sam_box_iou(box, full, score=np.nextafter(0.5, 1)) == 1.0
    assert sam_box_iou(box, full, score=float("nan")) == 0.0
    assert sam_box_iou(box, np.zeros((40, 40), bool), score=0.99) == 0.0
    assert mask_box(np.zeros((4, 4), bool)) is None


def test_crop_box_rounds_outward_and_fails_outside():
    image = Image.new("RGB", (20, 10))
    assert crop_box(image, [2.5, 1.2, 7.1, 3.0]).size == (6, 2)  # x 2..8, y 1..3
    assert crop_box(image, [-5, -5, 100, 100]).size == (20, 10)
    with pytest.raises(ValueError, match="empty crop"):
        crop_box(image, [25, 0, 30, 5])
    with pytest.raises(ValueError, match="non-finite"):
        crop_box(image, [0, 0, float("nan"), 5])


def test_averaging_per_image_first_follows_the_paper():
    # Image a: one object scoring 90. Image b: three objects scoring 10.
    # Paper (per image, then over images): (90 + 10) / 2 = 50. Pooled over objects: (90 + 30) / 4 = 30.
    table = pd.DataFrame({"image": ["a", "b", "b", "b"], "score": [90.0, 10.0, 10.0, 10.0]})
    assert mean_per_image(table, "score") == pytest.approx(50.0)
    assert table["score"].mean() == pytest.approx(30.0)
    assert np.isnan(mean_per_image(table.iloc[:0], "score"))


def test_frechet_distance_hand_computed():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # A shift by d moves only the means: FID = |d|^2.
    assert frechet_distance(a, a + np.array([1.0, 2.0, 2.0])) == pytest.approx(9.0, rel=1e-6)
    # 1-D, same mean, sample std 1 vs 3: (1 - 3)^2 = 4.
    x = np.array([-1.0, 1.0])[:, None] / np.sqrt(2)  # sample variance 1
    assert frechet_distance(x, 3 * x) == pytest.approx(4.0, rel=1e-9)
    with pytest.raises(FidUnavailable):
        frechet_distance(a[:1], a)


def test_missing_inception_weights_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FidUnavailable, match="--inception-weights"):
        find_inception_weights(None)
    with pytest.raises(FidUnavailable, match="no Inception v3 weights"):
        find_inception_weights(str(tmp_path / "nope.pth"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(2)]


@pytest.fixture(scope="module")
def clip_scorer():
    return CropClipScorer(ModelSpec("clip", "tiny-clip", backend="tiny", device="cpu"), batch_size=2)


@pytest.fixture(scope="module")
def sam_scorer():
    return SamIoUScorer(ModelSpec("segmenter", "tiny-sam", backend="tiny", device="cpu"))


def test_crop_clip_scores_truncates_and_counts_failures(clip_scorer, images):
    long_a = "a dog " * 80 + "sitting"
    long_b = "a dog " * 80 + "flying over the sea"  # differs only after 77 tokens
    boxes = [np.array([[0, 0, 32, 24], [0, 0, 32, 24], [70, 0, 80, 10]]), np.array([[8, 8, 60, 40]])]
    labels = [[long_a, long_b, "a cat"], ["a red car"]]
    out = clip_scorer(images, boxes, labels)
    assert out[0].scores[0] == pytest.approx(out[0].scores[1], abs=1e-4)  # truncated to 77 tokens
    assert out[0].scores[2] == 0.0 and "empty crop" in out[0].errors[2]
    assert out[0].errors[:2] == [None, None] and out[1].errors == [None]

    # 100 x cosine of CLIP's image and text embeddings, computed directly.
    model, tok, pre = clip_scorer.model, clip_scorer.tokenizer, clip_scorer.preprocess
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(pre(images[1].crop((8, 8, 60, 40)))[None]), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tok(["a red car"])), dim=-1)
    assert out[1].scores[0] == pytest.approx(100 * float((img * txt).sum()), abs=1e-4)


def test_sam_embeds_each_image_once_and_batches_boxes(sam_scorer, images):
    calls = []
    hook = sam_scorer.predictor.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    boxes = [np.array([[0, 0, 32, 24], [10, 5, 60, 40], [0, 0, 64, 48], [100, 100, 120, 120]]), np.array([[8, 8, 60, 40]])]
    try:
        sam_scorer.score_threshold = -1.0  # random weights score near 0: let every mask through to the IoU
        out = sam_scorer(images, boxes)
    finally:
        sam_scorer.score_threshold = 0.5
        hook.remove()
    assert len(calls) == 2  # one embedding per image, whatever its number of boxes
    assert out[0].scores[3] == 0.0 and "no area inside" in out[0].errors[3] and np.isnan(out[0].sam_scores[3])

    # Batched decoding equals one SamPredictor.predict call per box (the release's way).
    predictor = sam_scorer.predictor
    predictor.set_image(np.asarray(images[0]))
    for j in range(3):
        masks, scores, _ = predictor.predict(box=boxes[0][j], multimask_output=False)
        assert out[0].sam_scores[j] == pytest.approx(float(scores[0]), abs=1e-5)
        assert out[0].scores[j] == pytest.approx(sam_box_iou(boxes[0][j], masks[0], scores[0], -1.0), abs=1e-6)
    predictor.reset_image()

    # With the paper's threshold the random model's low scores give 0, and nothing is reported as failed.
    default = sam_scorer(images[1:], boxes[1:])
    assert default[0].sam_scores[0] <= 0.5 and default[0].scores[0] == 0.0 and default[0].errors == [None]

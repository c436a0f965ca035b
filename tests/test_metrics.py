"""CropCLIP, CropPickScore, SAMIoU and FID on hand-computed cases, both protocols, and the tiny scorers'
batching and failure counting."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from datagen.models import ModelSpec
from datagen.scoring import crop_box, floor_box, pixel_box, sam_box_iou
from shards.masks import box_iou_pairs
from shards.masks import mask_to_box as mask_box
from training.evaluation.metrics import (
    CropClipScorer,
    FidUnavailable,
    HfCropScorer,
    SamIoUScorer,
    fid,
    find_inception_weights,
    mean_per_image,
    tiny_hf_clip,
)


def _mask(h, w, box):
    m = np.zeros((h, w), dtype=bool)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = True
    return m


def test_mask_exactly_filling_the_box_gives_iou_1():
    box = [10, 20, 30, 25]
    assert list(mask_box(_mask(40, 40, box))) == [10, 20, 30, 25]
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


def test_paper_sam_iou_uses_inclusive_mask_boxes():
    # The release: mask box [first_col, first_row, last_col, last_row], IoU with no +1.
    assert mask_box(_mask(40, 40, [10, 20, 30, 25]), inclusive=True) == (10, 20, 29, 24)
    for n, expected in ((10, 0.81), (32, 0.939), (100, 0.980)):
        box = [0, 0, n, n]
        iou = sam_box_iou(box, _mask(n + 5, n + 5, box), score=0.9, inclusive=True)
        assert iou == ((n - 1) / n) ** 2 and iou == pytest.approx(expected, abs=6e-4)  # 961/1024 = 0.9385
        assert sam_box_iou(box, _mask(n + 5, n + 5, box), score=0.5, inclusive=True) == 0.0


def test_box_geometry_exact_values():
    assert floor_box([2.7, 1.2, 7.9, -0.5]).tolist() == [2, 1, 7, -1]
    iou = box_iou_pairs(
        [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 0]], [[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]]
    )
    assert iou.tolist() == [50 / 150, 0.0, 0.0]
    # datagen's crops: outward, clipped, at least one pixel (the nearest edge pixel outside the image)
    assert pixel_box([2.5, 1.2, 7.1, 3.0], 20, 10) == (2, 1, 8, 3)
    assert pixel_box([25, 0, 30, 5], 20, 10, at_least_one_pixel=True) == (19, 0, 20, 5)
    assert pixel_box([3, 3, 3, 3], 20, 10, at_least_one_pixel=True) == (3, 3, 4, 4)
    assert crop_box(np.zeros((10, 20, 3)), [2.5, 1.2, 7.1, 3.0]).shape == (2, 6, 3)


def test_missing_inception_weights_say_what_to_do_before_counting_images(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FidUnavailable, match="no Inception v3 weights"):
        fid([tmp_path / "a.png"] * 3, [tmp_path / "b.png"] * 3)


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
    return SamIoUScorer(ModelSpec("segmenter", "tiny-sam", backend="tiny", device="cpu"), protocol="exact")


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
        img = torch.nn.functional.normalize(
            model.encode_image(pre(images[1].crop((8, 8, 60, 40)))[None]), dim=-1
        )
        txt = torch.nn.functional.normalize(model.encode_text(tok(["a red car"])), dim=-1)
    assert out[1].scores[0] == pytest.approx(100 * float((img * txt).sum()), abs=1e-4)


def test_sam_embeds_each_image_once_and_batches_boxes(sam_scorer, images):
    calls = []
    hook = sam_scorer.predictor.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    boxes = [
        np.array([[0, 0, 32, 24], [10, 5, 60, 40], [0, 0, 64, 48], [100, 100, 120, 120]]),
        np.array([[8, 8, 60, 40]]),
    ]
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
        assert out[0].scores[j] == pytest.approx(
            sam_box_iou(boxes[0][j], masks[0], scores[0], -1.0), abs=1e-6
        )
    predictor.reset_image()

    # With the paper's threshold the random model's low scores give 0, and nothing is reported as failed.
    default = sam_scorer(images[1:], boxes[1:])
    assert default[0].sam_scores[0] <= 0.5 and default[0].scores[0] == 0.0 and default[0].errors == [None]


def test_paper_sam_prompts_the_int_box_and_uses_inclusive_mask_boxes(sam_scorer, images):
    paper = SamIoUScorer(ModelSpec("segmenter", "tiny-sam", backend="tiny", device="cpu"), -1.0, "paper")
    boxes = [np.array([[0.7, 0.2, 32.9, 24.5], [10.5, 5.5, 60.2, 40.8]])]
    out = paper(images[:1], boxes)
    predictor = paper.predictor
    predictor.set_image(np.asarray(images[0]))
    for j, box in enumerate(boxes[0]):
        masks, scores, _ = predictor.predict(box=floor_box(box).astype(float), multimask_output=False)
        assert out[0].sam_scores[j] == pytest.approx(float(scores[0]), abs=1e-5)
        want = sam_box_iou(floor_box(box), masks[0], scores[0], -1.0, inclusive=True)
        assert out[0].scores[j] == pytest.approx(want, abs=1e-6)
    predictor.reset_image()


# ---------------------------------------------------------------------------------------------------
# transformers CLIP crop scores (paper CropCLIP and CropPickScore)


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    """The tiny transformers CLIP saved to a folder: loaded by path as a hub id would be."""
    folder = tmp_path_factory.mktemp("hf_clip")
    model, processor = tiny_hf_clip()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_hf_crop_score_is_logits_per_image_of_the_floored_crop(hf_clip_dir, images):
    scorer = HfCropScorer(str(hf_clip_dir), device="cpu", batch_size=2)
    long_a = "a dog " * 80 + "sitting"
    long_b = "a dog " * 80 + "flying over the sea"  # differs only after 77 tokens
    boxes = [
        np.array([[2.7, 1.2, 30.9, 24.5], [2.7, 1.2, 30.9, 24.5], [10.2, 3, 10.8, 20]]),
        np.array([[8, 8, 60, 40]]),
    ]
    out = scorer(images, boxes, [[long_a, long_b, "a cat"], ["a red car"]])
    assert out[0].scores[0] == pytest.approx(out[0].scores[1], abs=1e-4)  # truncated at 77 tokens
    # The int box [10, 3, 10, 20] has no width: the paper skips the object (NaN, not 0).
    assert np.isnan(out[0].scores[2]) and out[0].errors[2].startswith("crop_clip skipped: ")
    assert out[0].errors[:2] == [None, None] and out[1].errors == [None]

    # CLIP's own logits_per_image on (PIL crop of the int box, text): logit_scale * cosine.
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(hf_clip_dir), CLIPProcessor.from_pretrained(hf_clip_dir)
    inputs = processor(text=["a red car"], images=[images[1].crop((8, 8, 60, 40))], return_tensors="pt")
    with torch.no_grad():
        assert out[1].scores[0] == pytest.approx(float(model(**inputs).logits_per_image[0, 0]), abs=1e-4)
        inputs = processor(text=[long_a], images=[images[0].crop((2, 1, 30, 24))], return_tensors="pt",
                           truncation=True, max_length=77)  # fmt: skip
        assert out[0].scores[0] == pytest.approx(float(model(**inputs).logits_per_image[0, 0]), abs=1e-4)

    exact = HfCropScorer(str(hf_clip_dir), protocol="exact", metric="crop_pick", device="cpu")
    scored = exact(images[:1], [np.array([[10.2, 3, 10.8, 20], [70, 0, 80, 10]])], [["a cat", "a cat"]])[0]
    assert scored.errors[0] is None and np.isfinite(scored.scores[0])  # outward: [10, 3, 11, 20]
    assert scored.scores[1] == 0.0 and scored.errors[1].startswith("crop_pick: empty crop")


# ---------------------------------------------------------------------------------------------------
# FID (torchmetrics + torch-fidelity) on a randomly initialised Inception


def random_inception_weights(path):
    """torch-fidelity's Inception with random (He-initialised, so features are O(1)) weights, saved to ``path``."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})  # never download
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth")


def _image_files(folder, shift, n=3, size=(40, 48)):
    folder.mkdir()
    rng = np.random.default_rng(3)
    paths = []
    for k in range(n):
        pixels = rng.integers(0, 100, (*size, 3)) + shift
        paths.append(folder / f"{k}.png")
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(paths[-1])
    return paths


def test_fid_is_zero_on_identical_sets_and_grows_with_a_shift(inception_weights, tmp_path):
    base = _image_files(tmp_path / "base", 0)
    near, far = _image_files(tmp_path / "near", 40), _image_files(tmp_path / "far", 120)
    kw = dict(weights=inception_weights, device="cpu", batch_size=3, feature=64)
    same, d_near, d_far = fid(base, base, **kw), fid(near, base, **kw), fid(far, base, **kw)
    assert abs(same) < 1e-3 * d_near and 0 < d_near < d_far
    with pytest.raises(FidUnavailable, match="at least 2 images"):
        fid(base[:1], base, **kw)


def test_fid_refuses_a_weights_file_that_is_not_a_plain_state_dict(tmp_path):
    import pickle

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(Image.new("RGB", (1, 1))))  # an arbitrary object: weights_only refuses it
    with pytest.raises(FidUnavailable, match="not a plain Inception state dict"):
        fid([path, path], [path, path], weights=path, device="cpu")


def test_tiny_crop_clip_and_crop_pick_are_different_models():
    # Same weights would make a tiny run's two columns identical and hide a mix-up between them.
    clip = HfCropScorer("tiny", metric="crop_clip", device="cpu")
    pick = HfCropScorer("tiny", metric="crop_pick", device="cpu")
    again = HfCropScorer("tiny", metric="crop_clip", device="cpu")
    w = [s.model.text_projection.weight for s in (clip, pick, again)]
    assert not torch.equal(w[0], w[1]) and torch.equal(w[0], w[2])

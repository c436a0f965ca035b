"""The ground stage's groundingdino-py engine with a tiny offline build of groundingdino-py's model.

groundingdino-py needs transformers<5, so most of this runs only in its own environment
(``make test-gdino``, ``.venv-gdino``); in the main environment those tests skip and the install-hint
test runs.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from datagen.models import default_spec
from datagen.stages import OBJECT_FIELDS, StageError
from datagen.stages.ground import GroundConfig, GroundStage

TINY = default_spec("detector", "tiny")
MODULE = "datagen.stages.ground_gdino"


def _usable() -> bool:
    try:
        __import__(MODULE)
    except ImportError:
        return False
    return True


needs_gdino = pytest.mark.skipif(not _usable(), reason="needs groundingdino-py with transformers<5")


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _batch(images: list, tags: list, failed: tuple[int, ...] = ()) -> dict:
    n = len(images)
    return {
        "key": [f"k{i}" for i in range(n)],
        "image": images,
        "tags": tags,
        "status": ["failed" if i in failed else "ok" for i in range(n)],
        "error_stage": ["decode" if i in failed else None for i in range(n)],
        "error": ["DecodeError: truncated" if i in failed else None for i in range(n)],
    }


def _config(**changes) -> GroundConfig:
    changes = {"model": TINY, "min_box_side": 2.0, "max_objects": 4, **changes}
    return GroundConfig(engine="groundingdino-py", **changes)


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="GroundConfig.engine 'mmdet' is not one of"):
        GroundConfig(engine="mmdet")


def test_engine_without_groundingdino_or_with_transformers_5_names_the_install():
    hint = r"pip install richlayout\[groundingdino\]` with transformers==4"
    if _usable():  # here the import works: the check it runs first refuses transformers 5
        from datagen.stages.ground_gdino import require_groundingdino

        with pytest.raises(ImportError, match=f"found transformers 5.0.0; .*{hint}"):
            require_groundingdino("5.0.0")
    else:
        with pytest.raises(ImportError, match=hint):
            GroundStage(_config())


@pytest.fixture(scope="module")
def ground():
    return GroundStage(_config())


@needs_gdino
def test_tiny_model_is_groundingdino_py(ground):
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO

    assert isinstance(ground.model.model, GroundingDINO)
    assert ground.token_budget == 254  # groundingdino-py's fixed 256-token text length
    assert sum(p.numel() for p in ground.model.model.parameters()) < 5_000_000


@needs_gdino
def test_ground_adds_objects_inside_the_image(ground):
    images = [_image(96, 128, 6), _image(120, 64, 7), _image(64, 64, 8), _image(64, 64, 9)]
    tags = [["dog", "red car"], ["tree"], [], ["cup"]]
    out = ground(_batch(images, tags, failed=(3,)))
    assert out["objects"][2] == [] and out["objects"][3] is None
    assert out["status"] == ["ok", "ok", "ok", "failed"]
    found = 0
    for objs, image, row_tags in zip(out["objects"][:2], images, tags, strict=False):
        h, w = image.shape[:2]
        scores = [o["detector_score"] for o in objs]
        assert scores == sorted(scores, reverse=True) and len(objs) <= 4
        boxes = torch.tensor([o["box"] for o in objs]).reshape(-1, 4)
        iou = box_iou(boxes, boxes).fill_diagonal_(0)
        assert (iou <= 0.5).all()  # class-agnostic NMS
        for o in objs:
            found += 1
            assert tuple(o) == OBJECT_FIELDS and o["phrase"] in row_tags and o["detector_score"] > 0.25
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and min(x2 - x1, y2 - y1) >= 2.0
            assert (x2 - x1) * (y2 - y1) <= 0.95 * w * h
            assert o["mask"] is None and o["description"] is None
    assert found > 0  # the tiny detector does return boxes: the assertions above ran


@needs_gdino
def test_ground_batches_images_without_changing_results(ground):
    images = [_image(80, 80, 10), _image(80, 80, 11), _image(80, 80, 12)]
    tags = [["dog"], ["cup", "tree"], ["man"]]
    together = ground.detect(images, tags)
    for image, t, objs in zip(images, tags, together, strict=True):
        alone = ground.detect([image], [t])[0]
        assert [o["phrase"] for o in alone] == [o["phrase"] for o in objs]
        assert np.allclose([o["box"] for o in alone], [o["box"] for o in objs], atol=1e-3)


@needs_gdino
def test_image_size_sets_the_detector_input(monkeypatch):
    stage = GroundStage(_config(image_size=96))
    seen = []
    forward = stage.model.model.forward
    monkeypatch.setattr(stage.model.model, "forward", lambda s, **kw: seen.append(s) or forward(s, **kw))
    stage.detect([_image(100, 300, 33)], [["dog"]])
    # shortest edge 96, longest capped at 96 * 1333 / 800 = 159: the transformers engine's sizes
    assert tuple(seen[0].tensors.shape) == (1, 3, 53, 159) and not seen[0].mask.any()


@needs_gdino
def test_a_bad_row_becomes_an_error_row_and_a_bad_batch_stops(ground):
    out = ground(_batch([_image(64, 64, 14), np.zeros((10, 10)), _image(64, 64, 15)], [["dog"]] * 3))
    assert out["status"] == ["ok", "failed", "ok"]
    assert out["error_stage"][1] == "ground"
    assert out["error"][1] == "ValueError: image must be HxWx3 uint8, got shape (10, 10) dtype float64"
    assert out["objects"][1] is None and isinstance(out["objects"][0], list)
    with pytest.raises(StageError, match="stage 'ground' failed on all 2 ok rows"):
        ground(_batch([np.zeros((4, 4)), np.zeros((5, 5))], [["dog"]] * 2))


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


@needs_gdino
def test_hand_made_detections_go_through_the_shared_post_processing(ground):
    """Known logits and boxes: thresholds, tag decoding, NMS, size filters as the transformers engine."""
    # "dog . red car ." -> [CLS] dog . red car . [SEP]: token 1 is "dog", 3-4 "red car", 2 and 5 "."
    assert ground.tokenizer.tokenize("dog . red car .") == ["dog", ".", "red", "car", "."]
    logits = torch.full((1, 6, 256), -20.0)
    boxes = torch.tensor(  # cxcywh relative to a 100x100 image
        [
            [0.30, 0.30, 0.40, 0.40],  # q0 dog .9 -> kept
            [0.32, 0.32, 0.40, 0.40],  # q1 red car .8, IoU .82 with q0 -> class-agnostic NMS
            [0.80, 0.80, 0.30, 0.30],  # q2 red car .6 ("car" token) -> kept
            [0.50, 0.80, 0.20, 0.20],  # q3 dog .24: under the box threshold
            [0.50, 0.50, 0.99, 0.99],  # q4 dog .95: the whole image -> too large
            [0.10, 0.90, 0.20, 0.20],  # q5 ".": no tag's token scores -> nothing
        ]
    )[None]
    for q, token, p in [(0, 1, 0.9), (1, 3, 0.8), (2, 4, 0.6), (3, 1, 0.24), (4, 1, 0.95), (5, 2, 0.99)]:
        logits[0, q, token] = _logit(p)
    calls = []

    def fake(images, captions, size):
        calls.append(list(captions))
        return logits, boxes

    stage = copy.copy(ground)
    stage.model = fake
    image, tags = _image(100, 100, 1), [["dog", "red car"]]
    objs = stage.detect([image], tags)[0]
    assert calls == [["dog . red car ."]]
    assert [(o["phrase"], round(o["detector_score"], 4)) for o in objs] == [("dog", 0.9), ("red car", 0.6)]
    assert np.allclose([o["box"] for o in objs], [[10, 10, 50, 50], [65, 65, 95, 95]], atol=1e-4)
    # The transformers engine decodes the same model output into the same objects.
    hf = copy.copy(ground)
    hf.config = replace(ground.config, engine="transformers")
    hf._predict = lambda images, text, size: (logits, boxes)
    assert hf.detect([image], tags) == [objs]


@needs_gdino
def test_bfloat16_spec_runs_under_autocast():
    stage = GroundStage(_config(model=replace(TINY, dtype="bfloat16", device="cpu")))
    assert next(stage.model.model.parameters()).dtype == torch.float32
    objs = stage.detect([_image(64, 96, 3)], [["dog", "cup"]])[0]
    assert all(o["phrase"] in ("dog", "cup") and 0 <= o["box"][0] < o["box"][2] <= 96 for o in objs)


@needs_gdino
def test_checkpoint_round_trip_through_a_config_file(tmp_path):
    """The real loading path: a .json config (SwinT-OGC with a tiny text encoder and few layers), a
    checkpoint saved as groundingdino-py saves it, read back with weights_only=True."""
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    from datagen.models import ModelSpec
    from datagen.stages import ground_gdino as gd

    packaged = SLConfig.fromfile(
        str(gd.Path(gd.groundingdino.config.__file__).parent / gd.PACKAGED_CONFIGS[0])
    )
    cfg = {**packaged._cfg_dict.to_dict(), **gd.TINY_CONFIG, "text_encoder_type": str(tmp_path / "bert")}
    gd.write_tiny_bert(tmp_path / "bert", cfg["max_text_len"])
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    model = build_model(SLConfig(cfg))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # as saved from DDP
    torch.save({"model": state, "epoch": 11}, tmp_path / "ckpt.pth")
    spec = ModelSpec("detector", str(tmp_path / "cfg.json"), weights=str(tmp_path / "ckpt.pth"), device="cpu")
    loaded = gd.load_gdino(spec)
    assert loaded.size == (800, 1333)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k

    del state["module.feat_map.weight"]
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"1 weights missing, e.g. \['feat_map.weight'\]"):
        gd.load_gdino(replace(spec, weights=str(tmp_path / "partial.pth")))
    (tmp_path / "cfg.py").write_text("hidden_dim = 256\n")
    with pytest.raises(ValueError, match="Python config files are not executed"):
        gd.load_gdino(replace(spec, name=str(tmp_path / "cfg.py")))


@needs_gdino
def test_real_spec_names_the_swint_ogc_checkpoint():
    from datagen.stages.ground_gdino import PACKAGED_CONFIGS, SWINT_OGC

    assert SWINT_OGC.name == PACKAGED_CONFIGS[0] and SWINT_OGC.weights.endswith(
        "/groundingdino_swint_ogc.pth"
    )

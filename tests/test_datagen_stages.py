"""The model stages on plain dict batches with the tiny models: columns, shapes, batching, filters,
parsing, and the per-row error policy."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from datagen.models import load_model, preset
from datagen.stages import OBJECT_FIELDS, StageError, new_object, run_rows
from datagen.stages import describe as describe_mod
from datagen.stages import tag as tag_mod
from datagen.stages.caption import CaptionConfig, CaptionStage, clean_caption
from datagen.stages.describe import DescribeConfig, DescribeStage, object_crop, widen_to_aspect
from datagen.stages.filter import FilterConfig, FilterStage, count_tokens, fit_tokens
from datagen.stages.ground import (
    GroundConfig,
    GroundStage,
    clean_tags,
    prompt_text,
    select_boxes,
    token_membership,
)
from datagen.stages.score import ScoreConfig, ScoreStage
from datagen.stages.segment import SegmentConfig, SegmentStage, mask_agreement
from datagen.stages.tag import TAGGERS, TagConfig, TagStage, caption_phrases, parse_tag_list, register_tagger
from datagen.tiny_models import WORDS
from shards import SampleRecord, decode_mask, mask_to_box

TINY = preset("tiny")
# Floors off: the tiny models' scores are random.
PERMISSIVE = FilterConfig(min_clip_score=None, min_detector_score=None, min_mask_agreement=None)


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _batch(images: list, failed: tuple[int, ...] = (), **columns) -> dict:
    """A batch as decode hands it on; rows in ``failed`` already failed upstream."""
    n = len(images)
    batch = {
        "key": [f"k{i}" for i in range(n)],
        "source": [f"img{i}.jpg" for i in range(n)],
        "source_caption": [None] * n,
        "image": images,
        "width": [np.shape(im)[1] if np.ndim(im) == 3 else 0 for im in images],
        "height": [np.shape(im)[0] if np.ndim(im) == 3 else 0 for im in images],
        "status": ["failed" if i in failed else "ok" for i in range(n)],
        "error_stage": ["decode" if i in failed else None for i in range(n)],
        "error": ["DecodeError: truncated" if i in failed else None for i in range(n)],
    }
    batch.update(columns)
    return batch


def _objects(*specs) -> list[dict]:
    return [new_object(box, phrase, score) for box, phrase, score in specs]


def _count_calls(monkeypatch, obj, name: str) -> list:
    calls: list = []
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


# ---------------------------------------------------------------- the per-row error policy


def _double(batch):
    def fn(rows):
        out = []
        for i in rows:
            if batch["value"][i] == "bad":
                raise ValueError(f"bad value in row {i}")
            out.append(2 * batch["value"][i])
        return {"doubled": out}

    return fn


def test_run_rows_isolates_the_failing_row_and_passes_failed_rows_through():
    batch = _batch([None] * 4, failed=(3,), value=[1, "bad", 3, "bad"])
    out = run_rows(batch, "demo", _double(batch), ("doubled",))
    assert out["doubled"] == [2, None, 6, None]
    assert out["status"] == ["ok", "failed", "ok", "failed"]
    assert out["error_stage"] == [None, "demo", None, "decode"]
    assert out["error"] == [None, "ValueError: bad value in row 1", None, "DecodeError: truncated"]
    assert out["image"] is batch["image"] and batch["status"][1] == "ok"  # input not modified


def test_run_rows_raises_stage_error_when_every_ok_row_fails_alike():
    batch = _batch([None] * 3, failed=(2,), value=["bad", "bad", 1])
    with pytest.raises(
        StageError, match=r"stage 'demo' failed on all 2 ok rows .*ValueError: bad value in row 0"
    ):
        run_rows(batch, "demo", _double(batch), ("doubled",))


def test_run_rows_different_errors_are_row_errors_not_a_stage_error():
    batch = _batch([None] * 2, value=["bad", None])
    out = run_rows(batch, "demo", _double(batch), ("doubled",))  # TypeError for None * 2
    assert out["status"] == ["failed", "failed"]
    assert out["error"][0].startswith("ValueError") and out["error"][1].startswith("TypeError")


def test_run_rows_keeps_old_values_and_accepts_a_batch_without_status():
    out = run_rows(
        {"value": np.array([1, 2], dtype=object)}, "demo", lambda rows: {"value": [9] * len(rows)}, ("value",)
    )
    assert out["value"] == [9, 9] and "status" not in out
    batch = _batch([None] * 2, failed=(0,), value=[5, 6])
    assert run_rows(batch, "demo", lambda rows: {"value": [0] * len(rows)}, ("value",))["value"] == [5, 0]


# ---------------------------------------------------------------- tag


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("1. A dog\n2. red car\n3. The dogs\n- tree (partially visible)", ["dog", "red car", "tree"]),
        ("dog, cat and tree.", ["dog", "cat", "tree"]),
        ("Objects: a man, two horses; the beach.", ["man", "horses", "beach"]),
        ("* Coffee Mug\n* laptop computer\n* image\n* background", ["coffee mug", "laptop computer"]),
        ("image, 3 cups, cup", ["cups"]),
        ("I see a dog sitting on a red couch next to a lamp", []),  # a sentence, not a list
        ("", []),
        ("\ufffd\ufffd\x00 ... ,,, ;; 12", []),
    ],
)
def test_parse_tag_list(answer, expected):
    assert parse_tag_list(answer) == expected


def test_parse_tag_list_caps_the_number_of_tags():
    assert parse_tag_list(", ".join(WORDS[20:40]), max_tags=3) == list(WORDS[20:23])


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A man riding a horse on the beach.", ["man", "horse", "beach"]),
        (
            "stock photo of a young woman with a red umbrella walking in the rain",
            ["young woman", "red umbrella", "rain"],
        ),
        ("The building is tall and the sky is blue", ["building", "sky"]),
        ("Two dogs playing with a ball in the grass", ["dogs", "ball", "grass"]),
        (None, []),
        (float("nan"), []),  # a missing caption read from a table
        ("", []),
    ],
)
def test_caption_phrases(caption, expected):
    assert caption_phrases(caption) == expected


def test_tag_from_captions_needs_no_model():
    batch = _batch([_image(8, 8, 0)] * 3, failed=(2,), source_caption=["A cat on a sofa", None, "a dog"])
    out = TagStage(TagConfig(method="caption"))(batch)
    assert out["tags"] == [["cat", "sofa"], [], None]
    assert out["status"] == ["ok", "ok", "failed"]


@pytest.fixture(scope="module")
def vlm_tagger():
    return TagStage(TagConfig(model=TINY["vlm"], max_new_tokens=6))


def test_vlm_tags_are_the_parsed_answers_of_the_real_model(vlm_tagger, monkeypatch):
    # The tiny VLM really generates (random weights, so its answers are noise): the stage must turn
    # exactly those answers into tags, one list per row, with the caption as the fallback.
    answers: list[str] = []
    real_ask = tag_mod.ask

    def spy(model, processor, images, cfg):
        answers.extend(real_ask(model, processor, images, cfg))
        return answers[-len(images):]

    monkeypatch.setattr(tag_mod, "ask", spy)
    out = vlm_tagger(_batch([_image(48, 64, 1), _image(80, 40, 2)], source_caption=["a dog", None]))
    monkeypatch.undo()
    cfg = vlm_tagger.tagger.config
    assert len(answers) == 2 and out["status"] == ["ok", "ok"]
    assert out["tags"] == [tag_mod.tags_from_answer(a, c, cfg) for a, c in zip(answers, ["a dog", None], strict=True)]
    assert out["tags"][0], "a row with a caption never ends without tags"
    for tags in out["tags"]:
        assert len(tags) <= 20
        assert all(t == t.lower().strip() and "." not in t and 0 < len(t.split()) <= 4 for t in tags)


def test_vlm_tags_fall_back_to_the_caption_when_the_answer_is_unusable(vlm_tagger, monkeypatch):
    answers = ["", "1. A dog\n2. the dogs", "\ufffd\ufffd"]
    monkeypatch.setattr(tag_mod, "ask", lambda model, processor, images, cfg: answers[: len(images)])
    batch = _batch([_image(40, 40, i) for i in range(3)], source_caption=["A cat on a sofa", "a bird", None])
    assert vlm_tagger(batch)["tags"] == [["cat", "sofa"], ["dog"], []]


def test_tagger_registry():
    with pytest.raises(ValueError, match=r"unknown tag method 'ram'; registered: \['caption', 'vlm'\]"):
        TagStage(TagConfig(method="ram"))

    @register_tagger("fixed")
    def fixed(config):
        return lambda images, captions: [["thing one"] for _ in images]

    try:
        assert TagStage(TagConfig(method="fixed"))(_batch([_image(8, 8, 0)]))["tags"] == [["thing one"]]
    finally:
        del TAGGERS["fixed"]


# ---------------------------------------------------------------- caption


def test_caption_batches_ok_rows_into_one_generate_call(monkeypatch):
    stage = CaptionStage(CaptionConfig(model=TINY["vlm"], max_new_tokens=4, generate_batch_size=8))
    calls = _count_calls(monkeypatch, stage.model, "generate")
    batch = _batch([_image(40, 60, 3), _image(70, 50, 4), _image(30, 30, 5)], failed=(1,))
    out = stage(batch)
    assert len(calls) == 1
    assert out["caption"][1] is None and out["status"] == ["ok", "failed", "ok"]
    assert all(c is None or (isinstance(c, str) and c == " ".join(c.split())) for c in out["caption"])


def test_clean_caption():
    assert clean_caption("  A dog\n on\x00 a   mat. ") == "A dog on a mat."
    assert clean_caption(" \ufffd 12 ... ") is None


# ---------------------------------------------------------------- ground


def test_prompt_text_and_clean_tags():
    assert prompt_text(["red dog", "cup"]) == ("red dog . cup .", [(0, 7), (10, 13)])
    assert clean_tags(["Dog.", "dog", "  Red  car ", "", "a.b"]) == ["dog", "red car", "a b"]
    assert clean_tags(None) == []


def test_token_membership_maps_tokens_to_their_tag():
    _, processor = load_model(TINY["detector"])
    text, spans = prompt_text(["red dog", "cup"])
    enc = processor.tokenizer([text], return_offsets_mapping=True, return_tensors="pt")
    member = token_membership(enc["offset_mapping"][0], spans, 10)
    # [CLS] red dog . cup . [SEP]: "red" and "dog" belong to tag 0, "cup" to tag 1, the rest to none.
    assert member.T.tolist() == [[0, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]]


BOXES = torch.tensor(
    [
        [10, 10, 50, 50],  # 0 dog .9
        [12, 12, 52, 52],  # 1 cat .8: IoU .82 with 0 -> class-agnostic NMS
        [20, 20, 30, 30],  # 2 dog .7: inside 0, same phrase -> near-duplicate
        [60, 10, 90, 40],  # 3 ball .6
        [0, 0, 100, 100],  # 4 room .95: the whole image -> too large
        [70, 70, 74, 90],  # 5 pole .5: 4 px wide -> too small
        [40, 60, 70, 95],  # 6 cat .4
        [45, 45, 75, 58],  # 7 dog .3: only partly inside 0 -> kept
    ],
    dtype=torch.float32,
)
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95, 0.5, 0.4, 0.3])
PHRASES = ["dog", "cat", "dog", "ball", "room", "pole", "cat", "dog"]


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, [0, 3, 6, 7]),
        ({"dedupe_containment": None}, [0, 2, 3, 6, 7]),
        ({"max_objects": 2}, [0, 3]),
        ({"min_box_side": 1.0}, [0, 3, 5, 6, 7]),
        ({"max_box_area": 1.0}, [4, 0, 3, 6, 7]),  # the whole-image box is kept, first
        ({"nms_iou": 0.9}, [0, 1, 3, 6, 7]),
    ],
)
def test_select_boxes(changes, expected):
    cfg = GroundConfig(model=TINY["detector"], **changes)
    assert select_boxes(BOXES, SCORES, PHRASES, 100, 100, cfg) == expected


@pytest.fixture(scope="module")
def ground():
    return GroundStage(GroundConfig(model=TINY["detector"], min_box_side=2.0, max_objects=4))


def test_ground_adds_objects_inside_the_image(ground):
    images = [_image(96, 128, 6), _image(120, 64, 7), _image(64, 64, 8), _image(64, 64, 9)]
    tags = [["dog", "red car"], ["tree"], [], ["cup"]]
    out = ground(_batch(images, failed=(3,), tags=tags))
    assert out["objects"][2] == [] and out["objects"][3] is None
    assert out["status"] == ["ok", "ok", "ok", "failed"]
    found = 0
    for objs, image, row_tags in zip(out["objects"][:2], images, tags, strict=False):
        h, w = image.shape[:2]
        scores = [o["detector_score"] for o in objs]
        assert scores == sorted(scores, reverse=True) and len(objs) <= 4
        for o in objs:
            found += 1
            assert tuple(o) == OBJECT_FIELDS and o["phrase"] in row_tags and o["detector_score"] > 0.25
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and min(x2 - x1, y2 - y1) >= 2.0
            assert o["mask"] is None and o["description"] is None
    assert found > 0  # the tiny detector does return boxes: the assertions above ran


def test_ground_batches_images_without_changing_results(ground, monkeypatch):
    images = [_image(80, 80, 10), _image(80, 80, 11), _image(80, 80, 12)]
    tags = [["dog"], ["cup", "tree"], ["man"]]
    calls = _count_calls(monkeypatch, ground, "_forward")
    together = ground.detect(images, tags)
    assert len(calls) == 1
    for image, t, objs in zip(images, tags, together, strict=True):
        alone = ground.detect([image], [t])[0]
        assert [o["phrase"] for o in alone] == [o["phrase"] for o in objs]
        assert np.allclose([o["box"] for o in alone], [o["box"] for o in objs], atol=1e-3)


def test_ground_image_size_sets_the_detector_input(monkeypatch):
    stage = GroundStage(GroundConfig(model=TINY["detector"], image_size=96))
    calls = _count_calls(monkeypatch, stage.model, "forward")
    stage.detect([_image(100, 300, 33)], [["dog"]])
    # shortest edge 96, longest capped at 96 * 1333 / 800 = 159 (the real processor's ratio)
    assert calls and tuple(calls[0][1]["pixel_values"].shape) == (1, 3, 53, 159)


def test_ground_splits_tags_that_overflow_the_text_length(ground):
    tags = list(WORDS[:40])  # one token each, two with the " ." separator: 31 fit in 62 tokens
    assert [len(p) for p in ground.pack_prompts(tags)] == [31, 9]
    assert sum(ground.pack_prompts(tags), []) == tags
    objs = ground.detect([_image(64, 96, 13)], [tags])[0]
    assert all(o["phrase"] in tags for o in objs)


def test_a_bad_row_becomes_an_error_row_and_a_bad_batch_stops(ground):
    batch = _batch([_image(64, 64, 14), np.zeros((10, 10)), _image(64, 64, 15)], tags=[["dog"]] * 3)
    out = ground(batch)
    assert out["status"] == ["ok", "failed", "ok"]
    assert out["error_stage"][1] == "ground"
    assert out["error"][1] == "ValueError: image must be HxWx3 uint8, got shape (10, 10) dtype float64"
    assert out["objects"][1] is None and isinstance(out["objects"][0], list)
    with pytest.raises(StageError, match="stage 'ground' failed on all 2 ok rows"):
        ground(_batch([np.zeros((4, 4)), np.zeros((5, 5))], tags=[["dog"]] * 2))


# ---------------------------------------------------------------- segment


@pytest.fixture(scope="module")
def segment():
    return SegmentStage(SegmentConfig(model=TINY["segmenter"], encoder_batch_size=2))


def test_segment_fills_masks_at_image_size(segment, monkeypatch):
    images = [_image(60, 90, 16), _image(100, 50, 17), _image(40, 40, 18), _image(40, 40, 19)]
    objects = [
        _objects(([5, 5, 40, 30], "dog", 0.9), ([50, 10, 88, 58], "cup", 0.5)),
        _objects(([0, 0, 50, 100], "tree", 0.8)),
        [],
        _objects(([0, 0, 10, 10], "x", 0.3)),
    ]
    batch = _batch(images, failed=(3,), objects=objects)
    before = copy.deepcopy(objects)
    predicts = _count_calls(monkeypatch, segment.predictor, "predict_torch")
    encodes = []
    hook = segment.sam.image_encoder.register_forward_hook(lambda m, i, o: encodes.append(o.shape[0]))
    try:
        out = segment(batch)
    finally:
        hook.remove()
    assert encodes == [2]  # the two images with objects, encoded together
    assert len(predicts) == 2  # one prompt call per image, all of its boxes at once
    assert objects == before and out["objects"][3] is objects[3]  # inputs untouched, failed row passed
    assert out["objects"][2] == []
    for image, objs, old in zip(images[:2], out["objects"][:2], objects[:2], strict=True):
        for o, o_old in zip(objs, old, strict=True):
            mask = decode_mask(o["mask"])
            assert mask.shape == image.shape[:2] and mask.dtype == bool
            box = mask_to_box(mask)
            assert o["mask_box"] == (None if box is None else list(box))
            assert isinstance(o["mask_score"], float) and math.isfinite(o["mask_score"])
            assert {k: o[k] for k in ("box", "phrase", "detector_score")} == {
                k: o_old[k] for k in ("box", "phrase", "detector_score")
            }


def test_segment_batched_encoder_matches_one_image_at_a_time(segment):
    images = [_image(60, 90, 20), _image(100, 50, 21), _image(64, 64, 22)]
    together = segment.embed(images)
    for image, emb in zip(images, together, strict=True):
        assert torch.allclose(segment.embed([image])[0], emb, atol=1e-5)


def test_segment_in_bfloat16_keeps_prompts_in_float32():
    stage = SegmentStage(
        SegmentConfig(model=dataclasses.replace(TINY["segmenter"], dtype="bfloat16", device="cpu"))
    )
    assert all(p.dtype == torch.float32 for p in stage.sam.parameters())
    out = stage(_batch([_image(50, 70, 32)], objects=[_objects(([3, 4, 40, 45], "dog", 0.9))]))
    assert decode_mask(out["objects"][0][0]["mask"]).shape == (50, 70)


def test_mask_agreement():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 15, 15]]
    assert mask_agreement(boxes, [[0, 0, 10, 5], [0, 0, 10, 10], None, [10, 10, 20, 20]]) == pytest.approx(
        [0.5, 1.0, 0.0, 25 / 175]
    )
    assert mask_agreement([], []) == []


# ---------------------------------------------------------------- describe


@pytest.fixture(scope="module")
def describe():
    return DescribeStage(DescribeConfig(model=TINY["vlm"], max_new_tokens=3, crop_short_side=64))


def test_describe_all_crops_of_a_batch_in_one_generate(describe, monkeypatch):
    images = [_image(80, 80, 23), _image(64, 96, 24)]
    objects = [
        _objects(([0, 0, 40, 40], "dog", 0.9), ([50, 50, 60, 60], "cup", 0.5)),  # 40x40 and 10x10
        _objects(([10, 10, 90, 50], "car", 0.7), ([0, 0, 31, 33], "sign", 0.4)),  # 80x40 and 31x33 (1023 px)
    ]
    calls = _count_calls(monkeypatch, describe.model, "generate")
    out = describe(_batch(images, objects=objects))
    assert len(calls) == 1  # one generate call for the crops of both rows
    assert [o["description"] for o in out["objects"][0]][1] == "cup"  # under 32x32: the phrase
    assert out["objects"][1][1]["description"] == "sign"
    for o in (out["objects"][0][0], out["objects"][1][0]):
        assert isinstance(o["description"], str) and o["description"].strip()
    assert describe.processor.tokenizer.padding_side == "left"


def test_describe_keeps_the_phrase_when_the_answer_is_empty(describe, monkeypatch):
    monkeypatch.setattr(describe_mod, "ask", lambda model, processor, images, cfg: [" \ufffd "] * len(images))
    out = describe(_batch([_image(64, 64, 25)], objects=[_objects(([0, 0, 64, 64], "a red kite", 0.5))]))
    assert out["objects"][0][0]["description"] == "a red kite"


def test_crops_to_describe_and_clean_description_are_what_both_engines_share():
    cfg = DescribeConfig(model=TINY["vlm"], crop_short_side=32, max_crop_side=96)
    objects = _objects(([0, 0, 40, 40], "dog", 0.9), ([0, 0, 10, 10], "cup", 0.5), ([0, 0, 64, 16], "bar", 0.4))
    crops = describe_mod.crops_to_describe(_image(48, 64, 27), objects, cfg)
    assert [(j, c.shape) for j, c in crops] == [(0, (32, 32, 3)), (2, (24, 96, 3))]  # the cup is under 32x32
    assert [o["description"] for o in objects] == ["dog", "cup", "bar"]  # what small boxes and empty answers keep
    assert describe_mod.clean_description(" a dog\n on  grass ") == "a dog on grass"
    assert describe_mod.clean_description(" \ufffd 42 ") is None
    assert tag_mod.tags_from_answer("", "A cat on a sofa", TagConfig()) == ["cat", "sofa"]
    assert tag_mod.tags_from_answer("", "A cat on a sofa", TagConfig(caption_fallback=False)) == []


def test_object_crop_size_and_aspect():
    cfg = DescribeConfig(model=TINY["vlm"], crop_short_side=512, max_crop_side=1536)
    image = _image(100, 200, 26)
    assert object_crop(image, [10, 10, 50, 30], cfg).shape == (512, 1024, 3)
    assert object_crop(image, [0, 0, 200, 40], cfg).shape == (307, 1536, 3)  # long side capped
    assert widen_to_aspect([10, 0, 12, 100], 200, 100, 8.0) == (4.75, 0.0, 17.25, 100.0)
    assert widen_to_aspect([0, 0, 2, 100], 200, 100, 8.0) == (0.0, 0.0, 12.5, 100.0)
    assert widen_to_aspect([0, 40, 200, 45], 200, 100, 8.0) == (0.0, 30.0, 200.0, 55.0)
    assert widen_to_aspect([0, 0, 40, 40], 200, 100, 8.0) == (0.0, 0.0, 40.0, 40.0)


# ---------------------------------------------------------------- score


@pytest.fixture(scope="module")
def score():
    return ScoreStage(ScoreConfig(model=TINY["clip"], encode_batch_size=3))


def test_score_matches_one_pair_at_a_time(score):
    images = [_image(64, 80, 27), _image(50, 50, 28)]
    objects = [
        _objects(([0, 0, 40, 40], "dog", 0.9), ([10, 5, 70, 60], "cup", 0.5)),
        _objects(([5, 5, 45, 45], "tree", 0.8), ([0, 0, 20, 50], "sign", 0.4)),
    ]
    objects[0][0]["description"] = "a brown dog lying on the grass"
    out = score(_batch(images, failed=(1,), objects=objects))
    assert out["objects"][1] is objects[1]
    for o in out["objects"][0]:
        crop = Image.fromarray(
            images[0][int(o["box"][1]) : int(o["box"][3]), int(o["box"][0]) : int(o["box"][2])]
        )
        alone = score.scores([crop], [o["description"] or o["phrase"]])[0]
        assert o["clip_score"] == pytest.approx(alone, abs=1e-3) and -100 <= o["clip_score"] <= 100


def test_score_reads_77_clip_tokens(score):
    crop = [Image.fromarray(_image(40, 40, 29))]
    long = "a dog " * 60  # 120 tokens
    assert score.scores(crop, [long])[0] == pytest.approx(score.scores(crop, [long + "on a red mat"])[0])


# ---------------------------------------------------------------- filter


def _scored(box, score, clip, mask_box, description="a thing"):
    o = new_object(box, "thing", score)
    o.update(
        clip_score=clip, mask={"size": [100, 100], "counts": "x"}, mask_box=mask_box, description=description
    )
    return o


def test_filter_floors_and_cap():
    cfg = FilterConfig(min_clip_score=20.0, min_detector_score=0.3, min_mask_agreement=0.5, max_objects=2)
    objects = [
        _scored([0, 0, 10, 10], 0.9, 25.0, [0, 0, 10, 10]),  # kept
        _scored([0, 0, 10, 10], 0.8, 19.0, [0, 0, 10, 10]),  # clip
        _scored([0, 0, 10, 10], 0.2, 30.0, [0, 0, 10, 10]),  # detector
        _scored([0, 0, 10, 10], 0.7, 30.0, [0, 0, 10, 4]),  # agreement .4
        _scored([0, 0, 10, 10], 0.5, 22.0, [0, 0, 10, 6]),  # agreement .6: kept
        _scored([0, 0, 10, 10], 0.6, 21.0, None),  # empty mask
        _scored([0, 0, 10, 10], 0.95, 21.0, [1, 1, 10, 10]),  # kept, best score
    ]
    kept, reason = FilterStage(cfg).filter_objects(objects)
    assert reason is None
    assert [o["detector_score"] for o in kept] == [0.9, 0.95]  # the best two, in their original order


def test_filter_marks_rows_left_empty_and_passes_failed_rows():
    cfg = FilterConfig(min_clip_score=20.0, min_detector_score=None, min_mask_agreement=None)
    objects = [
        [_scored([0, 0, 10, 10], 0.9, 10.0, None), _scored([0, 0, 10, 10], 0.9, 5.0, None)],
        [],
        [_scored([0, 0, 10, 10], 0.9, 30.0, None)],
        None,
    ]
    out = FilterStage(cfg)(_batch([None] * 4, failed=(3,), objects=objects))
    assert out["status"] == ["filtered", "filtered", "ok", "failed"]
    assert out["error_stage"] == ["filter", "filter", None, "decode"]
    assert out["error"][:3] == [
        "no object passed the floors (2 with clip_score < 20.0)",
        "no objects detected",
        None,
    ]
    assert out["objects"][:3] == [[], [], objects[2]] and out["objects"][3] is None


def test_filter_with_floors_off_keeps_unscored_objects():
    objs = [new_object([0, 0, 5, 5], "a", 0.1)]
    assert FilterStage(PERMISSIVE).filter_objects(objs) == (objs, None)
    assert FilterStage(FilterConfig()).filter_objects([{**objs[0], "detector_score": None}])[1] is None


def test_fit_tokens_to_the_clip_budget():
    assert count_tokens("a photo of a dog") == 5
    text = "A dog sits on a mat. It is brown. The mat is red and the wall behind it is white."
    assert fit_tokens(text, 100) == text
    assert fit_tokens(text, 12) == "A dog sits on a mat. It is brown."
    assert fit_tokens(text, 4) == "A dog sits on"
    out = FilterStage(FilterConfig(max_description_tokens=7, min_clip_score=None)).filter_objects(
        [_scored([0, 0, 10, 10], 0.9, 0.0, [0, 0, 10, 10], description=text)]
    )
    assert out[0][0]["description"] == "A dog sits on a mat."


# ---------------------------------------------------------------- the chain


def test_stage_chain_produces_valid_shard_records(ground, segment, describe, score):
    images = [_image(96, 128, 30), _image(72, 72, 31)]
    batch = _batch(images, source_caption=["a dog and a cup on a table", "a man near a tree"])
    batch = TagStage(TagConfig(method="caption"))(batch)
    for stage in (ground, segment, describe, score, FilterStage(PERMISSIVE)):
        batch = stage(batch)
    assert batch["status"] == ["ok", "ok"] and sum(len(o) for o in batch["objects"]) > 0
    for i in range(2):
        record = SampleRecord(
            key=batch["key"][i],
            width=batch["width"][i],
            height=batch["height"][i],
            original_width=batch["width"][i],
            original_height=batch["height"][i],
            objects=tuple(batch["objects"][i]),
        ).validate()
        for o in record.objects:
            assert o.mask is not None and o.clip_score is not None and o.description

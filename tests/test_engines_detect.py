"""The ground stage's other phrase-grounding detectors, tiny and offline: MM GroundingDINO, OWLv2, Florence-2.

Each engine's output contract (boxes in stored-image pixels, phrases that are the row's tags, scores in
[0, 1] or none for Florence-2, one row per input whatever fails), batching against one image at a time,
OWLv2's boxes against transformers' own post-processing, Florence-2's answers parsed to exact pixels, the
hub loader on saved folders, and datagen runs through the CLI that ``shards validate`` accepts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_datagen_stages import _batch, _image  # the ground tests' images and batches

from datagen.models import ModelSpec, load_model
from datagen.real_size import free_models
from datagen.stages import OBJECT_FIELDS, StageError
from datagen.stages import ground_florence as florence_mod
from datagen.stages.filter import FilterConfig, FilterStage
from datagen.stages.ground import GroundConfig, GroundStage, other_detector
from datagen.stages.ground_florence import FlorenceDetector
from datagen.stages.ground_owl import OwlDetector
from shards import SampleRecord, validate_dataset
from shards.reader import iter_samples

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "configs" / "datagen" / "tiny.yaml")
ENGINES = ("tiny-mm-grounding-dino", "tiny-owlv2", "tiny-florence2")
# Random weights: MM GroundingDINO's focal-initialised bias keeps its scores near 0.1, so lower floors.
THRESHOLDS = {"tiny-mm-grounding-dino": {"box_threshold": 0.05, "text_threshold": 0.05},
              "tiny-owlv2": {"box_threshold": 0.1}, "tiny-florence2": {}}  # fmt: skip


def _spec(name: str) -> ModelSpec:
    return ModelSpec("detector", name, backend="tiny")


@pytest.fixture(scope="module")
def stages():
    return {name: GroundStage(GroundConfig(model=_spec(name), min_box_side=2.0, max_objects=4, **THRESHOLDS[name]))
            for name in ENGINES}  # fmt: skip


# ---------------------------------------------------------------- Florence-2's answers, fed

# Location bins (of 1000 per side) the fed Florence-2 answers with, per tag.
ANSWERS = {
    "dog": [(100, 200, 600, 900), (700, 100, 950, 400)],
    "red car": [(120, 220, 590, 880)],  # IoU 0.88 with dog's first box: NMS drops it (ranked after it)
    "tree": [(0, 0, 999, 999), (250, 100, 750, 600), (10, 10, 12, 500)],  # whole frame; fine; too narrow
    "cup": [(0, 0, 100, 100)],
}


def _fed_generate(processor, answers=ANSWERS):
    """A ``generate`` answering each (image, tag) pair with ``answers[tag]``'s boxes, as Florence-2 writes them."""
    tok = processor.tokenizer

    def generate(input_ids, attention_mask, mm_encoder_outputs, max_new_tokens):
        assert mm_encoder_outputs["image"].pooler_output.shape[0] == len(input_ids)
        rows = []
        for ids in input_ids:
            tag = tok.decode(ids, skip_special_tokens=True).split("caption: ")[1]
            locs = "".join(f"<loc_{b}>" for box in answers.get(tag, []) for b in box)
            rows.append([2, 0, *tok(tag + locs, add_special_tokens=False)["input_ids"], 2])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])

    return generate


def test_the_engine_follows_the_model_type(stages):
    assert stages["tiny-mm-grounding-dino"].other is None  # GroundingDINO's own path: prompts packed
    assert stages["tiny-mm-grounding-dino"].model.config.model_type == "mm-grounding-dino"
    assert stages["tiny-mm-grounding-dino"].token_budget == 62
    assert isinstance(stages["tiny-owlv2"].other, OwlDetector)
    assert isinstance(stages["tiny-florence2"].other, FlorenceDetector)
    bert, _ = load_model(_spec("tiny-grounding-dino"))

    class Other:
        config = type(bert.config)()
        config.model_type = "bert"

    with pytest.raises(
        ValueError, match=r"'bert' model; ground runs \['grounding-dino', 'mm-grounding-dino'"
    ):
        other_detector(Other(), None, GroundConfig(model=_spec("tiny-owlv2")))


@pytest.mark.parametrize("name", ENGINES)
def test_output_contract(stages, name, monkeypatch):
    stage = stages[name]
    if name == "tiny-florence2":  # a random Florence-2 rarely writes a well-formed box: feed it answers
        monkeypatch.setattr(stage.other.model, "generate", _fed_generate(stage.processor))
    images = [_image(96, 128, 1), _image(120, 64, 2), _image(64, 64, 3), _image(64, 64, 4), np.zeros((8, 8))]
    tags = [["dog", "red car"], ["tree"], [], ["cup"], ["cup"]]
    out = stage(_batch(images, failed=(3,), tags=tags))
    # One row per input: the upstream failure passes through, the bad image fails alone.
    assert out["status"] == ["ok", "ok", "ok", "failed", "failed"]
    assert out["error_stage"] == [None, None, None, "decode", "ground"]
    assert out["error"][4] == "ValueError: image must be HxWx3 uint8, got shape (8, 8) dtype float64"
    assert out["objects"][2] == [] and out["objects"][3] is None and out["objects"][4] is None
    found = 0
    for objs, image, row_tags in zip(out["objects"][:2], images, tags, strict=False):
        h, w = image.shape[:2]
        assert len(objs) <= 4
        for o in objs:
            found += 1
            assert tuple(o) == OBJECT_FIELDS and o["phrase"] in row_tags
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and min(x2 - x1, y2 - y1) >= 2.0
            if name == "tiny-florence2":
                assert o["detector_score"] is None
            else:
                assert THRESHOLDS[name]["box_threshold"] < o["detector_score"] <= 1
        scores = [o["detector_score"] for o in objs if o["detector_score"] is not None]
        assert scores == sorted(scores, reverse=True)
    assert found > 0  # boxes came back: the assertions above ran
    with pytest.raises(StageError, match="stage 'ground' failed on all 2 ok rows"):
        stage(_batch([np.zeros((4, 4)), np.zeros((5, 5))], tags=[["dog"]] * 2))


def test_florence_boxes_are_its_bins_in_stored_pixels_ranked_by_place(stages, monkeypatch):
    stage = stages["tiny-florence2"]
    monkeypatch.setattr(stage.other.model, "generate", _fed_generate(stage.processor))
    images = [_image(96, 128, 1), _image(120, 64, 2)]
    out = stage.detect(images, [["dog", "red car"], ["tree"]])
    # Bin b of a side s is pixel int((b + 0.5) * s / 1000): the processor's dequantisation.
    assert [(o["phrase"], o["box"]) for o in out[0]] == [("dog", [12, 19, 76, 86]), ("dog", [89, 9, 121, 38])]
    assert [(o["phrase"], o["box"]) for o in out[1]] == [
        ("tree", [16, 12, 48, 72])
    ]  # whole-frame, narrow dropped
    assert all(o["detector_score"] is None for objs in out for o in objs)
    # Without scores, the cap keeps every tag's first box before any tag's second.
    capped = FlorenceDetector(
        stage.model, stage.processor, GroundConfig(model=_spec("tiny-florence2"), max_objects=2)
    )
    answers = {
        "dog": [(0, 0, 200, 200), (300, 300, 500, 500), (600, 600, 800, 800)],
        "cup": [(800, 0, 999, 200)],
    }
    monkeypatch.setattr(stage.other.model, "generate", _fed_generate(stage.processor, answers))
    objs = capped.detect([_image(100, 100, 5)], [["dog", "cup"]])[0]
    assert [(o["phrase"], o["box"]) for o in objs] == [("dog", [0, 0, 20, 20]), ("cup", [80, 0, 99, 20])]


def test_objects_without_scores_pass_the_filter_and_store_nan(stages, monkeypatch):
    stage = stages["tiny-florence2"]
    monkeypatch.setattr(stage.other.model, "generate", _fed_generate(stage.processor))
    batch = stage(_batch([_image(96, 128, 1)], tags=[["dog"]]))
    batch = FilterStage(FilterConfig(min_clip_score=None, min_mask_agreement=None, min_detector_score=0.3))(
        batch
    )
    objs = batch["objects"][0]
    assert batch["status"] == ["ok"] and len(objs) == 2  # min_detector_score does not apply to them
    record = SampleRecord(key="k0", width=128, height=96, original_width=128, original_height=96,
                          objects=tuple(objs)).validate()  # fmt: skip
    on_disk = record.to_dict()["objects"]
    assert all(math.isnan(o["detector_score"]) for o in on_disk)  # schema 2: unknown numbers are NaN
    back = SampleRecord.from_json_bytes(record.to_json_bytes())
    assert [o.detector_score for o in back.objects] == [None, None] and back.objects[0].box == (
        12,
        19,
        76,
        86,
    )


def test_florence_generates_with_the_real_tiny_model_batched_as_alone(stages, monkeypatch):
    monkeypatch.setattr(florence_mod, "MAX_NEW_TOKENS", 8)  # random answers never stop early
    det = stages["tiny-florence2"].other
    images = [_image(96, 128, 6), _image(64, 80, 7)]
    features = det._encode(images)
    assert [tuple(f.shape) for f in features] == [(5, 32)] * 2  # 2x2 patches + 1 pooled token
    assert torch.allclose(features[1], det._encode(images[1:])[0], atol=1e-5)
    together = det._generate([features[0], features[0], features[1]], ["dog", "red car", "tree"])
    alone = [det._generate([f], [t])[0] for f, t in zip([features[0], features[0], features[1]], ["dog", "red car", "tree"],
                                                         strict=True)]  # fmt: skip
    assert [a.replace("<pad>", "") for a in together] == [a.replace("<pad>", "") for a in alone]
    assert all(a.startswith("</s>") for a in together)
    out = det.detect(images, [["dog", "red car"], ["tree"]])
    assert len(out) == 2 and all(o["phrase"] in ("dog", "red car", "tree") for objs in out for o in objs)


@pytest.mark.parametrize("name", ["tiny-mm-grounding-dino", "tiny-owlv2"])
def test_batched_images_give_what_each_image_gives_alone(stages, name, monkeypatch):
    stage = stages[name]
    # GroundingDINO-like models pad a batch to its largest image (which changes the backbone's view of
    # the smaller ones): same sizes there. OWLv2 pads each image to its own square: any sizes.
    mm = name == "tiny-mm-grounding-dino"
    images = [
        _image(80, 80, 10),
        _image(80, 80, 11) if mm else _image(60, 100, 11),
        _image(80, 80 if mm else 50, 12),
    ]
    tags = [["dog"], ["cup", "tree", "red car"], ["man"]]
    target = stage if mm else stage.other
    calls = []
    original = target._forward
    monkeypatch.setattr(target, "_forward", lambda *a: calls.append(a) or original(*a))
    together = stage.detect(images, tags)
    assert len(calls) == 1 and sum(len(o) for o in together) > 0
    for image, t, objs in zip(images, tags, together, strict=True):
        alone = stage.detect([image], [t])[0]
        assert [o["phrase"] for o in alone] == [o["phrase"] for o in objs]
        assert np.allclose([o["box"] for o in alone], [o["box"] for o in objs], atol=1e-3)
        assert np.allclose(
            [o["detector_score"] for o in alone], [o["detector_score"] for o in objs], atol=1e-5
        )


def test_owlv2_boxes_match_transformers_post_processing(stages):
    stage = stages["tiny-owlv2"]
    det, processor = stage.other, stage.processor
    # As many tags per image: transformers' blank padding queries are not masked and can win its labels
    # (ours never reads their scores).
    images, tags = [_image(96, 128, 20), _image(120, 64, 21)], [["dog", "red car"], ["tree", "cup"]]
    mine = det._forward(images, tags)
    inputs = processor(text=tags, images=images, return_tensors="pt")
    with torch.inference_mode():
        outputs = stage.model(**inputs)
    # transformers' target size (h, w) scales by the longer side, as ours.
    ref = processor.post_process_grounded_object_detection(
        outputs, threshold=0.1, target_sizes=[im.shape[:2] for im in images], text_labels=tags
    )
    assert sum(len(m) for m in mine) > 0
    for dets, r in zip(mine, ref, strict=True):
        assert [d[2] for d in dets] == r["text_labels"]
        assert torch.allclose(torch.stack([d[0] for d in dets]), r["boxes"], atol=1e-3)
        assert np.allclose([d[1] for d in dets], r["scores"].numpy(), atol=1e-6)


def test_owlv2_without_padding_scales_by_width_and_height_and_florence_refuses_a_crop(stages):
    import copy

    from torchvision.ops import box_convert

    stage = stages["tiny-owlv2"]
    processor = copy.deepcopy(stage.processor)
    processor.image_processor.do_pad = False  # the image stretched to the square instead
    det = OwlDetector(stage.model, processor, stage.config)
    image = _image(48, 128, 23)
    dets = det._forward([image], [["dog"]])[0]
    with torch.inference_mode():
        out = stage.model(**processor(text=[["dog"]], images=[image], return_tensors="pt"))
    rel = box_convert(out.pred_boxes[0], "cxcywh", "xyxy")
    keep = (out.logits[0, :, 0].sigmoid() > stage.config.box_threshold).nonzero().flatten()
    assert len(dets) == len(keep) > 0
    assert torch.allclose(
        torch.stack([d[0] for d in dets]), rel[keep] * torch.tensor([128, 48, 128, 48]), atol=1e-3
    )
    florence = stages["tiny-florence2"]
    cropping = copy.deepcopy(florence.processor)
    cropping.image_processor.do_center_crop = True
    with pytest.raises(ValueError, match="crops the image"):
        FlorenceDetector(florence.model, cropping, florence.config)


def test_owlv2_image_size_sets_the_square_side(monkeypatch):
    stage = GroundStage(GroundConfig(model=_spec("tiny-owlv2"), image_size=96))
    seen = []
    original = stage.model.forward
    monkeypatch.setattr(stage.model, "forward", lambda **kw: seen.append(kw) or original(**kw))
    stage.detect([_image(50, 150, 22)], [["dog"]])
    assert (
        tuple(seen[0]["pixel_values"].shape) == (1, 3, 96, 96) and seen[0]["interpolate_pos_encoding"] is True
    )


@pytest.mark.parametrize("name", ["tiny-owlv2", "tiny-florence2", "tiny-mm-grounding-dino"])
def test_the_hub_loader_reads_a_saved_folder(stages, name, tmp_path, monkeypatch):
    model, processor = load_model(_spec(name))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    hf = GroundStage(GroundConfig(model=ModelSpec("detector", str(tmp_path)), min_box_side=2.0, max_objects=4,
                                  **THRESHOLDS[name]))  # fmt: skip
    assert type(hf.model) is type(model) and type(hf.processor) is type(processor)
    tiny = stages[name]
    if name == "tiny-florence2":
        for stage in (hf, tiny):
            monkeypatch.setattr(stage.other.model, "generate", _fed_generate(stage.processor))
    images, tags = [_image(96, 128, 30)], [["dog", "red car"]]
    assert hf.detect(images, tags) == tiny.detect(images, tags)


# ---------------------------------------------------------------- datagen runs through the CLI


def _datagen_run(tmp_path: Path, name: str, *extra: str) -> Path:
    from datagen.synthetic import make_image_folder

    make_image_folder(tmp_path / "in", 6)
    out = tmp_path / "out"
    sets = {"stages.ground.model.kind": "detector", "stages.ground.model.name": name,
            "stages.ground.model.backend": "tiny", "execution.num_cpus": 2}  # fmt: skip
    sets.update({f"stages.ground.{k}": v for k, v in THRESHOLDS[name].items()})
    cmd = [
        sys.executable,
        "-m",
        "datagen",
        "run",
        "--config",
        TINY_CONFIG,
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--no-progress",
        *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONHASHSEED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert validate_dataset(str(out)) == []
    return out


def _objects(out: Path) -> list:
    return [o for sample in iter_samples(str(out)) for o in sample.record.objects]


# Slow: each starts a local Ray (about a minute on 2 cores); the stage contracts above run in the default suite.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-owlv2", "tiny-mm-grounding-dino", "tiny-florence2"])
def test_a_tiny_datagen_run_on_each_detector(tmp_path, name):
    objects = _objects(_datagen_run(tmp_path, name, "--set", "stages.ground.forward_batch_size=8"))
    if name == "tiny-owlv2":
        assert objects and all(0.1 < o.detector_score <= 1 for o in objects)
    elif name == "tiny-mm-grounding-dino":
        assert objects and all(0.05 < o.detector_score <= 1 for o in objects)
    else:  # a random Florence-2 writes no well-formed box: the run is valid, its images left without objects
        assert all(o.detector_score is None for o in objects)


# ---------------------------------------------------------------- real sizes, random weights


@pytest.mark.real_size
@pytest.mark.timeout(3600)  # 200 CPU seconds of detection plus the builds; 11 min wall on a shared machine
def test_detectors_at_real_size_on_the_two_photos(tmp_path, monkeypatch, capsys):
    """GroundingDINO-T (the real preset's), MM GroundingDINO-T, OWLv2 B/16 and Florence-2-large built at their
    real configurations, each run as the real preset's ground stage on the same two photos and the caption's
    phrases; seconds per image on this CPU. Florence-2 decodes 12 tokens a tag (a phrase and two boxes):
    random weights never stop early."""
    import time

    from datagen.config import load_config
    from datagen.real_detectors import real_detectors
    from datagen.real_size import FACTORIES, make_photos, register, run_stages
    from datagen.stages.tag import TagConfig, caption_phrases

    monkeypatch.setattr(florence_mod, "MAX_NEW_TOKENS", 12)
    cfg = load_config(ROOT / "configs" / "datagen" / "real.yaml")
    photos = make_photos(tmp_path / "photos")
    batch, _ = run_stages(photos, {"decode": cfg.decode})
    images = [np.asarray(im) for im in batch["image"]]
    tags = [caption_phrases(c, TagConfig().max_tags, TagConfig().max_words) for c in photos["caption"]]
    assert tags[0] and tags[0] == tags[1]
    builds = {"real-size-grounding-dino-tiny": FACTORIES["real-size-grounding-dino-tiny"], **real_detectors()}
    params = {"real-size-grounding-dino-tiny": (1.6e8, 1.9e8), "real-size-mm-grounding-dino-tiny": (1.6e8, 1.9e8),
              "real-size-owlv2-base-patch16": (1.4e8, 1.7e8), "real-size-florence2-large": (7.5e8, 8.0e8)}  # fmt: skip
    seconds = {}
    for name, build in builds.items():
        spec = register("cpu", factories={name: build})["detector"]
        stage = GroundStage(dataclasses.replace(cfg.stages["ground"], model=spec, max_objects=4))
        assert params[name][0] < sum(p.numel() for p in stage.model.parameters()) < params[name][1], name
        t0, c0 = time.perf_counter(), time.process_time()
        found = stage.detect(images, tags)
        # wall and CPU seconds: CPU time (all threads) moves less with what else the machine runs
        seconds[name] = ((time.perf_counter() - t0) / len(images), (time.process_time() - c0) / len(images))
        for objs, image, row_tags in zip(found, images, tags, strict=True):
            h, w = image.shape[:2]
            for o in objs:
                x1, y1, x2, y2 = o["box"]
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and o["phrase"] in row_tags
                assert o["detector_score"] is None if "florence" in name else 0 <= o["detector_score"] <= 1
        del stage
        free_models()
    base, base_cpu = seconds["real-size-grounding-dino-tiny"]
    with capsys.disabled():
        print(f"\nground stage at real size on CPU, {len(tags[0])} tags ({', '.join(tags[0])})")
        print(f"  {'model':34s} {'s/image':>8s} {'x GDINO-T':>9s} {'CPU s/image':>11s} {'x GDINO-T':>9s}")
        for name, (wall, cpu) in seconds.items():
            print(f"  {name:34s} {wall:8.2f} {wall / base:9.2f} {cpu:11.2f} {cpu / base_cpu:9.2f}")
        figures = {f"{n}_s_per_image": round(wall, 3) for n, (wall, _) in seconds.items()}
        figures.update({f"{n}_cpu_s_per_image": round(cpu, 3) for n, (_, cpu) in seconds.items()})
        print(json.dumps({"benchmark": "real_size_detectors_cpu", "figures": figures}))

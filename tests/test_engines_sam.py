"""SAM 3 (ground and segment in one) and SAM 2.1 (box-prompted segmenter) as datagen engines, on their tiny
offline builds: each engine's output contract, its batching equivalences, one row per input whatever fails,
the segment stage passing pre-masked objects on and counting them, loading from a saved folder, the presets."""

from __future__ import annotations

import copy
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
from test_datagen_stages import _batch, _count_calls, _image, _objects  # the stage tests' batches and spies

from datagen.chunks import run_stage_on_chunk
from datagen.config import load_config
from datagen.models import ModelSpec, load_model, preset
from datagen.stages import StageError, new_object
from datagen.stages.filter import FilterConfig, FilterStage
from datagen.stages.ground import GroundConfig, GroundStage
from datagen.stages.ground_sam3 import Sam3Grounder
from datagen.stages.segment import SegmentConfig, SegmentStage
from datagen.stages.segment_sam2 import Sam2Segmenter
from datagen.stages.tag import TagConfig, TagStage
from shards import SampleRecord, decode_mask, encode_mask, mask_to_box, validate_dataset

ROOT = Path(__file__).resolve().parents[1]
SPECS = preset("tiny_sam3")


def _check_masks(obj: dict, h: int, w: int) -> np.ndarray:
    """The object's mask fields are a COCO RLE at the stored image's size, its tight box and a finite score."""
    mask = decode_mask(obj["mask"])
    assert mask.shape == (h, w) and mask.dtype == bool and isinstance(obj["mask"]["counts"], str)
    tight = mask_to_box(mask)
    assert obj["mask_box"] == (None if tight is None else list(tight))
    assert isinstance(obj["mask_score"], float) and math.isfinite(obj["mask_score"])
    return mask


# ---------------------------------------------------------------- SAM 3: ground and segment


@pytest.fixture(scope="module")
def ground():
    return GroundStage(GroundConfig(model=SPECS["detector"], min_box_side=2.0, max_objects=3, forward_batch_size=2))


def test_sam3_is_chosen_by_the_model_and_its_objects_are_boxed_masked_and_scored(ground):
    assert isinstance(ground.other, Sam3Grounder) and type(ground.model).__name__ == "Sam3Model"
    images = [_image(60, 90, 1), _image(100, 50, 2), _image(40, 40, 3), _image(40, 40, 4)]
    tags = [["dog", "red car", "tree"], ["cup"], [], ["dog"]]
    out = ground(_batch(images, failed=(3,), tags=tags))
    assert out["status"] == ["ok", "ok", "ok", "failed"] and out["objects"][2] == [] and out["objects"][3] is None
    found = 0
    for objs, image, row_tags in zip(out["objects"][:2], images, tags, strict=False):
        h, w = image.shape[:2]
        scores = [o["detector_score"] for o in objs]
        assert scores == sorted(scores, reverse=True) and len(objs) <= 3
        for o in objs:
            found += 1
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and min(x2 - x1, y2 - y1) >= 2.0  # stored-image pixels
            assert o["phrase"] in row_tags and 0.25 < o["detector_score"] <= 1.0
            assert o["mask_score"] == o["detector_score"]  # SAM 3 scores the instance once
            _check_masks(o, h, w)
            assert o["description"] is None and o["clip_score"] is None
    assert found >= 2  # the tiny model does find objects: the assertions above ran


def test_sam3_one_vision_pass_per_image_and_phrases_batched_per_row(ground, monkeypatch):
    image, phrases = _image(64, 80, 5), ["dog", "cup", "tree", "man", "cat"]
    vision = _count_calls(monkeypatch, ground.model, "get_vision_features")
    forwards = _count_calls(monkeypatch, ground.model, "forward")
    batched = ground.detect([image], [phrases])[0]
    assert len(vision) == 1  # one vision pass for the five phrases
    rows = [kw["input_ids"].shape[0] for _, kw in forwards]
    assert rows == [2, 2, 1]  # forward_batch_size phrases per row batch, each sharing the embeddings
    assert all("vision_embeds" in kw and kw.get("pixel_values") is None for _, kw in forwards)
    # One phrase per forward gives the same objects: the rows of a batch do not see each other.
    one = GroundStage(dataclasses.replace(ground.config, forward_batch_size=1)).detect([image], [phrases])[0]
    assert [o["phrase"] for o in one] == [o["phrase"] for o in batched]
    assert np.allclose([o["box"] for o in one], [o["box"] for o in batched], atol=1e-4)
    assert [o["mask"] for o in one] == [o["mask"] for o in batched]


def test_sam3_shared_embeddings_give_what_a_plain_forward_gives(ground):
    # The engine expands one image's embeddings over its phrase rows; the model's own forward on pixels
    # and one phrase must give the same boxes and scores for that phrase.
    image, phrases = _image(56, 72, 6), ["dog", "red car"]
    sam3 = ground.other
    with torch.inference_mode():
        shared = sam3._decode(sam3._vision(image), phrases)
        pixels = ground.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        for row, phrase in enumerate(phrases):
            text = ground.processor.tokenizer([phrase], padding="max_length", max_length=32, return_tensors="pt")
            plain = ground.model(pixel_values=pixels, **text)
            assert torch.allclose(plain.pred_boxes[0], shared.pred_boxes[row], atol=1e-5)
            assert torch.allclose(plain.pred_logits[0], shared.pred_logits[row], atol=1e-5)
            assert torch.allclose(plain.pred_masks[0], shared.pred_masks[row], atol=1e-4)


def test_sam3_box_filters_and_threshold_apply(ground):
    image, phrases = _image(64, 64, 7), ["dog", "cup", "tree"]
    capped = GroundStage(dataclasses.replace(ground.config, max_objects=1)).detect([image], [phrases])[0]
    assert len(capped) == 1
    assert GroundStage(dataclasses.replace(ground.config, box_threshold=0.99)).detect([image], [phrases]) == [[]]
    # Whole-frame boxes are dropped by max_box_area, as for GroundingDINO.
    tight = GroundStage(dataclasses.replace(ground.config, max_box_area=0.01)).detect([image], [phrases])[0]
    assert all((o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]) <= 0.01 * 64 * 64 for o in tight)


def test_sam3_one_row_per_input_whatever_fails(ground, monkeypatch):
    images = [_image(48, 48, 8), np.zeros((10, 10)), _image(48, 64, 9), _image(50, 50, 10)]
    original = ground.other.detect_one

    def flaky(image, phrases):
        if image.shape == (50, 50, 3):
            raise RuntimeError("engine broke on this image")
        return original(image, phrases)

    monkeypatch.setattr(ground.other, "detect_one", flaky)
    out = ground(_batch(images, tags=[["dog"]] * 4))
    assert out["status"] == ["ok", "failed", "ok", "failed"] and len(out["objects"]) == 4
    assert out["error"][1].startswith("ValueError: image must be HxWx3 uint8")
    assert out["error"][3] == "RuntimeError: engine broke on this image" and out["error_stage"][3] == "ground"
    assert isinstance(out["objects"][0], list) and out["objects"][3] is None
    with pytest.raises(StageError, match="stage 'ground' failed on all 2 ok rows"):
        ground(_batch([_image(50, 50, 11), _image(50, 50, 12)], tags=[["dog"]] * 2))


# ---------------------------------------------------------------- SAM 2.1: box-prompted segmenter


@pytest.fixture(scope="module")
def segment():
    return SegmentStage(SegmentConfig(model=SPECS["segmenter"], encoder_batch_size=2, max_boxes_per_call=2))


def test_sam2_is_chosen_by_the_model_and_fills_masks_at_image_size(segment, monkeypatch):
    assert isinstance(segment.sam2, Sam2Segmenter) and type(segment.sam2.model).__name__ == "Sam2Model"
    images = [_image(60, 90, 13), _image(100, 50, 14), _image(40, 40, 15), _image(40, 40, 16)]
    objects = [
        _objects(([5, 5, 40, 30], "dog", 0.9), ([50, 10, 88, 58], "cup", 0.5), ([0, 0, 90, 60], "sky", 0.4)),
        _objects(([0, 0, 50, 100], "tree", 0.8)),
        [],
        _objects(([0, 0, 10, 10], "x", 0.3)),
    ]
    before = copy.deepcopy(objects)
    encodes = _count_calls(monkeypatch, segment.sam2.model, "get_image_embeddings")
    decodes = _count_calls(monkeypatch, segment.sam2.model, "forward")
    out = segment(_batch(images, failed=(3,), objects=objects))
    assert [kw.get("pixel_values", a[0] if a else None).shape[0] for a, kw in encodes] == [2]  # both images at once
    assert [kw["input_boxes"].shape[1] for _, kw in decodes] == [2, 1, 1]  # max_boxes_per_call=2 per image
    assert objects == before and out["objects"][3] is objects[3] and out["objects"][2] == []
    for image, objs, old in zip(images[:2], out["objects"][:2], objects[:2], strict=True):
        for o, o_old in zip(objs, old, strict=True):
            _check_masks(o, *image.shape[:2])
            assert {k: o[k] for k in ("box", "phrase", "detector_score")} == {
                k: o_old[k] for k in ("box", "phrase", "detector_score")
            }
    assert segment.counts["segmented"] >= 4


def test_sam2_batching_does_not_change_masks(segment):
    images = [_image(60, 90, 17), _image(64, 64, 18)]
    objects = [_objects(([5, 5, 40, 30], "a", 0.9), ([10, 20, 80, 50], "b", 0.5), ([1, 1, 8, 8], "c", 0.3)),
               _objects(([3, 4, 60, 45], "d", 0.9))]
    together = segment.segment_images(images, objects)
    alone = SegmentStage(SegmentConfig(model=SPECS["segmenter"], encoder_batch_size=1, max_boxes_per_call=64))
    for image, objs, got in zip(images, objects, together, strict=True):
        ref = alone.segment_images([image], [objs])[0]
        assert [o["mask"] for o in ref] == [o["mask"] for o in got]
        assert np.allclose([o["mask_score"] for o in ref], [o["mask_score"] for o in got], atol=1e-5)


def test_sam2_mask_follows_the_box_prompt_in_the_model_frame(segment, monkeypatch):
    # The box goes to the model scaled to its square input (128 px for the tiny build), x by width, y by height.
    seen = _count_calls(monkeypatch, segment.sam2.model, "forward")
    segment.segment_images([_image(64, 32, 19)], [_objects(([8, 16, 24, 48], "a", 0.9))])
    assert torch.allclose(seen[0][1]["input_boxes"], torch.tensor([[[32.0, 32.0, 96.0, 96.0]]]))


def test_sam2_one_row_per_input_whatever_fails(segment, monkeypatch):
    original = segment.sam2.masks

    def flaky(image, embeddings, objects):
        if image.shape[:2] == (50, 50):
            raise RuntimeError("decoder broke")
        return original(image, embeddings, objects)

    monkeypatch.setattr(segment.sam2, "masks", flaky)
    images = [_image(48, 48, 20), _image(50, 50, 21), np.zeros((10, 10))]
    objs = _objects(([2, 2, 30, 30], "dog", 0.9))
    out = segment(_batch(images, objects=[copy.deepcopy(objs) for _ in images]))
    assert out["status"] == ["ok", "failed", "failed"] and len(out["objects"]) == 3
    assert out["error"][1] == "RuntimeError: decoder broke" and out["error_stage"][1] == "segment"
    assert out["objects"][0][0]["mask"] is not None


def test_hub_id_segmenter_needs_no_weights_and_a_sam_registry_key_does():
    assert ModelSpec("segmenter", "facebook/sam2.1-hiera-large").weights is None
    with pytest.raises(ValueError, match="needs weights"):
        ModelSpec("segmenter", "vit_h")


# ---------------------------------------------------------------- the segment stage after SAM 3


def _premasked(h: int, w: int) -> dict:
    mask = np.zeros((h, w), bool)
    mask[2:9, 3:12] = True
    obj = new_object([3, 2, 12, 9], "dog", 0.7)
    return {**obj, "mask": encode_mask(mask), "mask_score": 0.7, "mask_box": [3.0, 2.0, 12.0, 9.0]}


def test_segment_passes_premasked_objects_on_and_counts_them(segment, monkeypatch):
    images = [_image(40, 50, 22), _image(40, 40, 23)]
    masked = _premasked(40, 50)
    objects = [[masked, *_objects(([10, 10, 40, 30], "cup", 0.5))], [_premasked(40, 40)]]
    segment.counts.clear()
    encodes = _count_calls(monkeypatch, segment.sam2.model, "get_image_embeddings")
    out = segment(_batch(images, objects=objects))
    assert out["objects"][0][0] == masked and out["objects"][1][0] == objects[1][0]  # passed on as they are
    _check_masks(out["objects"][0][1], 40, 50)  # the unmasked one got its mask
    assert len(encodes) == 1 and encodes[0][0][0].shape[0] == 1  # only the image with work is encoded
    assert dict(segment.counts) == {"premasked": 2, "segmented": 1}
    # All masked: the model is not touched at all.
    segment(_batch(images[1:], objects=objects[1:]))
    assert len(encodes) == 1 and dict(segment.counts) == {"premasked": 3, "segmented": 1}


def test_segment_without_a_model_takes_masked_objects_and_fails_rows_it_cannot_mask(monkeypatch):
    stage = SegmentStage(SegmentConfig(model=None))
    assert stage.sam2 is None and not hasattr(stage, "sam")
    images = [_image(40, 50, 24), _image(40, 50, 25)]
    objects = [[_premasked(40, 50)], _objects(([1, 1, 20, 20], "cup", 0.5))]
    out = stage(_batch(images, objects=objects))
    assert out["status"] == ["ok", "failed"] and out["objects"][0] == objects[0]
    assert "has no mask and stages.segment.model is null" in out["error"][1]
    assert dict(stage.counts) == {"premasked": 1, "segmented": 0}  # the failed row is not counted


def test_stage_counts_reach_the_chunk_and_the_run_record():
    from datagen.chunks import chunk_summary, pack_chunk
    from datagen.stages.write import WriteConfig

    stage = SegmentStage(SegmentConfig(model=None))
    stage.counts.update(premasked=5)  # an earlier chunk of this actor: not this chunk's
    image = _image(40, 50, 26)
    chunk = {"shard": 0, "start": 0, "columns": {
        **_batch([image, image], objects=[[_premasked(40, 50)], [_premasked(40, 50), _premasked(40, 50)]]),
        "source": ["a.jpg", "b.jpg"], "width": [50, 50], "height": [40, 40],
        "original_width": [50, 50], "original_height": [40, 40]}}
    out = run_stage_on_chunk(stage, "segment", chunk, batch_size=1)
    assert out["counts"] == {"segment": {"premasked": 3, "segmented": 0}}
    assert chunk_summary(pack_chunk(out, WriteConfig()))["counts"] == out["counts"]


# ---------------------------------------------------------------- chains, loading, presets


def test_sam3_chain_makes_valid_records_without_a_segmenter(ground):
    images = [_image(96, 128, 27), _image(72, 72, 28)]
    batch = _batch(images, source_caption=["a dog and a cup on a table", "a man near a tree"])
    batch = TagStage(TagConfig(method="caption"))(batch)
    segment = SegmentStage(SegmentConfig(model=None))
    for stage in (ground, segment, FilterStage(FilterConfig(min_clip_score=None, min_detector_score=None,
                                                            min_mask_agreement=None))):
        batch = stage(batch)
    assert batch["status"] == ["ok", "ok"] and sum(len(o) for o in batch["objects"]) >= 2
    assert segment.counts["premasked"] == sum(len(o) for o in batch["objects"])
    for i in range(2):
        record = SampleRecord(key=batch["key"][i], width=batch["width"][i], height=batch["height"][i],
                              original_width=batch["width"][i], original_height=batch["height"][i],
                              objects=tuple(batch["objects"][i])).validate()
        assert all(o.mask is not None and o.mask_box is not None for o in record.objects)


def test_sam3_and_sam2_load_from_saved_folders(tmp_path):
    for kind, name in (("detector", "tiny-sam3"), ("segmenter", "tiny-sam2")):
        model, processor = load_model(SPECS[kind])
        folder = tmp_path / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        loaded, loaded_processor = load_model(ModelSpec(kind, str(folder), device="cpu"))
        assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                        strict=True))
        assert next(loaded.parameters()).dtype == torch.float32  # SAM weights stay float32 (box coordinates)
    # SAM 3's tokenizer came back whole: the same ids as CLIP's vocabulary gives.
    assert loaded_processor is not None
    saved = load_model(ModelSpec("detector", str(tmp_path / "tiny-sam3"), device="cpu"))[1]
    assert saved.tokenizer("a red car")["input_ids"] == [49406, 320, 736, 1615, 49407]


def test_a_folder_that_is_not_sam2_is_refused_as_a_segmenter(tmp_path):
    model, processor = load_model(SPECS["detector"])  # SAM 3 saved where a SAM 2 is expected
    model.save_pretrained(tmp_path / "sam3")
    with pytest.raises(ValueError, match="is not a SAM 2 model"):
        load_model(ModelSpec("segmenter", str(tmp_path / "sam3"), device="cpu"))


def test_presets_load_and_sam3_yaml_plans(capsys):
    from datagen.cli import main

    tiny = load_config(ROOT / "configs" / "datagen" / "tiny_sam3.yaml")
    assert tiny.stages["ground"].model == SPECS["detector"] and tiny.stages["segment"].model is None
    assert tiny.stages["tag"].model.name == "tiny-qwen3-vl"
    real = load_config(ROOT / "configs" / "datagen" / "sam3.yaml")
    assert real.stages["ground"].model.name == "facebook/sam3" and real.stages["segment"].model is None
    assert real.stages["describe"].model.name == "Qwen/Qwen3-VL-8B-Instruct"
    assert real.stages["score"].model.name == "ViT-L-14"
    assert main(["plan", "--config", str(ROOT / "configs" / "datagen" / "sam3.yaml")]) == 0
    assert "facebook/sam3" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_sam3_run_makes_a_valid_dataset_and_says_segment_had_nothing_to_do(tmp_path):
    from datagen.synthetic import make_image_folder

    make_image_folder(tmp_path / "in", 12, seed=3, min_size=64, max_size=160)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "datagen", "run", "--config", str(ROOT / "configs" / "datagen" / "tiny_sam3.yaml"),
         "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress",
         "--set", "execution.num_cpus=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert validate_dataset(str(tmp_path / "out")) == []
    (record,) = (tmp_path / "out" / "runs").glob("*.json")
    segment = json.loads(record.read_text())["stages"]["segment"]
    objects = json.loads(record.read_text())["objects"]
    assert segment["rows"] == 12 and segment["counts"]["segmented"] == 0
    assert segment["counts"]["premasked"] >= objects > 0  # the filter may drop some after segment
    assert f"segment: {segment['counts']['premasked']} premasked, 0 segmented" in proc.stdout
    check = subprocess.run([sys.executable, "-m", "shards", "validate", str(tmp_path / "out")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr


# ---------------------------------------------------------------- real size


def _check_real(batch: dict, masked: bool) -> None:
    assert batch["status"] == ["ok"] * len(batch["key"]), batch["error"]
    for i, objs in enumerate(batch["objects"]):
        w, h = batch["width"][i], batch["height"][i]
        assert 1 <= len(objs) <= 4  # boxes exist at real scale; the test's max_objects
        for o in objs:
            x1, y1, x2, y2 = o["box"]
            assert all(math.isfinite(v) for v in o["box"]) and 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert 0 <= o["detector_score"] <= 1 and o["phrase"]
            if masked:
                _check_masks(o, h, w)


@pytest.mark.real_size
@pytest.mark.timeout(3600)  # ~10 min on 2 idle cores (SAM ViT-H and SAM 3 at 1 TFLOP-scale per image each)
def test_sam3_and_sam21_at_real_size_against_groundingdino_and_sam_vit_h(tmp_path, capsys):
    """The ground + segment seconds per image of three paths on the real-size test's two photos, same tags
    (the photos' caption phrases), random weights: the paper's GroundingDINO-T + SAM ViT-H, SAM 3 alone,
    and GroundingDINO-T's boxes + SAM 2.1 hiera-large (a detector + SAM 2.1: MM GroundingDINO-T has
    GroundingDINO-T's size). The issue's goal (the faster new path <= 0.6 of the paper's) is reported."""
    import time

    from datagen.real_size import FACTORIES, OTHER_FACTORIES, make_photos, register, run_stages

    def builds(factories):
        return register("cpu", factories={k: v for k, v in factories.items() if v[0] in ("detector", "segmenter")})

    old, new = builds(FACTORIES), builds(OTHER_FACTORIES)
    real = load_config(ROOT / "configs" / "datagen" / "real.yaml")
    sam3 = load_config(ROOT / "configs" / "datagen" / "sam3.yaml")
    tag = TagConfig(method="caption")  # the same four phrases for every path
    gdino = dataclasses.replace(real.stages["ground"], model=old["detector"], max_objects=4)
    # Random weights score SAM 3's queries near 0.5 x presence (lifted to 0.95 by the build): below the
    # preset's 0.5, so the test's threshold is 0.3; the work per phrase is the same whatever passes.
    sam3_ground = dataclasses.replace(sam3.stages["ground"], model=new["detector"], max_objects=4, box_threshold=0.3)
    assert sam3.stages["segment"].model is None
    tagged, _ = run_stages(make_photos(tmp_path / "photos"), {"decode": real.decode, "tag": tag})
    grounded = {}

    def keep_ground(name, batch):
        if name == "ground":
            grounded.update(copy.deepcopy(batch))

    def said(path, timings):  # each path's seconds as soon as it ends (the whole test takes minutes)
        with capsys.disabled():
            print(f"\n{path}: " + ", ".join(f"{k} {b / r:.2f} s/image" for k, (r, b, _) in timings.items()))
        return timings

    t0 = time.perf_counter()
    sam3_batch, alone = run_stages(tagged, {"ground": sam3_ground, "segment": sam3.stages["segment"]})
    said("SAM 3", alone)
    sam_h = dataclasses.replace(real.stages["segment"], model=old["segmenter"])
    paper_batch, paper = run_stages(tagged, {"ground": gdino, "segment": sam_h}, on_stage=keep_ground)
    said("GroundingDINO-T + SAM ViT-H", paper)
    sam21 = dataclasses.replace(real.stages["segment"], model=new["segmenter"])
    sam21_batch, sam21 = run_stages(grounded, {"segment": sam21})
    said("SAM 2.1 hiera-large on GroundingDINO-T's boxes", sam21)
    wall = time.perf_counter() - t0
    for batch in (paper_batch, sam3_batch, sam21_batch):
        _check_real(batch, masked=True)
    assert all(o["mask_score"] == o["detector_score"] for objs in sam3_batch["objects"] for o in objs)

    def per_image(timings, stage):
        rows, busy, _ = timings[stage]
        return busy / rows

    figures = {
        "gdino_t_ground_s": per_image(paper, "ground"), "sam_vit_h_segment_s": per_image(paper, "segment"),
        "sam3_ground_s": per_image(alone, "ground"), "sam3_segment_s": per_image(alone, "segment"),
        "sam21_large_segment_s": per_image(sam21, "segment"),
    }
    paper_s = figures["gdino_t_ground_s"] + figures["sam_vit_h_segment_s"]
    figures["sam3_over_paper"] = (figures["sam3_ground_s"] + figures["sam3_segment_s"]) / paper_s
    figures["gdino_sam21_over_paper"] = (figures["gdino_t_ground_s"] + figures["sam21_large_segment_s"]) / paper_s
    figures = {k: round(v, 3) for k, v in figures.items()}
    with capsys.disabled():
        print(f"\nground + segment seconds per image at real size on CPU ({wall:.0f} s in all):")
        for k, v in figures.items():
            print(f"  {k:24s} {v:8.3f}")
        print(json.dumps({"benchmark": "real_size_sam_cpu", "figures": figures,
                          "targets": {"sam3_over_paper": 0.6, "gdino_sam21_over_paper": 0.6}}))

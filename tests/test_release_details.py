"""The release's last details (issue 20), each built from what the release's code does, stated here.

- Region text: the release splits at ``tokenizer(";", add_special_tokens=False)["input_ids"][0]`` only and
  zips each object's box and IoU weight with the segments it finds, unrescaled.
- More regions than 30: ``np.unique(masks, axis=0)`` orders the regions, the first 120 are kept, then
  ``np.random.choice(n, 30, replace=False)`` picks 30.
- Its extract script keeps the keys holding ``unet`` (``"unet."`` replaced by ``""``) of position net and
  fusers: an EMA checkpoint gives ``ema_module.*`` keys beside the live ones.
- Its evaluation: the images before the refiner, a missing image skipped, a zero-area box's crops
  skipped and its SAMIoU 0; its LAION evaluation set centre-crops to 512 x 512 (boxes under 30 % visible
  dropped); its pipeline keeps the first 30 objects; SD1.5 ran at guidance 7.5; without a negative
  prompt SDXL's negative embeddings are zeros.
"""

from __future__ import annotations

import io
import json
import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from training.evaluation import evaluate
from training.evaluation import fid as fid_module
from training.evaluation.metrics import tiny_hf_clip
from training.inference import generate
from training.inference.presets import load_section
from training.layout.dataset import layouts_from_dataset, sample_fit
from training.layout.files import load_layouts
from training.layout.regions import reorganize_regions
from training.model import init_adapter as init_unet
from training.model.adapter import adapter_state_dict, attach_regional_adapter, save_adapter
from training.model.encoding import RegionTextEncoder, slot_token_targets
from training.model.release_checkpoint import read_checkpoint
from training.model.tiny import tiny_unet

# ---------------------------------------------------------------------------------------------------
# The region separator


@pytest.fixture(scope="module")
def clip_bpe():
    """CLIP's real BPE (where ".;" is one token) with a tiny random text encoder."""
    model, processor = tiny_hf_clip()
    tokenizer = processor.tokenizer
    tokenizer.model_max_length = 77
    torch.manual_seed(0)
    return tokenizer, CLIPTextModel(model.config.text_config).eval()  # its weights do not matter here


def release_intervals(ids: list[int], bos: int, eos: int, sep: int) -> list[tuple[int, int]]:
    """The release's segments: after BOS, split at ``sep`` alone, up to EOS."""
    first, last = ids.index(bos), ids.index(eos)
    cuts = [i for i, t in enumerate(ids) if t == sep]
    starts, ends = [first + 1] + [c + 1 for c in cuts], cuts + [last]
    return list(zip(starts, ends, strict=True))


def test_a_full_stop_merged_with_the_separator_separates_nothing_under_the_release_rule(clip_bpe):
    tokenizer, text = clip_bpe
    region = "a dog lying on its back.; a red ball"  # the second object's text after a description's "."
    ids = tokenizer(region, padding="max_length", max_length=77)["input_ids"]
    assert ".;</w>" in tokenizer.convert_ids_to_tokens(ids)
    sep = tokenizer(";", add_special_tokens=False)["input_ids"][0]
    expected = release_intervals(ids, tokenizer.bos_token_id, tokenizer.eos_token_id, sep)
    assert len(expected) == 1  # one segment in the release: the ball's words get the dog's box
    released = RegionTextEncoder([tokenizer], [text], separator="release").encode_texts([region])[0]
    ours = RegionTextEncoder([tokenizer], [text]).encode_texts([region])[0]
    assert list(released.spans) == expected and len(ours.spans) == 2
    plain = "a dog lying on its back; a red ball"  # ";" alone: both rules split there
    ids = tokenizer(plain, padding="max_length", max_length=77)["input_ids"]
    both = RegionTextEncoder([tokenizer], [text], separator="release").encode_texts([plain])[0]
    assert list(both.spans) == release_intervals(ids, tokenizer.bos_token_id, tokenizer.eos_token_id, sep)
    assert len(both.spans) == 2
    with pytest.raises(ValueError, match="separator must be"):
        RegionTextEncoder([tokenizer], [text], separator="semicolon")


def test_release_rule_zips_weights_unrescaled_and_ours_renormalizes_what_is_left():
    boxes = np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.9, 0.9]], dtype=np.float32)
    weights = np.array([0.25, 1.0], dtype=np.float32)  # the region's IoU with each box over the max
    spans = [(1, 9)]  # one segment found (the merged ".;")
    released = slot_token_targets(spans, boxes, weights, renormalize=False)
    ours = slot_token_targets(spans, boxes, weights)
    # The release: tokens 1..8 get box 0 and bias (0.25 - 1) * scale; ours rescales 0.25 to 1 (bias 0).
    np.testing.assert_allclose(released[0][1:9], np.repeat(boxes[:1], 8, axis=0))
    np.testing.assert_allclose(released[1][1:9], -0.75)
    np.testing.assert_allclose(ours[1][1:9], 0.0)


# ---------------------------------------------------------------------------------------------------
# More regions than 30


def _stripes(n: int = 12, size: int = 256) -> np.ndarray:
    """Vertical and horizontal stripes: n x n / 4 crossings, far more than 30 regions."""
    w = size // n
    cols = [[i * w, 0, (i + 1) * w, size] for i in range(n // 2)]
    rows = [[0, i * w, size, (i + 1) * w] for i in range(n // 2)]
    return np.array(cols + rows, dtype=np.float64)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_release_rule_keeps_the_releases_seeded_draw_of_regions(seed):
    boxes, size = _stripes(), 256
    texts = [f"object {i}" for i in range(len(boxes))]
    layout = reorganize_regions(boxes, texts, size, size, rasterize="release", seed=seed)
    # The release: cells' membership rows, np.unique (sorted rows), the first 120, then 30 drawn.
    from training.layout.regions import rasterize_boxes

    masks = rasterize_boxes(boxes, size // 8, size // 8, rasterize="release")
    unique = np.unique(masks.reshape(len(boxes), -1).T, axis=0)[:120]
    assert len(unique) > 30 and layout.n_regions == len(unique)
    np.random.seed(seed % 2**32)
    picked = unique[np.random.choice(len(unique), 30, replace=False)]
    expected = sorted(tuple(np.nonzero(row)[0]) for row in picked)
    assert sorted(tuple(ids) for ids in layout.object_ids) == expected
    # the same seed draws the same regions; ours (cover, no rng) keeps the largest instead
    again = reorganize_regions(boxes, texts, size, size, rasterize="release", seed=seed)
    assert [t for t in again.texts] == layout.texts
    cover = reorganize_regions(boxes, texts, size, size)
    assert cover.n_slots == 30 and cover.background_slot is not None


# ---------------------------------------------------------------------------------------------------
# The extract script's output of an EMA checkpoint


def _extracted(module: dict) -> dict:
    """What the release's extract script writes from a DeepSpeed checkpoint's ``module``."""
    unet = {k.replace("unet.", ""): v for k, v in module.items() if "unet" in k}
    kept = {k: v for k, v in unet.items() if "position" in k or "fuser" in k}
    return {k.replace("null_positive_feature", "null_text_feature"): v for k, v in kept.items()}


@pytest.fixture(scope="module")
def trained():
    """Live and EMA adapter weights of a tiny SDXL UNet (different values), and the UNet."""
    unet = attach_regional_adapter(tiny_unet())
    gen = torch.Generator().manual_seed(0)
    live = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in adapter_state_dict(unet).items()}
    ema = {k: v + 0.01 for k, v in live.items()}
    return unet, live, ema


def test_the_extract_scripts_output_of_an_ema_checkpoint_loads_live_or_ema(trained, tmp_path, capsys):
    unet, live, ema = trained
    module = {f"_forward_module.unet.{k}": v for k, v in live.items()}
    module |= {f"_forward_module.ema_unet.module.{k}": v for k, v in ema.items()}
    module["_forward_module.ema_unet.n_averaged"] = torch.tensor(5)
    module["_forward_module.vae.decoder.conv_in.weight"] = torch.zeros(2)
    path = tmp_path / "pn_and_fuser.pth"
    torch.save(_extracted(module), path)
    assert any(k.startswith("_forward_module.ema_module.") for k in torch.load(path, weights_only=True))
    for want, expected in ((False, live), (True, ema)):
        got = read_checkpoint(path, ema=want)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    out = tmp_path / "init"
    assert init_unet.main(["--base", "tiny", "--out", str(out), "--adapter", str(path), "--ema"]) == 0
    written = load_file(str(out / init_unet.ADAPTER_FILE))
    assert all(torch.equal(written[k], ema[k]) for k in ema)
    assert json.loads(capsys.readouterr().out)["adapter_keys_fresh"] == 0


def test_init_unet_refuses_an_adapter_file_missing_a_key_naming_it(trained, tmp_path, capsys):
    unet, live, _ = trained
    unet.load_state_dict(live, strict=False)
    path = save_adapter(unet, tmp_path / "a.safetensors")
    state = load_file(str(path))
    gone = sorted(k for k in state if ".fuser." in k)[0]
    del state[gone]
    save_file(state, str(tmp_path / "partial.safetensors"))
    out = tmp_path / "init"
    assert init_unet.main(["--base", "tiny", "--out", str(out), "--adapter", str(tmp_path / "partial.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and gone in err[0] and "missing" in err[0]
    assert not (out / init_unet.ADAPTER_FILE).exists()


# ---------------------------------------------------------------------------------------------------
# --preset release


def test_release_preset_keeps_the_first_30_objects_and_counts_the_rest(tmp_path):
    cfg = load_section(generate.GenerateConfig, "release", None, "generate", [])
    assert cfg.lenient and cfg.max_objects == 30 and cfg.rasterize == "release"
    boxes = [[i, i, i + 40, i + 40] for i in range(35)]
    path = tmp_path / "many.json"
    path.write_text(json.dumps({"bboxes": boxes, "labels": [f"object {i}" for i in range(35)]}))
    (record,), _ = load_layouts(path, cfg.height, cfg.width, max_objects=cfg.max_objects, lenient=cfg.lenient)
    assert record.boxes.tolist() == boxes[:30] and record.labels[-1] == "object 29"
    assert record.dropped_objects == 5
    paper = load_section(generate.GenerateConfig, "paper", None, "generate", [])
    with pytest.raises(ValueError, match="35 objects but the model takes at most 30"):
        load_layouts(path, paper.height, paper.width, max_objects=paper.max_objects, lenient=paper.lenient)


def test_release_preset_guides_sd15_at_7_5_and_sdxl_at_4_5_and_a_given_scale_wins():
    cfg = load_section(generate.GenerateConfig, "release", None, "generate", [])
    sd15, sdxl = types.SimpleNamespace(backbone="sd15"), types.SimpleNamespace(backbone="sdxl")
    assert (generate._guidance(cfg, sd15), generate._guidance(cfg, sdxl)) == (7.5, 4.5)
    overrides = ["guidance_scale=6.0", "sd15_guidance_scale=null"]  # what --guidance-scale 6 sets
    given = load_section(generate.GenerateConfig, "release", None, "generate", overrides)
    assert generate._guidance(given, sd15) == generate._guidance(given, sdxl) == 6.0


@pytest.fixture(scope="module")
def tiny_pipe():
    from training.inference.pipeline import LayoutPipeline
    from training.model.tiny import tiny_sdxl_pipeline

    sdxl = tiny_sdxl_pipeline(0)
    sdxl.set_progress_bar_config(disable=True)
    return LayoutPipeline.from_sdxl(sdxl)


def test_a_release_pipeline_splits_as_the_release_and_draws_regions_with_the_images_seed(tiny_pipe, monkeypatch):
    from training.inference import pipeline as module
    from training.inference.pipeline import LayoutPipeline

    release = LayoutPipeline(tiny_pipe.sdxl, rasterize="release")
    assert (release.region_encoder.separator, tiny_pipe.region_encoder.separator) == ("release", "any")
    seeds = []
    reorganize = module.reorganize_regions
    monkeypatch.setattr(module, "reorganize_regions", lambda *a, **k: seeds.append(k["seed"]) or reorganize(*a, **k))
    boxes, labels = _stripes(size=64) / 4 * 4, [f"o{i}" for i in range(12)]
    for kwargs in ({"generator": torch.Generator().manual_seed(123)}, {"region_seed": 5}, {}):
        release("x", boxes=boxes, labels=labels, height=64, width=64, num_inference_steps=1, output_type="np",
                **kwargs)  # fmt: skip
    assert seeds == [123, 5, 0]


def test_an_unset_negative_prompt_gives_zero_negative_embeddings_as_the_release(tiny_pipe, monkeypatch):
    pipe, sdxl = tiny_pipe, tiny_pipe.sdxl
    seen = []
    encode = sdxl.encode_prompt
    monkeypatch.setattr(sdxl, "encode_prompt", lambda *a, **k: seen.append(encode(*a, **k)) or seen[-1])
    for negative in (None, ""):
        pipe("a beach", boxes=[[0, 0, 32, 32]], labels=["a kite"], negative_prompt=negative, height=64, width=64,
             num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0))  # fmt: skip
    (_, unset, _, unset_pooled), (_, empty, _, _) = seen
    assert torch.count_nonzero(unset) == 0 and torch.count_nonzero(unset_pooled) == 0
    assert torch.count_nonzero(empty) > 0  # "": encoded, as training encodes a dropped caption
    cfg = load_section(generate.GenerateConfig, "release", None, "generate", ["negative_prompt=null"])
    assert cfg.negative_prompt is None


def test_centre_crop_fit_is_the_releases_laion_evaluation_crop():
    # 80 x 48 -> short side 64: 107 x 64, the middle 64 x 64 from x = 21; boxes shift, one 20 % visible drops.
    fit = sample_fit(80, 48, 64, "center_crop")
    assert (fit.resized, fit.left, fit.top, fit.width, fit.height) == ((107, 64), 21, 0, 64, 64)
    boxes = np.array([[30, 0, 60, 48], [0, 0, 20, 24], [0, 0, 18, 48]])
    moved, keep = fit.boxes(boxes, (80, 48))
    sx = 107 / 80  # boxes follow the pixels: the resized width over the original (albumentations' normalized boxes)
    np.testing.assert_allclose(moved[0], [30 * sx - 21, 0, 60 * sx - 21, 64])
    # box 1: 26.7 px wide after the resize, 5.7 of them inside the crop (21 %): dropped; box 2: 12.5 %: dropped
    assert keep.tolist() == [True, False, False]
    image = Image.fromarray(np.tile(np.arange(80, dtype=np.uint8), (48, 1)))
    assert fit.image(image).size == (64, 64)
    aspect = sample_fit(80, 48, 64)
    assert (aspect.width, aspect.height, aspect.left, aspect.top) == (64, 40, 0, 0)


def test_from_shards_center_crop_and_the_model_limit_drop_objects_with_a_count(tmp_path):
    from shards import ObjectRecord, SampleRecord, ShardWriter

    buf = io.BytesIO()
    Image.new("RGB", (80, 48)).save(buf, "PNG")
    objects = tuple(ObjectRecord(box=(30 + i, 0, 60, 48), phrase=f"p{i}") for i in range(10))
    objects += (ObjectRecord(box=(0, 0, 20, 24), phrase="edge"),)
    with ShardWriter(str(tmp_path), 0) as writer:
        writer.add(SampleRecord(key="wide", width=80, height=48, original_width=80, original_height=48,
                                caption="c", objects=objects), buf.getvalue(), "png")  # fmt: skip
    (record,), _ = layouts_from_dataset(str(tmp_path), 64, fit="center_crop", max_objects=8)
    assert (record.width, record.height) == (64, 64) and record.labels == tuple(f"p{i}" for i in range(8))
    assert record.dropped_objects == 3  # "edge" under 30 % visible, then p8 and p9 beyond the limit


def test_the_release_preset_scores_the_unrefined_images_and_zero_area_boxes_as_the_release(tmp_path, capsys):
    cfg = load_section(evaluate.EvalConfig, "release", None, "evaluate", [])
    assert cfg.image_set == "unrefined" and cfg.protocol == "paper"
    rng = np.random.default_rng(0)
    (tmp_path / "gen" / "unrefined").mkdir(parents=True)
    layouts = [{"id": "a", "boxes": [[8, 8, 40, 40], [10, 3, 10, 20]], "labels": ["a red kite", "a line"]},
               {"id": "b", "boxes": [[0, 0, 64, 32]], "labels": ["a sky"]}]  # fmt: skip
    (tmp_path / "layouts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in layouts))
    for name in ("a", "b"):
        for folder in ("gen", "gen/unrefined"):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / folder / f"{name}.png")
    base = ["--tiny", "--layouts", str(tmp_path / "layouts.jsonl"), "--format", "csv"]

    def run(images, out, *extra):
        assert evaluate.main([*base, "--images", str(images), "--out", str(tmp_path / out), *extra]) == 0
        capsys.readouterr()
        return pd.read_csv(tmp_path / out / "objects.csv"), json.loads((tmp_path / out / "summary.json").read_text())

    unrefined, summary = run(tmp_path / "gen", "u", "--set", "image_set=unrefined")
    direct, _ = run(tmp_path / "gen" / "unrefined", "d")
    refined, _ = run(tmp_path / "gen", "r")
    assert summary["image_folder"] == str(tmp_path / "gen" / "unrefined")
    np.testing.assert_allclose(unrefined["crop_clip"], direct["crop_clip"])
    assert not np.allclose(unrefined["crop_clip"].fillna(0), refined["crop_clip"].fillna(0))
    # The zero-area box [10, 3, 10, 20]: its crops skipped (NaN), its SAMIoU 0, as the release scores it.
    line = unrefined.iloc[1]
    assert np.isnan(line.crop_clip) and np.isnan(line.crop_pick) and line.sam_iou == 0
    assert summary["skipped_objects"] == {"crop_clip": 1, "crop_pick": 1, "sam_iou": 0}
    # The exact protocol cannot score a box without area: the file is refused, naming it.
    code = evaluate.main([*base, "--images", str(tmp_path / "gen"), "--out", str(tmp_path / "x"), "--protocol", "exact"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "layouts.jsonl:1: box 1" in err[0]


# ---------------------------------------------------------------------------------------------------
# FID's weights: read once


def test_fid_reads_the_inception_file_once_with_weights_only(tmp_path, monkeypatch):
    from test_metrics import random_inception_weights

    path = random_inception_weights(tmp_path / "inception.pth")
    images = []
    rng = np.random.default_rng(1)
    for k in range(4):
        images.append(tmp_path / f"{k}.png")
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images[-1])
    calls = []
    load = torch.load

    def spy(f, *args, **kwargs):
        calls.append((f, kwargs.get("weights_only")))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    value = fid_module.fid(images[:2], images[2:], weights=path, device="cpu", feature=64)
    from_disk = [(f, w) for f, w in calls if not isinstance(f, io.BytesIO)]
    assert from_disk == [(path, True)]  # the file is unpickled once, tensors only
    assert all(isinstance(f, io.BytesIO) for f, w in calls if w is not True)  # torch-fidelity's read: memory
    monkeypatch.setattr(torch, "load", load)
    from torchmetrics.image.fid import FrechetInceptionDistance

    # the same value as torch-fidelity reading the file itself: the weights handed over are the file's
    metric = FrechetInceptionDistance(feature=64, feature_extractor_weights_path=str(path))
    for batch, real in ((images[2:], True), (images[:2], False)):
        pixels = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in batch])).permute(0, 3, 1, 2)
        metric.update(pixels, real=real)
    assert value == pytest.approx(float(metric.compute()), rel=1e-6)

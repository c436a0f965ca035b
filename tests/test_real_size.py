"""Real model configurations with random weights on CPU: the real preset's datagen stages on two photos,
one regional-adapter train step on SDXL base at 512 px, and one on SD3.5 medium's transformer at 512 px
(``make test-real-size``; ~20 min on 2 shared cores; peak memory ~7 GB for the stages, ~15 GB for the SDXL
step: 548 M fp32 adapter weights with gradients and AdamW states next to the bf16 UNet and text encoders;
the SD3.5 step measured 498 s and 7.4 GiB peak RSS, 10.7 min with its build, on a loaded machine).

Tiny configs hide shape, dtype, memory and preprocessing mistakes: here every model has its real widths
(Qwen2.5-VL-7B's language model cut to 2 layers), its real processor settings and special-token ids.
The fast tests at the end smoke-test ``benchmarks/real_size.py`` (what ``benchmarks/gpu_suite.sh`` runs)
with the tiny models.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_size as bench  # noqa: E402  (benchmarks/real_size.py)

from datagen.real_size import (  # noqa: E402
    PHOTO_SIZES,
    STAGE_COLUMNS,
    busy_summary,
    make_photos,
    real_stage_configs,
    register,
    run_stages,
)

REAL_CONFIG = str(ROOT / "configs" / "datagen" / "real.yaml")


def _finite_box(box, w, h) -> bool:
    return len(box) == 4 and all(math.isfinite(v) for v in box) and 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h


def _check_stage(name: str, batch: dict) -> None:
    """What each stage must have produced on every row (all rows stay ok)."""
    assert batch["status"] == ["ok"] * len(batch["key"]), (name, batch["error"])
    for column in STAGE_COLUMNS[name]:
        assert all(v is not None for v in batch[column]), (name, column)
    for i in range(len(batch["key"])):
        w, h = batch["width"][i], batch["height"][i]
        if name == "decode":
            assert (w, h) == PHOTO_SIZES[i] and batch["image"][i].shape == (h, w, 3)
            assert batch["image"][i].dtype == np.uint8
        if name == "tag":
            assert batch["tags"][i] and all(isinstance(t, str) and t for t in batch["tags"][i])
        if name == "caption":
            assert isinstance(batch["caption"][i], str) and batch["caption"][i]
        objects = batch.get("objects", [None] * len(batch["key"]))[i]
        if name in ("ground", "segment", "describe", "score", "filter"):
            assert 1 <= len(objects) <= 2  # the test's max_objects: boxes exist at real scale
            for o in objects:
                assert _finite_box(o["box"], w, h) and 0 <= o["detector_score"] <= 1 and o["phrase"]
        if name in ("segment", "describe", "score", "filter"):
            for o in objects:
                assert o["mask"]["size"] == [h, w] and isinstance(o["mask"]["counts"], str | bytes)
                assert math.isfinite(o["mask_score"])
        if name in ("describe", "score", "filter"):
            assert all(isinstance(o["description"], str) and o["description"] for o in objects)
        if name in ("score", "filter"):
            assert all(math.isfinite(o["clip_score"]) and -100 <= o["clip_score"] <= 100 for o in objects)


@pytest.mark.real_size
def test_real_preset_stages_at_real_size_and_their_run_record(tmp_path, capsys):
    from datagen.cli import main as datagen_main
    from datagen.measurement import run_record, save_run_record
    from datagen.models import load_model

    specs = register("cpu")  # bf16 VLM (~4.4 GB), fp32 detector and SAM, bf16 CLIP
    # Real shapes, real resolutions; fewer new tokens and objects than a run so the CPU test stays minutes.
    overrides = bench.stage_overrides(max_new_tokens=8, max_objects=2)
    overrides["describe"] = {**overrides["describe"], "generate_batch_size": 4}
    cfg, configs = real_stage_configs(specs, REAL_CONFIG, overrides)
    assert list(configs) == ["decode", "tag", "caption", "ground", "segment", "describe", "score", "filter"]

    # The builds are the real shapes: spot-check each against the hub configs' numbers.
    vlm, processor = load_model(specs["vlm"])
    assert vlm.config.text_config.hidden_size == 3584 and vlm.config.vision_config.depth == 32
    assert vlm.lm_head.weight.shape == (152064, 3584) and vlm.dtype == torch.bfloat16
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == vlm.config.image_token_id == 151655
    del vlm, processor
    sam, transform = load_model(specs["segmenter"])
    assert sam.image_encoder.img_size == 1024 and sam.image_encoder.pos_embed.shape == (1, 64, 64, 1280)
    assert transform.target_length == 1024 and next(sam.parameters()).dtype == torch.float32
    del sam, transform

    def check(name, batch):
        _check_stage(name, batch)

    import time

    t0 = time.perf_counter()
    batch, timings = run_stages(make_photos(tmp_path / "photos"), configs, on_stage=check)
    wall = time.perf_counter() - t0
    assert set(timings) == set(configs) and all(rows == 2 and busy > 0 for rows, busy, _ in timings.values())

    record = run_record(busy_summary(str(tmp_path / "out"), timings, batch, wall), cfg)
    path = save_run_record(str(tmp_path / "out"), record)
    assert Path(path).parent.name == "runs"
    capsys.readouterr()
    assert datagen_main(["size", "--from", str(tmp_path / "out"), "--images", "3300000", "--hours", "24"]) == 0
    plan = capsys.readouterr().out
    for name in ("tag", "segment", "describe", "score"):
        assert name in plan
    with capsys.disabled():
        print("\nreal-size seconds per image on CPU (load seconds):")
        for name, (rows, busy, load) in timings.items():
            print(f"  {name:9s} {busy / rows:9.2f}  ({load:.1f})")
        print(json.dumps({"benchmark": "real_size_cpu", "figures": {
            f"{n}_s_per_image": round(b / r, 3) for n, (r, b, _) in timings.items()}}))


@pytest.mark.real_size
def test_adapter_train_step_on_real_sdxl_at_512(tmp_path):
    from datagen.real_size import make_photos
    from training.trainer.config import load_train_config
    from training.trainer.real_size import SDXL_UNET, layout_batch, real_sdxl_components, train_step

    config = load_train_config(ROOT / "configs" / "train" / "sdxl512_8gpu.yaml", {
        "train.caption_dropout": 0.0, "train.layout_dropout": 0.0, "train.mixed_precision": "bf16",
        "model.gradient_checkpointing": True})  # fmt: skip
    components = real_sdxl_components(tmp_path / "tok", "cpu", torch.bfloat16)
    unet = components["unet"]
    assert sum(p.numel() for p in unet.parameters()) > 2.5e9
    assert tuple(unet.config.transformer_layers_per_block) == SDXL_UNET["transformer_layers_per_block"]
    tok = components["tokenizer"]
    ids = tok("a red house")["input_ids"]
    assert ids[0] == 49406 and ids[-1] == 49407 and len(tok.get_vocab()) == 49408  # CLIP's real vocabulary
    from PIL import Image

    image = np.asarray(Image.open(make_photos(tmp_path)["uri"][0]).convert("RGB"))
    batch = layout_batch(image, [[96, 120, 320, 360], [384, 144, 512, 264]], ["a red house", "a green tree"],
                         "a red house next to a tree", 512)  # fmt: skip
    assert batch["pixels"].shape == (1, 3, 512, 512) and batch["region_map"].shape == (1, 64, 64)
    out = train_step(config, components, batch, "cpu")
    print(f"\nSDXL 512 px adapter step on CPU (bf16, checkpointing): {out['seconds']:.1f} s, "
          f"{out['trainable_params'] / 1e6:.1f} M trainable, gligen {out['gligen_shapes']}")
    assert out["sample_shape"] == (1, 4, 64, 64) and out["unet_dtype"] == "torch.bfloat16"
    assert out["param_dtypes"] == ["torch.float32"]  # fp32 master weights of the adapter
    assert math.isfinite(out["loss"]) and out["loss"] > 0
    assert math.isfinite(out["grad_norm"]) and out["grad_norm"] > 0  # gradients reached the adapter
    assert out["gligen_shapes"]["text_embeddings"][-1] == 2048  # both text encoders' widths
    assert out["gligen_shapes"]["region_map"] == (1, 64, 64)


def _peak_rss_reset() -> None:
    """Start a new high-water mark of this process's resident memory (Linux: VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


@pytest.mark.real_size
def test_adapter_train_step_on_real_sd35_medium_at_512():
    """SD3.5 medium's transformer (training.model.mmdit.real: 24 joint blocks of width 1536, dual attention in
    blocks 0-12), bf16, gradient checkpointing, the sd35_1024_8gpu preset's adapter in fp32: one step at
    512 px, random encoder outputs in place of T5-XXL and the CLIPs (they would not fit 24 GB beside it)."""
    from diffusers.models.attention import JointTransformerBlock

    from training.model.mmdit.real import real_mmdit_transformer
    from training.trainer.config import load_train_config
    from training.trainer.real_size import flow_train_step

    _peak_rss_reset()
    config = load_train_config(ROOT / "configs" / "train" / "sd35_1024_8gpu.yaml", {
        "train.mixed_precision": "bf16", "model.gradient_checkpointing": True})  # fmt: skip
    transformer = real_mmdit_transformer("sd3", "cpu", torch.bfloat16)
    blocks = transformer.transformer_blocks
    assert len(blocks) == 24 and all(isinstance(b, JointTransformerBlock) for b in blocks)
    assert [b.attn2 is not None for b in blocks] == [True] * 13 + [False] * 11  # SD3.5's MMDiT-X blocks
    assert blocks[0].attn.to_q.weight.shape == (1536, 1536) and blocks[-1].context_pre_only
    boxes = [[96, 120, 320, 360], [384, 144, 512, 264], [430, 240, 460, 384]]
    texts = ["a red house with a brown door and two windows", "a green tree", "a brown tree trunk"]
    out = flow_train_step(config, transformer, boxes, texts, 512)
    rss = bench.peak_memory_gb("cpu")
    print(f"\nSD3.5 medium 512 px adapter step on CPU (bf16, checkpointing): {out['seconds']:.1f} s, "
          f"peak RSS {rss:.1f} GiB, {out['base_params'] / 1e9:.3f} B base, "
          f"{out['trainable_params'] / 1e6:.1f} M trainable")
    assert 2.24e9 < out["base_params"] < 2.25e9  # the config's parameters (its file adds a 0.23 B pos table)
    assert out["trainable_params"] / out["base_params"] < 0.15
    assert out["hidden_shape"] == (1, 16, 64, 64) and out["region_map"] == (1, 32, 32)  # the 16 px token grid
    assert out["base_dtype"] == "torch.bfloat16" and out["param_dtypes"] == ["torch.float32"]
    assert math.isfinite(out["loss"]) and out["loss"] > 0
    assert math.isfinite(out["grad_norm"]) and out["grad_norm"] > 0  # gradients reached the adapter
    assert rss < 20  # fits the 24 GB machine with room for the OS


# ------------------------------------------------------------------ the GPU suite's CPU-testable parts


@pytest.mark.parametrize("preset", ["real", "sam3"])
def test_benchmark_datagen_smoke_writes_a_record_size_accepts(tmp_path, capsys, preset):
    assert bench.main(["datagen", "--preset", preset, "--tiny", "--output", str(tmp_path), "--max-new-tokens", "4",
                       "--max-objects", "2"]) == 0  # fmt: skip
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    name = "real_size_datagen" if preset == "real" else "real_size_datagen_sam3"
    assert last["benchmark"] == name and last["figures"]["failed"] == 0
    assert set(last["figures"]["record_stages"]) == set(STAGE_COLUMNS)
    assert list((tmp_path / "runs").glob("*.json"))


def test_benchmark_refuses_a_missing_gpu_and_bad_counts_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    script = str(ROOT / "benchmarks" / "real_size.py")
    for args, needle in ((["train", "--device", "cuda"], "--device cuda"), (["datagen", "--max-objects", "0"], "--max-objects")):
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and needle in proc.stderr and proc.stderr.count("\n") == 1


def test_gpu_suite_dry_run_lists_its_parts_each_within_eight_minutes():
    """Every part's commands; each part's time limits sum to at most 470 s (8 minutes of device time with
    the machine's start); a part that does not exist, or none, is one error line."""
    suite = str(ROOT / "benchmarks" / "gpu_suite.sh")
    proc = subprocess.run(["bash", suite, "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "benchmarks/real_size.py datagen --device cuda --dtype bf16" in out
    assert "benchmarks/real_size.py train --device cuda --dtype bf16" in out
    assert "benchmarks/train_step.py --sdxl --device cuda" in out
    assert "benchmarks/real_size.py train --model flux --device cuda --dtype bf16" in out
    assert "benchmarks/real_size.py train --model sd35 --device cuda --dtype bf16" in out
    parts = [p for p in out.split("### part ") if p]
    assert [p.split("\n")[0] for p in parts] == ["datagen", "sam3", "sdxl", "sd35", "flux"]
    assert "benchmarks/real_size.py datagen --preset sam3 --device cuda" in out
    for part in parts:
        limits = [int(line.split("(<= ")[1].split("s)")[0]) for line in part.splitlines()[1:]]
        assert len(limits) >= 3 and sum(limits) <= 470, part
    one = subprocess.run(["bash", suite, "--part", "flux", "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert one.returncode == 0 and one.stdout.count("### part") == 1 and "--model flux" in one.stdout
    for args, needle in ((["--part", "nope"], "--part nope"), ([], "name a part"), (["--part"], "needs a name")):
        bad = subprocess.run(["bash", suite, *args], capture_output=True, text=True, cwd=ROOT)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and needle in bad.stderr
        assert bad.stderr.count("\n") == 1 and not bad.stdout


@pytest.mark.parametrize("model", ["sd35", "flux"])
def test_benchmark_mmdit_train_smoke_prints_step_time_and_peak_memory(model, capsys):
    """The GPU suite's MM-DiT parts, on the tiny transformers on CPU: two steps, their seconds, the peak."""
    assert bench.main(["train", "--model", model, "--tiny", "--repeats", "2"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    f = last["figures"]
    assert last["benchmark"] == f"real_size_train_{model}" and f["size"] == 64
    assert f["step_seconds"] > 0 and f["first_step_seconds"] > 0 and f["peak_memory_gib"] > 0.1
    assert math.isfinite(f["loss"]) and f["grad_norm"] > 0 and f["trainable_params"] > 0

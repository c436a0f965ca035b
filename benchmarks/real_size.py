"""The real preset's models at real size with random weights: per-stage seconds per image, one train step.

``datagen``: two photo-like JPEGs (640x480, 500x750) through decode and every model stage of
configs/datagen/real.yaml, its models swapped for random-weight builds of their real configurations
(``datagen.real_size``), one model in memory at a time. Prints seconds per image per stage (model loads
apart) and writes a run record to ``<output>/runs/`` that ``python -m datagen size --from`` reads.
``train``: one optimizer step of the regional adapter on SDXL base's real UNet/VAE/text encoders
(``training.trainer.real_size``) at 512 px with gradient checkpointing, bf16 frozen weights.
``train --model sd35|flux``: adapter steps on SD3.5 medium's or FLUX.1-dev's transformer
(``training.model.mmdit.real``, random weights built on the device, bf16, gradient checkpointing; the preset
``sd35_1024_8gpu`` / ``flux1_1024_8gpu``'s adapter) with random encoder outputs: step seconds and peak
memory (CUDA's allocator peak on a GPU, the process's peak RSS on CPU).
``--tiny`` runs the same code on the tiny models (a seconds-long CPU smoke test).

    python benchmarks/real_size.py datagen --device cuda --output /tmp/rs
    python benchmarks/real_size.py train --device cuda
    python benchmarks/real_size.py train --model flux --device cuda --size 1024 --repeats 3
    .venv/bin/python benchmarks/real_size.py datagen --device cpu --tiny --output /tmp/rs
    .venv/bin/python benchmarks/real_size.py train --model flux --tiny

Prints a table, then one JSON line ``{"benchmark": "real_size_<what>", "figures": {...}, "targets": {}}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

REAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "datagen" / "real.yaml"
# datagen presets: (config, tiny model preset for --tiny)
DATAGEN_PRESETS = {"real": (REAL_CONFIG, "tiny"), "sam3": (REAL_CONFIG.with_name("sam3.yaml"), "tiny_sam3")}
# Bounded work per image so a run's length is fixed: new tokens per VLM answer and objects per image.
FIXED = {"max_new_tokens": 32, "max_objects": 4}


def stage_overrides(max_new_tokens: int, max_objects: int, preset: str = "real") -> dict:
    """Per-stage config overrides that fix the token and object counts (random weights never stop early)."""
    vlm = {"max_new_tokens": max_new_tokens}
    ground = {"max_objects": max_objects}
    if preset == "sam3":  # random SAM 3 queries score ~0.47 (datagen.tiny_sam), under sam3.yaml's 0.5
        ground["box_threshold"] = 0.3
    return {"tag": vlm, "caption": vlm, "describe": vlm, "ground": ground,
            # random scores: keep every object so score and filter see real work
            "filter": {"min_clip_score": None, "min_detector_score": None, "min_mask_agreement": None}}


def run_datagen(args) -> dict:
    import torch

    from datagen.measurement import load_measurement, run_record, save_run_record
    from datagen.models import preset
    from datagen.real_size import (
        FACTORIES,
        OTHER_FACTORIES,
        busy_summary,
        make_photos,
        real_stage_configs,
        register,
        run_stages,
    )

    config_path, tiny_preset = DATAGEN_PRESETS[args.preset]
    if args.tiny:
        specs = {k: dataclasses.replace(s, device=args.device) for k, s in preset(tiny_preset).items()}
    else:
        dtypes = {"vlm": torch.bfloat16, "clip": torch.bfloat16} if args.dtype == "bf16" else {
            "vlm": torch.float32, "clip": torch.float32}
        # sam3: Qwen3-VL-8B, SAM 3 (grounds and segments) and the real preset's CLIP ViT-L/14
        factories = None if args.preset == "real" else {
            **{n: f for n, f in FACTORIES.items() if f[0] == "clip"}, **OTHER_FACTORIES}
        specs = register(args.device, dtypes, factories)
    output = Path(args.output or tempfile.mkdtemp(prefix="real_size_"))
    inputs = make_photos(output / "photos")
    cfg, configs = real_stage_configs(specs, str(config_path), stage_overrides(args.max_new_tokens, args.max_objects, args.preset))
    t0 = time.perf_counter()
    batch, timings = run_stages(inputs, configs)
    wall = time.perf_counter() - t0
    failed = [(k, e) for k, s, e in zip(batch["key"], batch["status"], batch["error"], strict=True) if s != "ok"]
    record = run_record(busy_summary(str(output), timings, batch, wall), cfg)
    path = save_run_record(str(output), record)
    measured = load_measurement(str(output))  # what `datagen size --from` reads
    n = len(batch["key"])
    print(f"{args.preset} preset, {'tiny' if args.tiny else 'real-size'} models on {args.device}, {n} images, "
          f"{args.max_new_tokens} new tokens, <= {args.max_objects} objects per image; record {path}")
    print(f"{'stage':10s} {'s/image':>10s} {'load s':>10s}")
    for name, (rows, busy, load) in timings.items():
        print(f"{name:10s} {busy / rows:10.3f} {load:10.1f}")
    figures = {f"{name}_s_per_image": round(busy / rows, 4) for name, (rows, busy, _) in timings.items()}
    figures.update({"images": n, "failed": len(failed), "objects_per_image": record["objects_per_image"],
                    "record_stages": sorted(measured.rates)})
    if failed:
        print(f"failed rows: {failed}", file=sys.stderr)
    return {"benchmark": "real_size_datagen" if args.preset == "real" else f"real_size_datagen_{args.preset}",
            "figures": figures, "targets": {"failed": 0}}


MMDIT_PRESETS = {"sd35": ("sd3", "sd35_1024_8gpu.yaml"), "flux": ("flux", "flux1_1024_8gpu.yaml")}


def peak_memory_gb(device: str) -> float:
    """CUDA's allocator peak since the last reset on a GPU; the process's peak RSS (VmHWM) on CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 2**20


def run_mmdit_train(args) -> dict:
    import torch

    from training.model.mmdit.real import real_mmdit_transformer
    from training.model.mmdit.tiny import tiny_mmdit_components
    from training.trainer.config import load_train_config
    from training.trainer.real_size import flow_train_step

    backbone, preset = MMDIT_PRESETS[args.model]
    config = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "train" / preset, {
        "train.mixed_precision": args.dtype, "model.gradient_checkpointing": True})  # fmt: skip
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    t0 = time.perf_counter()
    if args.tiny:
        transformer = tiny_mmdit_components(f"tiny-{backbone}")["transformer"].to(args.device, dtype)
    else:
        transformer = real_mmdit_transformer(backbone, args.device, dtype)
    build_s = time.perf_counter() - t0
    size = 64 if args.tiny else args.size
    boxes = [[0.1875 * size, 0.2344 * size, 0.625 * size, 0.7031 * size], [0.75 * size, 0.28 * size, size, 0.52 * size]]
    texts = ["a red house with a brown door and two windows", "a green tree"]
    out = flow_train_step(config, transformer, boxes, texts, size, args.device, repeats=args.repeats)
    peak = peak_memory_gb(args.device)
    steps = ", ".join(f"{s:.2f}" for s in out["step_seconds"])
    print(f"{'tiny ' if args.tiny else ''}{args.model} adapter step at {size} px on {args.device} ({args.dtype} base, "
          f"gradient checkpointing): {out['base_params'] / 1e9:.2f} B base, {out['trainable_params'] / 1e6:.1f} M "
          f"trainable; built in {build_s:.1f} s")  # fmt: skip
    print(f"{'steps s':>10s} {'last s':>8s} {'peak GiB':>9s} {'loss':>8s} {'grad norm':>10s}")
    print(f"{steps:>10s} {out['seconds']:8.2f} {peak:9.2f} {out['loss']:8.4f} {out['grad_norm']:10.4f}")
    figures = {"step_seconds": round(out["seconds"], 3), "first_step_seconds": round(out["step_seconds"][0], 3),
               "peak_memory_gib": round(peak, 2), "build_seconds": round(build_s, 1), "loss": out["loss"],
               "grad_norm": out["grad_norm"], "trainable_params": out["trainable_params"],
               "base_params": out["base_params"], "size": size}  # fmt: skip
    return {"benchmark": f"real_size_train_{args.model}", "figures": figures, "targets": {}}


def run_train(args) -> dict:
    import numpy as np
    import torch

    from datagen.real_size import make_photos
    from training.model.tiny import tiny_sdxl_components
    from training.trainer.config import load_train_config
    from training.trainer.real_size import layout_batch, real_sdxl_components, train_step

    config = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "train" / "sdxl512_8gpu.yaml", {
        "train.caption_dropout": 0.0, "train.layout_dropout": 0.0, "train.mixed_precision": args.dtype,
        "model.gradient_checkpointing": True})  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="real_size_train_"))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    components = tiny_sdxl_components() if args.tiny else real_sdxl_components(folder / "tok", args.device, dtype)
    from PIL import Image

    image = np.asarray(Image.open(make_photos(folder)["uri"][0]).convert("RGB"))
    boxes = [[96, 120, 320, 360], [384, 144, 512, 264], [430, 240, 460, 384]]
    texts = ["a red house with a brown door", "a green tree", "a brown tree trunk"]
    size = 64 if args.tiny else args.size
    batch = layout_batch(image, boxes, texts, "a red house next to a tree under a blue sky", size)
    out = train_step(config, components, batch, args.device)
    print(f"{'tiny' if args.tiny else 'SDXL'} train step at {size} px on {args.device}: loss {out['loss']:.4f}, "
          f"grad norm {out['grad_norm']:.4f}, {out['trainable_params'] / 1e6:.1f} M trainable, {out['seconds']:.2f} s")
    figures = {"step_seconds": round(out["seconds"], 3), "loss": out["loss"], "grad_norm": out["grad_norm"],
               "trainable_params": out["trainable_params"], "size": size}
    return {"benchmark": "real_size_train", "figures": figures, "targets": {}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["datagen", "train"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="VLM/CLIP weights (datagen) or frozen SDXL weights (train)")
    parser.add_argument("--preset", choices=sorted(DATAGEN_PRESETS), default="real",
                        help="datagen: configs/datagen/<preset>.yaml's models (sam3: Qwen3-VL-8B + SAM 3 + CLIP)")
    parser.add_argument("--tiny", action="store_true", help="the tiny models instead (smoke test)")
    parser.add_argument("--output", help="datagen output folder for the run record (default: a temp folder)")
    parser.add_argument("--max-new-tokens", type=int, default=FIXED["max_new_tokens"])
    parser.add_argument("--max-objects", type=int, default=FIXED["max_objects"])
    parser.add_argument("--size", type=int, default=512, help="train: image side in px")
    parser.add_argument("--model", choices=["sdxl", *MMDIT_PRESETS], default="sdxl", help="train: the base")
    parser.add_argument("--repeats", type=int, default=1, help="train --model sd35|flux: steps (the last timed)")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: no CUDA device on this machine", file=sys.stderr)
        return 2
    if min(args.max_new_tokens, args.max_objects, args.repeats) < 1 or args.size < 64 or args.size % 64:
        print("error: --max-new-tokens, --max-objects and --repeats must be >= 1, --size a multiple of 64",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)
    if args.what == "datagen":
        result = run_datagen(args)
    else:
        result = run_train(args) if args.model == "sdxl" else run_mmdit_train(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

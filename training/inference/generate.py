"""Generate images from layouts: ``python -m training.generate --layouts FILE --out DIR`` (or ``--from-shards DS``).

Each layout (``training.layout.files``: JSON lines, one JSON object as the release's demos, or an array;
LayoutSAM(-Eval) parquet rows, ``training.layout.layoutsam``; or the samples of a dataset) becomes
``DIR/<id>.png``, its overlay with the layout drawn ``DIR/overlays/<id>.png``,
and a line of ``DIR/layouts.jsonl`` (the layouts with every default resolved, ready for
``python -m training.evaluate --images DIR --layouts DIR/layouts.jsonl``). With ``--refiner`` the refined
image is ``DIR/<id>.png`` and the unrefined one ``DIR/unrefined/<id>.png``; with ``--from-shards`` the
dataset's images, resized to the generated size, are ``DIR/reference/<id>.png`` (ground truth)::

    # the paper's setting on a GPU (configs/eval/paper.yaml)
    python -m training.generate --preset paper --adapter runs/x/adapter/adapter.safetensors \\
        --ema runs/x/adapter/adapter_ema.safetensors --layouts demos.jsonl --out gen/
    # a run with model.lora_rank also wrote runs/x/adapter/lora_ema.safetensors: add --lora with it
    # offline, random tiny SDXL (tests, demo)
    python -m training.generate --preset tiny --layouts demos.jsonl --out /tmp/gen
    # the release's inference_on_dataset.py: a dataset's layouts, 25 steps, CFG 4.5, SDXL refiner 0.3
    python -m training.generate --preset release --adapter A.safetensors --from-shards rccoco/ --out gen/

``--set key=value`` overrides one field of the preset's ``generate`` section (``--set guidance_scale=7.5``,
``--set rasterize=release`` for the release's box-to-cell rule, which ``--preset release`` sets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.inference.config import GenerateConfig
from training.inference.presets import (
    PRESET_DIR,
    add_preset_arguments,
    config_from_args,
    load_section,
    one_line,
    run_cli,
)
from training.layout.dataset import layouts_from_dataset, sample_fit
from training.layout.files import LayoutRecord, load_layouts, write_layouts
from training.layout.layoutsam import is_layoutsam, layoutsam_records

# torch, diffusers (through training.inference.pipeline) and matplotlib are imported by the functions that
# use them: diffusers' pipelines import bitsandbytes when it is installed (seconds, and a kernel warning),
# so `--help`, a config mistake and the CLIs that share this module's helpers answer without them.
if TYPE_CHECKING:
    import torch

    from training.inference.pipeline import LayoutPipeline

log = logging.getLogger(__name__)

__all__ = [
    "PRESET_DIR",
    "GenerateConfig",
    "add_preset_arguments",
    "config_from_args",
    "generate",
    "load_section",
    "main",
]

def _device(cfg: GenerateConfig) -> torch.device:
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r}: no CUDA device here (use --device cpu or auto)")
    return device


def load_pipeline(cfg: GenerateConfig) -> LayoutPipeline:
    """The layout pipeline of a config: tiny random SDXL, or the base model from the hub / a folder."""
    import torch

    from training.inference.pipeline import LayoutPipeline

    device = _device(cfg)
    limits = {"max_objects": cfg.max_objects, "max_slots": cfg.max_slots, "rasterize": cfg.rasterize}
    from training.model.mmdit.config import MMDIT_TINY_BASES
    from training.model.tiny import TINY_BASES, tiny_pipeline

    if cfg.base in TINY_BASES or cfg.base in MMDIT_TINY_BASES:
        if cfg.base in MMDIT_TINY_BASES:  # tiny SD3.5 / FLUX.1-dev (training.model.mmdit.tiny)
            from training.model.mmdit.tiny import tiny_mmdit_pipeline as tiny_pipeline
        sdxl = tiny_pipeline(cfg.base, cfg.tiny_seed).to(device)
        pipe = LayoutPipeline.from_sdxl(sdxl, cfg.adapter, cfg.ema, lora=cfg.lora, **limits)
    else:
        try:
            pipe = LayoutPipeline.from_pretrained(
                cfg.base,
                cfg.adapter,
                cfg.ema,
                lora=cfg.lora,
                vae=cfg.vae,
                dtype=getattr(torch, cfg.dtype),
                device=device,
                **limits,
            )
        except OSError as err:  # not a folder, not in the cache offline, no such hub id
            raise ValueError(
                f"generate.base {cfg.base!r} (vae {cfg.vae!r}): cannot load: {one_line(err)} (download it on a "
                "machine with internet, or give a local folder with --base / --set vae=...)"
            ) from None
    if cfg.scheduler == "ddim":
        from diffusers import DDIMScheduler

        pipe.pipe.scheduler = DDIMScheduler.from_config(pipe.pipe.scheduler.config)
    pipe.sdxl.set_progress_bar_config(disable=True)
    return pipe


def load_refiner(cfg: GenerateConfig) -> Any:
    """The SDXL img2img refiner of a config (diffusers ``StableDiffusionXLImg2ImgPipeline``), or None.

    ``"tiny"``: a random tiny SDXL (seed ``tiny_seed + 1``) as img2img, offline; otherwise a hub id or
    folder such as ``stabilityai/stable-diffusion-xl-refiner-1.0``.
    """
    if cfg.refiner is None:
        return None
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline

    if cfg.refiner == "tiny":
        from training.model.tiny import tiny_sdxl_components

        refiner = StableDiffusionXLImg2ImgPipeline(
            **tiny_sdxl_components(cfg.tiny_seed + 1), requires_aesthetics_score=False, add_watermarker=False
        )
    else:
        try:
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                cfg.refiner, torch_dtype=getattr(torch, cfg.dtype), add_watermarker=False
            )
        except OSError as err:
            raise ValueError(f"generate.refiner {cfg.refiner!r}: cannot load: {one_line(err)}") from None
    refiner = refiner.to(_device(cfg))
    refiner.set_progress_bar_config(disable=True)
    return refiner


def _save_references(dataset: str, records: list[LayoutRecord], folder: Path, cfg: GenerateConfig) -> None:
    """The dataset's images of ``records`` under the run's fit: the ground truth to score against."""
    from shards import iter_samples

    folder.mkdir(parents=True, exist_ok=True)
    by_id = {r.id: r for r in records}
    long_side = max(cfg.height, cfg.width)
    for sample in iter_samples(dataset):
        record = by_id.pop(sample.record.key, None)
        if record is not None:
            fit = sample_fit(sample.record.width, sample.record.height, long_side, cfg.dataset_fit)
            fit.image(sample.image()).save(folder / f"{record.id}.png")
        if not by_id:
            break


def _check_inputs(cfg: GenerateConfig, out: Path) -> None:
    """Weight files and the output folder, checked before any layout is read or model loads."""
    from training.model.init_adapter import check_adapter_file
    from training.model.release_checkpoint import check_weights_file

    _device(cfg)  # cuda asked for on a machine without it: refused before anything loads
    for name in ("adapter", "ema"):
        if getattr(cfg, name) is not None:
            check_adapter_file(getattr(cfg, name), f"--{name}")
    if cfg.lora is not None:
        check_weights_file(cfg.lora, "--lora")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")


def _guidance(cfg: GenerateConfig, pipe: LayoutPipeline) -> float:
    """The run's guidance scale: ``sd15_guidance_scale`` on an SD1.5 base when set, else ``guidance_scale``."""
    if pipe.backbone == "sd15" and cfg.sd15_guidance_scale is not None:
        return cfg.sd15_guidance_scale
    return cfg.guidance_scale


def generate(
    cfg: GenerateConfig,
    layouts: str | Path | None,
    out: str | Path,
    pipe: LayoutPipeline | None = None,
    *,
    from_shards: str | None = None,
    limit: int | None = None,
    skip_bad_layouts: bool = False,
    refiner: Any = None,
) -> dict:
    """Generate every layout of a file (or of a dataset's samples) into ``out``; return a summary (also
    written to ``out/generate.json``).

    Every layout is checked before any model loads. ``skip_bad_layouts``: a bad layout is left out and
    listed in the summary's ``skipped`` instead of stopping the run. ``refiner``: a loaded img2img
    pipeline (default: ``load_refiner(cfg)``).
    """
    import torch
    from tqdm import tqdm

    from shards.draw import draw_layout

    if (layouts is None) == (from_shards is None):
        raise ValueError("give a layouts file (--layouts) or a dataset (--from-shards), not both or neither")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    out = Path(out)
    _check_inputs(cfg, out)
    options = {
        "max_objects": cfg.max_objects,
        "lenient": cfg.lenient,
        "skip_bad": skip_bad_layouts,
    }
    if from_shards is not None:
        long_side = max(cfg.height, cfg.width)
        records, skipped = layouts_from_dataset(
            from_shards, long_side, cfg.seed, fit=cfg.dataset_fit, limit=limit, **options
        )
    else:
        load = layoutsam_records if is_layoutsam(layouts) else load_layouts  # LayoutSAM(-Eval) parquet
        records, skipped = load(layouts, cfg.height, cfg.width, cfg.seed, **options)
        records = records[:limit]
    pipe = pipe or load_pipeline(cfg)
    refiner = refiner or load_refiner(cfg)
    (out / "overlays").mkdir(parents=True, exist_ok=True)  # once the models loaded: nothing written before
    if from_shards is not None:
        _save_references(from_shards, records, out / "reference", cfg)
    if refiner is not None:
        (out / "unrefined").mkdir(exist_ok=True)
    guidance = _guidance(cfg, pipe)
    start = time.perf_counter()
    for record in tqdm(records, desc="generate", unit="image"):
        image = pipe(
            record.caption,
            boxes=record.boxes,
            labels=list(record.labels),
            negative_prompt=cfg.negative_prompt,
            height=record.height,
            width=record.width,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=guidance,
            scheduled_sampling_beta=cfg.scheduled_sampling_beta,
            attention_weight_scale=cfg.attention_weight_scale,
            generator=torch.Generator().manual_seed(record.seed),
        ).images[0]
        if refiner is not None:
            image.save(out / "unrefined" / f"{record.id}.png")
            # As the release: the caption only (no negative prompt, no layout), on the decoded image.
            image = refiner(
                prompt=record.caption,
                image=image,
                strength=cfg.refiner_strength,
                num_inference_steps=cfg.refiner_steps,
                generator=torch.Generator().manual_seed(record.seed),
            ).images[0]
        image.save(out / f"{record.id}.png")
        draw_layout(image, record.boxes, list(record.labels)).save(out / "overlays" / f"{record.id}.png")
    write_layouts(records, out / "layouts.jsonl")
    summary = {
        "images": len(records),
        "objects": int(sum(len(r.boxes) for r in records)),
        # objects of the sources left out (beyond max_objects, no area in the image or the fit), each logged
        "objects_dropped": int(sum(r.dropped_objects for r in records)),
        "skipped": [dataclasses.asdict(s) for s in skipped],
        "guidance_scale": guidance,
        "refined": refiner is not None,
        "source": str(from_shards or layouts),
        "reference": str(out / "reference") if from_shards is not None else None,
        "seconds": round(time.perf_counter() - start, 3),
        "out": str(out),
        "config": dataclasses.asdict(cfg),
    }
    if skipped:
        log.warning("%d bad layouts skipped (listed in %s)", len(skipped), out / "generate.json")
    if summary["objects_dropped"]:
        log.warning("%d objects left out of the layouts (counted in %s)", summary["objects_dropped"],
                    out / "generate.json")  # fmt: skip
    (out / "generate.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m training.generate", description=__doc__.split("\n")[0])
    p.add_argument(
        "--layouts",
        help="layouts file: JSON lines, one JSON object (the release's demos) or an array; boxes (or "
        "bboxes), labels, optional caption/id/seed/height/width; or LayoutSAM(-Eval) parquet (a .parquet "
        "file or a folder of them: one image per row, DIR/<file_name stem>.png)",
    )
    p.add_argument("--from-shards", metavar="DATASET", help="take layouts and captions from a dataset's samples")
    p.add_argument("--limit", type=int, help="generate only the first N layouts / samples")
    p.add_argument("--out", required=True, help="output folder")
    add_preset_arguments(p, "generate")
    p.add_argument("--base", help="SDXL, SD1.5, SD3/SD3.5 or FLUX.1 hub id or folder (or 'tiny', 'tiny-sd15', 'tiny-sd3', 'tiny-flux')")
    p.add_argument("--adapter", help="adapter weights (safetensors, ours or the release's)")
    p.add_argument("--ema", help="EMA adapter weights, loaded over --adapter")
    p.add_argument(
        "--lora", help="the trainer's LoRA file when it trained one (use lora_ema.safetensors with --ema)"
    )
    p.add_argument("--steps", type=int, dest="num_inference_steps", help="denoising steps")
    p.add_argument("--guidance-scale", type=float, dest="guidance_scale")
    p.add_argument(
        "--beta", type=float, dest="scheduled_sampling_beta", help="scheduled sampling beta in [0, 1]"
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument(
        "--lenient",
        action="store_true",
        default=None,
        help="the release's leniency: keep the first max_objects objects, clamp boxes to the image, "
        "accept a list of prompts (each change logged as a warning)",
    )
    p.add_argument(
        "--skip-bad-layouts",
        action="store_true",
        help="leave a bad layout out (listed in the summary) instead of stopping",
    )
    p.add_argument("--refiner", help="SDXL img2img refiner, e.g. stabilityai/stable-diffusion-xl-refiner-1.0")
    p.add_argument("--refiner-strength", type=float, dest="refiner_strength")
    p.add_argument("--refiner-steps", type=int, dest="refiner_steps")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; prints the summary JSON."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flags = (
        "base",
        "adapter",
        "ema",
        "lora",
        "num_inference_steps",
        "guidance_scale",
        "scheduled_sampling_beta",
        "seed",
        "device",
        "lenient",
        "refiner",
        "refiner_strength",
        "refiner_steps",
    )
    overrides = [f"{k}={json.dumps(getattr(args, k))}" for k in flags if getattr(args, k) is not None]
    if args.guidance_scale is not None:  # a guidance given by hand is the run's, whatever the backbone
        overrides.append("sd15_guidance_scale=null")
    return run_cli(
        lambda: generate(
            config_from_args(GenerateConfig, args, "generate", overrides),
            args.layouts,
            args.out,
            from_shards=args.from_shards,
            limit=args.limit,
            skip_bad_layouts=args.skip_bad_layouts,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())

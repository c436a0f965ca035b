"""Generate images from a layouts file: ``python -m training.generate --layouts FILE.jsonl --out DIR``.

Each layout line (``training.layouts``) becomes ``DIR/<id>.png``, its overlay with the layout drawn
``DIR/overlays/<id>.png``, and a line of ``DIR/layouts.jsonl`` (the layouts with every default resolved,
ready for ``python -m training.evaluate --images DIR --layouts DIR/layouts.jsonl``)::

    # the paper's setting on a GPU (configs/eval/paper.yaml)
    python -m training.generate --preset paper --adapter runs/x/adapter/adapter.safetensors \\
        --ema runs/x/adapter/adapter_ema.safetensors --layouts demos.jsonl --out gen/
    # a run with model.lora_rank also wrote runs/x/adapter/lora_ema.safetensors: add --lora with it
    # offline, random tiny SDXL (tests, demo)
    python -m training.generate --preset tiny --layouts demos.jsonl --out /tmp/gen

``--set key=value`` overrides one field of the preset's ``generate`` section (``--set guidance_scale=7.5``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from tqdm import tqdm

from shards.draw import draw_layout
from training.data_config import build_config
from training.layouts import read_layouts, validate_size, write_layouts
from training.layout_pipeline import LayoutPipeline
from training.train_config import ConfigError, apply_overrides

log = logging.getLogger(__name__)

__all__ = [
    "GenerateConfig",
    "PRESET_DIR",
    "add_preset_arguments",
    "config_from_args",
    "generate",
    "load_section",
    "main",
]

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "eval"


@dataclass(frozen=True)
class GenerateConfig:
    """What to load and how to sample (the ``generate`` section of a ``configs/eval`` preset)."""

    base: str = "hotshotco/SDXL-512"  # SDXL hub id / diffusers folder; "tiny": random tiny SDXL (offline)
    vae: str | None = None  # another VAE (hub id / folder), e.g. madebyollin/sdxl-vae-fp16-fix
    adapter: str | None = None  # adapter safetensors (ours) or the release's checkpoint; None: zero-init
    ema: str | None = None  # EMA adapter weights, loaded over ``adapter``
    lora: str | None = (
        None  # the trainer's LoRA file (lora.safetensors / lora_ema.safetensors), if it trained one
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    device: str = "auto"  # "auto": cuda when available, else cpu
    tiny_seed: int = 0  # seed of the random tiny models (base: tiny)
    height: int = 512  # output size when a layout line does not set it
    width: int = 512
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    scheduled_sampling_beta: float = 1.0  # layout active for the first ceil(beta * steps) steps
    attention_weight_scale: float = 1.0  # scale of the per-token region bias
    negative_prompt: str = ""  # encoded, as training encodes a dropped caption
    seed: int = 0  # image i uses seed + i unless its line sets "seed"
    max_objects: int = 30  # more objects in a layout is an error
    max_slots: int = 30  # region slots (the model's)

    def __post_init__(self) -> None:
        validate_size(self.height, self.width)
        if self.num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not 0.0 <= self.scheduled_sampling_beta <= 1.0:
            raise ConfigError(
                f"scheduled_sampling_beta must be in [0, 1], got {self.scheduled_sampling_beta}"
            )


def load_section(
    cls: type, preset: str | None, config: str | None, section: str, overrides: list[str]
) -> Any:
    """Build ``cls`` from one section of a preset (name in ``configs/eval`` or a YAML path) plus overrides."""
    if preset and config:
        raise ConfigError("give --preset or --config, not both")
    path = Path(config) if config else PRESET_DIR / f"{preset}.yaml" if preset else None
    d: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ConfigError(f"no preset file {path} (presets: {known})")
        d = (yaml.safe_load(path.read_text()) or {}).get(section) or {}
    try:
        return build_config(cls, apply_overrides(d, overrides), section)
    except ConfigError as err:
        raise ConfigError(f"{path or 'defaults'}: {err}") from None


def add_preset_arguments(parser: argparse.ArgumentParser, section: str) -> None:
    """``--preset``, ``--config``, ``--tiny`` and ``--set``: where a CLI's ``section`` config comes from."""
    parser.add_argument(
        "--preset", default=None, help="a configs/eval preset: paper, tiny (default: built-in)"
    )
    parser.add_argument("--config", default=None, help=f"a preset YAML file (its '{section}' section)")
    parser.add_argument(
        "--tiny", action="store_true", help="shorthand for --preset tiny (offline, random weights)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )


def config_from_args(cls: type, args: argparse.Namespace, section: str, overrides: list[str]) -> Any:
    """The ``section`` config of a CLI's preset arguments, with ``overrides`` then ``--set`` applied."""
    preset = "tiny" if args.tiny and not args.config else args.preset
    return load_section(cls, preset, args.config, section, overrides + args.set)


def run_cli(job: Callable[[], dict]) -> int:
    """Run a CLI's job: its summary JSON (without the config) on stdout and 0, or one error line and 2."""
    try:
        summary = job()
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    return 0


def load_pipeline(cfg: GenerateConfig) -> LayoutPipeline:
    """The layout pipeline of a config: tiny random SDXL, or the base model from the hub / a folder."""
    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    limits = {"max_objects": cfg.max_objects, "max_slots": cfg.max_slots}
    if cfg.base == "tiny":
        from training.tiny import tiny_sdxl_pipeline

        sdxl = tiny_sdxl_pipeline(cfg.tiny_seed).to(device)
        pipe = LayoutPipeline.from_sdxl(sdxl, cfg.adapter, cfg.ema, lora=cfg.lora, **limits)
    else:
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
    pipe.sdxl.set_progress_bar_config(disable=True)
    return pipe


def generate(
    cfg: GenerateConfig, layouts: str | Path, out: str | Path, pipe: LayoutPipeline | None = None
) -> dict:
    """Generate every layout of the file into ``out``; return a summary (also written to ``out/generate.json``)."""
    records = read_layouts(
        layouts, cfg.height, cfg.width, cfg.seed
    )  # all lines checked before any model loads
    out = Path(out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    pipe = pipe or load_pipeline(cfg)
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
            guidance_scale=cfg.guidance_scale,
            scheduled_sampling_beta=cfg.scheduled_sampling_beta,
            attention_weight_scale=cfg.attention_weight_scale,
            generator=torch.Generator().manual_seed(record.seed),
        ).images[0]
        image.save(out / f"{record.id}.png")
        draw_layout(image, record.boxes, list(record.labels)).save(out / "overlays" / f"{record.id}.png")
    write_layouts(records, out / "layouts.jsonl")
    summary = {
        "images": len(records),
        "objects": int(sum(len(r.boxes) for r in records)),
        "seconds": round(time.perf_counter() - start, 3),
        "out": str(out),
        "config": dataclasses.asdict(cfg),
    }
    (out / "generate.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m training.generate", description=__doc__.split("\n")[0])
    p.add_argument(
        "--layouts", required=True, help="JSON lines: boxes (or bboxes), labels, optional caption/id/seed"
    )
    p.add_argument("--out", required=True, help="output folder")
    add_preset_arguments(p, "generate")
    p.add_argument("--base", help="SDXL hub id or folder (or 'tiny')")
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
    )
    overrides = [f"{k}={json.dumps(getattr(args, k))}" for k in flags if getattr(args, k) is not None]
    return run_cli(
        lambda: generate(
            config_from_args(GenerateConfig, args, "generate", overrides), args.layouts, args.out
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())

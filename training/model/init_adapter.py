"""Initialise the regional adapter on a base SDXL or SD1.5 UNet and write its (zero-init) weights.

    python -m training.init_unet --base hotshotco/SDXL-512 --out runs/init
    python -m training.init_unet --base runwayml/stable-diffusion-v1-5 --out runs/init_sd15
    python -m training.init_unet --base tiny-sd15 --out /tmp/init     # offline: random tiny SD1.5 ("tiny": SDXL)
    python -m training.init_unet --base path/to/sdxl --out runs/init --adapter release_pn_and_fuser.pth
    python -m training.init_unet --base hotshotco/SDXL-512 --out runs/init --model-type casa

Loads the base UNet (a hub id or a local pipeline / UNet folder), attaches ``unet.position_net`` and a
``fuser`` on every transformer block (``training.model.adapter``), optionally loads adapter weights (ours, or the
public release's by key name), and writes ``OUT/regional_adapter.safetensors`` plus ``OUT/init_report.json``
with the missing and unexpected keys: base-UNet keys the checkpoint lacked or held in excess, and adapter
keys left at their fresh initialisation. A base checkpoint that already holds adapter keys (the release's
initialised UNet) has them loaded into the adapter instead of reported as unexpected. An ``--adapter`` file
must hold every adapter key of the model: one it lacks is an error naming it (never left fresh silently).
The base UNet itself is not copied: the trainer loads it from ``--base`` again (recorded in the report).
A release trainer checkpoint with a LoRA (its ``lora_rank``): the fusers' LoRA is merged into the adapter,
the base attention's is written as ``OUT/lora.safetensors`` (our diffusers LoRA file, for ``--lora``), and
the summary names it (``lora_file``; ``training.model.release_checkpoint``).
``--model-type`` (``ca`` or ``casa``, the release's ``--model_type``) is recorded in the adapter's metadata,
so every later load builds the same fuser; weights whose keys the model lacks are an error naming them.
The backbone (``sdxl`` or ``sd15``) is read from the base UNet's config (SDXL's ``text_time`` addition
embedding), never given by hand, and recorded beside the model type; the adapter's text width is the
UNet's ``cross_attention_dim`` (2048 for SDXL, 768 for SD1.5's CLIP-L).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import get_args, get_type_hints

from safetensors import SafetensorError

from training.model.config import ModelConfig

# torch, diffusers and the adapter modules are imported by the functions that use them: diffusers
# imports bitsandbytes when it is installed (seconds, and a kernel warning), so `--help` and argument
# mistakes answer without them.

log = logging.getLogger(__name__)

ADAPTER_FILE = "regional_adapter.safetensors"
LORA_FILE = "lora.safetensors"  # a release checkpoint's base-attention LoRA, converted
REPORT_FILE = "init_report.json"
# --model-type's choices: the trainer's model.model_type values (training.model.casa.MODEL_TYPES, which
# imports diffusers; tests/test_cli_help.py checks they agree).
MODEL_TYPE_CHOICES = get_args(get_type_hints(ModelConfig)["model_type"])


def _subfolder(base: str, subfolder: str | None) -> str | None:
    """``unet`` for a pipeline (hub id or folder with ``unet/``), none for a bare UNet folder."""
    if subfolder is not None:
        return subfolder or None
    path = Path(base)
    if path.is_dir() and not (path / "unet").is_dir() and (path / "config.json").is_file():
        return None
    return "unet"


def _adapter_tensors_in(folder: Path) -> dict:
    """Adapter tensors stored in a local UNet folder's safetensors files (the release's initialised UNet)."""
    from safetensors import safe_open

    from training.model.adapter import is_adapter_key

    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys() if is_adapter_key(k)})
    return found


def check_adapter_file(path: str | Path, what: str = "--adapter") -> Path:
    """An adapter file named by a user, checked before any model loads (``check_weights_file``, and for our
    safetensors the config in its metadata); every failure is a ValueError naming the file."""
    from training.model.release_checkpoint import check_weights_file

    path = check_weights_file(path, what)
    if path.suffix == ".safetensors":
        from training.model.adapter import adapter_config_of

        try:
            adapter_config_of(path)
        except (TypeError, ValueError, KeyError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ValueError(f"{what} {path}: its metadata does not describe an adapter ({reason})") from None
    return path


def initialise(
    base: str,
    out: str | Path,
    *,
    subfolder: str | None = None,
    adapter: str | None = None,
    model_type: str = "ca",
    ema: bool = False,
    blocks: str = "all",
) -> dict:
    """Load the base UNet, attach the adapter, load optional weights, write the adapter and a report.

    An SD3 / FLUX.1 base: :func:`initialise_mmdit` (``blocks``: where its fusers sit).
    """
    from diffusers import UNet2DConditionModel

    from training.model.adapter import (
        AdapterConfig,
        adapter_config_of,
        attach_regional_adapter,
        is_adapter_key,
        load_adapter,
        read_state_dict,
        save_adapter,
    )
    from training.model.lora import save_lora
    from training.model.mmdit.config import mmdit_backbone_of_base
    from training.model.tiny import TINY_BASES, tiny_components

    if mmdit_backbone_of_base(base) is not None:  # SD3 / FLUX.1: the adapter on the transformer
        return initialise_mmdit(base, out, adapter=adapter, model_type=model_type, blocks=blocks)
    config = AdapterConfig(model_type=model_type)  # validates model_type before any model loads
    if adapter:
        check_adapter_file(adapter)
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if base in TINY_BASES:
        sub, info = None, {}
        unet = tiny_components(base)["unet"]
    else:
        sub = _subfolder(base, subfolder)
        unet, info = UNet2DConditionModel.from_pretrained(base, subfolder=sub, output_loading_info=True)
    attach_regional_adapter(unet, config)
    backbone = unet.regional_adapter_config.backbone
    if adapter and Path(adapter).suffix == ".safetensors":
        made_for = adapter_config_of(adapter).backbone  # ours record it; the tensors alone are checked later
        if made_for not in (None, backbone):
            raise ValueError(f"{adapter}: a {made_for} adapter cannot load into the {backbone} base {base}")
    unexpected = list(info.get("unexpected_keys", []))
    adapter_unexpected = [k for k in unexpected if is_adapter_key(k)]
    folder = Path(base) / (sub or "")
    state = _adapter_tensors_in(folder) if adapter_unexpected and folder.is_dir() else {}
    if adapter:
        state.update(read_state_dict(adapter, ema=ema))
    # Not strict: adapter keys the sources lack stay fresh and are reported; keys the model lacks fail.
    report = load_adapter(unet, state, strict=False) if state else None
    fresh = report.missing if report else sorted(k for k in unet.state_dict() if is_adapter_key(k))
    if adapter and fresh:
        raise ValueError(
            f"{adapter}: {len(fresh)} adapter keys of the {model_type} model are missing from it, e.g. "
            f"{fresh[:3]} (a partial or damaged file; --model-type casa/ca must match the file)"
        )

    bad = [k for k, v in unet.state_dict().items() if is_adapter_key(k) and v.is_floating_point() and not v.isfinite().all()]
    if bad:  # every later load would make black images: refused before anything is written
        raise ValueError(f"{adapter or base}: {len(bad)} adapter tensors hold NaN or inf, e.g. {bad[:3]}")
    out = Path(out)
    save_adapter(unet, out / ADAPTER_FILE)
    lora_file = save_lora(unet.state_dict(), out / LORA_FILE) if report and report.lora else None
    summary = {
        "base": base,
        "subfolder": sub,
        "model_type": model_type,
        "backbone": backbone,
        "cross_attention_dim": unet.config.cross_attention_dim,
        "adapter_file": str(out / ADAPTER_FILE),
        "base_missing_keys": sorted(info.get("missing_keys", [])),
        "base_unexpected_keys": sorted(k for k in unexpected if not is_adapter_key(k)),
        "adapter_keys_loaded": report.loaded if report else 0,
        "adapter_keys_fresh": fresh,
        "adapter_unexpected_keys": report.unexpected if report else [],
        "lora_file": str(lora_file) if lora_file else None,
        "lora_keys_loaded": report.lora if report else 0,
    }
    (out / REPORT_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def initialise_mmdit(
    base: str, out: str | Path, *, adapter: str | None = None, model_type: str = "ca", blocks: str = "all"
) -> dict:
    """The adapter of an SD3 / FLUX.1 base, from its configs alone: the transformer is built on the meta device
    (no weight loads), the adapter beside it on the CPU; ``adapter``: weights to load (ours, of this backbone)."""
    import torch

    from training.model.adapter import adapter_config_of, adapter_parameters, save_adapter
    from training.model.mmdit.adapter import attach_mmdit_adapter, load_mmdit_adapter
    from training.model.mmdit.config import MMDIT_TINY_BASES, MMDiTAdapterConfig, mmdit_backbone_of_base
    from training.model.mmdit.encoding import region_text_dim, region_text_encoder

    backbone = mmdit_backbone_of_base(base)
    config = MMDiTAdapterConfig(backbone=backbone, model_type=model_type, blocks=blocks)
    if adapter:
        check_adapter_file(adapter)
        made = adapter_config_of(adapter) if Path(adapter).suffix == ".safetensors" else None
        if made is None or made.backbone != backbone:
            what = made.backbone if made is not None and made.backbone else "UNet (release)"
            raise ValueError(f"{adapter}: a {what} adapter does not fit the {backbone} base {base}")
        if made.model_type != model_type:
            raise ValueError(f"{adapter}: a {made.model_type} adapter, but --model-type is {model_type}")
        config = made
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if base in MMDIT_TINY_BASES:
        from training.model.mmdit.tiny import tiny_mmdit_components

        parts = tiny_mmdit_components(base)
        transformer = parts["transformer"]
        text_dim = region_text_encoder(parts, backbone, config.region_encoder, config.region_tokens).hidden_size
    else:
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        cls = SD3Transformer2DModel if backbone == "sd3" else FluxTransformer2DModel
        with torch.device("meta"):
            transformer = cls.from_config(cls.load_config(base, subfolder="transformer"))
        text_dim = region_text_dim(base, backbone, config.region_encoder)
    attach_mmdit_adapter(transformer, config, text_dim, device="cpu")
    report = load_mmdit_adapter(transformer, adapter) if adapter else None
    out = Path(out)
    save_adapter(transformer, out / ADAPTER_FILE)
    n_base = sum(p.numel() for n, p in transformer.named_parameters() if ".fuser." not in n and not n.startswith("position_net."))
    n_adapter = sum(p.numel() for _, p in adapter_parameters(transformer))
    summary = {
        "base": base,
        "model_type": config.model_type,
        "backbone": backbone,
        "blocks": config.blocks,
        "region_encoder": config.region_encoder,
        "text_dim": text_dim,
        "adapter_file": str(out / ADAPTER_FILE),
        "adapter_keys_loaded": report.loaded if report else 0,
        "adapter_parameters": n_adapter,
        "base_parameters": n_base,
    }
    (out / REPORT_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None, prog: str = "python -m training.init_adapter") -> int:
    """Command-line entry point (``python -m training.init_adapter``; ``training.init_unet`` is its alias)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Attach the regional adapter to a base SDXL or SD1.5 UNet, or an SD3 / FLUX.1 transformer, and save it.",
    )
    parser.add_argument(
        "--base",
        required=True,
        help="hub id or local folder of the base SDXL / SD1.5 (or its UNet) / SD3 / FLUX.1; tiny, tiny-sd15, tiny-sd3, "
        "tiny-flux: random, offline",
    )
    parser.add_argument("--out", required=True, help="output folder for the adapter and the report")
    parser.add_argument(
        "--subfolder", default=None, help="UNet subfolder (default: 'unet' unless --base is a UNet folder)"
    )
    parser.add_argument(
        "--adapter",
        default=None,
        help="adapter weights to load (safetensors, the release's .pth or its raw trainer checkpoint)",
    )
    parser.add_argument(
        "--model-type", choices=MODEL_TYPE_CHOICES, default="ca", help="ca: cross-attention; casa: + self-attention"
    )
    parser.add_argument("--ema", action="store_true", help="from a trainer checkpoint, load its EMA weights")
    parser.add_argument(
        "--blocks", choices=("all", "joint", "every_other"), default="all",
        help="SD3 / FLUX.1: fusers on every block, the joint (double-stream) ones, or every other",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = initialise(
            args.base,
            args.out,
            subfolder=args.subfolder,
            adapter=args.adapter,
            model_type=args.model_type,
            ema=args.ema,
            blocks=args.blocks,
        )
    except (ValueError, OSError, SafetensorError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, also for hub errors
        return 2
    counts = {k: (len(v) if isinstance(v, list) else v) for k, v in summary.items()}
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Regional attention on MM-DiT (docs/METHOD.md §10): the layer's forms, and an adapter step against the base's.

1. The layer at 64 x 64 tokens (1024 px) with 30 slots of 128 T5 tokens: the release's naive form (every token
   repeated once per slot, full attention per slot) against ours (packed: each token attends to its own
   region's live tokens), forward + backward, for a typical layout (8 overlapping objects, descriptions of
   16-20 tokens) and the worst one (30 regions, every token live). Host width ``--width`` (768 by default to
   keep the naive form's CPU time near ten seconds; SD3.5 Medium is 1536, FLUX.1 3072: both forms scale with
   the width squared, so the ratio holds), fuser heads of 64 at half the host's width.
2. The same layer forward only: naive, packed, and one block-sparse ``flex_attention`` call with a block mask
   from the region plan (``training.model.mmdit.flex``; compiled once, its compile time printed apart).
3. A training step at 64 x 64 tokens on each backbone's real depth and head size with fewer heads (SD3.5
   Medium: 24 joint blocks, 13 with the dual attention, heads of 64, 2 heads; FLUX.1: 19 double + 38
   single-stream blocks, heads of 128, 1 head), caption sequences of the real length (SD3: 77 + 256, FLUX:
   512) and width (4096): base step = the stock transformer, forward and backward to the input latents;
   adapter step = with a typical layout (fusers on every block, position net from 4096-wide T5 features
   encoded beforehand, as the region-text cache hands them over), forward, backward to the adapter, AdamW.

CPU, one thread, timed by this process's CPU time (robust to other load on a shared machine); each pair runs
alternately and the ratio is taken within pairs. About six minutes on one core.

    .venv/bin/python benchmarks/mmdit_attention.py [--width 768] [--skip-step]

Prints tables, then one JSON line ``{"benchmark": "mmdit_attention", "figures": {...}, "targets": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from regional_attention import typical_layout, worst_layout  # noqa: E402  (the UNet benchmark's layouts)
from train_step import paired  # noqa: E402

from training.layout.regions import RegionLayout  # noqa: E402
from training.model.attention import RegionalCrossAttention, level_plan  # noqa: E402
from training.model.encoding import slot_token_targets  # noqa: E402
from training.model.mmdit.adapter import LAYOUT_KEY, attach_mmdit_adapter  # noqa: E402
from training.model.mmdit.config import MMDiTAdapterConfig  # noqa: E402
from training.model.mmdit.encoding import image_ids, pack_latents  # noqa: E402
from training.model.mmdit.flex import flex_regional_cross_attention  # noqa: E402

SLOTS, TOKENS, HEAD = 30, 128, 64  # slots, T5 tokens per region text, fuser head size
GRID = 64  # 64 x 64 tokens: 1024 px
TARGETS = {"typical_speedup": 8.0, "worst_speedup": 4.0, "sd3_step_ratio": 1.3, "flux_step_ratio": 1.3}


def bias_of(layout: RegionLayout, segments: list[list[int]] | None) -> torch.Tensor:
    """(1, S, 128) attention bias: segments of the given token counts after position 0 (T5 has no BOS), or
    every token live (the worst case)."""
    bias = torch.zeros(1, SLOTS, TOKENS)
    if segments is None:
        return bias
    for s, lengths in enumerate(segments):
        spans, start = [], 0
        for n in lengths:
            spans.append((min(start, TOKENS), min(start + n, TOKENS)))
            start += n + 1  # one separator token
        _, b = slot_token_targets(spans, layout.boxes[s], layout.weights[s], n_tokens=TOKENS)
        bias[0, s] = torch.from_numpy(b)
    return bias


def grounding(layout: RegionLayout, segments, context: int, batch: int = 1, grad: bool = False) -> dict:
    """The position net's output as a fuser receives it (random features) for one layout."""
    masks = torch.zeros(batch, SLOTS)
    masks[:, : layout.n_slots] = 1
    return {
        "text_feat": torch.randn(batch, SLOTS, TOKENS, context, requires_grad=grad),
        "attention_bias": bias_of(layout, segments).expand(batch, -1, -1),
        "object_masks": masks,
        "region_map": torch.from_numpy(layout.region_map).long().expand(batch, -1, -1),
    }


def layer_figures(width: int, figures: dict) -> list[str]:
    """Parts 1 and 2: the layer's forms at 64 x 64 tokens."""
    rng = np.random.default_rng(0)
    # The UNet benchmark's layouts on a 512 px image's 64 x 64 latent grid: the same cells as 1024 px tokens.
    cases = {"typical": typical_layout(rng), "worst": worst_layout()}
    inner = width // 2
    torch.manual_seed(0)
    fuser = RegionalCrossAttention(width, inner, inner // HEAD, HEAD)
    for p in fuser.parameters():
        torch.nn.init.normal_(p, std=width**-0.5)
    rows = []
    for name, (layout, segments) in cases.items():
        x = torch.randn(1, GRID * GRID, width, requires_grad=True)
        objs = grounding(layout, segments, inner, grad=True)

        def step(form: str, x=x, objs=objs):
            def run():
                fuser.implementation = form
                out = fuser(x, objs)  # the plan memoized in objs: built once per forward in the model
                out.backward(torch.ones_like(out))

            return run

        naive_s, packed_s, ratio = paired(step("naive"), step("packed"), 1, torch.device("cpu"))
        figures[f"{name}_speedup"] = round(1 / ratio, 2)
        figures[f"{name}_naive_s"], figures[f"{name}_packed_s"] = round(naive_s, 3), round(packed_s, 3)
        keys = len(level_plan(dict(objs), (GRID, GRID)).live_index)

        def forward(form: str, x=x, objs=objs):
            def run():
                with torch.no_grad():
                    if form == "flex":
                        return flex_regional_cross_attention(fuser, x, objs)
                    fuser.implementation = form
                    return fuser(x, objs)

            return run

        start = time.perf_counter()
        with torch.no_grad():
            flex_out = forward("flex")()  # the first call compiles (per shape)
            packed_out = forward("packed")()
        compile_s = time.perf_counter() - start
        figures[f"{name}_flex_max_abs_diff"] = float((flex_out - packed_out).abs().max())
        naive_f, packed_f, r_packed = paired(forward("naive"), forward("packed"), 1, torch.device("cpu"))
        _, flex_f, r_flex = paired(forward("packed"), forward("flex"), 2, torch.device("cpu"))
        figures.update({
            f"{name}_fwd_naive_s": round(naive_f, 3), f"{name}_fwd_packed_s": round(packed_f, 3),
            f"{name}_fwd_flex_s": round(flex_f, 3), f"{name}_fwd_speedup_packed": round(1 / r_packed, 2),
            f"{name}_fwd_flex_over_packed": round(r_flex, 2), f"{name}_flex_compile_s": round(compile_s, 1),
        })  # fmt: skip
        rows.append(
            f"{name:<8} {layout.n_slots:>5} {keys:>5} {naive_s:>9.2f} {packed_s:>9.3f} {1 / ratio:>8.1f} "
            f"{naive_f:>9.2f} {packed_f:>9.3f} {flex_f:>9.3f} {compile_s:>9.1f}"
        )
    return rows


def transformer_of(backbone: str) -> torch.nn.Module:
    """Real depth and head size, fewer heads, random weights (see the module docstring)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if backbone == "sd3":
        return SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=2, joint_attention_dim=4096, caption_projection_dim=128, pooled_projection_dim=2048,
            pos_embed_max_size=96, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
        ).eval()  # fmt: skip
    return FluxTransformer2DModel(
        in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=1,
        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    ).eval()  # fmt: skip


def step_figures(backbone: str, figures: dict) -> str:
    """Part 3: the adapter step over the base step on one backbone."""
    transformer = transformer_of(backbone)
    transformer.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 2 * GRID, 2 * GRID, generator=g)
    if backbone == "sd3":
        kw = {"hidden_states": latents, "timestep": torch.tensor([700.0]),
              "encoder_hidden_states": torch.randn(1, 77 + 256, 4096, generator=g),
              "pooled_projections": torch.randn(1, 2048, generator=g)}  # fmt: skip
    else:
        kw = {"hidden_states": pack_latents(latents), "timestep": torch.tensor([0.7]),
              "guidance": torch.tensor([3.5]), "pooled_projections": torch.randn(1, 768, generator=g),
              "encoder_hidden_states": torch.randn(1, 512, 4096, generator=g), "txt_ids": torch.zeros(512, 3),
              "img_ids": image_ids(GRID, GRID)}  # fmt: skip
    layout, segments = typical_layout(np.random.default_rng(1))
    gligen = {
        "text_embeddings": torch.randn(1, SLOTS, TOKENS, 4096, generator=g),  # from the region-text cache
        "bbox_embeddings": torch.rand(1, SLOTS, TOKENS, 4),
        "object_masks": (torch.arange(SLOTS) < layout.n_slots).float()[None],
        "attention_bias": bias_of(layout, segments),
        "region_map": torch.from_numpy(layout.region_map).long()[None],
    }
    target = torch.randn_like(kw["hidden_states"])

    def base_step():
        x = kw["hidden_states"].clone().requires_grad_(True)
        out = transformer(**{**kw, "hidden_states": x}, return_dict=False)[0]
        torch.nn.functional.mse_loss(out, target).backward()

    attach_mmdit_adapter(transformer, MMDiTAdapterConfig(backbone=backbone), 4096)
    params = [p for n, p in transformer.named_parameters() if ".fuser." in n or n.startswith("position_net.")]
    for p in params:
        p.requires_grad_(True)
        torch.nn.init.normal_(p, std=0.02)  # non-zero outputs: a fresh adapter's backward is not the trained one's
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def adapter_step():
        out = transformer(**kw, joint_attention_kwargs={LAYOUT_KEY: gligen}, return_dict=False)[0]
        torch.nn.functional.mse_loss(out, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    base_s, adapter_s, ratio = paired(base_step, adapter_step, 1, torch.device("cpu"))
    n_adapter = sum(p.numel() for p in params)
    n_base = sum(p.numel() for p in transformer.parameters()) - n_adapter
    figures.update({f"{backbone}_step_ratio": round(ratio, 3), f"{backbone}_base_step_s": round(base_s, 2),
                    f"{backbone}_adapter_step_s": round(adapter_s, 2)})  # fmt: skip
    return f"{backbone:<6} {n_base / 1e6:>9.1f} {n_adapter / 1e6:>9.2f} {base_s:>9.2f} {adapter_s:>10.2f} {ratio:>7.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=768, help="host width of the layer benchmark (SD3.5M: 1536)")
    parser.add_argument("--skip-step", action="store_true", help="only the layer (parts 1 and 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    figures: dict = {"layer_width": args.width}
    rows = layer_figures(args.width, figures)
    print(f"\nlayer at {GRID}x{GRID} tokens, {SLOTS} slots of {TOKENS} tokens, width {args.width}, CPU fp32, 1 thread")
    print(f"{'layout':<8} {'slots':>5} {'keys':>5} {'naive s':>9} {'ours s':>9} {'speedup':>8} "
          f"{'fwd naive':>9} {'fwd ours':>9} {'fwd flex':>9} {'compile s':>9}")  # fmt: skip
    print("\n".join(rows))
    if not args.skip_step:
        print(f"\ntraining step at {GRID}x{GRID} tokens (real depth and head size, fewer heads), CPU fp32, 1 thread")
        print(f"{'model':<6} {'base M':>9} {'adapter M':>9} {'base s':>9} {'adapter s':>10} {'ratio':>7}")
        for backbone in ("sd3", "flux"):
            print(step_figures(backbone, figures))
    met = {k: (figures[k] >= v if k.endswith("speedup") else figures[k] <= v) for k, v in TARGETS.items() if k in figures}
    print(f"targets met: {met}")
    print(json.dumps({"benchmark": "mmdit_attention", "figures": figures, "targets": TARGETS}))


if __name__ == "__main__":
    main()

"""Training-step cost of the regional adapter vs the base UNet, and what the region-text cache saves.

Same frozen UNet weights, same batch; a typical layout per sample (8 overlapping objects with
15-word descriptions):

- base step: the UNet without the layout (the fusers are not called, so this is the stock UNet),
  forward and backward to the input latents (nothing of the base trains);
- adapter step: the UNet with the layout, forward, backward to the adapter weights, AdamW step;
- region-text encoding of the batch's layouts with an empty cache vs a warm one;
- the floor: the fusers' K and V projections of the live region tokens alone (forward and backward,
  the tokens each fuser needs at its level, its own weights). Every exact form of the model pays it, so
  ``kv_floor_over_base`` bounds how close ``adapter_over_base`` can get to 1 on this configuration;
- every layout dropped (layout dropout's empty layout on the whole batch): forward and backward with the
  model's zero path (every adapter weight gets an exact-zero gradient, so DDP and FSDP stay in step) vs
  without it (``zero_path_over_without``), and what the zero path adds alone: ``exact_zero`` of every fuser
  and the position net, forward and backward (``zero_path_alone_over_dropped_step``);
- DDP's two ways to survive such a batch, in a one-process gloo group, forward, backward and AdamW: the zero
  path with ``find_unused_parameters=False`` (what the trainer does) vs no zero path with
  ``find_unused_parameters=True`` (DDP walks the autograd graph after every forward to find the unused
  parameters), on the dropped batch and on the typical one (``find_unused_over_zero_path_*``).

Default (CPU, about a minute and a half): SDXL's real channel widths (320/640/1280, 64-dim heads) and 2048-wide
text embeddings, one transformer layer per block (``training.model.tiny.benchmark_unet``), a 32x32 latent,
text encoders of SDXL's widths (768 and 1280) with 2 layers each instead of 12 and 32; times are the
process's CPU time on one thread (robust to other processes' load on a shared machine).
``--sdxl`` (on a GPU): the real SDXL UNet and text-encoder shapes with random weights at 512 px
(64x64 latent), bf16 compute with fp32 adapter weights, and samples/s per GPU.

    .venv/bin/python benchmarks/train_step.py                     # CPU
    python benchmarks/train_step.py --sdxl --device cuda          # GPU, real SDXL size

Prints a table, then one JSON line ``{"benchmark": "train_step", "figures": {...}, "targets": {...}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import statistics
import time
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from training.layout.regions import empty_layout, reorganize_regions
from training.model import attention
from training.model.adapter import attach_regional_adapter, set_adapter_trainable
from training.model.attention import RegionalCrossAttention, level_grid, level_plan
from training.model.encoding import RegionTextEncoder, grounding_inputs
from training.model.tiny import benchmark_unet, tiny_tokenizers
from training.trainer.config import OptimConfig
from training.trainer.model_setup import make_optimizer
from training.trainer.step import diffusion_loss

WORDS = (
    "a small red wooden chair with a curved back standing near the left wall of a bright room "
    "under an old lamp beside green plants and a striped rug on the floor"
).split()


def typical_layouts(n: int, height: int, width: int, objects: int = 8, words: int = 15, seed: int = 0):
    """``n`` layouts of ``objects`` overlapping boxes, each with a ``words``-word description."""
    rng = np.random.default_rng(seed)
    layouts = []
    for _ in range(n):
        x1, y1 = rng.uniform(0, 0.6, objects) * width, rng.uniform(0, 0.6, objects) * height
        w, h = rng.uniform(0.2, 0.4, objects) * width, rng.uniform(0.2, 0.4, objects) * height
        boxes = np.stack([x1, y1, np.minimum(x1 + w, width), np.minimum(y1 + h, height)], axis=1)
        texts = [" ".join(rng.choice(WORDS, words)) for _ in range(objects)]
        layouts.append(reorganize_regions(boxes, texts, height, width))
    return layouts


def text_encoders(layers: tuple[int, int], vocab_size: int, eos: int, bos: int):
    """SDXL's two text encoders at their real widths (768, 1280), random, with the given layer counts."""

    def config(hidden, heads, n_layers, inter):
        return CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layers,
            num_attention_heads=heads, max_position_embeddings=77, projection_dim=1280,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, hidden_act="gelu",
        )  # fmt: skip

    torch.manual_seed(0)
    enc = CLIPTextModel(config(768, 12, layers[0], 3072)).eval()
    enc_2 = CLIPTextModelWithProjection(config(1280, 20, layers[1], 5120)).eval()
    return enc, enc_2


def sdxl_unet() -> UNet2DConditionModel:
    """The real SDXL UNet shape (2.6 B parameters, random): the benchmark UNet's config with 1/2/10 layers."""
    with torch.device("meta"):  # only its config is needed
        config = dict(benchmark_unet(0).config)
    return UNet2DConditionModel.from_config({**config, "transformer_layers_per_block": (1, 2, 10)}).eval()


def _clock(fn, device: torch.device) -> float:
    """Seconds of one call: wall time on a GPU; on CPU the process's CPU time (one thread, see main)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t
    t = time.process_time()
    fn()
    return time.process_time() - t


def paired(fa, fb, repeats: int, device: torch.device) -> tuple[float, float, float]:
    """Median seconds of ``fa`` and ``fb`` run alternately after a warm-up each, and the median of b / a.

    Alternating, and taking the ratio within each pair, keeps load from other processes on a shared
    machine from landing on one side of the comparison only.
    """
    return paired_clocks(lambda: _clock(fa, device), lambda: _clock(fb, device), repeats)


def paired_clocks(ta, tb, repeats: int) -> tuple[float, float, float]:
    """``paired`` for callables that return their own seconds (to leave a set-up out of the time)."""
    ta(), tb()
    sa, sb = [], []
    for _ in range(repeats):
        sa.append(ta())
        sb.append(tb())
    ratio = statistics.median(b / a for a, b in zip(sa, sb, strict=True))
    return statistics.median(sa), statistics.median(sb), ratio


def kv_projection_floor(unet, gligen: dict, inputs: dict, latent_hw: tuple[int, int]):
    """A function running every fuser's K and V projection of its level's live tokens, fwd + bwd.

    Live tokens per level come from the same index plans the packed fuser uses; each fuser's level is
    recorded by a forward hook during one forward of the adapter model.
    """
    levels: list[tuple[torch.nn.Module, int]] = []
    hooks = [
        module.register_forward_hook(lambda m, args, out: levels.append((m, args[0].shape[1])))
        for module in unet.modules()
        if isinstance(module, RegionalCrossAttention)
    ]
    with torch.no_grad():
        objs = unet.position_net(**gligen)
        unet(
            inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
            added_cond_kwargs=inputs["added_cond_kwargs"], cross_attention_kwargs={"gligen": gligen},
        )  # fmt: skip
    for hook in hooks:
        hook.remove()
    work, live = [], {}
    for fuser, n_pixels in levels:
        plan = level_plan(objs, level_grid(latent_hw, n_pixels))
        live[n_pixels] = len(plan.live_index)
        context = torch.randn(
            len(plan.live_index), objs["text_feat"].shape[-1], device=inputs["sample"].device
        )
        work.append((fuser.attn, context.to(fuser.attn.to_k.weight.dtype).requires_grad_(True)))

    def run():
        for attn, context in work:
            loss = F.linear(context, attn.to_k.weight).sum() + F.linear(context, attn.to_v.weight).sum()
            grads = torch.autograd.grad(loss, [context, attn.to_k.weight, attn.to_v.weight])
            del grads

    return run, live


@contextlib.contextmanager
def without_zero_path():
    """The model as it was before the zero path: a level without regions adds its null feature only."""
    with mock.patch.object(attention, "exact_zero", lambda module: None):
        yield


@contextlib.contextmanager
def one_process_group(device: torch.device):
    """A one-process process group on 127.0.0.1 (gloo on CPU, nccl on a GPU), for DDP's reducer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    # gloo opens its connections on the interface of the host's name unless told: keep them on loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdxl", action="store_true", help="real SDXL shapes at 512 px (for a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2, help="samples per step (the recipe's per-GPU batch)")
    parser.add_argument(
        "--latent", type=int, default=None, help="latent side (default 32 on CPU, 64 with --sdxl)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed pairs after a warm-up (median)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # CPU time of one thread: on a shared machine wall time follows the other processes' load, and
        # several threads' CPU time includes their spin-waits; one thread's CPU time is the work itself.
        torch.set_num_threads(1)
    latent = args.latent or (64 if args.sdxl else 32)
    dtype = torch.bfloat16 if args.sdxl else torch.float32
    torch.manual_seed(0)

    unet = (sdxl_unet() if args.sdxl else benchmark_unet(0)).to(device=device, dtype=dtype)
    attach_regional_adapter(unet)
    params = set_adapter_trainable(unet)
    for p in params:
        p.data = p.data.float()  # fp32 master weights, as the trainer
    unet.train()
    optimizer = make_optimizer(params, OptimConfig(lr=1e-5, weight_decay=1e-5))  # as the trainer
    n_base = sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in params)

    tok, tok_2 = tiny_tokenizers()
    vocab = tok.get_vocab()
    enc, enc_2 = text_encoders(
        (12, 32) if args.sdxl else (2, 2), len(vocab), tok.eos_token_id, tok.bos_token_id
    )
    encoder = RegionTextEncoder(
        (tok, tok_2), (enc.to(device, dtype), enc_2.to(device, dtype)), cache_size=4096
    )
    layouts = typical_layouts(args.batch, latent * 8, latent * 8)
    gligen = grounding_inputs(layouts, encoder, device=device, dtype=dtype)

    b = args.batch
    g = torch.Generator().manual_seed(0)
    base_inputs = {
        "sample": torch.randn(b, 4, latent, latent, generator=g).to(device, dtype),
        "timestep": torch.randint(0, 1000, (b,), generator=g).to(device),
        "encoder_hidden_states": torch.randn(b, 77, 2048, generator=g).to(device, dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(b, 1280, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[512, 512, 0, 0, 512, 512]] * b).to(device, dtype),
        },
        "target": torch.randn(b, 4, latent, latent, generator=g).to(device),
    }
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.sdxl else contextlib.nullcontext()

    def base_step():
        sample = base_inputs["sample"].detach().requires_grad_(True)
        with autocast:
            loss = diffusion_loss(unet, {**base_inputs, "sample": sample})
        loss.backward()
        assert sample.grad is not None and all(p.grad is None for p in params)

    def adapter_step():
        with autocast:
            loss = diffusion_loss(unet, {**base_inputs, "cross_attention_kwargs": {"gligen": gligen}})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    dropped = grounding_inputs(
        [empty_layout(latent * 8, latent * 8)] * b, encoder, device=device, dtype=dtype
    )  # every layout dropped: what layout dropout gives a whole batch

    def dropped_step():  # forward and backward only: without the zero path AdamW would skip weights
        with autocast:
            loss = diffusion_loss(unet, {**base_inputs, "cross_attention_kwargs": {"gligen": dropped}})
        loss.backward()
        assert all(p.grad is not None for p in params)
        optimizer.zero_grad(set_to_none=True)

    def dropped_step_without_zero_path():
        with without_zero_path(), autocast:
            loss = diffusion_loss(unet, {**base_inputs, "cross_attention_kwargs": {"gligen": dropped}})
        loss.backward()
        assert any(p.grad is None for p in params)
        optimizer.zero_grad(set_to_none=True)

    zeroed = [m for m in unet.modules() if isinstance(m, (RegionalCrossAttention, attention.PositionNet))]

    def zero_path_alone():  # the sums over the weights and their zero gradients, as a dropped step adds
        sum(attention.exact_zero(m) for m in zeroed).backward()
        optimizer.zero_grad(set_to_none=True)

    def ddp_step(gligen, find_unused: bool):
        """A DDP step's seconds: the zero path, or find_unused_parameters without it."""

        def timed() -> float:
            # A wrapper per call, left out of the time: two reducers on one module's parameters would both
            # take its gradient hooks. The previous call's wrapper (and its reducer's hooks) goes first.
            from torch.nn.parallel import DistributedDataParallel

            gc.collect()
            model = DistributedDataParallel(unet, find_unused_parameters=find_unused)
            inputs = {**base_inputs, "cross_attention_kwargs": {"gligen": gligen}}

            def run():
                with without_zero_path() if find_unused else contextlib.nullcontext(), autocast:
                    loss = diffusion_loss(model, inputs)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            return _clock(run, device)

        return timed

    def encode_uncached():
        encoder.clear_cache()
        grounding_inputs(layouts, encoder, device=device, dtype=dtype)

    def encode_cached():
        grounding_inputs(layouts, encoder, device=device, dtype=dtype)

    t_base, t_adapter, adapter_over_base = paired(base_step, adapter_step, args.repeats, device)
    t_without, t_zero, zero_over_without = paired(
        dropped_step_without_zero_path, dropped_step, args.repeats, device
    )
    _, t_zero_alone, zero_alone_over_dropped = paired(
        dropped_step_without_zero_path, zero_path_alone, args.repeats, device
    )
    with one_process_group(device):
        t_ddp_drop, t_find_drop, find_over_zero_drop = paired_clocks(
            ddp_step(dropped, False), ddp_step(dropped, True), args.repeats
        )
        t_ddp, t_find, find_over_zero = paired_clocks(
            ddp_step(gligen, False), ddp_step(gligen, True), args.repeats
        )
    t_uncached, t_cached, _ = paired(encode_uncached, encode_cached, args.repeats, device)
    kv_floor, live = kv_projection_floor(unet, gligen, base_inputs, (latent, latent))
    _, t_kv, kv_over_base = paired(base_step, kv_floor, args.repeats, device)
    texts = sum(layout.n_slots for layout in layouts)

    rows = [
        ("base step (fwd + bwd to input)", t_base),
        ("adapter step (fwd + bwd + AdamW)", t_adapter),
        (f"region texts, empty cache ({texts} texts)", t_uncached),
        ("region texts, warm cache", t_cached),
        (f"floor: fusers' K/V of live tokens ({'/'.join(map(str, live.values()))})", t_kv),
        ("layouts dropped, no zero path (fwd + bwd)", t_without),
        ("layouts dropped, zero path (fwd + bwd)", t_zero),
        ("the zero path alone (fwd + bwd)", t_zero_alone),
        ("DDP, layouts dropped: zero path", t_ddp_drop),
        ("DDP, layouts dropped: find_unused_parameters", t_find_drop),
        ("DDP, typical layouts: zero path", t_ddp),
        ("DDP, typical layouts: find_unused_parameters", t_find),
    ]
    shape = "SDXL" if args.sdxl else "SDXL widths, 1 layer/block"
    print(f"{shape}, latent {latent}x{latent}, batch {b}, {device.type}, {dtype}; base {n_base / 1e6:.0f} M "
          f"frozen params, adapter {sum(p.numel() for p in params) / 1e6:.1f} M trainable; "
          f"{sum(lay.n_slots for lay in layouts) / b:.1f} region slots per sample")  # fmt: skip
    clock = "wall ms" if device.type == "cuda" else "CPU ms, 1 thread"
    print(f"{'what':44s} {clock:>16s}")
    for name, t in rows:
        print(f"{name:44s} {1000 * t:16.1f}")
    figures = {
        "adapter_over_base": round(adapter_over_base, 3),
        "base_step_ms": round(1000 * t_base, 1),
        "adapter_step_ms": round(1000 * t_adapter, 1),
        "encode_uncached_ms": round(1000 * t_uncached, 1),
        "encode_cached_ms": round(1000 * t_cached, 1),
        "cache_speedup": round(t_uncached / t_cached, 1),
        "encode_uncached_over_adapter_step": round(t_uncached / t_adapter, 3),
        "adapter_samples_per_s": round(b / t_adapter, 3),
        "kv_floor_ms": round(1000 * t_kv, 1),
        "kv_floor_over_base": round(kv_over_base, 3),
        "zero_path_over_without": round(zero_over_without, 4),
        "zero_path_alone_ms": round(1000 * t_zero_alone, 1),
        "zero_path_alone_over_dropped_step": round(zero_alone_over_dropped, 4),
        "find_unused_over_zero_path_dropped": round(find_over_zero_drop, 4),
        "find_unused_over_zero_path_typical": round(find_over_zero, 4),
    }
    result = {"benchmark": "train_step", "figures": figures, "targets": {"adapter_over_base": 1.5}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

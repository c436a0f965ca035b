"""Regional attention: the release's naive form vs our packed one-pass form, one layer (ca and casa).

Forward + backward time, activation memory and FLOP count of one fuser at the shapes where SDXL at 512 px
has transformer blocks (32x32 latent with width 640, 16x16 with width 1280; 64-dim heads, 2048-dim
context, 30 slots of 77 tokens), for two layouts:

- typical: 8 overlapping objects with 15-word descriptions (about 18 CLIP tokens each);
- worst: 30 regions and every one of their 77 tokens live.

Each case runs the ``ca`` fuser (regional cross-attention) and the ``casa`` fuser (cross-attention, then
the regional self-attention over each region's union; rows ``casa_*``). The naive casa repeats the pixels
once per slot and runs full self-attention per slot; ours attends each region's pixels to its union's.

The FLOP ratio naive / packed (counted by ``torch.utils.flop_counter`` with the math attention kernel) is
the limit of the speedup; ``<case>_of_limit`` is the measured speedup over it. Activation memory is the
bytes of the distinct tensors saved for backward, inputs and parameters excluded (on a GPU, also the peak
allocated memory). Index plans are built once per UNet forward and shared by every block of a level, so
they are built outside the timed region (their cost is printed as ``plan ms``).

Run: ``.venv/bin/python benchmarks/regional_attention.py`` (CPU fp32, then GPU bf16 when CUDA is present).
The last line is one JSON object ``{"benchmark": "regional_attention", "figures": {...}, "targets": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from training.layout.regions import RegionLayout, reorganize_regions
from training.model.attention import RegionalCrossAttention, _build_plan, level_plan
from training.model.casa import RegionalCrossAndSelfAttention, _build_self_plan, self_plan
from training.model.encoding import N_TOKENS, slot_token_targets

IMAGE = 512
MAX_SLOTS = 30
CONTEXT_DIM = 2048
HEAD_DIM = 64
LEVELS = {"32x32": 640, "16x16": 1280}  # level -> channel width at SDXL 512 px
TARGETS = {
    "typical_32x32_speedup": 8.0,
    "worst_32x32_speedup": 4.0,
    "casa_typical_32x32_speedup": 4.0,
    "of_limit": 0.7,
    "act_over_input": 8.0,
}


def typical_layout(rng: np.random.Generator) -> tuple[RegionLayout, list[list[int]]]:
    """8 boxes with sides of 10-40 % of the image, each overlapping another; descriptions of 16-20 tokens."""
    while True:
        sizes = rng.uniform(0.1, 0.4, size=(8, 2)) * IMAGE
        corners = rng.uniform(0, 1, size=(8, 2)) * (IMAGE - sizes)
        boxes = np.concatenate([corners, corners + sizes], axis=1)
        overlap = (
            np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
            > np.maximum(boxes[:, None, :2], boxes[None, :, :2])
        ).all(-1)
        np.fill_diagonal(overlap, False)
        if overlap.any(axis=1).all():
            break
    layout = reorganize_regions(boxes, ["description"] * 8, IMAGE, IMAGE, rng=rng)
    token_counts = rng.integers(16, 21, size=8).tolist()
    return layout, [[token_counts[i] for i in ids] for ids in layout.object_ids]


def worst_layout() -> tuple[RegionLayout, None]:
    """30 disjoint tiles (6 x 5) covering the image: 30 regions, no background."""
    xs, ys = np.linspace(0, IMAGE, 7), np.linspace(0, IMAGE, 6)
    boxes = [[xs[c], ys[r], xs[c + 1], ys[r + 1]] for r in range(5) for c in range(6)]
    return reorganize_regions(np.array(boxes), ["d"] * 30, IMAGE, IMAGE), None


def attention_bias(layout: RegionLayout, segment_tokens: list[list[int]] | None) -> torch.Tensor:
    """(1, S, 77) bias: from synthetic token spans (typical) or 0 everywhere (every token live)."""
    bias = torch.zeros(1, MAX_SLOTS, N_TOKENS)
    if segment_tokens is None:
        return bias
    for s, lengths in enumerate(segment_tokens):
        spans, start = [], 1
        for n in lengths:  # segments separated by one separator token, truncated at EOS position 76
            spans.append((min(start, 76), min(start + n, 76)))
            start += n + 1
        _, b = slot_token_targets(spans, layout.boxes[s], layout.weights[s])
        bias[0, s] = torch.from_numpy(b)
    return bias


@dataclass
class Measure:
    """One form's figures on one case."""

    seconds: float
    flops: float
    act_bytes: int
    peak_bytes: int


def make_objs(layout: RegionLayout, bias: torch.Tensor, batch: int, device: str, dtype: torch.dtype) -> dict:
    """Fuser inputs as the position net would hand them over (random features, requiring grad)."""
    object_masks = torch.zeros(batch, MAX_SLOTS, device=device)
    object_masks[:, : layout.n_slots] = 1
    union = torch.zeros(batch, MAX_SLOTS, *layout.grid_size, dtype=torch.bool, device=device)
    union[:, : layout.n_slots] = torch.from_numpy(layout.union_masks).to(device)
    return {
        "text_feat": torch.randn(
            batch, MAX_SLOTS, N_TOKENS, CONTEXT_DIM, device=device, dtype=dtype, requires_grad=True
        ),
        "attention_bias": bias.expand(batch, -1, -1).to(device=device, dtype=dtype),
        "object_masks": object_masks,
        "region_map": torch.from_numpy(layout.region_map).long().to(device).expand(batch, -1, -1),
        "union_masks": union,
    }


def fresh(objs: dict, fuser: RegionalCrossAttention, grid: tuple[int, int]) -> dict:
    """A new objs dict with the packed form's plan built (as the UNet's first fuser of a level would)."""
    new = {k: v for k, v in objs.items() if not k.startswith("_")}
    if fuser.implementation == "packed":
        level_plan(new, grid)
        if isinstance(fuser, RegionalCrossAndSelfAttention):
            self_plan(new, grid)
    return new


def step(fuser: RegionalCrossAttention, x: torch.Tensor, objs: dict) -> None:
    """One forward + backward."""
    out = fuser(x, objs)
    out.backward(torch.ones_like(out))


def saved_bytes(fuser: RegionalCrossAttention, x: torch.Tensor, objs: dict) -> int:
    """Bytes of the distinct tensors autograd saves for backward, inputs and parameters excluded."""
    exclude = {t.untyped_storage().data_ptr() for t in [x, objs["text_feat"], *fuser.parameters()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fuser(x, objs)
    del out
    return sum(storages.values())


def measure(fuser: RegionalCrossAttention, x: torch.Tensor, objs: dict, grid, repeats: int) -> Measure:
    """Time, FLOPs and memory of forward + backward for the fuser's current implementation."""
    device = x.device.type
    clock, sync = _clock(device)
    step(fuser, x, fresh(objs, fuser, grid))  # warm-up
    times = []
    for _ in range(repeats):
        run_objs = fresh(objs, fuser, grid)
        sync()
        start = clock()
        step(fuser, x, run_objs)
        sync()
        times.append(clock() - start)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step(fuser, x, fresh(objs, fuser, grid))
    act = saved_bytes(fuser, x, fresh(objs, fuser, grid))
    peak = 0
    if device == "cuda":
        run_objs = fresh(objs, fuser, grid)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(fuser, x, run_objs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    return Measure(statistics.median(times), counter.get_total_flops(), act, peak)


def plan_ms(objs: dict, grid: tuple[int, int], device: str, casa: bool = False) -> float:
    """Milliseconds to build one level's plans (once per UNet forward and level)."""
    clock, sync = _clock(device)
    sync()
    start = clock()
    _build_plan(objs, grid)
    if casa:
        _build_self_plan(objs, grid)
    sync()
    return (clock() - start) * 1e3


def _clock(device: str):
    """Timer and synchronizer: CPU time of this thread on CPU (robust to other processes sharing the cores,
    with intra-op threads = 1), wall time on CUDA."""
    if device == "cuda":
        return time.perf_counter, torch.cuda.synchronize
    return time.thread_time, lambda: None


def run(device: str, dtype: torch.dtype, batch: int, repeats: int, prefix: str) -> tuple[list[str], dict]:
    """Measure every case on one device; return table rows and JSON figures."""
    rng = np.random.default_rng(0)
    layouts = {"typical": typical_layout(rng), "worst": worst_layout()}
    rows, figures = [], {}
    for model_type, fuser_class in (("", RegionalCrossAttention), ("casa_", RegionalCrossAndSelfAttention)):
        for level, dim in LEVELS.items():
            side = int(level.split("x")[0])
            grid = (side, side)
            torch.manual_seed(0)
            fuser = fuser_class(dim, CONTEXT_DIM, dim // HEAD_DIM, HEAD_DIM).to(device=device, dtype=dtype)
            for (
                p
            ) in fuser.parameters():  # non-zero output weights: a zero W_o would make the backward trivial
                torch.nn.init.normal_(p, std=dim**-0.5)
            x = torch.randn(batch, side * side, dim, device=device, dtype=dtype, requires_grad=True)
            for name, (layout, segments) in layouts.items():
                objs = make_objs(layout, attention_bias(layout, segments), batch, device, dtype)
                case = f"{prefix}{model_type}{name}_{level}"
                rows.append(_case(fuser, x, objs, grid, repeats, device, case, layout, figures))
    return rows, figures


def _case(fuser, x, objs, grid, repeats, device, case, layout, figures) -> str:
    """Measure one fuser on one layout and level: add its figures, return its table row."""
    result = {}
    for implementation in ("naive", "packed"):
        fuser.implementation = implementation
        result[implementation] = measure(fuser, x, objs, grid, repeats)
    naive, packed = result["naive"], result["packed"]
    speedup = naive.seconds / packed.seconds
    limit = naive.flops / packed.flops
    input_bytes = x.numel() * x.element_size() + objs["text_feat"].numel() * x.element_size()
    figures.update(
        {
            f"{case}_speedup": round(speedup, 2),
            f"{case}_flop_ratio": round(limit, 2),
            f"{case}_of_limit": round(speedup / limit, 3),
            f"{case}_memory_ratio": round(naive.act_bytes / packed.act_bytes, 2),
            f"{case}_naive_ms": round(naive.seconds * 1e3, 1),
            f"{case}_packed_ms": round(packed.seconds * 1e3, 1),
            f"{case}_packed_act_over_input": round(packed.act_bytes / input_bytes, 2),
            f"{case}_naive_act_over_input": round(naive.act_bytes / input_bytes, 2),
            f"{case}_plan_ms": round(
                plan_ms(objs, grid, device, isinstance(fuser, RegionalCrossAndSelfAttention)), 2
            ),
        }
    )
    if device == "cuda":
        figures[f"{case}_peak_memory_ratio"] = round(naive.peak_bytes / max(packed.peak_bytes, 1), 2)
    keys = len(level_plan(fresh(objs, fuser, grid), grid).live_index) // x.shape[0]
    return (
        f"{case:<27} {layout.n_slots:>5} {keys:>5} {naive.seconds * 1e3:>9.1f} {packed.seconds * 1e3:>9.1f} "
        f"{speedup:>7.2f} {limit:>7.2f} {speedup / limit:>6.2f} "
        f"{naive.act_bytes / 2**20:>9.1f} {packed.act_bytes / 2**20:>9.1f} "
        f"{naive.act_bytes / packed.act_bytes:>6.1f} {figures[f'{case}_plan_ms']:>7.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="samples per forward (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward runs (median)")
    args = parser.parse_args(argv)
    # One intra-op thread, timed by thread CPU time: ratios stay meaningful on a machine shared with others.
    torch.set_num_threads(1)

    runs = [("cpu", torch.float32, "")]
    if torch.cuda.is_available():
        runs.append(("cuda", torch.bfloat16, "gpu_"))
    header = (
        f"{'case':<27} {'slots':>5} {'keys':>5} {'naive ms':>9} {'ours ms':>9} {'speedup':>7} {'flop x':>7} {'of lim':>6} "
        f"{'naive MiB':>9} {'ours MiB':>9} {'mem x':>6} {'plan ms':>7}"
    )
    figures: dict = {}
    for device, dtype, prefix in runs:
        rows, figs = run(device, dtype, args.batch, args.repeats, prefix)
        figures.update(figs)
        print(
            f"\n{device} {str(dtype).removeprefix('torch.')}, batch {args.batch}, forward+backward of one layer"
        )
        print(header)
        print("\n".join(rows))
    ok = {
        "typical_32x32_speedup": figures["typical_32x32_speedup"] >= TARGETS["typical_32x32_speedup"],
        "worst_32x32_speedup": figures["worst_32x32_speedup"] >= TARGETS["worst_32x32_speedup"],
        "casa_typical_32x32_speedup": figures["casa_typical_32x32_speedup"]
        >= TARGETS["casa_typical_32x32_speedup"],
        "of_limit": all(v >= TARGETS["of_limit"] for k, v in figures.items() if k.endswith("_of_limit")),
        "act_over_input": all(
            v <= TARGETS["act_over_input"] for k, v in figures.items() if k.endswith("packed_act_over_input")
        ),
    }
    print(f"targets met: {ok}")
    print(json.dumps({"benchmark": "regional_attention", "figures": figures, "targets": TARGETS}))


if __name__ == "__main__":
    main()

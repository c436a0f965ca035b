"""Position net and regional cross-attention (docs/METHOD.md §3.5 and §4).

``PositionNet`` becomes ``unet.position_net``: diffusers' UNet calls it once per forward with the
``gligen`` dict (see ``training.model.encoding.grounding_inputs``) and hands its output, ``objs``, to every
``BasicTransformerBlock.fuser``. ``RegionalCrossAttention`` is that fuser: each pixel ``p`` of a block's
hidden states attends to the 77 position-net tokens of its own region ``r(p)``::

    out_p = x_p + W_o . Attn(W_q x_p, W_k c_r(p), W_v c_r(p); bias b_r(p))      (x_p + null if r(p) = -1)

Two implementations compute the same thing:

- ``"naive"``: the public release's form, kept as the reference: ``x`` repeated once per slot, full
  attention of every pixel over every slot (padded slots included), then masked and summed. Its cost and
  activation memory scale with pixels x slots.
- ``"packed"`` (default): one query projection, one output projection, and one attention call in which
  each pixel sees only its region's live tokens. Pixels are sorted by region and cut into tiles of ``Tq``
  pixels; each tile gathers its region's keys. Only live tokens (bias within ``DEAD_MARGIN`` of the slot's
  best) of slots that own pixels at this level are projected by ``W_k`` / ``W_v``: the others' softmax
  weight underflows to 0 (as long as attention scores stay far below the bias gap, ~900), so skipping
  them is exact. Cost and memory scale with pixels + slots x 77.

The index plans depend only on the layout and the level, so the first fuser of a level builds its plan
and stores it in ``objs`` for the other blocks of the same forward. ``benchmarks/regional_attention.py``
measures both forms.

Every trainable weight takes part in every backward. A level where no pixel has a region (the empty layout
of layout dropout, regions dropped by the caps) skips the attention, and a micro-batch whose layouts were
all dropped reaches no fuser's projections and no position-net weight: DDP and FSDP, whose collectives
expect one gradient per parameter per backward, would then go out of step across ranks (gloo: "Received
data size doesn't match expected size"). So in training (grad enabled) the skipped path multiplies its null
feature by ``1 + z``, where ``z`` (:func:`exact_zero`) is 0 times the sum of the fuser's and the position
net's weights: the output is bit-identical, and every weight gets an exact-zero gradient.

Rows are gathered with :func:`gather_rows`, whose backward adds repeated rows in a fixed order, so a
training step is bit-reproducible on CPU (``training/TRAINING.md``, "Exact resume").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import get_fourier_embeds_from_boundingbox
from torch import nn

__all__ = [
    "DEAD_MARGIN",
    "IMPLEMENTATIONS",
    "ZERO_KEY",
    "PositionNet",
    "RegionalCrossAttention",
    "exact_zero",
    "gather_rows",
    "level_grid",
]

IMPLEMENTATIONS = ("packed", "naive")
# A token whose bias is this far below its slot's best token has softmax weight < exp(-100) relative to
# it (unless its score is ~100 higher): treating it as absent is exact in fp32 and below. The encoder's
# dead tokens sit 999 below the segments.
DEAD_MARGIN = 100.0
_TILE_SIZES = (16, 32, 64, 128)
_PLAN_KEY = "_regional_plans"  # where fusers memoize index plans inside objs
ZERO_KEY = "_position_net_zero"  # the position net's exact_zero inside objs (training only)


def exact_zero(module: nn.Module) -> torch.Tensor | None:
    """0 that depends on every trainable parameter of ``module`` (an exact-zero gradient to each); None when
    no gradient is being recorded or nothing of ``module`` trains.

    0 x (a finite sum) is 0 and its gradient is 0 x 1 per element, so nothing changes numerically; a
    weight that is infinite or NaN makes it NaN, as it would make the step anyway.
    """
    if not torch.is_grad_enabled():
        return None
    terms = [p.sum() for p in module.parameters() if p.requires_grad]
    return sum(terms[1:], terms[0]) * 0.0 if terms else None


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` (rows of dim 0) with a backward that sums repeated rows in a fixed order.

    On CPU, indexing's backward (``index_put_`` with accumulate) adds repeated rows with parallel atomic adds
    once it has more than one thread and 32768 values, so the last bits of the sum change from run to run;
    ``index_select``'s backward (``index_add_``) adds them serially (and was faster here). On CUDA it is the
    other way round: ``index_put_`` sorts the indices (deterministic), ``index_add_`` uses atomics.
    """
    return t.index_select(0, index) if t.device.type == "cpu" else t[index]


class PositionNet(nn.Module):
    """GLIGEN-style per-token grounding features: ``MLP(concat(text, fourier(box)))``; padded slots use a null input."""

    def __init__(self, text_dim: int, out_dim: int, fourier_freqs: int = 8, hidden_dim: int = 512) -> None:
        super().__init__()
        self.fourier_freqs = fourier_freqs
        position_dim = fourier_freqs * 2 * 4  # sin and cos of each of x1, y1, x2, y2
        self.linears = nn.Sequential(
            nn.Linear(text_dim + position_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )
        self.null_text_feature = nn.Parameter(torch.zeros(text_dim + position_dim))

    def forward(
        self,
        text_embeddings: torch.Tensor,
        bbox_embeddings: torch.Tensor,
        object_masks: torch.Tensor,
        **objs: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Return ``objs`` plus ``text_feat`` (B, S, 77, out_dim) and ``object_masks``."""
        b, s, t, _ = text_embeddings.shape
        dtype = self.null_text_feature.dtype
        boxes = bbox_embeddings.reshape(b * s, t, 4).to(dtype)
        fourier = get_fourier_embeds_from_boundingbox(self.fourier_freqs, boxes).reshape(b, s, t, -1)
        feats = torch.cat([text_embeddings.to(dtype), fourier], dim=-1)
        flat_masks = object_masks.reshape(-1)
        if not bool(((flat_masks == 0) | (flat_masks == 1)).all()):  # soft masks: blend, as the release
            real = object_masks.to(dtype)[:, :, None, None]
            feats = feats * real + (1 - real) * self.null_text_feature
            return {**objs, "text_feat": self.linears(feats), "object_masks": object_masks}
        # Hard masks: the MLP runs on the live tokens of real slots only. Every other row gets the null
        # input's output, computed once: padded slots (most of the max_slots rows) by definition, and dead
        # tokens (bias DEAD_MARGIN below their slot's best, most of a slot's 77) because their softmax
        # weight is exactly 0 in every fuser, so no value of theirs reaches the output or a gradient.
        live = flat_masks.bool()[:, None].expand(b * s, t)
        bias = objs.get("attention_bias")
        if bias is not None:
            bias = bias.reshape(b * s, t)
            live = live & (bias >= bias.amax(dim=1, keepdim=True) - DEAD_MARGIN)
        live_index = live.reshape(-1).nonzero().squeeze(1)
        null = self.linears(self.null_text_feature)
        text_feat = null.expand(b * s * t, null.shape[-1])
        if len(live_index):
            live_feat = self.linears(feats.reshape(b * s * t, -1)[live_index])
            text_feat = text_feat.index_copy(0, live_index, live_feat)
        out = {**objs, "text_feat": text_feat.reshape(b, s, t, -1), "object_masks": object_masks}
        zero = exact_zero(self)  # for the fusers' skipped path: no fuser may attend to text_feat
        return out if zero is None else {**out, ZERO_KEY: zero}


def level_grid(latent_hw: tuple[int, int], n_pixels: int) -> tuple[int, int]:
    """Grid ``(h_l, w_l)`` of the UNet level holding ``n_pixels``, from the latent grid (never sqrt)."""
    h, w = latent_hw
    # SDXL downsamples with stride-2 convolutions of padding 1, which round odd sizes up.
    while h * w > n_pixels:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != n_pixels:
        raise ValueError(f"{n_pixels} pixels match no UNet level of the latent grid {tuple(latent_hw)}")
    return h, w


def _level_region_map(region_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Region map (B, h, w) resized to a level's grid with nearest sampling, flattened to (B, L)."""
    if tuple(region_map.shape[-2:]) != grid:
        region_map = F.interpolate(region_map[:, None].float(), size=grid, mode="nearest")[:, 0].long()
    return region_map.reshape(region_map.shape[0], -1)


@dataclass(frozen=True)
class _Plan:
    """Index plan of one UNet level: which tokens to project, and pixels sorted by slot in tiles.

    Integer tensors only (no autograd), so memoizing it across the blocks of a forward is safe under
    gradient checkpointing.
    """

    live_index: torch.Tensor  # (Nk,) flat index into (B * S * 77): live tokens of slots with pixels here
    key_table: torch.Tensor  # (B * S, width) row in the packed keys of each slot's k-th live token
    key_bias: torch.Tensor  # (B * S, width) that token's bias; -inf on padding
    tile: int  # pixels per tile
    tile_slot: torch.Tensor  # (n_tiles,) global slot b * S + s of each tile
    query_index: torch.Tensor  # (n_tiles * tile,) pixel (flat b * L + p) of each tile row; 0 on padding
    pixel_row: torch.Tensor  # (B * L,) tile row holding each pixel; 0 for dropped pixels
    dropped: torch.Tensor  # (B * L,) bool: the pixel's region was dropped by the caps


def _pick_tile(pixel_counts: list[int], width: int) -> int:
    """Tile size minimizing padded attention work plus the per-tile copies of the region's keys."""
    cost = {t: sum(-(-c // t) for c in pixel_counts) * (t + 8) * width for t in _TILE_SIZES}
    return min(cost, key=cost.get)


def _build_plan(objs: dict, grid: tuple[int, int]) -> _Plan:
    """Plan one level: live tokens of the slots present at this level, pixels sorted by slot into tiles."""
    bias, object_masks = objs["attention_bias"], objs["object_masks"]
    batch, n_slots, n_tokens = bias.shape
    region_map = _level_region_map(objs["region_map"], grid)
    n_pixels, device = region_map.shape[1], bias.device

    flat = region_map.reshape(-1)
    dropped = flat < 0
    batch_of = torch.arange(batch * n_pixels, device=device) // n_pixels
    global_slot = torch.where(dropped, batch * n_slots, batch_of * n_slots + flat)
    if int(flat.max()) >= n_slots:
        raise ValueError(f"region_map holds slot {int(flat.max())} but objs has {n_slots} slots")
    pixel_counts = torch.bincount(global_slot, minlength=batch * n_slots + 1)[:-1]
    real = object_masks.reshape(-1) > 0.5
    if bool(((pixel_counts > 0) & ~real).any()):
        raise ValueError("region_map points at a slot whose object_masks is 0 (a padded slot)")

    # Slots without a pixel at this level (small regions vanish at coarse levels) need no keys.
    slot_bias = bias.reshape(batch * n_slots, n_tokens)
    live = (pixel_counts > 0)[:, None] & (slot_bias >= slot_bias.amax(dim=1, keepdim=True) - DEAD_MARGIN)
    live_index = live.reshape(-1).nonzero().squeeze(1)
    key_slot = live_index // n_tokens
    key_counts = live.sum(dim=1)
    # A multiple of 8 keeps fused GPU attention kernels on their aligned paths.
    width = max(8, -(-int(key_counts.max()) // 8) * 8)
    key_rank = torch.arange(len(live_index), device=device) - (key_counts.cumsum(0) - key_counts)[key_slot]
    key_table = torch.zeros(batch * n_slots, width, dtype=torch.long, device=device)
    key_table[key_slot, key_rank] = torch.arange(len(live_index), device=device)
    key_bias = torch.full((batch * n_slots, width), -math.inf, dtype=bias.dtype, device=device)
    key_bias[key_slot, key_rank] = slot_bias.reshape(-1)[live_index]

    tile = _pick_tile([c for c in pixel_counts.tolist() if c], width)
    order = torch.argsort(global_slot, stable=True)[: int((~dropped).sum())]
    slot_sorted = global_slot[order]
    tiles_per_slot = (pixel_counts + tile - 1) // tile
    first_tile = tiles_per_slot.cumsum(0) - tiles_per_slot
    rank = torch.arange(len(order), device=device) - (pixel_counts.cumsum(0) - pixel_counts)[slot_sorted]
    row = (first_tile[slot_sorted] + rank // tile) * tile + rank % tile
    n_tiles = int(tiles_per_slot.sum())
    query_index = torch.zeros(n_tiles * tile, dtype=torch.long, device=device)
    query_index[row] = order
    pixel_row = torch.zeros(batch * n_pixels, dtype=torch.long, device=device)
    pixel_row[order] = row
    tile_slot = torch.repeat_interleave(torch.arange(batch * n_slots, device=device), tiles_per_slot)
    return _Plan(live_index, key_table, key_bias, tile, tile_slot, query_index, pixel_row, dropped)


def level_plan(objs: dict, grid: tuple[int, int]) -> _Plan:
    """The level's plan, built by the first fuser of a forward and memoized in ``objs`` for the others."""
    memo = objs.setdefault(_PLAN_KEY, {})
    if grid not in memo:
        with torch.no_grad():
            memo[grid] = _build_plan(objs, grid)
    return memo[grid]


class RegionalCrossAttention(nn.Module):
    """The fuser: each pixel attends to its own region's position-net tokens; zero-init output."""

    def __init__(
        self, query_dim: int, context_dim: int, heads: int, dim_head: int, implementation: str = "packed"
    ):
        super().__init__()
        # diffusers' Attention gives the release's parameter names (attn.to_q / to_k / to_v / to_out.0)
        # and, called as a module, the release's naive computation.
        self.attn = Attention(
            query_dim=query_dim, cross_attention_dim=context_dim, heads=heads, dim_head=dim_head
        )
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)
        self.null_text_feat = nn.Parameter(torch.zeros(query_dim))
        self.implementation = implementation

    @property
    def implementation(self) -> str:
        """``"packed"`` or ``"naive"``."""
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {value!r}")
        self._implementation = value

    def forward(self, hidden_states: torch.Tensor, objs: dict) -> torch.Tensor:
        """Add the regional cross-attention of ``hidden_states`` (B, L, dim) over ``objs["text_feat"]``."""
        grid = level_grid(tuple(objs["region_map"].shape[-2:]), hidden_states.shape[1])
        if self._implementation == "naive":
            return self._forward_naive(hidden_states, objs, grid)
        return self._forward_packed(hidden_states, objs, grid)

    def _null(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.null_text_feat.to(hidden_states.dtype)

    def _skipped_null(self, hidden_states: torch.Tensor, objs: dict) -> torch.Tensor:
        """The null feature of a level without regions; in training times ``1 + 0``, the 0 reaching every
        weight of this fuser (a ``casa`` fuser's self-attention included) and of the position net."""
        null, zero = self._null(hidden_states), exact_zero(self)
        if zero is None:
            return null
        if ZERO_KEY in objs:
            zero = zero + objs[ZERO_KEY]
        return null * (1 + zero)  # 1 + (+-0) is exactly 1: the same bits as null

    def _forward_naive(self, x: torch.Tensor, objs: dict, grid: tuple[int, int]) -> torch.Tensor:
        """The release's formulation: x repeated per slot, full attention per slot, masked sum."""
        batch, n_pixels, dim = x.shape
        feats = objs["text_feat"].to(x.dtype)
        n_slots, n_tokens = feats.shape[1], feats.shape[2]
        region_map = _level_region_map(objs["region_map"], grid)
        masks = (region_map[:, None, :] == torch.arange(n_slots, device=x.device)[None, :, None]).to(x.dtype)
        repeated = x[:, None].expand(batch, n_slots, n_pixels, dim).reshape(batch * n_slots, n_pixels, dim)
        bias = objs["attention_bias"].reshape(batch * n_slots, 1, n_tokens).to(x.dtype)
        per_slot = self.attn(repeated, feats.reshape(batch * n_slots, n_tokens, -1), attention_mask=bias)
        out = (per_slot.view(batch, n_slots, n_pixels, dim) * masks[..., None]).sum(dim=1)
        return x + out + (1 - masks.sum(dim=1))[..., None] * self._null(x)

    def _forward_packed(self, x: torch.Tensor, objs: dict, grid: tuple[int, int]) -> torch.Tensor:
        """One query projection, one attention over each pixel's own region, one output projection."""
        batch, n_pixels, dim = x.shape
        plan = level_plan(objs, grid)
        if not len(plan.tile_slot):  # no region at this level: the empty layout, or dropped by the caps
            return x + self._skipped_null(x, objs)
        attn = self.attn
        inner = attn.to_q.out_features
        heads, head_dim = attn.heads, inner // attn.heads
        n_tiles, width = len(plan.tile_slot), plan.key_table.shape[1]

        query = gather_rows(attn.to_q(x).reshape(batch * n_pixels, inner), plan.query_index)
        query = query.view(n_tiles, plan.tile, heads, head_dim).transpose(1, 2)
        # Gathered in every call (a copy ~1/dim of the projection's cost) rather than shared across blocks,
        # so each block's graph stays self-contained under gradient checkpointing.
        feats = objs["text_feat"]
        context = feats.reshape(-1, feats.shape[-1])[plan.live_index].to(x.dtype)
        key_rows = plan.key_table[plan.tile_slot].reshape(-1)
        key, value = (
            gather_rows(F.linear(context, w.weight, w.bias), key_rows)
            .view(n_tiles, width, heads, head_dim)
            .transpose(1, 2)
            for w in (attn.to_k, attn.to_v)
        )
        bias = plan.key_bias[plan.tile_slot].to(x.dtype)[:, None, None, :]

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = gather_rows(out.transpose(1, 2).reshape(n_tiles * plan.tile, inner), plan.pixel_row)
        out = attn.to_out[0](out).view(batch, n_pixels, dim)
        return x + torch.where(plan.dropped.view(batch, n_pixels, 1), self._null(x), out)

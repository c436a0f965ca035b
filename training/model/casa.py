"""The ``casa`` fuser: regional cross-attention, then regional self-attention (docs/METHOD.md §4.2).

After the regional cross-attention (residual added), each pixel of region ``r`` attends to the pixels of
``r``'s union mask (the OR of the boxes forming ``r``; the whole image for the background) through a
second diffusers ``Attention`` (``fuser.self_attn.*``, the release's key names, zero-initialised
``to_out``); each pixel keeps its own region's output, the residual is added. Pixels in no region (the
empty layout, regions dropped by the caps) get nothing from it, so the empty layout adds nothing.

Two forms compute the same thing:

- ``"naive"``: the release's form, kept as the reference: ``x`` repeated once per slot, full
  self-attention of every pixel with an additive mask outside the slot's union, then masked and summed.
- ``"packed"`` (default): per region, queries = its pixels, keys = its union's pixels, so the work is
  ``sum_r |r| x |union(r)|`` rather than ``slots x L x L``. Pixels are sorted by region into tiles; tiles
  of regions whose unions have similar sizes share one attention call (key widths rounded up to a power
  of two, so at most ~log2(L) calls and at most 2x key padding, masked with -inf).

In training the self-attention runs under gradient checkpointing (its activations scale with the
union sizes). The index plan depends only on the layout and the level, so the first fuser of a level
builds it and memoizes it in ``objs`` for the others, as the cross-attention's plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.model.attention import (
    RegionalCrossAttention,
    _level_region_map,
    _pick_tile,
    gather_rows,
    level_grid,
)

__all__ = ["MODEL_TYPES", "RegionalCrossAndSelfAttention"]

MODEL_TYPES = ("ca", "casa")  # the release's init_regional_unet.py --model_type values
_PLAN_KEY = "_regional_self_plans"
# The naive reference's additive mask outside a union, as the release's; exp(-1e3) is 0 in fp32.
_NAIVE_MASK = -1e3


@dataclass(frozen=True)
class _Bucket:
    """Tiles whose regions' unions round up to the same key width: one attention call."""

    tile: int
    query_index: torch.Tensor  # (n_tiles * tile,) flat pixel b * L + p of each tile row; 0 on padding
    valid_rows: torch.Tensor  # rows of query_index that are real pixels, in plan order
    key_index: torch.Tensor  # (n_tiles, width) flat pixel of each key; 0 on padding
    key_bias: torch.Tensor  # (n_tiles, width) 0 on real keys, -inf on padding


@dataclass(frozen=True)
class _SelfPlan:
    """Integer index tensors only (no autograd), safe to memoize across blocks and checkpointing."""

    buckets: tuple[_Bucket, ...]
    pixel_order: torch.Tensor  # (n_covered,) flat pixel of each output row, buckets concatenated
    covered: torch.Tensor  # (B * L,) bool: the pixel lies in a live region


def _level_union(union_masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Union masks (B, S, h, w) resized to a level's grid as the region map is, flattened to (B, S, L)."""
    if tuple(union_masks.shape[-2:]) != grid:
        union_masks = F.interpolate(union_masks.float(), size=grid, mode="nearest") > 0.5
    return union_masks.reshape(*union_masks.shape[:2], -1).bool()


def _build_self_plan(objs: dict, grid: tuple[int, int]) -> _SelfPlan:
    """Per live region: its pixels (queries) and its union's pixels (keys), grouped by key width."""
    region_map = _level_region_map(objs["region_map"], grid)
    batch, n_pixels = region_map.shape
    union = _level_union(objs["union_masks"], grid)
    n_slots, device = union.shape[1], region_map.device
    flat = region_map.reshape(-1)
    covered = flat >= 0
    global_slot = torch.where(
        covered, torch.arange(batch * n_pixels, device=device) // n_pixels * n_slots + flat, -1
    )
    order = torch.argsort(global_slot, stable=True)[int((~covered).sum()) :]
    counts = torch.bincount(global_slot[covered], minlength=batch * n_slots)
    starts = (counts.cumsum(0) - counts).tolist()

    groups: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for g, count in enumerate(counts.tolist()):
        if not count:
            continue
        b, s = divmod(g, n_slots)
        queries = order[starts[g] : starts[g] + count]
        # A region lies inside its union at every level (both resized by the same nearest sampling);
        # adding its own pixels keeps every query with a key even for inconsistent hand-made inputs.
        keys_mask = union[b, s].clone()
        keys_mask[queries - b * n_pixels] = True
        keys = keys_mask.nonzero().squeeze(1) + b * n_pixels
        width = max(16, 1 << math.ceil(math.log2(len(keys))))
        groups.setdefault(width, []).append((queries, keys))

    buckets, pixel_order = [], []
    for width, members in sorted(groups.items()):
        tile = _pick_tile([len(q) for q, _ in members], width)
        q_rows, valid, k_rows, k_bias, offset = [], [], [], [], 0
        for queries, keys in members:
            n_tiles = -(-len(queries) // tile)
            q_rows.append(F.pad(queries, (0, n_tiles * tile - len(queries))))
            valid.append(torch.arange(len(queries), device=device) + offset)
            offset += n_tiles * tile
            k_rows.append(F.pad(keys, (0, width - len(keys))).expand(n_tiles, width))
            bias = torch.zeros(width, device=device)
            bias[len(keys) :] = -math.inf
            k_bias.append(bias.expand(n_tiles, width))
            pixel_order.append(queries)
        buckets.append(
            _Bucket(tile, torch.cat(q_rows), torch.cat(valid), torch.cat(k_rows), torch.cat(k_bias))
        )
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return _SelfPlan(tuple(buckets), torch.cat(pixel_order) if pixel_order else empty, covered)


def self_plan(objs: dict, grid: tuple[int, int]) -> _SelfPlan:
    """The level's self-attention plan, memoized in ``objs`` for the other blocks of the forward."""
    memo = objs.setdefault(_PLAN_KEY, {})
    if grid not in memo:
        with torch.no_grad():
            memo[grid] = _build_self_plan(objs, grid)
    return memo[grid]


class RegionalCrossAndSelfAttention(RegionalCrossAttention):
    """The ``casa`` fuser: the regional cross-attention, then a zero-init regional self-attention."""

    def __init__(
        self, query_dim: int, context_dim: int, heads: int, dim_head: int, implementation: str = "packed"
    ):
        super().__init__(query_dim, context_dim, heads, dim_head, implementation)
        self.self_attn = Attention(query_dim=query_dim, heads=heads, dim_head=dim_head)
        nn.init.zeros_(self.self_attn.to_out[0].weight)
        nn.init.zeros_(self.self_attn.to_out[0].bias)

    def forward(self, hidden_states: torch.Tensor, objs: dict) -> torch.Tensor:
        """Cross-attention (residual added), then the regional self-attention (residual added)."""
        hidden_states = super().forward(hidden_states, objs)
        grid = level_grid(tuple(objs["region_map"].shape[-2:]), hidden_states.shape[1])
        if self.implementation == "naive":
            return hidden_states + self._self_naive(hidden_states, objs, grid)
        plan = self_plan(objs, grid)
        if not plan.buckets:
            # No pixel in a region at this level (the empty layout): nothing to add. The cross-attention
            # skipped its attention for the same reason, and its exact zero reached self_attn's weights.
            return hidden_states
        if self.training and torch.is_grad_enabled():
            return hidden_states + checkpoint(self._self_packed, hidden_states, plan, use_reentrant=False)
        return hidden_states + self._self_packed(hidden_states, plan)

    def _self_naive(self, x: torch.Tensor, objs: dict, grid: tuple[int, int]) -> torch.Tensor:
        """The release's form: every slot attends over all pixels, masked outside its union; masked sum."""
        batch, n_pixels, dim = x.shape
        union = _level_union(objs["union_masks"], grid)
        n_slots = union.shape[1]
        region_map = _level_region_map(objs["region_map"], grid)
        masks = (region_map[:, None, :] == torch.arange(n_slots, device=x.device)[None, :, None]).to(x.dtype)
        repeated = x[:, None].expand(batch, n_slots, n_pixels, dim).reshape(batch * n_slots, n_pixels, dim)
        bias = torch.where(union, 0.0, _NAIVE_MASK).to(x.dtype).reshape(batch * n_slots, 1, n_pixels)
        per_slot = self.self_attn(repeated, attention_mask=bias).view(batch, n_slots, n_pixels, dim)
        return (per_slot * masks[..., None]).sum(dim=1)

    def _self_packed(self, x: torch.Tensor, plan: _SelfPlan) -> torch.Tensor:
        """Per bucket one attention call of region tiles over their unions' pixels; zero outside regions."""
        batch, n_pixels, dim = x.shape
        attn = self.self_attn
        inner = attn.to_q.out_features
        heads, head_dim = attn.heads, inner // attn.heads
        flat = x.reshape(batch * n_pixels, dim)
        query, key, value = (w(flat) for w in (attn.to_q, attn.to_k, attn.to_v))
        rows = []
        for bucket in plan.buckets:
            n_tiles, width = bucket.key_index.shape
            q = (
                gather_rows(query, bucket.query_index)
                .view(n_tiles, bucket.tile, heads, head_dim)
                .transpose(1, 2)
            )
            k, v = (
                gather_rows(t, bucket.key_index.reshape(-1))
                .view(n_tiles, width, heads, head_dim)
                .transpose(1, 2)
                for t in (key, value)
            )
            bias = bucket.key_bias.to(x.dtype)[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            rows.append(out.transpose(1, 2).reshape(n_tiles * bucket.tile, inner)[bucket.valid_rows])
        gathered = torch.zeros(batch * n_pixels, inner, dtype=x.dtype, device=x.device)
        gathered = gathered.index_copy(0, plan.pixel_order, torch.cat(rows))
        out = attn.to_out[0](gathered)
        return torch.where(plan.covered[:, None], out, 0.0).view(batch, n_pixels, dim)

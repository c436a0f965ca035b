"""The regional cross-attention as one block-sparse ``flex_attention`` call (the GPU path; measured beside the
packed form in ``benchmarks/mmdit_attention.py``).

The same function as ``RegionalCrossAttention`` (docs/METHOD.md §4.1) on the token grid: the image tokens are
sorted by region (the packed form's plan), so each region's queries are contiguous; the keys are the live
region tokens of the slots present (the plan's ``live_index``), also grouped by slot. ``mask_mod`` lets a query
see the keys of its own slot only and ``score_mod`` adds their bias, so the block mask built from the region
plan is block-diagonal: the kernel skips every (query block, key block) pair of two different regions. A
token in no region (dropped by the caps, or the empty layout) sees nothing and gets the null feature.

Forward only on CPU (torch 2.14 has no CPU backward for flex attention); on GPUs the backward exists too. The
first call compiles (``torch.compile``; about half a minute on CPU), later calls with the same shapes reuse it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from training.model.attention import RegionalCrossAttention, _level_region_map, level_grid, level_plan

__all__ = ["flex_regional_cross_attention"]

_compiled = None


def _flex():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def flex_regional_cross_attention(fuser: RegionalCrossAttention, x: torch.Tensor, objs: dict) -> torch.Tensor:
    """``fuser(x, objs)`` (its ``ca`` part) through one block-sparse flex-attention call."""
    batch, n_tokens, dim = x.shape
    grid = level_grid(tuple(objs["region_map"].shape[-2:]), n_tokens)
    plan = level_plan(objs, grid)
    if not len(plan.tile_slot):
        return x + fuser._skipped_null(x, objs)  # every weight in every backward, as the packed form
    attn = fuser.attn
    inner = attn.to_q.out_features
    heads, head_dim = attn.heads, inner // attn.heads
    feats = objs["text_feat"]
    n_slots, n_text = feats.shape[1], feats.shape[2]

    # Keys: the live tokens of present slots, per sample, padded to the longest sample (slot -2: nobody's).
    key_slot = plan.live_index // n_text  # global slot b * S + s of each live token, grouped by slot
    key_batch = key_slot // n_slots
    counts = torch.bincount(key_batch, minlength=batch)
    width = max(128, -(-int(counts.max()) // 128) * 128)  # whole key blocks
    rank = torch.arange(len(key_slot), device=x.device) - (counts.cumsum(0) - counts)[key_batch]
    context = feats.reshape(-1, feats.shape[-1])[plan.live_index].to(x.dtype)
    kv = torch.zeros(2, batch, width, inner, dtype=x.dtype, device=x.device)
    kv[0, key_batch, rank] = attn.to_k(context)
    kv[1, key_batch, rank] = attn.to_v(context)
    slot_of_key = torch.full((batch, width), -2, dtype=torch.long, device=x.device)
    slot_of_key[key_batch, rank] = key_slot % n_slots
    bias_of_key = torch.zeros(batch, width, dtype=x.dtype, device=x.device)
    bias_of_key[key_batch, rank] = objs["attention_bias"].reshape(-1)[plan.live_index].to(x.dtype)

    # Queries sorted by region (stable): each region's tokens contiguous, the blocks of the mask dense.
    region = _level_region_map(objs["region_map"], grid)  # (B, L), -1: no region
    order = torch.argsort(torch.where(region < 0, n_slots, region), dim=1, stable=True)
    slot_of_query = torch.gather(region, 1, order)
    q = torch.gather(attn.to_q(x), 1, order[..., None].expand(-1, -1, inner))

    def mask_mod(b, h, q_idx, kv_idx):
        return slot_of_query[b, q_idx] == slot_of_key[b, kv_idx]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias_of_key[b, kv_idx]

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, heads, head_dim).transpose(1, 2)

    block_mask = create_block_mask(mask_mod, batch, None, n_tokens, width, device=x.device.type)
    out = _flex()(split(q), split(kv[0]), split(kv[1]), score_mod=score_mod, block_mask=block_mask)
    out = out.transpose(1, 2).reshape(batch, n_tokens, inner)
    out = torch.empty_like(out).scatter_(1, order[..., None].expand(-1, -1, inner), out)  # back to raster order
    out = F.linear(out, attn.to_out[0].weight, attn.to_out[0].bias)
    return x + torch.where(plan.dropped.view(batch, n_tokens, 1), fuser._null(x), out)

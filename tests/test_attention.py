"""Position net and regional cross-attention (§3.5, §4): one-pass == the release's naive form."""

import numpy as np
import pytest
import torch
from _model_fixtures import random_layout, random_objs
from diffusers.models.embeddings import get_fourier_embeds_from_boundingbox

from training.layout.regions import empty_layout, reorganize_regions
from training.model.attention import PositionNet, RegionalCrossAttention, level_grid

DIM, CONTEXT, HEADS = 32, 24, 4


def _fuser(seed: int = 0) -> RegionalCrossAttention:
    """A fuser with every weight random (a fresh one's zero output would hide any difference)."""
    torch.manual_seed(seed)
    fuser = RegionalCrossAttention(DIM, CONTEXT, HEADS, DIM // HEADS)
    for p in fuser.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return fuser


def _both(fuser, x, objs):
    """Outputs and gradients (wrt x, the position-net tokens and every weight) of both forms."""
    results = {}
    for implementation in ("naive", "packed"):
        fuser.implementation = implementation
        feats = objs["text_feat"].detach().requires_grad_(True)
        xi = x.detach().requires_grad_(True)
        out = fuser(xi, {**objs, "text_feat": feats})
        weight = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads = torch.autograd.grad(
            (out * weight).sum(), [xi, feats, *fuser.parameters()], materialize_grads=True
        )
        results[implementation] = (out, grads)
    return results["naive"], results["packed"]


def _assert_equivalent(fuser, x, objs):
    (out_n, grads_n), (out_p, grads_p) = _both(fuser, x, objs)
    torch.testing.assert_close(out_p, out_n, rtol=1e-5, atol=1e-5)
    for g_p, g_n in zip(grads_p, grads_n, strict=True):
        torch.testing.assert_close(g_p, g_n, rtol=1e-5, atol=1e-5 * max(1.0, float(g_n.abs().max())))


@pytest.mark.parametrize("seed", range(4))
def test_one_pass_equals_naive_on_random_layouts_at_every_level(seed):
    rng = np.random.default_rng(seed)
    height, width = 8 * int(rng.integers(4, 11)), 8 * int(rng.integers(4, 11))  # non-square, odd grids
    # max_slots=6 drops regions: their cells are -1 and get the null feature
    layouts = [random_layout(rng, int(rng.integers(0, 9)), height, width, max_slots=6) for _ in range(2)]
    objs = random_objs(layouts, max_slots=7, context_dim=CONTEXT, seed=seed)
    h, w = height // 8, width // 8
    fuser = _fuser(seed)
    for _ in range(3):
        x = torch.randn(2, h * w, DIM, generator=torch.Generator().manual_seed(h * w))
        _assert_equivalent(fuser, x, objs)
        h, w = -(-h // 2), -(-w // 2)


def test_one_pass_equals_naive_with_dropped_regions_and_empty_layout():
    rng = np.random.default_rng(5)
    dropped = random_layout(rng, 10, 64, 64, max_slots=3)
    assert (dropped.region_map == -1).any()
    layouts = [dropped, empty_layout(64, 64)]
    objs = random_objs(layouts, max_slots=4, context_dim=CONTEXT)
    x = torch.randn(2, 64, DIM)
    _assert_equivalent(_fuser(), x, objs)
    # dropped pixels get exactly x + null feature
    fuser = _fuser()
    out = fuser(x, objs)
    cells = torch.from_numpy(dropped.region_map.reshape(-1) == -1)
    torch.testing.assert_close(out[0, cells], x[0, cells] + fuser.null_text_feat)


def test_level_where_every_pixel_was_dropped():
    objs = random_objs([empty_layout(16, 16)], max_slots=2, context_dim=CONTEXT)
    objs["region_map"] = torch.full_like(objs["region_map"], -1)
    x = torch.randn(1, 4, DIM)
    _assert_equivalent(_fuser(), x, objs)
    fuser = _fuser()
    torch.testing.assert_close(fuser(x, objs), x + fuser.null_text_feat)


def test_fresh_fuser_is_the_identity():
    fuser = RegionalCrossAttention(DIM, CONTEXT, HEADS, DIM // HEADS)
    objs = random_objs(
        [random_layout(np.random.default_rng(0), 5, 32, 32, max_slots=3)], max_slots=3, context_dim=CONTEXT
    )
    x = torch.randn(1, 16, DIM)
    for implementation in ("naive", "packed"):
        fuser.implementation = implementation
        assert torch.equal(fuser(x, dict(objs)), x)


def test_dead_tokens_have_exactly_zero_weight():
    """Tokens outside every segment of a real slot carry NEG_BIAS: changing them changes nothing."""
    layout = random_layout(np.random.default_rng(1), 4, 32, 32)
    objs = random_objs([layout], max_slots=layout.n_slots, context_dim=CONTEXT)
    fuser = _fuser()
    fuser.implementation = "naive"
    x = torch.randn(1, 16, DIM)
    before = fuser(x, dict(objs))
    dead = (objs["attention_bias"] < -100)[..., None]
    noisy = objs["text_feat"] + dead * torch.randn_like(objs["text_feat"]) * 10
    assert torch.equal(fuser(x, {**objs, "text_feat": noisy}), before)


def test_background_slot_attends_normally_over_its_77_tokens():
    """Bias 0 on the background (ours) and the release's constant -1e3 give the same softmax."""
    background_only = reorganize_regions([[0, 0, 0, 0]], ["dot"], 32, 32)  # a zero-area box covers nothing
    assert background_only.n_slots == 1 and background_only.background_slot == 0
    objs = random_objs([background_only], max_slots=2, context_dim=CONTEXT)
    assert (objs["attention_bias"][0, 0] == 0).all()
    fuser = _fuser()
    x = torch.randn(1, 16, DIM)
    release = {**objs, "attention_bias": objs["attention_bias"] - 1e3 * objs["object_masks"][..., None]}
    for implementation in ("naive", "packed"):
        fuser.implementation = implementation
        torch.testing.assert_close(fuser(x, dict(objs)), fuser(x, dict(release)), rtol=1e-4, atol=1e-4)
    # and it equals plain (unbiased) cross-attention over the slot's 77 tokens
    plain = fuser.attn(x, objs["text_feat"][:, 0])
    torch.testing.assert_close(fuser(x, dict(objs)), x + plain, rtol=1e-5, atol=1e-5)


def test_region_map_pointing_at_a_padded_or_missing_slot_fails():
    objs = random_objs([empty_layout(16, 16)], max_slots=2, context_dim=CONTEXT)
    objs["region_map"] = torch.ones_like(objs["region_map"])
    with pytest.raises(ValueError, match="padded slot"):
        _fuser()(torch.randn(1, 4, DIM), dict(objs))
    objs["region_map"] = torch.full_like(objs["region_map"], 2)
    with pytest.raises(ValueError, match="holds slot 2 but objs has 2 slots"):
        _fuser()(torch.randn(1, 4, DIM), dict(objs))


def test_level_grid_comes_from_the_layout():
    assert level_grid((64, 64), 1024) == (32, 32)
    assert level_grid((64, 96), 64 * 96) == (64, 96)
    assert level_grid((5, 7), 12) == (3, 4)  # stride-2 convolutions round odd sizes up
    assert level_grid((5, 7), 4) == (2, 2)
    with pytest.raises(ValueError, match="no UNet level"):
        level_grid((64, 64), 1000)


def test_position_net_tokens_and_null_feature():
    torch.manual_seed(0)
    net = PositionNet(text_dim=16, out_dim=24, fourier_freqs=8, hidden_dim=32)
    torch.nn.init.normal_(net.null_text_feature)
    assert [type(m).__name__ for m in net.linears] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert net.linears[0].in_features == 16 + 64
    text = torch.randn(2, 3, 77, 16)
    boxes = torch.rand(2, 3, 77, 4)
    masks = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = net(
        text_embeddings=text, bbox_embeddings=boxes, object_masks=masks, region_map=torch.zeros(2, 4, 4)
    )
    assert out["text_feat"].shape == (2, 3, 77, 24) and "region_map" in out and out["object_masks"] is masks
    fourier = get_fourier_embeds_from_boundingbox(8, boxes[0, :1])
    torch.testing.assert_close(out["text_feat"][0, 0], net.linears(torch.cat([text[0, 0], fourier[0]], -1)))
    null = net.linears(net.null_text_feature)
    torch.testing.assert_close(out["text_feat"][0, 2], null.expand(77, -1))  # padded slot: the null input
    torch.testing.assert_close(out["text_feat"][1, 1], null.expand(77, -1))


def test_position_net_skips_dead_tokens_and_the_fusers_cannot_tell():
    """With the attention bias given, dead tokens (NEG_BIAS) get the null output instead of the MLP's;
    both fuser forms give the same outputs and gradients as with every token computed."""
    rng = np.random.default_rng(7)
    layouts = [random_layout(rng, 5, 48, 48, max_slots=6) for _ in range(2)]
    objs = random_objs(layouts, max_slots=7, context_dim=CONTEXT)
    bias = objs["attention_bias"]
    torch.manual_seed(0)
    net = PositionNet(text_dim=16, out_dim=CONTEXT, fourier_freqs=8, hidden_dim=32)
    text, boxes = torch.randn(2, 7, 77, 16), torch.rand(2, 7, 77, 4)
    inputs = dict(text_embeddings=text, bbox_embeddings=boxes, object_masks=objs["object_masks"])
    every = net(**inputs)["text_feat"]  # no bias given: every token of a real slot through the MLP
    live_only = net(**inputs, attention_bias=bias)["text_feat"]
    dead = (bias < bias.amax(dim=2, keepdim=True) - 100) & (objs["object_masks"][..., None] > 0)
    assert dead.any() and (~dead & (objs["object_masks"][..., None] > 0)).any()
    torch.testing.assert_close(live_only[~dead], every[~dead], rtol=0, atol=0)
    null = net.linears(net.null_text_feature)
    torch.testing.assert_close(live_only[dead], null.expand(int(dead.sum()), -1))
    fuser = _fuser(7)
    x = torch.randn(2, 36, DIM)
    for implementation in ("naive", "packed"):
        fuser.implementation = implementation
        outs = []
        for feats in (every, live_only):
            out = fuser(x, {**objs, "text_feat": feats})
            outs.append(
                (out, torch.autograd.grad(out.square().sum(), list(net.parameters()), retain_graph=True))
            )
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
        for g_live, g_every in zip(outs[1][1], outs[0][1], strict=True):
            torch.testing.assert_close(
                g_live, g_every, rtol=1e-5, atol=1e-6 * max(1.0, float(g_every.abs().max()))
            )


def test_bad_implementation_name_fails():
    with pytest.raises(ValueError, match="implementation"):
        RegionalCrossAttention(DIM, CONTEXT, HEADS, DIM // HEADS, implementation="flash")


def test_empty_layout_attends_nothing_every_pixel_gets_x_plus_null():
    """docs/METHOD.md §4.1: no live slot, every cell -1 -> exactly x + null_text_feat in both forms."""
    objs = random_objs([empty_layout(32, 32)], max_slots=3, context_dim=CONTEXT)
    assert (objs["object_masks"] == 0).all() and (objs["region_map"] == -1).all()
    fuser = _fuser()
    x = torch.randn(1, 16, DIM)
    for implementation in ("naive", "packed"):
        fuser.implementation = implementation
        assert torch.equal(fuser(x, dict(objs)), x + fuser.null_text_feat)

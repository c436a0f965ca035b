"""The casa fuser (docs/METHOD.md §4.2): packed == the release's naive form == a per-region reference,
identity when fresh, empty layout adds nothing, model type recorded and enforced, generation runs."""

import json

import numpy as np
import pytest
import torch
from _model_fixtures import random_layout, random_objs, region_encoder
from safetensors.torch import load_file

from training.inference.pipeline import LayoutPipeline
from training.layout.regions import empty_layout
from training.model import init_adapter as init_unet
from training.model.adapter import (
    AdapterConfig,
    adapter_config_of,
    adapter_parameters,
    attach_regional_adapter,
    load_adapter,
    save_adapter,
    set_adapter_trainable,
    transformer_blocks,
)
from training.model.attention import _level_region_map
from training.model.casa import RegionalCrossAndSelfAttention, _level_union
from training.model.encoding import grounding_inputs
from training.model.tiny import tiny_sdxl_pipeline, tiny_unet

DIM, CONTEXT, HEADS = 32, 24, 4
SIZE = 64


def _fuser(seed: int = 0) -> RegionalCrossAndSelfAttention:
    torch.manual_seed(seed)
    fuser = RegionalCrossAndSelfAttention(DIM, CONTEXT, HEADS, DIM // HEADS)
    for p in fuser.parameters():
        torch.nn.init.normal_(p, std=0.1)  # outputs of order 1: 1e-5 is then a relative bound too
    return fuser


def _objs(layouts, max_slots, seed=0):
    objs = random_objs(layouts, max_slots=max_slots, context_dim=CONTEXT, seed=seed)
    h, w = layouts[0].grid_size
    union = torch.zeros(len(layouts), max_slots, h, w, dtype=torch.bool)
    for b, layout in enumerate(layouts):
        union[b, : layout.n_slots] = torch.from_numpy(layout.union_masks)
    return {**objs, "union_masks": union}


def _run(fuser, implementation, x, objs):
    fuser.implementation = implementation
    feats = objs["text_feat"].detach().requires_grad_(True)
    xi = x.detach().requires_grad_(True)
    out = fuser(xi, {**objs, "text_feat": feats})
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    grads = torch.autograd.grad(
        (out * weight).sum(), [xi, feats, *fuser.parameters()], materialize_grads=True
    )
    return out, grads


def _assert_close(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    for g_a, g_b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(g_a, g_b, rtol=1e-5, atol=1e-5 * max(1.0, float(g_b.abs().max())))


@pytest.mark.parametrize("seed", range(3))
def test_packed_equals_the_naive_form_at_every_level_with_gradients(seed):
    rng = np.random.default_rng(seed)
    height, width = 8 * int(rng.integers(5, 12)), 8 * int(rng.integers(5, 12))
    layouts = [random_layout(rng, int(rng.integers(1, 9)), height, width, max_slots=6) for _ in range(2)]
    layouts.append(empty_layout(height, width))
    objs = _objs(layouts, max_slots=7, seed=seed)
    fuser = _fuser(seed)
    h, w = height // 8, width // 8
    for _ in range(3):
        x = torch.randn(3, h * w, DIM, generator=torch.Generator().manual_seed(h * w))
        _assert_close(_run(fuser, "packed", x, objs), _run(fuser, "naive", x, objs))
        h, w = -(-h // 2), -(-w // 2)


def test_self_attention_equals_a_per_pixel_reference():
    """Pixel p of region r: softmax over the pixels of union(r) only, computed one pixel at a time."""
    rng = np.random.default_rng(11)
    layout = random_layout(rng, 5, 48, 56, max_slots=4)
    assert (layout.region_map == -1).any()  # dropped regions: no self-attention term
    objs = _objs([layout], max_slots=4)
    fuser = _fuser(3)
    x = torch.randn(1, 42, DIM)
    cross = super(RegionalCrossAndSelfAttention, fuser).forward(x, dict(objs))
    attn = fuser.self_attn
    region = _level_region_map(objs["region_map"], (6, 7))[0]
    union = _level_union(objs["union_masks"], (6, 7))[0]
    q, k, v = attn.to_q(cross[0]), attn.to_k(cross[0]), attn.to_v(cross[0])
    head = DIM // HEADS
    expected = cross[0].clone()
    for p in range(42):
        if region[p] < 0:
            continue
        keys = union[region[p]].nonzero().squeeze(1)
        heads = []
        for i in range(HEADS):
            sl = slice(i * head, (i + 1) * head)
            scores = (k[keys, sl] @ q[p, sl]) / head**0.5
            heads.append(torch.softmax(scores, 0) @ v[keys, sl])
        expected[p] += attn.to_out[0](torch.cat(heads))
    for implementation in ("packed", "naive"):
        fuser.implementation = implementation
        torch.testing.assert_close(fuser(x, dict(objs))[0], expected, rtol=1e-5, atol=1e-5)


def test_empty_layout_adds_nothing_and_a_fresh_self_attention_is_the_identity():
    fuser = _fuser()
    objs = _objs([empty_layout(32, 32)], max_slots=3)
    x = torch.randn(1, 16, DIM)
    for implementation in ("packed", "naive"):
        fuser.implementation = implementation
        assert torch.equal(fuser(x, dict(objs)), x + fuser.null_text_feat)
    fresh = RegionalCrossAndSelfAttention(DIM, CONTEXT, HEADS, DIM // HEADS)
    layout = random_layout(np.random.default_rng(0), 4, 32, 32)
    objs = _objs([layout], max_slots=layout.n_slots)
    assert torch.equal(fresh(x, dict(objs)), x)


def test_checkpointed_training_gives_the_same_gradients():
    layout = random_layout(np.random.default_rng(2), 6, 40, 40)
    objs = _objs([layout], max_slots=layout.n_slots)
    x = torch.randn(1, 25, DIM)
    fuser = _fuser(1)
    eval_run = _run(fuser.eval(), "packed", x, objs)
    train_run = _run(fuser.train(), "packed", x, objs)
    _assert_close(train_run, eval_run)


def _unet_inputs(layouts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(layouts)
    return {
        "sample": torch.randn(n, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([10] * n),
        "encoder_hidden_states": torch.randn(n, 77, 64, generator=gen),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(n, 32, generator=gen),
            "time_ids": torch.randn(n, 6, generator=gen),
        },
        "cross_attention_kwargs": {"gligen": grounding_inputs(layouts, region_encoder(), max_slots=5)},
    }


def test_fresh_casa_adapter_leaves_the_unet_unchanged_and_trains_its_self_attention():
    layout = random_layout(np.random.default_rng(4), 5, SIZE, SIZE, max_slots=4)
    inputs = _unet_inputs([empty_layout(SIZE, SIZE), layout])
    unet = tiny_unet()
    base_inputs = {k: v for k, v in inputs.items() if k != "cross_attention_kwargs"}
    with torch.no_grad():
        base = unet(**base_inputs).sample
        attach_regional_adapter(unet, AdapterConfig(model_type="casa"))
        assert torch.equal(unet(**inputs).sample, base)
    names = {name for name, _ in adapter_parameters(unet)}
    assert len(names) == 7 + 11 * (6 + 5)  # position net + per fuser: attn, null, self_attn
    assert "down_blocks.1.attentions.0.transformer_blocks.1.fuser.self_attn.to_out.0.bias" in names
    set_adapter_trainable(unet)
    unet.train()
    with torch.no_grad():
        for _, p in adapter_parameters(unet):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def grads():
        unet.zero_grad(set_to_none=True)
        unet(**inputs).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    plain = grads()
    assert plain.keys() == names and all(
        float(g.abs().sum()) > 0 for n, g in plain.items() if "self_attn" in n
    )
    unet.enable_gradient_checkpointing()  # the UNet's checkpointing around the fuser's own
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_model_type_is_recorded_and_a_mismatched_file_is_an_error_naming_keys(tmp_path):
    casa = attach_regional_adapter(tiny_unet(), AdapterConfig(model_type="casa"))
    path = save_adapter(casa, tmp_path / "casa.safetensors")
    assert adapter_config_of(path).model_type == "casa"
    ca = attach_regional_adapter(tiny_unet())
    ca_path = save_adapter(ca, tmp_path / "ca.safetensors")
    assert adapter_config_of(ca_path).model_type == "ca"
    with pytest.raises(ValueError, match=r"casa adapter for a ca model.*55 unexpected keys \['down_blocks"):
        load_adapter(ca, path)
    with pytest.raises(ValueError, match=r"ca adapter for a casa model.*55 missing keys .*self_attn"):
        load_adapter(casa, ca_path)
    # The release's extracted file carries no metadata: its keys tell the model type.
    torch.save({f"unet.{k}": v for k, v in load_file(str(path)).items()}, tmp_path / "release.pth")
    assert adapter_config_of(tmp_path / "release.pth").model_type == "casa"
    assert load_adapter(casa, tmp_path / "release.pth").loaded == 7 + 11 * 11


def test_init_unet_model_type_and_errors(tmp_path, capsys):
    base = tmp_path / "sdxl"
    tiny_unet().save_pretrained(base / "unet")
    out = tmp_path / "init"
    assert init_unet.main(["--base", str(base), "--out", str(out), "--model-type", "casa"]) == 0
    report = json.loads((out / "init_report.json").read_text())
    assert report["model_type"] == "casa" and len(report["adapter_keys_fresh"]) == 7 + 11 * 11
    assert adapter_config_of(out / init_unet.ADAPTER_FILE).model_type == "casa"
    # a casa adapter into a ca model: one error line naming the keys, exit 2
    capsys.readouterr()
    code = init_unet.main(
        ["--base", str(base), "--out", str(tmp_path / "x"), "--adapter", str(out / init_unet.ADAPTER_FILE)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "fuser.self_attn.to_q" in err[0]
    assert init_unet.main(["--base", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "nope") in err and err.count("\n") == 1


def test_layout_pipeline_generates_with_casa(tmp_path):
    source = attach_regional_adapter(tiny_unet(), AdapterConfig(model_type="casa"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in adapter_parameters(source):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    path = save_adapter(source, tmp_path / "casa.safetensors")

    def generate(adapter):
        sdxl = tiny_sdxl_pipeline(0)
        sdxl.set_progress_bar_config(disable=True)
        pipe = LayoutPipeline.from_sdxl(sdxl, adapter)
        image = pipe("a beach", boxes=[[0, 0, 32, 40], [16, 8, 64, 64]], labels=["a red kite", "a dog"],
                     height=SIZE, width=SIZE, num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
        return pipe, image

    pipe, image = generate(path)
    assert all(
        isinstance(b.fuser, RegionalCrossAndSelfAttention) for _, b in transformer_blocks(pipe.sdxl.unet)
    )
    assert image.shape == (SIZE, SIZE, 3) and np.isfinite(image).all()
    # the self-attention acts: zeroing it changes the image
    zeroed = {
        k: (torch.zeros_like(v) if ".self_attn.to_out" in k else v) for k, v in load_file(str(path)).items()
    }
    with torch.no_grad():
        pipe.sdxl.unet.load_state_dict(zeroed, strict=False)
    sdxl_image = pipe("a beach", boxes=[[0, 0, 32, 40], [16, 8, 64, 64]], labels=["a red kite", "a dog"],
                      height=SIZE, width=SIZE, num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert np.abs(sdxl_image - image).max() > 1e-4

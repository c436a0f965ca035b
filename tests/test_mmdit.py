"""The regional adapter on MM-DiT (docs/METHOD.md §10): tiny SD3.5 and FLUX.1-dev built offline from the real
diffusers classes. Fresh adapter and empty layout are the base exactly; the token grid is the transformers'
token order; the fuser rewrites only the image tokens (the tail in FLUX's single-stream blocks); packed ==
naive; casa on both; adapter files of another backbone are one error naming both; real-size parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from safetensors.torch import save_file

from training.model.adapter import adapter_config_of, adapter_parameters, save_adapter, set_implementation
from training.model.encoding import grounding_inputs
from training.model.mmdit.adapter import (
    LAYOUT_KEY,
    attach_mmdit_adapter,
    fuser_sites,
    load_mmdit_adapter,
)
from training.model.mmdit.config import MMDiTAdapterConfig, mmdit_backbone_of_base
from training.model.mmdit.encoding import (
    empty_token_layout,
    image_ids,
    pack_latents,
    region_text_encoder,
    token_grid,
    token_layout,
)
from training.model.mmdit.tiny import tiny_mmdit_components

SIZE = 96  # 6 x 6 tokens (12 x 12 latent pixels): not square-friendly powers, boxes off the 16 px grid
BACKBONES = {"tiny-sd3": "sd3", "tiny-flux": "flux"}


@pytest.fixture(scope="module", params=list(BACKBONES))
def parts(request):
    components = tiny_mmdit_components(request.param)
    backbone = BACKBONES[request.param]
    encoder = region_text_encoder(components, backbone, "t5", 32)
    return backbone, components, encoder


def _inputs(backbone: str, height: int, width: int, seed: int = 0, batch: int = 1) -> dict:
    """Random transformer inputs at ``height x width`` pixels (latents 1/8, tokens 1/16)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, height // 8, width // 8, generator=g)
    text = torch.randn(batch, 7, 64, generator=g)
    if backbone == "sd3":
        return {"hidden_states": latents, "timestep": torch.full((batch,), 700.0), "encoder_hidden_states": text,
                "pooled_projections": torch.randn(batch, 64, generator=g), "return_dict": False}
    h, w = token_grid(height, width)
    return {"hidden_states": pack_latents(latents), "timestep": torch.full((batch,), 0.7),
            "guidance": torch.full((batch,), 3.5), "pooled_projections": torch.randn(batch, 32, generator=g),
            "encoder_hidden_states": text, "txt_ids": torch.zeros(7, 3), "img_ids": image_ids(h, w),
            "return_dict": False}


LAYOUT = ([[5, 3, 60, 50], [30, 20, 90, 95], [0, 70, 40, 96]],
          ["a red dog on the grass", "a small blue car; with a white roof", "a tall tree"])


def _fresh(backbone, components, encoder, **config):
    transformer = (SD3Transformer2DModel if backbone == "sd3" else FluxTransformer2DModel).from_config(
        components["transformer"].config)
    transformer.load_state_dict(components["transformer"].state_dict())
    return attach_mmdit_adapter(transformer.eval(), MMDiTAdapterConfig(backbone=backbone, **config), encoder.hidden_size)


def _randomize(transformer, std=0.2, seed=1):
    torch.manual_seed(seed)
    for _, p in adapter_parameters(transformer):
        torch.nn.init.normal_(p, std=std)


@pytest.mark.parametrize("model_type", ["ca", "casa"])
def test_fresh_adapter_and_empty_layout_are_the_base_exactly(parts, model_type):
    backbone, components, encoder = parts
    base = components["transformer"]
    kw = _inputs(backbone, SIZE, SIZE, batch=2)
    gligen = grounding_inputs([token_layout(*LAYOUT, SIZE, SIZE), empty_token_layout(SIZE, SIZE)], encoder, max_slots=8)
    with torch.no_grad():
        expected = base(**kw)[0]
        model = _fresh(backbone, components, encoder, model_type=model_type)
        assert torch.equal(model(**kw)[0], expected)
        assert torch.equal(model(**kw, joint_attention_kwargs={LAYOUT_KEY: gligen})[0], expected)
        _randomize(model)
        for name, p in model.named_parameters():  # every weight but the null features: the empty layout
            if "null_text_feat" in name:  # (no region anywhere) must still be the base exactly
                p.zero_()
        empty = grounding_inputs([empty_token_layout(SIZE, SIZE)] * 2, encoder, max_slots=8)
        assert torch.equal(model(**kw, joint_attention_kwargs={LAYOUT_KEY: empty})[0], expected)
        changed = model(**kw, joint_attention_kwargs={LAYOUT_KEY: gligen})[0]
    assert (changed[0] - expected[0]).abs().max() > 1e-3  # the layout acts on sample 0 ...
    n_blocks = len(fuser_sites(model, "all"))
    assert len([m for m in model.modules() if hasattr(m, "fuser")]) == n_blocks


def test_fusers_sit_where_the_config_says(parts):
    backbone, components, encoder = parts
    model = _fresh(backbone, components, encoder, blocks="every_other")
    names = [n for n, _ in fuser_sites(model, "every_other")]
    assert names == {"sd3": ["transformer_blocks.0"], "flux": ["transformer_blocks.0", "single_transformer_blocks.0"]}[backbone]
    assert {k.split(".fuser.")[0] for k, _ in adapter_parameters(model) if ".fuser." in k} == set(names)
    joint = _fresh(backbone, components, encoder, blocks="joint")
    assert [n for n, _ in fuser_sites(joint, "joint")] == ["transformer_blocks.0", "transformer_blocks.1"]


def test_the_fuser_rewrites_only_the_image_tokens_the_tail_in_single_stream_blocks(parts):
    """Every fuser fresh (exact identity) but one: the last SD3 block (context_pre_only) or FLUX's first
    single-stream block. Its attention output keeps the text part and carries fuser(image part)."""
    backbone, components, encoder = parts
    model = _fresh(backbone, components, encoder)
    target = "transformer_blocks.1" if backbone == "sd3" else "single_transformer_blocks.0"
    block = dict(fuser_sites(model, "all"))[target]
    torch.manual_seed(3)
    for p in block.fuser.parameters():
        torch.nn.init.normal_(p, std=0.2)
    seen = []
    block.attn.register_forward_hook(lambda m, a, out: seen.append(out))
    kw = _inputs(backbone, SIZE, SIZE)
    gligen = grounding_inputs([token_layout(*LAYOUT, SIZE, SIZE)], encoder, max_slots=8)
    with torch.no_grad():
        plain_out = model(**kw)[0]
        fused_out = model(**kw, joint_attention_kwargs={LAYOUT_KEY: gligen})[0]
        objs = model.position_net(**gligen)
    plain, fused = seen  # our hook runs after the adapter's: it sees the fused output
    if backbone == "sd3":  # (image, text) of the joint attention: text untouched, image fused
        assert torch.equal(plain[1], fused[1])
        plain, fused = plain[0], fused[0]
        split = 0
    else:  # one [text; image] sequence: the image tokens are its tail
        split = plain.shape[1] - int(np.prod(token_grid(SIZE, SIZE)))
        assert split == 7 and torch.equal(plain[:, :split], fused[:, :split])
    with torch.no_grad():
        expected = block.fuser(plain[:, split:], objs)
    torch.testing.assert_close(fused[:, split:], expected, rtol=0, atol=0)
    assert not torch.equal(plain_out, fused_out)


def test_packed_equals_naive_and_casa_on_both(parts):
    backbone, components, encoder = parts
    model = _fresh(backbone, components, encoder, model_type="casa")
    _randomize(model, std=0.05)
    kw = _inputs(backbone, SIZE, 128, batch=2)  # not square: 6 x 8 tokens
    layouts = [token_layout(*LAYOUT, SIZE, 128), token_layout(LAYOUT[0][:1], LAYOUT[1][:1], SIZE, 128)]
    gligen = grounding_inputs(layouts, encoder, max_slots=8)
    with torch.no_grad():
        packed = model(**kw, joint_attention_kwargs={LAYOUT_KEY: gligen})[0]
        set_implementation(model, "naive")
        naive = model(**kw, joint_attention_kwargs={LAYOUT_KEY: gligen})[0]
    torch.testing.assert_close(packed, naive, rtol=1e-4, atol=1e-4)
    assert any(".fuser.self_attn." in k for k, _ in adapter_parameters(model))


def test_token_grid_is_the_transformers_token_order():
    # FLUX: our packing and positions are the pipeline's (its own helpers are private; compared here only).
    latents = torch.randn(2, 16, 12, 8)
    assert torch.equal(pack_latents(latents), FluxPipeline._pack_latents(latents, 2, 16, 12, 8))
    assert torch.equal(image_ids(6, 4), FluxPipeline._prepare_latent_image_ids(1, 6, 4, "cpu", torch.float32))
    # SD3: patch (r, c) of the latent is token r * w + c of PatchEmbed's sequence.
    transformer = tiny_mmdit_components("tiny-sd3")["transformer"]
    x = torch.zeros(1, 16, 12, 8)
    x[:, :, 2 * 4: 2 * 4 + 2, 2 * 3: 2 * 3 + 2] = 1.0  # patch row 4, column 3 of a 6 x 4 token grid
    with torch.no_grad():
        diff = (transformer.pos_embed(x) - transformer.pos_embed(torch.zeros_like(x))).abs().sum(-1)[0]
    assert diff.nonzero().flatten().tolist() == [4 * 4 + 3]
    # A box rasterized on the token grid covers every token its pixels touch (16 px cells).
    layout = token_layout([[17, 33, 40, 64]], ["a dog"], 96, 64)
    assert layout.region_map.shape == (6, 4)
    assert (layout.region_map == layout.region_map[2, 1]).sum() == 2 * 2  # rows 2-3, columns 1-2
    with pytest.raises(ValueError, match="multiples of 16"):
        token_layout([[0, 0, 8, 8]], ["a dog"], 72, 64)


def test_adapter_files_of_another_backbone_are_one_error_naming_both(parts, tmp_path):
    backbone, components, encoder = parts
    model = _fresh(backbone, components, encoder)
    _randomize(model)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    made = adapter_config_of(path)
    assert isinstance(made, MMDiTAdapterConfig) and made.backbone == backbone and made.text_dim == encoder.hidden_size
    again = _fresh(backbone, components, encoder)
    assert load_mmdit_adapter(again, path).loaded == len(list(adapter_parameters(model)))
    kw = _inputs(backbone, SIZE, SIZE)
    gligen = grounding_inputs([token_layout(*LAYOUT, SIZE, SIZE)], encoder, max_slots=8)
    with torch.no_grad():
        assert torch.equal(again(**kw, joint_attention_kwargs={LAYOUT_KEY: gligen})[0],
                           model(**kw, joint_attention_kwargs={LAYOUT_KEY: gligen})[0])
    other = "flux" if backbone == "sd3" else "sd3"
    other_parts = tiny_mmdit_components(f"tiny-{other}")
    other_model = attach_mmdit_adapter(other_parts["transformer"], MMDiTAdapterConfig(backbone=other),
                                       region_text_encoder(other_parts, other, "t5", 32).hidden_size)
    with pytest.raises(ValueError, match=rf"a {backbone} adapter does not fit this {other} model") as e:
        load_mmdit_adapter(other_model, path)
    assert "\n" not in str(e.value)
    # A UNet adapter file offered to a transformer, and a partial file: errors naming both / the keys.
    unet_file = tmp_path / "unet.safetensors"
    save_file({"position_net.null_text_feature": torch.zeros(3)}, str(unet_file),
              metadata={"format": "richlayout-regional-adapter", "config": '{"backbone": "sdxl", "model_type": "ca"}'})
    with pytest.raises(ValueError, match=rf"a sdxl adapter does not fit this {backbone} model"):
        load_mmdit_adapter(again, unet_file)
    with pytest.raises(ValueError, match="missing keys"):
        load_mmdit_adapter(again, {k: v for k, v in model.state_dict().items() if k.startswith("position_net.")})


def test_backbone_of_a_base_from_its_model_index(tmp_path):
    assert mmdit_backbone_of_base("tiny-flux") == "flux" and mmdit_backbone_of_base("tiny") is None
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline", "transformer": '
                                               '["diffusers", "FluxTransformer2DModel"]}')
    assert mmdit_backbone_of_base(str(tmp_path)) == "flux"
    assert mmdit_backbone_of_base(str(tmp_path / "nothing")) is None


@pytest.mark.parametrize(("model_type", "blocks", "share"), [("ca", "all", 0.068), ("casa", "every_other", 0.081)])
def test_flux1_adapter_parameters_from_the_real_config_on_the_meta_device(model_type, blocks, share):
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1-dev's config: the class defaults
        base = sum(p.numel() for p in transformer.parameters())
        attach_mmdit_adapter(transformer, MMDiTAdapterConfig(backbone="flux", model_type=model_type, blocks=blocks),
                             4096)  # T5-XXL features
    adapter = sum(p.numel() for _, p in adapter_parameters(transformer))
    assert 11.8e9 < base < 12.0e9
    assert adapter / base == pytest.approx(share, abs=0.001) and adapter / base <= 0.15


@pytest.mark.slow  # torch.compile of flex_attention for CPU: about half a minute
def test_flex_attention_with_the_region_plans_block_mask_equals_the_packed_form():
    from training.layout.regions import pad_layouts
    from training.model.attention import RegionalCrossAttention
    from training.model.mmdit.flex import flex_regional_cross_attention

    layouts = [token_layout(*LAYOUT, SIZE, 128), token_layout([[0, 0, 128, 40]], ["a sky"], SIZE, 128),
               empty_token_layout(SIZE, 128)]
    batch = pad_layouts(layouts, 6, 4)
    g = torch.Generator().manual_seed(0)
    bias = torch.where(torch.rand(3, 6, 16, generator=g) < 0.5, -1000.0, -torch.rand(3, 6, 16, generator=g))
    bias[:, :, 0] = 0.0  # a live token in every slot
    objs = {"text_feat": torch.randn(3, 6, 16, 24, generator=g), "attention_bias": bias,
            "region_map": torch.from_numpy(batch["region_map"]),
            "object_masks": torch.from_numpy(batch["slot_mask"]).float()}
    torch.manual_seed(0)
    fuser = RegionalCrossAttention(32, 24, 4, 8)
    for p in fuser.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 6 * 8, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(flex_regional_cross_attention(fuser, x, dict(objs)), fuser(x, dict(objs)),
                                   rtol=1e-5, atol=1e-5)


def test_flux_true_cfg_gives_the_second_call_the_empty_layout_and_scheduled_sampling_removes_it():
    from training.inference.pipeline import LayoutPipeline
    from training.model.mmdit.tiny import tiny_mmdit_pipeline

    pipe = LayoutPipeline.from_sdxl(tiny_mmdit_pipeline("tiny-flux"), max_slots=8)
    seen = []  # per position-net call: live slots (the box's region and the background; 0: the empty layout)
    pipe.pipe.transformer.position_net.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(int(kwargs["object_masks"].sum())), with_kwargs=True)
    calls = []
    pipe.pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(len(seen)))
    kw = {"boxes": [[0, 0, 32, 48]], "labels": ["a red dog"], "height": 64, "width": 64, "num_inference_steps": 4,
          "generator": torch.Generator().manual_seed(0)}
    pipe("a dog", true_cfg_scale=2.0, scheduled_sampling_beta=0.5, **kw)
    # 4 steps x 2 calls; the layout for the first ceil(0.5 * 4) = 2 steps: prompt call with it, negative empty.
    assert len(calls) == 8 and seen == [2, 0, 2, 0]
    seen.clear()
    calls.clear()
    pipe("a dog", **kw)  # FLUX-dev's distilled guidance: one call per step, no negative branch
    assert len(calls) == 4 and seen == [2] * 4

"""The adapter on a stock diffusers UNet: exact identity when fresh, trainable set, weights I/O, init CLI."""

import json

import numpy as np
import pytest
import torch
from _model_fixtures import random_layout, region_encoder, tiny_sdxl_unet_inputs
from safetensors.torch import load_file

from training.layout.regions import empty_layout, reorganize_regions
from training.model import init_adapter as init_unet
from training.model.adapter import (
    AdapterConfig,
    adapter_parameters,
    adapter_state_dict,
    attach_regional_adapter,
    load_adapter,
    save_adapter,
    set_adapter_trainable,
    set_implementation,
    transformer_blocks,
)
from training.model.encoding import grounding_inputs
from training.model.tiny import tiny_sdxl_pipeline, tiny_unet

SIZE = 64  # pixels: an 8x8 latent


def _inputs(seed: int = 0) -> dict:
    return tiny_sdxl_unet_inputs(seed, n_objects=8, size=SIZE)


def _randomize_adapter(unet, seed: int = 0) -> None:
    """Random adapter weights of a trained model's scale (a fresh adapter is the identity, hiding differences)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_parameters(unet):
            std = p.shape[1] ** -0.5 if p.ndim == 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_fresh_adapter_leaves_the_unet_output_identical():
    unet = tiny_unet()
    inputs = _inputs()
    base_inputs = {k: v for k, v in inputs.items() if k != "cross_attention_kwargs"}
    with torch.no_grad():
        base = unet(**base_inputs).sample
        attach_regional_adapter(unet)
        calls = {"fuser": 0, "position_net": 0}
        unet.position_net.register_forward_hook(
            lambda *a: calls.__setitem__("position_net", calls["position_net"] + 1)
        )
        for _, block in transformer_blocks(unet):
            block.fuser.register_forward_hook(lambda *a: calls.__setitem__("fuser", calls["fuser"] + 1))
        adapted = unet(**inputs).sample
    assert torch.equal(adapted, base)
    assert calls == {"fuser": len(transformer_blocks(unet)), "position_net": 1} and calls["fuser"] == 11


def test_packed_equals_naive_through_the_whole_unet():
    unet = attach_regional_adapter(tiny_unet())
    _randomize_adapter(unet)
    inputs = _inputs(1)
    with torch.no_grad():
        packed = unet(**inputs).sample
        set_implementation(unet, "naive")
        naive = unet(**inputs).sample
    assert not torch.equal(
        packed, unet(**{k: v for k, v in inputs.items() if k != "cross_attention_kwargs"}).sample
    )
    torch.testing.assert_close(packed, naive, rtol=1e-5, atol=1e-5)


def _grads(unet, inputs) -> dict:
    unet.zero_grad(set_to_none=True)
    unet(**inputs).sample.square().mean().backward()
    return {name: p.grad.clone() for name, p in unet.named_parameters() if p.grad is not None}


def test_gradients_reach_only_adapter_parameters_also_with_checkpointing():
    unet = attach_regional_adapter(tiny_unet())
    _randomize_adapter(unet)
    trainable = set_adapter_trainable(unet)
    adapter_names = {name for name, _ in adapter_parameters(unet)}
    assert {id(p) for p in trainable} == {id(p) for n, p in unet.named_parameters() if n in adapter_names}
    assert all(not p.requires_grad for n, p in unet.named_parameters() if n not in adapter_names)
    unet.train()
    inputs = _inputs(2)
    grads = _grads(unet, inputs)
    assert set(grads) == adapter_names
    assert all(float(g.abs().sum()) > 0 for name, g in grads.items() if ".attn." in name or "linears" in name)
    unet.enable_gradient_checkpointing()
    checkpointed = _grads(unet, inputs)
    for name in grads:
        torch.testing.assert_close(checkpointed[name], grads[name], rtol=1e-4, atol=1e-6)


def test_save_then_load_round_trips(tmp_path):
    unet = attach_regional_adapter(tiny_unet())
    _randomize_adapter(unet)
    path = save_adapter(unet, tmp_path / "adapter.safetensors")
    saved = load_file(str(path))
    assert set(saved) == set(adapter_state_dict(unet)) and len(saved) == 7 + 6 * 11
    assert not any(k.startswith(("conv_in", "down_blocks.0.resnets")) for k in saved)

    other = attach_regional_adapter(tiny_unet())
    report = load_adapter(other, path)
    assert report.missing == [] and report.unexpected == [] and report.loaded == len(saved)
    for key, value in adapter_state_dict(other).items():
        assert torch.equal(value, saved[key])
    inputs = _inputs(3)
    with torch.no_grad():
        assert torch.equal(other(**inputs).sample, unet(**inputs).sample)


def test_release_key_names_load(tmp_path):
    unet = attach_regional_adapter(tiny_unet())
    _randomize_adapter(unet)
    # The release's extracted checkpoint: keys as diffusers names them, from a torch.save'd dict.
    release = {
        "unet." + k.replace("null_text_feature", "null_positive_feature"): v
        for k, v in adapter_state_dict(unet).items()
    }
    assert "unet.position_net.linears.4.weight" in release
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.1.fuser.attn.to_out.0.bias" in release
    torch.save(release, tmp_path / "pn_and_fuser.pth")
    fresh = attach_regional_adapter(tiny_unet())
    report = load_adapter(fresh, tmp_path / "pn_and_fuser.pth")
    assert report.missing == [] and report.unexpected == []
    for key, value in adapter_state_dict(fresh).items():
        assert torch.equal(value, adapter_state_dict(unet)[key])


def test_load_reports_and_fails_loudly():
    unet = attach_regional_adapter(tiny_unet())
    state = adapter_state_dict(unet)
    partial = {k: v for k, v in state.items() if not k.startswith("position_net.")}
    partial["mid_block.fuser.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="7 missing keys.*1 unexpected keys \\['mid_block.fuser.extra'\\]"):
        load_adapter(unet, partial)
    # Not strict: missing adapter keys stay fresh and are reported; a key the model lacks still fails.
    with pytest.raises(ValueError, match="1 unexpected keys"):
        load_adapter(unet, partial, strict=False)
    del partial["mid_block.fuser.extra"]
    report = load_adapter(unet, partial, strict=False)
    assert report.missing == sorted(k for k in state if k.startswith("position_net."))
    assert report.unexpected == []
    wrong = dict(state, **{"position_net.null_text_feature": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape mismatch"):
        load_adapter(unet, wrong)
    with pytest.raises(ValueError, match="attach_regional_adapter"):
        load_adapter(tiny_unet(), state)


def test_adapter_shapes_follow_the_host_blocks():
    unet = attach_regional_adapter(tiny_unet(), AdapterConfig(hidden_dim=16))
    assert (
        unet.position_net.linears[0].in_features == 64 + 64 and unet.position_net.linears[2].in_features == 16
    )
    for _, block in transformer_blocks(unet):
        assert block.fuser.attn.heads == block.attn2.heads
        assert block.fuser.attn.to_q.in_features == block.attn1.query_dim
        assert block.fuser.attn.to_k.in_features == 64
    with pytest.raises(ValueError, match="implementation"):
        AdapterConfig(implementation="fast")


def test_init_unet_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        init_unet.main(["--help"])
    assert exit_info.value.code == 0

    base = tmp_path / "sdxl"
    tiny_unet().save_pretrained(base / "unet")
    assert init_unet.main(["--base", str(base), "--out", str(tmp_path / "init")]) == 0
    report = json.loads((tmp_path / "init" / "init_report.json").read_text())
    assert (
        report["subfolder"] == "unet"
        and report["base_missing_keys"] == []
        and report["base_unexpected_keys"] == []
    )
    assert len(report["adapter_keys_fresh"]) == 7 + 6 * 11 and report["adapter_keys_loaded"] == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["adapter_keys_fresh"] == 73
    weights = load_file(str(tmp_path / "init" / init_unet.ADAPTER_FILE))
    assert all(float(v.abs().sum()) == 0 for k, v in weights.items() if "to_out" in k or "null" in k)

    # A base that already holds adapter keys (the release's initialised UNet): they load, none is fresh.
    trained = attach_regional_adapter(tiny_unet())
    _randomize_adapter(trained)
    trained.save_pretrained(tmp_path / "regional_unet")
    summary = init_unet.initialise(str(tmp_path / "regional_unet"), tmp_path / "init2")
    assert (
        summary["subfolder"] is None
        and summary["adapter_keys_fresh"] == []
        and summary["adapter_keys_loaded"] == 73
    )
    reloaded = load_file(summary["adapter_file"])
    for key, value in adapter_state_dict(trained).items():
        assert torch.equal(reloaded[key], value)


def test_stock_sdxl_pipeline_runs_the_adapter_through_cross_attention_kwargs():
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    layout = random_layout(np.random.default_rng(4), 3, SIZE, SIZE, max_slots=4)
    # classifier-free guidance: the unconditional rows come first and get the empty layout
    gligen = grounding_inputs([empty_layout(SIZE, SIZE), layout], region_encoder(), max_slots=4)
    call = dict(prompt="a dog", num_inference_steps=1, height=SIZE, width=SIZE, output_type="latent")
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    attach_regional_adapter(pipe.unet)
    fresh = pipe(
        **call, generator=torch.Generator().manual_seed(0), cross_attention_kwargs={"gligen": gligen}
    ).images
    assert torch.equal(fresh, base)
    _randomize_adapter(pipe.unet)
    steered = pipe(
        **call, generator=torch.Generator().manual_seed(0), cross_attention_kwargs={"gligen": gligen}
    ).images
    assert steered.shape == (1, 4, 8, 8) and not torch.equal(steered, base)


def test_empty_layout_is_no_region_every_pixel_x_plus_null():
    """docs/METHOD.md §4.1: the negative branch attends nothing; every fuser gives exactly x + null_text_feat."""
    empty = grounding_inputs([empty_layout(SIZE, SIZE)], region_encoder(), max_slots=4)
    by_hand = {
        "text_embeddings": torch.zeros(1, 4, 77, 64),
        "bbox_embeddings": torch.full((1, 4, 77, 4), -1.0),
        "object_masks": torch.zeros(1, 4),
        "attention_bias": torch.zeros(1, 4, 77),
        "region_map": torch.full((1, 8, 8), -1, dtype=torch.long),
        "union_masks": torch.zeros(1, 4, 8, 8, dtype=torch.bool),
    }
    assert empty.keys() == by_hand.keys()
    for key, value in by_hand.items():
        assert torch.equal(empty[key], value), key
    unet = attach_regional_adapter(tiny_unet())
    _randomize_adapter(unet, seed=5)  # non-zero null features and attention weights
    objs = unet.position_net(**by_hand)
    for _, block in transformer_blocks(unet):
        x = torch.randn(1, 64, block.attn1.query_dim)
        for implementation in ("packed", "naive"):
            block.fuser.implementation = implementation
            assert torch.equal(block.fuser(x, dict(objs)), x + block.fuser.null_text_feat)
        break
    # Through the UNet, the negative branch is not what one background slot with "" would give.
    background = reorganize_regions([[0, 0, 0, 0]], ["dot"], SIZE, SIZE)  # zero-area box: background only
    inputs = _inputs(6)
    with torch.no_grad():
        outs = [
            unet(
                **{
                    **inputs,
                    "cross_attention_kwargs": {
                        "gligen": grounding_inputs([layout, layout], region_encoder(), max_slots=4)
                    },
                }
            ).sample  # fmt: skip
            for layout in (empty_layout(SIZE, SIZE), background)
        ]
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_release_trainer_checkpoints_load_live_or_ema(tmp_path):
    """docs/RELEASE.md: Lightning {"state_dict"} / DeepSpeed {"module"} files, _forward_module. / unet. /
    ema_unet.module. prefixes, other modules' keys skipped, and a whole-UNet safetensors."""
    source = attach_regional_adapter(tiny_unet())
    _randomize_adapter(source, seed=7)
    live = adapter_state_dict(source)
    ema = {k: v + 1.0 for k, v in live.items()}
    base = {k: v for k, v in source.state_dict().items() if k not in live}
    lightning = {f"_forward_module.unet.{k}": v for k, v in {**base, **live}.items()}
    lightning |= {f"_forward_module.ema_unet.module.{k}": v for k, v in ema.items()}
    lightning["_forward_module.vae.decoder.conv_in.weight"] = torch.zeros(2)
    torch.save({"state_dict": lightning, "global_step": 10}, tmp_path / "last.ckpt")
    torch.save({"module": {f"unet.{k}": v for k, v in live.items()}}, tmp_path / "mp_rank_00_model_states.pt")
    source.save_pretrained(tmp_path / "whole_unet")  # diffusers' safetensors: base and adapter keys
    whole = tmp_path / "whole_unet" / "diffusion_pytorch_model.safetensors"

    cases = [
        (tmp_path / "last.ckpt", False, live, len(base)),
        (tmp_path / "last.ckpt", True, ema, 0),
        (tmp_path / "mp_rank_00_model_states.pt", False, live, 0),
        (whole, False, live, len(base)),
    ]
    for path, use_ema, expected, n_base in cases:
        unet = attach_regional_adapter(tiny_unet())
        report = load_adapter(unet, path, ema=use_ema)
        assert report.loaded == 73 and report.missing == [] and report.unexpected == []
        assert report.ignored_base == n_base
        got = adapter_state_dict(unet)
        assert all(torch.equal(got[k], expected[k]) for k in expected), (path.name, use_ema)
    with pytest.raises(ValueError, match="no EMA weights"):
        load_adapter(attach_regional_adapter(tiny_unet()), tmp_path / "mp_rank_00_model_states.pt", ema=True)
    # a typo'd key is named, not dropped
    typo = {k.replace("fuser.attn.to_q", "fuser.attn.to_qq"): v for k, v in live.items()}
    torch.save(typo, tmp_path / "typo.pth")
    with pytest.raises(ValueError, match=r"typo.pth: keys do not match.*11 missing keys.*to_qq"):
        load_adapter(attach_regional_adapter(tiny_unet()), tmp_path / "typo.pth")
    # objects pickled into a checkpoint are refused (weights_only)
    torch.save({"state_dict": {"x": AdapterConfig()}}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="not a tensors-only torch checkpoint"):
        load_adapter(attach_regional_adapter(tiny_unet()), tmp_path / "pickled.ckpt")

"""A release trainer checkpoint with peft's LoRA (base attention and fusers) loads and computes the same.

The release's trainer adds ``LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian",
target_modules=["to_k", "to_q", "to_v", "to_out.0"])`` to the UNet that already holds the adapter; its
Lightning checkpoint holds peft's names. Loaded here (in memory, or converted by ``init_unet``), the
UNet's output must equal the release model's.
"""

import json

import pytest
import torch
from _model_fixtures import tiny_sdxl_unet_inputs
from peft import LoraConfig
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel

from training.model import init_adapter as init_unet
from training.model.adapter import (
    AdapterConfig,
    adapter_parameters,
    attach_regional_adapter,
    is_adapter_key,
    load_adapter,
)
from training.model.lora import add_lora, is_lora_key, load_lora
from training.model.release_checkpoint import read_checkpoint, resolve_peft_lora
from training.model.tiny import tiny_sd15_unet, tiny_unet

SIZE = 64  # pixels: an 8x8 latent
RANK = 4
RELEASE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def _inputs(seed: int = 0) -> dict:
    return tiny_sdxl_unet_inputs(seed, n_objects=6, size=SIZE)


def _forward(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def _randomize(params, seed: int) -> None:
    """Weights of a trained model's scale (fresh fusers and LoRA B are zero and would hide differences)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            std = p.shape[1] ** -0.5 if p.ndim == 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _model(model_type: str):
    """Our tiny SDXL UNet with the adapter; ``naive``: the release's form, which calls every projection."""
    return attach_regional_adapter(tiny_unet(), AdapterConfig(model_type=model_type, implementation="naive"))


def _release_model(model_type: str, seed: int):
    """The release's trained model: adapter, then peft's LoRA on every to_q/k/v/out.0, fusers' included."""
    unet = _model(model_type)
    _randomize([p for _, p in adapter_parameters(unet)], seed)
    unet.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=RELEASE_TARGETS)
    )
    lora = [p for n, p in unet.named_parameters() if is_lora_key(n)]
    _randomize(lora, seed + 1)
    return unet


def _lightning(unet, ema=None) -> dict:
    """The release trainer's Lightning file: ``unet.`` keys, its EMA ``AveragedModel`` under ``ema_unet.``."""
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    if ema is not None:
        state |= {f"ema_unet.{k}": v for k, v in ema.state_dict().items()}
    state["vae.decoder.conv_in.weight"] = torch.zeros(2)
    return {"state_dict": state, "global_step": 10}


def test_resolve_peft_lora_merges_fusers_keeps_base_lora_and_names_bad_keys():
    a = torch.tensor([[1.0, 2.0]])  # r = 1, 2 inputs
    b = torch.tensor([[3.0], [4.0]])  # 2 outputs
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    fuser = "down_blocks.1.attentions.0.transformer_blocks.0.fuser.attn.to_q"
    base = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    state = {
        f"{fuser}.base_layer.weight": w,
        f"{fuser}.lora_A.default.weight": a,
        f"{fuser}.lora_B.default.weight": b,
        f"{base}.base_layer.weight": w,
        f"{base}.base_layer.bias": torch.ones(2),
        f"{base}.lora_A.default.weight": a,
        f"{base}.lora_B.default.weight": b,
        "position_net.linears.0.weight": w,
    }
    out = resolve_peft_lora(state)
    assert sorted(out) == sorted(
        [
            f"{fuser}.weight",
            f"{base}.weight",
            f"{base}.bias",
            f"{base}.lora_A.default.weight",
            f"{base}.lora_B.default.weight",
            "position_net.linears.0.weight",
        ]
    )
    assert out[f"{fuser}.weight"].tolist() == [[4.0, 6.0], [4.0, 9.0]]  # W + B A (alpha = r)
    assert torch.equal(out[f"{base}.weight"], w) and torch.equal(out[f"{base}.lora_B.default.weight"], b)
    assert resolve_peft_lora(out) == out  # already plain: unchanged

    typo = dict(state)
    typo[f"{fuser}.lora_A.defualt.weight"] = typo.pop(f"{fuser}.lora_A.default.weight")
    with pytest.raises(ValueError, match=r"1 unknown LoRA keys .*fuser\.attn\.to_q\.lora_A\.defualt\.weight"):
        resolve_peft_lora(typo, source="ckpt")
    unpaired = {k: v for k, v in state.items() if k != f"{base}.lora_B.default.weight"}
    with pytest.raises(ValueError, match=r"missing their pair: .*attn1\.to_q\.lora_B\.default\.weight"):
        resolve_peft_lora(unpaired)
    no_weight = {k: v for k, v in state.items() if k != f"{fuser}.base_layer.weight"}
    with pytest.raises(ValueError, match=r"LoRA of .*fuser\.attn\.to_q without its weight"):
        resolve_peft_lora(no_weight)


def test_release_lora_checkpoint_loads_in_memory_and_through_init_unet(tmp_path, capsys):
    inputs = _inputs()
    release = _release_model("ca", seed=3)
    reference = _forward(release, inputs)
    assert (reference - _forward(_model("ca"), inputs)).abs().max() > 1e-2  # the weights matter
    torch.save(_lightning(release), tmp_path / "last.ckpt")

    # in memory: fusers' LoRA merged, the base attention's LoRA loaded as our LoRA
    unet = _model("ca")
    report = load_adapter(unet, tmp_path / "last.ckpt")
    assert report.missing == [] and report.unexpected == [] and report.loaded == 73
    n_base_lora = sum(1 for k in release.state_dict() if is_lora_key(k) and ".fuser." not in k)
    assert report.lora == n_base_lora > 0
    torch.testing.assert_close(_forward(unet, inputs), reference, rtol=1e-5, atol=1e-5)
    # training on from it (model.lora_rank = the release's rank) keeps training this LoRA, not a fresh one
    with pytest.raises(ValueError, match=r"already holds a LoRA of rank \[4\] .*no LoRA of rank 8"):
        add_lora(unet, 8)
    params = add_lora(unet, RANK)
    assert len(params) == n_base_lora and all(p.requires_grad for p in params)
    torch.testing.assert_close(_forward(unet, inputs), reference, rtol=1e-5, atol=1e-5)

    # converted: a plain adapter plus our diffusers LoRA file beside it
    out = tmp_path / "init"
    assert (
        init_unet.main(["--base", "tiny", "--out", str(out), "--adapter", str(tmp_path / "last.ckpt")]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert (
        printed["lora_file"] == str(out / "lora.safetensors") and printed["lora_keys_loaded"] == n_base_lora
    )
    adapter = load_file(str(out / init_unet.ADAPTER_FILE))
    assert not any("lora" in k or "base_layer" in k for k in adapter)
    unet = _model("ca")
    load_adapter(unet, out / init_unet.ADAPTER_FILE)
    load_lora(unet, out / "lora.safetensors")
    torch.testing.assert_close(_forward(unet, inputs), reference, rtol=1e-5, atol=1e-5)


def test_release_lora_ema_copy_of_a_casa_model_loads(tmp_path):
    inputs = _inputs(1)
    release = _release_model("casa", seed=5)
    reference = _forward(release, inputs)
    ema = AveragedModel(release)  # a copy of these weights, then the live ones move on
    _randomize([p for n, p in release.named_parameters() if is_adapter_key(n) or is_lora_key(n)], seed=9)
    torch.save(_lightning(release, ema), tmp_path / "last.ckpt")

    unet = _model("casa")
    report = load_adapter(unet, tmp_path / "last.ckpt", ema=True)
    assert report.unexpected == [] and report.missing == [] and report.lora > 0
    # the fusers' LoRA is merged into their weights (W + BA) where the release adds x@A@B apart: float32
    # reassociation through casa's two attentions moves a few outputs by up to ~2e-5 (measured; how much
    # depends on the CPU's kernels), against a > 1e-2 effect of the weights themselves
    torch.testing.assert_close(_forward(unet, inputs), reference, rtol=1e-4, atol=1e-4)
    live = _model("casa")
    load_adapter(live, tmp_path / "last.ckpt")
    assert (_forward(live, inputs) - reference).abs().max() > 1e-3  # the live weights are other ones
    keys = read_checkpoint(tmp_path / "last.ckpt", ema=True)
    assert any(k.endswith("fuser.self_attn.to_q.weight") for k in keys)
    assert not any(".base_layer." in k or (".fuser." in k and is_lora_key(k)) for k in keys)


def test_a_typo_in_a_release_lora_key_is_an_error_naming_it(tmp_path, capsys):
    release = _release_model("ca", seed=3)
    ckpt = _lightning(release)
    bad = "unet.mid_block.attentions.0.transformer_blocks.0.fuser.attn.to_v.lora_B.default.weight"
    ckpt["state_dict"][bad.replace("lora_B", "lora_b")] = ckpt["state_dict"].pop(bad)
    torch.save(ckpt, tmp_path / "typo.ckpt")
    with pytest.raises(
        ValueError, match=r"typo\.ckpt: 1 unknown LoRA keys .*fuser\.attn\.to_v\.lora_b\.default"
    ):
        load_adapter(_model("ca"), tmp_path / "typo.ckpt")
    argv = ["--base", "tiny", "--out", str(tmp_path / "init"), "--adapter", str(tmp_path / "typo.ckpt")]
    assert init_unet.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1
    assert "fuser.attn.to_v.lora_b.default.weight" in errors[0]


def test_an_sd15_release_lora_checkpoint_converts_through_init_unet(tmp_path, capsys):
    """The release's SD1.5 trainer adds the same LoRA: the effective weights survive the conversion."""
    release = attach_regional_adapter(tiny_sd15_unet(0))
    _randomize([p for _, p in adapter_parameters(release)], seed=11)
    release.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=RELEASE_TARGETS)
    )
    _randomize([p for n, p in release.named_parameters() if is_lora_key(n)], seed=12)
    torch.save({"module": {f"unet.{k}": v for k, v in release.state_dict().items()}}, tmp_path / "ds.pt")
    argv = ["--base", "tiny-sd15", "--out", str(tmp_path / "init"), "--adapter", str(tmp_path / "ds.pt")]
    assert init_unet.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["lora_file"] == str(tmp_path / "init" / "lora.safetensors")
    unet = attach_regional_adapter(tiny_sd15_unet(0))
    load_adapter(unet, tmp_path / "init" / init_unet.ADAPTER_FILE)
    load_lora(unet, tmp_path / "init" / "lora.safetensors")

    def effective(model) -> dict[str, torch.Tensor]:
        """Each projection's weight with its LoRA folded in (alpha = r), by plain name."""
        state = model.state_dict()
        out = {}
        for key, value in state.items():
            if is_lora_key(key):
                continue
            name = key.replace(".base_layer.", ".")
            module = key.rsplit(".base_layer.", 1)[0]
            if key.endswith(".base_layer.weight") and f"{module}.lora_A.default.weight" in state:
                a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
                value = value + b @ a
            out[name] = value
        return out

    want, got = effective(release), effective(unet)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6, msg=key)
    assert not any(".fuser." in k and is_lora_key(k) for k in unet.state_dict())  # the fusers' LoRA: merged

"""The trainer's options: per-sample layout dropout, LoRA on the base attention (peft), 8-bit AdamW
(bitsandbytes). Tiny random SDXL parts on CPU, fp32. FSDP is in ``test_train_fsdp.py``."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from _model_fixtures import region_encoder
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import SIZE, tiny_config, write_dataset

from training.layout.regions import empty_layout, reorganize_regions
from training.model.adapter import (
    attach_regional_adapter,
    is_adapter_key,
    load_adapter,
    set_adapter_trainable,
)
from training.model.encoding import grounding_inputs, grounding_inputs_from_batch
from training.model.lora import is_lora_key, load_lora
from training.model.tiny import tiny_unet
from training.trainer import loop as T
from training.trainer import model_setup as M
from training.trainer.config import OptimConfig


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("shards"))


# ---------------------------------------------------------------------------------------------------
# Layout dropout, per sample, in the encoding


def _batch_of(layouts, max_slots: int, max_objs: int = 3) -> dict:
    """The ``region_*`` fields of a collated batch holding these layouts (as ``training.data.collate`` lays them out)."""
    n = len(layouts)
    h, w = layouts[0].grid_size
    batch = {
        "region_map": torch.from_numpy(np.stack([layout.region_map for layout in layouts]).astype(np.int64)),
        "slot_mask": torch.zeros(n, max_slots, dtype=torch.bool),
        "region_texts": [[""] * max_slots for _ in layouts],
        "region_boxes": torch.full((n, max_slots, max_objs, 4), -1.0),
        "region_weights": torch.zeros(n, max_slots, max_objs),
        "segment_mask": torch.zeros(n, max_slots, max_objs, dtype=torch.bool),
        "region_union_masks": torch.zeros(n, max_slots, h, w, dtype=torch.bool),
    }
    for b, layout in enumerate(layouts):
        for s in range(layout.n_slots):
            k = len(layout.boxes[s])
            batch["slot_mask"][b, s] = True
            batch["region_texts"][b][s] = layout.texts[s]
            batch["region_boxes"][b, s, :k] = torch.from_numpy(layout.boxes[s])
            batch["region_weights"][b, s, :k] = torch.from_numpy(layout.weights[s])
            batch["segment_mask"][b, s, :k] = True
            batch["region_union_masks"][b, s] = torch.from_numpy(layout.union_masks[s])
    return batch


def _layouts():
    return [
        reorganize_regions([[0, 0, 24, 40], [8, 8, 40, 40]], ["a red dog", "a cat"], 40, 40),
        reorganize_regions([[0, 0, 16, 16], [16, 0, 40, 24], [4, 4, 36, 36]], ["x", "a b", "c"], 40, 40),
        reorganize_regions([[8, 0, 40, 16]], ["a small tree"], 40, 40),
    ]


def test_a_dropped_layout_is_exactly_the_empty_layout_and_the_others_are_unchanged():
    layouts, slots = _layouts(), 6
    batch = _batch_of(layouts, slots)
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    encoder = region_encoder()
    kept = grounding_inputs_from_batch(batch, encoder)
    dropped = grounding_inputs_from_batch(batch, encoder, drop_layout=[False, True, False])
    empty = grounding_inputs([empty_layout(40, 40)], encoder, max_slots=slots)  # inference's negative
    assert kept.keys() == dropped.keys() == empty.keys()
    for key in kept:
        assert torch.equal(dropped[key][1], empty[key][0]), key
        assert torch.equal(dropped[key][[0, 2]], kept[key][[0, 2]]), key
        assert not torch.equal(kept[key][1], empty[key][0]) or key == "attention_bias", key
    assert dropped["object_masks"][1].tolist() == [0, 0, 0, 0, 0, 0]  # no region (docs/METHOD.md §4.1)
    for key, value in before.items():  # the batch itself is left alone
        assert torch.equal(batch[key], value) if isinstance(value, torch.Tensor) else batch[key] == value


def test_layout_dropout_of_layouts_matches_the_batch_form_and_masks_are_checked():
    layouts, slots = _layouts(), 6
    encoder = region_encoder()
    drop = torch.tensor([True, False, True])
    ours = grounding_inputs(layouts, encoder, max_slots=slots, drop_layout=drop)
    theirs = grounding_inputs_from_batch(_batch_of(layouts, slots), encoder, drop_layout=drop)
    expected = grounding_inputs(
        [empty_layout(40, 40), layouts[1], empty_layout(40, 40)], encoder, max_slots=slots
    )
    for key in expected:
        assert torch.equal(ours[key], expected[key]) and torch.equal(theirs[key], expected[key]), key
    with pytest.raises(ValueError, match="one bool per sample"):
        grounding_inputs(layouts, encoder, max_slots=slots, drop_layout=[True])
    with pytest.raises(ValueError, match="one bool per sample"):
        grounding_inputs_from_batch(_batch_of(layouts, slots), encoder, drop_layout=[0.5, 0, 0])


def test_a_dropped_layout_skips_encoding_its_region_texts():
    layouts, slots = _layouts(), 6
    encoder = region_encoder()
    grounding_inputs_from_batch(_batch_of(layouts, slots), encoder, drop_layout=[True, True, True])
    assert encoder.stats.misses == 0  # the empty layout has no region text at all


# ---------------------------------------------------------------------------------------------------
# LoRA on the base attention (peft)


def _unet_output(unet: torch.nn.Module) -> torch.Tensor:
    """The UNet's prediction for fixed random inputs and a 3-object layout (64x64 image, 8x8 latents)."""
    g = torch.Generator().manual_seed(0)
    layout = reorganize_regions(
        [[0, 0, 40, 40], [24, 16, 64, 64], [8, 40, 30, 60]], ["a red dog", "a cat", "a tree"], SIZE, SIZE
    )
    gligen = grounding_inputs([layout], region_encoder(), max_slots=6)
    with torch.no_grad():
        return unet(
            torch.randn(1, 4, 8, 8, generator=g),
            torch.tensor([500]),
            torch.randn(1, 77, 64, generator=g),
            added_cond_kwargs={
                "text_embeds": torch.randn(1, 32, generator=g),
                "time_ids": torch.randn(1, 6, generator=g),
            },
            cross_attention_kwargs={"gligen": gligen},
        ).sample


def _base_key(key: str) -> str:
    return key.replace(".base_layer.", ".")  # peft moves a wrapped Linear's own weights there


def test_a_fresh_lora_leaves_the_output_unchanged_and_the_adapter_trainable():
    unet = attach_regional_adapter(tiny_unet(0)).eval()
    adapter = set_adapter_trainable(unet)
    with torch.no_grad():  # a trained-looking adapter, so that the LoRA's effect on it would show
        for p in adapter:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    before = _unet_output(unet)
    lora = M.add_lora(unet, 4)
    assert torch.equal(_unet_output(unet), before)  # B starts at zero
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert {n for n, _ in unet.named_parameters() if is_adapter_key(n)} <= names  # peft froze nothing of ours
    assert {id(p) for p in lora} == {id(p) for n, p in unet.named_parameters() if is_lora_key(n)}
    assert names == {n for n, _ in unet.named_parameters() if is_adapter_key(n) or is_lora_key(n)}
    wrapped = {n.rsplit(".lora_", 1)[0] for n in names if is_lora_key(n)}
    assert not any(".fuser." in n for n in wrapped)  # the adapter's own attention gets no LoRA
    n_attn = sum(1 for n, _ in unet.named_modules() if n.endswith((".attn1", ".attn2")))
    assert len(wrapped) == 4 * n_attn  # to_q, to_k, to_v, to_out.0 of every base attention
    with torch.no_grad():
        for p in lora:
            p.add_(0.1)
    assert not torch.allclose(_unet_output(unet), before)  # and the LoRA does act on the output


def test_lora_trains_with_the_adapter_is_saved_beside_it_reloads_and_resumes(dataset, tmp_path, monkeypatch):
    """LoRA and adapter change, every base weight stays bit-identical; the LoRA files reload (ours and
    diffusers' loader) to the same outputs; resuming from a checkpoint restores the LoRA and its EMA."""
    from diffusers import StableDiffusionXLPipeline

    from training.model.tiny import tiny_sdxl_components

    initial: dict[str, torch.Tensor] = {}
    add_lora = M.add_lora

    def recording_add_lora(unet, rank):
        params = add_lora(unet, rank)
        initial.update({n: p.detach().clone() for n, p in unet.named_parameters() if is_lora_key(n)})
        return params

    monkeypatch.setattr(M, "add_lora", recording_add_lora)
    common = {
        "model.lora_rank": 4,
        "train.max_steps": 2,
        "ema.update_after_step": 0,
        "checkpoint.every_steps": 1,
        "checkpoint.keep_last": None,
    }
    res = T.train(tiny_config(dataset, tmp_path / "full", **common))
    assert res.lora_path == tmp_path / "full" / "adapter" / "lora.safetensors" and res.ema_lora_path.exists()

    trained = {k: v for k, v in res.unet.state_dict().items()}
    lora_keys = {k for k in trained if is_lora_key(k)}
    assert lora_keys == set(initial) and len(lora_keys) > 0
    changed = [k for k in lora_keys if not torch.equal(trained[k], initial[k])]
    assert {k for k in changed if ".lora_A." in k} and {k for k in changed if ".lora_B." in k}
    assert all(trained[k].abs().sum() > 0 for k in lora_keys if ".lora_B." in k)  # every B left zero
    fresh = attach_regional_adapter(tiny_unet(0)).state_dict()
    assert any(not torch.equal(trained[k], fresh[k]) for k in fresh if is_adapter_key(k))
    base = {_base_key(k): v for k, v in trained.items() if not is_adapter_key(k) and not is_lora_key(k)}
    assert base.keys() == {k for k in fresh if not is_adapter_key(k)}
    assert all(torch.equal(base[k], fresh[k]) for k in base)  # bit-identical frozen UNet

    # The files: adapter keys only in the adapter file, diffusers' LoRA layout and config beside it.
    folder = tmp_path / "full" / "adapter"
    adapter_file = load_file(folder / "adapter.safetensors")
    assert set(adapter_file) == {k for k in trained if is_adapter_key(k)}
    lora_file = load_file(res.lora_path)
    assert len(lora_file) == len(lora_keys)
    assert all(
        k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in lora_file
    )
    with safe_open(res.lora_path, framework="pt") as f:
        assert '"unet.r": 4' in f.metadata()["lora_adapter_metadata"]

    # Reload into fresh UNets: ours, and diffusers' pipeline loader; the same outputs as the trained UNet.
    expected = _unet_output(res.unet.eval())
    ours = attach_regional_adapter(tiny_unet(0)).eval()
    load_adapter(ours, folder / "adapter.safetensors")
    without_lora = _unet_output(ours)
    load_lora(ours, res.lora_path)
    torch.testing.assert_close(_unet_output(ours), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(without_lora, expected, atol=1e-4)  # the LoRA is part of the result
    components = tiny_sdxl_components(0)
    attach_regional_adapter(components["unet"])
    pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
    load_adapter(pipe.unet, folder / "adapter.safetensors")
    pipe.load_lora_weights(str(folder), weight_name="lora.safetensors")
    torch.testing.assert_close(_unet_output(pipe.unet.eval()), expected, rtol=0, atol=1e-6)

    # Resume from the step-1 checkpoint in another folder: the same step 2 (LoRA restored, EMA too).
    step1 = tmp_path / "full" / "checkpoints" / "step_0000001"
    assert (step1 / "lora.safetensors").exists() and (step1 / "lora_ema.safetensors").exists()
    resumed = T.train(
        tiny_config(dataset, tmp_path / "resumed", **{**common, "checkpoint.resume": str(step1)})
    )
    assert resumed.step == 2 and resumed.losses == pytest.approx(res.losses[1:], rel=1e-5)
    for name in ("lora.safetensors", "lora_ema.safetensors", "adapter.safetensors"):
        a, b = load_file(folder / name), load_file(tmp_path / "resumed" / "adapter" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name


def test_asking_for_lora_without_peft_fails_clearly(monkeypatch):
    _hide_module(monkeypatch, "peft")
    with pytest.raises(
        RuntimeError, match=r"model.lora_rank > 0 needs peft: pip install 'richlayout\[peft\]'"
    ):
        M.add_lora(attach_regional_adapter(tiny_unet(0)), 4)


def _hide_module(monkeypatch, name: str) -> None:
    """Make ``import name`` (and its submodules) fail as if the package were not installed."""
    real_import = builtins.__import__

    def fake_import(module, *args, **kwargs):
        if module == name or module.startswith(name + "."):
            raise ImportError(f"No module named {module!r}")
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


# ---------------------------------------------------------------------------------------------------
# 8-bit AdamW (bitsandbytes)


def test_8bit_adamw_runs_on_cpu_with_8bit_state_and_fits_a_regression():
    import bitsandbytes as bnb  # in the dev extra (0.50 runs its 8-bit AdamW on CPU tensors)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    target = x @ torch.randn(64, 96, generator=g)
    weight = torch.nn.Parameter(torch.zeros(64, 96))  # 6144 values: 8-bit state (bnb's min is 4096)
    bias = torch.nn.Parameter(torch.zeros(96))  # small: bnb keeps its state in fp32
    opt = M.make_optimizer([weight, bias], OptimConfig(lr=0.05, weight_decay=0.0, adam_8bit=True))
    assert isinstance(opt, bnb.optim.AdamW8bit)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(x @ weight + bias, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    assert (
        opt.state[weight]["state1"].dtype == torch.uint8 and opt.state[weight]["state2"].dtype == torch.uint8
    )
    assert opt.state[bias]["state1"].dtype == torch.float32


def test_the_trainer_steps_with_8bit_adamw(dataset, tmp_path, monkeypatch):
    import bitsandbytes as bnb  # in the dev extra (0.50 runs its 8-bit AdamW on CPU tensors)

    made = []
    make_optimizer = M.make_optimizer
    monkeypatch.setattr(M, "make_optimizer", lambda *a, **k: made.append(make_optimizer(*a, **k)) or made[-1])
    res = T.train(tiny_config(dataset, tmp_path, **{"optim.adam_8bit": True, "train.max_steps": 2}))
    (opt,) = made
    assert isinstance(opt, bnb.optim.AdamW8bit)
    assert any(s.get("state1") is not None and s["state1"].dtype == torch.uint8 for s in opt.state.values())
    fresh = attach_regional_adapter(tiny_unet(0)).state_dict()
    moved = [k for k, v in res.adapter_state.items() if not torch.equal(v, fresh[k])]
    assert len(moved) > len(res.adapter_state) // 2 and np.isfinite(res.losses).all()


def test_asking_for_8bit_adamw_without_bitsandbytes_fails_clearly(monkeypatch):
    _hide_module(monkeypatch, "bitsandbytes")
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(
        RuntimeError, match=r"optim.adam_8bit needs bitsandbytes: pip install 'richlayout\[bnb\]'"
    ):
        M.make_optimizer(params, OptimConfig(adam_8bit=True))
    assert isinstance(M.make_optimizer(params, OptimConfig()), torch.optim.AdamW)  # plain AdamW needs none

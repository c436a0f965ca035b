"""FSDP2 (training/trainer/fsdp.py) on the MM-DiT transformers against DDP: two CPU processes over gloo.

One torchrun launch trains tiny FLUX.1 (double- and single-stream blocks) with DDP, with FSDP, and with FSDP
resumed from its mid-run checkpoint, in the same two processes: layout and caption dropout on, uneven
shards read as exact epochs, casa fusers and LoRA on the base attention, gradient accumulation, EMA,
validation. tiny SD3.5 (joint blocks, the first with the extra image-only attention) the same way in
``make test-slow``. In process, over a one-rank gloo group: the sharded transformer computes the plain
one's output, its blocks' keyword-passed hidden states are put on the gradient chain, and under bf16 the
float timestep reaches the root unrounded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_mmdit import LAYOUT, SIZE, _inputs, _randomize
from test_train import tiny_config
from test_train_fsdp import _max_diff, launch, one_rank_group, run_overrides, write_dataset

from training.model.adapter import is_adapter_key, set_adapter_trainable
from training.model.encoding import grounding_inputs
from training.model.lora import add_lora, is_lora_key
from training.model.mmdit.adapter import LAYOUT_KEY, attach_mmdit_adapter
from training.model.mmdit.config import MMDiTAdapterConfig
from training.model.mmdit.encoding import region_text_encoder, token_layout
from training.model.mmdit.tiny import tiny_mmdit_components
from training.trainer import fsdp as F
from training.trainer.config import ConfigError
from training.trainer.trainable import is_trainable_key

STEPS, CHECKPOINT = 12, 8  # the resumed run starts from step 8's checkpoint
SIZES = [5, 4, 2]  # uneven shards; an epoch (11) is no multiple of the 4 samples a step takes
# FSDP against DDP, absolute, on losses, gradient norms and weights after STEPS steps: the reductions sum in
# another order (reduce-scatter against all-reduce) and FSDP's AdamW is the foreach one, not the fused.
# Measured on tiny FLUX.1: see training/TRAINING.md (FSDP on MM-DiT).
TOL = 1e-6


def mmdit_overrides(dataset: str, out, *extra: str) -> list[str]:
    """test_train_fsdp's run (every dropout on, LoRA, accumulation 2, EMA) on the 16 px token grid, casa."""
    return run_overrides(
        dataset, out,
        "data.regions={max_objs: 4, max_regions: 8, max_slots: 6, downscale: 16}",
        f"train.max_steps={STEPS}", f"checkpoint.every_steps={CHECKPOINT}", "validation.every_steps=6",
        "model.model_type=casa", *extra,
    )  # fmt: skip


def _runs(folder, dataset: str, backbone: str) -> dict[str, dict]:
    step = folder / "fsdp" / "checkpoints" / f"step_{CHECKPOINT:07d}"
    runs = {
        "ddp": mmdit_overrides(dataset, folder / "ddp"),
        "fsdp": mmdit_overrides(dataset, folder / "fsdp", "train.distributed=fsdp"),
        "resumed": mmdit_overrides(dataset, folder / "resumed", "train.distributed=fsdp", f"checkpoint.resume={step}"),
    }
    return launch(folder, runs, preset=f"configs/train/tiny_{backbone}.yaml")


def _check(folder, r: dict[str, dict]) -> dict[str, float]:
    """The assertions; returns the measured FSDP - DDP differences (printed: ``pytest -s`` shows them)."""
    ddp, fsdp, resumed = r["ddp"], r["fsdp"], r["resumed"]
    measured = {"loss": 0.0, "grad_norm": 0.0, "weight": 0.0}
    for rank in (0, 1):
        assert len(fsdp["losses"][rank]) == len(ddp["losses"][rank]) == STEPS
        for key, ours, theirs in (("loss", fsdp["losses"], ddp["losses"]),
                                  ("grad_norm", fsdp["grad_norms"], ddp["grad_norms"])):  # fmt: skip
            diff = float(np.abs(np.subtract(ours[rank], theirs[rank])).max())
            measured[key] = max(measured[key], diff)
        measured["weight"] = max(measured["weight"], _max_diff(fsdp["weights"][rank], ddp["weights"][rank]))
        assert max(measured.values()) <= TOL, measured
        # resumed from FSDP's checkpoint (whole tensors cut back into shards): the same run, bit for bit
        assert resumed["losses"][rank] == fsdp["losses"][rank][CHECKPOINT:]
        assert _max_diff(resumed["weights"][rank], fsdp["weights"][rank]) == 0
    assert fsdp["losses"][0] != fsdp["losses"][1]  # each rank trained on its own samples
    w0, w1 = fsdp["weights"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(is_lora_key(k) for k in w0) and any(".fuser.self_attn." in k for k in w0)
    # Not a vacuous equality: the steps moved the fusers' zero-initialised outputs far beyond TOL.
    outs = [k for k in w0 if is_adapter_key(k) and k.endswith("to_out.0.weight")]
    assert outs and min(float(w0[k].abs().max()) for k in outs) > 1e3 * TOL
    for step in (6, STEPS):  # every rank generated through the sharded transformer; the main rank saved it
        name = f"validation/step_{step:07d}_0.png"
        ours, theirs = (np.asarray(Image.open(folder / run / name), np.float32) for run in ("fsdp", "ddp"))
        assert np.abs(ours - theirs).mean() < 0.5, name
    return measured


def test_fsdp_trains_tiny_flux_as_ddp_does_and_resumes_exactly(tmp_path):
    """Over STEPS steps crossing a checkpoint and two validations: FSDP's losses, gradient norms and weights
    are DDP's within TOL on every rank; the resumed run is the uninterrupted one bit for bit."""
    dataset = write_dataset(tmp_path / "shards", sizes=SIZES)
    print("tiny FLUX.1, FSDP - DDP, max abs:", _check(tmp_path, _runs(tmp_path, dataset, "flux")))


@pytest.mark.slow  # the same three runs on tiny SD3.5: about a minute more
def test_fsdp_trains_tiny_sd3_as_ddp_does_and_resumes_exactly(tmp_path):
    dataset = write_dataset(tmp_path / "shards", sizes=SIZES)
    print("tiny SD3.5, FSDP - DDP, max abs:", _check(tmp_path, _runs(tmp_path, dataset, "sd3")))


# ---------------------------------------------------------------------------------------------------
# In process: one rank


def _transformer(base: str, lora: bool = True):
    components = tiny_mmdit_components(base)
    backbone = base.removeprefix("tiny-")
    encoder = region_text_encoder(components, backbone, "t5", 32)
    transformer = components["transformer"]
    attach_mmdit_adapter(transformer, MMDiTAdapterConfig(backbone=backbone, model_type="casa"), encoder.hidden_size)
    params = set_adapter_trainable(transformer) + (add_lora(transformer, 2) if lora else [])
    _randomize(transformer)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)  # LoRA's zero B too: every trainable weight matters
    gligen = grounding_inputs([token_layout(*LAYOUT, SIZE, SIZE)], encoder, max_slots=8)
    return transformer.train(), backbone, {LAYOUT_KEY: gligen}


@pytest.mark.parametrize("base", ["tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_rank_fsdp_transformer_computes_the_plain_one_and_puts_keyword_hidden_states_on_the_chain(
    tmp_path, base, checkpointing
):
    """The sharded transformer's output is the plain one's bit for bit, its gradients up to the order of
    sums; every fused block's hidden states (a keyword, or positional under gradient checkpointing) enter
    requiring a gradient, so its reduce-scatter hangs on the hidden-state chain."""
    config = tiny_config("unused", tmp_path, **{"train.distributed": "fsdp"})
    plain, backbone, jak = _transformer(base)
    kw = {**_inputs(backbone, SIZE, SIZE), "joint_attention_kwargs": jak}
    expected = plain(**kw)[0]
    expected.square().mean().backward()
    expected_grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}

    with one_rank_group():
        model, _, _ = _transformer(base)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model = F.shard_unet(model, config, torch.device("cpu"), 1)
        blocks = [m for m in model.modules() if isinstance(m, F.FSDP_UNITS)]
        assert len(blocks) == len(model.transformer_blocks) + len(getattr(model, "single_transformer_blocks", []))
        seen = []
        for block in blocks:
            block.register_forward_pre_hook(
                lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).requires_grad), with_kwargs=True
            )
        out = model(**kw)[0]
        assert torch.equal(out, expected)
        assert len(seen) >= len(blocks) and all(seen)
        out.square().mean().backward()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert params.keys() == expected_grads.keys()
        for n, g in expected_grads.items():
            torch.testing.assert_close(params[n].grad.full_tensor(), g, rtol=1e-5, atol=1e-7)
        state = F.full_state(model, is_trainable_key)
        assert state.keys() == expected_grads.keys()


def test_bf16_fsdp_transformer_keeps_float_inputs_float_and_refuses_bf16_shards_without_autocast(tmp_path):
    """bf16 shards under bf16 autocast: SD3's timesteps 998 and 999 (both 1000 in bf16) give different
    outputs, as the plain bf16 transformer under autocast does, and FLUX's blocks get their rotary cos / sin
    in fp32 (no unit casts its inputs); bf16 shards with mixed_precision "no" are refused, naming both."""
    config = tiny_config("unused", tmp_path, **{"train.distributed": "fsdp", "train.mixed_precision": "bf16"})
    kw = _inputs("sd3", SIZE, SIZE)
    with one_rank_group():
        model = F.shard_unet(_transformer("tiny-sd3", lora=False)[0], config, torch.device("cpu"), 1)
        dtypes = {p.to_local().dtype for p in model.parameters() if not p.requires_grad}
        assert dtypes == {torch.bfloat16}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = (model(**{**kw, "timestep": torch.tensor([t])})[0] for t in (998.0, 999.0))
        assert a.dtype == torch.bfloat16 and not torch.equal(a, b)
        flux, _, jak = _transformer("tiny-flux", lora=False)
        flux = F.shard_unet(flux, config, torch.device("cpu"), 1)
        seen = []
        for block in [*flux.transformer_blocks, *flux.single_transformer_blocks]:
            block.register_forward_pre_hook(lambda m, a, k: seen.append(k["image_rotary_emb"][0].dtype), with_kwargs=True)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            flux(**_inputs("flux", SIZE, SIZE), joint_attention_kwargs=jak)
        assert seen == [torch.float32] * 4
        refused = tiny_config("unused", tmp_path, **{"train.distributed": "fsdp", "train.fsdp.param_dtype": "bf16"})
        with pytest.raises(ConfigError, match="train.fsdp.param_dtype=bf16 with train.mixed_precision=no"):
            F.shard_unet(_transformer("tiny-sd3", lora=False)[0], refused, torch.device("cpu"), 1)

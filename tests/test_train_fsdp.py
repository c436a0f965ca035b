"""FSDP2 (training/trainer/fsdp.py) against DDP: two CPU processes over gloo, the code GPUs run too.

One torchrun launch trains, in the same two processes (a fresh process group for each run), the tiny
preset with DDP, with FSDP, and with FSDP resumed from its mid-run checkpoint: layout and caption dropout
on, uneven shards read as exact epochs, LoRA with the adapter, gradient accumulation, EMA, validation.
The in-process tests shard a UNet over a one-rank gloo group: the dtypes, the hook that keeps collectives
in order, and the gather / cut round trips.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from _model_fixtures import tiny_sdxl_unet_inputs
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file
from test_train import tiny_config, write_dataset

from training.inference.pipeline import LayoutPipeline
from training.model.adapter import (
    attach_regional_adapter,
    is_adapter_key,
    load_adapter,
    set_adapter_trainable,
    transformer_blocks,
)
from training.model.lora import add_lora, is_lora_key, load_lora
from training.model.tiny import tiny_sdxl_components, tiny_unet
from training.trainer import accelerator as A
from training.trainer import fsdp as F
from training.trainer.checkpoint import verify_checkpoint
from training.trainer.config import ConfigError
from training.trainer.trainable import is_trainable_key
from training.trainer.validation import generate_validation

ROOT = Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT, VALIDATE = 20, 15, 10  # the resumed run starts from step 15's checkpoint
SIZES = [7, 4, 2]  # samples per shard: uneven, and an epoch (13) is no multiple of the 4 a step takes
# FSDP against DDP, absolute, on losses, gradient norms and weights (|w| <= ~2.3) after STEPS steps: the
# reductions sum in another order (reduce-scatter of shards against DDP's all-reduce), and the optimizer is
# the foreach AdamW rather than the fused one. Measured: 1.2e-7 (see training/TRAINING.md).
TOL = 1e-6
LAYOUT = {"caption": "a red square", "boxes": [[8, 8, 40, 40]], "labels": ["a red square on the left"]}

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from accelerate.state import AcceleratorState
    from safetensors.torch import save_file
    from training.trainer.loop import train
    from training.trainer.config import TrainConfig

    out, preset, runs, ports = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    for i, (name, overrides) in enumerate(runs.items()):
        if i:  # train() ends by destroying the process group: the next run meets on a port of its own
            os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
            os.environ["MASTER_PORT"] = str(ports[i])
        result = train(TrainConfig.from_yaml(preset, overrides))
        rank = AcceleratorState().process_index
        save_file(result.adapter_state, f"{out}/{name}_{rank}.safetensors")
        with open(f"{out}/{name}_{rank}.json", "w") as f:
            json.dump({"losses": result.losses, "grad_norms": result.grad_norms}, f)
        AcceleratorState._reset_state(True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_overrides(dataset: str, out: Path, *extra: str) -> list[str]:
    """The tiny preset on the uneven shards, every dropout on, a checkpoint at CHECKPOINT, validation at
    VALIDATE, both at the end."""
    return [
        f"output_dir={out}",
        f"data.datasets=[{{path: {dataset}, augment: {{size: [64, 64], max_objects: 4}}}}]",
        "data.regions={max_objs: 4, max_regions: 8, max_slots: 6}",
        "data.batch_size=1",
        "data.resampled=false",  # exact epochs over the uneven shards
        "data.epoch_samples=null",
        f"train.max_steps={STEPS}",
        "train.gradient_accumulation_steps=2",
        "train.layout_dropout=0.5",
        "train.caption_dropout=0.3",
        "model.lora_rank=2",
        "ema.update_after_step=0",
        f"validation.every_steps={VALIDATE}",
        f"validation.layouts=[{json.dumps(LAYOUT)}]",
        f"checkpoint.every_steps={CHECKPOINT}",
        "checkpoint.keep_last=null",
        "checkpoint.resume=null",
        "log.tensorboard=false",
        *extra,
    ]


def launch(folder: Path, runs: dict[str, list[str]], preset: str = "configs/train/tiny.yaml") -> dict[str, dict]:
    """Run each of ``runs`` (name: overrides of ``preset``) in turn in two torchrun processes on CPU (gloo);
    per run and rank the trainable weights and losses it returned."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "worker.py"
    script.write_text(WORKER)
    ports = [_free_port() for _ in runs]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(ports[0]),
           str(script), str(folder), preset, json.dumps(runs), json.dumps(ports)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "127.0.0.1"}  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {
        name: {
            "weights": [load_file(folder / f"{name}_{r}.safetensors") for r in (0, 1)],
            **{k: [json.loads((folder / f"{name}_{r}.json").read_text())[k] for r in (0, 1)]
               for k in ("losses", "grad_norms")},
        }  # fmt: skip
        for name in runs
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("uneven"), sizes=SIZES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset) -> tuple[Path, dict[str, dict]]:
    """DDP, FSDP, and FSDP resumed at CHECKPOINT from the FSDP run's checkpoint, in one launch."""
    folder = tmp_path_factory.mktemp("fsdp")
    step = folder / "fsdp" / "checkpoints" / f"step_{CHECKPOINT:07d}"
    return folder, launch(
        folder,
        {
            "ddp": run_overrides(dataset, folder / "ddp"),
            "fsdp": run_overrides(dataset, folder / "fsdp", "train.distributed=fsdp"),
            "resumed": run_overrides(
                dataset, folder / "resumed", "train.distributed=fsdp", f"checkpoint.resume={step}"
            ),
        },
    )


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_fsdp_trains_as_ddp_does(runs):
    """Over STEPS steps crossing a checkpoint and two validations, FSDP's losses, gradient norms and weights
    are DDP's within TOL on every rank; the gathered weights are the same on both ranks."""
    _, r = runs
    ddp, fsdp = r["ddp"], r["fsdp"]
    for rank in (0, 1):
        assert len(fsdp["losses"][rank]) == len(ddp["losses"][rank]) == STEPS
        assert np.abs(np.subtract(fsdp["losses"][rank], ddp["losses"][rank])).max() <= TOL
        assert np.abs(np.subtract(fsdp["grad_norms"][rank], ddp["grad_norms"][rank])).max() <= TOL
        assert _max_diff(fsdp["weights"][rank], ddp["weights"][rank]) <= TOL
    assert fsdp["losses"][0] != fsdp["losses"][1]  # each rank trained on its own samples
    w0, w1 = fsdp["weights"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(is_lora_key(k) for k in w0) and any(map(is_adapter_key, w0))
    # Not a vacuous equality: the steps moved every kind of trainable weight far beyond TOL.
    fresh = attach_regional_adapter(tiny_unet(0)).state_dict()
    assert min(float((w0[k] - fresh[k]).abs().max()) for k in w0 if k in fresh and "to_out" in k) > 1e3 * TOL


def _files(run: Path, folder: str = "adapter") -> dict[str, dict[str, torch.Tensor]]:
    names = ("adapter.safetensors", "adapter_ema.safetensors", "lora.safetensors", "lora_ema.safetensors")
    return {name: load_file(run / folder / name) for name in names}


def test_fsdp_checkpoints_and_final_files_are_the_adapter_only_files_ddp_writes(runs):
    """The mid-run checkpoint and the final files: the adapter (and LoRA) tensors only, gathered whole,
    DDP's within TOL, the optimizer state too (one whole file, not shards)."""
    folder, _ = runs
    ckpt = f"checkpoints/step_{CHECKPOINT:07d}"
    for where in (ckpt, "adapter"):
        ours, theirs = _files(folder / "fsdp", where), _files(folder / "ddp", where)
        for name, state in ours.items():
            assert _max_diff(state, theirs[name]) <= TOL, (where, name)
        assert all(map(is_adapter_key, ours["adapter.safetensors"]))  # no frozen base weight in them
    assert not list((folder / "fsdp" / ckpt).glob("optimizer_shard*"))
    assert verify_checkpoint(folder / "fsdp" / ckpt) is None
    ours, theirs = (torch.load(folder / run / ckpt / "optimizer.bin", weights_only=True) for run in ("fsdp", "ddp"))
    assert ours["state"].keys() == theirs["state"].keys()
    kernel = ("fused", "foreach")  # FSDP's AdamW is the foreach one: sharded parameters are not fused
    assert [{k: v for k, v in g.items() if k not in kernel} for g in ours["param_groups"]] == [
        {k: v for k, v in g.items() if k not in kernel} for g in theirs["param_groups"]
    ]
    for i, state in ours["state"].items():
        assert state.keys() == theirs["state"][i].keys()
        for k, v in state.items():
            assert v.shape == theirs["state"][i][k].shape and float((v - theirs["state"][i][k]).abs().max()) <= TOL


def test_fsdp_resumes_from_its_checkpoint_where_the_run_stood(runs):
    """FSDP resumed from its step-CHECKPOINT checkpoint (weights and optimizer cut back into shards) trains
    the remaining steps as the uninterrupted run did, bit for bit (the shards are exact pieces of the
    whole tensors saved, and one thread per process sums in a fixed order)."""
    folder, r = runs
    resumed, fsdp = r["resumed"], r["fsdp"]
    for rank in (0, 1):
        assert resumed["losses"][rank] == fsdp["losses"][rank][CHECKPOINT:]
        assert _max_diff(resumed["weights"][rank], fsdp["weights"][rank]) == 0
    ours, theirs = _files(folder / "resumed"), _files(folder / "fsdp")
    for name, state in ours.items():
        assert _max_diff(state, theirs[name]) == 0, name


def test_fsdp_files_load_into_one_process_and_generate_the_validation_image(runs):
    """The FSDP run's final EMA files in a fresh single-process pipeline make the validation image the
    sharded UNet made on two ranks (EMA weights, LoRA included), which is DDP's."""
    folder, _ = runs
    run = folder / "fsdp"
    config = tiny_config("unused", folder / "unused", **{"validation.layouts": [LAYOUT]})
    components = tiny_sdxl_components(config.model.tiny_seed)
    unet = attach_regional_adapter(components["unet"]).eval()
    assert load_adapter(unet, run / "adapter" / "adapter_ema.safetensors").loaded > 0
    load_lora(unet, run / "adapter" / "lora_ema.safetensors")
    sdxl = StableDiffusionXLPipeline(**components, add_watermarker=False)
    sdxl.set_progress_bar_config(disable=True)
    r = config.data.regions
    pipe = LayoutPipeline(sdxl, max_objects=r.max_objs, max_regions=r.max_regions, max_slots=r.max_slots)
    (image,) = generate_validation(pipe, list(config.validation.layouts), config)
    saved = Image.open(run / "validation" / f"step_{STEPS:07d}_0.png").convert("RGB")
    assert np.abs(np.asarray(saved, np.float32) - np.asarray(image.convert("RGB"), np.float32)).max() <= 1.0
    for step in (VALIDATE, STEPS):  # and DDP's main rank made the same images, float rounding apart
        name = f"validation/step_{step:07d}_0.png"
        ours, theirs = (np.asarray(Image.open(folder / r / name), np.float32) for r in ("fsdp", "ddp"))
        assert np.abs(ours - theirs).mean() < 0.5, name


@pytest.mark.slow
def test_the_documented_cpu_launch_trains_fsdp_with_gradient_checkpointing_as_ddp_does(tmp_path, dataset):
    """``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m training.train ...`` with
    FSDP and gradient checkpointing writes the adapter files DDP (checkpointing too) writes, within TOL."""
    extra = ["model.gradient_checkpointing=true", "train.max_steps=6", "validation.every_steps=null",
             "checkpoint.every_steps=null"]  # fmt: skip
    overrides = run_overrides(dataset, tmp_path / "fsdp", *extra)
    launch(tmp_path / "ddp", {"ddp": run_overrides(dataset, tmp_path / "ddp" / "run", *extra)})
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "training.train", "--config", "configs/train/tiny.yaml",
           *[a for o in [*overrides, "train.distributed=fsdp"] for a in ("--override", o)]]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 6
    ours, theirs = _files(tmp_path / "fsdp"), _files(tmp_path / "ddp" / "run")
    for name, state in ours.items():
        assert _max_diff(state, theirs[name]) <= TOL, name


# ---------------------------------------------------------------------------------------------------
# Refusals and the one-process case


def test_accelerates_own_fsdp_launch_is_refused_and_fsdp_runs_on_cpu_and_gpu_processes():
    from accelerate.utils import DistributedType

    with pytest.raises(ConfigError, match="launched with its FSDP plugin .* launch with --multi_gpu"):
        A.check_distributed("ddp", DistributedType.FSDP)
    for kind in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        A.check_distributed("fsdp", kind)
    with pytest.raises(ConfigError, match="train.distributed=fsdp is not supported"):
        A.check_distributed("fsdp", DistributedType.DEEPSPEED)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train.mixed_precision": "fp16"}, "fp16 needs a loss scaler that knows sharded gradients"),
        ({"optim.adam_8bit": True}, "optim.adam_8bit .* cannot update sharded parameters"),
    ],
)
def test_what_fsdp_cannot_run_is_refused_before_anything_is_built(tmp_path, override, message):
    config = tiny_config("unused", tmp_path, **{"train.distributed": "fsdp", **override})
    with pytest.raises(ConfigError, match=message):
        A.make_accelerator(config)


def test_fsdp_with_a_single_process_warns_and_trains_unwrapped(tmp_path, monkeypatch, caplog):
    from accelerate.utils import DistributedType

    from training.trainer.fsdp import uses_fsdp

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # accelerate sets it for the process; restored after
    config = tiny_config("unused", tmp_path, **{"train.distributed": "fsdp"})
    with caplog.at_level("WARNING", logger="training.trainer.accelerator"):
        accelerator = A.make_accelerator(config)
    assert accelerator.distributed_type == DistributedType.NO and not uses_fsdp(config, 1)
    assert "train.distributed=fsdp with a single process" in caplog.text


# ---------------------------------------------------------------------------------------------------
# In process: FSDP2 over a one-rank gloo group (the DTensor code paths, without a second process)


@contextmanager
def one_rank_group():
    """A gloo process group of this process alone, destroyed after (accelerate must not see it)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _unet_with_lora(seed: int = 0):
    torch.manual_seed(seed)
    unet = attach_regional_adapter(tiny_unet(0))
    params = set_adapter_trainable(unet) + add_lora(unet, 2)
    with torch.no_grad():  # non-zero output projections and LoRA: every trainable weight matters
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
    return unet.train()


def test_one_rank_fsdp_computes_the_plain_unet_and_gathers_and_cuts_state_exactly(tmp_path):
    """fp32 on one rank: the sharded UNet's output is the plain UNet's bit for bit, its gradients up to the
    order of sums (measured 3.3e-9, relative 6.6e-7); the first
    trainable block's hidden states require a gradient (the hook); the trainable state and the optimizer
    state gather whole (no DTensor left) and cut back into shards unchanged; a wrong shape is refused."""
    from torch.distributed.tensor import DTensor

    config = tiny_config("unused", tmp_path, **{"train.distributed": "fsdp"})
    inputs = tiny_sdxl_unet_inputs()
    plain = _unet_with_lora()
    expected = plain(**inputs, return_dict=False)[0]
    expected.square().mean().backward()
    expected_grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}

    with one_rank_group():
        unet = F.shard_unet(_unet_with_lora(), config, torch.device("cpu"), 1)
        assert F.is_sharded(unet) and not F.is_sharded(plain)
        first = next(b for _, b in transformer_blocks(unet))
        seen = []
        first.register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
        out = unet(**inputs, return_dict=False)[0]
        assert torch.equal(out, expected) and seen == [True]
        out.square().mean().backward()
        params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
        assert params.keys() == expected_grads.keys() and all(isinstance(p, DTensor) for p in params.values())
        for n, g in expected_grads.items():  # summed in another order (FSDP's hooks regroup the graph)
            torch.testing.assert_close(params[n].grad.full_tensor(), g, rtol=1e-5, atol=1e-8)

        state = F.full_state(unet, is_trainable_key)
        assert state.keys() == expected_grads.keys()
        assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in state.values())
        changed = {k: v + 1 for k, v in state.items()}
        assert F.load_full_state(unet, {**changed, "not.a.weight": torch.zeros(1)}) == ["not.a.weight"]
        assert all(torch.equal(F.full_state(unet, is_trainable_key)[k], v) for k, v in changed.items())
        key = next(iter(state))
        with pytest.raises(ValueError, match=f"{key}: shape"):
            F.load_full_state(unet, {key: torch.zeros(3, 3, 3)})

        optimizer = torch.optim.AdamW(list(params.values()), foreach=True)
        optimizer.step()
        whole = F.gather_optimizer_state(optimizer)
        assert not any(isinstance(v, DTensor) for s in whole["state"].values() for v in s.values())
        fresh = torch.optim.AdamW(list(params.values()), foreach=True)
        fresh.load_state_dict(F.shard_optimizer_state(fresh, whole))
        for i, s in fresh.state_dict()["state"].items():
            for k, v in s.items():
                v = v.full_tensor() if isinstance(v, DTensor) else v
                assert torch.equal(v, whole["state"][i][k]), (i, k)


def test_bf16_fsdp_stores_frozen_shards_in_bf16_and_keeps_fp32_master_weights(tmp_path):
    """``param_dtype: auto`` under bf16: frozen shards stored in bf16, trainable ones fp32, the units compute
    in bf16 and the gradients come back reduced in fp32 (``reduce_dtype``)."""
    config = tiny_config("unused", tmp_path, **{"train.distributed": "fsdp", "train.mixed_precision": "bf16"})
    with one_rank_group():
        unet = F.shard_unet(_unet_with_lora(), config, torch.device("cpu"), 1)
        dtypes = {n: (p.requires_grad, p.to_local().dtype) for n, p in unet.named_parameters()}
        assert {d for trainable, d in dtypes.values() if trainable} == {torch.float32}
        assert {d for trainable, d in dtypes.values() if not trainable} == {torch.bfloat16}
        out = unet(**tiny_sdxl_unet_inputs(), return_dict=False)[0]
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        grads = [p.grad for p in unet.parameters() if p.requires_grad]
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g.to_local()).all() for g in grads)
        assert any(g.to_local().any() for g in grads)

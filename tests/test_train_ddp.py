"""Two processes under ``accelerate launch``: DDP on CPU (gloo; different data per rank, identical weights
after). One launch trains two runs in turn in the same two processes (the launch and the imports are most of
a tiny run's cost); a second launch resumes the first run's checkpoint in fresh processes. FSDP against DDP is
in test_train_fsdp.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from _model_fixtures import region_encoder, tiny_sdxl_unet_inputs
from safetensors.torch import load_file
from test_stream import write_dataset as write_uneven_dataset
from test_train import write_dataset

from training.data.plan import rank_positions
from training.layout.regions import empty_layout
from training.model.adapter import (
    AdapterConfig,
    attach_regional_adapter,
    is_adapter_key,
    set_adapter_trainable,
)
from training.model.encoding import grounding_inputs
from training.model.lora import add_lora, is_lora_key
from training.model.tiny import tiny_unet
from training.trainer.checkpoint import verify_checkpoint
from training.trainer.config import TrainConfig
from training.trainer.step import sample_draws, sample_seeds

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from safetensors.torch import save_file
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from training.trainer.loop import train
    from training.trainer.config import TrainConfig

    # Before each optimizer step (synchronising micro-batches only): how many trainable tensors lack a
    # gradient on this rank.
    missing = []
    register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: missing.append(
            sum(p.grad is None for group in opt.param_groups for p in group["params"])
        )
    )
    out, runs, ports = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    for i, (name, overrides) in enumerate(runs.items()):
        if i:  # train() ends by destroying the process group: the next run meets on a port of its own
            os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
            os.environ["MASTER_PORT"] = str(ports[i])
        missing.clear()
        result = train(TrainConfig.from_yaml("configs/train/tiny.yaml", overrides))
        rank = PartialState().process_index
        save_file(result.adapter_state, f"{out}/{name}_rank{rank}.safetensors")
        with open(f"{out}/{name}_losses{rank}.json", "w") as f:
            json.dump({"losses": result.losses, "missing_grads": missing}, f)
        AcceleratorState._reset_state(True)
    """
)

STEPS = 3  # validation at step 2 (EMA and raw weights differ by then) and 3: training goes on after one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """What a two-process run left: each rank's trainable weights and losses, and the run folder."""

    out: Path  # the run's output_dir
    weights: list[dict[str, torch.Tensor]]  # per rank: TrainResult.adapter_state
    losses: list[list[float]]  # per rank
    missing_grads: list[list[int]]  # per rank, per optimizer step: trainable tensors without a gradient


def run_overrides(run: Path, dataset: str, *overrides: str) -> list[str]:
    """The tiny preset's overrides of these runs (output folder ``run``), then ``overrides``."""
    return [
        f"output_dir={run}",
        f"data.datasets=[{{path: {dataset}, augment: {{size: [64, 64], max_objects: 4}}}}]",
        "data.regions={max_objs: 4, max_regions: 8, max_slots: 6}",
        "data.batch_size=1",
        "data.epoch_samples=8",
        f"train.max_steps={STEPS}",
        "train.gradient_accumulation_steps=2",
        "model.lora_rank=2",  # LoRA on the base attention as well as the adapter
        "ema.update_after_step=0",
        "validation.every_steps=2",
        "validation.num_images=1",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=null",
        "checkpoint.resume=null",
        "log.tensorboard=false",
        *overrides,
    ]


def launch_runs(folder: Path, runs: dict[str, list[str]]) -> dict[str, Run]:
    """Train the tiny preset with each of ``runs`` (name: overrides, output_dir ``folder / name``) in turn, in
    the same two CPU processes under one ``accelerate launch``: each launch costs both processes the imports
    and the model build again."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "worker.py"
    script.write_text(WORKER)
    ports = [_free_port() for _ in runs]
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(ports[0]),
        str(script), str(folder), json.dumps(runs), json.dumps(ports),
    ]  # fmt: skip
    # ACCELERATE_USE_CPU turns --multi_gpu's torchrun workers into a gloo process group on CPU
    # (``--cpu`` would make accelerate start a single process).
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "1",
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = {}
    for name in runs:
        logs = [json.loads((folder / f"{name}_losses{r}.json").read_text()) for r in (0, 1)]
        done[name] = Run(
            out=folder / name,
            weights=[load_file(folder / f"{name}_rank{r}.safetensors") for r in (0, 1)],
            losses=[log["losses"] for log in logs],
            missing_grads=[log["missing_grads"] for log in logs],
        )
    return done


def launch(folder: Path, dataset: str, *overrides: str) -> Run:
    """Train the tiny preset once with two CPU processes under ``accelerate launch`` (output ``folder/run``)."""
    return launch_runs(folder, {"run": run_overrides(folder / "run", dataset, *overrides)})["run"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("shards"), shards=2, per_shard=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset, uneven) -> dict[str, Run]:
    """One launch, two runs in the same two processes: "ddp", the STEPS-step run the tests below check and
    resume; "dropout", DROPOUT_STEPS steps of caption and layout dropout 0.5 on the uneven shards, checkpointed
    at RESUME_AT for the one-process resume below."""
    folder = tmp_path_factory.mktemp("ddp")
    return launch_runs(
        folder,
        {
            "ddp": run_overrides(folder / "ddp", dataset),
            "dropout": run_overrides(
                folder / "dropout", uneven, *dropout_overrides(0.5, DROPOUT_STEPS), f"checkpoint.every_steps={RESUME_AT}"
            ),
        },
    )


@pytest.fixture(scope="module")
def ddp(runs) -> Run:
    return runs["ddp"]


def test_two_processes_train_with_identical_weights_on_both_ranks(ddp):
    w0, w1 = ddp.weights
    assert w0.keys() == w1.keys() and any(is_lora_key(k) for k in w0) and any(map(is_adapter_key, w0))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # all-reduced gradients, same updates
    l0, l1 = ddp.losses
    assert len(l0) == len(l1) == STEPS and l0 != l1  # each rank saw its own data
    # The checkpoint holds both ranks' stream positions.
    folder = ddp.out / "checkpoints" / f"step_{STEPS:07d}"
    state = json.loads((folder / "stream_state.json").read_text())
    assert sorted(state["ranks"]) == ["0", "1"]
    # The steps moved the adapter; the checkpoint is intact and holds no UNet or pickled state.
    fresh = attach_regional_adapter(tiny_unet(0)).state_dict()
    assert any(not torch.equal(w0[k], fresh[k]) for k in w0 if is_adapter_key(k))
    assert verify_checkpoint(folder) is None and (folder / "optimizer.bin").exists()
    assert not list(folder.glob("pytorch_model*")) and not list(folder.glob("*.pkl"))


def test_a_two_process_run_resumes_from_its_checkpoint_as_if_it_never_stopped(tmp_path, dataset, ddp):
    """Two processes resume the two-process run's step-1 checkpoint (the optimizer state read onto the CPU,
    then moved): steps 2 and 3 give each rank the losses and the weights of the uninterrupted run, bit for bit."""
    step1 = ddp.out / "checkpoints" / "step_0000001"
    resumed = launch(tmp_path / "resumed", dataset, f"checkpoint.resume={step1}")
    assert resumed.losses == [losses[1:] for losses in ddp.losses]
    for ours, theirs in zip(resumed.weights, ddp.weights, strict=True):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for name, state in _files(resumed.out).items():
        assert all(torch.equal(state[k], _files(ddp.out)[name][k]) for k in state), name


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    """Shards of 7, 4 and 2 samples: an exact epoch over two ranks evens them out with one repeat."""
    root = tmp_path_factory.mktemp("uneven")
    write_uneven_dataset(root, [7, 4, 2])
    return str(root)


# Exact epochs over the uneven shards (not a resampled stream), caption dropout on, nothing else saved.
DROPOUT = (
    "data.resampled=false",
    "data.epoch_samples=null",
    "train.caption_dropout=0.5",
    "validation.every_steps=null",
    "checkpoint.every_steps=null",
)
DROPOUT_STEPS = 12  # seven of them drop the layout on one rank only at the synchronising micro-batch
RESUME_AT = 8  # the dropout run's checkpoint that one process resumes with batch 2
EPOCH_BATCHES = 7  # 13 samples in global batches of 2: the 7th holds one repeat (position 13)


def _place(rank: int, micro: int) -> tuple[int, int]:
    """(epoch, position) of rank ``rank``'s micro-batch ``micro`` (batch 1 on 2 ranks) in the uneven shards."""
    return micro // EPOCH_BATCHES, int(rank_positions(0, micro % EPOCH_BATCHES, rank, 2, 1)[0])


def _dropped(config: TrainConfig, rank: int, micro: int) -> tuple[bool, bool]:
    """Whether that sample's (caption, layout) is dropped."""
    draws = sample_draws(sample_seeds(config, [_place(rank, micro)]), (4, 8, 8), config, 1000)
    return draws.drop_caption[0], draws.drop_layout[0]


def _ranks_disagree(layout_dropout: float, steps: int) -> list[int]:
    """Optimizer steps whose synchronising micro-batch (batch 1, accumulation 2) has its layout dropped on
    one rank only: the case that stopped DDP before every weight took part in every backward."""
    config = TrainConfig.from_yaml(
        "configs/train/tiny.yaml", ["train.caption_dropout=0.5", f"train.layout_dropout={layout_dropout}"]
    )
    dropped = [[_dropped(config, rank, m)[1] for m in range(2 * steps)] for rank in (0, 1)]
    return [s for s in range(steps) if dropped[0][2 * s + 1] != dropped[1][2 * s + 1]]


def dropout_overrides(layout_dropout: float, steps: int) -> tuple[str, ...]:
    return (*DROPOUT, f"train.layout_dropout={layout_dropout}", f"train.max_steps={steps}")


def _check_dropped_layouts(run: Run, steps: int) -> None:
    assert [len(losses) for losses in run.losses] == [steps, steps]
    # Every trainable tensor had a gradient on both ranks before every optimizer step ...
    assert run.missing_grads == [[0] * steps] * 2
    # ... so DDP all-reduced them all, and both ranks moved their weights identically.
    w0, w1 = run.weights
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(np.isfinite(run.losses[r]).all() for r in (0, 1))


def test_layout_dropout_on_one_rank_only_keeps_ddp_in_step(runs):
    """Layout dropout 0.5, 12 steps on uneven shards: seven synchronising micro-batches, the first at step 1,
    drop the layout on one rank only (before the zero path, the first of them aborted the run in gloo)."""
    assert len(_ranks_disagree(0.5, DROPOUT_STEPS)) == 7
    _check_dropped_layouts(runs["dropout"], DROPOUT_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("layout_dropout", [0.5, 1.0])
def test_forty_steps_of_layout_dropout_keep_ddp_in_step(tmp_path, uneven, layout_dropout):
    """40 steps on uneven shards with layout dropout 0.5 (ranks disagree on many steps) and 1.0 (no fuser
    ever attends, on either rank): every trainable tensor has a gradient on both ranks at every step."""
    assert layout_dropout == 1.0 or len(_ranks_disagree(layout_dropout, 40)) >= 10
    _check_dropped_layouts(launch(tmp_path / "ddp", uneven, *dropout_overrides(layout_dropout, 40)), 40)


def _files(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    names = ("adapter.safetensors", "adapter_ema.safetensors", "lora.safetensors", "lora_ema.safetensors")
    return {name: load_file(run / "adapter" / name) for name in names}


# ---------------------------------------------------------------------------------------------------
# Every trainable weight in every backward (the model's zero path)


@pytest.mark.parametrize("model_type", ["ca", "casa"])
def test_a_batch_without_layouts_reaches_every_trainable_weight_and_leaves_the_output_bit_identical(
    model_type,
):
    """Every layout dropped: no fuser attends and the position net's features reach nothing, yet every
    adapter and LoRA weight gets a gradient (exactly 0 where only the zero path reaches it), and the UNet's
    output has the bits of the empty layout's output without the zero path (computed under no_grad, where
    the model adds nothing). A batch with a layout is bit-identical too."""
    torch.manual_seed(0)
    unet = attach_regional_adapter(tiny_unet(0), AdapterConfig(model_type=model_type))
    params = set_adapter_trainable(unet) + add_lora(unet, 2)
    with torch.no_grad():  # non-zero output projections, null features and LoRA: nothing vanishes by luck
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
    unet.train()
    mixed = tiny_sdxl_unet_inputs()  # the empty layout and a random one
    dropped = grounding_inputs([empty_layout(64, 64)] * 2, region_encoder(), max_slots=5)
    grads = {}
    for name, inputs in (
        ("one layout kept", mixed),
        ("every layout dropped", {**mixed, "cross_attention_kwargs": {"gligen": dropped}}),
    ):
        with torch.no_grad():
            reference = unet(**inputs, return_dict=False)[0]
        out = unet(**inputs, return_dict=False)[0]
        assert torch.equal(out, reference), name
        unet.zero_grad(set_to_none=True)
        out.square().mean().backward()
        grads = {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values()), (name, [n for n, g in grads.items() if g is None])
    # With every layout dropped only the fusers' null features were used: every other adapter weight got
    # an exact 0 (the zero path), the nulls and the LoRA a real gradient.
    zero = [n for n in grads if is_adapter_key(n) and not n.endswith(".fuser.null_text_feat")]
    assert zero and all(not grads[n].any() for n in zero)
    assert all(grads[n].any() for n in grads if n.endswith(".fuser.null_text_feat"))
    assert any(grads[n].any() for n in grads if is_lora_key(n))
    assert model_type == "ca" or any(".fuser.self_attn." in n for n in zero)


def test_a_two_process_checkpoint_resumes_in_one_process_where_the_global_order_stood(tmp_path, uneven, runs):
    """Fewer processes after a stop: the stream's one global position is re-split over the new ranks, so one
    process with twice the batch (1 x batch 2 x accumulation 2, after 2 x batch 1 x 2: 4 samples per step
    either way) goes on from the sample where the two stood, and, each sample's noise, timestep and dropouts
    keyed by its (epoch, position), with the losses and weights of the uninterrupted two-process run up to
    float summation order. Caption and layout dropout 0.5 on uneven shards; the 4 resumed steps cross an
    epoch's end and its repeat (position 13) and drop captions and layouts on some samples only."""
    from training.trainer.loop import train

    dropout = runs["dropout"]
    saved_at = dropout.out / "checkpoints" / f"step_{RESUME_AT:07d}"
    run = tmp_path / "one"
    overrides = (*dropout_overrides(0.5, DROPOUT_STEPS), f"checkpoint.resume={saved_at}", "data.batch_size=2")
    result = train(TrainConfig.from_yaml("configs/train/tiny.yaml", run_overrides(run, uneven, *overrides)))
    saved = json.loads((saved_at / "stream_state.json").read_text())
    final = json.loads((run / "checkpoints" / f"step_{DROPOUT_STEPS:07d}" / "stream_state.json").read_text())
    assert (saved["world_size"], saved["batch_size"], final["world_size"], final["batch_size"]) == (2, 1, 1, 2)
    # 4 samples per step: step 8 stood at epoch 2's position 4 (32 = 2 x 14 + 4), step 12 at epoch 3's 6.
    assert (saved["epoch"], saved["position"], final["epoch"], final["position"]) == (2, 4, 3, 6)
    repeats = [sum(r["counts"].get("repeat/even_out", 0) for r in s["ranks"].values()) for s in (saved, final)]
    assert repeats == [2, 3]  # one repeat per exact epoch of 13 samples in global batches of 2
    config = TrainConfig.from_yaml("configs/train/tiny.yaml", ["train.caption_dropout=0.5", "train.layout_dropout=0.5"])
    window = [_dropped(config, r, m) for r in (0, 1) for m in range(2 * RESUME_AT, 2 * DROPOUT_STEPS)]
    assert {c for c, _ in window} == {True, False} and {lay for _, lay in window} == {True, False}
    # DDP's loss per rank is the mean of its 2 samples; one process's is the mean of all 4.
    uninterrupted = [(a + b) / 2 for a, b in zip(*(losses[RESUME_AT:] for losses in dropout.losses), strict=True)]
    assert len(result.losses) == DROPOUT_STEPS - RESUME_AT
    assert np.abs(np.subtract(result.losses, uninterrupted)).max() < 1e-6, (result.losses, uninterrupted)
    theirs = dropout.weights[0]
    assert result.adapter_state.keys() == theirs.keys()
    assert max(float((result.adapter_state[k].float() - theirs[k].float()).abs().max()) for k in theirs) < 1e-6

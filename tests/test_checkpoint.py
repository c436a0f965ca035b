"""Checkpoint integrity: the manifest written last, falling back past a damaged or incomplete checkpoint,
refusing a damaged one asked for by path, files that cannot be read named in one error line, and a
resumed run's TensorBoard steps logged once. A resume is bit-exact on CPU: N steps, a stop and N more
equal 2N steps in every trainable tensor, the EMA and the optimizer state."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _model_fixtures import random_layout, random_objs
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import tiny_config, write_dataset

from training.model.casa import RegionalCrossAndSelfAttention
from training.trainer import loop as T
from training.trainer.checkpoint import (
    MANIFEST,
    CheckpointError,
    read_resume_state,
    resolve_resume,
    verify_checkpoint,
    write_manifest,
)

COMMON = {"train.max_steps": 2, "checkpoint.every_steps": 1, "checkpoint.keep_last": None}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """Two steps, a checkpoint after each (step_0000001, step_0000002), TensorBoard on."""
    out = tmp_path_factory.mktemp("run") / "run"
    result = T.train(tiny_config(dataset, out, **COMMON, **{"log.tensorboard": True}))
    return out, result


def copy_run(run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    return out


def step(out: Path, n: int) -> Path:
    return out / "checkpoints" / f"step_{n:07d}"


def flip(path: Path, offset: int = 4096, n: int = 4096) -> None:
    """Invert ``n`` bytes of ``path`` from ``offset`` (the size stays the same)."""
    data = bytearray(path.read_bytes())
    offset = min(offset, max(0, len(data) - n))
    data[offset : offset + n] = bytes(b ^ 0xFF for b in data[offset : offset + n])
    path.write_bytes(bytes(data))


def test_the_manifest_lists_every_file_with_its_size_and_sha256(run):
    folder = step(run[0], 2)
    manifest = json.loads((folder / MANIFEST).read_text())["files"]
    assert set(manifest) == {p.name for p in folder.iterdir()} - {MANIFEST}
    assert {"adapter.safetensors", "adapter_ema.safetensors", "optimizer.bin", "trainer_state.json"} <= set(
        manifest
    )
    assert manifest["optimizer.bin"]["size"] == (folder / "optimizer.bin").stat().st_size
    assert verify_checkpoint(folder) is None
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("pytorch_model*"))  # nothing pickled


def test_flipped_bytes_in_the_latest_checkpoint_fall_back_to_the_previous_one_and_resume_exactly(
    run, tmp_path, dataset, caplog
):
    """4 KiB inverted in the latest adapter file: ``latest`` warns naming it and resumes from step 1, which
    trains step 2 as the uninterrupted run did; TensorBoard then holds each step once."""
    out = copy_run(run, tmp_path)
    flip(step(out, 2) / "adapter.safetensors")
    with caplog.at_level(logging.WARNING, logger="training.trainer.checkpoint"):
        assert resolve_resume("latest", out) == step(out, 1)
    assert "step_0000002/adapter.safetensors: sha256 differs" in caplog.text

    resume = {"log.tensorboard": True, "checkpoint.resume": "latest"}
    resumed = T.train(tiny_config(dataset, out, **COMMON, **resume))
    assert resumed.step == 2 and resumed.losses == pytest.approx(run[1].losses[1:], rel=1e-5)
    for name in ("adapter.safetensors", "adapter_ema.safetensors"):
        a, b = load_file(run[0] / "adapter" / name), load_file(out / "adapter" / name)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    assert verify_checkpoint(step(out, 2)) is None  # the damaged folder was replaced whole

    # The interrupted run logged step 2 already; the resumed run's purge_step supersedes it.
    events = EventAccumulator(str(out / "logs" / "richlayout"))
    events.Reload()
    for tag in ("loss", "lr", "grad_norm"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    assert events.Scalars("loss")[1].value == pytest.approx(resumed.losses[0], rel=1e-6)


def test_truncated_optimizer_state_is_skipped_by_latest_and_named(run, tmp_path, caplog):
    out = copy_run(run, tmp_path)
    path = step(out, 2) / "optimizer.bin"
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="training.trainer.checkpoint"):
        assert resolve_resume("latest", out) == step(out, 1)
    assert f"{path}: 100 bytes, manifest.json recorded" in caplog.text


def test_a_checkpoint_without_manifest_is_incomplete_and_skipped(run, tmp_path, caplog):
    out = copy_run(run, tmp_path)
    (step(out, 2) / MANIFEST).unlink()  # the save stopped before its last write
    with caplog.at_level(logging.WARNING, logger="training.trainer.checkpoint"):
        assert resolve_resume("latest", out) == step(out, 1)
    assert "manifest.json: missing (the checkpoint's save did not finish" in caplog.text
    shutil.rmtree(step(out, 1))
    assert resolve_resume("latest", out) is None  # only an incomplete save: start fresh


def test_a_damaged_only_checkpoint_or_one_asked_for_by_path_is_refused_by_name(run, tmp_path):
    out = copy_run(run, tmp_path)
    flip(step(out, 2) / "adapter_ema.safetensors", offset=0, n=64)
    with pytest.raises(
        CheckpointError, match=r"checkpoint.resume=.*step_0000002/adapter_ema.safetensors: sha256"
    ):
        resolve_resume(str(step(out, 2)), out)
    shutil.rmtree(step(out, 1))
    with pytest.raises(
        CheckpointError, match=r"no intact checkpoint: .*adapter_ema.safetensors: sha256 differs"
    ):
        resolve_resume("latest", out)


def test_malformed_manifest_or_trainer_state_name_the_file(run, tmp_path, dataset):
    out = copy_run(run, tmp_path)
    (step(out, 2) / MANIFEST).write_text("{not json")
    assert verify_checkpoint(step(out, 2)).startswith(f"{step(out, 2) / MANIFEST}: malformed")
    # A file that is intact by its manifest but was malformed when written still fails by name.
    state = step(out, 1) / "trainer_state.json"
    state.write_text('{"step": ')
    write_manifest(step(out, 1))
    config = tiny_config(dataset, out)
    with pytest.raises(CheckpointError, match=rf"{state}: cannot be read \(JSONDecodeError"):
        read_resume_state(step(out, 1), config, 1)


def test_cli_refuses_a_damaged_checkpoint_by_name_and_resumes_with_another_batch_size(
    run, tmp_path, dataset, capsys, caplog
):
    out = copy_run(run, tmp_path)
    argv = [
        "--config",
        "configs/train/tiny.yaml",
        "--override",
        f"output_dir={out}",
        "--override",
        f"data.datasets=[{{path: {dataset}, augment: {{size: [64, 64]}}}}]",
        "--override",
        "data.batch_size=1",
    ]
    flip(step(out, 2) / "adapter.safetensors")
    assert T.main([*argv, "--resume", str(step(out, 2))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: checkpoint.resume=")
    assert "step_0000002/adapter.safetensors: sha256 differs" in err

    # The stream's state is one position in its global order: another batch size goes on from it.
    config = tiny_config(dataset, out, **{**COMMON, "train.max_steps": 3, "data.batch_size": 2,
                                          "checkpoint.resume": str(step(out, 1))})
    with caplog.at_level(logging.WARNING):
        T.train(config)
    assert (f"{step(out, 1) / 'trainer_state.json'}: saved with data.batch_size=1, this run has "
            "data.batch_size=2: the stream goes on from the same position") in caplog.text
    saved = json.loads((step(out, 1) / "stream_state.json").read_text())
    final = json.loads((step(out, 3) / "stream_state.json").read_text())
    assert (saved["batch_size"], final["batch_size"]) == (1, 2)
    epoch = config.data.epoch_samples
    # steps 2 and 3 at 2 samples each (one process, no accumulation) after step 1's position
    assert final["epoch"] * epoch + final["position"] == saved["epoch"] * epoch + saved["position"] + 2 * 2


def test_an_unreadable_file_that_its_manifest_vouches_for_is_named_in_one_error_line(
    run, tmp_path, dataset, capsys
):
    """A file written broken (the manifest recorded it so): the CLI names it instead of a torch traceback."""
    out = copy_run(run, tmp_path)
    path = step(out, 2) / "optimizer.bin"
    path.write_bytes(path.read_bytes()[:100])
    write_manifest(step(out, 2))
    argv = [
        "--config",
        "configs/train/tiny.yaml",
        "--override",
        f"output_dir={out}",
        "--override",
        f"data.datasets=[{{path: {dataset}, augment: {{size: [64, 64], max_objects: 4}}}}]",
        "--override",
        "data.regions={max_objs: 4, max_regions: 8, max_slots: 6}",
        "--override",
        "data.batch_size=1",
        "--override",
        "data.epoch_samples=16",
        "--override",
        "train.gradient_accumulation_steps=1",
        "--resume",
        "latest",
    ]
    assert T.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: cannot be read (") and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------------
# Bit-exact resume


@pytest.fixture
def two_threads():
    """Two intra-op threads: the case where a kernel with parallel atomic adds would sum in another order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_a_fusers_backward_gives_the_same_bits_every_time(two_threads):
    """What made resumes inexact: the fusers gathered rows by indexing, whose CPU backward adds repeated rows
    (a region's keys, gathered once per tile) with parallel atomic adds. With ``gather_rows`` (index_select
    on CPU) the same backward gives the same gradients bit for bit; with indexing, 0 of 10 repeats did."""
    rng = np.random.default_rng(0)
    layouts = [random_layout(rng, 8, 128, 128, max_slots=8) for _ in range(2)]
    objs = random_objs(layouts, max_slots=8, context_dim=64)
    union = torch.zeros(2, 8, 16, 16, dtype=torch.bool)
    for b, layout in enumerate(layouts):
        union[b, : layout.n_slots] = torch.from_numpy(layout.union_masks)
    objs["union_masks"] = union
    torch.manual_seed(0)
    fuser = RegionalCrossAndSelfAttention(320, 64, 5, 64).train()  # SDXL's first level: 320 wide
    with torch.no_grad():  # non-zero output projections, so every weight gets a gradient
        for p in fuser.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 256, 320)

    def grads() -> list[torch.Tensor]:
        fuser.zero_grad(set_to_none=True)
        fuser(x, dict(objs)).square().sum().backward()
        return [p.grad for p in fuser.parameters()]

    first = grads()
    assert all(g.any() for g in first)
    for _ in range(4):
        assert all(torch.equal(a, b) for a, b in zip(first, grads(), strict=True))


@pytest.mark.slow
def test_n_steps_a_stop_and_n_more_equal_2n_steps_bit_for_bit(dataset, tmp_path, two_threads):
    """4 steps, a stop, a resume and 4 more with the tiny preset's batches (2 samples of up to 8 objects in 8
    region slots, accumulation 2), LoRA and EMA give the losses, every adapter and LoRA tensor (raw and EMA)
    and the optimizer state of 8 steps in one go, compared with torch.equal. (Before gather_rows, indexing's
    atomic adds changed the last bits from step 4 or later in each of two tries of this set-up.)"""
    n = 4
    common = {
        "data.batch_size": 2,
        "data.regions": {"max_objs": 8, "max_regions": 16, "max_slots": 8},
        "data.datasets": [{"path": dataset, "augment": {"size": [64, 64], "max_objects": 8}}],
        "train.gradient_accumulation_steps": 2,
        "model.lora_rank": 2,
        "ema.update_after_step": 0,
        "train.max_steps": 2 * n,
        "checkpoint.every_steps": n,
        "checkpoint.keep_last": None,
    }
    full = T.train(tiny_config(dataset, tmp_path / "full", **common))
    first = T.train(tiny_config(dataset, tmp_path / "split", **{**common, "train.max_steps": n}))
    second = T.train(tiny_config(dataset, tmp_path / "split", **{**common, "checkpoint.resume": "latest"}))
    assert first.losses + second.losses == full.losses
    for name in ("adapter", "adapter_ema", "lora", "lora_ema"):
        a, b = (load_file(r.output_dir / "adapter" / f"{name}.safetensors") for r in (full, second))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (
        torch.load(step(r.output_dir, 2 * n) / "optimizer.bin", weights_only=True) for r in (full, second)
    )
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, state in a["state"].items():
        assert state.keys() == b["state"][i].keys()
        assert all(torch.equal(state[k], b["state"][i][k]) for k in state), i

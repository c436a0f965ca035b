"""The ``casa`` fuser in the trainer (``model.model_type``), its resume checks, generation and evaluation (tiny SDXL)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_config, write_dataset

from training.data.stream import build_loader
from training.evaluation import evaluate
from training.inference import generate
from training.model.adapter import adapter_config_of, transformer_blocks
from training.model.casa import RegionalCrossAndSelfAttention
from training.trainer import loop as T
from training.trainer import model_setup as M
from training.trainer import step as S
from training.trainer.checkpoint import CheckpointError
from training.trainer.config import ConfigError

LAYOUTS = [
    {"id": "beach", "caption": "a beach", "boxes": [[0, 0, 32, 32], [16, 8, 64, 60]],
     "labels": ["a red kite", "a dog lying on the sand"]},
    {"id": "street", "boxes": [[0, 0, 8, 8], [0, 32, 64, 64]], "labels": ["a cat", "a road"]},
]  # fmt: skip
CASA = {"model.model_type": "casa"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("shards"), shards=1, per_shard=4)


@pytest.fixture(scope="module")
def casa_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("casa") / "run"
    overrides = {**CASA, "train.max_steps": 2, "checkpoint.every_steps": 1, "ema.update_after_step": 0}
    return T.train(tiny_config(dataset, out, **overrides))


def test_a_casa_train_step_trains_every_self_attention_weight(dataset):
    c = tiny_config(dataset, "unused", **CASA, **{"data.batch_size": 2})
    model = M.build_model(c, torch.device("cpu"))
    blocks = transformer_blocks(model.unet)
    assert all(isinstance(b.fuser, RegionalCrossAndSelfAttention) for _, b in blocks)
    self_attn = {n: p for n, p in model.unet.named_parameters() if ".fuser.self_attn." in n}
    assert len(self_attn) == 4 * len(blocks) + len(blocks)  # to_q, to_k, to_v, to_out.0 weight + its bias
    assert all(any(p is q for q in model.params) for p in self_attn.values())  # all trainable
    start = {n: p.detach().clone() for n, p in self_attn.items()}
    draws = S.sample_draws([1, 2], (4, 8, 8), c, 1000)
    draws.drop_caption, draws.drop_layout = [False, False], [False, False]
    inputs = S.unet_inputs(next(iter(build_loader(c.data))), draws, model.frozen, torch.device("cpu"))
    opt = torch.optim.AdamW(model.params, lr=1e-3)
    for step in range(2):
        loss = S.diffusion_loss(model.unet, inputs)
        assert torch.isfinite(loss)
        loss.backward()
        # The zero-initialised output projection gets a gradient at once; through it, after one step,
        # the query, key and value projections do too.
        with_grad = {n for n, p in self_attn.items() if p.grad is not None and float(p.grad.abs().sum()) > 0}
        expected = set(self_attn) if step else {n for n in self_attn if ".to_out." in n}
        assert expected <= with_grad, sorted(expected - with_grad)[:3]
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(not torch.equal(start[n], p) for n, p in self_attn.items())


def test_casa_training_writes_a_casa_adapter(casa_run):
    assert casa_run.step == 2 and all(np.isfinite(casa_run.losses))
    for path in (casa_run.adapter_path, casa_run.ema_adapter_path):
        config = adapter_config_of(path)
        assert (config.model_type, config.backbone) == ("casa", "sdxl")
        assert any(".fuser.self_attn.to_q." in k for k in load_file(str(path)))


def test_a_casa_checkpoint_resumed_as_ca_is_an_error_naming_the_keys(casa_run, dataset, tmp_path):
    step1 = casa_run.output_dir / "checkpoints" / "step_0000001"
    c = tiny_config(dataset, tmp_path / "ca", **{"train.max_steps": 2, "checkpoint.resume": str(step1)})
    with pytest.raises(CheckpointError, match=r"a casa adapter for a ca model.*unexpected keys \[.*fuser\.self_attn"):
        T.train(c)


def test_model_type_and_the_adapter_file_must_agree(casa_run, dataset, tmp_path):
    adapter = str(casa_run.adapter_path)
    with pytest.raises(ConfigError, match=r"model.adapter .* is a casa adapter but model.model_type is ca"):
        M.build_model(tiny_config(dataset, tmp_path, **{"model.adapter": adapter}), torch.device("cpu"))
    c = tiny_config(dataset, tmp_path, **CASA, **{"model.adapter": adapter})
    loaded = M.build_model(c, torch.device("cpu")).unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in load_file(adapter).items())


def test_casa_generation_and_its_evaluation(casa_run, tmp_path, monkeypatch, capsys):
    layouts = tmp_path / "layouts.jsonl"
    layouts.write_text("".join(json.dumps(x) + "\n" for x in LAYOUTS))
    out = tmp_path / "gen"
    argv = ["--tiny", "--adapter", str(casa_run.adapter_path), "--ema", str(casa_run.ema_adapter_path),
            "--layouts", str(layouts), "--out", str(out)]  # fmt: skip
    assert generate.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    argv = ["--tiny", "--images", str(out), "--layouts", str(out / "layouts.jsonl"), "--out", str(tmp_path / "ev")]
    assert evaluate.main(argv) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["objects"] == 4 and summary["failed_objects"] == 0
    assert np.isfinite(summary["crop_clip"]) and np.isfinite(summary["sam_iou"])

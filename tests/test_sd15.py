"""SD1.5, the release's second backbone, end to end on a tiny random SD1.5 (CPU, offline).

One CLIP text encoder (no pooled embedding, no size ids), the backbone read from the base UNet's config
and recorded in the adapter's metadata; an adapter made for SDXL is an error naming both backbones.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _model_fixtures import random_layout
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors import safe_open
from test_train import SIZE, tiny_config, write_dataset

from training.evaluation import evaluate
from training.inference import generate
from training.inference.pipeline import LayoutPipeline
from training.layout.regions import empty_layout
from training.model import init_adapter as init_unet
from training.model.adapter import (
    adapter_config_of,
    adapter_state_dict,
    attach_regional_adapter,
    backbone_of_base,
    is_adapter_key,
    load_adapter,
    save_adapter,
)
from training.model.encoding import RegionTextEncoder, grounding_inputs
from training.model.tiny import (
    SD15_TEXT_HIDDEN,
    tiny_sd15_pipeline,
    tiny_sd15_unet,
    tiny_sdxl_pipeline,
    tiny_tokenizers,
    tiny_unet,
)
from training.trainer import loop as T
from training.trainer import model_setup as M
from training.trainer import step as S

LAYOUTS = [
    {"id": "beach", "caption": "a beach", "boxes": [[0, 0, 32, 32], [16, 8, 64, 60]],
     "labels": ["a red kite", "a dog lying on the sand"]},
    {"id": "street", "boxes": [[0, 0, 8, 8], [0, 32, 64, 64]], "labels": ["a cat", "a road"]},
]  # fmt: skip


def _sd15_encoder(pipe: StableDiffusionPipeline) -> RegionTextEncoder:
    return RegionTextEncoder([pipe.tokenizer], [pipe.text_encoder])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("shards"), shards=1, per_shard=4)


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    """A tiny SD1.5 saved in diffusers' layout: a local base model like runwayml/stable-diffusion-v1-5."""
    folder = tmp_path_factory.mktemp("sd15") / "base"
    tiny_sd15_pipeline(0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl_adapter(tmp_path_factory):
    unet = attach_regional_adapter(tiny_unet(0))
    return save_adapter(unet, tmp_path_factory.mktemp("sdxl") / "adapter.safetensors")


def test_fresh_sd15_adapter_leaves_the_base_unet_output_exactly_unchanged():
    pipe = tiny_sd15_pipeline(0)
    encoder = _sd15_encoder(pipe)
    assert encoder.hidden_size == SD15_TEXT_HIDDEN == pipe.unet.config.cross_attention_dim
    rng = np.random.default_rng(0)
    layout = random_layout(rng, 3, SIZE, SIZE, max_objs=4, max_regions=8, max_slots=5)
    gligen = grounding_inputs([empty_layout(SIZE, SIZE), layout], encoder, max_slots=5)
    assert gligen["text_embeddings"].shape == (2, 5, 77, SD15_TEXT_HIDDEN)
    gen = torch.Generator().manual_seed(0)
    args = {
        "sample": torch.randn(2, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 77, SD15_TEXT_HIDDEN, generator=gen),
    }
    with torch.no_grad():
        base = pipe.unet(**args).sample
        attach_regional_adapter(pipe.unet)
        adapted = pipe.unet(**args, cross_attention_kwargs={"gligen": gligen}).sample
    assert torch.equal(base, adapted)
    assert pipe.unet.regional_adapter_config.backbone == "sd15"
    # SD1.5 has no attention at its lowest level: fusers on the 3 down / 3 up / 1 mid transformer blocks.
    assert sum(1 for k in adapter_state_dict(pipe.unet) if k.endswith(".fuser.attn.to_q.weight")) == 7


def test_init_unet_reads_the_backbone_from_the_base_and_records_it(sd15_folder, tmp_path, capsys):
    assert backbone_of_base(str(sd15_folder)) == backbone_of_base("tiny-sd15") == "sd15"
    assert backbone_of_base("tiny") == "sdxl"
    for base, backbone, width in ((str(sd15_folder), "sd15", SD15_TEXT_HIDDEN), ("tiny", "sdxl", 64)):
        out = tmp_path / backbone
        assert init_unet.main(["--base", base, "--out", str(out), "--model-type", "casa"]) == 0
        report = json.loads((out / init_unet.REPORT_FILE).read_text())
        got = (report["backbone"], report["model_type"], report["cross_attention_dim"])
        assert got == (backbone, "casa", width)
        config = adapter_config_of(out / init_unet.ADAPTER_FILE)
        assert (config.backbone, config.model_type) == (backbone, "casa")
    # The SD1.5 adapter loads into the folder's UNet by name, every key matched.
    unet = attach_regional_adapter(tiny_sd15_unet(0), adapter_config_of(tmp_path / "sd15" / init_unet.ADAPTER_FILE))
    report = load_adapter(unet, tmp_path / "sd15" / init_unet.ADAPTER_FILE)
    assert report.missing == [] and report.loaded == len(adapter_state_dict(unet))


def test_an_sdxl_adapter_in_an_sd15_model_is_an_error_naming_the_mismatch(sdxl_adapter, sd15_folder, tmp_path, capsys):
    unet = attach_regional_adapter(tiny_sd15_unet(0))
    with pytest.raises(ValueError, match=r"sdxl adapter \(text features 64 per token\) does not fit this sd15 model"):
        load_adapter(unet, sdxl_adapter)
    # Without metadata (the release's files): the text width and the blocks tell.
    with safe_open(str(sdxl_adapter), framework="pt") as f:
        bare = {k: f.get_tensor(k) for k in f.keys()}
    with pytest.raises(ValueError, match=r"another backbone's adapter \(text features 64 per token\) does not fit this sd15 model"):
        load_adapter(unet, bare)
    # The metadata's backbone refuses to attach to the other UNet, and the pipeline refuses before loading.
    with pytest.raises(ValueError, match="a sdxl adapter cannot attach to a sd15 UNet"):
        attach_regional_adapter(tiny_sd15_unet(0), adapter_config_of(sdxl_adapter))
    with pytest.raises(ValueError, match=f"{sdxl_adapter}: a sdxl adapter cannot load into the sd15 model"):
        LayoutPipeline.from_pretrained(str(sd15_folder), adapter=sdxl_adapter)
    # The CLIs: one error line, exit 2.
    argv = ["--base", "tiny-sd15", "--out", str(tmp_path / "o"), "--adapter", str(sdxl_adapter)]
    assert init_unet.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "sd15" in err and "sdxl" in err
    layouts = tmp_path / "layouts.jsonl"
    layouts.write_text(json.dumps(LAYOUTS[0]) + "\n")
    argv = ["--tiny", "--base", "tiny-sd15", "--adapter", str(sdxl_adapter), "--layouts", str(layouts),
            "--out", str(tmp_path / "gen")]  # fmt: skip
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot attach to a sd15 UNet" in err


def test_sd15_pipeline_from_a_folder_matches_the_stock_pipeline_without_a_layout(sd15_folder):
    pipe = LayoutPipeline.from_pretrained(str(sd15_folder))
    assert isinstance(pipe.pipe, StableDiffusionPipeline) and pipe.sdxl is pipe.pipe and pipe.backbone == "sd15"
    pipe.pipe.set_progress_bar_config(disable=True)
    kw = {"height": SIZE, "width": SIZE, "num_inference_steps": 2, "guidance_scale": 7.5, "output_type": "np"}
    ours = pipe("a beach", generator=torch.Generator().manual_seed(0), **kw).images
    stock = tiny_sd15_pipeline(0)
    stock.set_progress_bar_config(disable=True)
    theirs = stock("a beach", negative_prompt="", generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_allclose(ours, theirs, atol=1e-5)  # a fresh adapter and no layout: the base model
    with_layout = pipe("a beach", boxes=[[0, 0, 32, 32]], labels=["a red kite"],
                       generator=torch.Generator().manual_seed(0), **kw).images  # fmt: skip
    np.testing.assert_allclose(with_layout, theirs, atol=1e-5)  # fresh adapter: an exact no-op


@pytest.fixture(scope="module")
def sd15_parts(dataset):
    c = tiny_config(dataset, "unused", **{"data.batch_size": 2, "model.base": "tiny-sd15"})
    model = M.build_model(c, torch.device("cpu"))
    from training.data.stream import build_loader

    return c, next(iter(build_loader(c.data))), model


def test_sd15_train_step_has_no_pooled_embedding_and_overfits(sd15_parts):
    c, batch, model = sd15_parts
    frozen = model.frozen
    assert isinstance(frozen.pipe, StableDiffusionPipeline) and not frozen.sdxl
    assert len(frozen.region_encoder.text_encoders) == 1
    draws = S.sample_draws([1, 2], (4, 8, 8), c, 1000)
    draws.drop_caption, draws.drop_layout = [True, False], [False, False]
    inputs = S.unet_inputs(batch, draws, frozen, "cpu")
    assert "added_cond_kwargs" not in inputs
    assert inputs["encoder_hidden_states"].shape == (2, 77, SD15_TEXT_HIDDEN)
    (empty,) = frozen.pipe.encode_prompt("", "cpu", 1, False)[:1]
    assert torch.allclose(inputs["encoder_hidden_states"][0], empty[0], atol=1e-6)  # a dropped caption is ""
    unet = model.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(model.params, lr=3e-3)
    losses = []
    for _ in range(30):
        loss = S.diffusion_loss(unet, inputs)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not is_adapter_key(k))
    assert any(not torch.equal(before[k], after[k]) for k in before if is_adapter_key(k))


@pytest.fixture(scope="module")
def sd15_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd15run")
    overrides = {
        "model.base": "tiny-sd15",
        "train.max_steps": 2,
        "ema.update_after_step": 0,
        "validation.every_steps": 2,
        "validation.scheduler": "ddim",
        "validation.num_inference_steps": 2,
        "validation.guidance_scale": 7.5,
    }
    return T.train(tiny_config(dataset, out, **overrides))


def test_sd15_training_writes_an_sd15_adapter_and_validates_with_ddim(sd15_run):
    assert sd15_run.step == 2 and all(np.isfinite(sd15_run.losses))
    assert isinstance(sd15_run.unet, torch.nn.Module)
    for path in (sd15_run.adapter_path, sd15_run.ema_adapter_path):
        config = adapter_config_of(path)
        assert (config.backbone, config.model_type) == ("sd15", "ca")
    fresh = adapter_state_dict(attach_regional_adapter(tiny_sd15_unet(0)))
    assert fresh.keys() == sd15_run.adapter_state.keys()
    assert any(not torch.equal(fresh[k], v) for k, v in sd15_run.adapter_state.items())
    (image,) = sd15_run.validation_images
    assert image.exists()


def test_scheduler_ddim_samples_validation_and_generation_with_ddim(dataset):
    c = tiny_config(dataset, "unused", **{"model.base": "tiny-sd15", "validation.scheduler": "ddim"})
    model = M.build_model(c, torch.device("cpu"))
    assert isinstance(model.frozen.pipe.scheduler, DDIMScheduler)
    assert not isinstance(model.frozen.noise_scheduler, DDIMScheduler)  # training keeps DDPM noising
    cfg = generate.GenerateConfig(base="tiny-sd15", scheduler="ddim", device="cpu", dtype="float32")
    assert isinstance(generate.load_pipeline(cfg).pipe.scheduler, DDIMScheduler)


def test_generate_and_evaluate_with_the_sd15_adapter(sd15_run, tmp_path, monkeypatch, capsys):
    layouts = tmp_path / "layouts.jsonl"
    layouts.write_text("".join(json.dumps(x) + "\n" for x in LAYOUTS))
    out = tmp_path / "gen"
    argv = ["--tiny", "--base", "tiny-sd15", "--adapter", str(sd15_run.adapter_path),
            "--ema", str(sd15_run.ema_adapter_path), "--layouts", str(layouts), "--out", str(out),
            "--set", "scheduler=ddim", "--guidance-scale", "7.5"]  # fmt: skip
    assert generate.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    assert all((out / f"{x['id']}.png").exists() for x in LAYOUTS)
    assert json.loads((out / "generate.json").read_text())["config"]["scheduler"] == "ddim"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    argv = ["--tiny", "--images", str(out), "--layouts", str(out / "layouts.jsonl"), "--out", str(tmp_path / "ev")]
    assert evaluate.main(argv) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["objects"] == 4 and summary["failed_objects"] == 0


def test_an_sdxl_tokenizer_pair_still_builds_the_sdxl_pipeline():
    """The SDXL path is untouched: two encoders, pooled embedding, the same tokenizer files."""
    pipe = LayoutPipeline.from_sdxl(tiny_sdxl_pipeline(0))
    assert pipe.backbone == "sdxl" and len(pipe.region_encoder.text_encoders) == 2
    assert pipe.region_encoder.tokenizers[0].get_vocab() == tiny_tokenizers()[0].get_vocab()


@pytest.mark.slow  # two processes on SDXL run in make test (test_train_ddp); SD1.5's in make test-slow
def test_two_processes_train_the_sd15_adapter(dataset, tmp_path):
    """DDP on CPU (gloo) under ``accelerate launch``, as tests/test_train_ddp.py (about 12 s here)."""
    from test_train_ddp import STEPS, launch

    run = launch(tmp_path / "ddp", dataset, "model.base=tiny-sd15")
    w0, w1 = run.weights
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert [len(x) for x in run.losses] == [STEPS, STEPS] and run.losses[0] != run.losses[1]
    fresh = adapter_state_dict(attach_regional_adapter(tiny_sd15_unet(0)))
    assert any(not torch.equal(w0[k], fresh[k]) for k in fresh)
    assert adapter_config_of(run.out / "adapter" / "adapter.safetensors").backbone == "sd15"


def test_train_cli_refuses_an_sdxl_adapter_for_an_sd15_base_before_writing(dataset, sdxl_adapter, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", "configs/train/tiny.yaml", "--override", "model.base=tiny-sd15",
            "--override", f"model.adapter={sdxl_adapter}", "--override", f"output_dir={out}",
            "--override", f"data.datasets=[{{path: {dataset}, augment: {{size: [64, 64]}}}}]"]  # fmt: skip
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: model.adapter {sdxl_adapter} is a sdxl adapter but model.base tiny-sd15 is sd15"]
    assert not out.exists()


def test_the_sd15_preset_is_the_releases_recipe():
    from training.trainer.config import TrainConfig

    c = TrainConfig.from_yaml("configs/train/sd15_512_8gpu.yaml")
    assert c.model.base == "runwayml/stable-diffusion-v1-5" and c.model.model_type == "ca"
    assert (c.data.batch_size, c.train.gradient_accumulation_steps) == (4, 16)
    assert (c.optim.lr, c.optim.weight_decay, c.train.mixed_precision) == (2e-5, 1e-5, "fp16")
    assert (c.ema.enabled, c.ema.decay, c.ema.update_after_step) == (True, 0.99, 1000)
    v = c.validation
    assert (v.scheduler, v.guidance_scale, v.num_inference_steps, v.height, v.width) == ("ddim", 7.5, 20, 512, 512)
    assert c.data.regions.max_objs == 30
    assert all(tuple(d.augment.size) == (512, 512) and d.augment.max_objects == 30 for d in c.data.datasets)

"""The model registry: specs, presets, the tiny backend and the hf backend on local folders (offline)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import open_clip
import pytest
import segment_anything
import torch
from PIL import Image
from safetensors.torch import save_file
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from transformers import GroundingDinoForObjectDetection, Qwen2_5_VLForConditionalGeneration

from datagen import models, tiny_models
from datagen.models import ModelSpec, default_spec, load_model, prefetch, preset
from datagen.tiny_models import ClipProcessor


def test_real_preset_names_the_paper_models_and_qwen():
    real = preset("real")
    assert real["vlm"].name == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert real["detector"].name == "IDEA-Research/grounding-dino-tiny"
    assert (real["segmenter"].name, real["segmenter"].weights.endswith("sam_vit_h_4b8939.pth")) == (
        "vit_h",
        True,
    )
    assert (real["clip"].name, real["clip"].weights) == ("ViT-L-14", "openai")
    assert all(s.backend == "hf" and s.kind == k for k, s in real.items())


def test_real_preset_is_exactly_the_verified_checkpoints():
    # Checked against the hubs (IDEA-Research/grounding-dino-tiny, Qwen/Qwen2.5-VL-7B-Instruct), open_clip's
    # pretrained table and segment-anything's README (sam_vit_h_4b8939.pth, mirrored on the hub).
    assert preset("real") == {
        "vlm": ModelSpec("vlm", "Qwen/Qwen2.5-VL-7B-Instruct"),
        "detector": ModelSpec("detector", "IDEA-Research/grounding-dino-tiny", dtype="float32"),
        "segmenter": ModelSpec(
            "segmenter", "vit_h", weights="hf-hub:ybelkada/segment-anything/checkpoints/sam_vit_h_4b8939.pth"
        ),
        "clip": ModelSpec("clip", "ViT-L-14", weights="openai"),
    }
    assert "vit_h" in segment_anything.sam_model_registry
    assert ("ViT-L-14", "openai") in open_clip.list_pretrained()
    # OpenAI's ViT-L/14 was trained with QuickGELU: the loader must ask open_clip for it.
    assert open_clip.pretrained.get_pretrained_cfg("ViT-L-14", "openai")["quick_gelu"] is True


def test_real_sam_weights_resolve_to_the_hub_file_without_downloading(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, revision=None):
        calls.append((repo_id, filename, revision))
        return str(tmp_path / "sam_vit_h_4b8939.pth")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    spec = preset("real")["segmenter"]
    path = models._resolve_file(spec.weights, spec.revision)
    assert calls == [("ybelkada/segment-anything", "checkpoints/sam_vit_h_4b8939.pth", None)]
    assert path.name == "sam_vit_h_4b8939.pth"


def test_tiny_preset_covers_every_kind():
    tiny = preset("tiny")
    assert sorted(tiny) == ["clip", "detector", "segmenter", "vlm"]
    assert all(s.backend == "tiny" and s.kind == k for k, s in tiny.items())
    assert default_spec("vlm", "tiny") == tiny["vlm"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="llm", name="x"), "kind 'llm'"),
        (dict(kind="vlm", name="x", backend="onnx"), "backend 'onnx'"),
        (dict(kind="vlm", name="x", dtype="int8"), "dtype 'int8'"),
        (dict(kind="vlm", name="tiny-sam", backend="tiny"), "no tiny vlm named 'tiny-sam'"),
        (dict(kind="segmenter", name="vit_h"), "needs weights"),
    ],
)
def test_bad_specs_fail_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(**kwargs)


def test_unknown_preset_and_kind():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown model kind 'llm'"):
        default_spec("llm")


def test_spec_is_frozen_and_hashable_and_resolves_auto_on_cpu():
    spec = default_spec("vlm", "tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    assert {spec: 1}[dataclasses.replace(spec)] == 1
    if not torch.cuda.is_available():
        assert spec.resolved_device() == torch.device("cpu")
        assert spec.resolved_dtype() == torch.float32
    assert dataclasses.replace(spec, dtype="bfloat16").resolved_dtype() == torch.bfloat16


@pytest.mark.parametrize(
    "kind, model_cls, processor_cls",
    [
        ("vlm", Qwen2_5_VLForConditionalGeneration, None),
        ("detector", GroundingDinoForObjectDetection, None),
        ("segmenter", Sam, ResizeLongestSide),
        ("clip", open_clip.CLIP, ClipProcessor),
    ],
)
def test_tiny_backend_builds_the_real_classes_once_per_process(kind, model_cls, processor_cls):
    spec = default_spec(kind, "tiny")
    model, processor = load_model(spec)
    assert isinstance(model, model_cls)
    assert processor_cls is None or isinstance(processor, processor_cls)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # Cached per process, and "auto" shares the copy of what it resolves to.
    assert load_model(spec)[0] is model
    assert load_model(dataclasses.replace(spec, device=str(spec.resolved_device())))[0] is model


@pytest.mark.parametrize("name", sorted(tiny_models.TINY_FACTORIES))
def test_tiny_builds_are_seeded(name):
    _, factory = tiny_models.TINY_FACTORIES[name]
    assert _same_weights(factory()[0], factory()[0])


def test_tiny_vlm_generates_from_its_chat_template():
    model, processor = load_model(default_spec("vlm", "tiny"))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text.endswith("<|im_start|>assistant\n") and "<|image_pad|>" in text
    inputs = processor(text=[text], images=[Image.new("RGB", (40, 30))], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert (
        out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3
    )


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["vlm", "detector"])
def test_hf_backend_loads_a_local_folder(tmp_path, kind):
    model, processor = load_model(default_spec(kind, "tiny"))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_model(ModelSpec(kind, str(tmp_path), dtype="float32", device="cpu"))
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    assert _same_weights(loaded, model)
    if kind == "vlm":
        assert loaded_processor.tokenizer.padding_side == "left"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_hf_backend_loads_a_sam_checkpoint_safely(tmp_path, monkeypatch, suffix):
    sam, _ = tiny_models.tiny_sam()
    path = tmp_path / f"sam{suffix}"
    state = {k: v.contiguous() for k, v in sam.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    # A registry entry that builds the tiny architecture with other weights, as the real ones do.
    monkeypatch.setitem(
        segment_anything.sam_model_registry, "vit_test", lambda checkpoint=None: _perturbed_tiny_sam()
    )
    loaded, transform = load_model(ModelSpec("segmenter", "vit_test", weights=str(path), device="cpu"))
    assert _same_weights(loaded, sam)
    assert transform.target_length == 128


def _perturbed_tiny_sam() -> Sam:
    sam, _ = tiny_models.tiny_sam()
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(1.0)
    return sam


def test_sam_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_model(ModelSpec("segmenter", "vit_b", weights=str(tmp_path / "missing.pth"), device="cpu"))
    with pytest.raises(ValueError, match="hf-hub:<org>/<repo>/<file>"):
        load_model(ModelSpec("segmenter", "vit_b", weights="hf-hub:only-org/file.pth", device="cpu"))
    with pytest.raises(ValueError, match="unknown SAM model 'vit_x'"):
        load_model(ModelSpec("segmenter", "vit_x", weights="w.pth", device="cpu"))


def test_hf_backend_loads_an_open_clip_local_dir(tmp_path):
    model, (preprocess, tokenizer) = load_model(default_spec("clip", "tiny"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_models.CLIP_CFG}))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "open_clip_model.safetensors"),
    )
    loaded, processor = load_model(ModelSpec("clip", f"local-dir:{tmp_path}", device="cpu"))
    assert _same_weights(loaded, model)
    image = preprocess(Image.fromarray(np.full((70, 90, 3), 128, np.uint8)))[None]
    with torch.inference_mode():
        assert torch.allclose(loaded.encode_image(image), model.encode_image(image))
    assert torch.equal(processor.tokenizer(["a dog"]), tokenizer(["a dog"]))


def test_prefetch_skips_tiny_and_local_models(tmp_path):
    prefetch([*preset("tiny").values(), ModelSpec("vlm", str(tmp_path))])  # no hub access needed

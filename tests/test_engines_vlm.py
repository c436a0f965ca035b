"""Qwen3-VL and any chat VLM in the tag, caption and describe stages; which model made each field (provenance).

The tiny Qwen3-VL (``tiny-qwen3-vl``, the real class built small, offline) through the three stages:
their output contract (one row per input, strings, a failed row for a bad input, rows failed upstream
untouched), batching across images equal to one at a time; a tiny LLaVA, another family with another
chat template, through the same code; a processor without a template refused. The vLLM engine's config
and plan with Qwen3-VL. Provenance: ``run.json`` names the model of each record field, ``shards info``
and the report show it, and datasets written before it read "unknown". Slow: two tiny datagen runs with
different VLMs mixed in one training stream. ``real_size``: Qwen3-VL-8B (its language model cut to 2
layers at real width) and Qwen2.5-VL-7B likewise through the VLM stages on the same two photos.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datagen import models, tiny_models
from datagen.config import build_config, load_config
from datagen.models import ModelSpec
from datagen.provenance import provenance
from datagen.stages import vlm_vllm
from datagen.stages.caption import CaptionConfig, CaptionStage
from datagen.stages.describe import DescribeConfig, DescribeStage
from datagen.stages.tag import TagConfig, TagStage
from datagen.stages.vlm import generate
from shards import provenance as shards_provenance

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "datagen" / "tiny.yaml"
QWEN3 = ModelSpec("vlm", "tiny-qwen3-vl", backend="tiny")
QWEN3_SET = {s: {"model": {"kind": "vlm", "name": "tiny-qwen3-vl", "backend": "tiny"}}
             for s in ("tag", "caption", "describe")}


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _batch(images: list, failed: tuple[int, ...] = (), **columns) -> dict:
    """A batch as decode hands it on; rows in ``failed`` already failed upstream."""
    n = len(images)
    return {
        "key": [f"k{i}" for i in range(n)],
        "source_caption": [f"a dog and a red car {i}" for i in range(n)],
        "image": images,
        "status": ["failed" if i in failed else "ok" for i in range(n)],
        "error_stage": ["decode" if i in failed else None for i in range(n)],
        "error": ["DecodeError: truncated" if i in failed else None for i in range(n)],
        **columns,
    }


# ---------------------------------------------------------------- the tiny Qwen3-VL


def test_tiny_qwen3_vl_is_the_real_class_and_reloads_from_a_folder_as_a_hub_model(tmp_path):
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    model, processor = models.load_model(QWEN3)
    assert type(model) is Qwen3VLForConditionalGeneration and type(processor) is Qwen3VLProcessor
    assert model.config.vision_config.patch_size == 16 and model.config.vision_config.deepstack_visual_indexes == [0]
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    a, _ = tiny_models.tiny_qwen3_vl()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), model.state_dict().values(), strict=True))
    # Saved and loaded back as real weights are (AutoModelForImageTextToText, AutoProcessor, no remote code).
    model.save_pretrained(tmp_path / "q3")
    processor.save_pretrained(tmp_path / "q3")
    spec = ModelSpec("vlm", str(tmp_path / "q3"), dtype="float32", device="cpu")
    loaded, loaded_processor = models.load_model(spec)
    assert type(loaded) is Qwen3VLForConditionalGeneration and loaded_processor.chat_template == processor.chat_template
    images = [_image(40, 90, 1), _image(64, 64, 2)]
    ask = dict(max_new_tokens=6, batch_size=2)
    assert generate(loaded, loaded_processor, images, ["list", "list"], **ask) == \
        generate(model, processor, images, ["list", "list"], **ask)


def test_batched_generation_equals_one_image_at_a_time():
    model, processor = models.load_model(QWEN3)
    images = [_image(30, 200, 3), _image(64, 64, 4), _image(120, 50, 5), _image(64, 64, 6)]
    prompts = ["List the objects.", "Describe it.", "List the objects.", "Describe it."]
    together = generate(model, processor, images, prompts, max_new_tokens=8, batch_size=4)
    alone = [generate(model, processor, [i], [p], max_new_tokens=8, batch_size=1)[0]
             for i, p in zip(images, prompts, strict=True)]
    assert together == alone and len(set(together)) > 1  # left padding and mRoPE positions right per row


def test_qwen3_vl_through_tag_caption_and_describe_one_row_per_input():
    images = [_image(48, 80, 0), _image(64, 64, 1), np.zeros((5, 5), np.uint8), _image(90, 40, 2)]
    batch = _batch(images, failed=(1,))
    tagged = TagStage(TagConfig(model=QWEN3, max_new_tokens=8, caption_fallback=True))(batch)
    assert tagged["status"] == ["ok", "failed", "failed", "ok"]
    assert tagged["error_stage"][1:3] == ["decode", "tag"] and tagged["error"][1] == "DecodeError: truncated"
    assert tagged["error"][2].startswith("ValueError: image must be HxWx3 uint8")
    assert tagged["tags"][1] is None and tagged["tags"][2] is None
    for i in (0, 3):  # random answers parse to nothing; the source caption's phrases stand in
        assert tagged["tags"][i] and all(isinstance(t, str) and t for t in tagged["tags"][i])

    captioned = CaptionStage(CaptionConfig(model=QWEN3, max_new_tokens=8))(tagged)
    assert len(captioned["caption"]) == 4 and captioned["status"] == tagged["status"]
    assert [type(c) for c in captioned["caption"]] == [str, type(None), type(None), str]

    objects = [[{"box": [2.0, 2.0, 60.0, 40.0], "phrase": "dog"}, {"box": [0.0, 0.0, 10.0, 10.0], "phrase": "car"}],
               None, None, [{"box": [0.0, 10.0, 40.0, 90.0], "phrase": "tree"}]]
    full = [[{**dict.fromkeys(("description", "detector_score", "mask", "mask_score", "mask_box", "clip_score")),
              **o} for o in objs] if objs else objs for objs in objects]
    described = DescribeStage(DescribeConfig(model=QWEN3, max_new_tokens=6, crop_short_side=40,
                                             max_crop_side=120))({**captioned, "objects": full})
    assert described["status"] == tagged["status"]
    first, last = described["objects"][0], described["objects"][3]
    assert isinstance(first[0]["description"], str) and first[0]["description"]
    assert first[1]["description"] == "car"  # 10x10 px: under min_crop_area, the phrase stays
    assert isinstance(last[0]["description"], str) and last[0]["description"]


# ---------------------------------------------------------------- any chat VLM: the template decides

# LLaVA's own prompt form, which no code of ours knows: the VLM stages must produce it from the template.
LLAVA_TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {% for p in m['content'] %}"
                  "{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
                  "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tiny_llava(chat_template: str | None = LLAVA_TEMPLATE):
    """``LlavaForConditionalGeneration`` (CLIP vision tower, Llama text model) with ``LlavaProcessor``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = tiny_models.qwen_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", chat_template=chat_template,
                               num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                bos_token_id=None),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    with tiny_models._seeded():
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), processor


@pytest.fixture
def llava(monkeypatch):
    """The tiny LLaVA as tiny VLM "test-llava", and one without a chat template as "test-llava-bare"."""
    for name, factory in (("test-llava", tiny_llava), ("test-llava-bare", lambda: tiny_llava(None))):
        monkeypatch.setitem(tiny_models.TINY_FACTORIES, name, ("vlm", factory))
        monkeypatch.setitem(models.TINY_KINDS, name, "vlm")
    return ModelSpec("vlm", "test-llava", backend="tiny")


def test_another_chat_vlm_runs_the_stages_with_its_own_template(llava, monkeypatch):
    model, processor = models.load_model(llava)
    seen: list[str] = []
    call = type(processor).__call__

    def spy(self, *args, text=None, **kwargs):
        seen.extend(text)
        return call(self, *args, text=text, **kwargs)

    monkeypatch.setattr(type(processor), "__call__", spy)
    batch = _batch([_image(40, 70, 0), _image(64, 64, 1), _image(50, 50, 2)])
    out = CaptionStage(CaptionConfig(model=llava, prompt="Say what you see.", max_new_tokens=5))(batch)
    assert seen == ["USER: <image>\nSay what you see.\nASSISTANT:"] * 3  # the template's text, nothing of ours
    assert out["status"] == ["ok"] * 3 and all(c is None or isinstance(c, str) for c in out["caption"])
    images = batch["image"]
    together = generate(model, processor, images, ["a", "b", "a"], max_new_tokens=5, batch_size=3)
    assert together == [generate(model, processor, [i], [p], max_new_tokens=5, batch_size=1)[0]
                        for i, p in zip(images, ["a", "b", "a"], strict=True)]


def test_a_processor_without_a_chat_template_is_refused_naming_the_model(llava):
    bare = ModelSpec("vlm", "test-llava-bare", backend="tiny")
    with pytest.raises(ValueError, match=r"^VLM 'test-llava-bare': its processor has no chat template"):
        TagStage(TagConfig(model=bare))


def test_the_qwen3_vl_template_reads_the_image_part_in_every_form_vllm_passes():
    _, processor = models.load_model(QWEN3)
    for part in ({"type": "image"}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "image", "image": "x"}):
        text = processor.apply_chat_template([{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}],
                                             add_generation_prompt=True, tokenize=False)
        assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"


def test_qwen3_vl_on_the_vllm_engine_configures_and_plans(monkeypatch):
    from datagen.plan import plan_text

    monkeypatch.setattr(vlm_vllm, "vllm_available", lambda: True)
    q3 = {"kind": "vlm", "name": "Qwen/Qwen3-VL-8B-Instruct"}
    cfg = load_config(ROOT / "configs" / "datagen" / "real_vllm.yaml",
                      {"stages": {s: {"model": q3} for s in ("tag", "caption", "describe")}})
    assert cfg.vllm_stages() == ("tag", "caption", "describe")
    pc = vlm_vllm.processor_config(cfg.vlm.vllm, cfg.stages["tag"].model, cfg.pools["vlm"])
    assert pc.model_source == "Qwen/Qwen3-VL-8B-Instruct" and pc.engine_kwargs["dtype"] == "auto"
    assert pc.prepare_multimodal_stage.chat_template_content_format == "openai"  # the model's template renders it
    assert "Qwen/Qwen3-VL-8B-Instruct (vLLM)" in plan_text(cfg)
    made = provenance(cfg)["fields"]
    assert made["caption"] == {"stage": "caption", "model": "Qwen/Qwen3-VL-8B-Instruct", "revision": None,
                               "dtype": "auto (the checkpoint's, vLLM)", "backend": "hf", "engine": "vllm",
                               "weights": None}
    assert made["objects.box"]["engine"] == "transformers" and made["objects.box"]["dtype"] == "float32"


# ---------------------------------------------------------------- provenance


def test_provenance_of_the_tiny_preset_and_of_other_model_sets(tmp_path):
    tiny = provenance(load_config(TINY_YAML))
    assert tiny["version"] == shards_provenance.VERSION and list(tiny["fields"]) == list(shards_provenance.FIELDS)
    vlm = {"stage": "tag", "model": "tiny-qwen2.5-vl", "revision": None, "dtype": "float32", "backend": "tiny",
           "engine": "transformers", "weights": None}
    assert tiny["fields"]["tags"] == vlm
    assert tiny["fields"]["objects.description"] == {**vlm, "stage": "describe"}
    assert tiny["fields"]["objects.mask"]["model"] == "tiny-sam" and tiny["fields"]["objects.mask"]["engine"] == \
        "segment-anything"
    assert tiny["fields"]["objects.clip_score"]["model"] == "tiny-clip"

    other = provenance(load_config(TINY_YAML, {"stages": QWEN3_SET}))["fields"]
    assert other["tags"]["model"] == other["caption"]["model"] == other["objects.description"]["model"] == "tiny-qwen3-vl"
    assert {k: v for k, v in other.items() if k not in ("tags", "caption", "objects.description")} == \
        {k: v for k, v in tiny["fields"].items() if k not in ("tags", "caption", "objects.description")}

    # the real preset on GPUs: "auto" resolves to bfloat16 where a pool holds GPUs; the CPU-only tag method
    real = provenance(load_config(ROOT / "configs" / "datagen" / "real.yaml",
                                  {"stages": {"tag": {"method": "caption"}}}))["fields"]
    assert real["tags"] == {"stage": "tag", "model": None, "method": "caption"}
    assert real["caption"]["dtype"] == "bfloat16" and real["objects.box"]["dtype"] == "float32"  # spec says float32
    assert real["objects.clip_score"]["weights"] == "openai"

    # a ground model that segments (SAM 3, told by its config.json): masks are the ground stage's
    folder = tmp_path / "sam3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "sam3"}))
    cfg = build_config({"models": "tiny", "stages": {"tag": {}, "ground": {"model": {"kind": "detector",
                                                                                   "name": str(folder)}}, "segment": {}}})
    made = provenance(cfg)["fields"]
    assert made["objects.mask"]["stage"] == made["objects.box"]["stage"] == "ground"  # segment passes them on
    assert made["objects.mask"]["model"] == made["objects.mask_box"]["model"] == str(folder)
    assert list(made) == ["tags", "objects.box", "objects.phrase", "objects.detector_score", "objects.mask",
                          "objects.mask_score", "objects.mask_box"]
    # the presets of issue 23: SAM 3 grounds and masks (segment has no model), Qwen3-VL asks
    for preset, vlm, ground in (("sam3", "Qwen/Qwen3-VL-8B-Instruct", "facebook/sam3"),
                                ("tiny_sam3", "tiny-qwen3-vl", "tiny-sam3")):
        made = provenance(load_config(ROOT / "configs" / "datagen" / f"{preset}.yaml"))["fields"]
        assert {made[f]["model"] for f in ("tags", "caption", "objects.description")} == {vlm}
        assert {(made[f]["stage"], made[f]["model"]) for f in shards_provenance.FIELDS[2:8]} == {("ground", ground)}
    sam2 = provenance(load_config(TINY_YAML, {"stages": {"segment": {"model": {
        "kind": "segmenter", "name": "facebook/sam2.1-hiera-large"}}}}))["fields"]["objects.mask"]
    assert (sam2["stage"], sam2["model"], sam2["engine"]) == ("segment", "facebook/sam2.1-hiera-large", "transformers")
    # without segment or score stages those fields are absent: "not made by this run"
    partial = build_config({"models": "tiny", "pools": {"p": {"stages": ["tag", "caption"]}}})
    assert list(provenance(partial)["fields"]) == ["tags", "caption"]
    assert shards_provenance.fields_of({"provenance": provenance(partial)})["objects.box"] == shards_provenance.NOT_MADE


def test_a_run_records_its_provenance_in_run_json(tmp_path, monkeypatch):
    from datagen import run as run_mod
    from datagen.synthetic import make_image_folder

    make_image_folder(tmp_path / "in", 2, seed=1, min_size=32, max_size=48)
    monkeypatch.setattr(run_mod._Cluster, "ready", lambda self, cfg: None)  # no Ray: only run.json matters here
    monkeypatch.setattr(run_mod, "_plan_and_execute", lambda cfg, items, dataset, *a: run_mod.Summary(dataset.uri))
    cfg = load_config(TINY_YAML, {"stages": QWEN3_SET})
    run_mod.run(cfg, [str(tmp_path / "in")], str(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["provenance"] == json.loads(json.dumps(provenance(cfg)))
    assert record["provenance"]["fields"]["caption"]["model"] == "tiny-qwen3-vl"
    assert "provenance" not in record["config"]  # recorded, not fingerprinted: it follows from the config


def _dataset(root: Path, run: dict | None) -> None:
    """A one-shard dataset of two samples with ``run`` as its run.json (none when None)."""
    from shards.schema import ObjectRecord, SampleRecord
    from shards.writer import ShardWriter

    with ShardWriter(str(root), 0) as w:
        for i in range(2):
            rec = SampleRecord(key=f"{root.name}{i}", width=8, height=8, original_width=8, original_height=8,
                               caption="a dog", objects=(ObjectRecord(box=(1.0, 1.0, 6.0, 6.0), phrase="dog"),))
            w.add(rec, _jpeg())
    if run is not None:
        (root / "run.json").write_text(json.dumps(run))


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_image(8, 8, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _info(path: Path, capsys, *extra: str) -> str:
    from shards.__main__ import main

    assert main(["info", str(path), *extra]) == 0
    return capsys.readouterr().out


def test_info_and_report_show_the_models_and_unknown_for_older_datasets(tmp_path, capsys, monkeypatch):
    from shards import report

    new = {"fingerprint": "f" * 64, "config": {}, "provenance": provenance(load_config(TINY_YAML, {"stages": QWEN3_SET}))}
    _dataset(tmp_path / "new", new)
    _dataset(tmp_path / "old", {"fingerprint": "e" * 64, "config": {}})  # run.json before provenance
    _dataset(tmp_path / "coco", None)  # no run.json at all (from-coco, from-release)

    text = _info(tmp_path / "new", capsys)
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("            models: "))
    assert lines[at:at + 4] == [
        "            models: tags, caption, objects.description: tiny-qwen3-vl (tiny, float32, transformers)",
        "                    objects.box, objects.phrase, objects.detector_score: tiny-grounding-dino (tiny, float32, "
        "transformers)",
        "                    objects.mask, objects.mask_score, objects.mask_box: tiny-sam (tiny, float32, segment-anything)",
        "                    objects.clip_score: tiny-clip (tiny, float32, open_clip)",
    ]
    made = json.loads(_info(tmp_path / "new", capsys, "--json"))["models"]
    assert made["caption"]["model"] == "tiny-qwen3-vl" and made["objects.box"]["model"] == "tiny-grounding-dino"
    assert "            models: unknown (run.json written before datagen recorded its models)" in \
        _info(tmp_path / "old", capsys).splitlines()
    assert json.loads(_info(tmp_path / "old", capsys, "--json"))["models"] == \
        dict.fromkeys(shards_provenance.FIELDS, "unknown")
    assert "            models: unknown (no run.json)" in _info(tmp_path / "coco", capsys).splitlines()

    monkeypatch.setattr(report, "FIGURES", {})  # the figures are test_report's; this is about the models table
    tables = report.load_datasets([str(tmp_path / d) for d in ("new", "old", "coco")])
    table = report.provenance_table(tables)
    assert list(table.columns) == ["new", "old", "coco"] and list(table.index) == list(shards_provenance.FIELDS)
    assert table.loc["caption", "new"] == "tiny-qwen3-vl (tiny, float32, transformers)"
    assert set(table["old"]) == set(table["coco"]) == {"unknown"}
    page = report.render_html(tables, gallery=0)
    assert '<section id="models"><h2>Models</h2>' in page and "tiny-qwen3-vl (tiny, float32, transformers)" in page
    (tmp_path / "old" / "run.json").write_text("{not json")
    assert report.provenance_table(tables).loc["tags", "old"].startswith("unknown (run.json unreadable: ")


# ---------------------------------------------------------------- two model sets in one training stream


def _datagen(inputs: Path, output: Path, *sets: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONHASHSEED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "datagen", "run", "--config", str(TINY_YAML), "--input", str(inputs),
           "--output", str(output), "--no-progress", "--set", "execution.num_cpus=2", *sets]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_datasets_of_two_model_sets_mix_in_one_training_stream(tmp_path, capsys):
    from datagen.synthetic import make_image_folder
    from shards import iter_samples, validate_dataset
    from training.data.config import StreamConfig
    from training.data.stream import build_loader

    for name, seed in (("a", 1), ("b", 2)):
        make_image_folder(tmp_path / f"in_{name}", 8, seed=seed, min_size=96, max_size=160)
        for p in (tmp_path / f"in_{name}").iterdir():  # disjoint keys: a sample's key says its dataset
            p.rename(p.with_name(f"{name}_{p.name}"))
    q3 = "{kind: vlm, name: tiny-qwen3-vl, backend: tiny}"
    _datagen(tmp_path / "in_a", tmp_path / "qwen25")
    _datagen(tmp_path / "in_b", tmp_path / "qwen3", *(a for s in ("tag", "caption", "describe")
                                                       for a in ("--set", f"stages.{s}.model={q3}")))
    made = {}
    for name in ("qwen25", "qwen3"):
        assert validate_dataset(str(tmp_path / name)) == []
        made[name] = json.loads(_info(tmp_path / name, capsys, "--json"))["models"]
    vlm_fields = ("tags", "caption", "objects.description")
    assert [made["qwen25"][f]["model"] for f in vlm_fields] == ["tiny-qwen2.5-vl"] * 3
    assert [made["qwen3"][f]["model"] for f in vlm_fields] == ["tiny-qwen3-vl"] * 3
    assert {f: m for f, m in made["qwen25"].items() if f not in vlm_fields} == \
        {f: m for f, m in made["qwen3"].items() if f not in vlm_fields}  # same detector, segmenter, CLIP

    keys = {name: {s.record.key for s in iter_samples(str(tmp_path / name))} for name in ("qwen25", "qwen3")}
    assert all(k.startswith("a_") for k in keys["qwen25"]) and all(k.startswith("b_") for k in keys["qwen3"])
    augment = {"size": [64, 64], "min_visibility": 0.0, "max_objects": 4}
    cfg = StreamConfig.from_dict({
        "datasets": [{"path": str(tmp_path / name), "weight": w, "augment": augment}
                     for name, w in (("qwen25", 1.0), ("qwen3", 1.0))],
        "resampled": True, "epoch_samples": 60, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 4,
        "regions": {"max_objs": 4, "max_regions": 8, "max_slots": 6},
    })
    drawn = [k for batch in build_loader(cfg) for k in batch["key"]]
    assert len(drawn) == 60 and set(drawn) <= keys["qwen25"] | keys["qwen3"]
    share = sum(k in keys["qwen3"] for k in drawn) / len(drawn)
    assert 0.25 < share < 0.75, share  # 1:1 by weight (sd 0.065 at n=60)


# ---------------------------------------------------------------- real size


@pytest.mark.real_size
@pytest.mark.timeout(1800)  # a 7-8 B VLM's vision tower on 2 shared cores: 6-15 min for the three stages
@pytest.mark.parametrize("name", ["qwen3-vl-8b", "qwen2.5-vl-7b"])
def test_vlm_stages_at_real_size(name, tmp_path):
    """Qwen3-VL-8B and, to compare, Qwen2.5-VL-7B at real width (2 text layers) in bf16 on the same two
    photos, each with the house and the tree as objects to describe (what the real preset's test keeps: 2
    objects per image), 8 new tokens: seconds per image per VLM stage."""
    from datagen.real_size import OTHER_FACTORIES, free_models, make_photos, register, run_stages
    from datagen.stages.decode import DecodeConfig

    spec = register("cpu", factories=OTHER_FACTORIES if name == "qwen3-vl-8b" else None)["vlm"]
    free_models()
    batch, _ = run_stages(make_photos(tmp_path / "photos"), {"decode": DecodeConfig(max_side=1024)})
    batch["objects"] = []
    for w, h in zip(batch["width"], batch["height"], strict=True):
        house, tree = [0.15 * w, 0.25 * h, 0.53 * w, 0.75 * h], [0.6 * w, 0.3 * h, 0.8 * w, 0.8 * h]
        batch["objects"].append(
            [{**dict.fromkeys(("description", "detector_score", "mask", "mask_score", "mask_box", "clip_score")),
              "box": b, "phrase": p, "detector_score": 0.5} for b, p in ((house, "house"), (tree, "tree"))])
    model, processor = models.load_model(spec)
    if name == "qwen3-vl-8b":
        from transformers import Qwen3VLForConditionalGeneration

        assert type(model) is Qwen3VLForConditionalGeneration and model.dtype == torch.bfloat16
        assert model.config.text_config.hidden_size == 4096 and model.config.vision_config.depth == 27
        assert model.lm_head.weight.shape == (151936, 4096) and model.config.vision_config.out_hidden_size == 4096
        assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id == 151655
    del model, processor
    real = load_config(ROOT / "configs" / "datagen" / "real.yaml")
    configs = {s: dataclasses.replace(real.stages[s], model=spec, max_new_tokens=8) for s in ("tag", "caption")}
    configs["describe"] = dataclasses.replace(real.stages["describe"], model=spec, max_new_tokens=8,
                                              generate_batch_size=4)
    t0 = time.perf_counter()
    batch, timings = run_stages(batch, configs)
    wall = time.perf_counter() - t0
    assert batch["status"] == ["ok", "ok"], batch["error"]
    assert all(isinstance(c, str) and c for c in batch["caption"]) and all(batch["tags"])
    assert all(isinstance(o["description"], str) and o["description"] for objs in batch["objects"] for o in objs)
    figures = {f"{s}_s_per_image": round(busy / rows, 2) for s, (rows, busy, _) in timings.items()}
    print(f"\n{name} VLM stages at real size, bf16 on CPU (2 text layers of the real width), s/image: "
          + ", ".join(f"{k} {v}" for k, v in figures.items()) + f"; wall {wall:.0f} s")
    print(json.dumps({"benchmark": f"real_size_vlm_cpu_{name}", "figures": figures}))

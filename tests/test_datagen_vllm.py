"""The VLM stages on vLLM through ray.data.llm (``vlm.engine: vllm``), without vLLM or a GPU.

The plain functions on dicts: requests (the image and the prompt, nothing else), answers parsed as the
transformers engine parses them, crops exploded to requests and regrouped to their images in order,
per-row failures; the config checks; the processor config. Then the whole pipeline on a local Ray with
the real ``ray.data.llm`` processor, whose vLLM is a stand-in module written here (``FAKE_VLLM``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from ray.llm._internal.batch.stages.base import wrap_postprocess, wrap_preprocess

from datagen.config import ConfigError, build_config, fingerprint_dict, load_config
from datagen.models import preset
from datagen.stages import StageError, new_object, vlm_vllm
from datagen.stages.caption import CaptionConfig, clean_caption
from datagen.stages.describe import DescribeConfig
from datagen.stages.tag import TagConfig, tags_from_answer
from datagen.stages.vlm_vllm import (
    CARRIER,
    CHUNK,
    ERROR,
    REF,
    REQUEST,
    ChunkAssembler,
    explode_chunk,
    merge_answers,
    preprocess,
    processor_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "datagen"
TAG = TagConfig(model=preset("tiny")["vlm"], max_new_tokens=7, max_pixels=32 * 32)
CAPTION = CaptionConfig(model=preset("tiny")["vlm"], max_new_tokens=9)
DESCRIBE = DescribeConfig(model=preset("tiny")["vlm"], crop_short_side=40, max_crop_side=120, max_new_tokens=5)


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _chunk(images: list, failed: tuple[int, ...] = (), **columns) -> dict:
    """A chunk as the pipeline hands it to a pool; rows in ``failed`` already failed upstream."""
    n = len(images)
    cols = {
        "key": [f"k{i}" for i in range(n)],
        "source_caption": [f"a cat number {i}" for i in range(n)],
        "image": images,
        "status": ["failed" if i in failed else "ok" for i in range(n)],
        "error_stage": ["decode" if i in failed else None for i in range(n)],
        "error": ["DecodeError: truncated" if i in failed else None for i in range(n)],
        **columns,
    }
    return {"shard": 3, "start": 64, "columns": cols, "busy": {"decode": [n, 0.1]}, "nodes": ["n1"]}


def _process(rows: list[dict], stages: dict, answer, shuffle: int | None = None) -> list[dict]:
    """The processor on plain dicts: ray.data.llm's own pre/postprocess wrappers around ours, and
    ``answer(data) -> text`` (raising: a failed request) as the engine; rows that carry an inference
    error skip it, as they skip every ray.data.llm stage."""
    pre = wrap_preprocess(preprocess, "__data")
    post = wrap_postprocess(partial(vlm_vllm.postprocess, stages=stages), "__data", include_error_column=True)
    out = []
    for row in rows:
        wrapped = pre(dict(row))
        data = wrapped["__data"]
        if not data.get(ERROR):
            try:
                data.update(generated_text=answer(data), **{ERROR: ""})
            except Exception as e:  # noqa: BLE001 - what should_continue_on_error does
                data.update(generated_text="", **{ERROR: f"{type(e).__name__}: {e}"})
        out.append(post(wrapped))
    if shuffle is not None:
        random.Random(shuffle).shuffle(out)
    return out


def _text(data: dict) -> str:
    return data["messages"][0]["content"][1]["text"]


# ---------------------------------------------------------------- requests


def test_a_request_is_exactly_the_image_then_the_prompt_with_greedy_sampling():
    chunk = _chunk([_image(60, 90, 0)])
    request_row, carrier = explode_chunk(chunk, {"tag": TAG})
    out = preprocess(request_row)
    assert out["messages"] == [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": out["messages"][0]["content"][0]["image_pil"]},
        {"type": "text", "text": TAG.prompt}]}]
    image = out["messages"][0]["content"][0]["image_pil"]
    assert isinstance(image, Image.Image) and image.size == (39, 26)  # downscaled to max_pixels, aspect kept
    assert out["sampling_params"] == {"temperature": 0.0, "max_tokens": 7, "detokenize": False}
    assert isinstance(out[REQUEST], str)  # JSON text: one Arrow type whatever the request holds
    assert "image" not in json.loads(out[REQUEST])  # the pixels travel once, in the messages
    assert json.loads(out[REQUEST]) == {"stage": "tag", "row": 0, "object": None, "prompt": TAG.prompt, "max_tokens": 7,
                            "source_caption": "a cat number 0"}
    assert preprocess(carrier) == {ERROR: CARRIER}


def test_explode_asks_each_stage_about_each_ok_row_and_ends_with_the_carrier():
    chunk = _chunk([_image(20, 30, 1), _image(8, 8, 2), _image(30, 20, 3)], failed=(1,))
    rows = explode_chunk(chunk, {"tag": TAG, "caption": CAPTION})
    requests, carrier = rows[:-1], rows[-1]
    assert [(r[REQUEST]["stage"], r[REQUEST]["row"]) for r in requests] == [
        ("tag", 0), ("tag", 2), ("caption", 0), ("caption", 2)]
    assert [r[REF] for r in requests] == [{"chunk": "3:64", "index": k, "count": 4} for k in range(4)]
    assert all(r[CHUNK] is None for r in requests)
    assert carrier[REF] == {"chunk": "3:64", "index": -1, "count": 4} and carrier[REQUEST] is None
    assert carrier[CHUNK]["columns"] is chunk["columns"] and carrier[CHUNK][vlm_vllm.FAILED] == []
    assert [r[REQUEST]["prompt"] for r in requests] == [TAG.prompt] * 2 + [CAPTION.prompt] * 2
    assert requests[0][REQUEST]["image"].size == (30, 20)  # under max_pixels: as stored


def test_a_chunk_without_ok_rows_is_only_its_carrier_and_comes_back_unchanged():
    chunk = _chunk([_image(8, 8, 0)], failed=(0,))
    rows = explode_chunk(chunk, {"caption": CAPTION})
    assert len(rows) == 1 and rows[0][REF]["count"] == 0
    (back,) = ChunkAssembler({"caption": CAPTION}).add_all(_process(rows, {"caption": CAPTION}, _text))
    assert back["columns"]["caption"] == [None] and back["columns"]["status"] == ["failed"]
    assert back["columns"]["error_stage"] == ["decode"] and back["busy"] == chunk["busy"]


# ---------------------------------------------------------------- answers and regrouping


def test_tags_and_captions_are_parsed_as_the_transformers_engine_parses_them():
    chunk = _chunk([_image(20, 30, 4), _image(30, 20, 5), _image(25, 25, 6)])
    stages = {"tag": TAG, "caption": CAPTION}
    answers = {0: "1. A dog\n2. the dogs", 1: "\ufffd\ufffd", 2: "dog, red car and tree."}

    def answer(data):
        request = vlm_vllm.request_of(data)
        row = request["row"]
        return answers[row] if request["stage"] == "tag" else f"  A caption\n of {row}. "

    (back,) = ChunkAssembler(stages).add_all(_process(explode_chunk(chunk, stages), stages, answer, shuffle=0))
    cols = back["columns"]
    assert cols["tags"] == [tags_from_answer(answers[i], f"a cat number {i}", TAG) for i in range(3)]
    assert cols["tags"] == [["dog"], ["cat number"], ["dog", "red car", "tree"]]  # 1: the caption fallback
    assert cols["caption"] == [clean_caption(f"  A caption\n of {i}. ") for i in range(3)] == [
        "A caption of 0.", "A caption of 1.", "A caption of 2."]
    assert cols["status"] == ["ok"] * 3 and cols["error"] == [None] * 3
    assert back["shard"] == 3 and back["start"] == 64 and vlm_vllm.FAILED not in back


def test_describe_explodes_crops_and_regroups_them_to_their_images_in_order():
    objects = [
        [new_object([0, 0, 40, 40], "dog", 0.9), new_object([50, 50, 60, 60], "cup", 0.5),
         new_object([10, 0, 80, 30], "car", 0.7)],
        [],
        [new_object([5, 5, 70, 60], "tree", 0.8)],
    ]
    chunk = _chunk([_image(80, 80, 7), _image(30, 30, 8), _image(64, 96, 9)], objects=objects)
    stages = {"describe": DESCRIBE}
    rows = explode_chunk(chunk, stages)
    assert [(r[REQUEST]["row"], r[REQUEST]["object"]) for r in rows[:-1]] == [(0, 0), (0, 2), (2, 0)]  # cup < 32x32
    assert rows[0][REQUEST]["image"].size == (40, 40) and rows[1][REQUEST]["image"].size == (93, 40)

    def answer(data):
        row, obj = vlm_vllm.request_of(data)["row"], vlm_vllm.request_of(data)["object"]
        return " \ufffd " if (row, obj) == (0, 2) else f" the  object {obj}\nof image {row} "

    assembler = ChunkAssembler(stages)
    out = _process(rows, stages, answer, shuffle=1)
    assert assembler.add_all(out[:-1]) == [] and list(assembler.pending) == ["3:64"]  # waits for every row
    (back,) = assembler.add_all(out[-1:])
    assert assembler.pending == {}
    described = [[(o["phrase"], o["description"]) for o in objs] for objs in back["columns"]["objects"]]
    assert described == [
        [("dog", "the object 0 of image 0"), ("cup", "cup"), ("car", "car")],  # small box; empty answer
        [],
        [("tree", "the object 0 of image 2")],
    ]
    assert back["columns"]["objects"][0][0]["box"] == [0.0, 0.0, 40.0, 40.0]


def test_chunks_interleaved_in_any_order_each_come_back_once_complete():
    stages = {"caption": CAPTION}
    chunks = [dict(_chunk([_image(10, 10, 10 + i), _image(12, 10, 20 + i)]), start=16 * i) for i in range(3)]
    rows = [r for c in chunks for r in explode_chunk(c, stages)]
    back = ChunkAssembler(stages).add_all(_process(rows, stages, lambda d: f"caption {vlm_vllm.request_of(d)['row']}", shuffle=2))
    assert sorted(c["start"] for c in back) == [0, 16, 32]
    assert all(c["columns"]["caption"] == ["caption 0", "caption 1"] for c in back)


def test_a_failed_request_fails_only_its_row_in_its_first_failing_stage():
    chunk = _chunk([_image(20, 20, 11), _image(20, 20, 12), _image(20, 20, 13), _image(8, 8, 14)], failed=(3,))
    stages = {"tag": TAG, "caption": CAPTION}

    def answer(data):
        stage, row = vlm_vllm.request_of(data)["stage"], vlm_vllm.request_of(data)["row"]
        if row == 1 or (row == 2 and stage == "caption"):
            raise ValueError(f"prompt too long for {stage}")
        return "dog"

    (back,) = ChunkAssembler(stages).add_all(_process(explode_chunk(chunk, stages), stages, answer, shuffle=3))
    cols = back["columns"]
    assert cols["status"] == ["ok", "failed", "failed", "failed"]
    assert cols["error_stage"] == [None, "tag", "caption", "decode"]
    assert cols["error"][1:3] == ["ValueError: prompt too long for tag", "ValueError: prompt too long for caption"]
    assert cols["tags"] == [["dog"], None, ["dog"], None] and cols["caption"] == ["dog", None, None, None]


def test_a_row_whose_request_cannot_be_built_fails_and_the_others_go_on():
    chunk = _chunk([_image(20, 20, 15), np.zeros((4, 4), np.uint8)])
    stages = {"tag": TAG, "caption": CAPTION}
    rows = explode_chunk(chunk, stages)
    assert [(r[REQUEST]["stage"], r[REQUEST]["row"]) for r in rows[:-1]] == [("tag", 0), ("caption", 0)]
    (back,) = ChunkAssembler(stages).add_all(_process(rows, stages, lambda d: "a cat"))
    cols = back["columns"]
    assert cols["status"] == ["ok", "failed"] and cols["error_stage"] == [None, "tag"]
    assert cols["error"][1].startswith("ValueError: image must be HxWx3 uint8")
    assert cols["caption"] == ["a cat", None]


def test_every_row_of_a_chunk_failing_alike_stops_the_run():
    chunk = _chunk([_image(20, 20, 16), _image(20, 20, 17)])
    stages = {"caption": CAPTION}

    def broken(data):
        raise RuntimeError("engine dead")

    with pytest.raises(StageError, match="stage 'caption' failed on all 2 ok rows of a chunk with RuntimeError"):
        ChunkAssembler(stages).add_all(_process(explode_chunk(chunk, stages), stages, broken))
    # One ok row failing alone is a row failure, as with the transformers engine.
    single = _chunk([_image(20, 20, 18), _image(8, 8, 19)], failed=(1,))
    (back,) = ChunkAssembler(stages).add_all(_process(explode_chunk(single, stages), stages, broken))
    assert back["columns"]["status"] == ["failed", "failed"] and back["columns"]["error_stage"] == ["caption", "decode"]


def test_merge_keeps_old_values_on_rows_not_ok():
    chunk = _chunk([_image(20, 20, 20), _image(8, 8, 21)], failed=(1,), caption=[None, "kept"])
    rows = explode_chunk(chunk, {"caption": CAPTION})
    answers = [(rows[0][REQUEST], "new", None)]
    assert merge_answers(rows[-1][CHUNK], {"caption": CAPTION}, answers)["columns"]["caption"] == ["new", "kept"]


def test_request_batches_keep_one_arrow_type_and_merge_with_a_carrier_block():
    """Ray Data types each batch of the processor's ``__data`` column on its own and merges the batches of
    one task. Ray 2.60 fails to merge two different struct types with a block of pickled objects, so the
    request batches keep one type (a tag batch with source captions and a caption batch without once
    differed) and the carrier is no pickled block: its chunk crosses as bytes (``chunks.encode_carrier``)."""
    import pyarrow as pa
    from ray.data._internal.arrow_ops.transform_pyarrow import concat
    from ray.data.block import BlockAccessor

    from datagen.chunks import decode_carrier
    from datagen.pipeline import _explode_fn

    stages = {"tag": TAG, "caption": CAPTION}
    chunk = _chunk([_image(20, 30, 30), _image(30, 20, 31), _image(25, 25, 32)])
    rows = _explode_fn({"chunk": chunk}, stages)
    pre = wrap_preprocess(preprocess, "__data")
    data = [pre(dict(r))["__data"] for r in rows]
    for d in data:  # the image leaves the messages in PrepareMultimodal; what the later stages carry
        d.pop("messages", None)

    def arrow_type(part: list[dict]) -> pa.DataType:
        return BlockAccessor.batch_to_block({"__data": part}).schema.field("__data").type

    assert [d[REQUEST] and json.loads(d[REQUEST])["stage"] for d in data] == ["tag"] * 3 + ["caption"] * 3 + [None]
    tag_type, caption_type, carrier_type = arrow_type(data[:3]), arrow_type(data[3:6]), arrow_type(data[6:])
    assert pa.types.is_struct(tag_type) and tag_type == caption_type and tag_type.field(REQUEST).type == pa.string()
    assert pa.types.is_struct(carrier_type) and carrier_type.field(CHUNK).type == pa.binary()
    # The vLLM stage's rows: answered, and failed (its fields for a failed request), a batch of each.
    answered = {"prompt": "p", "prompt_token_ids": [1, 2], "generated_tokens": [3], "generated_text": "a",
                "request_id": 3, "time_taken_llm": 0.5, ERROR: ""}
    failed = {"prompt": "", "prompt_token_ids": None, "generated_tokens": [], "generated_text": "", "request_id": -1,
              "time_taken_llm": -1, ERROR: "RuntimeError: fake engine: portrait image"}
    parts = [[{**d, **answered} for d in data[:3]], [{**d, **failed} for d in data[3:6]], data[6:]]
    blocks = [BlockAccessor.batch_to_block({"__data": part}) for part in parts]
    assert blocks[0].schema != blocks[1].schema  # Ray's fields of failed requests type otherwise
    merged = concat(blocks, promote_types=True)  # this order failed with a pickled carrier
    assert merged.num_rows == 7
    back = decode_carrier(merged.column("__data").to_pylist()[-1][CHUNK])
    assert back["columns"]["key"] == chunk["columns"]["key"] and back[vlm_vllm.FAILED] == []
    assert all((a == b).all() for a, b in zip(back["columns"]["image"], chunk["columns"]["image"], strict=True))
    # The parsed answers too: a list of tags and a caption are one Arrow type, JSON text.
    values = [vlm_vllm.postprocess({**d, "generated_text": "dog, cat"}, stages)[vlm_vllm.VALUE] for d in data[:6]]
    assert pa.array(values).type == pa.string() and json.loads(values[0]) == ["dog", "cat"]
    assert json.loads(values[3]) == "dog, cat"


def test_a_carrier_chunk_round_trips_through_bytes_with_its_types():
    from datagen.chunks import decode_carrier, encode_carrier

    objects = [{"box": [1.0, 2.5, 30.0, 40.0], "phrase": "dog", "score": np.float32(0.7),
                "mask": np.eye(3, dtype=bool), "span": (0, 3)}]
    chunk = _chunk([_image(20, 30, 33), _image(8, 8, 34)], failed=(1,), objects=[objects, []],
                   source_jpeg=[b"\xff\xd8JPEG bytes", b""], meta=[{"width": 30, 7: "int key"}, {"__nd__": "a key"}],
                   score=[float("nan"), np.int64(3)], flags=[np.array([None, [1]], dtype=object), np.zeros((0, 2))])
    data = encode_carrier(chunk)
    back = decode_carrier(data)
    assert isinstance(data, bytes) and data.count(b"JPEG bytes") == 1  # bytes stored raw, once
    cols, old = back["columns"], chunk["columns"]
    assert {k: v for k, v in back.items() if k != "columns"} == {k: v for k, v in chunk.items() if k != "columns"}
    for name in ("key", "source_caption", "status", "error_stage", "error", "source_jpeg", "meta"):
        assert cols[name] == old[name], name
    image = cols["image"][0]
    assert image.dtype == np.uint8 and image.shape == (20, 30, 3) and (image == old["image"][0]).all()
    assert image.flags.writeable and image.flags.owndata
    obj = cols["objects"][0][0]
    assert obj["box"] == [1.0, 2.5, 30.0, 40.0] and obj["span"] == (0, 3) and cols["objects"][1] == []
    assert type(obj["score"]) is np.float32 and obj["score"] == np.float32(0.7)
    assert obj["mask"].dtype == bool and (obj["mask"] == np.eye(3)).all()
    assert np.isnan(cols["score"][0]) and type(cols["score"][1]) is np.int64 and cols["score"][1] == 3
    assert cols["flags"][0].dtype == object and cols["flags"][0][0] is None and cols["flags"][0][1] == [1]
    assert cols["flags"][1].shape == (0, 2) and cols["flags"][1].dtype == np.float64
    with pytest.raises(TypeError, match="a chunk value of type Image cannot be encoded"):
        encode_carrier({"image": Image.new("RGB", (2, 2))})


# ---------------------------------------------------------------- configuration


@pytest.fixture
def with_vllm(monkeypatch):
    """As if vLLM were installed (the config check only looks for it)."""
    monkeypatch.setattr(vlm_vllm, "vllm_available", lambda: True)


def test_engine_vllm_without_vllm_says_how_to_install_it():
    assert not vlm_vllm.vllm_available()
    with pytest.raises(ConfigError, match=r"vlm.engine: 'vllm' runs the stages \['tag', 'caption', "
                                          r"'describe'\] on vLLM, which is not installed .*pip install "
                                          r"'richlayout\[vllm\]' on a machine with NVIDIA GPUs"):
        load_config(CONFIGS / "real_vllm.yaml")
    # Nothing asks the VLM: nothing to install.
    build_config({"vlm": {"engine": "vllm"}, "stages": {"tag": {"method": "caption"}}})


def test_real_vllm_preset_and_its_processor_config(with_vllm):
    cfg = load_config(CONFIGS / "real_vllm.yaml")
    assert cfg.vllm_stages() == ("tag", "caption", "describe")
    assert [cfg.runs_on_vllm(p) for p in cfg.pools.values()] == [True, False, True, False]
    real = load_config(CONFIGS / "real.yaml")
    assert real.vllm_stages() == () and not any(real.runs_on_vllm(p) for p in real.pools.values())

    vllm = dataclasses.replace(cfg.vlm.vllm, max_num_seqs=128, accelerator_type="H100", cpu_stage_cpus=0.5,
                               engine_kwargs={"enable_prefix_caching": True, "pipeline_parallel_size": 1})
    model = dataclasses.replace(cfg.stages["tag"].model, revision="abc123")
    pc = processor_config(vllm, model, cfg.pools["vlm"])
    assert type(pc).__name__ == "vLLMEngineProcessorConfig"
    assert pc.model_source == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert pc.engine_kwargs == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "max_model_len": 8192,
                                "dtype": "auto", "limit_mm_per_prompt": {"image": 1}, "max_num_seqs": 128,
                                "revision": "abc123", "enable_prefix_caching": True, "pipeline_parallel_size": 1,
                                "task_type": "generate"}
    assert (pc.batch_size, pc.concurrency, pc.max_concurrent_batches) == (32, (1, 8), 8)
    assert pc.accelerator_type == "H100" and pc.should_continue_on_error is True
    assert pc.prepare_multimodal_stage.enabled and pc.prepare_multimodal_stage.chat_template_content_format == "openai"
    for stage in (pc.prepare_multimodal_stage, pc.chat_template_stage, pc.tokenize_stage, pc.detokenize_stage):
        assert stage.enabled and stage.num_cpus == 0.5
    fixed = processor_config(dataclasses.replace(vllm, model_source="s3://bucket/qwen"), model,
                             dataclasses.replace(cfg.pools["describe"], actors=3, max_actors=None))
    assert fixed.concurrency == (3, 3) and fixed.model_source == "s3://bucket/qwen"
    assert "revision" not in fixed.engine_kwargs  # a model_source is its own copy


def test_fingerprint_has_the_engine_only_for_vllm_runs(with_vllm):
    inputs = {"count": 1, "keys_sha256": "x"}
    real = fingerprint_dict(load_config(CONFIGS / "real.yaml"), inputs)
    assert "vlm" not in real  # transformers-engine runs keep their fingerprints
    cfg = load_config(CONFIGS / "real_vllm.yaml")
    fp = fingerprint_dict(cfg, inputs)
    assert fp["vlm"]["engine"] == "vllm" and fp["stages"] == real["stages"]  # same models, prompts, thresholds
    resized = load_config(CONFIGS / "real_vllm.yaml", {"vlm": {"vllm": {"batch_size": 8, "tensor_parallel_size": 2}},
                                                        "pools": {"vlm": {"num_gpus": 2}, "describe": {"num_gpus": 2}}})
    assert fingerprint_dict(resized, inputs) == fp  # sizes are not what a run produces
    longer = load_config(CONFIGS / "real_vllm.yaml", {"vlm": {"vllm": {"max_model_len": 4096}}})
    assert fingerprint_dict(longer, inputs) != fp


VLLM_BASE = {
    "models": "real",
    "vlm": {"engine": "vllm"},
    "pools": {"vlm": {"stages": ["tag", "caption"], "num_gpus": 1}, "d": {"stages": ["ground"]}},
}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"vlm": {"engine": "sglang"}}, r"vlm.engine: must be 'transformers' or 'vllm' \(got 'sglang'\)"),
        ({"vlm": {"vllm": {"tensor_parallel": 2}}}, r"vlm.vllm: unknown key 'tensor_parallel' \(valid keys: accelerator_type, batch_size, "),
        ({"vlm": {"vllm": {"tensor_parallel_size": "2"}}}, r"vlm.vllm.tensor_parallel_size: expected an integer \(got '2'\)"),
        ({"vlm": {"vllm": {"gpu_memory_utilization": 1.5}}}, r"vlm.vllm.gpu_memory_utilization: must be in \(0, 1\] \(got 1.5\)"),
        ({"vlm": {"vllm": {"chat_template_content_format": "raw"}}}, r"chat_template_content_format must be one of"),
        ({"vlm": {"vllm": {"engine_kwargs": {"max_model_len": 2}}}},
         r"engine_kwargs \['max_model_len'\]: set them as fields of vlm.vllm"),
        ({"pools": {"vlm": {"stages": ["tag", "caption", "ground"]}, "d": None}},
         r"pools.vlm: with vlm.engine vllm the stages \['tag', 'caption'\] run as a ray.data.llm "
         r"processor and cannot share a pool with \['ground'\]"),
        ({"pools": {"vlm": {"num_gpus": 0.5}}},
         r"pools.vlm.num_gpus: 0.5, but each vLLM engine replica takes 1 whole GPU"),
        ({"vlm": {"vllm": {"tensor_parallel_size": 2}}}, r"pools.vlm.num_gpus: 1, but .* takes 2 whole GPU"),
        ({"models": "tiny"}, r"stages.tag.model: vLLM loads real checkpoints, not backend 'tiny'"),
        ({"stages": {"caption": {"model": {"kind": "vlm", "name": "Qwen/Qwen2.5-VL-3B-Instruct"}}}},
         r"pools.vlm: the stages \['tag', 'caption'\] share one vLLM engine but name different models"),
    ],
)
def test_vllm_config_errors_name_the_field(with_vllm, override, message):
    data = json.loads(json.dumps(VLLM_BASE))
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            for k, v in value.items():
                if v is None:
                    data[key].pop(k)
                elif isinstance(v, dict) and isinstance(data[key].get(k), dict):
                    data[key][k] = {**data[key][k], **v}
                else:
                    data[key][k] = v
        else:
            data[key] = value
    with pytest.raises(ConfigError, match=message):
        build_config(data)


def test_vllm_base_config_is_valid(with_vllm):
    cfg = build_config(VLLM_BASE)
    assert cfg.vllm_stages() == ("tag", "caption") and cfg.runs_on_vllm(cfg.pools["vlm"])


# ---------------------------------------------------------------- the pipeline, with a stand-in vLLM

# The parts of vLLM that ray.data.llm's stages call, as a module: multimodal message parsing (the
# OpenAI format, images as PIL) and an engine that answers from the prompt. It checks what it gets:
# one image per request, reaching the engine, and a chat-templated prompt with one image placeholder.
FAKE_VLLM = '''
import sys, types

def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module

class ModelConfig:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

async def parse_chat_messages_async(messages, model_config, content_format="string"):
    if content_format != "openai":
        raise ValueError(f"fake vllm: expected the openai content format, got {content_format!r}")
    conversation, images = [], []
    for message in messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "image_pil":
                images.append(part["image_pil"])
                parts.append({"type": "image"})
            else:
                parts.append(dict(part))
        conversation.append({"role": message["role"], "content": parts})
    if len(images) != 1:
        raise ValueError(f"fake vllm: {len(images)} images in one request")
    return conversation, {"image": images[0]}, None

class SamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, detokenize=True, structured_outputs=None, **kwargs):
        if temperature != 0.0 or detokenize:
            raise ValueError("fake vllm: expected greedy decoding without detokenizing")
        self.max_tokens = max_tokens

class TextPrompt(dict):
    pass

class TokensPrompt(dict):
    pass

class CompletionOutput:
    def __init__(self, token_ids, text):
        self.token_ids, self.text, self.logprobs = token_ids, text, None

class RequestOutput:
    def __init__(self, prompt_token_ids, outputs):
        self.prompt, self.prompt_token_ids, self.outputs = None, prompt_token_ids, outputs
        self.finished, self.metrics, self.prompt_logprobs = True, None, None

class PoolingRequestOutput:
    pass

class AsyncEngineArgs:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def create_engine_config(self):
        ns = types.SimpleNamespace
        return ns(scheduler_config=ns(max_num_seqs=8), parallel_config=ns(pipeline_parallel_size=1))

class AsyncLLMEngine:
    def __init__(self, args):
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(args.kwargs["model"])

    @classmethod
    def from_engine_args(cls, args, stat_loggers=None):
        return cls(args)

    async def generate(self, request_id, prompt, sampling_params, lora_request=None):
        image = prompt["multi_modal_data"]["image"]
        text = self.tokenizer.decode(prompt["prompt_token_ids"])
        if text.count("<|image_pad|>") != 1 or not text.rstrip().endswith("assistant"):
            raise ValueError(f"fake vllm: not a chat-templated prompt with one image: {text!r}")
        if "List the distinct objects" in text:
            answer = "dog, red car"
        elif "Describe this image" in text:
            if image.height > image.width:
                raise RuntimeError("fake engine: portrait image")
            answer = "A dog next to a red car."
        else:
            answer = f"the dog left of the car in a {image.width}x{image.height} crop"
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"][: sampling_params.max_tokens]
        yield RequestOutput(prompt["prompt_token_ids"], [CompletionOutput(ids, "")])

    async def do_log_stats(self):
        pass

    def shutdown(self):
        pass

class RayPrometheusStatLogger:
    pass

_module("vllm.config", ModelConfig=ModelConfig)
_module("vllm.entrypoints")
_module("vllm.entrypoints.chat_utils", parse_chat_messages_async=parse_chat_messages_async)
_module("vllm.inputs", TextPrompt=TextPrompt, TokensPrompt=TokensPrompt)
_module("vllm.outputs", RequestOutput=RequestOutput, PoolingRequestOutput=PoolingRequestOutput)
_module("vllm.sampling_params", SamplingParams=SamplingParams)
_module("vllm.v1")
_module("vllm.v1.metrics")
_module("vllm.v1.metrics.ray_wrappers", RayPrometheusStatLogger=RayPrometheusStatLogger)
config, outputs = sys.modules["vllm.config"], sys.modules["vllm.outputs"]
'''


@pytest.mark.slow
def test_pipeline_with_ray_data_llm_processors_on_a_stand_in_vllm(tmp_path, monkeypatch, with_vllm):
    """The real processors (PrepareMultimodal, ChatTemplate, Tokenize, vLLM, Detokenize stages) between
    our explode and assembler, on a local Ray; the tiny detector grounds the fake tags. Without segment,
    score and filter this stage set also once broke the hand-off of packed chunks (Arrow structs)."""
    from datagen.run import run
    from datagen.synthetic import make_image_folder
    from datagen.tiny_models import tiny_vlm
    from shards import iter_samples, validate_dataset

    fake = tmp_path / "fake" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_VLLM)
    model, processor = tiny_vlm()  # its tokenizer and chat template; the engine never loads the weights
    model_dir = tmp_path / "tiny-vlm"
    model.config.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    make_image_folder(tmp_path / "in", 10, seed=3, min_size=48, max_size=96)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not an image")
    # Ray workers start from this environment: they import the stand-in as vllm; this process does not.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]))

    vlm = {"kind": "vlm", "name": str(model_dir)}
    cfg = build_config({
        "models": "tiny",
        "inputs": {"samples_per_shard": 6},
        "decode": {"max_side": 96, "min_side": 16},
        "stages": {"tag": {"model": vlm}, "caption": {"model": vlm},
                   "ground": {"image_size": 96, "forward_batch_size": 1}, "describe": {"model": vlm}},
        "vlm": {"engine": "vllm", "vllm": {"batch_size": 4, "max_concurrent_batches": 2, "cpu_stage_cpus": 0.25,
                                           "max_model_len": 4096}},
        "pools": {"vlm": {"stages": ["tag", "caption"], "num_gpus": 1},
                  "detect": {"stages": ["ground"], "num_cpus": 0.5},
                  "describe": {"stages": ["describe"], "num_gpus": 1}},
        "execution": {"chunk_size": 4, "decode_tasks": 1, "decode_cpus": 0.25, "pack_tasks": 1, "pack_cpus": 0.25,
                      "num_cpus": 8, "num_gpus": 2},  # logical: two engines (one per processor) and CPU stages
    })
    summary = run(cfg, [str(tmp_path / "in")], str(tmp_path / "out"), progress=False)
    assert summary.inputs == 11 and summary.processed == 11
    assert validate_dataset(str(tmp_path / "out")) == []

    df = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "out").glob("*.parquet"))], ignore_index=True)
    assert len(df) == 11
    by_status = df.groupby(["status", "error_stage"], dropna=False).size().to_dict()
    portrait = df[(df.error_stage != "decode") & (df.height > df.width)]
    failed = df[df.error_stage == "caption"]
    assert len(portrait) > 0 and sorted(failed.key) == sorted(portrait.key), by_status
    assert (failed.error == "RuntimeError: fake engine: portrait image").all()
    assert df[df.error_stage == "decode"].source.str.endswith("broken.jpg").all() and (df.error_stage == "decode").sum() == 1
    assert set(df.status) <= {"ok", "failed", "filtered"} and (df.status == "failed").sum() == len(failed) + 1
    samples = list(iter_samples(str(tmp_path / "out")))
    assert len(samples) == (df.status == "ok").sum() > 0
    for s in samples:
        assert s.record.caption == "A dog next to a red car."
        for obj in s.record.objects:
            assert obj.phrase in ("dog", "red car")
            big = (obj.box[2] - obj.box[0]) * (obj.box[3] - obj.box[1]) >= 32 * 32
            if big:
                assert obj.description.startswith("the dog left of the car in a ")
            else:
                assert obj.description == obj.phrase
    assert any(o.description != o.phrase for s in samples for o in s.record.objects)


# ---------------------------------------------------------------- plan, run record, sizing


def test_plan_shows_vllm_pools_as_processors_and_refuses_without_vllm(with_vllm, monkeypatch, capsys):
    from datagen.cli import main
    from datagen.plan import plan_text

    cfg = load_config(CONFIGS / "real_vllm.yaml", {"vlm": {"vllm": {"batch_size": 24, "cpu_stage_cpus": 0.5}}})
    rows = {line.split()[0]: line for line in plan_text(cfg).splitlines() if line[:10].strip() in
            ("tag", "caption", "ground", "describe", "score")}
    for stage, pool in (("tag", "vlm"), ("caption", "vlm"), ("describe", "describe")):
        assert rows[stage].startswith(f"{stage:<10}vLLM processor '{pool}'")
        # batch: vlm.vllm.batch_size; cpus: vlm.vllm.cpu_stage_cpus; gpus: the pool's (one replica's)
        assert rows[stage].split()[4:7] == ["24", "0.5", "1.0"], rows[stage]
        assert rows[stage].endswith("Qwen/Qwen2.5-VL-7B-Instruct (vLLM)")
    assert rows["tag"].split()[7] == "1-8" and rows["describe"].split()[7] == "1-16"  # engine replicas
    assert rows["ground"].startswith("ground    actor pool 'detect'") and rows["ground"].split()[4:7] == ["16", "4.0", "0.5"]
    assert "GPUs needed at full pool size: 29" in plan_text(cfg)  # 8 + 8 x 0.5 + 16 + 4 x 0.25
    assert "vLLM processor: workers are engine replicas of 1 GPU(s)" in plan_text(cfg)
    # The same config on the transformers engine: actor pools, the stages' own batch sizes, no vLLM line.
    plain = plan_text(load_config(CONFIGS / "real_vllm.yaml", {"vlm": {"engine": "transformers"}}))
    assert "vLLM" not in plain and "tag       actor pool 'vlm'" in plain
    # --set vlm.engine=vllm on the real preset gives the same processors.
    real = load_config(CONFIGS / "real.yaml", {"vlm": {"engine": "vllm"}})
    assert [real.runs_on_vllm(p) for p in real.pools.values()] == [True, False, True, False]
    monkeypatch.setattr(vlm_vllm, "vllm_available", lambda: False)
    assert main(["plan", "--config", str(CONFIGS / "real_vllm.yaml")]) == 2
    assert "'vllm' runs the stages ['tag', 'caption', 'describe'] on vLLM, which is not installed" in capsys.readouterr().err


def test_run_record_says_which_pools_ran_on_vllm_and_size_asks_for_their_rates(with_vllm, tmp_path):
    from collections import Counter

    from datagen import measurement, sizing
    from datagen.run import Summary, run_record, save_run_record

    cfg = load_config(CONFIGS / "real_vllm.yaml")
    busy = {"decode": (100, 2.0), "ground": (100, 10.0), "segment": (100, 10.0), "score": (100, 2.0),
            "filter": (100, 0.1), "pack": (100, 4.0)}  # what a vLLM run measures: no tag, caption, describe
    summary = Summary(output=str(tmp_path), inputs=100, processed=100, busy=busy, wall_seconds=40.0, nodes=1,
                      statuses=Counter(ok=100), objects=700, startup_seconds=20.0, startup_rows=20,
                      vllm_stages=cfg.vllm_stages())
    record = run_record(summary, cfg)
    assert record["pools"]["vlm"] == {"stages": ["tag", "caption"], "num_gpus": 1.0, "num_cpus": 1.0, "actors": 1,
                                      "max_actors": 8, "engine": "vllm",
                                      "vllm": {"gpus_per_replica": 1, "batch_size": 32, "max_concurrent_batches": 8,
                                               "cpu_stage_cpus": 1.0}}
    assert record["pools"]["describe"]["engine"] == "vllm"
    assert record["pools"]["detect"]["engine"] == record["pools"]["score"]["engine"] == "actors"
    assert "vllm" not in record["pools"]["detect"]
    assert "tag, caption, describe: on vLLM, no busy time measured" in summary.format()
    save_run_record(str(tmp_path), record)
    m = measurement.load_measurement(str(tmp_path))
    with pytest.raises(sizing.SizingError) as info:
        sizing.size(m, 3_300_000, 24)
    # (100 - 20) / (40 - 20) = 4 img/s after start-up; over 8 and 16 replicas
    assert "pool 'vlm' (stages tag, caption); pool 'describe' (stages describe) ran on vLLM" in str(info.value)
    assert "(--rates tag=0.5,caption=inf)" in str(info.value) and "(--rates describe=0.25)" in str(info.value)
    plan = sizing.size(measurement.with_rates(m, {"tag": 10.0, "caption": 10.0, "describe": 2.0}), 3_300_000, 24)
    vlm = next(p for p in plan.pools if p.name == "vlm")
    assert (vlm.kind, vlm.workers, vlm.gpus) == ("vLLM engines", 8, 8)  # 38.19 / 5 = 7.6 -> 8 replicas
    assert Summary(output="x").format().count("vLLM") == 0  # a transformers-engine run says nothing of it
    # size --config of a vLLM config (where vLLM is installed): the same pools, the same refusal.
    from_config = measurement.measurement_from_config(cfg, "real_vllm.yaml")
    assert [(p.name, p.engine) for p in from_config.pools] == [
        ("decode", "actors"), ("vlm", "vllm"), ("detect", "actors"), ("describe", "vllm"), ("score", "actors"),
        ("pack", "actors")]
    with pytest.raises(sizing.SizingError, match=r"^real_vllm.yaml: pool 'vlm' \(stages tag, caption\); pool "
                                                 r"'describe' \(stages describe\) ran on vLLM"):
        sizing.size(measurement.with_rates(from_config, {"ground": 10.0, "segment": 10.0}), 3_300_000, 24)


def test_the_vllm_version_is_recorded_when_installed(monkeypatch):
    import importlib.metadata

    from datagen import run

    real = importlib.metadata.version

    def version(name):
        return "0.29.0" if name == "vllm" else real(name)

    assert "vllm" not in run._versions()  # not installed here
    monkeypatch.setattr(importlib.metadata, "version", version)
    assert run._versions()["vllm"] == "0.29.0"

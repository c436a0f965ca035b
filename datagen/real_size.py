"""The real preset's models at their real sizes with random weights, built offline.

Tiny builds (``datagen.tiny_models``) hide shape, dtype, memory and preprocessing mistakes that only
real widths show. These factories build the real configurations of the ``real`` preset (Qwen2.5-VL-7B
with its language model cut to ``VLM_TEXT_LAYERS`` layers at full width, GroundingDINO-tiny, SAM ViT-H,
open_clip ViT-L-14 with QuickGELU) with the real processors' settings and the real special-token ids.
``register`` adds them to the tiny backend's registry, so the stages load them through ``load_model``
as ``ModelSpec(kind, name, backend="tiny")``. Used by ``tests/test_real_size.py`` and
``benchmarks/real_size.py``.
"""

from __future__ import annotations

import contextlib
import string
from collections.abc import Callable, Iterator
from functools import partial

import torch

from . import models as _models
from . import tiny_models
from .models import ModelSpec
from .tiny_vlm3 import qwen3_vl_8b

VLM_TEXT_LAYERS = 2  # of Qwen2.5-VL-7B's 28: the widths (and so every shape) stay real
QWEN_IDS = {  # Qwen2.5-VL's special tokens at the ids of its real tokenizer
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
# bert-base-uncased's ids that transformers' GroundingDINO hard-codes ([CLS], [SEP], ".", "?").
BERT_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
# Qwen2.5-VL's chat template when no system turn is given: the default system prompt comes first.
VLM_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}" + tiny_models.VLM_CHAT_TEMPLATE
)


@contextlib.contextmanager
def _building(device: str, dtype: torch.dtype, seed: int = tiny_models.SEED) -> Iterator[None]:
    """Parameters created directly on ``device`` in ``dtype`` (no fp32 copy on the host), seeded."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_default_dtype(previous)


def _qwen_tokenizer():
    """A byte-level BPE tokenizer filling Qwen2.5-VL's 151643 regular ids, specials at their real ids."""
    from transformers import Qwen2Tokenizer

    vocab, merges = tiny_models._byte_bpe(tiny_models.WORDS)
    # Every regular id decodes to a word, so a random model's answers are text like a real one's.
    vocab.update({f"\u0120w{i}": i for i in range(len(vocab), min(QWEN_IDS.values()))})
    vocab.update(QWEN_IDS)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in QWEN_IDS if t != "<|endoftext|>"],
    )
    tokenizer.padding_side = "left"
    return tokenizer


def real_vlm(device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """Qwen2.5-VL-7B-Instruct's configuration (vision tower whole, ``VLM_TEXT_LAYERS`` text layers)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _qwen_tokenizer()
    image_processor = Qwen2VLImageProcessor(  # preprocessor_config.json of the hub model
        min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=VLM_CHAT_TEMPLATE,
    )
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=VLM_TEXT_LAYERS,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            tie_word_embeddings=False,
            bos_token_id=QWEN_IDS["<|endoftext|>"],
            eos_token_id=QWEN_IDS["<|im_end|>"],
            pad_token_id=QWEN_IDS["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2,
        ),
        image_token_id=QWEN_IDS["<|image_pad|>"],
        video_token_id=QWEN_IDS["<|video_pad|>"],
        vision_start_token_id=QWEN_IDS["<|vision_start|>"],
        vision_end_token_id=QWEN_IDS["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    with _building(device, dtype):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [QWEN_IDS["<|im_end|>"], QWEN_IDS["<|endoftext|>"]]
    model.generation_config.pad_token_id = QWEN_IDS["<|endoftext|>"]
    return model.eval(), processor


def real_qwen3_vl(device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """Qwen3-VL-8B-Instruct's configuration (vision tower whole, ``VLM_TEXT_LAYERS`` of its 36 text
    layers, as for Qwen2.5-VL-7B; ``datagen.tiny_vlm3``): same tokenizer and special-token ids."""
    return qwen3_vl_8b(_qwen_tokenizer(), QWEN_IDS, VLM_TEXT_LAYERS, _building(device, dtype))


def _bert_tokenizer():
    """bert-base-uncased's 30522 ids with its special and punctuation ids where GroundingDINO expects them."""
    from transformers import BertTokenizer

    words = [w for w in tiny_models.WORDS if len(w) > 1]
    pieces = list(string.ascii_lowercase) + list(string.digits) + [p for p in string.punctuation if p not in ".?"]
    pieces += ["##" + c for c in string.ascii_lowercase + string.digits] + words
    vocab = dict(BERT_IDS)
    free = (i for i in range(30522) if i not in BERT_IDS.values())
    for token in pieces:
        vocab[token] = next(free)
    for i in free:
        vocab[f"[unused{i}]"] = i
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def real_grounding_dino(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """grounding-dino-tiny: transformers' GroundingDinoConfig defaults (Swin-T, BERT-base), 800 px inputs."""
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=_bert_tokenizer())
    # The custom deformable-attention kernel is compiled on first use (nothing to fetch offline).
    config = GroundingDinoConfig(disable_custom_kernels=True)
    with _building(device, dtype):
        model = GroundingDinoForObjectDetection(config)
    return model.eval(), processor


def real_sam(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """segment-anything's ViT-H (``sam_model_registry["vit_h"]``) at 1024 px, random weights."""
    from segment_anything import sam_model_registry
    from segment_anything.utils.transforms import ResizeLongestSide

    with _building(device, dtype):
        sam = sam_model_registry["vit_h"](checkpoint=None)
    return sam.eval(), ResizeLongestSide(sam.image_encoder.img_size)


def real_clip(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """open_clip's ViT-L-14 as the OpenAI weights use it (QuickGELU, 224 px), with its tokenizer."""
    import open_clip

    precision = {torch.float32: "fp32", torch.bfloat16: "pure_bf16", torch.float16: "pure_fp16"}[dtype]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny_models.SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(
            "ViT-L-14", pretrained=None, precision=precision, device=device, force_quick_gelu=True
        )
    return model.eval(), tiny_models.ClipProcessor(preprocess, open_clip.get_tokenizer("ViT-L-14"))


def real_sam3(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """facebook/sam3 (ViT 32 layers width 1024 at 1008 px, CLIP text 24 layers; ``datagen.tiny_sam``)."""
    from .tiny_sam import real_sam3 as build

    return build(_building(device, dtype))


def real_sam2_large(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """facebook/sam2.1-hiera-large (Hiera-L at 1024 px; ``datagen.tiny_sam``)."""
    from .tiny_sam import real_sam2_large as build

    return build(_building(device, dtype))


# name -> (kind, factory(device, dtype), the dtype the real preset runs it in on a GPU).
FACTORIES: dict[str, tuple[str, Callable, torch.dtype]] = {
    "real-size-qwen2.5-vl-7b": ("vlm", real_vlm, torch.bfloat16),
    "real-size-grounding-dino-tiny": ("detector", real_grounding_dino, torch.float32),
    "real-size-sam-vit-h": ("segmenter", real_sam, torch.float32),
    "real-size-clip-vit-l-14": ("clip", real_clip, torch.bfloat16),
}


# Other real-size builds, not in the real preset: name -> (kind, factory(device, dtype), dtype on a GPU).
OTHER_FACTORIES: dict[str, tuple[str, Callable, torch.dtype]] = {
    "real-size-qwen3-vl-8b": ("vlm", real_qwen3_vl, torch.bfloat16),  # the sam3 preset's VLM
    # float32 weights as load_model keeps them; the image encoders run under autocast to the spec's dtype
    "real-size-sam3": ("detector", real_sam3, torch.float32),  # the sam3 preset's ground-and-segment engine
    "real-size-sam2.1-hiera-large": ("segmenter", real_sam2_large, torch.float32),
}


def register(device: str = "cpu", dtypes: dict[str, torch.dtype] | None = None,
             factories: dict[str, tuple[str, Callable, torch.dtype]] | None = None) -> dict[str, ModelSpec]:
    """Add the real-size builds to the tiny backend (built on ``device``); their specs by kind.

    ``dtypes`` (kind -> dtype) overrides the real preset's dtypes, e.g. float32 VLMs on a CPU without bf16.
    ``factories``: the builds to add (default ``FACTORIES``, the real preset's; or e.g. ``OTHER_FACTORIES``).
    """
    specs = {}
    for name, (kind, factory, dtype) in (FACTORIES if factories is None else factories).items():
        dtype = (dtypes or {}).get(kind, dtype)
        tiny_models.TINY_FACTORIES[name] = (kind, partial(factory, device, dtype))
        _models.TINY_KINDS[name] = kind
        dtype_name = next(k for k, v in _models.DTYPES.items() if v == dtype)
        specs[kind] = ModelSpec(kind, name, dtype=dtype_name, device=device, backend="tiny")
    return specs


def free_models() -> None:
    """Drop every model ``load_model`` cached in this process (call after deleting the stages using them)."""
    import gc

    _models._load_cached.cache_clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ the real preset's stages, timed

STAGE_COLUMNS = {  # what each stage must leave on an ok row
    "decode": ("image", "width", "height", "original_width", "original_height"),
    "tag": ("tags",),
    "caption": ("caption",),
    "ground": ("objects",),
    "segment": ("objects",),
    "describe": ("objects",),
    "score": ("objects",),
    "filter": ("objects",),
}


def real_stage_configs(specs: dict[str, ModelSpec], config_path: str, overrides: dict | None = None):
    """``(DatagenConfig, {stage: config})`` of a preset (e.g. configs/datagen/real.yaml), decode first,
    models swapped for ``specs``.

    ``overrides``: stage -> {field: value}, applied after the swap (e.g. fewer new tokens on a CPU).
    """
    import dataclasses

    from .config import load_config

    cfg = load_config(config_path)
    out = {"decode": cfg.decode}
    for name in cfg.stage_names:
        stage_cfg = cfg.stages[name]
        model = getattr(stage_cfg, "model", None)
        if model is not None:
            stage_cfg = dataclasses.replace(stage_cfg, model=specs[model.kind])
        out[name] = dataclasses.replace(stage_cfg, **(overrides or {}).get(name, {}))
    return cfg, out


def run_stages(inputs: dict, configs: dict, on_stage: Callable | None = None) -> tuple[dict, dict]:
    """Run decode then each model stage of ``configs`` on one batch, one model in memory at a time.

    Returns the final batch and per stage ``(rows, busy_seconds, load_seconds)``; model loads are timed
    apart, as a run's actors load once. ``on_stage(name, batch)`` sees each stage's output.
    """
    import time

    from .config import stage_classes
    from .stages.decode import DecodeStage

    timings: dict[str, tuple[int, float, float]] = {}
    batch = inputs
    for name, stage_cfg in configs.items():
        free_models()
        t0 = time.perf_counter()
        stage = DecodeStage(stage_cfg) if name == "decode" else stage_classes(name)[0](stage_cfg)
        t1 = time.perf_counter()
        with torch.inference_mode():
            batch = stage(batch)
        t2 = time.perf_counter()
        del stage
        rows = len(batch["key"])
        timings[name] = (rows, t2 - t1, t1 - t0)
        if on_stage:
            on_stage(name, batch)
    free_models()
    return batch, timings


def busy_summary(output: str, timings: dict, batch: dict, wall_seconds: float):
    """A ``datagen.run.Summary`` of a ``run_stages`` call, for ``datagen.measurement.run_record``."""
    from collections import Counter

    from .run import Summary

    statuses = Counter(batch["status"])
    objects = sum(len(o or []) for o, s in zip(batch["objects"], batch["status"], strict=True) if s == "ok")
    return Summary(
        output=output,
        inputs=len(batch["key"]),
        processed=len(batch["key"]),
        busy={name: (rows, busy) for name, (rows, busy, _) in timings.items()},
        wall_seconds=wall_seconds,
        nodes=1,
        statuses=statuses,
        objects=objects,
    )


PHOTO_SIZES = ((640, 480), (500, 750))  # (width, height): a landscape and a portrait photo


def make_photos(folder, sizes=PHOTO_SIZES) -> dict:
    """Photo-like JPEGs (sky-to-ground gradients, a sun, a house, a tree) and their decode-stage input columns."""
    from pathlib import Path

    import numpy as np
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (w, h) in enumerate(sizes):
        y = np.linspace(0, 1, h)[:, None, None]
        x = np.linspace(0, 1, w)[None, :, None]
        sky = np.array([90, 150, 235]) * (1 - y) + np.array([200, 220, 250]) * y
        ground = np.array([60, 140, 50]) * (1 - x * 0.3)
        rgb = np.where(y < 0.6, sky, ground + 40 * y).astype(np.uint8)
        noise = np.random.default_rng(k).integers(-12, 13, rgb.shape)  # sensor noise: JPEG blocks like a photo's
        im = Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        d.ellipse((0.75 * w, 0.08 * h, 0.88 * w, 0.08 * h + 0.13 * w), fill=(250, 220, 90))
        d.rectangle((0.15 * w, 0.4 * h, 0.5 * w, 0.75 * h), fill=(170, 60, 50))
        d.polygon([(0.12 * w, 0.4 * h), (0.325 * w, 0.25 * h), (0.53 * w, 0.4 * h)], fill=(90, 50, 40))
        d.rectangle((0.28 * w, 0.58 * h, 0.36 * w, 0.75 * h), fill=(80, 50, 30))
        d.rectangle((0.68 * w, 0.5 * h, 0.71 * w, 0.8 * h), fill=(90, 60, 30))
        d.ellipse((0.6 * w, 0.3 * h, 0.8 * w, 0.55 * h), fill=(30, 110, 40))
        path = folder / f"photo{k}.jpg"
        im.save(path, quality=90)
        paths.append(path)
    captions = ["a red house with a brown door next to a green tree under a blue sky"] * len(paths)
    return {"key": [p.stem for p in paths], "source": [p.name for p in paths], "uri": [str(p) for p in paths],
            "caption": captions}

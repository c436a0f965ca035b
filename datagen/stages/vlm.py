"""Batched chat generation with a vision-language model, shared by the tag, caption and describe stages.

One user turn per item (the image, then the prompt) through the processor's chat template; items are
sorted by image area so each ``generate`` call batches images of similar size (less padding), with
left padding as decoder-only generation needs, greedy decoding, and only the new tokens decoded.
This is the ``transformers`` engine; ``vlm_vllm`` sends the same turns (``to_pil`` images, greedy) to vLLM.

Nothing here knows a model family: the prompt text, the image placeholders and the assistant turn are
the processor's chat template's, and the model's extra inputs (Qwen2.5-VL's ``image_grid_thw``,
Qwen3-VL's ``mm_token_type_ids``, ...) go to ``generate`` as the processor returns them. So any chat
VLM that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load natively (no remote code) and whose
processor has a chat template runs here: Qwen2.5-VL, Qwen3-VL, LLaVA, ... (``load_chat_vlm``
refuses a processor without a template).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def load_chat_vlm(spec) -> tuple:
    """``(model, processor)`` of a VLM stage's ``ModelSpec`` (``datagen.models.load_model``), refused
    with a ValueError naming the model when its processor cannot render a chat turn."""
    from ..models import load_model

    model, processor = load_model(spec)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "apply_chat_template"):
        raise ValueError(f"VLM {spec.name!r}: its processor ({type(processor).__name__}) has no tokenizer or "
                         "cannot apply a chat template; the VLM stages need a chat model's processor")
    if not (getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)):
        raise ValueError(f"VLM {spec.name!r}: its processor has no chat template (chat_template.jinja or "
                         "chat_template.json in the model folder); the VLM stages build every prompt with it")
    return model, processor


def generate(
    model,
    processor,
    images: Sequence[np.ndarray],
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_pixels: int | None = None,
) -> list[str]:
    """The model's raw answer to each (image, prompt) pair, in input order (see ``clean_text``)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    templates = {p: _chat_text(processor, p) for p in set(prompts)}
    order = sorted(range(len(images)), key=lambda i: images[i].shape[0] * images[i].shape[1])
    answers: list[str] = [""] * len(images)
    for start in range(0, len(order), max(1, batch_size)):
        chunk = order[start : start + batch_size]
        pil = [to_pil(images[i], max_pixels) for i in chunk]
        texts = [templates[prompts[i]] for i in chunk]
        for i, text in zip(chunk, _generate_chunk(model, processor, pil, texts, max_new_tokens), strict=True):
            answers[i] = text
    return answers


def ask(model, processor, images: Sequence[np.ndarray], cfg) -> list[str]:
    """``generate`` with one prompt for every image, set by a VLM stage's config (its ``prompt``,
    ``max_new_tokens``, ``generate_batch_size`` and ``max_pixels`` fields)."""
    return generate(
        model,
        processor,
        images,
        [cfg.prompt] * len(images),
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.generate_batch_size,
        max_pixels=cfg.max_pixels,
    )


def _chat_text(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def to_pil(image: np.ndarray, max_pixels: int | None) -> Image.Image:
    """The image as the VLM sees it: a PIL image, downscaled to at most ``max_pixels`` (aspect kept)."""
    pil = Image.fromarray(image)
    if max_pixels and pil.width * pil.height > max_pixels:
        scale = (max_pixels / (pil.width * pil.height)) ** 0.5
        pil = pil.resize((max(1, int(pil.width * scale)), max(1, int(pil.height * scale))), Image.BICUBIC)
    return pil


@torch.inference_mode()
def _generate_chunk(
    model, processor, images: list[Image.Image], texts: list[str], max_new_tokens: int
) -> list[str]:
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new_tokens, skip_special_tokens=True)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")


def clean_text(text: str) -> str:
    """Generated text with control/replacement characters removed and whitespace collapsed."""
    return " ".join(_CONTROL.sub(" ", text).split())

"""Shared helpers for the model tests: tiny SDXL parts built once per process, random layouts."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from training.layout.regions import RegionLayout, reorganize_regions
from training.model.encoding import RegionTextEncoder
from training.model.tiny import TINY_WORDS, tiny_text_encoders, tiny_tokenizers


@lru_cache(maxsize=1)
def tokenizers():
    """The two tiny SDXL tokenizers (written once per test process)."""
    return tiny_tokenizers()


@lru_cache(maxsize=1)
def text_encoders():
    """The two tiny SDXL text encoders."""
    return tiny_text_encoders(seed=0)


def region_encoder(**kwargs) -> RegionTextEncoder:
    """A fresh region-text encoder (own cache and counters) on the shared tiny models."""
    return RegionTextEncoder(tokenizers(), text_encoders(), **kwargs)


def random_boxes(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """``n`` random boxes (pixels, xyxy) inside a ``height`` x ``width`` image."""
    a = rng.uniform(0, 1, size=(n, 2)) * [width, height]
    b = rng.uniform(0, 1, size=(n, 2)) * [width, height]
    return np.concatenate([np.minimum(a, b), np.maximum(a, b)], axis=1)


def random_texts(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` descriptions of 2-8 words from the tiny vocabulary."""
    return [" ".join(rng.choice(TINY_WORDS, size=rng.integers(2, 9))) for _ in range(n)]


def random_layout(rng: np.random.Generator, n: int, height: int, width: int, **caps) -> RegionLayout:
    """A random layout of ``n`` objects, reorganized with the caps given."""
    return reorganize_regions(
        random_boxes(rng, n, height, width), random_texts(rng, n), height, width, rng=rng, **caps
    )


def random_objs(
    layouts: list[RegionLayout], *, max_slots: int, context_dim: int, seed: int = 0, dtype=torch.float32
) -> dict:
    """Fuser inputs for layouts: random position-net tokens, biases with live segments and dead tokens."""
    gen = torch.Generator().manual_seed(seed)
    n = len(layouts)
    feats = torch.randn(n, max_slots, 77, context_dim, generator=gen, dtype=dtype)
    bias = torch.zeros(n, max_slots, 77, dtype=dtype)
    object_masks = torch.zeros(n, max_slots, dtype=dtype)
    for b, layout in enumerate(layouts):
        object_masks[b, : layout.n_slots] = 1
        for s in range(layout.n_slots):
            if s == layout.background_slot:
                continue  # all 77 tokens live, bias 0
            n_live = int(torch.randint(1, 60, (1,), generator=gen))
            bias[b, s] = -1e3
            bias[b, s, 1 : 1 + n_live] = -torch.rand(n_live, generator=gen, dtype=dtype)
    region_map = torch.from_numpy(np.stack([layout.region_map for layout in layouts])).long()
    return {
        "text_feat": feats,
        "attention_bias": bias,
        "object_masks": object_masks,
        "region_map": region_map,
    }


def tiny_sdxl_unet_inputs(seed: int = 0, n_objects: int = 8, size: int = 64) -> dict:
    """Tiny-SDXL UNet inputs for a CFG-sized batch: the empty layout and a random layout of ``n_objects``
    (four slots kept, so some regions are dropped), at ``size`` pixels (an 8x8 latent at 64)."""
    from training.layout.regions import empty_layout
    from training.model.encoding import grounding_inputs

    gen = torch.Generator().manual_seed(seed)
    layout = random_layout(np.random.default_rng(seed), n_objects, size, size, max_slots=4)
    gligen = grounding_inputs([empty_layout(size, size), layout], region_encoder(), max_slots=5)
    return {
        "sample": torch.randn(2, 4, size // 8, size // 8, generator=gen),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 77, 64, generator=gen),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 32, generator=gen),
            "time_ids": torch.randn(2, 6, generator=gen),
        },
        "cross_attention_kwargs": {"gligen": gligen},
    }

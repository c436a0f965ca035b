"""Sequenced grounding encoding (docs/METHOD.md §3): region slots -> the UNet's ``gligen`` inputs.

Each region slot's text is tokenized by the base model's tokenizers (77 tokens) and encoded by its frozen
text encoders (last hidden states, concatenated: 768 + 1280 = 2048 per token in SDXL; SD1.5 has one,
CLIP-L's 768). The text splits into
one segment per object at the separator tokens; every token of segment ``k`` gets object ``k``'s box and
the attention bias ``(weight_k - 1) * attention_weight_scale``; the other tokens of a real slot get box
``[-1, -1, -1, -1]`` and bias ``NEG_BIAS``, whose softmax weight underflows to exactly 0.

A slot with no token in any segment (the background's empty text, or objects whose descriptions were
empty or truncated away) gets bias 0 on all 77 tokens: it attends normally over the position-net tokens
of its text. The public release puts -1e3 on all of the background's tokens; an additive constant does
not change a softmax, and 0 keeps bf16 / fp16 scores exact (their spacing near 1000 is 8 / 0.5).

Usage::

    encoder = RegionTextEncoder((tokenizer, tokenizer_2), (text_encoder, text_encoder_2), cache_size=4096)
    encoder = RegionTextEncoder((tokenizer,), (text_encoder,))                 # SD1.5
    encoder = RegionTextEncoder((t5_tokenizer,), (t5,), n_tokens=128)          # MM-DiT: the backbone's T5, no BOS
    gligen = grounding_inputs(layouts, encoder, max_slots=30, dtype=unet.dtype)
    unet(latents, t, prompt_embeds, added_cond_kwargs=..., cross_attention_kwargs={"gligen": gligen})

The empty layout (``training.layout.regions.empty_layout``) has no live slot and every cell ``-1``: every pixel's
fuser output is ``x + null_text_feat``, nothing attended (docs/METHOD.md §4). Layout dropout (classifier-free
guidance training) is per sample: ``drop_layout`` (one bool per sample) turns those samples into exactly
that, what inference feeds the negative branch, before anything is encoded.

Layouts are padded once, by ``training.layout.regions.pad_layouts`` (in the loader's workers during training);
``grounding_inputs_from_batch`` reads the padded arrays as they are.

The frozen encoders run once per distinct text: :class:`RegionTextEncoder` batches the texts it has not
seen and keeps a bounded LRU cache keyed by the text, with hit / miss counters (``encoder.stats``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from training.layout.regions import SEPARATOR, RegionLayout, pad_layouts

__all__ = [
    "NEG_BIAS",
    "CacheStats",
    "EncodedText",
    "RegionTextEncoder",
    "grounding_inputs",
    "grounding_inputs_from_batch",
    "separator_ids",
    "slot_token_targets",
    "token_spans",
]

log = logging.getLogger(__name__)

# Large enough that exp(score + NEG_BIAS) is exactly 0 in fp32 / bf16 / fp16 for any sane score, small
# enough not to overflow fp16 (-65504) when added to a score.
NEG_BIAS = -1e3
N_TOKENS = 77


@dataclass(frozen=True)
class EncodedText:
    """One region text, encoded: both encoders' last hidden states and the segment spans."""

    hidden: torch.Tensor  # (n_tokens, D): the encoders' last hidden states concatenated along features (one for SD1.5)
    spans: tuple[tuple[int, int], ...]  # [start, end) token range of each "; "-separated segment


@dataclass(frozen=True)
class CacheStats:
    """Counters of the region-text cache."""

    hits: int  # texts served from the cache (repeats within one call included)
    misses: int  # texts encoded
    size: int  # entries held now
    capacity: int  # maximum entries


def separator_ids(tokenizer: PreTrainedTokenizerBase, rule: str = "any") -> frozenset[int]:
    """Ids of every vocabulary token containing the separator character (``rule="release"``: the one id of
    ``";"`` alone, as the release splits)."""
    if rule == "release":
        # The release splits at tokenizer(";")'s first id only, so a merged ".;" token (a description
        # ending with a full stop) separates nothing there: the rest of the slot's text gets the first box.
        return frozenset(tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"][:1])
    # Not just the id of ";": byte-level BPE may merge it with punctuation ending the previous description
    # (e.g. ".;"). Descriptions have the separator removed, so any token holding one is a separator.
    return frozenset(i for tok, i in tokenizer.get_vocab().items() if SEPARATOR in tok)


def token_spans(
    input_ids: Sequence[int], bos_id: int | None, eos_id: int, sep_ids: frozenset[int]
) -> list[tuple[int, int]]:
    """[start, end) of each segment: from after BOS (T5 has none: from 0), split at separators, to EOS (or the end)."""
    ids = list(input_ids)
    start = ids.index(bos_id) + 1 if bos_id is not None else 0
    end = ids.index(eos_id, start) if eos_id in ids[start:] else len(ids)
    spans = []
    for pos in range(start, end):
        if ids[pos] in sep_ids:
            spans.append((start, pos))
            start = pos + 1
    spans.append((start, end))
    return spans


def slot_token_targets(
    spans: Sequence[tuple[int, int]],
    boxes: np.ndarray,
    weights: np.ndarray,
    attention_weight_scale: float = 1.0,
    n_tokens: int = N_TOKENS,
    renormalize: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token boxes ``(n_tokens, 4)`` and attention bias ``(n_tokens,)`` of one real slot.

    ``renormalize=False``: the weights as given, not rescaled to a max of 1 over the segments left (the
    release's rule, which zips boxes and weights with the segments it finds).
    """
    if len(spans) > len(boxes):
        raise ValueError(f"text has {len(spans)} segments but the slot has {len(boxes)} objects")
    token_boxes = np.full((n_tokens, 4), -1.0, dtype=np.float32)
    # Segments truncated away (or empty) drop their object: box, weight and bias alike.
    kept = [k for k, (s, e) in enumerate(spans) if e > s]
    if not kept:
        return token_boxes, np.zeros(n_tokens, dtype=np.float32)
    kept_weights = np.asarray(weights, dtype=np.float64)[kept]
    if renormalize:
        kept_weights = kept_weights / kept_weights.max()  # the max over the objects that remain is 1 again
    bias = np.full(n_tokens, NEG_BIAS, dtype=np.float32)
    for k, weight in zip(kept, kept_weights, strict=True):
        s, e = spans[k]
        token_boxes[s:e] = boxes[k]
        bias[s:e] = (weight - 1.0) * attention_weight_scale
    return token_boxes, bias


class RegionTextEncoder:
    """Encode region texts with the base's tokenizers and frozen text encoders (SDXL: two, SD1.5: one): batched, LRU-cached."""

    def __init__(
        self,
        tokenizers: Sequence[PreTrainedTokenizerBase],
        text_encoders: Sequence[nn.Module],
        *,
        cache_size: int = 1024,
        batch_size: int = 32,
        separator: str = "any",
        n_tokens: int = N_TOKENS,
    ) -> None:
        if len(tokenizers) != len(text_encoders) or not tokenizers:
            raise ValueError("pass one tokenizer per text encoder (SDXL: two of each, SD1.5: one)")
        for tok in tokenizers:
            # CLIP's 77 (SDXL's pipeline overflows on a huge default); a T5 holds n_tokens or more.
            if tok.model_max_length != N_TOKENS if n_tokens == N_TOKENS else tok.model_max_length < n_tokens:
                raise ValueError(f"tokenizer model_max_length is {tok.model_max_length}, expected {n_tokens}")
        self.tokenizers = list(tokenizers)
        self.n_tokens = n_tokens  # tokens per region text (CLIP: 77; the MM-DiT path's T5: more)
        self.text_encoders = list(text_encoders)
        self.cache_size = cache_size
        self.batch_size = batch_size
        # Spans come from the first tokenizer; SDXL's two share one BPE vocabulary and differ only in padding.
        # separator="release": the release's split and weights (separator_ids, slot_token_targets).
        if separator not in ("any", "release"):
            raise ValueError(f"separator must be 'any' or 'release', got {separator!r}")
        self.separator = separator
        self._sep_ids = separator_ids(tokenizers[0], separator)
        self._cache: OrderedDict[str, EncodedText] = OrderedDict()
        self._hits = 0
        self._misses = 0

    @property
    def hidden_size(self) -> int:
        """Feature size per token (sum of the encoders' hidden sizes; SDXL: 2048, SD1.5: 768)."""
        return sum(enc.config.hidden_size for enc in self.text_encoders)

    @property
    def stats(self) -> CacheStats:
        """Cache counters."""
        return CacheStats(self._hits, self._misses, len(self._cache), self.cache_size)

    def clear_cache(self) -> None:
        """Drop every cached text (counters are kept)."""
        self._cache.clear()

    def encode_texts(self, texts: Sequence[str]) -> list[EncodedText]:
        """Encode texts, each distinct uncached text once, in batches of ``batch_size``."""
        found: dict[str, EncodedText] = {}
        pending: dict[str, None] = {}  # insertion-ordered set of texts to encode
        for text in texts:
            if text in found or text in pending:
                self._hits += 1
            elif text in self._cache:
                self._hits += 1
                self._cache.move_to_end(text)
                found[text] = self._cache[text]
            else:
                self._misses += 1
                pending[text] = None
        todo = list(pending)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            found.update(zip(chunk, self._encode_batch(chunk), strict=True))
        for text in todo:
            self._remember(text, found[text])
        return [found[text] for text in texts]

    def _remember(self, text: str, encoded: EncodedText) -> None:
        """Insert into the LRU cache, evicting the least recently used entries beyond capacity."""
        if self.cache_size <= 0:
            return
        self._cache[text] = encoded
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    @torch.no_grad()
    def _encode_batch(self, texts: list[str]) -> list[EncodedText]:
        """Run every tokenizer and encoder on one batch of texts."""
        hidden, ids = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders, strict=True):
            inputs = tok(
                texts, padding="max_length", max_length=self.n_tokens, truncation=True, return_tensors="pt"
            )
            ids = inputs["input_ids"] if ids is None else ids
            device = next(enc.parameters()).device
            # With the padding mask, as the release encodes region texts.
            hidden.append(enc(**inputs.to(device)).last_hidden_state)
        feats = torch.cat(hidden, dim=-1)
        tok = self.tokenizers[0]
        return [
            EncodedText(
                feats[i].clone(),  # not a view: a cached row must not keep its whole batch alive
                tuple(token_spans(ids[i].tolist(), tok.bos_token_id, tok.eos_token_id, self._sep_ids)),
            )
            for i in range(len(texts))
        ]


def _numpy(value: object) -> np.ndarray:
    """A batch field as a numpy array (collate hands torch tensors, hand-built batches numpy)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _drop_mask(drop_layout: Sequence[bool] | np.ndarray | torch.Tensor | None, n: int) -> np.ndarray:
    """``drop_layout`` as ``n`` bools (all False when None)."""
    if drop_layout is None:
        return np.zeros(n, dtype=bool)
    mask = _numpy(drop_layout)
    if mask.shape != (n,) or (mask.dtype != bool and not np.isin(mask, (0, 1)).all()):
        raise ValueError(f"drop_layout must hold one bool per sample ({n}), got {mask.tolist()!r}")
    return mask.astype(bool)


def grounding_inputs(
    layouts: Sequence[RegionLayout],
    encoder: RegionTextEncoder,
    *,
    max_slots: int = 30,
    attention_weight_scale: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    drop_layout: Sequence[bool] | np.ndarray | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The ``cross_attention_kwargs["gligen"]`` dict for a batch of layouts (all on one latent grid).

    Keys: ``text_embeddings`` (B, S, 77, D), ``bbox_embeddings`` (B, S, 77, 4), ``object_masks`` (B, S)
    (1 for a live slot, 0 for padding), ``attention_bias`` (B, S, 77), ``region_map`` (B, h, w) int64
    (slot per latent cell, -1: no region, the pixel gets ``x + null``) and ``union_masks`` (B, S, h, w)
    bool, with ``S = max_slots``. Samples with ``drop_layout`` True get the empty layout: no live slot.
    """
    if not layouts:
        raise ValueError("grounding_inputs needs at least one layout")
    grids = {layout.grid_size for layout in layouts}
    if len(grids) != 1:
        raise ValueError(f"layouts of one batch must share a latent grid, got {sorted(grids)}")
    for b, layout in enumerate(layouts):
        if layout.n_slots > max_slots:
            raise ValueError(f"layout {b} has {layout.n_slots} slots > max_slots={max_slots}")
    max_objs = max([1] + [len(boxes) for layout in layouts for boxes in layout.boxes])
    batch = pad_layouts(list(layouts), max_slots, max_objs)
    return grounding_inputs_from_batch(
        batch,
        encoder,
        attention_weight_scale=attention_weight_scale,
        device=device,
        dtype=dtype,
        drop_layout=drop_layout,
    )


def grounding_inputs_from_batch(
    batch: Mapping[str, object],
    encoder: RegionTextEncoder,
    *,
    attention_weight_scale: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    drop_layout: Sequence[bool] | np.ndarray | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The ``gligen`` dict from the padded ``region_*`` fields of ``training.data.collate.collate``.

    The fields are used as padded (segments are a prefix of each slot's ``K`` entries). Samples with
    ``drop_layout`` True become the empty layout (layout dropout): no live slot, every cell -1, and
    their region texts are not encoded at all.
    """
    slot_mask = _numpy(batch["slot_mask"]).astype(bool)
    boxes, weights = _numpy(batch["region_boxes"]), _numpy(batch["region_weights"])
    n_segments = _numpy(batch["segment_mask"]).sum(axis=-1)
    region_map = _numpy(batch["region_map"]).astype(np.int64)
    union = _numpy(batch["region_union_masks"]).astype(bool)
    n, max_slots = slot_mask.shape
    drop = _drop_mask(drop_layout, n)
    if drop.any():  # never write into the caller's batch
        slot_mask = slot_mask & ~drop[:, None]
        region_map = np.where(drop[:, None, None], -1, region_map)
        union = union & ~drop[:, None, None, None]
    rows, cols = np.nonzero(slot_mask)
    encoded = encoder.encode_texts([batch["region_texts"][b][s] for b, s in zip(rows, cols, strict=True)])
    n_tokens = encoder.n_tokens
    token_boxes = np.full((n, max_slots, n_tokens, 4), -1.0, dtype=np.float32)
    bias = np.zeros((n, max_slots, n_tokens), dtype=np.float32)
    for b, s, enc in zip(rows, cols, encoded, strict=True):
        k = int(n_segments[b, s])
        token_boxes[b, s], bias[b, s] = slot_token_targets(
            enc.spans, boxes[b, s, :k], weights[b, s, :k], attention_weight_scale,
            renormalize=encoder.separator != "release", n_tokens=n_tokens,
        )
    text = torch.zeros(n, max_slots, n_tokens, encoder.hidden_size, device=device, dtype=dtype)
    if len(encoded):
        index = (torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device))
        text[index] = torch.stack([e.hidden for e in encoded]).to(device=device, dtype=dtype)
    return {
        "text_embeddings": text,
        "bbox_embeddings": torch.from_numpy(token_boxes).to(device=device, dtype=dtype),
        "object_masks": torch.from_numpy(slot_mask.astype(np.float32)).to(device=device, dtype=dtype),
        "attention_bias": torch.from_numpy(bias).to(device=device, dtype=dtype),
        "region_map": torch.from_numpy(region_map).to(device),
        "union_masks": torch.from_numpy(union).to(device),
    }

"""What every tiny build shares: the seed, the word list, a seeded build context, in-memory tokenizers.

Imports nothing of datagen, so ``tiny_models`` (the registry) and the modules whose builds it registers
(``tiny_detectors``, ``tiny_sam``, ``tiny_vlm3``) all stand on it without importing each other.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SEED = 0

# Words the tiny tokenizers know as whole tokens, so random generations decode to word-like text.
WORDS = (
    "a an the and of on in with at near next to behind front left right top bottom small large red blue "
    "green white black yellow wooden old young man woman person child dog cat car bus tree house road sky "
    "table chair cup bottle book phone window door grass water boat bird horse bicycle building sign "
    "shirt hat bag ball plate food flower lamp wall floor street light cloud mountain field"
).split()


@contextmanager
def _seeded(seed: int = SEED) -> Iterator[None]:
    """Seed torch for a build without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _byte_bpe(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocab (all 256 bytes) with left-to-right merges that spell ``words``."""
    from tokenizers import pre_tokenizers

    vocab: dict[str, int] = {}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        for spelled in (word, "\u0120" + word):  # "Ġ" is the byte-level space
            piece = spelled[0]
            for ch in spelled[1:]:
                if piece + ch not in vocab:
                    merges.append((piece, ch))
                    vocab[piece + ch] = len(vocab)
                piece += ch
    return vocab, merges


@functools.cache
def clip_bpe_vocab() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """CLIP's real 49408-token BPE (vocab items, merges by rank) from the file open_clip ships."""
    import open_clip

    bpe = open_clip.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # HF's spelling
    vocab = tuple((names.get(token, token), i) for token, i in bpe.encoder.items())
    return vocab, tuple(sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get))


def clip_bpe_tokenizer(**kwargs):
    """transformers' ``CLIPTokenizer`` on CLIP's real BPE (OWLv2's and SAM 3's tokenizer)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **kwargs)

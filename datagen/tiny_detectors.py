"""Tiny, randomly initialised builds of the ground stage's other phrase-grounding detectors, offline.

OWLv2 (``Owlv2ForObjectDetection``) and
Florence-2 (``Florence2ForConditionalGeneration``), each with the processor class its hub checkpoints
use, built from small configs with seeded weights like ``datagen.tiny_models`` (registered there in
``TINY_FACTORIES``). Tokenizers are built in memory: GroundingDINO's WordPiece vocabulary for MM
GroundingDINO, CLIP's real BPE (open_clip ships it) for OWLv2, a byte-level BPE over ``WORDS`` plus
Florence-2's 1000 location tokens for Florence-2. Their outputs are meaningless; a random Florence-2
rarely writes a well-formed box, so tests that need its boxes feed it answers.

MM GroundingDINO's tiny build is ``datagen.tiny_models.tiny_mm_grounding_dino`` (the tiny GroundingDINO's
config under the MM class); the real-size builds of all three are in ``datagen.real_detectors``.
"""

from __future__ import annotations

from collections.abc import Callable

from .tiny_base import WORDS, _byte_bpe, _seeded, clip_bpe_tokenizer

# Florence-2's task tokens besides the 1000 location bins (its tokenizer adds them after BART's vocabulary).
FLORENCE_TOKENS = ("<od>", "</od>", "<ocr>", "</ocr>", "<poly>", "</poly>", "<sep>", "<ground>", "<obj>")
FLORENCE_LOCATIONS = 1000  # the post-processor dequantises <loc_0>..<loc_999> over the image's width/height
# The post-processor's parse rules; the hub checkpoints ban pronouns and the like as grounded phrases.
FLORENCE_POST_PROCESSOR = {"phrase_grounding": {"banned_grounding_tokens": ["the image"]}, "pure_text": {}}


def tiny_owlv2():
    """OWLv2 (ViT 64 px, patch 16: 16 boxes per image; 2 layers, width 32) with ``Owlv2Processor``."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor


    # The real tokenizer's settings: 16 tokens a query, padded with "!" (id 0, which marks blank queries).
    tokenizer = clip_bpe_tokenizer(pad_token="!", model_max_length=16)
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer
    )
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=32,
    )  # fmt: skip
    with _seeded():
        model = Owlv2ForObjectDetection(config)
    return model.eval(), processor


def florence_tokenizer(regular_ids: int = 0):
    """A BART byte-level BPE over ``WORDS`` with Florence-2's tokens: ``<image>``, locations, task tokens.

    ``regular_ids``: fill BART's regular ids up to this many with filler words (50265 for the real
    vocabulary, so Florence-2's own tokens land where the real tokenizer has them: 50265 onwards)."""
    from transformers import BartTokenizer


    words, merges = _byte_bpe(WORDS)
    vocab = {t: i for i, t in enumerate(("<s>", "<pad>", "</s>", "<unk>"))}  # BART's ids 0-3
    for token in words:
        vocab.setdefault(token, len(vocab))
    vocab.update({f"\u0120w{i}": i for i in range(len(vocab), regular_ids)})
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_tokens([f"<loc_{i}>" for i in range(FLORENCE_LOCATIONS)] + list(FLORENCE_TOKENS))
    return tokenizer


def tiny_florence2():
    """Florence-2 (DaViT 4 stages at 64 px: 5 image tokens; BART 1+1 layers, width 32), ``Florence2Processor``."""
    from transformers import (
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )


    tokenizer = florence_tokenizer()
    # Florence-2's preprocessing: the whole image resized to a square (no crop), one token per 32 px
    # patch plus a pooled one.
    image_processor = CLIPImageProcessor(
        size={"height": 64, "width": 64}, do_center_crop=False, crop_size={"height": 64, "width": 64},
        image_seq_length=(64 // 32) ** 2 + 1,
    )  # fmt: skip
    processor = Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer, post_processor_config=FLORENCE_POST_PROCESSOR
    )
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=128, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                         decoder_start_token_id=2, forced_bos_token_id=0),
        vision_config=dict(depths=[1, 1, 1, 1], embed_dim=[16, 32, 32, 64], num_heads=[1, 2, 2, 4],
                           num_groups=[1, 2, 2, 4], window_size=2, projection_dim=32, drop_path_rate=0.0),
        image_token_id=tokenizer.image_token_id,
    )  # fmt: skip
    with _seeded():
        model = Florence2ForConditionalGeneration(config)
    return model.eval(), processor


# Registered in ``datagen.tiny_models.TINY_FACTORIES``: name -> (kind, factory).
DETECTOR_FACTORIES: dict[str, tuple[str, Callable]] = {
    "tiny-owlv2": ("detector", tiny_owlv2),
    "tiny-florence2": ("detector", tiny_florence2),
}

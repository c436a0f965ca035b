"""Tiny, randomly initialised builds of the real datagen architectures, offline.

Each factory returns ``(model, processor)`` of the same classes a real run uses (Qwen2.5-VL,
GroundingDINO, segment-anything SAM, open_clip CLIP), small enough to run on a CPU in milliseconds.
Their outputs are meaningless; they exercise every code path of the stages for tests and the demo.
Weights are seeded, so two builds in two processes are identical. Callers cache the builds
(``datagen.models.load_model``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch

from .tiny_base import SEED, WORDS, _byte_bpe, _seeded  # noqa: F401 - SEED and WORDS re-exported for callers
from .tiny_detectors import DETECTOR_FACTORIES  # OWLv2, Florence-2
from .tiny_sam import sam_factories  # SAM 3 and SAM 2.1

# Qwen2-style special tokens the VLM processor and chat template need.
VLM_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-VL's template shape: an image placeholder then the text, and an open assistant turn.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ClipProcessor(NamedTuple):
    """open_clip's image transform and tokenizer, the 'processor' half of a CLIP load."""

    preprocess: Callable  # PIL image -> (3, S, S) float tensor
    tokenizer: Callable  # list[str] -> (N, context_length) long tensor, truncating


# open_clip's model_cfg of the tiny CLIP (the form open_clip_config.json holds).
CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def qwen_tokenizer():
    """A byte-level BPE ``Qwen2Tokenizer`` over ``WORDS`` with Qwen's special tokens after them, left padding
    (decoder-only batched generation). Qwen2.5-VL and Qwen3-VL share the tokenizer class and special tokens."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_bpe(WORDS)
    for tok in VLM_SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(VLM_SPECIAL_TOKENS[1:]),
    )
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_vlm():
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) with its processor, 2 layers, width 32."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = qwen_tokenizer()
    image_processor = Qwen2VLImageProcessor(
        min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),  # required by the processor class; never used here
        chat_template=VLM_CHAT_TEMPLATE,
    )
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in VLM_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            # mRoPE sections sum to head_dim / 2 (head_dim = 32 / 2 = 16).
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with _seeded():
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model.eval(), processor


def _bert_vocab() -> dict[str, int]:
    """A WordPiece vocab: BERT's special tokens, punctuation, digits, letters, pieces and ``WORDS``."""
    import string

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
    tokens += ["##" + c for c in string.ascii_lowercase + string.digits]
    tokens += [w for w in WORDS if w not in tokens]
    return {t: i for i, t in enumerate(tokens)}


def tiny_grounding_dino():
    """transformers' GroundingDINO (Swin + BERT) with ``GroundingDinoProcessor``, images at 64-128 px."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    vocab = _bert_vocab()
    # transformers 5 ignores ``vocab_file=``; ``vocab=`` takes the mapping itself.
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        ),
        d_model=64,  # its GroupNorm has 32 groups: 2 channels each keep 1x1 feature maps (tiny images) valid
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,  # 1 fails transformers 5's weight tying
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_feature_levels=4,
        max_text_len=64,
        disable_custom_kernels=True,
    )
    with _seeded():
        model = GroundingDinoForObjectDetection(config)
    return model.eval(), processor


def tiny_sam():
    """segment-anything's ``Sam`` at 128 px (ViT depth 2, width 32) with its ResizeLongestSide transform."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    from segment_anything.utils.transforms import ResizeLongestSide

    img_size, patch, dim = 128, 16, 32
    with _seeded():
        encoder = ImageEncoderViT(
            img_size=img_size,
            patch_size=patch,
            embed_dim=dim,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=[1],
        )
        prompt_encoder = PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(img_size // patch, img_size // patch),
            input_image_size=(img_size, img_size),
            mask_in_chans=8,
        )
        decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        )
        sam = Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder)
    return sam.eval(), ResizeLongestSide(img_size)


def tiny_clip():
    """open_clip's ``CLIP`` (ViT 64 px, 2 layers, width 64) with its shipped 77-token BPE tokenizer."""
    import open_clip
    from open_clip.transform import image_transform

    with _seeded():
        model = open_clip.CLIP(**CLIP_CFG)
    preprocess = image_transform(64, is_train=False)
    return model.eval(), ClipProcessor(preprocess, open_clip.SimpleTokenizer(context_length=77))


def tiny_mm_grounding_dino():
    """MM GroundingDINO at the tiny GroundingDINO's sizes, with the same ``GroundingDinoProcessor``."""
    from transformers import MMGroundingDinoConfig, MMGroundingDinoForObjectDetection

    base, processor = tiny_grounding_dino()  # one source of the sizes: the GroundingDINO build's config
    fields = MMGroundingDinoConfig.__dataclass_fields__
    config = MMGroundingDinoConfig(
        **{k: v for k, v in base.config.to_dict().items() if k in fields and k != "model_type"}
    )
    with _seeded():
        model = MMGroundingDinoForObjectDetection(config)
    return model.eval(), processor


def tiny_qwen3_vl():
    """Qwen3-VL (``Qwen3VLForConditionalGeneration``) with its processor (``datagen.tiny_vlm3``)."""
    from .tiny_vlm3 import tiny_qwen3_vl as build

    tokenizer = qwen_tokenizer()
    return build(tokenizer, {t: tokenizer.convert_tokens_to_ids(t) for t in VLM_SPECIAL_TOKENS}, _seeded())


# The tiny backend's models by name (``ModelSpec(backend="tiny", name=...)``): (kind, factory).
TINY_FACTORIES: dict[str, tuple[str, Callable]] = {
    "tiny-qwen2.5-vl": ("vlm", tiny_vlm),
    "tiny-qwen3-vl": ("vlm", tiny_qwen3_vl),
    "tiny-grounding-dino": ("detector", tiny_grounding_dino),
    "tiny-mm-grounding-dino": ("detector", tiny_mm_grounding_dino),
    "tiny-sam": ("segmenter", tiny_sam),
    "tiny-clip": ("clip", tiny_clip),
    **sam_factories(_seeded),
    **DETECTOR_FACTORIES,
}

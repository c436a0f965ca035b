"""SAM 3 and SAM 2.1 (transformers' ``Sam3Model`` / ``Sam2Model``) built small and offline, and at real size.

``tiny_sam3`` and ``tiny_sam2`` are the tiny backend's builds (``datagen.tiny_models.TINY_FACTORIES``):
the real classes from small configs with seeded random weights and their real processors, constructed
here without a download. SAM 3's processor tokenizes with CLIP's real 49408-token BPE vocabulary, which
open_clip ships, so a phrase gets the ids it gets from ``facebook/sam3``'s tokenizer.

``real_sam3`` and ``real_sam2_large`` are the configurations of ``facebook/sam3`` (its ``Sam3Config``
defaults) and ``facebook/sam2.1-hiera-large`` with random weights, for ``datagen.real_size``.

Random weights score every SAM 3 query near sigmoid(0) * sigmoid(presence 0) = 0.25, right at a detector
threshold: the builds lift the presence head's bias (``PRESENCE_LOGIT``) so that queries come out and the
ground stage's whole path (thresholds, NMS, masks) runs. The outputs stay meaningless.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from .tiny_base import clip_bpe_tokenizer

PRESENCE_LOGIT = 3.0  # sigmoid(3) = 0.95: random queries score ~0.47, above the default box threshold
SAM3_TEXT_LENGTH = 32  # facebook/sam3's text context (its processor pads every phrase to 32 tokens)


def sam3_processor(image_size: int = 1008, mask_size: int = 288):
    """``Sam3Processor``: images resized to ``image_size`` square, CLIP's tokenizer (32 tokens, padded)."""
    from transformers import Sam3ImageProcessor, Sam3Processor

    tokenizer = clip_bpe_tokenizer(model_max_length=SAM3_TEXT_LENGTH, pad_token="<|endoftext|>")
    image_processor = Sam3ImageProcessor(
        size={"height": image_size, "width": image_size}, mask_size={"height": mask_size, "width": mask_size}
    )
    return Sam3Processor(image_processor=image_processor, tokenizer=tokenizer)


def sam2_processor(image_size: int = 1024, mask_size: int = 256):
    """``Sam2Processor``: images resized to ``image_size`` square, low-resolution masks at ``mask_size``."""
    from transformers import Sam2ImageProcessor, Sam2Processor

    image_processor = Sam2ImageProcessor(
        size={"height": image_size, "width": image_size}, mask_size={"height": mask_size, "width": mask_size}
    )
    return Sam2Processor(image_processor=image_processor)


def _lift_presence(model) -> None:
    with torch.no_grad():
        model.detr_decoder.presence_head.layer3.bias.fill_(PRESENCE_LOGIT)


def _build(cls, config, building):
    with building:
        model = cls(config)
    return model.eval()


def tiny_sam3(building: AbstractContextManager):
    """``Sam3Model`` at 112 px: ViT 2 layers width 32, CLIP text 1 layer, DETR 1+1 layers, 20 queries;
    parameters created under ``building`` (a seeded context: ``datagen.tiny_models``)."""
    from transformers import Sam3Config, Sam3Model

    size, patch = 112, 14
    grid = size // patch  # 8: the FPN's levels are 4x, 2x and 1x of it
    small = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    config = Sam3Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam3_vit_model",
                **small,
                "num_hidden_layers": 2,
                "image_size": size,
                "patch_size": patch,
                "window_size": 4,
                "global_attn_indexes": [1],
                "pretrain_image_size": 56,
            },
            "fpn_hidden_size": 32,
            "backbone_feature_sizes": [[4 * grid] * 2, [2 * grid] * 2, [grid] * 2],
        },
        text_config={
            **small,
            "vocab_size": 49408,
            "projection_dim": 32,
            "num_hidden_layers": 1,
            "max_position_embeddings": SAM3_TEXT_LENGTH,
        },
        geometry_encoder_config={**small, "num_layers": 1},
        detr_encoder_config={**small, "num_layers": 1},
        detr_decoder_config={**small, "num_layers": 1, "num_queries": 20},
        mask_decoder_config={"hidden_size": 32, "num_attention_heads": 2},
    )
    model = _build(Sam3Model, config, building)
    _lift_presence(model)
    return model, sam3_processor(size, 4 * grid)


def tiny_sam2(building: AbstractContextManager):
    """``Sam2Model`` at 128 px: a 4-stage Hiera of 1-2 blocks each (width 16..128), decoder width 32;
    parameters created under ``building``."""
    from transformers import Sam2Config, Sam2Model

    size = 128
    config = Sam2Config(
        vision_config={
            "model_type": "sam2_vision_model",
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": 16,
                "num_attention_heads": 1,
                "image_size": [size, size],
                "blocks_per_stage": [1, 1, 2, 1],
                "embed_dim_per_stage": [16, 32, 64, 128],
                "num_attention_heads_per_stage": [1, 1, 2, 2],
                "window_size_per_stage": [4, 2, 2, 2],
                "global_attention_blocks": [3],  # not a stage's first (pooling) block
                "window_positional_embedding_background_size": [4, 4],
            },
            "backbone_channel_list": [128, 64, 32, 16],
            "backbone_feature_sizes": [[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
            "fpn_hidden_size": 32,
        },
        prompt_encoder_config={"hidden_size": 32, "image_size": size, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
    )
    return _build(Sam2Model, config, building), sam2_processor(size, size // 4)


def real_sam3(building=None):
    """facebook/sam3 (``Sam3Config()``'s defaults: ViT 32 layers width 1024 at 1008 px, CLIP text 24 layers)."""
    from transformers import Sam3Config, Sam3Model

    model = _build(Sam3Model, Sam3Config(), building or nullcontext())
    _lift_presence(model)
    return model, sam3_processor()


def real_sam2_large(building=None):
    """facebook/sam2.1-hiera-large: Hiera-L (144 wide, stages 2-6-36-4) at 1024 px, SAM 2's mask decoder."""
    from transformers import Sam2Config, Sam2Model

    config = Sam2Config(
        vision_config={
            "model_type": "sam2_vision_model",
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": 144,
                "num_attention_heads": 2,
                "blocks_per_stage": [2, 6, 36, 4],
                "embed_dim_per_stage": [144, 288, 576, 1152],
                "num_attention_heads_per_stage": [2, 4, 8, 16],
                "window_size_per_stage": [8, 4, 16, 8],
                "global_attention_blocks": [23, 33, 43],
                "window_positional_embedding_background_size": [7, 7],
            },
            "backbone_channel_list": [1152, 576, 288, 144],
        },
    )
    return _build(Sam2Model, config, building or nullcontext()), sam2_processor()


def sam_factories(seeded: Callable[[], AbstractContextManager]) -> dict[str, tuple[str, Callable]]:
    """The tiny backend's SAM builds by name: (kind, factory), each built under ``seeded()`` (passed in by
    ``datagen.tiny_models``, so this module imports nothing of it). SAM 3 grounds: its masks come with its boxes."""
    return {"tiny-sam3": ("detector", lambda: tiny_sam3(seeded())),
            "tiny-sam2": ("segmenter", lambda: tiny_sam2(seeded()))}

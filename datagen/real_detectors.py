"""The ground stage's other detectors at their real sizes with random weights, for ``datagen.real_size``.

MM GroundingDINO-T, OWLv2 B/16 at 960 px and Florence-2-large, with their real processors' settings (the
tiny builds and the tokenizers they share are in ``datagen.tiny_detectors``).
"""

from __future__ import annotations

import torch

from .real_size import _bert_tokenizer, _building
from .tiny_base import clip_bpe_tokenizer
from .tiny_detectors import FLORENCE_POST_PROCESSOR, florence_tokenizer


def real_mm_grounding_dino(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """mm_grounding_dino_tiny_o365v1_goldg_v3det: ``MMGroundingDinoConfig``'s defaults (Swin-T, BERT-base)."""
    from transformers import (
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        MMGroundingDinoConfig,
        MMGroundingDinoForObjectDetection,
    )


    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(), tokenizer=_bert_tokenizer()
    )
    with _building(device, dtype):
        model = MMGroundingDinoForObjectDetection(MMGroundingDinoConfig(disable_custom_kernels=True))
    return model.eval(), processor


def real_owlv2(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """owlv2-base-patch16-ensemble: ViT-B/16 at 960 px (3600 boxes an image), CLIP's text tower and BPE."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor


    tokenizer = clip_bpe_tokenizer(pad_token="!", model_max_length=16)
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(), tokenizer=tokenizer)  # 960 x 960
    with _building(device, dtype):
        model = Owlv2ForObjectDetection(Owlv2Config(vision_config={"image_size": 960, "patch_size": 16}))
    return model.eval(), processor


def real_florence2_large(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Florence-2-large (florence-community): DaViT-L at 768 px (577 image tokens), BART-large 12 + 12 layers."""
    from transformers import (
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )


    tokenizer = florence_tokenizer(regular_ids=50265)
    image_processor = CLIPImageProcessor(
        size={"height": 768, "width": 768}, do_center_crop=False, crop_size={"height": 768, "width": 768},
        resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], image_seq_length=577,
    )  # fmt: skip
    processor = Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer, post_processor_config=FLORENCE_POST_PROCESSOR
    )
    config = Florence2Config(
        # the converted checkpoints' vocabulary: len(tokenizer) padded to a multiple of 64
        text_config=dict(model_type="bart", vocab_size=-(-len(tokenizer) // 64) * 64, d_model=1024,
                         encoder_layers=12, decoder_layers=12, encoder_attention_heads=16, decoder_attention_heads=16,
                         encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024, bos_token_id=0,
                         pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0),
        vision_config=dict(depths=[1, 1, 9, 1], embed_dim=[256, 512, 1024, 2048], num_heads=[8, 16, 32, 64],
                           num_groups=[8, 16, 32, 64], window_size=12, projection_dim=1024),
        image_token_id=tokenizer.image_token_id,
    )  # fmt: skip
    with _building(device, dtype):
        model = Florence2ForConditionalGeneration(config)
    return model.eval(), processor


def real_detectors():
    """``datagen.real_size`` builds of these detectors: name -> (kind, factory(device, dtype), dtype on a GPU)."""
    return {
        "real-size-mm-grounding-dino-tiny": ("detector", real_mm_grounding_dino, torch.float32),
        "real-size-owlv2-base-patch16": ("detector", real_owlv2, torch.float32),
        "real-size-florence2-large": ("detector", real_florence2_large, torch.float32),
    }

"""Qwen3-VL (``Qwen3VLForConditionalGeneration``) built offline: tiny for tests, and at real size.

Qwen3-VL differs from Qwen2.5-VL where a tiny build must follow it: 16 px patches (not 14), a learned
position grid resampled per image (``num_position_embeddings``, a square), DeepStack (features of some
vision layers added to the first text layers: ``deepstack_visual_indexes``), interleaved mRoPE and an
explicit ``head_dim``, image mean/std 0.5, no default system turn in its chat template, and a processor
that also returns ``mm_token_type_ids``. The tokenizer class and the special tokens are Qwen2.5-VL's.
``tiny_qwen3_vl`` builds the tiny one (registered as ``tiny-qwen3-vl`` by ``datagen.tiny_models``),
``qwen3_vl_8b`` Qwen3-VL-8B-Instruct's configuration with its language model cut to a few layers
(``datagen.real_size.real_qwen3_vl``). The callers pass the tokenizer, its special-token ids and the
seeded build context, so this module imports nothing of datagen (no import cycle with its callers).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager

# The shape of Qwen3-VL-Instruct's template (its tool-call and video branches left out): no default
# system turn; a content part is an image when its type says so or it carries an image / image_url
# field (the OpenAI form vLLM's chat preprocessing passes), then the text parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PATCH = 16  # Qwen3-VL's vision patch side (Qwen2.5-VL: 14)


def _processor(tokenizer, min_pixels: int, max_pixels: int):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    # preprocessor_config.json of the hub models: Qwen2-VL's image processor with Qwen3-VL's patch and norm.
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=PATCH,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(),  # required by the processor class; never used here
        chat_template=CHAT_TEMPLATE,
    )


def _config(ids: Mapping[str, int], text: dict, vision: dict):
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            **text,
        ),
        vision_config=dict(patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, **vision),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def _finish(model, ids: Mapping[str, int]):
    # Qwen3-VL's generation_config.json: stop at <|im_end|> or <|endoftext|>, pad with <|endoftext|>.
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model.eval()


def tiny_qwen3_vl(tokenizer, ids: Mapping[str, int], building: AbstractContextManager):
    """Qwen3-VL with its processor: 2 text layers of width 32, a 2-block vision tower, 64x64 px images.
    ``ids``: the Qwen special tokens' ids in ``tokenizer``; the weights are made inside ``building``."""
    from transformers import Qwen3VLForConditionalGeneration

    # Every image resized to 4x4 patches (2x2 tokens after the merge): milliseconds per image on a CPU.
    processor = _processor(tokenizer, min_pixels=64 * 64, max_pixels=64 * 64)
    config = _config(
        ids,
        text=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=2048,
            # Interleaved mRoPE: the sections (t, h, w) sum to head_dim / 2.
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2],
                             "mrope_interleaved": True},
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            num_position_embeddings=16,  # a 4x4 learned grid, resampled to each image's patches
            deepstack_visual_indexes=[0],  # block 0's features join text layer 0
        ),
    )
    with building:
        model = Qwen3VLForConditionalGeneration(config)
    return _finish(model, ids), processor


def qwen3_vl_8b(tokenizer, ids: Mapping[str, int], text_layers: int, building: AbstractContextManager):
    """Qwen3-VL-8B-Instruct's configuration (vision tower whole, ``text_layers`` of its 36 text layers)
    with the hub processor's settings; ``ids``: the real tokenizer's special-token ids."""
    from transformers import Qwen3VLForConditionalGeneration

    # preprocessor_config.json: size {shortest_edge: 65536, longest_edge: 16777216} pixels
    processor = _processor(tokenizer, min_pixels=65536, max_pixels=16777216)
    config = _config(
        ids,
        text=dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=text_layers,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True},
        ),
        vision=dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            out_hidden_size=4096,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        ),
    )
    with building:
        model = Qwen3VLForConditionalGeneration(config)
    return _finish(model, ids), processor

"""The real MM-DiT transformers' configurations (SD3.5 medium, FLUX.1-dev) and their schedulers, for real-size
checks with random weights: nothing is downloaded, parameters are created directly on the device in the
compute dtype.

Values are the hub repositories' ``transformer/config.json`` and ``scheduler/scheduler_config.json``
(``stabilityai/stable-diffusion-3.5-medium``, ``black-forest-labs/FLUX.1-dev``), as diffusers reads them.
Used by ``training.trainer.real_size`` (``make test-real-size``) and ``benchmarks/real_size.py``
(``benchmarks/gpu_suite.sh``); the tiny builds (``training.model.mmdit.tiny``) share the schedulers.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

__all__ = [
    "CAPTION_TOKENS",
    "FLUX1_DEV_TRANSFORMER",
    "FLUX_SCHEDULER",
        "SD35_MEDIUM_TRANSFORMER",
    "SD3_SCHEDULER",
    "real_mmdit_transformer",
    "real_scheduler",
]

# stabilityai/stable-diffusion-3.5-medium transformer/config.json: 2.24 B parameters and a 384 x 384 positional
# table (0.23 B, a buffer): the 2.47 B tensors (4.9 GB in bf16) of its file, "2.5 B" in its model card. 24
# joint blocks of width 1536 (24 heads x 64); MMDiT-X's extra image-only attention (attn2) in blocks 0-12.
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,  # T5-XXL's width (CLIP-L 768 + CLIP-G 1280 are zero-padded to it)
    caption_projection_dim=1536,
    pooled_projection_dim=2048,  # CLIP-L's 768 + CLIP-G's 1280 pooled projections
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
# black-forest-labs/FLUX.1-dev transformer/config.json: 11.9 B parameters, 19 double-stream and 38 single-stream
# blocks of width 3072 (24 heads x 128), the distilled guidance embedding.
FLUX1_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels packed 2 x 2
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,  # CLIP-L's pooled output
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# scheduler/scheduler_config.json: SD3's static shift 3; FLUX's resolution-dependent shift (0.5 at 256 tokens,
# 1.15 at 4096).
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
# Caption tokens the stock pipelines feed each transformer. SD3: CLIP's 77 + T5's 256
# (StableDiffusion3Pipeline's default max_sequence_length); FLUX-dev: T5's 512 (FluxPipeline's).
CAPTION_TOKENS = {"sd3": 77 + 256, "flux": 512}


def real_mmdit_transformer(
    backbone: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> SD3Transformer2DModel | FluxTransformer2DModel:
    """SD3.5 medium's (``"sd3"``) or FLUX.1-dev's (``"flux"``) transformer, random weights built on ``device``."""
    model_class, config = {
        "sd3": (SD3Transformer2DModel, SD35_MEDIUM_TRANSFORMER),
        "flux": (FluxTransformer2DModel, FLUX1_DEV_TRANSFORMER),
    }[backbone]
    from datagen.real_size import _building  # lazily: datagen's real-size module imports every stage's models

    with _building(str(device), dtype, seed):  # created in the compute dtype: no fp32 copy (FLUX.1: 48 GB)
        return model_class(**config).eval()

def real_scheduler(backbone: str) -> FlowMatchEulerDiscreteScheduler:
    """The backbone's flow-matching scheduler, as its pipeline ships it."""
    return FlowMatchEulerDiscreteScheduler(**(SD3_SCHEDULER if backbone == "sd3" else FLUX_SCHEDULER))

"""The model registry: which model each datagen stage runs, and how it is loaded.

A ``ModelSpec`` names a model (hub id, local folder, SAM registry key or open_clip architecture) with
its revision, dtype and device. Two backends load it:

- ``hf``: real weights. Hub models go through ``from_pretrained`` and the Hugging Face cache, so a node
  downloads each file once and every actor on it reads the cache (``prefetch`` warms it up front).
- ``tiny``: the same architectures from small configs with random weights (``datagen.tiny_models``),
  built offline, for tests and the demo.

``load_model`` returns ``(model, processor)`` and caches it per process: stages sharing a spec in one
process (tag, caption and describe use the same VLM) share one copy.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .tiny_models import TINY_FACTORIES, ClipProcessor

log = logging.getLogger(__name__)

KINDS = ("vlm", "detector", "segmenter", "clip")
BACKENDS = ("hf", "tiny")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_HUB_PREFIX = "hf-hub:"  # SAM weights given as hf-hub:<org>/<repo>/<path in repo>
SAM_REGISTRY = ("default", "vit_h", "vit_l", "vit_b")  # segment-anything's model keys (they need weights)


@dataclass(frozen=True)
class ModelSpec:
    """One model of the pipeline: what to load and where to run it."""

    kind: str  # one of KINDS: "vlm" | "detector" | "segmenter" | "clip"
    name: str  # hub id or local folder (vlm, detector, SAM 2.1 segmenter); SAM registry key (vit_h/vit_l/vit_b);
    #            open_clip architecture or "local-dir:<folder>" (clip); a TINY_FACTORIES key (tiny)
    revision: str | None = None  # hub revision (branch, tag or commit) for hub downloads; None: main
    weights: str | None = None  # SAM checkpoint (local path or hf-hub:<org>/<repo>/<file>);
    #                             open_clip pretrained tag ("openai") or checkpoint file
    dtype: str = "auto"  # "auto" (bfloat16 on CUDA, float32 on CPU) or a DTYPES key
    device: str = "auto"  # "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ...
    backend: str = "hf"  # "hf" (real weights) or "tiny" (random weights, offline)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ModelSpec.kind {self.kind!r} is not one of {KINDS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"ModelSpec.backend {self.backend!r} is not one of {BACKENDS}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"ModelSpec.dtype {self.dtype!r} is not 'auto' or one of {sorted(DTYPES)}")
        if self.backend == "tiny" and TINY_KINDS.get(self.name) != self.kind:
            known = sorted(n for n, k in TINY_KINDS.items() if k == self.kind)
            raise ValueError(f"no tiny {self.kind} named {self.name!r}; tiny {self.kind} models: {known}")
        if self.backend == "hf" and self.kind == "segmenter" and self.name in SAM_REGISTRY and not self.weights:
            raise ValueError(f"ModelSpec {self.name!r}: a segment-anything model needs weights (a SAM checkpoint)")

    def resolved_device(self) -> torch.device:
        """The device this spec runs on, with "auto" resolved on this machine."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        """The parameter dtype, with "auto" resolved for the device (bfloat16 on CUDA, else float32)."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]


TINY_KINDS = {name: kind for name, (kind, _) in TINY_FACTORIES.items()}

# The real defaults: the paper's detector and segmenter, Qwen2.5-VL (the native successor of the
# paper's Qwen-VL-Chat) and CLIP ViT-L/14 (OpenAI weights) for crop scores.
PRESETS: dict[str, dict[str, ModelSpec]] = {
    "real": {
        "vlm": ModelSpec("vlm", "Qwen/Qwen2.5-VL-7B-Instruct"),
        # float32: boxes come out normalised to [0, 1], where bfloat16 steps are ~4 px of a 1024 px image.
        "detector": ModelSpec("detector", "IDEA-Research/grounding-dino-tiny", dtype="float32"),
        # segment-anything's ViT-H checkpoint. Official file:
        #   https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth
        # The hub mirror below is that file (same name, 2.56 GB), fetched once per node into the HF
        # cache. A local copy of either works too: weights="/path/to/sam_vit_h_4b8939.pth".
        "segmenter": ModelSpec(
            "segmenter", "vit_h", weights="hf-hub:ybelkada/segment-anything/checkpoints/sam_vit_h_4b8939.pth"
        ),
        "clip": ModelSpec("clip", "ViT-L-14", weights="openai"),
    },
    # Named, not derived from TINY_FACTORIES: that registry holds other tiny models of the same kinds.
    "tiny": {
        kind: ModelSpec(kind, name, backend="tiny")
        for kind, name in (("vlm", "tiny-qwen2.5-vl"), ("detector", "tiny-grounding-dino"),
                           ("segmenter", "tiny-sam"), ("clip", "tiny-clip"))
    },
    # The 2026 labelling models (configs/datagen/sam3.yaml): Qwen3-VL for tag, caption and describe; SAM 3
    # grounds and segments (the ground stage's detector: its objects come masked); SAM 2.1 is the box-prompted
    # segmenter for configs that pair it with a detector; CLIP ViT-L/14 as in "real".
    "sam3": {
        "vlm": ModelSpec("vlm", "Qwen/Qwen3-VL-8B-Instruct"),
        "detector": ModelSpec("detector", "facebook/sam3"),
        "segmenter": ModelSpec("segmenter", "facebook/sam2.1-hiera-large"),
        "clip": ModelSpec("clip", "ViT-L-14", weights="openai"),
    },
    "tiny_sam3": {
        kind: ModelSpec(kind, name, backend="tiny")
        for kind, name in (("vlm", "tiny-qwen3-vl"), ("detector", "tiny-sam3"), ("segmenter", "tiny-sam2"),
                           ("clip", "tiny-clip"))
    },
}


def preset(name: str) -> dict[str, ModelSpec]:
    """The model specs of a named preset ("real" or "tiny"), by kind."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    return dict(PRESETS[name])


def default_spec(kind: str, preset_name: str = "real") -> ModelSpec:
    """The spec of one kind in a preset, e.g. ``default_spec("vlm", "tiny")``."""
    specs = preset(preset_name)
    if kind not in specs:
        raise ValueError(f"unknown model kind {kind!r}; kinds: {KINDS}")
    return specs[kind]


def load_model(spec: ModelSpec) -> tuple[Any, Any]:
    """``(model, processor)`` for a spec, in eval mode on its device; cached per process.

    processor: a transformers processor (vlm, detector), segment-anything's ResizeLongestSide
    (segmenter) or a ``ClipProcessor`` (clip).
    """
    # Cache on the resolved placement so "auto" and its resolution share one copy.
    key = replace(spec, device=str(spec.resolved_device()), dtype=_dtype_name(spec.resolved_dtype()))
    return _load_cached(key)


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


@functools.cache
def _load_cached(spec: ModelSpec) -> tuple[Any, Any]:
    loader = _load_tiny if spec.backend == "tiny" else _HF_LOADERS[spec.kind]
    log.info(
        "loading %s model %s (%s) on %s as %s", spec.kind, spec.name, spec.backend, spec.device, spec.dtype
    )
    model, processor = loader(spec)
    # SAM's prompt encoder takes pixel coordinates, which bfloat16 rounds to 8 px near 1024: its weights
    # stay float32 and the segment stage runs the image encoder under autocast to the spec's dtype.
    # SAM 3 alike: its boxes come out normalised (bfloat16 steps are ~4 px of 1024); its vision encoder
    # runs under autocast (stages/ground_sam3.py).
    sam = spec.kind == "segmenter" or getattr(getattr(model, "config", None), "model_type", None) == "sam3"
    dtype = torch.float32 if sam else spec.resolved_dtype()
    model = model.to(device=spec.resolved_device(), dtype=dtype).eval()
    model.requires_grad_(False)
    return model, processor


def _load_tiny(spec: ModelSpec) -> tuple[Any, Any]:
    _, factory = TINY_FACTORIES[spec.name]
    return factory()


def _load_hf_vlm(spec: ModelSpec) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        spec.name, revision=spec.revision, dtype=spec.resolved_dtype(), device_map=str(spec.resolved_device())
    )
    processor = AutoProcessor.from_pretrained(spec.name, revision=spec.revision)
    processor.tokenizer.padding_side = "left"  # decoder-only batched generation
    return model, processor


def _load_hf_detector(spec: ModelSpec) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoModelForZeroShotObjectDetection, AutoProcessor

    model_type = _model_type(spec)  # one config read decides the class
    if model_type == "sam3":  # not a zero-shot detector class: it masks as it grounds
        return _load_hf_sam3(spec)
    # GroundingDINO, MM GroundingDINO and OWLv2 are zero-shot detector classes; Florence-2 grounds phrases
    # by generating text (ground_florence), an image-text-to-text class.
    auto = AutoModelForImageTextToText if model_type == "florence2" else AutoModelForZeroShotObjectDetection
    model = auto.from_pretrained(
        spec.name, revision=spec.revision, dtype=spec.resolved_dtype(), device_map=str(spec.resolved_device())
    )
    return model, AutoProcessor.from_pretrained(spec.name, revision=spec.revision)


def _model_type(spec: ModelSpec) -> str | None:
    """The ``model_type`` of a hub id's or folder's config.json (read from the HF cache once fetched)."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(spec.name, revision=spec.revision), "model_type", None)


def _load_hf_sam3(spec: ModelSpec) -> tuple[Any, Any]:
    """SAM 3 (``Sam3Model``, e.g. facebook/sam3): the ground stage's ground-and-segment engine."""
    from transformers import Sam3Model, Sam3Processor

    model = Sam3Model.from_pretrained(spec.name, revision=spec.revision, device_map=str(spec.resolved_device()))
    return model, Sam3Processor.from_pretrained(spec.name, revision=spec.revision)


def _load_hf_sam2(spec: ModelSpec) -> tuple[Any, Any]:
    """SAM 2.1 (``Sam2Model``, e.g. facebook/sam2.1-hiera-large): a box-prompted segmenter."""
    from transformers import Sam2Model, Sam2Processor

    if _model_type(spec) != "sam2":
        raise ValueError(f"segmenter {spec.name!r} is not a SAM 2 model (config model_type 'sam2'); a segment-"
                         f"anything checkpoint is named by its registry key {SAM_REGISTRY} with weights=<file>")
    model = Sam2Model.from_pretrained(spec.name, revision=spec.revision, device_map=str(spec.resolved_device()))
    return model, Sam2Processor.from_pretrained(spec.name, revision=spec.revision)


def _load_hf_segmenter(spec: ModelSpec) -> tuple[Any, Any]:
    if not spec.weights:  # a hub id or folder: transformers' SAM 2.1
        return _load_hf_sam2(spec)
    from segment_anything import sam_model_registry
    from segment_anything.utils.transforms import ResizeLongestSide

    if spec.name not in sam_model_registry:
        raise ValueError(f"unknown SAM model {spec.name!r}; known: {sorted(sam_model_registry)}")
    path = _resolve_file(spec.weights, spec.revision)
    sam = sam_model_registry[spec.name](checkpoint=None)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    sam.load_state_dict(state)
    return sam, ResizeLongestSide(sam.image_encoder.img_size)


def _load_hf_clip(spec: ModelSpec) -> tuple[Any, Any]:
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    # OpenAI's weights were trained with QuickGELU; the plain architecture names default to GELU.
    tag_cfg = get_pretrained_cfg(spec.name, spec.weights) if spec.weights else {}
    precision = {torch.float32: "fp32", torch.bfloat16: "pure_bf16", torch.float16: "pure_fp16"}
    model, _, preprocess = open_clip.create_model_and_transforms(
        spec.name,
        pretrained=spec.weights,
        precision=precision[spec.resolved_dtype()],
        force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
    )
    return model, ClipProcessor(preprocess, open_clip.get_tokenizer(spec.name))


_HF_LOADERS = {
    "vlm": _load_hf_vlm,
    "detector": _load_hf_detector,
    "segmenter": _load_hf_segmenter,
    "clip": _load_hf_clip,
}


def _resolve_file(weights: str | None, revision: str | None) -> Path:
    """A local checkpoint path; ``hf-hub:<org>/<repo>/<file>`` is fetched once into the HF cache."""
    if weights is None:
        raise ValueError("no weights file given")
    if weights.startswith(HF_HUB_PREFIX):
        from huggingface_hub import hf_hub_download

        parts = weights[len(HF_HUB_PREFIX) :].split("/", 2)
        if len(parts) != 3:
            raise ValueError(f"weights {weights!r}: expected hf-hub:<org>/<repo>/<file>")
        return Path(hf_hub_download(f"{parts[0]}/{parts[1]}", parts[2], revision=revision))
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    return path


def prefetch(specs: list[ModelSpec]) -> None:
    """Download the weights of ``specs`` into this node's Hugging Face cache without loading them."""
    for spec in specs:
        if spec.backend == "tiny":
            continue
        if spec.kind in ("vlm", "detector") and not Path(spec.name).is_dir():
            from huggingface_hub import snapshot_download

            snapshot_download(spec.name, revision=spec.revision)
        elif spec.kind == "segmenter" and spec.weights:
            _resolve_file(spec.weights, spec.revision)
        elif spec.kind == "segmenter" and not Path(spec.name).is_dir():
            from huggingface_hub import snapshot_download

            snapshot_download(spec.name, revision=spec.revision)
        elif spec.kind == "clip" and spec.weights:
            import open_clip
            from open_clip.pretrained import get_pretrained_cfg

            tag_cfg = get_pretrained_cfg(spec.name, spec.weights)
            if tag_cfg:
                open_clip.download_pretrained(tag_cfg)

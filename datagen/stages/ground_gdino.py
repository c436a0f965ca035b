"""The ground stage's ``groundingdino-py`` engine: IDEA's original GroundingDINO code.

Selected with ``GroundConfig.engine: groundingdino-py``; ``ground.py`` imports this module only then.
groundingdino-py calls ``BertModel.get_extended_attention_mask``, which transformers 5 removed, so it
runs in its own environment with transformers 4.57.6 (``make test-gdino`` builds one, ``.venv-gdino``).
Only the model differs from the transformers engine: this module loads it and runs it on (images,
prompts); the prompt format, tag decoding, thresholds, NMS, size filters and dedupe are ground.py's.

The model spec (``GroundConfig.model``), e.g. in YAML::

    ground: {engine: groundingdino-py, model: {kind: detector, name: GroundingDINO_SwinT_OGC.py,
             weights: "hf-hub:ShilongLiu/GroundingDINO/groundingdino_swint_ogc.pth", dtype: float32}}

- ``name``: one of groundingdino-py's packaged configs (``PACKAGED_CONFIGS``), or a .json/.yaml file
  holding the same keys (config files are parsed, never executed). Its ``text_encoder_type`` (a hub id
  such as ``bert-base-uncased``) is resolved to a local folder through the Hugging Face cache, once per
  node; a local folder is used as is.
- ``weights``: the checkpoint (local path or ``hf-hub:<org>/<repo>/<file>``), a ``.pth`` read with
  ``torch.load(weights_only=True)`` (its ``model`` entry, as groundingdino-py saves it) or ``.safetensors``.
- ``backend: tiny`` with the tiny detector's name builds groundingdino-py's own classes small, with
  random weights and a tiny BERT written to a temporary folder, offline (``tiny_gdino``).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image

from ..models import ModelSpec, _resolve_file

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the groundingdino-py engine needs groundingdino-py with transformers<5 (it calls BERT APIs removed "
    "in transformers 5): install it in its own environment, `pip install richlayout[groundingdino]` "
    "with transformers==4.57.6 (the Makefile's .venv-gdino recipe does this), or use engine: transformers"
)


def require_groundingdino(transformers_version: str = transformers.__version__) -> None:
    """Fail with an install hint unless groundingdino-py can run here."""
    if int(transformers_version.split(".")[0]) >= 5:
        raise ImportError(f"found transformers {transformers_version}; {INSTALL_HINT}")
    try:
        import groundingdino  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"groundingdino-py is not installed; {INSTALL_HINT}") from exc


require_groundingdino()

import groundingdino.config  # noqa: E402
import groundingdino.datasets.transforms as T  # noqa: E402
from groundingdino.models import build_model  # noqa: E402
from groundingdino.models.GroundingDINO.backbone.backbone import Joiner  # noqa: E402
from groundingdino.models.GroundingDINO.backbone.position_encoding import build_position_encoding  # noqa: E402
from groundingdino.models.GroundingDINO.backbone.swin_transformer import SwinTransformer  # noqa: E402
from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO  # noqa: E402
from groundingdino.models.GroundingDINO.transformer import build_transformer  # noqa: E402
from groundingdino.util.misc import clean_state_dict, nested_tensor_from_tensor_list  # noqa: E402
from groundingdino.util.slconfig import SLConfig  # noqa: E402

PACKAGED_CONFIGS = ("GroundingDINO_SwinT_OGC.py", "GroundingDINO_SwinB_cfg.py")
SWINT_OGC = ModelSpec(
    "detector",
    "GroundingDINO_SwinT_OGC.py",
    weights="hf-hub:ShilongLiu/GroundingDINO/groundingdino_swint_ogc.pth",
    dtype="float32",
)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# The text encoder's files: configs, vocab and safetensors weights (not the TF/Flax/ONNX copies).
TEXT_ENCODER_FILES = ["*.json", "*.txt", "*.safetensors"]


class GdinoDetector:
    """A groundingdino-py model with the input pipeline of its ``util.inference``: resize (shortest edge,
    longest edge capped), ImageNet normalisation, images of a batch padded together with a mask."""

    def __init__(self, model: GroundingDINO, size: tuple[int, int], spec: ModelSpec) -> None:
        self.device, self.dtype = spec.resolved_device(), spec.resolved_dtype()
        # float32 weights; a lower spec dtype runs the forward under autocast (the reference code is float32).
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = model.tokenizer  # its forward tokenizes the captions with this very tokenizer
        self.max_text_len = int(model.max_text_len)
        self.size = size  # default (shortest edge, longest edge) of the detector input in px

    @torch.inference_mode()
    def __call__(
        self, images: Sequence[np.ndarray], captions: Sequence[str], size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (n, queries, max_text_len), boxes (n, queries, 4) cxcywh relative to each image)``."""
        shortest, longest = size or self.size
        tensors = []
        for image in images:
            resized, _ = T.resize(Image.fromarray(image), None, shortest, longest)
            tensors.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.F.to_tensor(resized))[0])
        samples = nested_tensor_from_tensor_list(tensors).to(self.device)
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(samples, captions=list(captions))
        return out["pred_logits"], out["pred_boxes"]


def load_gdino(spec: ModelSpec) -> GdinoDetector:
    """The detector of a spec (real checkpoint or tiny build), cached per process."""
    return _load_cached(spec)


@functools.cache
def _load_cached(spec: ModelSpec) -> GdinoDetector:
    if spec.kind != "detector":
        raise ValueError(f"the groundingdino-py engine needs a detector spec, got kind {spec.kind!r}")
    log.info("loading groundingdino-py %s (%s) on %s", spec.name, spec.backend, spec.resolved_device())
    if spec.backend == "tiny":
        return GdinoDetector(tiny_gdino(), (64, 128), spec)
    return GdinoDetector(_load_real(spec), (800, 1333), spec)


def _load_real(spec: ModelSpec) -> GroundingDINO:
    args = _read_config(spec.name)
    args.text_encoder_type = _text_encoder_folder(args.text_encoder_type)
    model = build_model(args)
    path = _resolve_file(spec.weights, spec.revision)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("model", checkpoint)
    missing, unexpected = model.load_state_dict(clean_state_dict(state), strict=False)
    if missing:
        raise ValueError(
            f"checkpoint {path} does not fit config {spec.name!r}: {len(missing)} weights missing, "
            f"e.g. {missing[:5]}"
        )
    if unexpected:
        log.warning("checkpoint %s: %d weights unused, e.g. %s", path, len(unexpected), unexpected[:5])
    return model


def _read_config(name: str) -> SLConfig:
    """A packaged config by file name, or a .json/.yaml config file (parsed, not executed)."""
    if name in PACKAGED_CONFIGS:
        return SLConfig.fromfile(str(Path(groundingdino.config.__file__).parent / name))
    path = Path(name).expanduser()
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(
            f"groundingdino-py config {name!r}: give one of {PACKAGED_CONFIGS} or a .json/.yaml file "
            "(Python config files are not executed)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"groundingdino-py config file {path} not found")
    import yaml

    cfg = yaml.safe_load(path.read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"groundingdino-py config file {path}: expected a mapping of settings")
    return SLConfig(cfg)


def _text_encoder_folder(name: str) -> str:
    """A local folder for the text encoder: as given, or the hub id's snapshot in the HF cache."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=TEXT_ENCODER_FILES)


# The tiny build's settings, over the SwinT-OGC config (same structure: two-stage, text enhancer,
# fusion, sub-sentence masks). hidden_dim stays 256: its text encoder layers hard-code that width.
TINY_CONFIG: dict[str, Any] = {
    "hidden_dim": 256,
    "nheads": 2,
    "dim_feedforward": 64,
    "num_queries": 20,
    "enc_layers": 1,
    "dec_layers": 2,
    "use_checkpoint": False,
    "use_transformer_ckpt": False,
    "fusion_droppath": 0.0,
}
TINY_SWIN = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4}


def write_tiny_bert(folder: str | Path, max_len: int) -> None:
    """A 1-layer BERT (random weights) and a WordPiece tokenizer of the tiny models' words, saved."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from ..tiny_models import _bert_vocab

    vocab = _bert_vocab()
    Path(folder).mkdir(parents=True, exist_ok=True)
    vocab_file = Path(folder) / "vocab.txt"
    vocab_file.write_text("".join(f"{t}\n" for t in vocab))
    BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_len,
    )
    BertModel(config).save_pretrained(folder)


def tiny_gdino() -> GroundingDINO:
    """groundingdino-py's ``GroundingDINO`` from its own classes, small, seeded random weights, offline.

    Its stock builder fixes the Swin size by name, so the backbone is built here (4 stages of depth 1,
    the last three as features like SwinT-OGC's) and the rest follows ``build_groundingdino``. The BERT
    text encoder is a 1-layer model with a WordPiece vocab of the tiny models' words, written to a
    temporary folder because groundingdino-py loads it with ``from_pretrained``.
    """
    from ..tiny_models import _seeded

    args = SLConfig.fromfile(str(Path(groundingdino.config.__file__).parent / PACKAGED_CONFIGS[0]))
    for key, value in TINY_CONFIG.items():
        setattr(args, key, value)
    with tempfile.TemporaryDirectory(prefix="tiny-gdino-bert-") as folder, _seeded():
        write_tiny_bert(folder, args.max_text_len)
        args.text_encoder_type = folder
        swin = SwinTransformer(
            pretrain_img_size=224, out_indices=tuple(args.return_interm_indices), **TINY_SWIN
        )
        backbone = Joiner(swin, build_position_encoding(args))
        backbone.num_channels = swin.num_features[4 - len(args.return_interm_indices) :]
        model = GroundingDINO(
            backbone,
            build_transformer(args),
            num_queries=args.num_queries,
            aux_loss=True,
            iter_update=True,
            query_dim=4,
            num_feature_levels=args.num_feature_levels,
            nheads=args.nheads,
            dec_pred_bbox_embed_share=args.dec_pred_bbox_embed_share,
            two_stage_type=args.two_stage_type,
            two_stage_bbox_embed_share=args.two_stage_bbox_embed_share,
            two_stage_class_embed_share=args.two_stage_class_embed_share,
            num_patterns=args.num_patterns,
            dn_number=0,
            dn_box_noise_scale=args.dn_box_noise_scale,
            dn_label_noise_ratio=args.dn_label_noise_ratio,
            dn_labelbook_size=args.dn_labelbook_size,
            text_encoder_type=folder,
            sub_sentence_present=args.sub_sentence_present,
            max_text_len=args.max_text_len,
        )
    return model.eval()

"""The provenance of a run: which model (name, revision, dtype, backend, engine) makes each record field.

Derived from the configuration alone (the stages' ``ModelSpec``s, the VLM engine, the pools' GPUs), and
written into ``run.json`` by ``datagen.run`` (the form and its reader: ``shards.provenance``). Each stage
says which fields it makes: a stage config may define ``made_fields() -> tuple[str, ...]``; otherwise
``STAGE_FIELDS`` holds the stage's fields, and the ground stage makes the masks too when its model is
SAM 3 (it grounds and segments in one) or the segment stage has no model (``segment: {model: null}``:
every object must arrive masked). Stages run in order, so a later stage that rewrites a field is its
maker; the segment stage makes no mask when an earlier stage already made them (it passes them on).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shards.provenance import FIELDS, VERSION

from .models import ModelSpec

_MASKS = ("objects.mask", "objects.mask_score", "objects.mask_box")
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "tag": ("tags",),
    "caption": ("caption",),
    "ground": ("objects.box", "objects.phrase", "objects.detector_score"),
    "segment": _MASKS,
    "describe": ("objects.description",),
    "score": ("objects.clip_score",),
    "filter": (),  # drops objects and samples, writes no field
}
# Model types whose ground stage also makes the masks (``config.json``'s model_type; stages/ground.py).
MASKING_GROUNDERS = ("sam3",)
# The library that runs a kind of model when its stage names no engine of its own.
_DEFAULT_ENGINE = {"vlm": "transformers", "detector": "transformers", "segmenter": "segment-anything",
                   "clip": "open_clip"}


def made_fields(name: str, stage_cfg: Any, masked_upstream: bool = False) -> tuple[str, ...]:
    """The record fields stage ``name`` writes with this config (``masked_upstream``: for the ground
    stage, whether the run's segment stage expects every object masked already)."""
    own = getattr(stage_cfg, "made_fields", None)
    fields = tuple(own()) if callable(own) else STAGE_FIELDS.get(name, ())
    spec = getattr(stage_cfg, "model", None)
    if not callable(own) and name == "ground" and spec is not None and (
            masked_upstream or model_type(spec) in MASKING_GROUNDERS):
        fields += _MASKS
    if not callable(own) and name == "segment" and spec is None:
        fields = ()  # no segmenter: it only checks that the objects arrived masked
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"stage {name!r} says it makes {unknown}, which are not record fields {FIELDS}")
    return fields


def provenance(cfg) -> dict:
    """``run.json``'s ``provenance`` for a ``DatagenConfig``: field -> its maker (see ``shards.provenance``)."""
    fields: dict[str, dict] = {}
    segment = cfg.stages.get("segment")
    masked_upstream = segment is not None and getattr(segment, "model", ...) is None
    for name in cfg.stage_names:
        stage_cfg = cfg.stages[name]
        made = made_fields(name, stage_cfg, masked_upstream)
        if name == "segment" and any(f in fields for f in _MASKS):
            made = ()
        maker = _maker(cfg, name, stage_cfg)
        for f in made:
            fields[f] = maker
    return {"version": VERSION, "fields": {f: fields[f] for f in FIELDS if f in fields}}


def _maker(cfg, name: str, stage_cfg: Any) -> dict:
    spec = getattr(stage_cfg, "model", None)
    method = getattr(stage_cfg, "method", None)
    if not isinstance(spec, ModelSpec) or (name == "tag" and method != "vlm"):
        return {"stage": name, "model": None, "method": method or name}
    on_vllm = name in cfg.vllm_stages()
    engine = "vllm" if on_vllm else getattr(stage_cfg, "engine", None) or _DEFAULT_ENGINE[spec.kind]
    if spec.kind == "segmenter" and ((spec.backend == "hf" and not spec.weights) or model_type(spec) == "sam2"):
        engine = "transformers"  # SAM 2.1 (Sam2Model) by hub id or folder; segment-anything needs its weights file
    return {"stage": name, "model": spec.name, "revision": spec.revision, "dtype": _dtype(cfg, name, spec, on_vllm),
            "backend": spec.backend, "engine": engine, "weights": spec.weights}


def _dtype(cfg, stage: str, spec: ModelSpec, on_vllm: bool) -> str:
    """The dtype the model runs in: the spec's, or "auto" resolved where the run decides it."""
    if spec.dtype != "auto":
        return spec.dtype
    if on_vllm:
        return "auto (the checkpoint's, vLLM)"
    if spec.device != "auto":
        return "bfloat16" if spec.device.startswith("cuda") else "float32"
    # device "auto" is CUDA exactly when the stage's actors hold a GPU (Ray hides GPUs from the others).
    gpus = next((p.num_gpus for p in cfg.pools.values() if stage in p.stages), 0.0)
    return "bfloat16" if gpus > 0 else "float32"


def model_type(spec: ModelSpec) -> str | None:
    """``config.json``'s model_type of a spec, without loading or downloading anything: from a local
    folder or the Hugging Face cache (hub ids), from the registry name of a tiny build (``tiny-<type>``,
    e.g. tiny-sam3); None when it cannot be told here."""
    if spec.backend == "tiny":
        return spec.name.removeprefix("tiny-") if spec.name.startswith("tiny-") else None
    path = Path(spec.name) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec.name, "config.json", revision=spec.revision)
        except Exception:  # noqa: BLE001 - not a hub id (a SAM registry key, an open_clip name): unknown
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        value = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None

"""The datagen configuration: frozen dataclasses composed from the stage configs, loaded from YAML.

A run is defined by ``DatagenConfig``. ``fingerprint_dict`` is the part that decides what the output
contains (inputs and their sharding, decode bounds, each stage's models, prompts and thresholds); it
goes into ``run.json`` and its fingerprint guards resumes. How the work is spread over a machine or a
cluster (actor pools, GPUs per actor, batch sizes, chunk size, parallelism) is not part of it, so a
run started on one machine can be resumed on another. ``vlm`` picks the VLM stages' engine
(transformers, or vLLM through ray.data.llm); the vLLM engine and its output-relevant settings are
fingerprinted, its sizes (GPUs, batch sizes, memory) are not.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from shards.config import (
    ConfigError,
    NonNegativeFloat,
    NonNegativeInt,
    Overrides,
    PositiveFloat,
    PositiveInt,
    build,
    load,
)
from shards.schema import STAGE_ORDER

from .stages import vlm_vllm
from .stages.decode import DecodeConfig
from .stages.vlm_vllm import VllmConfig, uses_vlm
from .stages.write import WriteConfig

# The model stages in pipeline order (STAGE_ORDER, defined with the shard contract since they name the
# parquet's error_stage): name -> (stage class, config class). A fixed table in code: configuration
# files select stages by name and never name a class.
_STAGE_CLASSES = {
    "tag": ("TagStage", "TagConfig"),
    "caption": ("CaptionStage", "CaptionConfig"),
    "ground": ("GroundStage", "GroundConfig"),
    "segment": ("SegmentStage", "SegmentConfig"),
    "describe": ("DescribeStage", "DescribeConfig"),
    "score": ("ScoreStage", "ScoreConfig"),
    "filter": ("FilterStage", "FilterConfig"),
}
# What each stage reads that an earlier stage writes.
_NEEDS = {"ground": "tag", "segment": "ground", "describe": "ground", "score": "describe", "filter": "ground"}


def stage_classes(name: str) -> tuple[type, type]:
    """``(StageClass, ConfigClass)`` of a model stage, by name."""
    if name not in _STAGE_CLASSES:
        raise ConfigError(f"unknown stage {name!r}; stages: {list(STAGE_ORDER)}")
    module = importlib.import_module(f"datagen.stages.{name}")
    stage_cls, config_cls = _STAGE_CLASSES[name]
    return getattr(module, stage_cls), getattr(module, config_cls)


@dataclass(frozen=True)
class InputConfig:
    """How inputs are found and split into shards."""

    samples_per_shard: PositiveInt = 1000  # inputs per shard (fixed, so reruns shard identically)
    path_column: str | None = None  # list inputs: the path/URL column (None: detect)
    caption_column: str | None = None  # list inputs: the caption column (None: detect)


@dataclass(frozen=True)
class PoolConfig:
    """One actor pool: the stages it runs (in order, one model load each) and its resources."""

    stages: Annotated[tuple[str, ...], Field(min_length=1)]  # model stages run by each actor, in pipeline order
    num_gpus: NonNegativeFloat = 0.0  # GPUs per actor; a fraction packs several actors on one GPU
    num_cpus: NonNegativeFloat = 1.0  # CPUs per actor
    memory_gb: PositiveFloat | None = None  # RAM Ray reserves per actor, GiB (its `memory` resource); None: none
    actors: PositiveInt = 1  # pool size (the minimum when max_actors is set)
    max_actors: PositiveInt | None = None  # autoscale up to this many actors; None: fixed size
    max_tasks_in_flight: PositiveInt = 2  # chunks queued per actor, so the next is ready when one finishes

    def __post_init__(self) -> None:
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ConfigError(f"num_gpus must be a fraction in (0, 1] or a whole number, got {self.num_gpus}")
        if self.max_actors is not None and self.max_actors < self.actors:
            raise ConfigError(f"max_actors ({self.max_actors}) must be >= actors ({self.actors})")


@dataclass(frozen=True)
class VlmConfig:
    """The engine of the stages that ask the VLM: tag (method "vlm"), caption and describe."""

    engine: Literal["transformers", "vllm"] = "transformers"  # "transformers": batched generate in the pools'
    #   actors (stages/vlm.py); "vllm": ray.data.llm processors on vLLM (stages/vlm_vllm.py, GPUs only)
    vllm: VllmConfig = field(default_factory=VllmConfig)  # the vLLM engine, used by engine "vllm"


@dataclass(frozen=True)
class ExecutionConfig:
    """How the work is spread; none of it changes the output."""

    chunk_size: PositiveInt = 64  # inputs per pipeline unit; every stage sees whole chunks (deterministic batches)
    decode_tasks: PositiveInt = 4  # CPU decode parallelism (concurrent Ray tasks)
    decode_cpus: NonNegativeFloat = 1.0  # CPUs per decode task
    pack_tasks: PositiveInt = 2  # concurrent JPEG-encode/validate tasks after the last pool
    pack_cpus: NonNegativeFloat = 1.0  # CPUs per pack task
    write_cpus: NonNegativeFloat = 0.0  # CPUs reserved per shard-write task (mostly I/O; 0 never waits for actors)
    num_cpus: PositiveInt | None = None  # embedded local Ray only: CPUs to use (None: all)
    num_gpus: NonNegativeInt | None = None  # embedded local Ray only: GPUs to use (None: all)
    fail_fast_rows: PositiveInt = 64  # stop when the first this-many rows all failed in one stage for one reason
    wait_for_resources: bool = False  # a worker no Ray node can hold: wait for an autoscaler to add such a node
    #                                   (run's --wait-for-resources); False: refuse at once (datagen.resources)


@dataclass(frozen=True)
class DatagenConfig:
    """Everything a run needs besides its input and output locations."""

    models: str | None = None  # model preset ("tiny" or "real") for every stage that names no model
    inputs: InputConfig = field(default_factory=InputConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    stages: dict[str, Any] = field(default_factory=dict)  # stage name -> its config (StageConfig class)
    vlm: VlmConfig = field(default_factory=VlmConfig)  # the VLM stages' engine
    pools: dict[str, PoolConfig] = field(default_factory=dict)  # pool name -> pool, in pipeline order
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The model stages that run, in order."""
        return tuple(s for p in self.pools.values() for s in p.stages)

    def vllm_stages(self) -> tuple[str, ...]:
        """The stages that run on vLLM (``vlm.engine: vllm``): those that ask the VLM; else none."""
        if self.vlm.engine != "vllm":
            return ()
        return tuple(s for s in self.stage_names if uses_vlm(s, self.stages.get(s)))

    def runs_on_vllm(self, pool: PoolConfig) -> bool:
        """Whether a pool is a vLLM processor (its stages all run on vLLM) rather than an actor pool."""
        mine = self.vllm_stages()
        return bool(mine) and all(s in mine for s in pool.stages)

    def batch_size(self, stage: str) -> int:
        """Rows per call of a model stage (its config's ``batch_size`` hint)."""
        return int(getattr(self.stages[stage], "batch_size", self.execution.chunk_size))


def _stage_config(name: str, data: Any, models: str | None) -> Any:
    _, config_cls = stage_classes(name)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"stages.{name}: expected a mapping of settings (got {data!r})", f"stages.{name}")
    data = dict(data or {})
    default = _default_model(config_cls, models)
    if default is not None:
        if "model" not in data and models is not None:
            data["model"] = default
        elif isinstance(data.get("model"), Mapping):
            data["model"] = _complete_model(dict(data["model"]), default)
    return build(config_cls, data, f"stages.{name}")


def _default_model(config_cls: type, models: str | None) -> Any:
    """The ModelSpec a stage runs when its config names none: the preset's of its kind, else the class's."""
    if "model" not in {f.name for f in fields(config_cls)} or not _has_default(config_cls):
        return None
    spec = config_cls().model
    if spec is None:
        return None
    if models is not None:
        from .models import preset

        return preset(models).get(spec.kind, spec)
    return spec


def _complete_model(given: dict, default: Any) -> dict:
    """A partly given ``model`` mapping, completed, so ``model: {name: google/owlv2-base-patch16}`` is enough.

    Without a ``name`` it adjusts the default model (``{dtype: float32}``) and keeps everything else.
    With one it is another model: only the stage's ``kind`` and, for a tiny factory's name, the ``tiny``
    backend are filled in; the default's weights or revision belong to the default model, not this one.
    """
    if "name" not in given:
        return {**dataclasses.asdict(default), **given}
    from .models import TINY_KINDS

    given.setdefault("kind", default.kind)
    if given["name"] in TINY_KINDS:
        given.setdefault("backend", "tiny")
    return given


def _has_default(cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING for f in fields(cls))


def build_config(data: Mapping[str, Any]) -> DatagenConfig:
    """A validated DatagenConfig from a plain mapping (the parsed YAML)."""
    data = dict(data or {})
    stages_data = data.pop("stages", None) or {}
    pools_data = data.pop("pools", None)
    if not isinstance(stages_data, dict):
        raise ConfigError("stages: expected a mapping of stage name -> settings", "stages")
    if pools_data is None:  # default: every stage that has settings (or all) in its own single-actor pool
        names = [s for s in STAGE_ORDER if s in stages_data] or list(STAGE_ORDER)
        pools_data = {s: {"stages": [s]} for s in names}
    cfg = build(DatagenConfig, {**data, "pools": pools_data})
    models = cfg.models
    if models is not None:
        from .models import PRESETS

        if models not in PRESETS:
            raise ConfigError(f"models: must be one of {sorted(PRESETS)} (got {models!r})", "models")
    order = cfg.stage_names
    for name in stages_data:
        if name not in order:
            raise ConfigError(f"stages.{name}: stage is configured but no pool runs it", f"stages.{name}")
    _check_pools(cfg)
    stages = {name: _stage_config(name, stages_data.get(name), models) for name in order}
    cfg = dataclasses.replace(cfg, stages=stages)
    _check_vllm(cfg)
    return cfg


def _check_pools(cfg: DatagenConfig) -> None:
    """The pools run known stages once each, in pipeline order, after the stages they read from."""
    order = cfg.stage_names
    if not order:
        raise ConfigError("pools: no stage to run", "pools")
    if len(set(order)) != len(order):
        raise ConfigError(f"pools: a stage runs twice ({list(order)})", "pools")
    positions = [STAGE_ORDER.index(s) if s in STAGE_ORDER else -1 for s in order]
    if -1 in positions:
        bad = order[positions.index(-1)]
        raise ConfigError(f"pools: unknown stage {bad!r}; stages: {list(STAGE_ORDER)}", "pools")
    if positions != sorted(positions):
        raise ConfigError(f"pools: stages must run in the order {list(STAGE_ORDER)}, got {list(order)}", "pools")
    for s in order:
        need = _NEEDS.get(s)
        if need and need not in order:
            raise ConfigError(f"pools: stage {s!r} needs stage {need!r} before it", "pools")


def _check_vllm(cfg: DatagenConfig) -> None:
    """``vlm.engine: vllm``: vLLM installed, VLM stages in pools of their own, whole GPUs, real weights."""
    mine = cfg.vllm_stages()
    if not mine:
        return
    if not vlm_vllm.vllm_available():
        raise ConfigError(
            f"vlm.engine: 'vllm' runs the stages {list(mine)} on vLLM, which is not installed in this "
            f"environment: {vlm_vllm.INSTALL_HINT}. Or set vlm.engine: transformers (the default)."
        )
    gpus = cfg.vlm.vllm.gpus_per_replica
    for name, p in cfg.pools.items():
        where = f"pools.{name}"
        vlm = [s for s in p.stages if s in mine]
        if not vlm:
            continue
        if len(vlm) < len(p.stages):
            others = [s for s in p.stages if s not in mine]
            raise ConfigError(
                f"{where}: with vlm.engine vllm the stages {vlm} run as a ray.data.llm processor and cannot share "
                f"a pool with {others}; give them a pool of their own, e.g. pools: {{vlm: {{stages: {vlm}}}, ...}}",
                where,
            )
        if p.num_gpus != gpus:
            raise ConfigError(
                f"{where}.num_gpus: {p.num_gpus:g}, but each vLLM engine replica takes {gpus} whole GPU(s) "
                f"(tensor_parallel_size x pipeline_parallel_size): set num_gpus: {gpus}",
                f"{where}.num_gpus",
            )
        specs = {s: cfg.stages[s].model for s in vlm}
        if len({(m.name, m.revision, m.dtype) for m in specs.values()}) > 1:
            raise ConfigError(f"{where}: the stages {vlm} share one vLLM engine but name different models "
                              f"({ {s: m.name for s, m in specs.items()} }); give them the same model or separate pools", where)
        for s, m in specs.items():
            if m.backend != "hf":
                raise ConfigError(f"stages.{s}.model: vLLM loads real checkpoints, not backend {m.backend!r}; "
                                  "use a hub id or a local folder (models: real)", f"stages.{s}.model")


def load_config(path: str | Path, overrides: Overrides = ()) -> DatagenConfig:
    """Load a YAML preset (e.g. configs/datagen/tiny.yaml) with overrides: ``["a.b=value"]`` (``--set``) or a
    mapping (``{"execution": {"chunk_size": 3}}`` is merged into the file's sections)."""
    return load(build_config, path, overrides)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain JSON/YAML-ready data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _without_batch_sizes(d: Any) -> Any:
    # Batch sizes are execution hints kept in the stage configs; they are not what a run produces.
    if isinstance(d, dict):
        return {k: _without_batch_sizes(v) for k, v in d.items() if not k.endswith("batch_size")}
    return d


def fingerprint_dict(cfg: DatagenConfig, inputs: dict) -> dict:
    """What defines a run's output: ``inputs`` (uris, count, keys digest), bounds, models, prompts, thresholds."""
    from shards import SCHEMA_VERSION

    out = {
        "schema_version": SCHEMA_VERSION,
        "inputs": {**inputs, **to_dict(cfg.inputs)},
        "decode": to_dict(cfg.decode),
        "write": to_dict(cfg.write),
        "stages": {name: _without_batch_sizes(to_dict(cfg.stages[name])) for name in cfg.stage_names},
    }
    if cfg.vllm_stages():  # only then: runs on the transformers engine keep their fingerprints
        v = cfg.vlm.vllm
        out["vlm"] = {"engine": cfg.vlm.engine, "model_source": v.model_source, "max_model_len": v.max_model_len,
                      "chat_template_content_format": v.chat_template_content_format,
                      "engine_kwargs": v.engine_kwargs}
    return out

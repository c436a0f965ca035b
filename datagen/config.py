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
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .stages import vlm_vllm
from .stages.decode import DecodeConfig
from .stages.vlm_vllm import VllmConfig, uses_vlm
from .stages.write import WriteConfig

# The model stages in pipeline order: name -> (module, stage class, config class). A fixed table in code:
# configuration files select stages by name and never name a class.
STAGE_ORDER = ("tag", "caption", "ground", "segment", "describe", "score", "filter")
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
VLM_ENGINES = ("transformers", "vllm")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field."""


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

    samples_per_shard: int = 1000  # inputs per shard (fixed, so reruns shard identically)
    path_column: str | None = None  # list inputs: the path/URL column (None: detect)
    caption_column: str | None = None  # list inputs: the caption column (None: detect)


@dataclass(frozen=True)
class PoolConfig:
    """One actor pool: the stages it runs (in order, one model load each) and its resources."""

    stages: tuple[str, ...]  # model stages run by each actor of this pool, in pipeline order
    num_gpus: float = 0.0  # GPUs per actor; a fraction packs several actors on one GPU
    num_cpus: float = 1.0  # CPUs per actor
    actors: int = 1  # pool size (the minimum when max_actors is set)
    max_actors: int | None = None  # autoscale up to this many actors; None: fixed size
    max_tasks_in_flight: int = 2  # chunks queued per actor, so the next is ready when one finishes


@dataclass(frozen=True)
class VlmConfig:
    """The engine of the stages that ask the VLM: tag (method "vlm"), caption and describe."""

    engine: str = "transformers"  # "transformers": batched generate in the pools' actors (stages/vlm.py);
    #                               "vllm": ray.data.llm processors on vLLM (stages/vlm_vllm.py, GPUs only)
    vllm: VllmConfig = field(default_factory=VllmConfig)  # the vLLM engine, used by engine "vllm"

    def __post_init__(self) -> None:
        if self.engine not in VLM_ENGINES:
            raise ValueError(f"engine {self.engine!r} is not one of {VLM_ENGINES}")


@dataclass(frozen=True)
class ExecutionConfig:
    """How the work is spread; none of it changes the output."""

    chunk_size: int = 64  # inputs per pipeline unit; every stage sees whole chunks (deterministic batches)
    decode_tasks: int = 4  # CPU decode parallelism (concurrent Ray tasks)
    decode_cpus: float = 1.0  # CPUs per decode task
    pack_tasks: int = 2  # concurrent JPEG-encode/validate tasks after the last pool
    pack_cpus: float = 1.0  # CPUs per pack task
    write_cpus: float = 0.0  # CPUs reserved per shard-write task (mostly I/O; 0 never waits for actors)
    num_cpus: int | None = None  # embedded local Ray only: CPUs to use (None: all)
    num_gpus: int | None = None  # embedded local Ray only: GPUs to use (None: all)
    fail_fast_rows: int = 64  # stop when the first this-many rows all failed in one stage for one reason


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


# ---------------------------------------------------------------------------------------------------
# dict -> dataclass, strictly: unknown keys and wrong types are errors that name the field path.


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _convert(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and not (isinstance(value, tp) and (tp is bool or not isinstance(value, bool))):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, path: str = "config") -> Any:
    """Build dataclass ``cls`` from a (YAML) mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown} for {cls.__name__}; fields: {sorted(known)}")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None


def _stage_config(name: str, data: dict, models: str | None) -> Any:
    _, config_cls = stage_classes(name)
    data = dict(data or {})
    if models is not None and "model" in {f.name for f in fields(config_cls)} and "model" not in data:
        from .models import preset

        kind = config_cls().model.kind if _has_default(config_cls) else None
        if kind is not None:
            data["model"] = preset(models)[kind]
    return from_dict(config_cls, data, f"config.stages.{name}")


def _has_default(cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING for f in fields(cls))


def build_config(data: dict) -> DatagenConfig:
    """A validated DatagenConfig from a plain mapping (the parsed YAML)."""
    data = dict(data or {})
    models = data.get("models")
    stages_data = data.pop("stages", None) or {}
    pools_data = data.pop("pools", None)
    if not isinstance(stages_data, dict):
        raise ConfigError("config.stages: expected a mapping of stage name -> settings")
    if pools_data is None:  # default: every stage that has settings (or all) in its own single-actor pool
        names = [s for s in STAGE_ORDER if s in stages_data] or list(STAGE_ORDER)
        pools_data = {s: {"stages": [s]} for s in names}
    cfg = from_dict(DatagenConfig, {**data, "pools": pools_data}, "config")
    order = cfg.stage_names
    for name in stages_data:
        if name not in order:
            raise ConfigError(f"config.stages.{name}: stage is configured but no pool runs it")
    stages = {name: _stage_config(name, stages_data.get(name), models) for name in order}
    cfg = dataclasses.replace(cfg, stages=stages)
    validate(cfg)
    return cfg


def validate(cfg: DatagenConfig) -> None:
    """Raise ConfigError when the configuration cannot run."""
    order = cfg.stage_names
    if not order:
        raise ConfigError("config.pools: no stage to run")
    if len(set(order)) != len(order):
        raise ConfigError(f"config.pools: a stage runs twice ({list(order)})")
    positions = [STAGE_ORDER.index(s) if s in STAGE_ORDER else -1 for s in order]
    if -1 in positions:
        bad = order[positions.index(-1)]
        raise ConfigError(f"config.pools: unknown stage {bad!r}; stages: {list(STAGE_ORDER)}")
    if positions != sorted(positions):
        raise ConfigError(f"config.pools: stages must run in the order {list(STAGE_ORDER)}, got {list(order)}")
    for s in order:
        need = _NEEDS.get(s)
        if need and need not in order:
            raise ConfigError(f"config.pools: stage {s!r} needs stage {need!r} before it")
    for name, p in cfg.pools.items():
        where = f"config.pools.{name}"
        if not p.stages:
            raise ConfigError(f"{where}.stages: empty")
        if p.num_gpus < 0 or (p.num_gpus > 1 and p.num_gpus != int(p.num_gpus)):
            raise ConfigError(f"{where}.num_gpus: a fraction in (0, 1] or a whole number, got {p.num_gpus}")
        if p.num_cpus < 0 or p.actors < 1 or (p.max_actors is not None and p.max_actors < p.actors):
            raise ConfigError(f"{where}: needs num_cpus >= 0, actors >= 1 and max_actors >= actors")
    ex = cfg.execution
    if ex.chunk_size < 1 or ex.decode_tasks < 1 or ex.pack_tasks < 1 or ex.fail_fast_rows < 1:
        raise ConfigError("config.execution: chunk_size, decode_tasks, pack_tasks and fail_fast_rows must be >= 1")
    if cfg.inputs.samples_per_shard < 1:
        raise ConfigError("config.inputs.samples_per_shard must be >= 1")
    if not 1 <= cfg.write.jpeg_quality <= 100:
        raise ConfigError("config.write.jpeg_quality must be in 1..100")
    if cfg.decode.min_side < 1 or cfg.decode.max_side < cfg.decode.min_side:
        raise ConfigError("config.decode: needs 1 <= min_side <= max_side")
    _validate_vllm(cfg)


def _validate_vllm(cfg: DatagenConfig) -> None:
    """``vlm.engine: vllm``: vLLM installed, VLM stages in pools of their own, whole GPUs, real weights."""
    mine = cfg.vllm_stages()
    if not mine:
        return
    if not vlm_vllm.vllm_available():
        raise ConfigError(
            f"config.vlm.engine: 'vllm' runs the stages {list(mine)} on vLLM, which is not installed in this "
            f"environment: {vlm_vllm.INSTALL_HINT}. Or set vlm.engine: transformers (the default)."
        )
    gpus = cfg.vlm.vllm.gpus_per_replica
    for name, p in cfg.pools.items():
        where = f"config.pools.{name}"
        vlm = [s for s in p.stages if s in mine]
        if not vlm:
            continue
        if len(vlm) < len(p.stages):
            others = [s for s in p.stages if s not in mine]
            raise ConfigError(
                f"{where}: with vlm.engine vllm the stages {vlm} run as a ray.data.llm processor and cannot share "
                f"a pool with {others}; give them a pool of their own, e.g. pools: {{vlm: {{stages: {vlm}}}, ...}}"
            )
        if p.num_gpus != gpus:
            raise ConfigError(
                f"{where}.num_gpus: {p.num_gpus:g}, but each vLLM engine replica takes {gpus} whole GPU(s) "
                f"(tensor_parallel_size x pipeline_parallel_size): set num_gpus: {gpus}"
            )
        specs = {s: cfg.stages[s].model for s in vlm}
        if len({(m.name, m.revision, m.dtype) for m in specs.values()}) > 1:
            raise ConfigError(f"{where}: the stages {vlm} share one vLLM engine but name different models "
                              f"({ {s: m.name for s, m in specs.items()} }); give them the same model or separate pools")
        for s, m in specs.items():
            if m.backend != "hf":
                raise ConfigError(f"config.stages.{s}.model: vLLM loads real checkpoints, not backend {m.backend!r}; "
                                  "use a hub id or a local folder (models: real)")


def load_config(path: str | Path, overrides: dict | None = None) -> DatagenConfig:
    """Load a YAML preset (e.g. configs/datagen/tiny.yaml), with optional top-level overrides merged in."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return build_config(_merge(data, overrides or {}))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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

"""Measurements for ``python -m datagen size``: the run records ``datagen run`` saves, and reading them.

A record (``<output>/runs/<UTC time>.json``, kind ``datagen-run``) holds per stage the rows processed and
the busy seconds summed over its workers, and each pool's resources from the resolved configuration.
This module reads it (errors name the file and the field), or builds the same ``Measurement`` from a
config or from ``--rates``; ``datagen.sizing`` turns a Measurement into a plan. No Ray, no torch here:
``size`` starts in well under a second.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from shards.dataset import DatasetHandle, as_handle
from shards.paths import dump_json, fs_and_root, url_for, write_atomic
from shards.schema import STAGE_ORDER, STATUS_OK

CPU_TASK_STAGES = ("decode", "pack")  # plain Ray tasks, sized by execution.<stage>_tasks
CPU_ONLY_STAGES = ("filter",)  # model-free: without a config, their pool holds no GPU
RUN_RECORD_KIND = "datagen-run"  # datagen.run writes records of this kind to <output>/RUNS_DIR/
# The pipeline's order (the model stages between decode and pack): records list pools by name.
PIPELINE_ORDER = ("decode", *STAGE_ORDER, "pack")
ENGINES = ("actors", "vllm")  # how a pool ran: an actor pool of the stages' own models, or a vLLM processor
RUNS_DIR = "runs"
RUN_RECORD_VERSION = 1  # <output>/RUNS_DIR/<UTC time>.json: one record per run that processed inputs


class SizingError(ValueError):
    """A measurement or request that cannot be sized; the message names the file and the field."""


@dataclass(frozen=True)
class Pool:
    """Workers that run some stages: an actor pool (``pools.<name>``) or CPU tasks (decode, pack)."""

    name: str
    stages: tuple[str, ...]
    num_gpus: float = 0.0  # GPUs per actor; a fraction packs several actors on one GPU
    num_cpus: float = 1.0  # CPUs per worker (what Ray reserves)
    tasks: bool = False  # CPU tasks (execution.<name>_tasks) instead of an actor pool
    workers: int | None = None  # how many the measured run had (actors, max_actors or tasks in flight)
    engine: str = "actors"  # "vllm": a ray.data.llm processor whose workers are vLLM engine replicas

    @property
    def vllm(self) -> bool:
        return self.engine == "vllm"

    @property
    def kind(self) -> str:
        if self.vllm:
            return "vLLM engines"
        return "CPU tasks" if self.tasks else "GPU actors" if self.num_gpus > 0 else "CPU actors"

    @property
    def cpus_per_worker(self) -> float:
        """CPUs a worker needs: a CPU worker computes on at least one core (Ray gives it
        max(1, int(num_cpus)) threads); a GPU actor's CPUs are its reservation; a vLLM engine replica
        reserves one CPU per GPU (its pool's num_cpus is unused)."""
        if self.vllm:
            return self.num_gpus
        return self.num_cpus if self.num_gpus > 0 else max(1.0, self.num_cpus)


@dataclass(frozen=True)
class Measurement:
    """Per-stage rates and the pools that ran them: from a run record, a config, or ``--rates``."""

    rates: dict[str, float]  # stage -> images/s of one worker while busy
    pools: tuple[Pool, ...]
    objects_per_image: float | None = None  # at which the per-object stages were measured
    source: str = "--rates"
    processed: int = 0  # images the measured run processed
    wall_seconds: float = 0.0
    nodes: int = 0
    startup_seconds: float | None = None  # until the measured run's first chunk came out
    startup_rows: int = 0  # the rows of that first chunk
    models: dict[str, str] = field(default_factory=dict)  # stage -> "name (backend)"
    overridden: tuple[str, ...] = ()  # stages whose rate came from --rates


# ---------------------------------------------------------------------------------------------------
# Reading measurements: run records, configs, --rates.


def parse_rates(specs: Iterable[str]) -> dict[str, float]:
    """``["tag=8,caption=5", "describe=1.5"]`` -> ``{"tag": 8.0, ...}``; ``inf`` marks a negligible stage."""
    rates: dict[str, float] = {}
    for spec in specs:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            stage, sep, value = part.partition("=")
            stage = stage.strip()
            if not sep or not stage:
                raise SizingError(f"--rates {part!r}: expected stage=images_per_second, e.g. describe=1.5")
            try:
                rate = float(value)
            except ValueError:
                raise SizingError(f"--rates {part!r}: {value!r} is not a number of images/s") from None
            if not rate > 0:
                raise SizingError(f"--rates {part!r}: the rate must be > 0 images/s")
            rates[stage] = rate
    return rates


def _where(source: str, path: str) -> str:
    return f"{source}: field {path!r}"


def _number(data: Mapping, key: str, source: str, path: str, minimum: float = 0.0, optional: bool = False):
    if key not in data:
        if optional:
            return None
        raise SizingError(f"{_where(source, path)} is missing")
    v = data[key]
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < minimum:
        raise SizingError(f"{_where(source, path)}: expected a number >= {minimum:g}, got {v!r}")
    return v


def _integer(data: Mapping, key: str, source: str, path: str, minimum: int = 0, optional: bool = False):
    v = _number(data, key, source, path, minimum, optional)
    if v is not None and v != int(v):
        raise SizingError(f"{_where(source, path)}: expected a whole number, got {v!r}")
    return None if v is None else int(v)


def _mapping(data: Mapping, key: str, source: str, path: str, optional: bool = False) -> dict | None:
    if key not in data:
        if optional:
            return None
        raise SizingError(f"{_where(source, path)} is missing")
    v = data[key]
    if not isinstance(v, dict):
        raise SizingError(f"{_where(source, path)}: expected a mapping, got {v!r}")
    return v


def measurement_from_record(record: Any, source: str) -> Measurement:
    """A Measurement from a parsed run record (``<output>/runs/<time>.json``); errors name the field."""
    if not isinstance(record, dict):
        raise SizingError(f"{source}: expected a JSON object (a datagen run record), got {type(record).__name__}")
    if record.get("kind") != RUN_RECORD_KIND:
        raise SizingError(f"{_where(source, 'kind')}: expected {RUN_RECORD_KIND!r} (a record that "
                          f"python -m datagen run writes to <output>/{RUNS_DIR}/), got {record.get('kind')!r}")
    version = _integer(record, "version", source, "version", 1)
    if version > 1:
        raise SizingError(f"{_where(source, 'version')}: version {version} is newer than this code reads (1)")
    stages = _mapping(record, "stages", source, "stages")
    rates = {}
    for name, st in stages.items():
        if not isinstance(st, dict):
            raise SizingError(f"{_where(source, f'stages.{name}')}: expected a mapping, got {st!r}")
        rows = _integer(st, "rows", source, f"stages.{name}.rows")
        busy = _number(st, "busy_seconds", source, f"stages.{name}.busy_seconds")
        if rows > 0 and busy > 0:
            rates[name] = rows / busy
    pools = []
    for name, p in _mapping(record, "pools", source, "pools").items():
        where = f"pools.{name}"
        if not isinstance(p, dict):
            raise SizingError(f"{_where(source, where)}: expected a mapping, got {p!r}")
        names = p.get("stages")
        if not isinstance(names, list) or not names or not all(isinstance(s, str) for s in names):
            raise SizingError(f"{_where(source, where + '.stages')}: expected a list of stage names, got {names!r}")
        num_gpus = _number(p, "num_gpus", source, f"{where}.num_gpus")
        num_cpus = _number(p, "num_cpus", source, f"{where}.num_cpus")
        actors = _integer(p, "actors", source, f"{where}.actors", 1)
        max_actors = _integer(p, "max_actors", source, f"{where}.max_actors", 1, optional=True)
        engine = p.get("engine", "actors")  # older records: actor pools
        if engine not in ENGINES:
            raise SizingError(f"{_where(source, where + '.engine')}: expected one of {list(ENGINES)}, got {engine!r}")
        pools.append(Pool(name, tuple(names), num_gpus, num_cpus, workers=max_actors or actors, engine=engine))
    order = {s: k for k, s in enumerate(PIPELINE_ORDER)}
    pools.sort(key=lambda p: order.get(p.stages[0], len(order)))  # pipeline order (stable for unknown stages)
    tasks = _mapping(record, "cpu_tasks", source, "cpu_tasks", optional=True) or {}
    for name in CPU_TASK_STAGES:
        if name not in rates:
            continue  # not measured (e.g. an older record): not sized
        t = tasks.get(name, {})
        if not isinstance(t, dict):
            raise SizingError(f"{_where(source, f'cpu_tasks.{name}')}: expected a mapping, got {t!r}")
        n = _integer(t, "tasks", source, f"cpu_tasks.{name}.tasks", 1, optional=True)
        cpus = _number(t, "num_cpus", source, f"cpu_tasks.{name}.num_cpus", optional=True)
        task_pool = Pool(name, (name,), 0.0, 1.0 if cpus is None else cpus, tasks=True, workers=n)
        pools = [task_pool, *pools] if name == "decode" else [*pools, task_pool]
    models = {}
    for stage, spec in (_mapping(record, "models", source, "models", optional=True) or {}).items():
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            models[stage] = f"{spec['name']} ({spec.get('backend', '?')})"
    return Measurement(
        rates=rates, pools=tuple(pools), source=source,
        objects_per_image=_number(record, "objects_per_image", source, "objects_per_image", optional=True),
        processed=_integer(record, "processed", source, "processed"),
        wall_seconds=_number(record, "wall_seconds", source, "wall_seconds"),
        nodes=_integer(record, "nodes", source, "nodes", optional=True) or 0,
        startup_seconds=_number(record, "startup_seconds", source, "startup_seconds", optional=True),
        startup_rows=_integer(record, "startup_rows", source, "startup_rows", optional=True) or 0,
        models=models)


def record_path(location: str) -> str:
    """The run record to read for ``location``: a .json file, or the newest ``runs/*.json`` of an output."""
    fs, root = fs_and_root(location)
    url = functools.partial(url_for, fs)
    if not fs.exists(root):
        raise SizingError(f"{location}: not found (give a datagen output folder or a run record .json)")
    if not fs.isdir(root):
        return location
    folder = f"{root}/{RUNS_DIR}" if fs.isdir(f"{root}/{RUNS_DIR}") else root
    found = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json"))
    if not found:
        raise SizingError(f"{location}: no run records in {url(folder)} (python -m datagen run writes "
                          f"<output>/{RUNS_DIR}/<time>.json after each run that processed inputs)")
    return url(found[-1])


def load_measurement(location: str) -> Measurement:
    """The Measurement of a run record file, or of the newest record of a datagen output folder."""
    path = record_path(location)
    fs, p = fs_and_root(path)
    try:
        with fs.open(p, "rb") as f:
            record = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SizingError(f"{path}: not valid JSON ({e})") from None
    return measurement_from_record(record, path)


def measurement_from_config(cfg, source: str) -> Measurement:
    """The pools of a DatagenConfig (rates to be given with --rates)."""
    ex = cfg.execution
    pools = [Pool("decode", ("decode",), 0.0, ex.decode_cpus, tasks=True, workers=ex.decode_tasks)]
    pools += [Pool(name, tuple(p.stages), p.num_gpus, p.num_cpus, workers=p.max_actors or p.actors,
                   engine="vllm" if cfg.runs_on_vllm(p) else "actors")
              for name, p in cfg.pools.items()]
    pools.append(Pool("pack", ("pack",), 0.0, ex.pack_cpus, tasks=True, workers=ex.pack_tasks))
    models = {}
    for name in cfg.stage_names:
        spec = getattr(cfg.stages[name], "model", None)
        if spec is not None:
            models[name] = f"{spec.name} ({spec.backend})"
    return Measurement(rates={}, pools=tuple(pools), source=source, models=models)


def with_rates(m: Measurement, rates: Mapping[str, float], objects_per_image: float | None = None) -> Measurement:
    """``m`` with ``rates`` replacing (or adding) stage rates; CPU-task pools without any rate are dropped."""
    known = {s for p in m.pools for s in p.stages}
    unknown = sorted(set(rates) - known)
    if unknown:
        raise SizingError(f"--rates: stage(s) {unknown} are not run by {m.source}; its stages: {sorted(known)}")
    merged = {**m.rates, **rates}
    pools = tuple(p for p in m.pools if not p.tasks or all(s in merged for s in p.stages))
    opi = m.objects_per_image if objects_per_image is None else objects_per_image
    return replace(m, rates=merged, pools=pools, objects_per_image=opi,
                   overridden=tuple(sorted(set(m.overridden) | set(rates))))


def measurement_from_rates(rates: Mapping[str, float], objects_per_image: float | None = None) -> Measurement:
    """Rates alone: each model stage in its own pool of one-GPU actors (filter on a CPU), decode/pack as tasks."""
    pools = []
    for s in rates:
        if s in CPU_TASK_STAGES:
            pools.append(Pool(s, (s,), 0.0, 1.0, tasks=True))
        else:
            pools.append(Pool(s, (s,), 0.0 if s in CPU_ONLY_STAGES else 1.0, 1.0))
    return Measurement(rates=dict(rates), pools=tuple(pools), objects_per_image=objects_per_image,
                       source="--rates (one 1-GPU actor pool per stage)", overridden=tuple(rates))


# ---------------------------------------------------------------------------------------------------
# Writing a record (``datagen.run`` calls these at the end of a run that processed inputs).


def run_record(summary, cfg) -> dict:
    """The measurements of one run (a ``datagen.run.Summary``) under its resolved ``DatagenConfig``.

    ``stages``: per stage the rows it processed and its busy seconds summed over its workers, so
    rows / busy_seconds is the images/s of one worker (an actor of its pool, or a CPU task) while busy.
    A stage that keeps tallies of its own (``counts``: the segment stage's objects that arrived masked and
    those it segmented) has them there too.
    ``pools`` and ``cpu_tasks`` give each worker's GPUs and CPUs from the resolved configuration, and
    ``objects_per_image`` the objects kept per ok sample (describe and score work per object).
    A pool's ``engine`` says how it ran: ``"actors"`` (an actor pool of its stages' models, measured
    in ``stages``) or ``"vllm"`` (a ray.data.llm processor of ``actors`` .. ``max_actors`` engine
    replicas, with its ``vllm`` settings; vLLM reports no busy time, so its stages are not in ``stages``).
    """
    pool_of = {stage: name for name, pool in cfg.pools.items() for stage in pool.stages}
    stages = {}
    for stage, (rows, seconds) in summary.busy.items():
        stages[stage] = {
            "rows": int(rows),
            "busy_seconds": round(float(seconds), 6),
            "images_per_busy_second": round(rows / seconds, 6) if seconds > 0 else None,
            "pool": pool_of.get(stage),
            "batch_size": cfg.batch_size(stage) if stage in cfg.stages else cfg.execution.chunk_size,
        }
        if stage in summary.counts:  # the stage's own tallies, e.g. segment: objects that arrived masked
            stages[stage]["counts"] = dict(summary.counts[stage])
    ex = cfg.execution
    ok = summary.statuses.get(STATUS_OK, 0)
    models = {}
    for name in cfg.stage_names:
        spec = getattr(cfg.stages[name], "model", None)
        if spec is not None:
            models[name] = {"name": spec.name, "backend": spec.backend, "weights": spec.weights,
                            "revision": spec.revision, "dtype": spec.dtype}
    return {
        "kind": RUN_RECORD_KIND,
        "version": RUN_RECORD_VERSION,
        "started": summary.started,
        "output": summary.output,
        "inputs": summary.inputs,
        "processed": summary.processed,
        "statuses": dict(summary.statuses),
        "objects": summary.objects,
        "objects_per_image": round(summary.objects / ok, 6) if ok else None,
        "wall_seconds": round(summary.wall_seconds, 6),
        "startup_seconds": None if summary.startup_seconds is None else round(summary.startup_seconds, 6),
        "startup_rows": summary.startup_rows,
        "nodes": summary.nodes,
        "cluster_resources": summary.resources,
        "shards": {"total": summary.shards_total, "skipped": summary.shards_skipped,
                   "written": summary.shards_written},
        "stages": stages,
        "pools": {name: _pool_record(cfg, p) for name, p in cfg.pools.items()},
        "cpu_tasks": {"decode": {"tasks": ex.decode_tasks, "num_cpus": ex.decode_cpus},
                      "pack": {"tasks": ex.pack_tasks, "num_cpus": ex.pack_cpus}},
        "models": models,
        "failures": [{"stage": stage, "reason": reason, "count": n}
                     for (stage, reason), n in sorted(summary.failures.items(), key=lambda kv: (-kv[1], kv[0]))],
    }


def _pool_record(cfg, pool) -> dict:
    out = {"stages": list(pool.stages), "num_gpus": pool.num_gpus, "num_cpus": pool.num_cpus,
           "actors": pool.actors, "max_actors": pool.max_actors}
    if not cfg.runs_on_vllm(pool):
        return {**out, "engine": "actors"}
    v = cfg.vlm.vllm
    return {**out, "engine": "vllm", "vllm": {"gpus_per_replica": v.gpus_per_replica, "batch_size": v.batch_size,
                                              "max_concurrent_batches": v.max_concurrent_batches,
                                              "cpu_stage_cpus": v.cpu_stage_cpus}}


def save_run_record(output: str | DatasetHandle, record: dict) -> str:
    """Write ``record`` to ``<output>/runs/<UTC time>.json`` (atomically); returns its path or URL."""
    dataset = as_handle(output)
    dataset.fs.makedirs(dataset.path(RUNS_DIR), exist_ok=True)
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"  # sorts by time
    write_atomic(dataset.fs, dataset.path(RUNS_DIR, f"{stamp}.json"), dump_json(record))
    return dataset.url(RUNS_DIR, f"{stamp}.json")

"""``python -m datagen size``: the GPUs, CPUs and nodes a target needs, from measured per-stage rates.

    python -m datagen size --from out/ --images 3300000 --hours 24 [--gpus-per-node 8] [--headroom 0.15]
    python -m datagen size --config configs/datagen/real.yaml --rates tag=8,caption=5,... --images 3300000
    python -m datagen size ... --json                      # the same plan as one JSON object

The method. Every run that processed inputs saves ``<output>/runs/<UTC time>.json`` (datagen.measurement):
per stage the rows it processed and its busy seconds summed over its workers, and each worker's
resources from the resolved configuration. ``rate = rows / busy seconds`` is the images/s of one
worker of that stage while it works: an actor of its pool holding the pool's ``num_gpus`` (a fraction
packs several actors on one GPU), or a CPU task (decode, pack). For a target of T images/s:

- an actor runs its pool's stages one after the other, so one actor of a pool does
  ``1 / sum(1 / rate)`` images/s and the pool needs ``ceil(T / that)`` actors;
- a stage costs ``num_gpus / rate`` GPU-seconds per image; the stage with the largest cost is the
  bottleneck, the one worth a bigger batch, a smaller model or vLLM first;
- describe and score work per object: with ``--objects-per-image`` their rates scale by
  measured / target objects per image;
- actors holding a fraction of a GPU are packed onto whole GPUs (first-fit decreasing, across pools,
  as Ray packs fractional requests), and GPUs onto nodes of ``--gpus-per-node``.

Busy time leaves out start-up (model loads), waiting and transfers: the plan prints the pilot's
end-to-end rate beside the rate its workers' busy time allows, and ``--headroom`` adds a margin.

VLM pools on vLLM (``vlm.engine: vllm``; the record's ``pools.<name>.engine`` is ``"vllm"``) report no
busy time: ray.data.llm runs them. Their stages have no measured rate, and ``size`` refuses to size
them until ``--rates`` gives one per engine replica (the error names the pools and stages, and a
lower bound from the pilot's own end-to-end rate). A worker of such a pool is one engine replica
of ``num_gpus`` GPUs; it reserves one CPU per GPU (the replica's actor, or its placement group's
bundles); the processor's CPU-side stages (``vlm.vllm.cpu_stage_cpus`` each, as many as Ray Data
starts) are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .measurement import (
    Measurement,
    SizingError,
)
from .packing import pack

PER_OBJECT_STAGES = ("describe", "score")  # their work is one crop per object
_EPS = 1e-9


@dataclass(frozen=True)
class StagePlan:
    stage: str
    pool: str
    rate: float  # images/s of one worker while busy (scaled to the target objects per image)
    gpus_per_worker: float
    gpu_seconds_per_image: float
    cpu_seconds_per_image: float
    gpus: float  # GPUs this stage alone keeps busy at the target (not rounded)
    share: float  # of the plan's scarce resource (GPU-seconds, or CPU-seconds without GPUs) per image


@dataclass(frozen=True)
class PoolPlan:
    name: str
    kind: str
    stages: tuple[str, ...]
    rate: float  # images/s of one worker (its stages in sequence)
    workers: int
    num_gpus: float
    num_cpus: float  # per worker, as the configuration sets it
    gpus: float  # workers * num_gpus
    cpus: float  # workers * CPUs a worker needs
    load: float  # target / (workers * rate): how busy the workers are at the target


@dataclass(frozen=True)
class Plan:
    """What a target needs: per stage, per pool, in total, and the configuration values to set."""

    images: int
    hours: float
    headroom: float
    required_rate: float  # images / seconds
    target_rate: float  # required_rate * (1 + headroom): what the pools are sized for
    gpus_per_node: int
    cpus_per_node: int | None
    stages: tuple[StagePlan, ...]
    pools: tuple[PoolPlan, ...]
    gpus: int  # whole GPUs after packing fractional actors
    nodes: int
    cpus: float
    bottleneck: str
    resource: str  # "GPU" or "CPU": what the stage costs and the bottleneck are counted in
    objects_per_image: float | None  # target
    measured_objects_per_image: float | None
    measurement: Measurement

    def config_values(self) -> dict:
        """The configuration to run the target with: pool sizes and GPUs per actor, CPU task counts."""
        pools = {p.name: {"actors": p.workers, "max_actors": p.workers, "num_gpus": p.num_gpus}
                 for p in self.pools if p.kind != "CPU tasks"}
        execution = {f"{p.name}_tasks": p.workers for p in self.pools if p.kind == "CPU tasks"}
        return {"pools": pools, **({"execution": execution} if execution else {})}

    def set_flags(self) -> list[str]:
        """The same values as ``--set key=value`` arguments of ``python -m datagen run``."""
        flags = []
        for section, values in self.config_values().items():
            for name, value in values.items():
                if isinstance(value, dict):
                    flags += [f"--set {section}.{name}.{k}={_num(v)}" for k, v in value.items()]
                else:
                    flags.append(f"--set {section}.{name}={_num(value)}")
        return flags

    def to_json(self) -> dict:
        """The plan as JSON-ready data (an infinite rate, a negligible stage, is written as null)."""
        m = self.measurement
        return _finite({
            "images": self.images, "hours": self.hours, "headroom": self.headroom,
            "required_images_per_second": self.required_rate, "target_images_per_second": self.target_rate,
            "gpus": self.gpus, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
            "cpus": self.cpus, "cpus_per_node": self.cpus_per_node, "bottleneck": self.bottleneck,
            "resource": self.resource, "objects_per_image": self.objects_per_image,
            "measured_objects_per_image": self.measured_objects_per_image,
            "stages": [asdict(s) for s in self.stages], "pools": [asdict(p) for p in self.pools],
            "config": self.config_values(), "set_flags": self.set_flags(),
            "source": {"from": m.source, "processed": m.processed, "wall_seconds": m.wall_seconds,
                       "nodes": m.nodes, "models": m.models, "rates_given": list(m.overridden)},
        })

    def format(self) -> str:
        """The plan as readable tables."""
        m = self.measurement
        lines = [f"datagen size: {self.images:,} images in {self.hours:g} h = {self.required_rate:.2f} images/s"
                 + (f"; with {self.headroom:.0%} headroom {self.target_rate:.2f} images/s" if self.headroom else "")]
        if m.processed:  # a run record
            lines.append(f"rates from {m.source}" + (f" (--rates for {', '.join(m.overridden)})" if m.overridden else ""))
        elif m.source.startswith("--rates"):
            lines.append(f"rates from {m.source}")
        else:  # a config's pools
            lines.append(f"pools from {m.source}; rates from --rates (measured elsewhere, or assumed)")
        if m.processed:
            lines.append(f"  pilot: {m.processed} images in {m.wall_seconds:.1f} s wall on {m.nodes} node(s) = "
                         f"{m.processed / m.wall_seconds if m.wall_seconds else 0:.2f} images/s end to end "
                         "(start-up included)")
            if m.startup_seconds is not None and m.wall_seconds > m.startup_seconds > 0:
                steady = (m.processed - m.startup_rows) / (m.wall_seconds - m.startup_seconds)
                lines.append(f"  after its start-up ({m.startup_seconds:.1f} s until the first chunk): "
                             f"{steady:.2f} images/s")
            capacity = _pilot_capacity(m)
            if capacity is not None:
                unmeasured = [p.name for p in m.pools if p.vllm]
                whose = (f"its actor pools' busy time (vLLM pools {', '.join(unmeasured)} unmeasured)"
                         if unmeasured else "its workers' busy time")
                lines.append(f"  {whose} allows {capacity:.2f} images/s: end to end is "
                             f"{m.processed / m.wall_seconds / capacity if m.wall_seconds else 0:.0%} of that")
        if m.models:
            names = sorted(set(m.models.values()))
            lines.append("  models: " + ", ".join(names))
            if all("(tiny)" in n for n in names):
                lines.append("  (tiny random-weight models: these rates show the method, not real-model throughput)")
        if self.measured_objects_per_image is not None or self.objects_per_image is not None:
            scaled = (self.objects_per_image is not None and self.measured_objects_per_image is not None
                      and self.objects_per_image != self.measured_objects_per_image)
            lines.append(f"objects per image: {_opt(self.measured_objects_per_image)} where the rates were measured"
                         + (f", {self.objects_per_image:g} target ({'/'.join(PER_OBJECT_STAGES)} rates scaled)"
                            if scaled else ""))
        r = self.resource
        lines += ["", f"{'stage':<10}{'pool':<10}{'img/s/worker':>14}{'GPUs/worker':>13}{r + '-s/img':>11}"
                      f"{r + 's':>9}{'share':>7}"]
        for s in self.stages:
            cost = s.gpu_seconds_per_image if r == "GPU" else s.cpu_seconds_per_image
            lines.append(f"{s.stage:<10}{s.pool:<10}{_rate(s.rate):>14}{_gpus(s.gpus_per_worker):>13}"
                         f"{_cost(cost):>11}{_gpus(cost * self.target_rate, 2):>9}{s.share:>7.0%}")
        lines += ["", f"{'pool':<10}{'runs as':<12}{'workers':>8}{'img/s/worker':>14}{'GPUs/worker':>13}"
                      f"{'CPUs/worker':>13}{'GPUs':>7}{'CPUs':>7}{'load':>6}  stages"]
        for p in self.pools:
            cpw = p.cpus / p.workers if p.workers else p.num_cpus
            lines.append(f"{p.name:<10}{p.kind:<12}{p.workers:>8}{_rate(p.rate):>14}{_gpus(p.num_gpus):>13}"
                         f"{cpw:>13g}{_gpus(p.gpus):>7}{p.cpus:>7g}{p.load:>6.0%}  {', '.join(p.stages)}")
        vllm_pools = [p for p in self.pools if p.kind == "vLLM engines"]
        if vllm_pools:
            given = [s for p in vllm_pools for s in p.stages if s in m.overridden]
            lines.append(f"vLLM pools ({', '.join(p.name for p in vllm_pools)}): workers are engine replicas; rates "
                         + (f"from --rates ({', '.join(given)}), " if given else "")
                         + "not measured (vLLM reports no busy time); CPUs: one per GPU for the engines, not "
                         "counting the processors' CPU-side stages (vlm.vllm.cpu_stage_cpus each)")
        per_node = f" ({math.ceil(self.cpus / self.nodes - _EPS)} per node)" if self.nodes else ""
        if self.gpus:
            total = (f"total: {self.gpus} GPUs on {self.nodes} node(s) of {self.gpus_per_node} GPUs, "
                     f"{self.cpus:g} CPUs{per_node}")
        else:
            total = f"total: no GPUs, {self.cpus:g} CPUs" + (
                f" on {self.nodes} node(s) of {self.cpus_per_node} CPUs" if self.cpus_per_node else "")
        lines += ["", total]
        b = next(s for s in self.stages if s.stage == self.bottleneck)
        lines.append(f"bottleneck: {b.stage} ({b.share:.0%} of the {r}-seconds per image, "
                     f"{_rate(b.rate)} images/s per worker)")
        lines += ["", "config values (in the YAML, or as --set arguments of python -m datagen run):"]
        for section, values in self.config_values().items():
            for name, value in values.items():
                if isinstance(value, dict):
                    inner = ", ".join(f"{k}: {_num(v)}" for k, v in value.items())
                    lines.append(f"  {section}.{name}: {{{inner}}}")
                else:
                    lines.append(f"  {section}.{name}: {_num(value)}")
        lines.append("  " + " ".join(self.set_flags()))
        return "\n".join(lines)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _num(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _opt(v: float | None) -> str:
    return "unknown" if v is None else f"{v:.2f}"


def _cost(v: float) -> str:
    return "-" if v == 0 else f"{v:.4f}"


def _rate(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}"


def _gpus(v: float, digits: int = 3) -> str:
    return "-" if v == 0 else f"{round(v, digits):g}"


def _pilot_capacity(m: Measurement) -> float | None:
    """The images/s the measured run's own workers allow by busy time: its slowest pool (vLLM pools,
    which have no busy time, left out)."""
    caps = []
    for p in m.pools:
        if p.vllm:
            continue
        if p.workers is None or any(s not in m.rates for s in p.stages):
            return None
        caps.append(p.workers * _pool_rate([m.rates[s] for s in p.stages]))
    return min(caps) if caps else None


def _pool_rate(rates: Sequence[float]) -> float:
    """Images/s of one worker that runs stages of these rates one after the other."""
    seconds = sum(1.0 / r for r in rates)
    return math.inf if seconds == 0 else 1.0 / seconds


def _ceil(x: float) -> int:
    return max(1, math.ceil(x - _EPS))


# ---------------------------------------------------------------------------------------------------
# The plan.


def _pilot_rate(m: Measurement) -> float | None:
    """The measured run's end-to-end images/s, after its start-up when known (else with it)."""
    if not (m.processed and m.wall_seconds > 0):
        return None
    if m.startup_seconds is not None and m.wall_seconds > m.startup_seconds > 0 and m.processed > m.startup_rows:
        return (m.processed - m.startup_rows) / (m.wall_seconds - m.startup_seconds)
    return m.processed / m.wall_seconds


def _require_vllm_rates(m: Measurement) -> None:
    """Refuse to size a vLLM pool without a rate for each of its stages: vLLM reports no busy time,
    and a guess would size it silently wrong. The message names the pools, their stages, and a
    lower bound from the pilot's end-to-end rate (the pool did at least that much per replica)."""
    pools = [p for p in m.pools if p.vllm and any(s not in m.rates for s in p.stages)]
    if not pools:
        return
    missing = [s for p in pools for s in p.stages if s not in m.rates]
    names = "; ".join(f"pool {p.name!r} (stages {', '.join(p.stages)})" for p in pools)
    lines = [f"{m.source}: {names} ran on vLLM, which reports no busy time, so there is no measured rate "
             f"for {', '.join(missing)}. Give one per vLLM engine replica with --rates "
             f"{','.join(f'{s}=IMAGES_PER_S' for s in missing)} (images/s of one replica; for a pool measured "
             "as a whole give its rate to one stage and inf to the others)"]
    pilot = _pilot_rate(m)
    for p in pools:
        if pilot is None or not p.workers:
            continue
        bound = pilot / p.workers
        flags = ",".join(f"{s}={bound:.3g}" if k == 0 else f"{s}=inf" for k, s in enumerate(p.stages))
        lines.append(f"  a lower bound from this pilot for pool {p.name!r}: {pilot:.3g} images/s end to end over "
                     f"its {p.workers} replica(s) = {bound:.3g} images/s per replica (--rates {flags}); "
                     "it is the pool's rate only if the pool was the pilot's bottleneck, otherwise it over-sizes")
    others = [s for p in m.pools if not p.vllm for s in p.stages if s not in m.rates]
    if others:
        lines.append(f"  (no rate either for {', '.join(others)}: give them with --rates too)")
    raise SizingError("\n".join(lines))


def size(
    m: Measurement,
    images: int,
    hours: float,
    gpus_per_node: int = 8,
    headroom: float = 0.0,
    objects_per_image: float | None = None,
    cpus_per_node: int | None = None,
) -> Plan:
    """Size every pool of ``m`` to process ``images`` in ``hours`` (plus ``headroom``, a fraction)."""
    if images < 1:
        raise SizingError(f"--images must be >= 1, got {images}")
    if not hours > 0:
        raise SizingError(f"--hours must be > 0, got {hours}")
    if headroom < 0:
        raise SizingError(f"--headroom must be >= 0 (a fraction: 0.15 for 15%), got {headroom}")
    if cpus_per_node is not None and cpus_per_node < 1:
        raise SizingError(f"--cpus-per-node must be >= 1, got {cpus_per_node}")
    if not m.pools:
        raise SizingError(f"{m.source}: no pools to size")
    _require_vllm_rates(m)
    missing = [s for p in m.pools for s in p.stages if s not in m.rates]
    if missing:
        raise SizingError(f"{m.source}: no rate for stage(s) {missing}; give them with --rates "
                          f"{','.join(f'{s}=IMAGES_PER_S' for s in missing)} (a negligible stage: {missing[0]}=inf)")
    bad = {s: r for s, r in m.rates.items() if not r > 0}
    if bad:
        raise SizingError(f"{m.source}: rates must be > 0 images/s, got {bad}")
    opi_m = m.objects_per_image
    scale = 1.0
    if objects_per_image is not None:
        if objects_per_image <= 0:
            raise SizingError(f"--objects-per-image must be > 0, got {objects_per_image}")
        if opi_m is None:
            raise SizingError(f"{m.source}: the measured objects per image is unknown, so the per-object stages "
                              f"{list(PER_OBJECT_STAGES)} cannot be scaled; add --measured-objects-per-image")
        if opi_m <= 0:
            raise SizingError(f"{m.source}: measured objects per image is {opi_m}: no per-object work was measured")
        scale = opi_m / objects_per_image

    required = images / (hours * 3600.0)
    target = required * (1.0 + headroom)
    rates = {s: (r * scale if s in PER_OBJECT_STAGES else r) for s, r in m.rates.items()}

    pool_plans, stage_rows = [], []
    for p in m.pools:
        rate = _pool_rate([rates[s] for s in p.stages])
        workers = 1 if math.isinf(rate) else _ceil(target / rate)
        pool_plans.append(PoolPlan(
            name=p.name, kind=p.kind, stages=p.stages, rate=rate, workers=workers, num_gpus=p.num_gpus,
            num_cpus=p.num_cpus, gpus=workers * p.num_gpus, cpus=workers * p.cpus_per_worker,
            load=0.0 if math.isinf(rate) else target / (workers * rate)))
        for s in p.stages:
            stage_rows.append((s, p, rates[s]))
    gpu_cost = {s: p.num_gpus / r for s, p, r in stage_rows}
    cpu_cost = {s: p.cpus_per_worker / r for s, p, r in stage_rows}
    resource = "GPU" if any(v > 0 for v in gpu_cost.values()) else "CPU"
    cost = gpu_cost if resource == "GPU" else cpu_cost
    total = sum(cost.values())
    stage_plans = tuple(
        StagePlan(stage=s, pool=p.name, rate=r, gpus_per_worker=p.num_gpus, gpu_seconds_per_image=gpu_cost[s],
                  cpu_seconds_per_image=cpu_cost[s], gpus=target * gpu_cost[s],
                  share=cost[s] / total if total else 0.0)
        for s, p, r in stage_rows)
    gpus, nodes = pack([(p.num_gpus, p.workers) for p in pool_plans if p.num_gpus > 0], gpus_per_node)
    cpus = sum(p.cpus for p in pool_plans)
    if cpus_per_node is not None:
        nodes = max(nodes, math.ceil(cpus / cpus_per_node - _EPS))
    bottleneck = max(stage_plans, key=lambda s: cost[s.stage]).stage
    return Plan(images=images, hours=hours, headroom=headroom, required_rate=required, target_rate=target,
                gpus_per_node=gpus_per_node, cpus_per_node=cpus_per_node, stages=stage_plans,
                pools=tuple(pool_plans), gpus=gpus, nodes=nodes, cpus=cpus, bottleneck=bottleneck,
                resource=resource, objects_per_image=objects_per_image if objects_per_image is not None else opi_m,
                measured_objects_per_image=opi_m, measurement=m)

"""Before any work: can some node of the Ray cluster hold each worker the run asks for?

Ray queues a request that no node can hold and waits for an autoscaler to add such a node, logging
"No available node types can fulfill resource request" every few seconds: on a fixed cluster, or a
machine without GPUs, a GPU preset would wait forever. ``check_resources`` compares what each stage
asks per worker (an actor of a pool, an engine replica of a vLLM pool, a decode/pack/seal task) with
the resources of the cluster's alive nodes (``ray.nodes()``) and refuses at once with one message
naming the stages, their requests and what the nodes have. ``python -m datagen run
--wait-for-resources`` (``execution.wait_for_resources``) logs the same and waits instead, for an
autoscaling cluster that adds nodes.

A worker runs on one node, so its request must fit on one node. A vLLM engine replica of several
GPUs is a placement group of one bundle per GPU (ray.data.llm's default, strategy PACK, which may
spread a replica over nodes), so it fits when the nodes together hold that many bundles. Only whether
each worker can ever be placed is checked; how many workers the cluster holds at once is sizing's
question (``python -m datagen size``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import DatagenConfig

log = logging.getLogger(__name__)

GIB = 2**30
ACCELERATOR = "accelerator_type:"  # Ray's resource prefix for a node's GPU model
_EPS = 1e-9  # Ray counts resources in units of 1e-4: a float sum may miss a boundary by rounding


class ResourceError(ValueError):
    """No node of the Ray cluster can hold a worker the run asks for."""


@dataclass(frozen=True)
class Request:
    """What one worker of a stage asks for, in Ray's resource names (``memory`` in bytes)."""

    stage: str  # who asks, as the config names it: "pool 'vlm' (stages tag, caption)", "decode", ...
    unit: str  # "actor", "task", "engine replica"
    bundle: Mapping[str, float]  # one worker's resources, or one bundle of a replica
    bundles: int = 1  # a vLLM replica: this many bundles, which may be spread over nodes


def _resources(remote_args: Mapping) -> dict[str, float]:
    """Ray's ``num_cpus``/``num_gpus``/``memory``/``accelerator_type`` arguments as resource names."""
    out = {"CPU": remote_args.get("num_cpus"), "GPU": remote_args.get("num_gpus"), "memory": remote_args.get("memory")}
    if remote_args.get("accelerator_type"):
        out[ACCELERATOR + remote_args["accelerator_type"]] = 0.001  # how Ray itself expresses it
    return {k: float(v) for k, v in out.items() if v}


def requests(cfg: DatagenConfig) -> list[Request]:
    """Every kind of worker a run of ``cfg`` starts, with its per-worker request, in pipeline order."""
    from .pipeline import pool_remote_args

    ex = cfg.execution
    out = [Request("decode", "task", _resources({"num_cpus": ex.decode_cpus}))]
    v = cfg.vlm.vllm
    for name, pool in cfg.pools.items():
        stage = f"pool {name!r} (stages {', '.join(pool.stages)})"
        if cfg.runs_on_vllm(pool):
            # ray.data.llm's engine bundle: one GPU and one CPU per GPU of the replica
            bundle = _resources({"num_cpus": 1, "num_gpus": 1, "accelerator_type": v.accelerator_type})
            out.append(Request(stage, "engine replica", bundle, bundles=v.gpus_per_replica))
            out.append(Request(f"{stage} CPU-side stages", "task", _resources({"num_cpus": v.cpu_stage_cpus})))
        else:
            out.append(Request(stage, "actor", _resources(pool_remote_args(pool))))
    out.append(Request("pack", "task", _resources({"num_cpus": ex.pack_cpus})))
    out.append(Request("write", "task", _resources({"num_cpus": ex.write_cpus})))
    return out


def _fits(bundle: Mapping[str, float], node: Mapping[str, float]) -> int:
    """How many ``bundle``s one node holds (a large number when the bundle asks for nothing)."""
    counts = [math.floor(node.get(k, 0.0) / v + _EPS) for k, v in bundle.items() if v > 0]
    return min(counts, default=1 << 30)


def unmet(reqs: Sequence[Request], nodes: Sequence[Mapping[str, float]]) -> list[Request]:
    """The requests no node (for a multi-bundle replica: no set of nodes) of ``nodes`` can hold;
    ``nodes`` are the alive nodes' total resources, as ``ray.nodes()`` gives them."""
    return [r for r in reqs if sum(min(_fits(r.bundle, n), r.bundles) for n in nodes) < r.bundles]


def _amount(key: str, value: float) -> str:
    if key == "memory":
        return f"{value / GIB:.3g} GiB memory"
    if key.startswith(ACCELERATOR):
        return f"a {key[len(ACCELERATOR):]} GPU" if value > 0 else f"no {key[len(ACCELERATOR):]} GPU"
    return f"{value:g} {key}"


def message(missing: Sequence[Request], nodes: Sequence[Mapping[str, float]]) -> str:
    """One line: each unmet request, then the most the nodes have of what those requests ask."""
    asked = []
    for r in missing:
        what = ", ".join(_amount(k, v) for k, v in r.bundle.items())
        per = f"per {r.unit}" if r.bundles == 1 else f"in each of the {r.bundles} GPU bundles of an {r.unit}"
        asked.append(f"{r.stage} asks for {what} {per}")
    keys = list(dict.fromkeys(k for r in missing for k in r.bundle))
    have = ", ".join(_amount(k, max((n.get(k, 0.0) for n in nodes), default=0.0)) for k in keys)
    return (f"the Ray cluster cannot hold what this run asks for: {'; '.join(asked)}; but its {len(nodes)} node(s) "
            f"have at most {have}. Run on a cluster with such nodes, change the pools' num_gpus / num_cpus / "
            "memory_gb or the execution's *_cpus (python -m datagen plan prints them), or pass "
            "--wait-for-resources if an autoscaler adds such nodes")


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def check_resources(cfg: DatagenConfig) -> None:
    """Raise ``ResourceError`` when a worker of ``cfg`` fits on no node of the connected cluster; with
    ``execution.wait_for_resources`` log it and return (the run waits for the cluster to add nodes).
    Ray must be initialised."""
    nodes = cluster_nodes()
    missing = unmet(requests(cfg), nodes)
    if not missing:
        return
    text = message(missing, nodes)
    if not cfg.execution.wait_for_resources:
        raise ResourceError(text)
    log.warning("%s -- waiting for such nodes (--wait-for-resources)", text.split(". Run on", 1)[0])

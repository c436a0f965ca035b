"""``python -m datagen run|plan|size``: raw images -> shards, resumable, with an end-of-run summary.

    python -m datagen run  --config configs/datagen/tiny.yaml --input images/ --output out/
    python -m datagen run  ... --retry-failed      # redo the rows recorded as failed in parquet
    python -m datagen run  ... --new-run           # the config changed: discard the old shards
    python -m datagen plan --config configs/datagen/real.yaml [--input ... --output ...]
    python -m datagen size --from out/ --images 3300000 --hours 24   # GPUs for a target (datagen.sizing)

Each run that processed inputs saves its measurements (per-stage rows and busy seconds, the pools'
GPUs and CPUs per actor and engine, objects per image, wall time, nodes) to
``<output>/runs/<UTC time>.json``: ``python -m datagen size`` sizes a cluster from them. Stages on
vLLM (``vlm.engine: vllm``) report no busy time; ``size`` asks for their rates (``--rates``).

Ray: an embedded local Ray by default; with ``RAY_ADDRESS`` set (or under ``ray job submit``) the run
goes to that cluster. Resume is at shard granularity: a shard whose stats file exists is complete
and skipped, any other shard is redone whole.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import logging
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd
import yaml

from shards import RunMismatchError, build_index, list_shards, open_run
from shards.paths import dump_json, fs_and_root, join, url_for, write_atomic

from . import sizing
from .config import ConfigError, DatagenConfig, fingerprint_dict, load_config, to_dict
from .inputs import InputError, InputItem, assign_shards, inputs_digest, list_inputs
from .measurement import RUN_RECORD_KIND, RUNS_DIR

log = logging.getLogger(__name__)

RUN_RECORD_VERSION = 1  # <output>/RUNS_DIR/<UTC time>.json: one record per run that processed inputs
CPU_TASK_STAGES = ("decode", "pack")  # the stages that run as plain CPU tasks, outside the actor pools

PACKAGES = ("richlayout", "ray", "torch", "torchvision", "transformers", "open_clip_torch", "segment-anything",
            "pillow", "numpy", "pyarrow", "pandas", "webdataset", "vllm")  # recorded when installed


@dataclass
class Summary:
    """The end-of-run report."""

    output: str
    inputs: int = 0
    shards_total: int = 0
    shards_skipped: int = 0  # complete before this run
    shards_written: int = 0
    processed: int = 0
    totals: dict = field(default_factory=dict)  # dataset-wide samples/failures/filtered/objects (index.json)
    failures: Counter = field(default_factory=Counter)  # (stage, reason) -> count, this run
    busy: dict = field(default_factory=dict)  # stage -> (rows, seconds), this run
    wall_seconds: float = 0.0
    nodes: int = 0  # Ray nodes that decoded or ran model stages this run
    statuses: Counter = field(default_factory=Counter)  # ok/failed/filtered -> count, this run
    objects: int = 0  # objects kept in this run's ok samples
    startup_seconds: float | None = None  # until the first chunk came out (actor start-up, model loads)
    startup_rows: int = 0  # the rows of that first chunk
    started: str = ""  # UTC time the run started
    resources: dict = field(default_factory=dict)  # ray.cluster_resources() during the run
    record: str | None = None  # where this run's measurements were saved (<output>/runs/<time>.json)
    vllm_stages: tuple[str, ...] = ()  # stages run on vLLM: no busy time of their own

    def format(self) -> str:
        """A readable table."""
        t = self.totals
        rate = self.processed / self.wall_seconds if self.wall_seconds else 0.0
        lines = [
            f"datagen summary for {self.output}",
            f"  inputs     {self.inputs:>8}   shards {self.shards_total} ({self.shards_skipped} already complete, "
            f"{self.shards_written} written now)",
            f"  samples    {t.get('samples', 0):>8}   objects {t.get('objects', 0)}",
            f"  failed     {t.get('failures', 0):>8}   filtered {t.get('filtered', 0)}",
            f"  this run   {self.processed:>8} inputs in {self.wall_seconds:.1f} s = {rate:.2f} images/s"
            + (f" on {self.nodes} Ray node(s)" if self.nodes else ""),
        ]
        if self.failures:
            lines.append("  not kept this run, by stage and reason:")
            for (stage, reason), n in sorted(self.failures.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"    {n:>6}  {stage:<9} {reason}")
        if self.busy:
            lines.append(f"  {'stage':<10}{'rows':>8}{'busy s':>10}{'img/s/worker':>14}{'busy/wall':>11}")
            for stage, (rows, seconds) in self.busy.items():
                per = rows / seconds if seconds > 0 else float("inf")
                frac = seconds / self.wall_seconds if self.wall_seconds else 0.0
                lines.append(f"  {stage:<10}{rows:>8}{seconds:>10.2f}{per:>14.2f}{frac:>11.2f}")
        if self.vllm_stages:
            lines.append(f"  {', '.join(self.vllm_stages)}: on vLLM, no busy time measured (Ray dashboard, Data view); "
                         "python -m datagen size needs their rates with --rates")
        if self.record:
            lines.append(f"  measurements saved to {self.record}")
            lines.append(f"  size a cluster from them: python -m datagen size --from {self.output} --images N --hours H")
        return "\n".join(lines)


def run_record(summary: Summary, cfg: DatagenConfig) -> dict:
    """The measurements of one run, as saved to ``<output>/runs/<time>.json`` (read by datagen.sizing).

    ``stages``: per stage the rows it processed and its busy seconds summed over its workers, so
    rows / busy_seconds is the images/s of one worker (an actor of its pool, or a CPU task) while busy.
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
    ex = cfg.execution
    ok = summary.statuses.get("ok", 0)
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


def _pool_record(cfg: DatagenConfig, pool) -> dict:
    out = {"stages": list(pool.stages), "num_gpus": pool.num_gpus, "num_cpus": pool.num_cpus,
           "actors": pool.actors, "max_actors": pool.max_actors}
    if not cfg.runs_on_vllm(pool):
        return {**out, "engine": "actors"}
    v = cfg.vlm.vllm
    return {**out, "engine": "vllm", "vllm": {"gpus_per_replica": v.gpus_per_replica, "batch_size": v.batch_size,
                                              "max_concurrent_batches": v.max_concurrent_batches,
                                              "cpu_stage_cpus": v.cpu_stage_cpus}}


def save_run_record(output: str, record: dict) -> str:
    """Write ``record`` to ``<output>/runs/<UTC time>.json`` (atomically); returns its path or URL."""
    fs, root = fs_and_root(output)
    folder = join(root, RUNS_DIR)
    fs.makedirs(folder, exist_ok=True)
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"  # sorts by time
    path = join(folder, f"{stamp}.json")
    write_atomic(fs, path, dump_json(record))
    return url_for(fs, path)


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _failed_keys(parquet_url: str) -> list[str]:
    fs, path = fs_and_root(parquet_url)
    with fs.open(path, "rb") as f:
        df = pd.read_parquet(io.BytesIO(f.read()), columns=["key", "status"])
    return sorted(df.key[df.status == "failed"].tolist())


def plan_jobs(items: list[InputItem], cfg: DatagenConfig, output: str, retry_failed: bool = False):
    """``(jobs, skipped)``: the shards to (re)write and how many complete shards are left as they are."""
    from .pipeline import ShardJob

    fs, root = fs_and_root(output)
    existing = {s.id: s for s in list_shards(output)} if fs.exists(root) else {}
    jobs, skipped = [], 0
    for shard_id, start, stop in assign_shards(len(items), cfg.inputs.samples_per_shard):
        shard_items = tuple(items[start:stop])
        info = existing.get(shard_id)
        if info is None or not info.complete:
            jobs.append(ShardJob(shard_id, shard_items))
            continue
        failed = set(_failed_keys(info.parquet)) if retry_failed else set()
        if failed:
            jobs.append(ShardJob(shard_id, tuple(it for it in shard_items if it.key in failed), keep_existing=True))
        else:
            skipped += 1
    return jobs, skipped


def run(
    cfg: DatagenConfig,
    inputs: list[str],
    output: str,
    new_run: bool = False,
    retry_failed: bool = False,
    progress: bool | None = None,
) -> Summary:
    """List the inputs, check/create run.json, process the shards not complete, rebuild the index."""
    from . import pipeline

    items = list_inputs(inputs, cfg.inputs.path_column, cfg.inputs.caption_column)
    # The keys digest identifies the inputs; how their location was spelled (relative path, trailing
    # slash, another mount) is recorded but does not make a different run.
    described = {"count": len(items), "keys_sha256": inputs_digest(items)}
    extra = {"inputs": list(inputs), "packages": _versions(), "python": platform.python_version(),
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "resolved_config": to_dict(cfg)}
    open_run(output, fingerprint_dict(cfg, described), extra, new_run=new_run)
    jobs, skipped = plan_jobs(items, cfg, output, retry_failed)
    summary = Summary(output=output, inputs=len(items), shards_skipped=skipped,
                      shards_total=len(assign_shards(len(items), cfg.inputs.samples_per_shard)),
                      started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), vllm_stages=cfg.vllm_stages())
    log.info("%d inputs in %d shards: %d complete, %d to write (%d inputs)", len(items), summary.shards_total,
             skipped, len(jobs), sum(len(j.items) for j in jobs))
    if jobs:
        started = pipeline.init_ray(cfg)
        try:
            result = pipeline.execute(jobs, cfg, output, progress=progress)
            summary.resources = _cluster_resources()
        finally:
            if started:
                import ray

                ray.shutdown()
        summary.processed = result.processed
        summary.shards_written = len(result.shards)
        summary.failures = result.failures
        summary.busy = {k: (v.rows, v.seconds) for k, v in result.busy.items()}
        summary.wall_seconds = result.wall_seconds
        summary.nodes = len(result.nodes)
        summary.statuses = result.statuses
        summary.objects = result.objects
        summary.startup_seconds = result.startup_seconds
        summary.startup_rows = result.startup_rows
    summary.totals = build_index(output)["totals"]
    if summary.processed:
        summary.record = save_run_record(output, run_record(summary, cfg))
    return summary


def _cluster_resources() -> dict:
    """The Ray cluster's total resources (CPU, GPU, accelerator type, memory), for the run record."""
    import ray

    try:
        return {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
    except Exception:  # noqa: BLE001 - a record without resources is still a record
        log.debug("no cluster resources", exc_info=True)
        return {}


def plan_text(cfg: DatagenConfig, inputs: list[str] | None = None, output: str | None = None) -> str:
    """The resolved config (YAML) and each stage's resources; with inputs, the shards a run would write."""
    ex = cfg.execution
    lines = ["# resolved configuration", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "",
             "# stages and resources (map_batches in pipeline order)",
             f"{'stage':<10}{'runs as':<26}{'batch':>6}{'cpus':>6}{'gpus':>6}{'workers':>10}  model"]
    lines.append(f"{'decode':<10}{'CPU tasks':<26}{ex.chunk_size:>6}{ex.decode_cpus:>6}{0:>6}{ex.decode_tasks:>10}  -")
    v = cfg.vlm.vllm
    for pool_name, pool in cfg.pools.items():
        workers = f"{pool.actors}" if pool.max_actors is None else f"{pool.actors}-{pool.max_actors}"
        on_vllm = cfg.runs_on_vllm(pool)
        for name in pool.stages:
            spec = getattr(cfg.stages[name], "model", None)
            revision = spec.revision if spec is not None and spec.revision else None
            if on_vllm:  # a ray.data.llm processor: engine replicas fed batches of requests
                source = v.model_source or spec.name
                revision = None if v.model_source else revision
                model = f"{source} (vLLM{', ' + revision if revision else ''})"
                runs_as, batch, cpus = "vLLM processor " + repr(pool_name), v.batch_size, v.cpu_stage_cpus
            else:
                model = "-" if spec is None else f"{spec.name} ({spec.backend}{', ' + revision if revision else ''})"
                runs_as, batch, cpus = "actor pool " + repr(pool_name), cfg.batch_size(name), pool.num_cpus
            lines.append(f"{name:<10}{runs_as:<26}{batch:>6}{cpus:>6}{pool.num_gpus:>6}{workers:>10}  {model}")
    lines.append(f"{'pack':<10}{'CPU tasks':<26}{ex.chunk_size:>6}{ex.pack_cpus:>6}{0:>6}{ex.pack_tasks:>10}  -")
    lines.append(f"{'write':<10}{'one Ray task per shard':<26}{cfg.inputs.samples_per_shard:>6}{ex.write_cpus:>6}"
                 f"{0:>6}{'-':>10}  -")
    gpus = sum(p.num_gpus * (p.max_actors or p.actors) for p in cfg.pools.values())
    lines.append(f"GPUs needed at full pool size: {gpus:g}")
    if cfg.vllm_stages():
        lines.append(f"vLLM processor: workers are engine replicas of {v.gpus_per_replica} GPU(s) "
                     f"(tensor_parallel_size {v.tensor_parallel_size}); batch is vlm.vllm.batch_size requests; "
                     "cpus is vlm.vllm.cpu_stage_cpus per CPU-side worker (request building, chat template, "
                     "tokenize, detokenize, answer parsing, chunk assembly)")
    where = os.environ.get("RAY_ADDRESS")
    lines.append(f"Ray: {'cluster at ' + where if where else 'embedded local Ray (set RAY_ADDRESS for a cluster)'}")
    if inputs:
        items = list_inputs(inputs, cfg.inputs.path_column, cfg.inputs.caption_column)
        n_shards = len(assign_shards(len(items), cfg.inputs.samples_per_shard))
        lines.append(f"inputs: {len(items)} in {n_shards} shards of {cfg.inputs.samples_per_shard}")
        if output is not None:
            jobs, skipped = plan_jobs(items, cfg, output)
            lines.append(f"output {output}: {skipped} shards complete, {len(jobs)} to write")
    return "\n".join(lines)


def _overrides(pairs: list[str]) -> dict:
    """``a.b=value`` pairs (values parsed as YAML) as a nested mapping."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected dotted.key=value")
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datagen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "process inputs into shards"), ("plan", "print the resolved config and resources")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", required=True, help="YAML preset, e.g. configs/datagen/tiny.yaml")
        s.add_argument("--input", action="append", required=name == "run", default=None,
                       help="image folder, img2dataset output, .tar, .parquet/.csv list; local or fsspec URI "
                            "(repeatable; brace and glob patterns allowed)")
        s.add_argument("--output", required=name == "run", help="dataset folder (local path or fsspec URI)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set inputs.samples_per_shard=500")
        s.add_argument("--log-level", default="INFO")
    r = sub.choices["run"]
    r.add_argument("--new-run", action="store_true", help="the config changed: delete existing shards, start over")
    r.add_argument("--retry-failed", action="store_true", help="reprocess the rows recorded as failed in parquet")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (logs every 30 s instead)")
    z = sub.add_parser("size", help="GPUs, CPUs and nodes for a target, from a run's measured per-stage rates",
                       description=sizing.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sizing.add_arguments(z)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 the run stopped, 2 bad config/input/resume)."""
    args = _parser().parse_args(argv)
    if args.command == "size":
        return sizing.main(args)
    from .pipeline import PipelineError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, _overrides(args.set))
        if args.command == "plan":
            print(plan_text(cfg, args.input, args.output))
            return 0
        summary = run(cfg, args.input, args.output, new_run=args.new_run, retry_failed=args.retry_failed,
                      progress=False if args.no_progress else None)
    except (ConfigError, InputError, RunMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which shards a run writes, and ``python -m datagen plan``'s printout.

Resume is at shard granularity: a shard whose stats file exists is complete, unless its files say
otherwise. Before trusting one, its tar's size is compared with the size its stats recorded (cheap);
with ``--verify`` its sha256 too. A shard that fails is redone whole, and the log says which and why.
"""

from __future__ import annotations

import io
import logging
import os

import pandas as pd
import yaml

from shards.dataset import DatasetError, DatasetHandle, ShardInfo, as_handle
from shards.schema import STATUS_FAILED
from shards.validate import shard_problem

from .chunks import ShardJob
from .config import DatagenConfig, to_dict
from .inputs import InputItem, assign_shards, list_inputs

log = logging.getLogger(__name__)


class OutputError(ValueError):
    """``--output`` cannot be a dataset folder (e.g. it names an existing file, or cannot be written)."""


def open_output(output: str, write: bool = True) -> DatasetHandle:
    """The run's one handle on ``--output``, checked before any work: not an existing file and, to
    ``write``, writable (``DatasetHandle.create``). Every later step receives this handle."""
    try:
        return DatasetHandle.create(output) if write else DatasetHandle.open(output).check_folder()
    except DatasetError as e:
        raise OutputError(f"--output {e}") from None


def _failed_keys(dataset: DatasetHandle, shard: ShardInfo) -> list[str]:
    with dataset.fs.open(dataset.shard_path(shard.id, "parquet"), "rb") as f:
        df = pd.read_parquet(io.BytesIO(f.read()), columns=["key", "status"])
    return sorted(df.key[df.status == STATUS_FAILED].tolist())


def plan_jobs(items: list[InputItem], cfg: DatagenConfig, output: str | DatasetHandle, retry_failed: bool = False,
              verify: bool = False):
    """``(jobs, skipped)``: the shards to (re)write and how many complete shards are left as they are.

    A complete shard that fails ``shard_problem`` (a stats file of another shape included) becomes a job
    with ``redo`` saying why. The shards are listed now, whatever listing came before.
    """
    dataset = as_handle(output)
    existing = {s.id: s for s in dataset.shards(missing_ok=True)}
    jobs, skipped = [], 0
    for shard_id, start, stop in assign_shards(len(items), cfg.inputs.samples_per_shard):
        shard_items = tuple(items[start:stop])
        info = existing.get(shard_id)
        if info is None or not info.complete:
            jobs.append(ShardJob(shard_id, shard_items))
            continue
        problem = shard_problem(dataset, info, verify)
        if problem:
            log.warning("shard %s has a stats file but %s: it is redone", info.name, problem)
            jobs.append(ShardJob(shard_id, shard_items, redo=problem))
            continue
        failed = set(_failed_keys(dataset, info)) if retry_failed else set()
        if failed:
            jobs.append(ShardJob(shard_id, tuple(it for it in shard_items if it.key in failed), keep_existing=True))
        else:
            skipped += 1
    return jobs, skipped


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
            jobs, skipped = plan_jobs(items, cfg, open_output(output, write=False))
            redone = sum(1 for j in jobs if j.redo)
            lines.append(f"output {output}: {skipped} shards complete, {len(jobs)} to write"
                         + (f" ({redone} recorded complete but damaged)" if redone else ""))
    return "\n".join(lines)

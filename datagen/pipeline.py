"""The Ray Data pipeline: the one module that imports ``ray.data`` and holds every ``map_batches`` call.

    chunks of input items
      -> decode        CPU tasks (TaskPoolStrategy, ``execution.decode_tasks`` at a time)
      -> pool 1..n     actor pools (ActorPoolStrategy): each actor loads its stages' models once;
                       with ``vlm.engine: vllm`` a pool of VLM stages is a ray.data.llm processor instead
                       (chunks -> request rows -> vLLM -> chunks: ``stages/vlm_vllm.py``)
      -> pack          CPU tasks: JPEG-encode and validate each row, store the chunk as a part of its shard
      -> driver        counts each chunk's summary; a shard whose parts are all stored goes to one
                       ``seal_shard`` Ray task (tar, parquet, stats from the parts)

The unit that flows through Ray is a *chunk*: ``execution.chunk_size`` consecutive inputs of one shard.
Every stage sees whole chunks and cuts them into its own batches of ok rows, so which images share a
model batch depends only on the inputs, never on scheduling: a resumed run computes exactly what an
uninterrupted one does, and its tars are byte-identical. Rows travel as Python objects (images are
variable-sized arrays) between the workers; Ray serialises them in its object store, nothing is
pickled into a shard or a part. The driver never receives image bytes (``datagen/CLUSTER.md``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd
import ray
import ray.data
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from tqdm import tqdm

from shards.dataset import DatasetHandle
from shards.schema import STATUS_FAILED, STATUS_FILTERED, STATUS_OK

from .chunks import (
    PACK,
    PipelineError,
    ShardJob,
    chunk_summary,
    decode_carrier,
    decode_chunk,
    encode_carrier,
    make_chunks,
    pack_chunk,
    run_stage_on_chunk,
)
from .chunks import FailFast as _FailFast
from .config import DatagenConfig, PoolConfig, stage_classes
from .stages import StageError, vlm_vllm
from .stages.decode import DecodeConfig, DecodeStage
from .stages.write import PARTS_DIR, WriteConfig, parts_dir, seal_shard, write_part

log = logging.getLogger(__name__)

# Environment a worker needs to behave like the driver (offline hub, caches); forwarded to the cluster.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                 "TORCH_HOME", "TOKENIZERS_PARALLELISM", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


@dataclass
class StageTime:
    """Busy time of one stage summed over its workers, and the rows it processed."""

    rows: int = 0
    seconds: float = 0.0


@dataclass
class RunResult:
    """What one execution did."""

    processed: int = 0  # inputs that went through the pipeline this run
    statuses: Counter = field(default_factory=Counter)  # status -> count
    failures: Counter = field(default_factory=Counter)  # (stage, reason) -> count
    objects: int = 0
    shards: list[dict] = field(default_factory=list)  # stats of each shard written
    busy: dict[str, StageTime] = field(default_factory=dict)  # stage -> busy time
    counts: dict[str, Counter] = field(default_factory=dict)  # stage -> its own tallies (chunks.run_stage_on_chunk)
    nodes: set = field(default_factory=set)  # Ray node ids that decoded or ran model stages
    startup_seconds: float | None = None  # until the first chunk came out (actor start-up, model loads)
    startup_rows: int = 0  # the rows of that first chunk
    wall_seconds: float = 0.0
    driver_bytes: int = 0  # what the driver received: chunk summaries and shard stats (no image bytes)


# ---------------------------------------------------------------------------------------------------
# Ray: the UDFs and the dataset.


# The CPU tasks receive only their own config section: unpickling the whole DatagenConfig would import
# every stage module (and torch) into each decode/pack worker.
def _decode_fn(df: pd.DataFrame, config: DecodeConfig) -> pd.DataFrame:
    stage = DecodeStage(config)  # stateless and cheap: a plain task, no actor
    node = ray.get_runtime_context().get_node_id()
    chunks = [{**decode_chunk(c, stage), "nodes": [node]} for c in df["chunk"]]
    return pd.DataFrame({"shard": df["shard"], "chunk": chunks})


class PoolWorker:
    """One actor of a pool: loads its stages once, then runs each chunk through them in order."""

    def __init__(self, cfg: DatagenConfig, pool: PoolConfig):
        self.node = ray.get_runtime_context().get_node_id()
        self.stages = []
        for name in pool.stages:
            stage_cls, _ = stage_classes(name)
            self.stages.append((name, stage_cls(cfg.stages[name]), cfg.batch_size(name)))

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        chunks = []
        for chunk in df["chunk"]:
            for name, stage, batch_size in self.stages:
                chunk = run_stage_on_chunk(stage, name, chunk, batch_size)
            chunks.append({**chunk, "nodes": [*chunk.get("nodes", []), self.node]})
        return pd.DataFrame({"shard": df["shard"], "chunk": chunks})


def _explode_fn(row: dict, stages: dict) -> list[dict]:
    # The carrier's chunk crosses the processor as bytes (``chunks.encode_carrier``: why there).
    rows = vlm_vllm.explode_chunk(row["chunk"], stages)
    return [{**r, vlm_vllm.CHUNK: encode_carrier(r[vlm_vllm.CHUNK])} if r[vlm_vllm.CHUNK] is not None else r
            for r in rows]


class ChunkAssembleWorker:
    """The single actor after a vLLM processor: answer rows back into chunks (``vlm_vllm.ChunkAssembler``).

    A generator: a batch that completes no chunk yields nothing; all rows of a chunk reach this one
    actor, in any order, so no shuffle (a barrier) is needed.
    """

    def __init__(self, stages: dict):
        self.assembler = vlm_vllm.ChunkAssembler(stages)

    def __call__(self, df: pd.DataFrame) -> Iterator[pd.DataFrame]:
        rows = df.to_dict("records")
        for r in rows:
            if isinstance(r.get(vlm_vllm.CHUNK), bytes):
                r[vlm_vllm.CHUNK] = decode_carrier(r[vlm_vllm.CHUNK])
        chunks = self.assembler.add_all(rows)
        if chunks:
            yield pd.DataFrame({"shard": [c["shard"] for c in chunks], "chunk": chunks})


def vllm_pool(ds: ray.data.Dataset, cfg: DatagenConfig, pool: PoolConfig) -> ray.data.Dataset:
    """A pool of VLM stages on vLLM: chunks -> request rows -> ray.data.llm processor -> chunks.

    Building the processor reads the model's config and tokenizer here (the driver); vLLM itself is
    imported only by the processor's workers.
    """
    from ray.data.llm import build_processor

    stages = {name: cfg.stages[name] for name in pool.stages}
    v = cfg.vlm.vllm
    ds = ds.flat_map(_explode_fn, fn_kwargs={"stages": stages}, num_cpus=v.cpu_stage_cpus)
    processor = build_processor(
        vlm_vllm.processor_config(v, cfg.stages[pool.stages[0]].model, pool),
        preprocess=vlm_vllm.preprocess,
        postprocess=functools.partial(vlm_vllm.postprocess, stages=stages),
        preprocess_map_kwargs={"num_cpus": v.cpu_stage_cpus},
        postprocess_map_kwargs={"num_cpus": v.cpu_stage_cpus},
    )
    return processor(ds).map_batches(
        ChunkAssembleWorker, fn_constructor_kwargs={"stages": stages}, batch_size=None, batch_format="pandas",
        compute=ActorPoolStrategy(size=1), num_cpus=v.cpu_stage_cpus)


def _pack_fn(df: pd.DataFrame, config: WriteConfig, dataset: DatasetHandle, token: str) -> pd.DataFrame:
    # The images stop here: each packed chunk is stored as a part beside the output (``write_part``) and
    # only its summary (counts, failure reasons, busy seconds, the part's path) goes on to the driver,
    # as JSON text: a few hundred bytes per chunk, whatever its images weigh.
    summaries = []
    for chunk in df["chunk"]:
        packed = pack_chunk(chunk, config)
        t0 = time.perf_counter()
        part = write_part(dataset, parts_dir(dataset, token, packed["shard"]), packed["start"], packed["entries"])
        packed["busy"][PACK][1] += time.perf_counter() - t0  # storing the part is the pack task's work too
        summaries.append(json.dumps({**chunk_summary(packed), "part": part}))
    return pd.DataFrame({"shard": df["shard"], "summary": summaries})


def pool_remote_args(pool: PoolConfig) -> dict:
    """The map_batches arguments of one pool (also what ``plan`` prints)."""
    if pool.max_actors is None:
        compute = ActorPoolStrategy(size=pool.actors, max_tasks_in_flight_per_actor=pool.max_tasks_in_flight)
    else:
        compute = ActorPoolStrategy(min_size=pool.actors, max_size=pool.max_actors,
                                    max_tasks_in_flight_per_actor=pool.max_tasks_in_flight)
    memory = {"memory": int(pool.memory_gb * 2**30)} if pool.memory_gb else {}
    return {"compute": compute, "num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, **memory}


def build_dataset(chunks: list[dict], cfg: DatagenConfig, dataset: DatasetHandle, token: str) -> ray.data.Dataset:
    """The lazy Ray dataset: decode -> each actor pool (or vLLM processor) -> pack, which stores each chunk
    as a part under the output ``dataset`` (run ``token``). One row per chunk: its summary."""
    ex = cfg.execution
    ds = ray.data.from_items(chunks, override_num_blocks=max(1, min(len(chunks), 10_000)))
    # batch_size=1: one chunk per call; the stages batch inside a chunk.
    ds = ds.map_batches(_decode_fn, fn_kwargs={"config": cfg.decode}, batch_size=1, batch_format="pandas",
                        compute=TaskPoolStrategy(size=ex.decode_tasks), num_cpus=ex.decode_cpus)
    for pool in cfg.pools.values():
        if cfg.runs_on_vllm(pool):
            ds = vllm_pool(ds, cfg, pool)
            continue
        ds = ds.map_batches(PoolWorker, fn_constructor_kwargs={"cfg": cfg, "pool": pool}, batch_size=1,
                            batch_format="pandas", **pool_remote_args(pool))
    return ds.map_batches(_pack_fn, fn_kwargs={"config": cfg.write, "dataset": dataset, "token": token}, batch_size=1, batch_format="pandas",
                          compute=TaskPoolStrategy(size=ex.pack_tasks), num_cpus=ex.pack_cpus)


@ray.remote
def _seal_shard_task(dataset: DatasetHandle, shard_id: int, parts: list[str], keep_existing: bool, fingerprint: str | None) -> dict:
    return seal_shard(dataset, shard_id, parts, keep_existing, fingerprint)


# ---------------------------------------------------------------------------------------------------
# Ray runtime and execution.


def init_ray(cfg: DatagenConfig) -> bool:
    """Connect to ``RAY_ADDRESS`` when set, else start an embedded local Ray. True if we started it."""
    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        log.info("Ray cluster: %d node(s), resources %s", len(nodes), ray.cluster_resources())
    else:
        ray.init(num_cpus=cfg.execution.num_cpus, num_gpus=cfg.execution.num_gpus, include_dashboard=False,
                 runtime_env=runtime_env)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress bar counts images, Ray's would count chunks
    # Chunks are Python objects: say so, instead of letting Ray warn that Arrow cannot hold them.
    ctx.enable_fallback_to_arrow_object_ext_type = True
    return True


def _stage_error(exc: BaseException) -> StageError | None:
    """The StageError behind a Ray error: in its cause chain, or in the remote traceback it carries."""
    seen = set()
    first = exc
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StageError):
            return exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    # Ray Data re-raises a UDF failure as a UserCodeException whose original exception survives only
    # as the remote traceback's text.
    marker = f"{StageError.__module__}.{StageError.__name__}: "
    for line in str(first).splitlines():
        if marker in line:
            return StageError(line.split(marker, 1)[1])
    return None


def _iter_summaries(ds: ray.data.Dataset, received: list[int]) -> Iterator[dict]:
    """The chunk summaries as the pack tasks finish them; ``received[0]`` counts the bytes the driver got
    (the Arrow size of every block it iterated)."""
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            received[0] += block.nbytes
            for text in block.column("summary").to_pylist():
                yield json.loads(text)
    except Exception as e:  # noqa: BLE001 - Ray wraps the stage's exception; unwrap it for the user
        err = _stage_error(e)
        if err is not None:
            raise PipelineError(f"{err} -- the run stops here; complete shards are kept") from e
        raise


def _clear_parts(dataset: DatasetHandle) -> None:
    """Remove every run's leftover parts (a killed run's, or ours once all shards are sealed)."""
    path = dataset.path(PARTS_DIR)
    try:
        if dataset.fs.exists(path):
            dataset.fs.rm(path, recursive=True)
    except FileNotFoundError:  # an orphaned writer removed its part of it meanwhile
        pass


def execute(
    jobs: Sequence[ShardJob],
    cfg: DatagenConfig,
    dataset: DatasetHandle,
    progress: bool | None = None,
) -> RunResult:
    """Run the pipeline over ``jobs`` and write their shards to ``dataset``; Ray must be initialised.

    ``dataset`` is the run's handle with its run record (``DatasetHandle.open_run``): the pack and seal
    tasks receive it as it is (it pickles, filesystem included), and its fingerprint tells each seal
    task whether the output still belongs to this configuration.

    The driver plans and tracks: it receives one small summary per chunk (the pack tasks store the
    chunk's rows as a part beside the output) and starts one seal task per shard once every part of
    it is stored. No image byte passes through this process.
    """
    result = RunResult()
    jobs = [j for j in jobs if j.items]
    if not jobs:
        return result
    by_id = {j.shard_id: j for j in jobs}
    total = sum(len(j.items) for j in jobs)
    chunks = make_chunks(jobs, cfg.execution.chunk_size)
    # This run's parts live under their own token, so a killed run's orphaned tasks never touch them.
    token = uuid.uuid4().hex[:12]
    fingerprint = (dataset.run or {}).get("fingerprint")
    _clear_parts(dataset)
    parts: dict[int, list[tuple[int, str, int]]] = defaultdict(list)  # shard -> (start, path, rows)
    writes: list[ray.ObjectRef] = []
    guard = _FailFast(min(cfg.execution.fail_fast_rows, total))
    seal_task = _seal_shard_task.options(num_cpus=cfg.execution.write_cpus)
    received = [0]
    t0 = time.perf_counter()
    last_log = t0
    bar = tqdm(total=total, unit="img", desc="datagen", disable=None if progress is None else not progress, dynamic_ncols=True)
    try:
        for summary in _iter_summaries(build_dataset(chunks, cfg, dataset, token), received):
            rows = summary["rows"]
            if result.startup_seconds is None:
                result.startup_seconds, result.startup_rows = time.perf_counter() - t0, rows
            guard.update_summary(summary)
            result.nodes.update(summary["nodes"])
            for stage, (n, seconds) in summary["busy"].items():
                t = result.busy.setdefault(stage, StageTime())
                t.rows += int(n)
                t.seconds += float(seconds)
            for stage, tally in summary.get("counts", {}).items():
                result.counts.setdefault(stage, Counter()).update(tally)
            result.statuses.update(summary["statuses"])
            result.objects += summary["objects"]
            for stage, why, _, n in summary["failures"]:
                result.failures[(stage, why)] += n
            shard = summary["shard"]
            parts[shard].append((summary["start"], summary["part"], rows))
            if sum(p[2] for p in parts[shard]) == len(by_id[shard].items):
                paths = [p[1] for p in sorted(parts.pop(shard))]
                writes.append(seal_task.remote(dataset, shard, paths, by_id[shard].keep_existing, fingerprint))
            result.processed += rows
            bar.update(rows)
            bar.set_postfix(ok=result.statuses[STATUS_OK], failed=result.statuses[STATUS_FAILED],
                            filtered=result.statuses[STATUS_FILTERED], refresh=False)
            if time.perf_counter() - last_log > 30:
                last_log = time.perf_counter()
                log.info("%d/%d inputs, %.2f img/s", result.processed, total, result.processed / (last_log - t0))
        if parts:
            raise PipelineError(f"shards {sorted(parts)} did not receive all their rows (a lost chunk)")
    except BaseException:
        # Shards already handed to writers still finish (and count as complete on resume); the
        # error that stopped the run is the one reported.
        _finish_writes(writes, raise_errors=False, received=received)
        raise
    finally:
        bar.close()
    stats = _finish_writes(writes, raise_errors=True, received=received)
    result.shards = [s for s in stats if not s.get("superseded")]
    _clear_parts(dataset)
    result.wall_seconds = time.perf_counter() - t0
    result.driver_bytes = received[0]
    return result


def _finish_writes(writes: list[ray.ObjectRef], raise_errors: bool, received: list[int]) -> list[dict]:
    # Every write is waited for before an error is raised: a shard being written when another one
    # failed (a full disk) still completes, instead of dying with the Ray runtime.
    stats, first_error = [], None
    for ref in writes:
        try:
            stats.append(ray.get(ref))
            received[0] += len(json.dumps(stats[-1]))
        except Exception as e:  # noqa: BLE001 - reported below, or by the caller's own error
            log.warning("a shard write failed (%s); that shard stays incomplete and is redone on resume",
                        str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
            first_error = first_error or e
    if raise_errors and first_error is not None:
        raise first_error
    return stats

"""The Ray Data pipeline: the one module that imports ``ray.data`` and holds every ``map_batches`` call.

    chunks of input items
      -> decode        CPU tasks (TaskPoolStrategy, ``execution.decode_tasks`` at a time)
      -> pool 1..n     actor pools (ActorPoolStrategy): each actor loads its stages' models once;
                       with ``vlm.engine: vllm`` a pool of VLM stages is a ray.data.llm processor instead
                       (chunks -> request rows -> vLLM -> chunks: ``stages/vlm_vllm.py``)
      -> pack          CPU tasks: JPEG-encode and validate each row
      -> driver        groups rows by shard; a full shard goes to one ``write_shard`` Ray task

The unit that flows through Ray is a *chunk*: ``execution.chunk_size`` consecutive inputs of one shard.
Every stage sees whole chunks and cuts them into its own batches of ok rows, so which images share a
model batch depends only on the inputs, never on scheduling: a resumed run computes exactly what an
uninterrupted one does, and its tars are byte-identical. Rows travel as Python objects (images are
variable-sized arrays); Ray serialises them in its object store, nothing is pickled into a shard.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd
import ray
import ray.data
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from tqdm import tqdm

from shards.schema import STATUS_FAILED, STATUS_FILTERED, STATUS_OK

from .chunks import ShardJob, decode_chunk, make_chunks, pack_chunk, run_stage_on_chunk
from .config import DatagenConfig, PoolConfig, stage_classes
from .stages import StageError, vlm_vllm
from .stages.decode import DecodeConfig, DecodeStage
from .stages.write import WriteConfig, write_shard

log = logging.getLogger(__name__)

# Environment a worker needs to behave like the driver (offline hub, caches); forwarded to the cluster.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                 "TORCH_HOME", "TOKENIZERS_PARALLELISM")


class PipelineError(RuntimeError):
    """The run stopped on purpose (a stage failing systematically); the message says where and why."""


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
    nodes: set = field(default_factory=set)  # Ray node ids that decoded or ran model stages
    startup_seconds: float | None = None  # until the first chunk came out (actor start-up, model loads)
    startup_rows: int = 0  # the rows of that first chunk
    wall_seconds: float = 0.0


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
    return vlm_vllm.explode_chunk(row["chunk"], stages)


class ChunkAssembleWorker:
    """The single actor after a vLLM processor: answer rows back into chunks (``vlm_vllm.ChunkAssembler``).

    A generator: a batch that completes no chunk yields nothing; all rows of a chunk reach this one
    actor, in any order, so no shuffle (a barrier) is needed.
    """

    def __init__(self, stages: dict):
        self.assembler = vlm_vllm.ChunkAssembler(stages)

    def __call__(self, df: pd.DataFrame) -> Iterator[pd.DataFrame]:
        chunks = self.assembler.add_all(df.to_dict("records"))
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


def _pack_fn(df: pd.DataFrame, config: WriteConfig) -> pd.DataFrame:
    # A packed chunk travels to the driver as JSON text plus its images' bytes: as plain nested data Arrow
    # would make it nested structs, which Ray fails to concatenate when one block holds several chunks
    # whose entries differ in shape (ok and failed entries, objects with and without masks), as after a
    # vLLM processor. Entries are JSON-safe but for the image (``pack_row``); no pickle crosses over.
    metas, images = [], []
    for chunk in df["chunk"]:
        packed = pack_chunk(chunk, config)
        images.append([e.get("image", b"") for e in packed["entries"]])
        packed["entries"] = [{k: v for k, v in e.items() if k != "image"} for e in packed["entries"]]
        metas.append(json.dumps(packed))
    return pd.DataFrame({"shard": df["shard"], "chunk": metas, "images": images})


def _unpack_chunk(row: dict) -> dict:
    """The packed chunk of one ``_pack_fn`` row: its JSON with the images put back into the ok entries."""
    chunk = json.loads(row["chunk"])
    for entry, image in zip(chunk["entries"], row["images"], strict=True):
        if entry["status"] == STATUS_OK:
            entry["image"] = bytes(image)
    return chunk


def pool_remote_args(pool: PoolConfig) -> dict:
    """The map_batches arguments of one pool (also what ``plan`` prints)."""
    if pool.max_actors is None:
        compute = ActorPoolStrategy(size=pool.actors, max_tasks_in_flight_per_actor=pool.max_tasks_in_flight)
    else:
        compute = ActorPoolStrategy(min_size=pool.actors, max_size=pool.max_actors,
                                    max_tasks_in_flight_per_actor=pool.max_tasks_in_flight)
    return {"compute": compute, "num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}


def build_dataset(chunks: list[dict], cfg: DatagenConfig) -> ray.data.Dataset:
    """The lazy Ray dataset: decode -> each actor pool (or vLLM processor) -> pack. One row per chunk."""
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
    return ds.map_batches(_pack_fn, fn_kwargs={"config": cfg.write}, batch_size=1, batch_format="pandas",
                          compute=TaskPoolStrategy(size=ex.pack_tasks), num_cpus=ex.pack_cpus)


@ray.remote
def _write_shard_task(dataset: str, shard_id: int, entries: list[dict], keep_existing: bool) -> dict:
    return write_shard(dataset, shard_id, entries, keep_existing)


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


class _FailFast:
    """Stop a run whose first rows all fail in the same stage for the same reason (a broken setup)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.seen = 0
        self.reasons: Counter = Counter()
        self.ok = False

    def update(self, entries: list[dict]) -> None:
        if self.ok:
            return
        for e in entries:
            if e["status"] != STATUS_FAILED:
                self.ok = True
                return
            self.seen += 1
            self.reasons[(e["error_stage"], e["error"].split(":")[0])] += 1
        if self.seen >= self.limit and len(self.reasons) == 1:
            (stage, reason), n = self.reasons.most_common(1)[0]
            raise PipelineError(
                f"stage {stage!r} failed on every one of the first {n} inputs ({reason}); stopping instead "
                "of writing an empty dataset. Check the inputs and the configuration of that stage."
            )


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


def _iter_chunks(ds: ray.data.Dataset) -> Iterator[dict]:
    try:
        for row in ds.iter_rows():
            yield _unpack_chunk(row)
    except Exception as e:  # noqa: BLE001 - Ray wraps the stage's exception; unwrap it for the user
        err = _stage_error(e)
        if err is not None:
            raise PipelineError(f"{err} -- the run stops here; complete shards are kept") from e
        raise


def execute(
    jobs: Sequence[ShardJob],
    cfg: DatagenConfig,
    output: str,
    progress: bool | None = None,
) -> RunResult:
    """Run the pipeline over ``jobs`` and write their shards; Ray must be initialised."""
    result = RunResult()
    jobs = [j for j in jobs if j.items]
    if not jobs:
        return result
    by_id = {j.shard_id: j for j in jobs}
    total = sum(len(j.items) for j in jobs)
    chunks = make_chunks(jobs, cfg.execution.chunk_size)
    pending: dict[int, list[dict]] = defaultdict(list)
    writes: list[ray.ObjectRef] = []
    guard = _FailFast(min(cfg.execution.fail_fast_rows, total))
    write_task = _write_shard_task.options(num_cpus=cfg.execution.write_cpus)
    t0 = time.perf_counter()
    last_log = t0
    bar = tqdm(total=total, unit="img", desc="datagen", disable=None if progress is None else not progress, dynamic_ncols=True)
    try:
        for chunk in _iter_chunks(build_dataset(chunks, cfg)):
            entries = chunk["entries"]
            if result.startup_seconds is None:
                result.startup_seconds, result.startup_rows = time.perf_counter() - t0, len(entries)
            guard.update(entries)
            result.nodes.update(chunk["nodes"])
            for stage, (rows, seconds) in chunk["busy"].items():
                t = result.busy.setdefault(stage, StageTime())
                t.rows += int(rows)
                t.seconds += float(seconds)
            for e in entries:
                result.statuses[e["status"]] += 1
                if e["status"] == STATUS_OK:
                    result.objects += len(e["record"]["objects"])
                else:
                    result.failures[(e["error_stage"], _reason(e["error"]))] += 1
            shard = chunk["shard"]
            pending[shard].extend(entries)
            if len(pending[shard]) == len(by_id[shard].items):
                writes.append(write_task.remote(output, shard, pending.pop(shard), by_id[shard].keep_existing))
            result.processed += len(entries)
            bar.update(len(entries))
            bar.set_postfix(ok=result.statuses[STATUS_OK], failed=result.statuses[STATUS_FAILED],
                            filtered=result.statuses[STATUS_FILTERED], refresh=False)
            if time.perf_counter() - last_log > 30:
                last_log = time.perf_counter()
                log.info("%d/%d inputs, %.2f img/s", result.processed, total, result.processed / (last_log - t0))
        if pending:
            raise PipelineError(f"shards {sorted(pending)} did not receive all their rows (a lost chunk)")
    except BaseException:
        # Shards already handed to writers still finish (and count as complete on resume); the
        # error that stopped the run is the one reported.
        _finish_writes(writes, raise_errors=False)
        raise
    finally:
        bar.close()
    result.shards = _finish_writes(writes, raise_errors=True)
    result.wall_seconds = time.perf_counter() - t0
    return result


def _finish_writes(writes: list[ray.ObjectRef], raise_errors: bool) -> list[dict]:
    # Every write is waited for before an error is raised: a shard being written when another one
    # failed (a full disk) still completes, instead of dying with the Ray runtime.
    stats, first_error = [], None
    for ref in writes:
        try:
            stats.append(ray.get(ref))
        except Exception as e:  # noqa: BLE001 - reported below, or by the caller's own error
            log.warning("a shard write failed (%s); that shard stays incomplete and is redone on resume",
                        str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
            first_error = first_error or e
    if raise_errors and first_error is not None:
        raise first_error
    return stats


def _reason(error: str) -> str:
    """The groupable part of an error message (its first 120 characters)."""
    return error if len(error) <= 120 else error[:117] + "..."

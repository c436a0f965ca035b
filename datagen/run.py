"""A datagen run: list the inputs, check or create ``run.json``, process the shards not complete, report.

``run()`` does the work (``python -m datagen run``, whose command line is ``datagen.cli``); it ends with
a ``Summary`` and, when it processed inputs, saves its measurements (``datagen.measurement``) to
``<output>/runs/<UTC time>.json`` for ``python -m datagen size``. Stages on vLLM (``vlm.engine: vllm``)
report no busy time; ``size`` asks for their rates (``--rates``).

Ray: an embedded local Ray by default; with ``RAY_ADDRESS`` set (or under ``ray job submit``) the run
goes to that cluster. Resume is at shard granularity: a shard whose stats file exists and whose tar
matches it is complete and skipped (``datagen.plan``); any other shard is redone whole.
"""

from __future__ import annotations

import errno
import importlib.metadata
import logging
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field

from shards.dataset import DatasetHandle

from .config import DatagenConfig, fingerprint_dict, to_dict
from .inputs import assign_shards, inputs_digest, list_inputs
from .measurement import run_record, save_run_record
from .plan import open_output, plan_jobs
from .provenance import provenance
from .resources import check_resources

log = logging.getLogger(__name__)

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
    shards_redone: int = 0  # recorded complete, but their tar did not match their stats
    processed: int = 0
    totals: dict = field(default_factory=dict)  # dataset-wide samples/failures/filtered/objects (index.json)
    failures: Counter = field(default_factory=Counter)  # (stage, reason) -> count, this run
    busy: dict = field(default_factory=dict)  # stage -> (rows, seconds), this run
    counts: dict = field(default_factory=dict)  # stage -> {tally: n}, this run (e.g. segment: objects that arrived masked)
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
            + (f"{self.shards_redone} damaged and redone, " if self.shards_redone else "")
            + f"{self.shards_written} written now)",
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
        for stage, tally in self.counts.items():
            lines.append(f"  {stage}: " + ", ".join(f"{n} {what}" for what, n in sorted(tally.items())))
        if self.vllm_stages:
            lines.append(f"  {', '.join(self.vllm_stages)}: on vLLM, no busy time measured (Ray dashboard, Data view); "
                         "python -m datagen size needs their rates with --rates")
        if self.record:
            lines.append(f"  measurements saved to {self.record}")
            lines.append(f"  size a cluster from them: python -m datagen size --from {self.output} --images N --hours H")
        return "\n".join(lines)


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


class DiskFullError(RuntimeError):
    """The output's disk filled up during a run; the message says what is safe and how to go on."""


def run(
    cfg: DatagenConfig,
    inputs: list[str],
    output: str,
    new_run: bool = False,
    retry_failed: bool = False,
    progress: bool | None = None,
    verify: bool = False,
) -> Summary:
    """List the inputs, check/create run.json, process the shards not complete, rebuild the index.

    ``verify``: also check each complete shard's tar against the sha256 its stats recorded (reads
    every tar); without it only the tar's size is compared. A shard that fails is redone.

    ``output`` is opened once, here (``plan.open_output``: an output that cannot be written is refused
    before any work), and the handle goes down to every step, Ray's tasks included.
    """
    dataset = open_output(output)
    try:
        return _run(cfg, inputs, dataset, new_run, retry_failed, progress, verify)
    except Exception as e:
        full = _disk_full(e)
        if full is None:
            raise
        try:
            complete = sum(s.complete for s in dataset.shards())
        except OSError:  # the disk filled before the output folder was made
            complete = 0
        raise DiskFullError(
            f"no space left on the device of {output} ({full.filename or 'writing a shard'}): the run stopped; "
            f"the {complete} complete shard(s) are safe (a shard is complete once its stats file exists, and "
            "incomplete ones are redone); free some space and run the same command again to resume",
        ) from e


def _disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC OSError behind ``exc``: itself, in its cause chain, or inside a Ray task error."""
    seen, chain, stack = set(), [], [exc]
    while stack:
        exc = stack.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        chain.append(exc)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError keeps the remote exception here
        stack.extend([c for c in (cause, exc.__cause__, exc.__context__) if isinstance(c, BaseException)])
    # Ray Data re-raises a task's failure from its executor with the remote chain only as text (a full
    # disk in the pack stage's part writer, measured on a real tmpfs): recognise it by its errno's text.
    if any(f"[Errno {errno.ENOSPC}]" in str(e) for e in chain):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def _run(cfg: DatagenConfig, inputs: list[str], dataset: DatasetHandle, new_run: bool, retry_failed: bool,
         progress: bool | None, verify: bool) -> Summary:

    items = list_inputs(inputs, cfg.inputs.path_column, cfg.inputs.caption_column)
    # The keys digest identifies the inputs; how their location was spelled (relative path, trailing
    # slash, another mount) is recorded but does not make a different run.
    described = {"count": len(items), "keys_sha256": inputs_digest(items)}
    extra = {"inputs": list(inputs), "packages": _versions(), "python": platform.python_version(),
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "resolved_config": to_dict(cfg), "provenance": provenance(cfg)}
    cluster = _Cluster()
    try:
        if new_run or dataset.read_run() is None:
            # before run.json is written: a record made for a config no node can run would refuse the
            # corrected config's run as "written by a different configuration"
            cluster.ready(cfg)
        dataset = dataset.open_run(fingerprint_dict(cfg, described), extra, new_run=new_run)
        return _plan_and_execute(cfg, items, dataset, retry_failed, verify, progress, cluster)
    finally:
        cluster.close()


class _Cluster:
    """Ray for one run: started (or joined) once, every stage's worker checked to fit some node once."""

    def __init__(self) -> None:
        self.checked = False
        self.started = False  # this run started Ray, so it shuts it down

    def ready(self, cfg: DatagenConfig) -> None:
        from . import pipeline

        if not self.checked:
            self.started = pipeline.init_ray(cfg)
            check_resources(cfg)  # a worker no node can hold: one error now, not an endless wait
            self.checked = True

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()


def _plan_and_execute(cfg: DatagenConfig, items: list, dataset: DatasetHandle, retry_failed: bool, verify: bool,
                      progress: bool | None, cluster: _Cluster) -> Summary:
    from . import pipeline

    jobs, skipped = plan_jobs(items, cfg, dataset, retry_failed, verify)
    summary = Summary(output=dataset.uri, inputs=len(items), shards_skipped=skipped,
                      shards_total=len(assign_shards(len(items), cfg.inputs.samples_per_shard)),
                      shards_redone=sum(1 for j in jobs if j.redo),
                      started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), vllm_stages=cfg.vllm_stages())
    _unmark_damaged(dataset, jobs)
    log.info("%d inputs in %d shards: %d complete, %d to write (%d inputs)", len(items), summary.shards_total,
             skipped, len(jobs), sum(len(j.items) for j in jobs))
    if jobs:
        cluster.ready(cfg)
        result = pipeline.execute(jobs, cfg, dataset, progress=progress)
        summary.resources = _cluster_resources()
        summary.processed = result.processed
        summary.shards_written = len(result.shards)
        summary.failures = result.failures
        summary.busy = {k: (v.rows, v.seconds) for k, v in result.busy.items()}
        summary.counts = {k: dict(v) for k, v in result.counts.items()}
        summary.wall_seconds = result.wall_seconds
        summary.nodes = len(result.nodes)
        summary.statuses = result.statuses
        summary.objects = result.objects
        summary.startup_seconds = result.startup_seconds
        summary.startup_rows = result.startup_rows
    summary.totals = dataset.build_index()["totals"]
    if summary.processed:
        summary.record = save_run_record(dataset, run_record(summary, cfg))
    return summary


def _unmark_damaged(dataset: DatasetHandle, jobs) -> None:
    """Remove the stats file of each damaged shard about to be redone: should this run stop before the
    shard is rewritten, it is not counted (index, readers) nor trusted by the next resume."""
    for job in jobs:
        if job.redo:
            path = dataset.shard_path(job.shard_id, "stats.json")
            if dataset.fs.exists(path):
                dataset.fs.rm(path)


def _cluster_resources() -> dict:
    """The Ray cluster's total resources (CPU, GPU, accelerator type, memory), for the run record."""
    import ray

    try:
        return {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
    except Exception:  # noqa: BLE001 - a record without resources is still a record
        log.debug("no cluster resources", exc_info=True)
        return {}

"""Chunks, the unit of work of the datagen pipeline: plain functions, usable and tested without Ray.

A chunk is ``execution.chunk_size`` consecutive inputs of one shard. Every stage sees whole chunks
and cuts them into its own batches of ok rows, so which images share a model batch depends only on
the inputs, never on scheduling: a resumed run computes exactly what an uninterrupted one does.
``datagen.pipeline`` moves chunks through Ray; the driver sees only each chunk's summary
(``chunk_summary``), which feeds the fail-fast guard (``FailFast``) and the run's counts.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shards.schema import STATUS_FAILED, STATUS_OK

from .inputs import InputItem
from .stages import StageError, error_text
from .stages.decode import STAGE as DECODE
from .stages.decode import DecodeStage
from .stages.write import WriteConfig, pack

PACK = "pack"


class PipelineError(RuntimeError):
    """The run stopped on purpose (a stage failing systematically); the message says where and why."""


@dataclass(frozen=True)
class ShardJob:
    """One shard to (re)write: its inputs to process and whether other rows of it are kept."""

    shard_id: int
    items: tuple[InputItem, ...]
    keep_existing: bool = False  # --retry-failed: only these items are redone, the rest is carried over
    redo: str | None = None  # why a shard recorded as complete is redone whole (e.g. a truncated tar)




def make_chunks(jobs: Sequence[ShardJob], chunk_size: int) -> list[dict]:
    """Consecutive pieces of each shard's items, JSON-encoded (a native string column for Ray)."""
    chunks = []
    for job in jobs:
        for start in range(0, len(job.items), chunk_size):
            part = job.items[start : start + chunk_size]
            chunks.append({"shard": job.shard_id, "chunk": json.dumps({"shard": job.shard_id, "start": start,
                                                                       "items": [it.to_dict() for it in part]})})
    return chunks


def _split(n: int, batch_size: int) -> list[range]:
    """``n`` rows in ceil(n / batch_size) near-equal batches (never a lone last row when avoidable)."""
    k = max(1, -(-n // max(1, batch_size)))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def run_stage_on_chunk(stage: Callable, name: str, chunk: dict, batch_size: int) -> dict:
    """Run ``stage`` on the ok rows of a chunk in batches of ``batch_size``; time it.

    Rows that are not ok skip the stage (they get None in its new columns), so model batches are
    full of real work and their composition is a pure function of the chunk's content.
    """
    cols = chunk["columns"]
    n = len(cols["key"])
    ok = [i for i in range(n) if cols["status"][i] == STATUS_OK]
    results: dict[int, dict] = {}
    busy = 0.0
    for part in _split(len(ok), batch_size) if ok else []:
        rows = [ok[j] for j in part]
        sub = {k: [v[i] for i in rows] for k, v in cols.items()}
        t0 = time.perf_counter()
        try:
            out = stage(sub)
        except StageError as e:
            if len(rows) > 1:
                raise
            # One row failing alone is not evidence of a bug: record it on the row. A stage failing
            # everywhere is still caught, by the batches with several rows and by the fail-fast guard.
            cause = e.__cause__ or e
            out = {**sub, "status": [STATUS_FAILED], "error_stage": [name], "error": [error_text(cause)]}
        busy += time.perf_counter() - t0
        for j, i in enumerate(rows):
            results[i] = {k: v[j] for k, v in out.items()}
    names = list(cols) + [k for r in results.values() for k in r if k not in cols]
    names = list(dict.fromkeys(names))
    merged = {k: [_cell(results.get(i), cols, k, i) for i in range(n)] for k in names}
    return {**chunk, "columns": merged, "busy": {**chunk.get("busy", {}), name: [len(ok), busy]}}


def _cell(result: dict | None, cols: dict, name: str, i: int):
    """Row ``i``'s value of column ``name``: the stage's result if it has one, else the old value or None."""
    if result is not None and name in result:
        return result[name]
    return cols[name][i] if name in cols else None


def decode_chunk(payload: str, stage: DecodeStage) -> dict:
    """A JSON chunk of input items -> a chunk of decoded rows."""
    spec = json.loads(payload)
    items = spec.pop("items")
    batch = {k: [it[k] for it in items] for k in items[0]} if items else {"key": []}
    t0 = time.perf_counter()
    cols = stage(batch)
    return {**spec, "columns": cols, "busy": {DECODE: [len(items), time.perf_counter() - t0]}}


def pack_chunk(chunk: dict, config: WriteConfig) -> dict:
    """A chunk of processed rows -> compact entries for the shard writer (images JPEG-encoded)."""
    t0 = time.perf_counter()
    entries = pack(chunk["columns"], config)
    busy = {**chunk.get("busy", {}), PACK: [len(entries), time.perf_counter() - t0]}
    return {
        "shard": chunk["shard"],
        "start": chunk["start"],
        "entries": entries,
        "busy": busy,
        "nodes": chunk.get("nodes", []),
    }


def reason(error: str) -> str:
    """The groupable part of an error message (its first 120 characters)."""
    return error if len(error) <= 120 else error[:117] + "..."


def chunk_summary(packed: dict) -> dict:
    """What the driver needs of a packed chunk: counts, failure reasons, busy time; no images, no records.

    ``failures`` holds ``[stage, reason, guard reason, count]`` in order of first appearance; the guard
    reason (the error's text before its first colon) is what the fail-fast guard groups by.
    """
    statuses: dict[str, int] = {}
    failures: dict[tuple[str, str, str], int] = {}
    objects = 0
    for e in packed["entries"]:
        statuses[e["status"]] = statuses.get(e["status"], 0) + 1
        if e["status"] == STATUS_OK:
            objects += len(e["record"]["objects"])
        else:
            k = (e["error_stage"], reason(e["error"]), e["error"].split(":")[0])
            failures[k] = failures.get(k, 0) + 1
    return {"shard": packed["shard"], "start": packed["start"], "rows": len(packed["entries"]),
            "statuses": statuses, "failures": [[*k, n] for k, n in failures.items()], "objects": objects,
            "busy": packed["busy"], "nodes": packed["nodes"]}


class FailFast:
    """Stop a run whose first rows all fail in the same stage for the same reason (a broken setup)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.seen = 0
        self.reasons: Counter = Counter()
        self.ok = False

    def update(self, entries: list[dict]) -> None:
        """Count packed entries, in order."""
        failures: Counter = Counter()
        for e in entries:
            if e["status"] != STATUS_FAILED:
                break
            failures[(e["error_stage"], e["error"].split(":")[0])] += 1
        self._count(sum(failures.values()) < len(entries), failures)  # stopped at a kept row

    def update_summary(self, summary: dict) -> None:
        """Count one chunk's summary (``chunks.chunk_summary``)."""
        failures: Counter = Counter()
        for stage, _, guard_reason, n in summary["failures"]:
            failures[(stage, guard_reason)] += n
        self._count(any(status != STATUS_FAILED for status in summary["statuses"]), failures)

    def _count(self, any_kept: bool, failures: Counter) -> None:
        if self.ok:
            return
        if any_kept:
            self.ok = True
            return
        self.seen += sum(failures.values())
        self.reasons.update(failures)
        if self.seen >= self.limit and len(self.reasons) == 1:
            (stage, reason), n = self.reasons.most_common(1)[0]
            raise PipelineError(
                f"stage {stage!r} failed on every one of the first {n} inputs ({reason}); stopping instead "
                "of writing an empty dataset. Check the inputs and the configuration of that stage."
            )

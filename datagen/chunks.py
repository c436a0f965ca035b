"""Chunks, the unit of work of the datagen pipeline: plain functions, usable and tested without Ray.

A chunk is ``execution.chunk_size`` consecutive inputs of one shard. Every stage sees whole chunks
and cuts them into its own batches of ok rows, so which images share a model batch depends only on
the inputs, never on scheduling: a resumed run computes exactly what an uninterrupted one does.
``datagen.pipeline`` moves chunks through Ray; the driver sees only each chunk's summary
(``chunk_summary``), which feeds the fail-fast guard (``FailFast``) and the run's counts.
"""

from __future__ import annotations

import json
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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




# A chunk as one bytes value, for the vLLM processors' carrier row (``stages/vlm_vllm.py``): Ray Data types
# the rows of each batch on its own, and a chunk (arrays in it) would be pickled objects beside the request
# batches' structs, which Ray 2.60 fails to merge once those differ (a batch whose every request failed
# carries other fields). As bytes the carrier is an Arrow binary field like any other. No pickle: JSON for
# the structure, the arrays' and bytes' contents raw after it.
_ND, _NDO, _BYTES, _TUPLE, _SCALAR, _MAP = "__nd__", "__ndo__", "__bytes__", "__tuple__", "__np__", "__map__"
_MARKERS = {_ND, _NDO, _BYTES, _TUPLE, _SCALAR, _MAP}


def encode_carrier(value: Any) -> bytes:
    """Nested dicts, lists, tuples, str, numbers, None, bytes, numpy arrays and scalars -> bytes
    (``decode_carrier`` gives them back, types included)."""
    buffers: list[bytes] = []

    def enc(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            if v.dtype.hasobject:
                return {_NDO: [list(v.shape), [enc(x) for x in v.reshape(-1)]]}
            buffers.append(np.ascontiguousarray(v).tobytes())
            return {_ND: [len(buffers) - 1, v.dtype.str, list(v.shape)]}
        if isinstance(v, (bytes, bytearray, memoryview)):
            buffers.append(bytes(v))
            return {_BYTES: len(buffers) - 1}
        if isinstance(v, np.generic):
            return {_SCALAR: [v.dtype.str, v.item()]}
        if isinstance(v, dict):
            if all(isinstance(k, str) for k in v) and not (len(v) == 1 and next(iter(v)) in _MARKERS):
                return {k: enc(x) for k, x in v.items()}
            return {_MAP: [[enc(k), enc(x)] for k, x in v.items()]}
        if isinstance(v, list):
            return [enc(x) for x in v]
        if isinstance(v, tuple):
            return {_TUPLE: [enc(x) for x in v]}
        if v is None or isinstance(v, (str, bool, int, float)):
            return v
        raise TypeError(f"a chunk value of type {type(v).__name__} cannot be encoded")

    header = json.dumps({"v": enc(value), "n": [len(b) for b in buffers]}).encode()
    return b"".join([struct.pack("<Q", len(header)), header, *buffers])


def decode_carrier(data: bytes) -> Any:
    """``encode_carrier``'s value back (arrays writable, owning their memory)."""
    (size,) = struct.unpack_from("<Q", data)
    spec = json.loads(data[8 : 8 + size])
    offsets = [8 + size]
    for n in spec["n"]:
        offsets.append(offsets[-1] + n)
    view = memoryview(data)

    def dec(v: Any) -> Any:
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if len(v) == 1 and next(iter(v)) in _MARKERS:
            (kind, arg), = v.items()
            if kind == _ND:
                i, dtype, shape = arg
                return np.frombuffer(view[offsets[i] : offsets[i + 1]], dtype=dtype).reshape(shape).copy()
            if kind == _NDO:
                out = np.empty(len(arg[1]), dtype=object)
                for j, x in enumerate(arg[1]):  # element by element: numpy would unpack list elements
                    out[j] = dec(x)
                return out.reshape(arg[0])
            if kind == _BYTES:
                return bytes(view[offsets[arg] : offsets[arg + 1]])
            if kind == _SCALAR:
                return np.dtype(arg[0]).type(arg[1])
            if kind == _TUPLE:
                return tuple(dec(x) for x in arg)
            return {dec(k): dec(x) for k, x in arg}
        return {k: dec(x) for k, x in v.items()}

    return dec(spec["v"])


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
    full of real work and their composition is a pure function of the chunk's content. A stage with a
    ``counts`` Counter (its own tallies, e.g. the segment stage's objects that arrived masked) has what
    this chunk added to it recorded in the chunk's ``counts``, for the run record.
    """
    counts = getattr(stage, "counts", None)
    before = dict(counts or {})
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
    out = {**chunk, "columns": merged, "busy": {**chunk.get("busy", {}), name: [len(ok), busy]}}
    if counts is not None:
        out["counts"] = {**chunk.get("counts", {}), name: {k: v - before.get(k, 0) for k, v in counts.items()}}
    return out


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
        "counts": chunk.get("counts", {}),
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
            "busy": packed["busy"], "nodes": packed["nodes"],
            **({"counts": packed["counts"]} if packed.get("counts") else {})}  # stages' own tallies, when kept


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

"""Datagen stages: each a class, ``Stage(config)`` loads its model once, ``stage(batch) -> batch``.

A batch is a dict of equal-length columns (Ray Data's "numpy" format: numpy arrays, object arrays or
lists). Rows whose ``status`` is not "ok" pass through untouched. ``run_rows`` is the error policy
every model stage shares: a per-row exception marks that row failed and the batch goes on; a batch in
which every ok row fails with the same exception type raises ``StageError``, because that is a bug or
a broken model, not bad data, and the run must stop loudly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from shards import OBJECT_FIELDS, STATUS_FAILED, STATUS_OK, encode_mask, mask_to_box

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class StageError(RuntimeError):
    """A stage failed on every ok row of a batch with one exception type: stop the run."""


def num_rows(batch: Mapping[str, Any]) -> int:
    """The number of rows of a batch (all columns have this length)."""
    lengths = {len(v) for v in batch.values()}
    if len(lengths) > 1:
        raise ValueError(f"batch columns differ in length: { {k: len(v) for k, v in batch.items()} }")
    return lengths.pop() if lengths else 0


def ok_rows(batch: Mapping[str, Any]) -> list[int]:
    """Indices of the rows still in play (a batch without a status column is all ok)."""
    if "status" not in batch:
        return list(range(num_rows(batch)))
    return [i for i, s in enumerate(batch["status"]) if s == STATUS_OK]


def error_text(exc: BaseException) -> str:
    """How a per-row failure is recorded: "ExcType: message"."""
    return f"{type(exc).__name__}: {exc}"


def run_rows(
    batch: Batch,
    stage: str,
    fn: Callable[[list[int]], dict[str, list]],
    columns: Sequence[str],
) -> Batch:
    """Apply ``fn`` to the ok rows of ``batch`` and return the batch with ``columns`` set.

    ``fn(rows)`` returns, for each name in ``columns``, one value per index of ``rows`` (batched
    work across rows). When it raises, each row is retried alone, so one bad row fails only itself.
    Rows not ok keep their old value of each column (None when the column is new).
    """
    rows = ok_rows(batch)
    results: dict[int, dict[str, Any]] = {}
    errors: dict[int, BaseException] = {}
    if rows:
        try:
            results = _call(fn, rows, columns)
        except Exception as batch_exc:  # noqa: BLE001 - isolate the row(s) that cause it
            if len(rows) == 1:
                errors[rows[0]] = batch_exc
            else:
                log.debug(
                    "stage %s: batch of %d failed (%s); retrying row by row", stage, len(rows), batch_exc
                )
                for i in rows:
                    try:
                        results.update(_call(fn, [i], columns))
                    except Exception as row_exc:  # noqa: BLE001 - recorded on the row
                        errors[i] = row_exc
    if errors and len(errors) == len(rows) and len({type(e) for e in errors.values()}) == 1:
        first = errors[rows[0]]
        raise StageError(
            f"stage {stage!r} failed on all {len(rows)} ok rows of a batch with {error_text(first)} "
            f"(first key {_key(batch, rows[0])!r}); this is a bug or a broken model/config, not bad data"
        ) from first
    return _merge(batch, stage, columns, results, errors)


def _call(fn: Callable, rows: list[int], columns: Sequence[str]) -> dict[int, dict[str, Any]]:
    out = fn(rows)
    for c in columns:
        if len(out[c]) != len(rows):
            raise RuntimeError(f"stage returned {len(out[c])} values of {c!r} for {len(rows)} rows")
    return {i: {c: out[c][j] for c in columns} for j, i in enumerate(rows)}


def _key(batch: Mapping[str, Any], i: int) -> Any:
    return batch["key"][i] if "key" in batch else i


def _merge(
    batch: Batch,
    stage: str,
    columns: Sequence[str],
    results: dict[int, dict[str, Any]],
    errors: dict[int, BaseException],
) -> Batch:
    n = num_rows(batch)
    out = dict(batch)
    for c in columns:
        old = batch.get(c)
        out[c] = [results[i][c] if i in results else (None if old is None else old[i]) for i in range(n)]
    if errors:
        status = list(out["status"]) if "status" in out else [STATUS_OK] * n
        error_stage = list(out["error_stage"]) if "error_stage" in out else [None] * n
        error = list(out["error"]) if "error" in out else [None] * n
        for i, exc in errors.items():
            log.warning("stage %s: key %r failed: %s", stage, _key(batch, i), error_text(exc))
            status[i], error_stage[i], error[i] = STATUS_FAILED, stage, error_text(exc)
        out.update(status=status, error_stage=error_stage, error=error)
    return out


def as_image(value: Any) -> np.ndarray:
    """A row's image as an (H, W, 3) uint8 array, whatever container the batch used."""
    image = np.asarray(value)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
    return image


def as_objects(value: Any) -> list[dict]:
    """A row's objects as fresh dicts with plain-float boxes (rows may come back as numpy/arrow)."""
    if value is None:
        return []
    objects = []
    for o in value:
        obj = {name: o.get(name) for name in OBJECT_FIELDS}
        for name in ("box", "mask_box"):
            if obj[name] is not None:
                obj[name] = [float(v) for v in obj[name]]
        if isinstance(obj["mask"], Mapping):
            obj["mask"] = {"size": [int(v) for v in obj["mask"]["size"]], "counts": obj["mask"]["counts"]}
        objects.append(obj)
    return objects


def new_object(box: Sequence[float], phrase: str, detector_score: float | None) -> dict:
    """An object dict with every ObjectRecord field, as the ground stage creates it (``detector_score``
    None: a detector without scores, Florence-2; the shards store NaN)."""
    obj = dict.fromkeys(OBJECT_FIELDS)
    score = None if detector_score is None else float(detector_score)
    obj.update(box=[float(v) for v in box], phrase=phrase, detector_score=score)
    return obj


def with_mask(obj: Mapping, mask: np.ndarray, score: float) -> dict:
    """``obj`` with its mask fields set from an (H, W) bool mask at the stored image's size: ``mask``
    (COCO RLE), ``mask_score`` and ``mask_box`` (the mask's tight box; None when the mask is empty)."""
    box = mask_to_box(mask)
    return {**obj, "mask": encode_mask(mask), "mask_score": float(score), "mask_box": None if box is None else list(box)}

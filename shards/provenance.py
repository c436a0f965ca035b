"""Which model made each field of a dataset's records: ``run.json``'s ``provenance``, read and shown.

datagen writes it (``datagen.provenance``) beside the run's configuration; ``python -m shards info`` and
the report show it, so datasets made by different model sets (presets) can be told apart and mixed
knowingly. The sample records themselves do not change (schema version 2). The recorded form::

    "provenance": {"version": 1, "fields": {
        "tags": {"stage": "tag", "model": "Qwen/Qwen3-VL-8B-Instruct", "revision": null, "dtype": "bfloat16",
                 "backend": "hf", "engine": "transformers", "weights": null},
        "objects.phrase": {...}, ...}}

A field no stage of the run made is absent from ``fields``; a field made without a model (the tag
stage's ``caption`` method) has ``"model": null`` and a ``method``. A dataset written before provenance
was recorded (or one with no ``run.json``: from-coco, from-release) reads as ``unknown`` field by field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

VERSION = 1
# Every field of a sample a model can make, in record order (``objects.*``: each object's field).
FIELDS = (
    "tags",
    "caption",
    "objects.box",
    "objects.phrase",
    "objects.detector_score",
    "objects.mask",
    "objects.mask_score",
    "objects.mask_box",
    "objects.description",
    "objects.clip_score",
)
UNKNOWN = "unknown"
NOT_MADE = "not made by this run"


def fields_of(run: Mapping | None) -> dict[str, dict | str]:
    """Each of ``FIELDS`` -> what made it (the recorded dict), ``NOT_MADE``, or ``UNKNOWN`` when the run
    record has no provenance (or there is no record)."""
    recorded = run.get("provenance") if isinstance(run, Mapping) else None
    fields = recorded.get("fields") if isinstance(recorded, Mapping) else None
    if not isinstance(fields, Mapping):
        return dict.fromkeys(FIELDS, UNKNOWN)
    return {f: dict(fields[f]) if isinstance(fields.get(f), Mapping) else NOT_MADE for f in FIELDS}


def describe(made: Mapping[str, Any] | str) -> str:
    """One field's maker as a line: ``name@revision (backend, dtype, engine[, weights])``."""
    if isinstance(made, str):
        return made
    if made.get("model") is None:
        return f"no model: {made.get('method', '?')} (stage {made.get('stage', '?')})"
    name = str(made["model"]) + (f"@{made['revision']}" if made.get("revision") else "")
    details = [str(made.get(k)) for k in ("backend", "dtype", "engine") if made.get(k)]
    if made.get("weights"):
        details.append(f"weights {made['weights']}")
    return f"{name} ({', '.join(details)})"


def grouped(run: Mapping | None) -> list[tuple[str, list[str]]]:
    """``(maker, [fields])`` in field order, fields with the same maker together (``info``'s lines)."""
    groups: dict[str, list[str]] = {}
    for f, made in fields_of(run).items():
        groups.setdefault(describe(made), []).append(f)
    return list(groups.items())


def summary_lines(run: Mapping | None) -> list[str]:
    """The provenance as text lines, ``<fields>: <maker>``; one line saying ``unknown`` for an old run."""
    groups = grouped(run)
    if [m for m, _ in groups] == [UNKNOWN]:
        why = "no run.json" if run is None else "run.json written before datagen recorded its models"
        return [f"{UNKNOWN} ({why})"]
    return [f"{', '.join(fields)}: {maker}" for maker, fields in groups]

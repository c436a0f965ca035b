"""The on-disk contract: WebDataset shards with a parquet index, read and written the same way everywhere.

A dataset folder (local path or fsspec URI) holds ``run.json``, ``index.json`` and per shard
``NNNNNN.tar`` + ``NNNNNN.parquet`` + ``NNNNNN.stats.json`` (written last: the shard is complete).

Names are imported on first use (PEP 562), so ``shards.schema`` and ``shards.paths`` stay light
(stdlib and fsspec only) for callers that must not pull in pandas, webdataset or torch.
"""

from __future__ import annotations

import importlib

# public name -> submodule defining it
_EXPORTS = {
    **dict.fromkeys(
        ("DatasetError", "DatasetHandle", "RunMismatchError", "ShardInfo", "build_index", "fingerprint",
         "list_shards", "open_run", "read_run", "tar_urls"),
        "dataset",
    ),
    **dict.fromkeys(("decode_mask", "encode_mask", "mask_to_box"), "masks"),
    **dict.fromkeys(("Sample", "iter_samples", "to_sample"), "reader"),
    **dict.fromkeys(
        ("OBJECT_FIELDS", "SCHEMA_VERSION", "STAGE_ORDER", "STATUSES", "STATUS_FAILED", "STATUS_FILTERED",
         "STATUS_OK", "ObjectRecord", "SampleRecord", "SchemaError", "canonical_json", "check_key",
         "json_sha256"),
        "schema",
    ),
    **dict.fromkeys(("Problem", "validate_dataset", "validate_shard"), "validate"),
    **dict.fromkeys(("PARQUET_COLUMNS", "ShardStats", "ShardWriter"), "writer"),
    **dict.fromkeys(("detect_padding", "from_release"), "release"),
    **dict.fromkeys(("write_dataset",), "user_dataset"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shards' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

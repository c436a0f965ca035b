"""The on-disk contract: WebDataset shards with a parquet index, read and written the same way everywhere.

A dataset folder (local path or fsspec URI) holds ``run.json``, ``index.json`` and per shard
``NNNNNN.tar`` + ``NNNNNN.parquet`` + ``NNNNNN.stats.json`` (written last: the shard is complete).
"""

from .dataset import (
    RunMismatchError,
    ShardInfo,
    build_index,
    fingerprint,
    list_shards,
    open_run,
    read_run,
    tar_urls,
)
from .masks import decode_mask, encode_mask, mask_to_box
from .reader import Sample, iter_samples, to_sample
from .schema import SCHEMA_VERSION, ObjectRecord, SampleRecord, SchemaError, check_key
from .validate import Problem, validate_dataset, validate_shard
from .writer import (
    PARQUET_COLUMNS,
    STATUS_FAILED,
    STATUS_FILTERED,
    STATUS_OK,
    ShardStats,
    ShardWriter,
)

__all__ = [
    "PARQUET_COLUMNS",
    "SCHEMA_VERSION",
    "STATUS_FAILED",
    "STATUS_FILTERED",
    "STATUS_OK",
    "ObjectRecord",
    "Problem",
    "RunMismatchError",
    "Sample",
    "SampleRecord",
    "SchemaError",
    "ShardInfo",
    "ShardStats",
    "ShardWriter",
    "build_index",
    "check_key",
    "decode_mask",
    "encode_mask",
    "fingerprint",
    "iter_samples",
    "list_shards",
    "mask_to_box",
    "open_run",
    "read_run",
    "tar_urls",
    "to_sample",
    "validate_dataset",
    "validate_shard",
]

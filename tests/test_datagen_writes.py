"""Shards written where the rows are: chunk parts, their summaries, sealing (also by two writers at once),
and every file of an input folder accounted for. No Ray: these are the functions the Ray tasks run.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datagen.chunks import chunk_summary
from datagen.inputs import list_inputs
from datagen.pipeline import _FailFast
from datagen.stages.write import WriteConfig, pack, parts_dir, read_part, seal_shard, write_part, write_shard
from datagen.synthetic import make_image_folder
from shards import DatasetHandle, list_shards, open_run, validate_dataset


def _row(key: str, status: str = "ok", seed: int = 0) -> dict:
    img = np.random.default_rng(seed).integers(0, 255, size=(32, 40, 3), dtype=np.uint8)
    return {"key": key, "source": f"src/{key}", "source_caption": "alt", "meta": {}, "image": img,
            "source_jpeg": None, "width": 40, "height": 32, "original_width": 80, "original_height": 64,
            "status": status, "error_stage": None if status == "ok" else "decode",
            "error": None if status == "ok" else "truncated: image file is truncated", "caption": "a caption",
            "objects": [{"box": [1, 2, 30, 20], "phrase": "thing", "detector_score": 0.5}]}


def _entries(keys: list[str], failed: tuple[str, ...] = ()) -> list[dict]:
    rows = [_row(k, "failed" if k in failed else "ok", seed=i) for i, k in enumerate(keys)]
    return pack({k: [r[k] for r in rows] for k in rows[0]}, WriteConfig())


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("000000.*"))}


def test_a_part_round_trips_and_is_byte_reproducible(tmp_path):
    entries = _entries(["k1", "k2", "k3"], failed=("k2",))
    ds = DatasetHandle.open(str(tmp_path))
    folder = parts_dir(ds, "run1", 0)
    path = write_part(ds, folder, 16, entries)
    assert path == str(tmp_path / "_parts" / "run1" / "000000" / "000000016.tar")
    back = read_part(ds, path)
    # Records hold NaN for unknown scores (nan != nan): compare their JSON, and the images as bytes.
    assert [json.dumps({k: v for k, v in e.items() if k != "image"}, sort_keys=True) for e in back] == [
        json.dumps({k: v for k, v in e.items() if k != "image"}, sort_keys=True) for e in entries]
    assert [e.get("image") for e in back] == [e.get("image") for e in entries]
    assert isinstance(back[0]["image"], bytes) and "image" not in back[1]
    first = Path(path).read_bytes()
    write_part(ds, folder, 16, entries)  # a second writer of the same part: same bytes, no temp file left
    assert Path(path).read_bytes() == first
    assert sorted(p.name for p in Path(folder).iterdir()) == ["000000016.tar"]


def test_chunk_summary_holds_counts_not_images():
    entries = _entries(["k1", "k2", "k3", "k4"], failed=("k2", "k4"))
    packed = {"shard": 3, "start": 8, "entries": entries, "busy": {"pack": [4, 0.5]}, "nodes": ["n1"]}
    s = chunk_summary(packed)
    assert s == {"shard": 3, "start": 8, "rows": 4, "statuses": {"ok": 2, "failed": 2},
                 "failures": [["decode", "truncated: image file is truncated", "truncated", 2]], "objects": 2,
                 "busy": {"pack": [4, 0.5]}, "nodes": ["n1"]}
    assert len(json.dumps(s)) < 400


def test_the_fail_fast_guard_counts_summaries_as_it_counts_entries():
    entries = _entries(["a", "b", "c"], failed=("a", "b", "c"))
    by_entries, by_summary = _FailFast(6), _FailFast(6)
    by_entries.update(entries)
    by_summary.update_summary(chunk_summary({"shard": 0, "start": 0, "entries": entries, "busy": {}, "nodes": []}))
    assert (by_entries.seen, by_entries.reasons) == (by_summary.seen, by_summary.reasons) == (
        3, {("decode", "truncated"): 3})
    with pytest.raises(RuntimeError, match="stage 'decode' failed on every one of the first 6 inputs"):
        by_summary.update_summary({"statuses": {"failed": 3}, "failures": [["decode", "x", "truncated", 3]]})
    kept = _FailFast(2)
    kept.update_summary({"statuses": {"failed": 1, "ok": 1}, "failures": [["decode", "x", "truncated", 1]]})
    kept.update_summary({"statuses": {"failed": 5}, "failures": [["decode", "x", "truncated", 5]]})
    assert kept.ok  # a kept row: the setup works, failures after it are the inputs' own


def test_sealing_from_parts_equals_writing_the_entries_and_removes_the_parts(tmp_path):
    entries = _entries([f"k{i}" for i in range(5)], failed=("k3",))
    direct = write_shard(str(tmp_path / "direct"), 0, entries)
    out = tmp_path / "sealed"
    folder = parts_dir(str(out), "tok", 0)
    parts = [write_part(str(out), folder, 0, entries[:2]), write_part(str(out), folder, 2, entries[2:])]
    sealed = seal_shard(str(out), 0, parts)
    assert sealed == direct
    assert _files(out) == _files(tmp_path / "direct")
    assert not Path(folder).exists()
    assert validate_dataset(str(out)) == []


def _seal_in_process(out: DatasetHandle, token: str, entries: list[dict], fingerprint: str, rounds: int) -> None:
    for _ in range(rounds):  # a run's parts, then its seal (which removes them), again and again
        folder = parts_dir(out, token, 0)
        parts = [write_part(out, folder, i, entries[i : i + 8]) for i in range(0, len(entries), 8)]
        seal_shard(out, 0, parts, fingerprint=fingerprint)


def test_two_writers_sealing_one_shard_at_once_leave_a_valid_shard(tmp_path):
    # A killed run's orphaned seal task and the restarted run's seal the same shard at the same time, each
    # from its own run's parts: every file is renamed into place whole and both write the same bytes.
    entries = _entries([f"k{i}" for i in range(40)], failed=("k7",))
    reference = tmp_path / "ref"
    write_shard(str(reference), 0, entries)
    out = str(tmp_path / "out")
    fingerprint = open_run(out, {"x": 1})["fingerprint"]
    ctx = multiprocessing.get_context("spawn")
    # Each process receives the handle pickled, as Ray's seal tasks do.
    procs = [ctx.Process(target=_seal_in_process, args=(DatasetHandle.open(out), token, entries, fingerprint, 8))
             for token in ("orphan", "restart")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert validate_dataset(out) == []
    assert [s.complete for s in list_shards(out)] == [True]
    assert _files(Path(out)) == _files(reference)
    assert sorted(p.name for p in Path(out).iterdir()) == ["000000.parquet", "000000.stats.json", "000000.tar",
                                                           "_parts", "run.json"]  # no temporary file left
    for token in ("orphan", "restart"):  # each writer removed its own run's parts of the shard
        assert list((Path(out) / "_parts" / token).iterdir()) == []


def test_a_writer_of_a_superseded_configuration_writes_nothing(tmp_path):
    out = str(tmp_path / "out")
    old = open_run(out, {"x": 1})["fingerprint"]
    open_run(out, {"x": 2}, new_run=True)  # the output now belongs to another configuration
    parts = [write_part(out, parts_dir(out, "old", 0), 0, _entries(["k1"]))]
    assert seal_shard(out, 0, parts, fingerprint=old) == {"shard": "000000", "superseded": True}
    assert list_shards(out) == []


def test_every_file_of_an_input_folder_is_an_input(tmp_path):
    paths = make_image_folder(tmp_path, 3, seed=0, min_size=32, max_size=48)
    (tmp_path / "README.md").write_text("about these images\n")
    (tmp_path / "img_0001.json").write_text(json.dumps({"url": "http://example.com/1.jpg"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "img_0000.jpg", "img_0000.txt", "img_0001.jpg", "img_0001.json", "img_0001.txt",
        "img_0002.jpg", "img_0002.txt"]
    items = list_inputs(str(tmp_path))
    assert [Path(i.source).name for i in items] == ["README.md", *(p.name for p in paths)]
    assert items[0].failure == "not an image" and items[0].uri == ""
    assert all(i.failure is None and i.caption.startswith("a picture of ") for i in items[1:])
    assert items[2].meta == {"url": "http://example.com/1.jpg"}
    assert pd.Series([i.key for i in items]).is_unique

"""``shards.dataset.DatasetHandle``: one handle per dataset, listings made afresh, pickled to workers; an
output that cannot be written refused before any work; ``run.json`` and stats files of another shape
named by file and field (one ``error:`` line, exit 2; a damaged shard, redone by datagen's resume)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import fsspec
import pytest
from s3_fixture import s3_bucket, s3_server  # noqa: F401  (fixtures)
from test_datagen_writes import _entries
from test_shards import write_dataset

from datagen.cli import main as datagen_main
from datagen.config import build_config
from datagen.inputs import list_inputs
from datagen.plan import plan_jobs
from datagen.stages.write import write_shard
from shards import DatasetError, DatasetHandle, list_shards, open_run, read_run, validate_dataset
from shards.__main__ import main as shards_main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "datagen" / "tiny.yaml")


def _other_client_writes_shard(src: Path, ds: str, shard: str = "000001") -> None:
    # Another process (a Ray worker, a killed run) writes: a fresh client, not this process's cache.
    other = fsspec.filesystem("s3", skip_instance_cache=True)
    for kind in ("tar", "parquet", "stats.json"):
        other.put_file(str(src / f"{shard}.{kind}"), f"{ds[len('s3://'):]}/{shard}.{kind}")


def test_one_handle_lists_afresh_each_call_on_s3_where_the_client_caches_listings(tmp_path, s3_bucket):  # noqa: F811
    ds = f"{s3_bucket}/ds"
    write_dataset(ds, shard_id=0)
    handle = DatasetHandle.open(ds)
    assert [s.name for s in handle.shards()] == ["000000"]
    write_dataset(tmp_path / "other", shard_id=1)
    _other_client_writes_shard(tmp_path / "other", ds)
    # The handle's client kept its listing: reading it would miss shard 1 (this is what shards() avoids).
    assert [p.rsplit("/", 1)[-1] for p in handle.fs.ls(handle.root, detail=False)] == [
        "000000.parquet", "000000.stats.json", "000000.tar"]
    assert [(s.name, s.complete) for s in handle.shards()] == [("000000", True), ("000001", True)]
    assert handle.build_index()["totals"]["samples"] == 10


def test_a_pickled_handle_lists_and_reads_as_the_original(tmp_path, s3_bucket):  # noqa: F811
    # Ray tasks receive the handle pickled (the pack and seal tasks): filesystem, root and run record travel.
    for uri in (str(tmp_path / "local"), f"{s3_bucket}/ds", "memory://handle-test/ds"):
        write_dataset(uri, shard_id=0)
        handle = DatasetHandle.open(uri).open_run({"x": 1}, {"host": "h"})
        back = pickle.loads(pickle.dumps(handle))
        assert (back.uri, back.root, type(back.fs), back.run) == (uri, handle.root, type(handle.fs), handle.run)
        assert back.shards() == handle.shards() and back.read_stats(back.shards()[0])["samples"] == 5
        assert back.read_run() == handle.run == read_run(uri)
        if uri.startswith("s3://"):  # opened without options: each worker's own credential chain applies
            assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in pickle.dumps(handle)


def test_a_listing_after_a_new_local_shard_appears_sees_it(tmp_path):
    handle = DatasetHandle.open(str(tmp_path))
    assert handle.shards(missing_ok=True) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DatasetHandle.open(str(tmp_path / "nope")).shards()
    write_dataset(tmp_path, shard_id=0)
    assert [s.name for s in handle.shards()] == ["000000"]
    write_dataset(tmp_path, shard_id=3)
    assert [s.name for s in handle.shards()] == ["000000", "000003"]


# --- an output that cannot be written: refused when the handle is opened, before any work ---------------

UNWRITABLE = {
    "http": ("http://127.0.0.1:1/x", "HTTPFileSystem is read-only"),
    "long name": (None, "File name too long"),  # a path component of 300 bytes (the limit is 255)
    "file in place of a folder": (None, "Not a directory"),
    "read-only": ("/proc/richlayout-out", "No such file or directory"),  # as root too: procfs makes no folders
}


@pytest.mark.parametrize("case", UNWRITABLE)
def test_an_output_that_cannot_be_written_is_one_error_line_before_any_work(case, tmp_path, capsys):
    uri, why = UNWRITABLE[case]
    if case == "long name":
        uri = str(tmp_path / ("n" * 300) / "out")
    elif case == "file in place of a folder":
        (tmp_path / "afile").write_text("x")
        uri = str(tmp_path / "afile" / "out")
    # The input does not exist: the output is checked first, so its error is the one reported.
    argv = ["run", "--config", TINY, "--input", str(tmp_path / "no-inputs"), "--output", uri]
    assert datagen_main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: --output {uri}: cannot be written ({why}" + err[err.index(why) + len(why):]
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["afile"] if case == "file in place of a folder" else [])


def test_opening_a_new_output_checks_it_and_leaves_nothing_behind(tmp_path, s3_bucket):  # noqa: F811
    handle = DatasetHandle.create(str(tmp_path / "a" / "b" / "out"))
    assert handle.root == str(tmp_path / "a" / "b" / "out") and list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("x")
    DatasetHandle.create(str(tmp_path / "old"))
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"]  # the probe file is removed
    DatasetHandle.create(f"{s3_bucket}/out")
    assert fsspec.filesystem("s3", skip_instance_cache=True).find(s3_bucket[len("s3://"):]) == []
    with pytest.raises(DatasetError, match=r"^foo://x: not a usable location \(Protocol not known: foo\)$"):
        DatasetHandle.create("foo://x")


# --- run.json of another shape ------------------------------------------------------------------------

RUN_SHAPES = {
    "list": ([], "must hold a JSON object, got a list []"),
    "string": ("abc", 'must hold a JSON object, got a string "abc"'),
    "fingerprint missing": ({"config": {}}, "field 'fingerprint' is missing (expected a string"),
    "config missing": ({"fingerprint": "ab"}, "field 'config' is missing (expected an object"),
    "number for fingerprint": ({"fingerprint": 12, "config": {}}, "field 'fingerprint' must be a string"),
    "string for config": ({"fingerprint": "ab", "config": "x"}, "field 'config' must be an object"),
}


@pytest.mark.parametrize("shape", RUN_SHAPES)
def test_run_json_of_another_shape_is_one_error_line_naming_file_and_field(shape, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "0.jpg").write_bytes(b"not even an image")  # the run stops before decoding
    out = tmp_path / "out"
    write_dataset(out, shard_id=0)
    content, why = RUN_SHAPES[shape]
    (out / "run.json").write_text(json.dumps(content))
    expected = f"error: {out / 'run.json'}: {why}"
    argv = ["run", "--config", TINY, "--input", str(tmp_path / "in"), "--output", str(out)]
    for main, args in ((datagen_main, argv), (shards_main, ["info", str(out)])):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1 and "Traceback" not in err, err
    assert json.loads((out / "run.json").read_text()) == content  # left as it was
    assert not (out / "runs").exists()


@pytest.mark.parametrize("text", ['{"fingerprint": "ab", ', "[" * 100_000 + "]" * 100_000, "9" * 5000, b"\xff{}"])
def test_run_json_that_is_not_json_or_beyond_limits_names_the_file(text, tmp_path):
    open_run(str(tmp_path), {"x": 1})
    (tmp_path / "run.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DatasetError, match=rf"^{tmp_path / 'run.json'}: not valid JSON \("):
        open_run(str(tmp_path), {"x": 1})
    write_dataset(tmp_path, shard_id=0)
    (tmp_path / "000000.stats.json").write_bytes((tmp_path / "run.json").read_bytes())
    with pytest.raises(DatasetError, match=rf"^{tmp_path / '000000.stats.json'}: not valid JSON \("):
        list(map(DatasetHandle.open(str(tmp_path)).read_stats, list_shards(str(tmp_path))))


# --- a stats file of another shape --------------------------------------------------------------------

STATS_SHAPES = {
    "list": (lambda st: [st], "must hold a JSON object, got a list"),
    "string for a count": (lambda st: {**st, "samples": "5"}, "field 'samples' must be a count (an integer >= 0), "
                           'got a string "5"'),
    "key missing": (lambda st: {k: v for k, v in st.items() if k != "objects"}, "field 'objects' is missing"),
    "list for failures_by_stage": (lambda st: {**st, "failures_by_stage": ["decode"]},
                                   "field 'failures_by_stage' must be an object of stage -> count"),
    "string for tar_bytes": (lambda st: {**st, "tar_bytes": "12"}, "field 'tar_bytes' must be a size in bytes"),
    "boolean for a count": (lambda st: {**st, "failures": True}, "field 'failures' must be a count"),
}


def _damage_stats(root: Path, shape: str, shard: str = "000001") -> tuple[Path, str]:
    path = root / f"{shard}.stats.json"
    change, why = STATS_SHAPES[shape]
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return path, why


@pytest.mark.parametrize("shape", STATS_SHAPES)
def test_a_stats_file_of_another_shape_is_named_by_info_validate_and_index(shape, tmp_path, capsys):
    write_dataset(tmp_path, shard_id=0)
    write_dataset(tmp_path, shard_id=1)
    path, why = _damage_stats(tmp_path, shape)
    assert shards_main(["info", str(tmp_path), "--json"]) == 1  # a damaged shard, the others counted
    cap = capsys.readouterr()
    info = json.loads(cap.out)
    assert list(info["damaged_shards"]) == ["000001"] and info["samples"] == 5 and info["complete_shards"] == 2
    assert info["damaged_shards"]["000001"].startswith(f"stats unreadable: {path}: {why}")
    assert cap.err.startswith(f"shard 000001: stats unreadable: {path}: {why}") and "Traceback" not in cap.err
    assert shards_main(["validate", str(tmp_path)]) == 1
    cap = capsys.readouterr()
    assert f"shard 000001: stats unreadable: {path}: {why}" in cap.out and "Traceback" not in cap.err
    problems = [str(p) for p in validate_dataset(str(tmp_path))]
    assert len(problems) == 1 and problems[0].startswith(f"shard 000001: stats unreadable: {path}: {why}")
    assert shards_main(["index", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {why}") and err.count("\n") == 1


@pytest.mark.parametrize("shape", STATS_SHAPES)
def test_datagen_resume_redoes_a_shard_whose_stats_file_has_another_shape(shape, tmp_path, caplog):
    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"{i}.jpg").write_bytes(b"x")  # listed only: the plan reads no image
    items = list_inputs(str(tmp_path / "in"))
    cfg = build_config({"inputs": {"samples_per_shard": 2}, "pools": {"p": {"stages": ["tag"]}}})
    out = tmp_path / "out"
    handle = DatasetHandle.open(str(out)).open_run({"x": 1})
    for shard in (0, 1):
        write_shard(handle, shard, _entries([it.key for it in items[2 * shard : 2 * shard + 2]]))
    assert plan_jobs(items, cfg, handle) == ([], 2)
    path, why = _damage_stats(out, shape)
    with caplog.at_level("WARNING", logger="datagen.plan"):
        jobs, skipped = plan_jobs(items, cfg, handle)
    assert skipped == 1 and [(j.shard_id, len(j.items)) for j in jobs] == [(1, 2)]
    assert jobs[0].redo.startswith(f"its stats file is unreadable ({path}: {why}")
    assert f"shard 000001 has a stats file but its stats file is unreadable ({path}: {why}" in caplog.text
    assert [s.complete for s in list_shards(handle)] == [True, True]  # the plan itself changes nothing

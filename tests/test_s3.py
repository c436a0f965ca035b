"""Datasets and inputs on ``s3://``: a moto S3 server on 127.0.0.1, s3fs as the client, configured through
``AWS_ENDPOINT_URL`` and credentials in the environment as users configure S3 (tests/s3_fixture.py).

Fast: input listing and decode, the shards CLI, a listing made before another process wrote, the
training stream over two ranks, the output_dir check. Slow: datagen from S3 inputs (folder, img2dataset
tars, a parquet list) and an HTTP folder to an S3 output through the CLI and a local Ray, then SIGKILL and
resume.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient
from PIL import Image
from s3_fixture import clear_s3fs_cache, free_port, s3_bucket, s3_server, upload  # noqa: F401  (fixtures)
from stats_fixture import EXPECTED
from stats_fixture import write_dataset as write_stats_dataset
from test_http_inputs import RangeHandler, serve
from test_notebook import NOTEBOOK, kernel_name  # noqa: F401  (fixture)
from test_stream import config, epoch_keys
from test_stream import write_dataset as write_stream_dataset

from datagen.cli import main as datagen_main
from datagen.inputs import InputError, list_inputs
from datagen.stages.decode import DecodeConfig, DecodeStage
from datagen.synthetic import make_image_folder
from shards import build_index, list_shards, validate_dataset
from shards.__main__ import main as shards_main
from training.data.stream import build_loader


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), value, np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_raw_inputs(root: Path) -> dict[str, Path]:
    """The three input kinds: an image folder, img2dataset tars (+ download log) and a parquet list."""
    make_image_folder(root / "folder", 6, seed=1, min_size=64, max_size=128)
    (root / "folder" / "captions.json").unlink(missing_ok=True)
    (root / "folder" / "img_0000.txt").write_text("a caption file\n")
    i2d = root / "i2d"
    i2d.mkdir()
    for t in range(2):
        keys = [f"{t}{i:08d}" for i in range(3)]
        with tarfile.open(i2d / f"0000{t}.tar", "w") as tar:
            for i, key in enumerate(keys[:2]):  # the third failed to download
                img = make_image_folder(root / "tmp" / key, 1, seed=10 * t + i, min_size=64, max_size=128)[0]
                for name, data in ((f"{key}.jpg", img.read_bytes()), (f"{key}.txt", f"alt {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        pd.DataFrame({"key": keys, "status": ["success", "success", "failed_to_download"],
                      "error_message": [None, None, "HTTP Error 404: Not Found"],
                      "url": [f"http://example.com/{k}.jpg" for k in keys]}).to_parquet(i2d / f"0000{t}.parquet")
    lst = root / "list"
    make_image_folder(lst / "images", 4, seed=3, min_size=64, max_size=128)
    pd.DataFrame({"path": [f"images/img_{i:04d}.{'png' if i == 3 else 'jpg'}" for i in range(4)] + ["images/gone.jpg"],
                  "caption": [f"list {i}" for i in range(5)]}).to_parquet(lst / "list.parquet")
    return {"folder": root / "folder", "i2d": i2d, "list": lst / "list.parquet"}


def _decode(items) -> dict:
    columns = {k: [it.to_dict()[k] for it in items] for k in items[0].to_dict()}
    return DecodeStage(DecodeConfig(min_side=8))(columns)


def test_inputs_on_s3_list_and_decode_like_the_same_files_on_disk(tmp_path, s3_bucket):  # noqa: F811
    local = make_raw_inputs(tmp_path)
    upload(tmp_path, f"{s3_bucket}/raw")
    for kind, path in local.items():
        url = f"{s3_bucket}/raw/{path.relative_to(tmp_path).as_posix()}"
        items, ref = list_inputs(url), list_inputs(str(path))
        assert [i.key for i in items] == [i.key for i in ref], kind  # keys from the identity, not the location
        assert [(i.caption, i.failure, i.meta) for i in items] == [(i.caption, i.failure, i.meta) for i in ref], kind
        assert all(i.uri.startswith(f"{s3_bucket}/raw/") for i in items if i.uri), kind
        out, want = _decode(items), _decode(ref)
        assert out["status"] == want["status"] and out["error"] == want["error"], kind
        assert out["source_jpeg"] == want["source_jpeg"], kind
    assert _decode(list_inputs(f"{s3_bucket}/raw/i2d"))["error"][2] == "img2dataset failed_to_download: HTTP Error 404: Not Found"
    assert _decode(list_inputs(f"{s3_bucket}/raw/list/list.parquet"))["error"][4] == "file not found"
    with pytest.raises(InputError, match=re.escape(f"{s3_bucket}/raw/nothing: no such file or folder")):
        list_inputs(f"{s3_bucket}/raw/nothing")


def test_a_shard_written_by_another_process_after_a_listing_is_seen(tmp_path, s3_bucket):  # noqa: F811
    ds = f"{s3_bucket}/ds"
    write_stream_dataset(ds, [3])
    assert [s.name for s in list_shards(ds)] == ["000000"]  # this process has now listed the dataset
    # Another process (a Ray worker, a killed run) writes shard 1: a fresh client, not this process's cache.
    write_stream_dataset(tmp_path / "other", [3, 2], seed=1)
    other = fsspec.filesystem("s3", skip_instance_cache=True)
    for name in ("000001.tar", "000001.parquet", "000001.stats.json"):
        other.put_file(str(tmp_path / "other" / name), f"{ds[len('s3://'):]}/{name}")
    assert [(s.name, s.complete) for s in list_shards(ds)] == [("000000", True), ("000001", True)]
    assert build_index(ds)["totals"]["samples"] == 5
    assert validate_dataset(ds) == []


def test_shards_cli_on_an_s3_dataset_answers_as_on_disk(tmp_path, s3_bucket, capsys):  # noqa: F811
    local = write_stats_dataset(tmp_path / "local")
    ds = f"{s3_bucket}/stats"
    upload(local, ds)
    assert shards_main(["validate", str(local)]) == 1  # the fixture's shard 2 is incomplete on purpose
    on_disk = capsys.readouterr()
    assert shards_main(["validate", ds]) == 1
    assert capsys.readouterr() == (on_disk.out, on_disk.err.replace(str(local), ds))
    assert on_disk.out == "shard 000002: incomplete: no stats file (the run did not finish this shard)\n"
    assert shards_main(["info", "--json", ds]) == 0
    info = json.loads(capsys.readouterr().out)
    assert shards_main(["info", "--json", str(local)]) == 0
    assert {**info, "dataset": None} == {**json.loads(capsys.readouterr().out), "dataset": None}
    assert info["samples"] == EXPECTED["status"]["ok"] and info["incomplete_shards"] == ["000002"]
    assert shards_main(["to-coco", ds, f"{s3_bucket}/coco.json"]) == 0
    assert shards_main(["to-coco", str(local), str(tmp_path / "coco.json")]) == 0
    with fsspec.open(f"{s3_bucket}/coco.json") as f:
        coco = json.load(f)
    assert coco["info"] == {"description": f"richlayout export of {ds}"}
    assert {**coco, "info": None} == {**json.loads((tmp_path / "coco.json").read_text()), "info": None}
    assert shards_main(["report", ds, "--out", f"{s3_bucket}/report/report.html", "--max-samples", "100"]) == 0
    with fsspec.open(f"{s3_bucket}/report/report.html", "rt") as f:
        html = f.read()
    assert "The cat sat on the mat." in html and ds in html
    capsys.readouterr()
    # A tar damaged on S3 is named by validate, as on disk.
    fs, _ = fsspec.core.url_to_fs(ds)
    fs.pipe(f"{ds}/000000.tar", b"not a tar")
    assert shards_main(["validate", ds]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("shard 000000: ") and captured.err.endswith(f" problem(s) in {ds}\n")
    assert shards_main(["info", f"{s3_bucket}/nothing-here"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_stream_every_sample_of_an_s3_dataset_exactly_once(s3_bucket, num_workers):  # noqa: F811
    ds = f"{s3_bucket}/stream"
    keys = write_stream_dataset(ds, [6] * 4)  # written by ShardWriter straight to S3
    assert validate_dataset(ds) == []
    cfg = config([ds], num_workers=num_workers, batch_size=2)
    seen = [k for rank in range(2) for batch in epoch_keys(build_loader(cfg, rank=rank, world_size=2)) for k in batch]
    assert sorted(seen) == sorted(keys)


def test_the_stats_notebook_runs_on_an_s3_dataset(tmp_path, s3_bucket, monkeypatch, kernel_name):  # noqa: F811
    ds = f"{s3_bucket}/nb"
    upload(write_stats_dataset(tmp_path / "local"), ds)
    monkeypatch.setenv("RICHLAYOUT_DATASETS", ds)  # the kernel inherits the S3 variables from os.environ
    monkeypatch.setenv("RICHLAYOUT_MAX_SAMPLES", "100")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name=kernel_name, timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 7
    html = "".join(o["data"].get("text/html", "") for o in outputs if "data" in o)
    assert "The cat sat on the mat." in html and "RuntimeError: CUDA out of memory" in html


@pytest.mark.parametrize("override", ["output_dir=s3://bucket/run", "checkpoint.resume=s3://bucket/run/checkpoints/step_0000010"])
def test_a_training_output_or_resume_uri_is_one_error_line_naming_the_field(override, tmp_path, capsys):
    from training.trainer.loop import main as train_main

    argv = ["--config", "configs/train/tiny.yaml", "--override", f"output_dir={tmp_path / 'out'}", "--override", override]
    assert train_main(argv) == 2
    out, err = capsys.readouterr()
    name, value = override.split("=", 1)
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: ") and f"{name} {value!r} must be a local path" in err, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# datagen end to end: S3 (and HTTP) inputs -> local Ray -> S3 output, through the CLI in a subprocess.

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "datagen" / "tiny.yaml")
SHARDS = 5  # 20 inputs, 4 per shard


def _datagen_cmd(inputs: list[str], output: str) -> list[str]:
    return [sys.executable, "-m", "datagen", "run", "--config", TINY, *(a for i in inputs for a in ("--input", i)),
            "--output", output, "--no-progress", "--set", "inputs.samples_per_shard=4", "--set", "execution.num_cpus=2",
            # one chunk per shard: shards are sealed over several waves of chunks, so a kill at the first
            # sealed shard lands mid-run (with tiny.yaml's 16-input chunks four shards seal at once)
            "--set", "execution.chunk_size=4"]


def _env() -> dict:
    # The S3 variables are in os.environ (s3_server): the CLI and the local Ray it starts inherit them.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONHASHSEED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def _read_all(url_glob: str) -> dict[str, bytes]:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)  # no listing cached by this process
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in sorted(fs.glob(url_glob[len("s3://"):]))}


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory, s3_server):  # noqa: F811
    """One uninterrupted run: an S3 image folder, S3 img2dataset tars, an S3 parquet list and an HTTP folder."""
    import boto3

    root = tmp_path_factory.mktemp("s3run")
    bucket = "s3://datagen-e2e"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket[len("s3://"):])
    make_raw_inputs(root / "raw")
    upload(root / "raw", f"{bucket}/raw")
    make_image_folder(root / "www" / "photos", 3, seed=5, min_size=64, max_size=128)
    server, http = serve(root / "www", RangeHandler)
    inputs = [f"{bucket}/raw/folder", f"{bucket}/raw/i2d/", f"{bucket}/raw/list/list.parquet", f"{http}/photos/"]
    proc = subprocess.run(_datagen_cmd(inputs, f"{bucket}/out"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    try:
        yield inputs, bucket, proc
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_datagen_reads_s3_and_http_inputs_and_writes_a_complete_dataset_to_s3(s3_run):
    inputs, bucket, proc = s3_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = f"{bucket}/out"
    items = list_inputs(inputs)
    assert len(items) == 20
    assert validate_dataset(out) == []
    assert [s.complete for s in list_shards(out)] == [True] * SHARDS
    df = pd.concat([pd.read_parquet(io.BytesIO(b)) for b in _read_all(f"{out}/*.parquet").values()], ignore_index=True)
    assert sorted(df.key) == sorted(i.key for i in items)  # every input has exactly one row
    failed = dict(zip(df.source, df.error, strict=True))
    assert failed["http://example.com/000000002.jpg"] == "img2dataset failed_to_download: HTTP Error 404: Not Found"
    assert failed[f"{bucket}/raw/list/images/gone.jpg"] == "file not found"
    assert (df.status == "ok").sum() >= 10
    # The end-of-run summary and index.json count what the shards hold (the driver saw the workers' files).
    index = json.loads(_read_all(f"{out}/index.json")["index.json"])
    assert index["totals"]["samples"] == (df.status == "ok").sum() > 0
    assert re.search(rf"samples\s+{index['totals']['samples']}\s", proc.stdout), proc.stdout
    assert len(_read_all(f"{out}/runs/*.json")) == 1
    assert shards_main(["validate", out]) == 0
    assert datagen_main(["size", "--from", out, "--images", "100000", "--hours", "24", "--json"]) == 0  # reads runs/
    # The training stream reads datagen's S3 output (images, boxes, masks); exactly-once is tested above on
    # even shards, here the epoch's fixed length leaves out a few samples of the uneven shards.
    loaders = [build_loader(config([out], batch_size=2), rank=rank, world_size=2) for rank in range(2)]
    seen = [k for loader in loaders for batch in epoch_keys(loader) for k in batch]
    assert len(seen) == 2 * sum(len(loader) for loader in loaders) > 0
    assert set(seen) <= set(df.key[df.status == "ok"])


@pytest.mark.slow
def test_sigkill_then_resume_on_s3_gives_byte_identical_shards(s3_run):
    inputs, bucket, reference = s3_run
    assert reference.returncode == 0, reference.stderr[-4000:]
    out = f"{bucket}/killed"
    proc = subprocess.Popen(_datagen_cmd(inputs, out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 500
        while not _read_all(f"{out}/*.stats.json"):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before any shard was written"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (its process group)
        proc.wait()
    # A write already sent to the S3 server still lands after the kill: count shards once the listing has
    # stopped changing.
    complete, settled = None, [s.complete for s in list_shards(out)]
    while settled != complete:
        complete = settled
        time.sleep(1.0)
        settled = [s.complete for s in list_shards(out)]
    assert 0 < sum(complete) < SHARDS, complete  # killed mid-run
    resumed = subprocess.run(_datagen_cmd(inputs, out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"{sum(complete)} already complete" in resumed.stdout
    for pattern in ("*.tar", "*.parquet"):
        assert _read_all(f"{out}/{pattern}") == _read_all(f"{bucket}/out/{pattern}")
    assert validate_dataset(out) == []


def test_ray_workers_on_other_nodes_get_the_s3_endpoint_and_region_but_not_the_secrets(s3_server, monkeypatch):  # noqa: F811
    import ray

    from datagen import pipeline
    from datagen.config import load_config

    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        raise KeyboardInterrupt  # stop before anything starts

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(KeyboardInterrupt):
        pipeline.init_ray(load_config(TINY))
    env = calls[0]["runtime_env"]["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == s3_server and env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env  # nodes bring their own


@pytest.mark.parametrize("mistake", ["no credentials", "endpoint down"])
def test_an_s3_setup_mistake_is_one_error_line_in_both_clis(mistake, s3_bucket, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore: no retries with back-off
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if mistake == "no credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            monkeypatch.setenv(name, str(tmp_path / "none"))
        expected = "error: Unable to locate credentials\n"
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        expected = "error: Could not connect to the endpoint URL: "
    clear_s3fs_cache()
    try:
        assert shards_main(["info", f"{s3_bucket}/ds"]) == 2
        out, err = capsys.readouterr()
        assert err.startswith(expected) and err.count("\n") == 1 and "Traceback" not in err, err
        argv = ["run", "--config", TINY, "--input", f"{s3_bucket}/in", "--output", str(tmp_path / "out")]
        assert datagen_main(argv) == 2
        out, err = capsys.readouterr()
        assert err.startswith(expected) and err.count("\n") == 1 and "Traceback" not in err, err
    finally:
        clear_s3fs_cache()

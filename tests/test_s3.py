"""Datasets and inputs on ``s3://``: a moto S3 server on 127.0.0.1, s3fs as the client, configured through
``AWS_ENDPOINT_URL`` and credentials in the environment as users configure S3 (tests/s3_fixture.py).

Fast: input listing and decode, the shards CLI, a listing made before another process wrote, the
training stream over two ranks, the output_dir check. Slow: datagen from S3 inputs (folder, img2dataset
tars, a parquet list) to an S3 output through the CLI and a local Ray, then SIGKILL and resume.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient
from PIL import Image
from s3_fixture import s3_bucket, s3_server, upload  # noqa: F401  (fixtures)
from stats_fixture import EXPECTED
from stats_fixture import write_dataset as write_stats_dataset
from test_notebook import NOTEBOOK, kernel_name  # noqa: F401  (fixture)
from test_stream import config, epoch_keys
from test_stream import write_dataset as write_stream_dataset

from datagen.inputs import list_inputs
from datagen.stages.decode import DecodeConfig, DecodeStage
from datagen.synthetic import make_image_folder
from shards import build_index, list_shards, validate_dataset
from shards.__main__ import main as shards_main
from training.stream import build_loader


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
    from training.train import main as train_main

    argv = ["--config", "configs/train/tiny.yaml", "--override", f"output_dir={tmp_path / 'out'}", "--override", override]
    assert train_main(argv) == 2
    out, err = capsys.readouterr()
    name, value = override.split("=", 1)
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: ") and f"{name} {value!r} must be a local path" in err, err
    assert not (tmp_path / "out").exists()

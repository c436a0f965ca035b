"""Datagen without Ray: input listing and keys, decode, pack/write, config, chunk batching, resume plans."""

from __future__ import annotations

import importlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datagen_fixture import make_awkward_files
from PIL import Image

from datagen.chunks import ShardJob, _split, make_chunks, run_stage_on_chunk
from datagen.cli import main
from datagen.config import ConfigError, build_config, fingerprint_dict, load_config
from datagen.inputs import InputError, InputItem, assign_shards, inputs_digest, list_inputs, make_key
from datagen.pipeline import _FailFast, _stage_error
from datagen.plan import plan_jobs, plan_text, shard_problem
from datagen.stages import StageError
from datagen.stages.decode import DecodeConfig, DecodeStage, decode_image
from datagen.stages.write import WriteConfig, pack, write_shard
from shards import RunMismatchError, check_key, list_shards, open_run, validate_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "datagen"


def _jpeg(rgb: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _rgb(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def _columns(items) -> dict:
    return {k: [it.to_dict()[k] for it in items] for k in items[0].to_dict()}


# ------------------------------------------------------------------------------------------ inputs


def test_folder_listing_is_recursive_sorted_and_keys_are_stable(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(_rgb()).save(tmp_path / "a" / "b" / "deep.png")
    (tmp_path / "top.jpg").write_bytes(_jpeg(_rgb()))
    (tmp_path / "top.txt").write_text("a red car\n")
    (tmp_path / "top.json").write_text(json.dumps({"url": "http://example.com/top.jpg"}))
    Image.fromarray(_rgb()).save(tmp_path / "a" / "x.webp")
    (tmp_path / "notes.md").write_text("not an input")
    items = list_inputs(str(tmp_path))
    # Every file is accounted for: notes.md is an input that fails ("not an image"); top's .txt and .json are its sidecars.
    assert [Path(i.source).name for i in items] == ["deep.png", "x.webp", "notes.md", "top.jpg"]
    assert [i.failure for i in items] == [None, None, "not an image", None]
    top = items[-1]
    assert top.caption == "a red car" and top.meta == {"url": "http://example.com/top.jpg"}
    assert all(check_key(i.key) for i in items) and top.key.startswith("top-")
    # Keys come from the path relative to the input: a moved copy lists the same keys and order.
    copy = shutil.copytree(tmp_path, tmp_path.parent / "moved")
    assert [i.key for i in list_inputs(str(copy))] == [i.key for i in items]
    assert inputs_digest(list_inputs(str(copy))) == inputs_digest(items)


def test_folders_decode_every_format_pillow_opens_and_record_dot_files(tmp_path):
    rgb = _rgb(40, 56)
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(rgb).save(tmp_path / "b.bmp")
    Image.fromarray(rgb).save(tmp_path / "t.tiff")
    (tmp_path / "j.jpe").write_bytes(_jpeg(rgb))
    (tmp_path / "..jpg").write_bytes(_jpeg(rgb))
    (tmp_path / ".hidden.jpg").write_bytes(_jpeg(rgb))
    items = list_inputs(str(tmp_path))
    assert [Path(i.source).name for i in items] == ["..jpg", ".hidden.jpg", "anim.gif", "b.bmp", "j.jpe", "t.tiff"]
    assert all(check_key(i.key) for i in items)
    out = DecodeStage(DecodeConfig(min_side=8))(_columns(items))
    assert out["status"] == ["failed", "failed", "ok", "ok", "ok", "ok"]
    assert out["error"][:2] == ["skipped: file name starts with a dot (hidden, no WebDataset key)"] * 2
    assert [(w, h) for w, h in zip(out["width"][2:], out["height"][2:], strict=True)] == [(56, 40)] * 4
    gif = Image.open(tmp_path / "anim.gif").convert("RGB")  # the first frame
    assert np.array_equal(out["image"][2], np.asarray(gif))


def test_make_key_sanitizes_and_hashes_identity():
    k = make_key("dir/My Photo.v2 (1).JPG", "My Photo.v2 (1)")
    assert check_key(k) and "." not in k and k.startswith("My_Photo_v2_1-")
    assert make_key("a/x.jpg", "x") != make_key("b/x.jpg", "x")
    assert make_key("", "...").startswith("img-")


def _img2dataset_tar(path: Path, n: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"{i:09d}"
            for ext, data in (("jpg", _jpeg(_rgb(seed=i))), ("txt", f"caption {i}".encode()),
                              ("json", json.dumps({"url": f"http://x/{i}.jpg", "key": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_img2dataset_webdataset_output_is_read_by_offset(tmp_path):
    out = tmp_path / "i2d"
    out.mkdir()
    _img2dataset_tar(out / "00000.tar", 3)
    _img2dataset_tar(out / "00001.tar", 2)
    pd.DataFrame({"key": ["x"], "status": ["success"]}).to_parquet(out / "00000.parquet")  # download log
    items = list_inputs(str(out))
    assert len(items) == 5
    assert [i.caption for i in items[:3]] == ["caption 0", "caption 1", "caption 2"]
    assert items[0].source.endswith("00000.tar#000000000.jpg") and items[0].meta == {"url": "http://x/0.jpg"}
    decoded = DecodeStage(DecodeConfig(min_side=8))(_columns(items))
    assert decoded["status"] == ["ok"] * 5
    # The stored bytes are the tar member itself (an RGB JPEG within bounds): no re-encode.
    assert decoded["source_jpeg"][1] == _jpeg(_rgb(seed=1))


def _tar_of(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_img2dataset_order_and_failed_downloads_do_not_depend_on_download_order(tmp_path):
    def sample(i: int) -> list[tuple[str, bytes]]:
        key = f"{i:09d}"
        meta = {"url": f"http://x/{i}.jpg", "key": key, "original_width": 640 + i, "original_height": 480}
        return [(f"{key}.jpg", _jpeg(_rgb(seed=i))), (f"{key}.json", json.dumps(meta).encode())]

    log = pd.DataFrame({"key": [f"{i:09d}" for i in range(4)], "url": [f"http://x/{i}.jpg" for i in range(4)],
                        "status": ["success", "failed_to_download", "success", "success"],
                        "error_message": [None, "HTTP Error 404: Not Found", None, None],
                        "original_width": [640.0, None, 642.0, 643.0], "original_height": [480.0, None, 480.0, 480.0]})
    listings = []
    for name, order in (("a", [3, 0, 2]), ("b", [0, 2, 3])):  # two downloads of one URL list
        (tmp_path / name).mkdir()
        _tar_of(tmp_path / name / "00000.tar", [m for i in order for m in sample(i)])
        log.to_parquet(tmp_path / name / "00000.parquet")
        listings.append(list_inputs(str(tmp_path / name)))
    a, b = listings
    assert [i.key for i in a] == [i.key for i in b] and inputs_digest(a) == inputs_digest(b)
    assert [i.source.rsplit("/", 1)[-1] for i in a] == ["00000.tar#000000000.jpg", "1.jpg", "00000.tar#000000002.jpg",
                                                         "00000.tar#000000003.jpg"]
    assert (a[1].failure, a[1].uri, a[1].meta) == ("img2dataset failed_to_download: HTTP Error 404: Not Found", "",
                                                   {"url": "http://x/1.jpg"})
    out = DecodeStage(DecodeConfig(min_side=8))(_columns(a))
    assert out["status"] == ["ok", "failed", "ok", "ok"]
    assert (out["error_stage"][1], out["error"][1]) == ("decode", "img2dataset failed_to_download: HTTP Error 404: Not Found")
    assert list(zip(out["original_width"], out["original_height"], strict=True)) == [
        (640, 480), (None, None), (642, 480), (643, 480)]  # img2dataset's, not the stored 64x48
    # Without a download log, the .json sidecar still gives the original size.
    (tmp_path / "b" / "00000.parquet").unlink()
    items = list_inputs(str(tmp_path / "b"))
    assert [(i.original_width, i.original_height) for i in items] == [(640, 480), (642, 480), (643, 480)]


def test_img2dataset_parquet_rows_are_ordered_by_key_and_carry_their_failures(tmp_path):
    table = pa.table({"key": ["000000002", "000000000", "000000001"], "url": ["http://x/2", "http://x/0", "http://x/1"],
                      "status": ["success", "success", "failed_to_resize"], "error_message": [None, None, "too small"],
                      "original_width": [300, 200, None], "original_height": [100, 150, None],
                      "jpg": [_jpeg(_rgb(seed=2)), _jpeg(_rgb(seed=0)), None]})
    (tmp_path / "p").mkdir()
    pq.write_table(table, tmp_path / "p" / "00000.parquet", row_group_size=2)
    items = list_inputs(str(tmp_path / "p"))
    assert [i.meta["url"] for i in items] == ["http://x/0", "http://x/1", "http://x/2"]
    out = DecodeStage(DecodeConfig(min_side=8))(_columns(items))
    assert out["status"] == ["ok", "failed", "ok"] and out["error"][1] == "img2dataset failed_to_resize: too small"
    assert (out["original_width"][2], out["original_height"][2]) == (300, 100)


def test_img2dataset_parquet_output_and_lists(tmp_path):
    table = pa.table({"key": ["000000000", "000000001"], "caption": ["first", "second"],
                      "url": ["http://x/0", "http://x/1"], "jpg": [_jpeg(_rgb(seed=0)), None]})
    (tmp_path / "p").mkdir()
    pq.write_table(table, tmp_path / "p" / "00000.parquet", row_group_size=1)
    items = list_inputs(str(tmp_path / "p"))
    assert [i.caption for i in items] == ["first", "second"] and items[0].meta == {"url": "http://x/0"}
    out = DecodeStage(DecodeConfig(min_side=8))(_columns(items))
    assert out["status"] == ["ok", "failed"] and "no image bytes" in out["error"][1]

    # A CSV list: relative paths resolve against the list's folder; an empty cell is still an input.
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(_jpeg(_rgb()))
    (tmp_path / "list.csv").write_text("image_path,text\nimgs/a.jpg,hello\n,empty\nimgs/a.jpg,again\nimgs/gone.jpg,x\n")
    items = list_inputs(str(tmp_path / "list.csv"))
    assert [i.caption for i in items] == ["hello", "empty", "again", "x"]
    assert len({i.key for i in items}) == 4  # the repeated path is a separate input, not merged
    out = DecodeStage(DecodeConfig(min_side=8))(_columns(items))
    assert out["status"] == ["ok", "failed", "ok", "failed"]
    assert out["error"][1:4:2] == ["no path or URL given", "file not found"]
    with pytest.raises(InputError, match="no column 'nope'"):
        list_inputs(str(tmp_path / "list.csv"), path_column="nope")
    with pytest.raises(InputError, match="no such file"):
        list_inputs(str(tmp_path / "missing"))


def test_assign_shards_is_fixed_size():
    assert assign_shards(5, 2) == [(0, 0, 2), (1, 2, 4), (2, 4, 5)]
    assert assign_shards(0, 3) == []


# ------------------------------------------------------------------------------------------ decode


def test_decode_awkward_files(tmp_path):
    expected = make_awkward_files(tmp_path)
    items = list_inputs(str(tmp_path))
    out = DecodeStage(DecodeConfig(max_side=256, min_side=16))(_columns(items))
    by_name = {Path(s).name: i for i, s in enumerate(out["source"])}
    assert set(by_name) == set(expected)
    for name, failure in expected.items():
        i = by_name[name]
        if failure is None:
            assert out["status"][i] == "ok", (name, out["error"][i])
            img = out["image"][i]
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and max(img.shape[:2]) <= 256
            assert (out["width"][i], out["height"][i]) == (img.shape[1], img.shape[0])
        else:
            assert out["status"][i] == "failed" and out["error_stage"][i] == "decode"
            assert failure in out["error"][i], (name, out["error"][i])
            assert "0x" not in out["error"][i] and str(tmp_path) not in out["error"][i]  # groupable reasons
    gray16 = out["image"][by_name["gray16.png"]]
    assert gray16[0, 0, 0] == 0 and gray16[-1, -1, 0] == 255  # rescaled, not clipped to white
    rot = by_name["rotated.jpg"]
    assert (out["original_width"][rot], out["original_height"][rot]) == (120, 160)  # EXIF 6 applied
    wide = by_name["wide_large.jpg"]
    assert (out["original_width"][wide], out["width"][wide]) == (4800, 256)
    alpha = out["image"][by_name["alpha.webp"]].astype(int)
    assert alpha.min() >= 120  # half-transparent pixels composited on white


def test_decode_passthrough_and_bounds():
    small = _jpeg(_rgb(40, 50))
    d = decode_image(small, DecodeConfig(min_side=8))
    assert d.source_jpeg == small and d.image.shape == (40, 50, 3)
    d = decode_image(small, DecodeConfig(min_side=8, max_side=25))
    assert d.source_jpeg is None and d.image.shape == (20, 25, 3)
    with pytest.raises(Exception, match="max_pixels"):
        decode_image(small, DecodeConfig(min_side=8, max_pixels=100))


# ------------------------------------------------------------------------------------------ write


def _row(key: str, status: str = "ok", **kw) -> dict:
    img = _rgb(32, 40)
    return {"key": key, "source": f"src/{key}", "source_caption": "alt", "meta": {}, "image": img,
            "source_jpeg": None, "width": 40, "height": 32, "original_width": 80, "original_height": 64,
            "status": status, "error_stage": None if status == "ok" else "decode",
            "error": None if status == "ok" else "empty file (0 bytes)", "caption": "a caption",
            "objects": [{"box": [1, 2, 30, 20], "phrase": "thing", "detector_score": 0.5}], **kw}


def test_pack_and_write_account_for_every_row(tmp_path):
    rows = [_row("k1"), _row("k2", status="failed"), _row("k3", objects=[{"box": [0, 0, 99, 99], "phrase": "x"}])]
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    entries = pack(batch, WriteConfig())
    assert [e["status"] for e in entries] == ["ok", "failed", "failed"]
    assert entries[2]["error_stage"] == "write" and "outside" in entries[2]["error"]  # box off the image
    stats = write_shard(str(tmp_path), 0, entries)
    assert (stats["samples"], stats["failures"]) == (1, 2)
    assert validate_dataset(str(tmp_path)) == []
    df = pd.read_parquet(tmp_path / "000000.parquet")
    assert sorted(df.key) == ["k1", "k2", "k3"]


def test_retry_rewrites_only_the_failed_rows(tmp_path):
    entries = pack({k: [r[k] for r in (_row("k1"), _row("k2", status="failed"))] for k in _row("k1")}, WriteConfig())
    write_shard(str(tmp_path), 0, entries)
    tar_before = (tmp_path / "000000.tar").read_bytes()
    # k2 now decodes: the retry replaces its row, k1 is carried over untouched.
    fixed = pack({k: [v] for k, v in _row("k2").items()}, WriteConfig())
    stats = write_shard(str(tmp_path), 0, fixed, keep_existing=True)
    assert (stats["samples"], stats["failures"]) == (2, 0)
    assert validate_dataset(str(tmp_path)) == []
    both = write_shard(str(tmp_path / "fresh"), 0, pack({k: [r[k] for r in (_row("k1"), _row("k2"))] for k in _row("k1")}, WriteConfig()))
    assert both["tar_sha256"] == stats["tar_sha256"] and tar_before != (tmp_path / "000000.tar").read_bytes()


def test_plan_jobs_resumes_and_retries(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(5):
        (tmp_path / "in" / f"{i}.jpg").write_bytes(_jpeg(_rgb(seed=i)))
    items = list_inputs(str(tmp_path / "in"))
    cfg = build_config({"inputs": {"samples_per_shard": 2}, "pools": {"p": {"stages": ["tag"]}}})
    out = str(tmp_path / "out")
    open_run(out, {"x": 1})
    # Shard 0 complete with one failure, shard 1 incomplete (no stats), shard 2 absent.
    e = pack({k: [v] for k, v in _row(items[0].key).items()}, WriteConfig())
    e += pack({k: [v] for k, v in _row(items[1].key, status="failed").items()}, WriteConfig())
    write_shard(out, 0, e)
    (tmp_path / "out" / "000001.tar").write_bytes(b"partial")
    jobs, skipped = plan_jobs(items, cfg, out)
    assert (skipped, [(j.shard_id, len(j.items), j.keep_existing) for j in jobs]) == (1, [(1, 2, False), (2, 1, False)])
    jobs, skipped = plan_jobs(items, cfg, out, retry_failed=True)
    assert (skipped, [(j.shard_id, [i.key for i in j.items], j.keep_existing) for j in jobs][0]) == (
        0, (0, [items[1].key], True))
    assert [s.complete for s in list_shards(out)] == [True, False]


def _two_complete_shards(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"{i}.jpg").write_bytes(_jpeg(_rgb(seed=i)))
    items = list_inputs(str(tmp_path / "in"))
    cfg = build_config({"inputs": {"samples_per_shard": 2}, "pools": {"p": {"stages": ["tag"]}}})
    out = str(tmp_path / "out")
    for shard in (0, 1):
        rows = [_row(it.key) for it in items[2 * shard : 2 * shard + 2]]
        write_shard(out, shard, pack({k: [r[k] for r in rows] for k in rows[0]}, WriteConfig()))
    return items, cfg, out


def test_a_complete_shard_whose_tar_does_not_match_its_stats_is_redone(tmp_path, caplog):
    items, cfg, out = _two_complete_shards(tmp_path)
    assert plan_jobs(items, cfg, out, verify=True) == ([], 2)
    tar0, tar1 = tmp_path / "out" / "000000.tar", tmp_path / "out" / "000001.tar"
    size0 = tar0.stat().st_size
    tar0.write_bytes(tar0.read_bytes()[: size0 // 2])  # cut in half next to its stats file
    data = bytearray(tar1.read_bytes())
    data[600] ^= 0xFF  # same size, other bytes: only the sha256 tells
    tar1.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="datagen.plan"):
        jobs, skipped = plan_jobs(items, cfg, out)
    assert skipped == 1 and [(j.shard_id, len(j.items), j.keep_existing) for j in jobs] == [(0, 2, False)]
    assert jobs[0].redo == f"its tar holds {size0 // 2} bytes but its stats recorded {size0} (truncated or overwritten)"
    assert "shard 000000 has a stats file but its tar holds" in caplog.text
    jobs, skipped = plan_jobs(items, cfg, out, retry_failed=True, verify=True)
    assert skipped == 0 and [j.shard_id for j in jobs] == [0, 1] and "sha256" in jobs[1].redo
    assert [len(j.items) for j in jobs] == [2, 2]  # redone whole, not only its failed rows


def test_shard_checks_without_a_recorded_size_and_with_missing_files(tmp_path):
    items, cfg, out = _two_complete_shards(tmp_path)
    stats = tmp_path / "out" / "000000.stats.json"
    recorded = json.loads(stats.read_text())
    stats.write_text(json.dumps({k: v for k, v in recorded.items() if k != "tar_bytes"}))  # an older stats file
    info = {s.id: s for s in list_shards(out)}
    assert shard_problem(out, info[0]) is None  # read to its end: whole
    tar = tmp_path / "out" / "000000.tar"
    tar.write_bytes(tar.read_bytes()[:700])
    assert shard_problem(out, info[0]).startswith(("its tar is unreadable", "its tar ends inside"))
    (tmp_path / "out" / "000001.parquet").unlink()
    assert shard_problem(out, list_shards(out)[1]) == "its parquet is missing"


def test_output_naming_a_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "0.jpg").write_bytes(_jpeg(_rgb()))
    (tmp_path / "out.txt").write_text("not a dataset")
    args = ["--config", str(CONFIGS / "tiny.yaml"), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out.txt")]
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output {tmp_path / 'out.txt'}: is an existing file, not a dataset folder (give a new "
                   "folder, or the folder of a previous run to resume it)"]
    assert main(["plan", *args]) == 2 and capsys.readouterr().err.startswith("error: --output ")
    assert (tmp_path / "out.txt").read_text() == "not a dataset"


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_complete_shards(tmp_path, monkeypatch, capsys):
    import errno

    import shards.writer
    from datagen import pipeline

    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"{i}.jpg").write_bytes(_jpeg(_rgb(seed=i)))
    out = tmp_path / "out"
    real_close = shards.writer.ShardWriter.close

    def close(self):
        if self.name == "000001":
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "000001.tar"))
        return real_close(self)

    def execute(jobs, cfg, output, progress=None):  # the writer's part of the pipeline, without Ray
        for job in jobs:
            rows = [_row(it.key) for it in job.items]
            write_shard(output, job.shard_id, pack({k: [r[k] for r in rows] for k in rows[0]}, WriteConfig()))

    monkeypatch.setattr(shards.writer.ShardWriter, "close", close)
    monkeypatch.setattr(pipeline, "execute", execute)
    monkeypatch.setattr(pipeline, "init_ray", lambda cfg: False)
    monkeypatch.setattr(importlib.import_module("datagen.run"), "check_resources", lambda cfg: None)  # no Ray is started to ask
    args = ["run", "--config", str(CONFIGS / "tiny.yaml"), "--input", str(tmp_path / "in"), "--output", str(out),
            "--set", "inputs.samples_per_shard=2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: no space left on the device of {out} ({out / '000001.tar'})")
    assert "the 1 complete shard(s) are safe" in err[0] and "run the same command again to resume" in err[0]
    assert [(s.name, s.complete) for s in list_shards(str(out))] == [("000000", True)]
    assert validate_dataset(str(out)) == []


def test_disk_full_is_found_inside_wrapping_errors():
    import errno

    from datagen.run import _disk_full

    full = OSError(errno.ENOSPC, "No space left on device")

    class RemoteError(RuntimeError):  # Ray's RayTaskError keeps the task's exception as .cause
        def __init__(self, cause):
            super().__init__("task failed")
            self.cause = cause

    assert _disk_full(RemoteError(full)) is full
    try:
        raise RuntimeError("outer") from full
    except RuntimeError as e:
        assert _disk_full(e) is full
    assert _disk_full(OSError(errno.EACCES, "denied")) is None and _disk_full(RemoteError(None)) is None


def test_a_changed_config_is_refused_naming_the_fields_that_differ(tmp_path):
    out = str(tmp_path / "ds")
    open_run(out, {"decode": {"max_side": 1024, "format": "jpg"}, "models": ["a", "b"], "seed": 0})
    with pytest.raises(RunMismatchError) as info:
        open_run(out, {"decode": {"max_side": 200, "format": "jpg"}, "models": ["a", "c"], "extra": True})
    msg = str(info.value)
    assert ('differs in decode.max_side: 1024 -> 200; extra: (absent) -> true; models: ["a", "b"] -> ["a", "c"]; '
            "seed: 0 -> (absent))") in msg and "--new-run" in msg


# ------------------------------------------------------------------------------------------ config


def test_presets_load_and_fingerprint_ignores_execution():
    tiny = load_config(CONFIGS / "tiny.yaml")
    real = load_config(CONFIGS / "real.yaml")
    assert tiny.stages["tag"].model.backend == "tiny" and real.stages["tag"].model.name == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert tiny.stage_names == real.stage_names == ("tag", "caption", "ground", "segment", "describe", "score", "filter")
    assert any(p.num_gpus > 0 for p in real.pools.values())
    inputs = {"count": 3, "keys_sha256": "x"}
    moved = load_config(CONFIGS / "tiny.yaml", {"execution": {"chunk_size": 3}, "stages": {"tag": {"batch_size": 2}},
                                                "pools": {"models": {"actors": 1}}})
    assert fingerprint_dict(moved, inputs) == fingerprint_dict(tiny, inputs)
    changed = load_config(CONFIGS / "tiny.yaml", {"stages": {"ground": {"box_threshold": 0.3}}})
    assert fingerprint_dict(changed, inputs) != fingerprint_dict(tiny, inputs)


def test_plan_prints_each_stage_resources(tmp_path):
    text = plan_text(load_config(CONFIGS / "real.yaml"))
    assert "describe  actor pool 'describe'" in text and "Qwen/Qwen2.5-VL-7B-Instruct (hf)" in text
    assert "GPUs needed at full pool size: 29" in text
    assert main(["plan", "--config", str(CONFIGS / "tiny.yaml"), "--set", "pools.models.actors=1"]) == 0
    assert main(["plan", "--config", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"inputs": {"samples_per_shard": "many"}}, r"inputs.samples_per_shard: expected an integer \(got 'many'\)"),
        ({"decode": {"max_sides": 3}}, r"decode: unknown key 'max_sides' \(valid keys: keep_source_jpeg, max_bytes, "),
        ({"pools": {"p": {"stages": ["ground", "tag"]}}}, "must run in the order"),
        ({"pools": {"p": {"stages": ["segment"]}}}, "needs stage 'ground'"),
        ({"pools": {"p": {"stages": ["tag"], "num_gpus": 1.5}}}, "num_gpus"),
        ({"pools": {"p": {"stages": ["tag"]}}, "stages": {"caption": {}}}, "no pool runs it"),
    ],
)
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        build_config(data)


# ------------------------------------------------------------------------------------------ chunks


class _Recorder:
    """A fake stage: records its batch sizes, fails rows whose key says so."""

    def __init__(self):
        self.sizes = []

    def __call__(self, batch):
        self.sizes.append(len(batch["key"]))
        if all(k.startswith("bad") for k in batch["key"]):
            raise StageError("every row failed") from ValueError("boom")
        return {**batch, "seen": [True] * len(batch["key"])}


def _chunk(keys, statuses):
    return {"shard": 0, "start": 0, "columns": {"key": keys, "status": statuses, "error_stage": [None] * len(keys),
                                                "error": [None] * len(keys)}}


def test_stage_batches_are_balanced_and_skip_failed_rows():
    assert [len(r) for r in _split(17, 16)] == [8, 9] and [len(r) for r in _split(3, 8)] == [3]
    stage = _Recorder()
    keys = [f"k{i}" for i in range(10)]
    statuses = ["ok"] * 10
    statuses[3] = "failed"
    out = run_stage_on_chunk(stage, "fake", _chunk(keys, statuses), batch_size=4)
    assert stage.sizes == [3, 3, 3]
    assert out["columns"]["seen"] == [True] * 3 + [None] + [True] * 6
    assert out["busy"]["fake"][0] == 9


def test_single_row_stage_error_fails_that_row_but_a_batch_stops_the_run():
    out = run_stage_on_chunk(_Recorder(), "fake", _chunk(["bad1", "ok1"], ["ok", "ok"]), batch_size=1)
    assert out["columns"]["status"] == ["failed", "ok"] and out["columns"]["error"][0] == "ValueError: boom"
    with pytest.raises(StageError):
        run_stage_on_chunk(_Recorder(), "fake", _chunk(["bad1", "bad2"], ["ok", "ok"]), batch_size=2)


def test_fail_fast_guard():
    guard = _FailFast(3)
    guard.update([{"status": "failed", "error_stage": "decode", "error": "empty file (0 bytes)"}] * 2)
    with pytest.raises(Exception, match="stage 'decode' failed on every one of the first 3"):
        guard.update([{"status": "failed", "error_stage": "decode", "error": "empty file (0 bytes)"}])
    mixed = _FailFast(2)
    mixed.update([{"status": "ok"}] + [{"status": "failed", "error_stage": "decode", "error": "x"}] * 5)


def test_chunks_cover_each_shard_in_order():
    job = ShardJob(3, tuple(InputItem(key=f"k{i}", source="s", uri="u") for i in range(5)))
    chunks = make_chunks([job], 2)
    assert [c["shard"] for c in chunks] == [3, 3, 3]
    assert [[it["key"] for it in json.loads(c["chunk"])["items"]] for c in chunks] == [["k0", "k1"], ["k2", "k3"], ["k4"]]


def test_stage_error_is_found_inside_ray_wrappers():
    try:
        raise StageError("stage 'tag' failed on all 8 ok rows") from ValueError("boom")
    except StageError as e:
        inner = e
    wrapper = RuntimeError("task failed")
    wrapper.__cause__ = inner
    outer = type("RayTaskErrorLike", (Exception,), {})("wrapped")
    outer.cause = wrapper
    assert _stage_error(outer) is inner and _stage_error(ValueError("x")) is None
    remote = RuntimeError("Traceback ...\ndatagen.stages.StageError: stage 'tag' failed on all 8 ok rows\n\nmore")
    assert str(_stage_error(remote)) == "stage 'tag' failed on all 8 ok rows"


def test_a_model_given_by_name_alone_completes_from_the_stage_and_settings_alone_adjust_the_default():
    from datagen.models import ModelSpec

    every = {"m": {"stages": ["tag", "caption", "ground", "segment", "describe", "score", "filter"]}}
    cfg = build_config({
        "models": "tiny",
        "pools": every,
        "stages": {
            # another model by name: the stage's kind, and the tiny backend for a tiny factory's name
            "ground": {"model": {"name": "tiny-owlv2"}},
            # a hub id: kind filled, backend stays "hf", the default's SAM weights are not carried over
            "segment": {"model": {"name": "facebook/sam2.1-hiera-large"}},
            # no name: the preset's model with one setting changed
            "describe": {"model": {"dtype": "bfloat16"}},
        },
    })
    assert cfg.stages["ground"].model == ModelSpec("detector", "tiny-owlv2", backend="tiny")
    assert cfg.stages["segment"].model == ModelSpec("segmenter", "facebook/sam2.1-hiera-large")
    assert cfg.stages["describe"].model == ModelSpec("vlm", "tiny-qwen2.5-vl", backend="tiny", dtype="bfloat16")
    assert cfg.stages["tag"].model == ModelSpec("vlm", "tiny-qwen2.5-vl", backend="tiny")
    with pytest.raises(ConfigError, match="stages.ground"):
        build_config({"models": "tiny", "pools": every,
                      "stages": {"ground": {"model": {"name": "tiny-owlv2", "kind": "vlm"}}}})

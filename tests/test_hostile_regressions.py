"""Each example of issue 20 for the datagen inputs and the ``shards`` tools, as its own test.

The wider corpus (every format, corruption and member kind, against every entry point) is in
test_hostile_inputs.py and test_hostile_shards.py; these are the cases the issue names, each asserting
the exact behaviour asked for.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hostile_fixture import (
    ROOT,
    TINY,
    cli,
    error_line,
    image_bytes,
    link,
    members,
    replace_json,
    served,
    tar_bytes,
)
from PIL import Image
from test_shards import jpeg, reseal, write_dataset

import shards.report as report
from datagen.cli import main as datagen_cli
from datagen.inputs import list_inputs
from datagen.stages.decode import DecodeConfig, DecodeStage, decode_image
from shards import ShardWriter, iter_samples, safe_json, validate_dataset
from shards.__main__ import main as shards_cli
from shards.reader import MAX_IMAGE_PIXELS, ShardReadError, shard_samples
from shards.schema import SampleRecord


def _decode(items) -> dict:
    columns = {k: [it.to_dict()[k] for it in items] for k in items[0].to_dict()}
    return DecodeStage(DecodeConfig(min_side=8))(columns)


@pytest.fixture(autouse=True)
def _no_figures(monkeypatch):
    # The report's figures take seconds and read nothing the galleries and tables do not.
    monkeypatch.setattr(report, "FIGURES", {})


# --- hang: a named pipe (any non-regular file) in an input folder ------------------------------------


@pytest.mark.timeout(60)
def test_a_named_pipe_or_other_non_file_in_an_input_folder_is_a_failed_row_and_never_opened(tmp_path):
    folder = tmp_path / "in"
    (folder / "d.jpg").mkdir(parents=True)  # a folder named like an image: walked, not opened
    (folder / "d.jpg" / "inner.png").write_bytes(image_bytes("PNG"))
    (folder / "empty.png").mkdir()
    (folder / "a.jpg").write_bytes(jpeg(48, 40))
    os.mkfifo(folder / "a.txt")  # the caption of a.jpg is a pipe: reading it would block the listing
    os.mkfifo(folder / "pipe.jpg")
    os.symlink(folder / "pipe.jpg", folder / "to_pipe.webp")
    os.symlink("/dev/zero", folder / "zero.png")  # endless bytes
    os.symlink(folder / "nowhere", folder / "broken.jpg")
    os.symlink(folder / "d.jpg", folder / "dirlink.gif")
    os.symlink(folder / "a.jpg", folder / "alias.jpg")  # a link to a regular file is read as one
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "s.png"))
    try:
        items = list_inputs(str(folder))
        out = _decode(items)
    finally:
        sock.close()
    rows = {i.source.rsplit("/in/", 1)[1]: (s, e) for i, s, e in zip(items, out["status"], out["error"], strict=True)}
    pipe = "not a regular file (a named pipe, socket or device, or a link to one): not read"
    assert rows == {
        "a.jpg": ("ok", None), "alias.jpg": ("ok", None), "d.jpg/inner.png": ("ok", None),
        "a.txt": ("failed", pipe), "pipe.jpg": ("failed", pipe), "to_pipe.webp": ("failed", pipe),
        "zero.png": ("failed", pipe), "s.png": ("failed", pipe),
        "broken.jpg": ("failed", "a broken link (what it points to does not exist): not read"),
        "dirlink.gif": ("failed", "a link to a folder (not followed)"),
    }
    assert out["source_caption"][0] is None  # a.jpg: its pipe of a caption was not read


@pytest.mark.timeout(60)
def test_a_named_pipe_given_as_the_input_is_one_error_line_exit_2(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.tar")
    code, _, err = cli(datagen_cli, ["run", "--config", TINY, "--input", str(tmp_path / "pipe.tar"),
                                     "--output", str(tmp_path / "out")], capsys)
    assert code == 2
    assert error_line(err) == (f"error: {tmp_path / 'pipe.tar'}: not a regular file (a named pipe, socket or "
                               "device, or a link to one): not read")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_datagen_run_over_a_folder_with_a_named_pipe_ends_with_a_row_for_it(tmp_path):
    """The whole command, Ray and the tiny models included: every file is a sample or a counted row."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.jpg").write_bytes(jpeg(96, 80, seed=i))
    os.mkfifo(folder / "pipe.jpg")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "datagen", "run", "--config", TINY, "--input", str(folder),
                           "--output", str(tmp_path / "out"), "--no-progress", "--set", "execution.num_cpus=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "out").glob("0*.parquet"))])
    assert len(df) == 4 and "Traceback" not in proc.stderr
    row = df[df.source == str(folder / "pipe.jpg")].iloc[0]
    assert (row.status, row.error_stage, row.error) == ("failed", "decode", "not a regular file (a named pipe, "
                                                        "socket or device, or a link to one): not read")


# --- refused where it could work: a tar from a server without byte ranges ---------------------------


def test_a_tar_from_a_server_without_byte_ranges_is_read_as_one_stream(tmp_path):
    """Larger than fsspec's 5 MB block, so a random-access read would need ranges past the first block."""
    big = image_bytes("PNG", 1500, 1400)  # noise: ~6.3 MB
    assert len(big) > 5 * 2**20
    i2d = tmp_path / "i2d"
    i2d.mkdir()
    small = [jpeg(40, 32, seed=i) for i in range(3)]
    (i2d / "00000.tar").write_bytes(tar_bytes(
        [m for i in range(3) for m in ((f"00000000{i}.jpg", small[i]), (f"00000000{i}.txt", f"alt {i}".encode()))]
        + [("000000003.png", big), ("000000004.jpg", jpeg(40, 32, seed=9))]))
    ds = tmp_path / "ds"
    with ShardWriter(str(ds), 0) as w:
        for i, data in enumerate([big, small[0]]):
            w.add(SampleRecord(key=f"k{i}", width=8, height=8, original_width=8, original_height=8), data, "png")
    with served(tmp_path) as url:
        items = list_inputs(f"{url}/i2d/00000.tar")
        out = _decode(items)
        samples = list(iter_samples(f"{url}/ds"))  # the shard reader: one GET per tar as well
    assert out["status"] == ["ok"] * 5 and [i.caption for i in items] == ["alt 0", "alt 1", "alt 2", None, None]
    assert out["source_jpeg"][:3] == small and (out["width"][3], out["height"][3]) == (1024, 956)
    assert [(s.record.key, s.image_bytes) for s in samples] == [("k0", big), ("k1", small[0])]


# --- tracebacks: an empty or garbage list -------------------------------------------------------------


@pytest.mark.parametrize("name, data, why", [
    ("empty.csv", b"", "empty CSV/TSV list (no header line naming its columns)"),
    ("garbage.csv", bytes(range(256)) * 4, "not a readable CSV/TSV list (ParserError: Error tokenizing data. C "
                                            "error: Expected 1 fields in line 3, saw 2)"),
    ("latin1.csv", "path\nbild_ä.jpg\n".encode("latin-1"), "not a readable CSV/TSV list (UnicodeDecodeError: 'utf-8' "
                                                           "codec can't decode byte 0xe4 in position 5: invalid "
                                                           "continuation byte)"),
    ("empty.parquet", b"", "not a readable parquet file (ArrowInvalid: Parquet file size is 0 bytes)"),
    ("garbage.parquet", b"PAR1" + bytes(range(256)) * 4, "not a readable parquet file (ArrowInvalid: Parquet "
                                                         "magic bytes not found in footer. Either the file is "
                                                         "corrupted or this is not a parquet file)"),
])
def test_an_empty_or_garbage_input_list_is_one_error_line_naming_it_exit_2(tmp_path, capsys, name, data, why):
    (tmp_path / name).write_bytes(data)
    code, _, err = cli(datagen_cli, ["run", "--config", TINY, "--input", str(tmp_path / name),
                                     "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and error_line(err) == f"error: {tmp_path / name}: {why}"


# --- tracebacks: a sample JSON nested 100,000 deep or holding a 5,000-digit integer -------------------


def test_safe_json_bounds_depth_and_integer_length_and_reads_everything_else_as_json_does():
    for doc in (b"[" * 100_000 + b"]" * 100_000, b"[" * 65 + b"]" * 65, '{"a": ' * 70 + "1" + "}" * 70):
        with pytest.raises(json.JSONDecodeError, match="nested deeper than 64 levels"):
            safe_json.loads(doc)
    with pytest.raises(json.JSONDecodeError, match="an integer of 5000 digits"):
        safe_json.loads(b'{"width": ' + b"9" * 5000 + b"}")
    with pytest.raises(json.JSONDecodeError, match="an integer of 65 digits"):
        safe_json.loads("-" + "1" * 65)
    ok = '{"a": [1, 2.5, NaN, "x", {"b": null}], "n": -' + "9" * 64 + "}"
    assert json.dumps(safe_json.loads(ok)) == json.dumps(json.loads(ok))  # NaN included
    assert safe_json.loads(b"[" * 64 + b"]" * 64) == json.loads("[" * 64 + "]" * 64)
    assert safe_json.loads("1" * 5000 + ".5") == float("1" * 5000 + ".5")  # floats have no digit limit


@pytest.mark.parametrize("bad, why", [
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 64 levels"),
    (None, "an integer of 5000 digits (more than 64)"),  # width: a 5,000-digit integer
])
def test_a_sample_json_too_deep_or_with_a_huge_integer_is_bad_json_named_by_shard_and_key(tmp_path, capsys, bad, why):
    ds = tmp_path / "ds"
    write_dataset(ds, n=3)
    huge = lambda d: re.sub(rb'"width":\d+', b'"width":' + b"7" * 5000, d)  # noqa: E731
    replace_json(ds / "000000.tar", "k0_001", (lambda _: bad) if bad else huge)
    message = f"not valid JSON: {why}"

    code, out, _ = cli(shards_cli, ["validate", str(ds)], capsys)
    assert code == 1
    assert f"shard 000000 key k0_001 member 'k0_001.json': shard 000000: {message}" in out.splitlines()

    code, out, err = cli(shards_cli, ["to-coco", str(ds), str(tmp_path / "c.json")], capsys)
    assert code == 1 and out.startswith(f"wrote {tmp_path / 'c.json'}: 2 images")
    assert f"sample left out: shard 000000 key k0_001: {ds / '000000.tar'} key 'k0_001': {message}" in err
    assert err.splitlines()[-1] == f"error: 0 shard(s) and 1 sample(s) could not be read and are not in {tmp_path / 'c.json'}"
    assert sorted(i["file_name"] for i in json.loads((tmp_path / "c.json").read_text())["images"]) == [
        "k0_000.jpg", "k0_002.jpg"]

    code, _, err = cli(report.main, [str(ds), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 1
    assert f"ds: 000000 key k0_001 left out: {ds / '000000.tar'} key 'k0_001': {message}" in err
    assert (tmp_path / "r.html").exists()


# --- tracebacks: a decompression-bomb PNG inside a shard ---------------------------------------------


def _bomb_png(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (its data is a few bytes: decoding would allocate the lot)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("w, h", [(12_000, 10_000), (40_000, 40_000)])  # under and over PIL's own error limit
def test_a_decompression_bomb_png_in_a_shard_is_refused_by_name_in_the_report(tmp_path, capsys, w, h):
    ds = tmp_path / "ds"
    with ShardWriter(str(ds), 0) as wr:
        wr.add(SampleRecord(key="bomb", width=w, height=h, original_width=w, original_height=h), _bomb_png(w, h), "png")
        wr.add(SampleRecord(key="fine", width=48, height=32, original_width=48, original_height=32), jpeg(48, 32), "jpg")
    code, _, err = cli(report.main, [str(ds), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 1
    assert f"ds: 000000 key bomb left out: {ds / '000000.tar'} key 'bomb': " in err
    assert (f"image is {w}x{h} = {w * h} pixels, more than {MAX_IMAGE_PIXELS}" in err) or \
           "exceeds limit" in err  # PIL's own refusal, raised inside Image.open
    page = (tmp_path / "r.html").read_text()
    assert "bomb (image refused)" in page and "fine (48x32)" in page


# --- lost: a stats file whose tar is missing -------------------------------------------------------


def test_a_shard_whose_stats_exist_but_tar_is_missing_is_named_by_to_coco_report_and_the_reader(tmp_path, capsys):
    ds = tmp_path / "ds"
    write_dataset(ds, n=2, shard_id=0)
    write_dataset(ds, n=2, shard_id=1)
    (ds / "000001.tar").unlink()
    why = f"{ds / '000001.tar'}: its tar is missing, though its stats file says the shard is complete"
    code, out, err = cli(shards_cli, ["to-coco", str(ds), str(tmp_path / "c.json")], capsys)
    assert code == 1 and f"shard 000001 left out: {why}" in err.splitlines()
    assert out.startswith(f"wrote {tmp_path / 'c.json'}: 2 images")
    errors = []
    assert [r.key for r in shard_samples(str(ds), on_error=errors.append)] == ["k0_000", "k0_001"]
    assert [str(e) for e in errors] == [why]
    with pytest.raises(ShardReadError, match=re.escape(why)):
        list(iter_samples(str(ds)))
    code, _, err = cli(report.main, [str(ds), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 1 and f"ds: 000001 left out: {why}" in err


# --- silent: report's exit code; a flipped byte that keeps the size --------------------------------


def test_report_exits_1_and_names_what_it_left_out(tmp_path, capsys):
    ds = tmp_path / "ds"
    write_dataset(ds, n=2, shard_id=0)
    write_dataset(ds, n=2, shard_id=1)
    (ds / "000001.parquet").write_bytes(b"not parquet")
    code, _, err = cli(report.main, [str(ds), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 1
    assert err.splitlines()[-1] == f"error: 1 damaged shard(s) or sample(s) left out of {tmp_path / 'r.html'} " \
                                   "(listed above and in the report)"
    write_dataset(tmp_path / "clean", n=2)
    assert cli(report.main, [str(tmp_path / "clean"), "--out", str(tmp_path / "c.html")], capsys)[0] == 0


def test_a_flipped_byte_that_keeps_the_size_is_refused_by_every_reader_that_reads_the_whole_tar(tmp_path, capsys):
    ds = tmp_path / "ds"
    write_dataset(ds, n=3)
    tar = ds / "000000.tar"
    data = bytearray(tar.read_bytes())
    at = data.index(b"a red thing number 0")  # inside a JSON string: every sample still parses
    data[at] ^= 0x20  # "a" -> "A"
    tar.write_bytes(bytes(data))
    stats = json.loads((ds / "000000.stats.json").read_text())
    assert stats["tar_bytes"] == len(data)
    why = (f"{tar}: its sha256 {hashlib.sha256(data).hexdigest()[:12]}... differs from {stats['tar_sha256'][:12]}... "
           "in its stats file: changed after it was written, not trusted")
    with pytest.raises(ShardReadError) as e:
        list(iter_samples(str(ds)))
    assert str(e.value) == why
    code, _, err = cli(shards_cli, ["to-coco", str(ds), str(tmp_path / "c.json")], capsys)
    assert code == 1 and f"shard 000000 left out: {why}" in err
    assert json.loads((tmp_path / "c.json").read_text())["images"] == []  # none of its samples was used
    code, _, err = cli(report.main, [str(ds), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 1 and f"ds: 000000 left out: {why}" in err
    code, out, _ = cli(shards_cli, ["validate", str(ds)], capsys)
    assert code == 1 and f"shard 000000: stats tar_sha256 is {stats['tar_sha256']!r}, the shard has " \
                         f"{hashlib.sha256(data).hexdigest()!r}" in out.splitlines()
    # info reads only sizes (documented): it cannot see this one, and says what it checked
    assert cli(shards_cli, ["info", str(ds)], capsys)[0] == 0


# --- silent: a key twice, a key that is not its member's, links in a tar ----------------------------


def test_validate_flags_a_key_twice_a_lying_key_and_link_members_and_readers_use_none_twice(tmp_path, capsys):
    ds = tmp_path / "ds"
    write_dataset(ds, n=3)
    tar = ds / "000000.tar"
    ms = dict(members(tar))
    lying = json.loads(ms["k0_002.json"])
    tar.write_bytes(tar_bytes([
        ("k0_000.jpg", ms["k0_000.jpg"]), ("k0_000.json", ms["k0_000.json"]),
        ("k0_001.jpg", ms["k0_001.jpg"]), ("k0_001.json", ms["k0_001.json"]),
        ("k0_000.jpg", ms["k0_000.jpg"]), ("k0_000.json", ms["k0_000.json"]),  # k0_000 again, later
        ("k0_002.jpg", ms["k0_002.jpg"]), ("k0_002.json", json.dumps({**lying, "key": "k0_001"}).encode()),
        link("k0_003.jpg", "/etc/passwd"), link("k0_004.json", "k0_000.json", hard=True),
    ]))
    reseal(tar)
    code, out, _ = cli(shards_cli, ["validate", str(ds)], capsys)
    lines = out.splitlines()
    assert code == 1
    for line in (
        "shard 000000 key k0_000 member 'k0_000.jpg': key 'k0_000' is stored twice: this later copy is not used",
        "shard 000000 key k0_000 member 'k0_000.json': key 'k0_000' is stored twice: this later copy is not used",
        "shard 000000 key k0_002 member 'k0_002.json': json field 'key' is 'k0_001', member name says 'k0_002'",
        "shard 000000 member 'k0_003.jpg': is a symbolic link to '/etc/passwd', not a file: not read",
        "shard 000000 member 'k0_004.json': is a hard link to 'k0_000.json', not a file: not read",
    ):
        assert line in lines, (line, lines)
    errors = []
    assert [r.key for r in shard_samples(str(ds), on_error=errors.append)] == ["k0_000", "k0_001", "k0_002"]
    assert len(errors) == 1 and "key 'k0_000' is stored twice" in str(errors[0]) and "symbolic link" in str(errors[0])
    # to-coco uses no sample twice: the shard is not what its writer wrote, so it is left out, named
    code, _, err = cli(shards_cli, ["to-coco", str(ds), str(tmp_path / "c.json")], capsys)
    assert code == 1 and "shard 000000 left out: " in err and "stored twice" in err


# --- silent: to-coco on a folder without shards ----------------------------------------------------


def test_to_coco_on_a_folder_without_shards_is_one_error_line_exit_2_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("x")
    out = tmp_path / "c.json"
    code, _, err = cli(shards_cli, ["to-coco", str(tmp_path / "ds"), str(out)], capsys)
    assert code == 2 and not out.exists()
    assert error_line(err) == (f"error: {tmp_path / 'ds'}: holds no shards (NNNNNN.tar + NNNNNN.parquet + "
                               "NNNNNN.stats.json); is it the dataset folder?")
    write_dataset(tmp_path / "inc", n=1)
    (tmp_path / "inc" / "000000.stats.json").unlink()
    code, _, err = cli(shards_cli, ["to-coco", str(tmp_path / "inc"), str(out)], capsys)
    assert code == 2 and error_line(err) == (f"error: {tmp_path / 'inc'}: holds no complete shard (1 without a stats "
                                             "file: the run did not finish them)")


# --- silent: a float TIFF with values in [0, 1] -------------------------------------------------------


def test_a_float_tiff_in_unit_range_decodes_to_its_grey_levels_not_black():
    a = np.tile(np.array([0.0, 0.25, 0.5, 1.0], np.float32), (40, 10))  # 40 x 40
    buf = io.BytesIO()
    Image.fromarray(a, "F").save(buf, "TIFF")
    d = decode_image(buf.getvalue(), DecodeConfig(min_side=8))
    assert d.image.shape == (40, 40, 3)
    assert d.image[0, :4, 0].tolist() == [0, 64, 128, 255] and (d.image[..., 0] == d.image[..., 2]).all()
    # floats beyond [0, 1] keep their 8-bit (<= 255) or 16-bit meaning, NaN is black
    for values, expect in (([0.0, 2.0, 128.0, 255.0], [0, 2, 128, 255]), ([0.0, 300.0, 65535.0, np.nan], [0, 1, 255, 0])):
        buf = io.BytesIO()
        Image.fromarray(np.tile(np.array(values, np.float32), (40, 10)), "F").save(buf, "TIFF")
        assert decode_image(buf.getvalue(), DecodeConfig(min_side=8)).image[0, :4, 0].tolist() == expect


# --- security: a gzip-compressed tar holding a 1 GiB member ---------------------------------------------


def _gz_shard(ds, member_size: int) -> None:
    """A complete shard whose tar is gzip-compressed and holds one ``member_size`` member of zeros."""
    write_dataset(ds, n=1)
    tar = ds / "000000.tar"
    ms = members(tar)

    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.left = n

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as t:
        for name, data in ms:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("huge.png")
        info.size = member_size
        t.addfile(info, Zeros(member_size))  # streamed: never a gigabyte in memory
    tar.write_bytes(buf.getvalue())
    reseal(tar)


def test_a_member_above_the_sample_limit_is_refused_by_name_unread(tmp_path, capsys, monkeypatch):
    """The same code path as the 1 GiB member (slow test below), with the limit lowered to 1 MiB."""
    import shards.reader as reader

    monkeypatch.setattr(reader.tar_samples, "__defaults__", (None, 2**20))
    ds = tmp_path / "ds"
    _gz_shard(ds, 2 * 2**20)
    why = (f"member 'huge.png' is {2 * 2**20} bytes, more than the {2**20} bytes a sample may hold "
           "(shards.reader.MAX_SAMPLE_BYTES): not read, nor the rest of the tar")
    code, out, _ = cli(shards_cli, ["validate", str(ds)], capsys)
    assert code == 1 and f"shard 000000: tar is unreadable or truncated: {ds / '000000.tar'}: {why}" in out.splitlines()
    code, _, err = cli(shards_cli, ["to-coco", str(ds), str(tmp_path / "c.json")], capsys)
    assert code == 1 and f"shard 000000 left out: {ds / '000000.tar'}: {why}" in err


@pytest.mark.slow
def test_a_gzip_tar_with_a_1_gib_member_is_refused_without_inflating_it(tmp_path):
    ds = tmp_path / "ds"
    _gz_shard(ds, 2**30)
    assert (ds / "000000.tar").stat().st_size < 8 * 2**20  # a megabyte or so of gzip
    # The peak resident memory of this process alone (VmHWM; ru_maxrss would carry pytest's own over).
    probe = ("import re, sys\nfrom shards.__main__ import main\n"
             "codes = [main(['validate', sys.argv[1]]), main(['to-coco', sys.argv[1], sys.argv[2]])]\n"
             "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
             "print(codes, int(hwm) // 1024)\n")
    proc = subprocess.run([sys.executable, "-c", probe, str(ds), str(tmp_path / "c.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    codes, peak_mb = proc.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert codes == "[1, 1]" and int(peak_mb) < 400, proc.stdout  # nothing near 1 GiB was held
    assert "member 'huge.png' is 1073741824 bytes, more than the 268435456 bytes a sample may hold" in proc.stdout + proc.stderr


# --- silent: the HTML report's counts ------------------------------------------------------------------


def test_the_report_prints_counts_as_integers(tmp_path, capsys):
    write_dataset(tmp_path / "ds", n=26, failures=0)
    assert cli(report.main, [str(tmp_path / "ds"), "--out", str(tmp_path / "r.html")], capsys)[0] == 0
    page = (tmp_path / "r.html").read_text()
    summary = page[page.index('<section id="summary">'):page.index("</section>")]
    cells = dict(re.findall(r'<tr><td class="text">([^<]+)</td><td>([^<]+)</td></tr>', summary))
    assert (cells["inputs"], cells["ok"], cells["objects"], cells["shards"]) == ("26", "26", "52", "1")
    assert cells["mean objects per image"] == "2.00"  # a mean stays a float


# --- silent: a COCO round trip renumbers annotation ids and renames file_name -------------------------


def test_a_coco_round_trip_keeps_image_ids_annotation_ids_and_file_names(tmp_path, capsys):
    imgs = tmp_path / "images"
    imgs.mkdir()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(imgs / "COCO_val2014_000000000139.jpg")
    Image.new("RGB", (32, 24), (1, 2, 3)).save(imgs / "b.png")
    inst = {"images": [{"id": 139, "file_name": "COCO_val2014_000000000139.jpg", "width": 40, "height": 30},
                       {"id": 785, "file_name": "b.png", "width": 32, "height": 24}],
            "categories": [{"id": 18, "name": "dog", "supercategory": "animal"},
                           {"id": 1, "name": "person", "supercategory": "person"}],
            "annotations": [
                {"id": 900100, "image_id": 139, "category_id": 18, "bbox": [2, 3, 10, 10], "iscrowd": 0},
                {"id": 42, "image_id": 139, "category_id": 1, "bbox": [20, 5, 15, 20], "iscrowd": 0},
                {"id": 7, "image_id": 785, "category_id": 18, "bbox": [4, 4, 12, 8], "iscrowd": 0},
                {"id": 31337, "image_id": 785, "category_id": 1, "bbox": [20, 0, 12, 24], "iscrowd": 1,
                 "segmentation": {"size": [24, 32], "counts": [480, 288]}}]}
    (tmp_path / "inst.json").write_text(json.dumps(inst))
    assert cli(shards_cli, ["from-coco", "--instances", str(tmp_path / "inst.json"), "--images", str(imgs),
                            str(tmp_path / "ds")], capsys)[0] == 0
    assert validate_dataset(str(tmp_path / "ds")) == []
    assert cli(shards_cli, ["to-coco", str(tmp_path / "ds"), str(tmp_path / "c.json")], capsys)[0] == 0
    again = json.loads((tmp_path / "c.json").read_text())
    assert [(i["id"], i["file_name"]) for i in again["images"]] == [(139, "COCO_val2014_000000000139.jpg"),
                                                                   (785, "b.png")]
    assert sorted((a["id"], a["image_id"], a["iscrowd"]) for a in again["annotations"]) == [
        (7, 785, 0), (42, 139, 0), (31337, 785, 1), (900100, 139, 0)]
    # the PNG named .png is stored as png: the member's extension is its format's
    assert sorted(n for n, _ in members(tmp_path / "ds" / "000000.tar")) == [
        "coco000000000139.jpg", "coco000000000139.json", "coco000000000785.json", "coco000000000785.png"]


# --- docs that fail: img2dataset's output formats give one URL list different keys -------------------


def test_img2dataset_webdataset_parquet_and_files_outputs_of_one_url_list_give_the_same_keys(tmp_path):
    keys = [f"0000{i}" + "0000" for i in range(3)]  # img2dataset's shard + index keys
    rows = [{"key": k, "url": f"http://x/{i}.jpg", "caption": f"c{i}", "status": "success", "error_message": None,
             "original_width": 64, "original_height": 48} for i, k in enumerate(keys)]
    rows.append({"key": "000030000", "url": "http://x/3.jpg", "caption": "c3", "status": "failed_to_download",
                 "error_message": "HTTP Error 404: Not Found", "original_width": None, "original_height": None})
    images = {k: jpeg(32, 24, seed=i) for i, k in enumerate(keys)}
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "00000.tar").write_bytes(tar_bytes(
        [m for k in keys[::-1] for m in ((f"{k}.jpg", images[k]), (f"{k}.txt", b"c"))]))  # completion order
    pd.DataFrame(rows).to_parquet(tmp_path / "wds" / "00000.parquet")
    (tmp_path / "pq").mkdir()
    table = pa.Table.from_pylist([{**r, "jpg": images.get(r["key"])} for r in rows])
    pq.write_table(table, tmp_path / "pq" / "00000.parquet")
    (tmp_path / "files" / "00000").mkdir(parents=True)
    for k in keys:
        (tmp_path / "files" / "00000" / f"{k}.jpg").write_bytes(images[k])
    pd.DataFrame(rows).to_parquet(tmp_path / "files" / "00000.parquet")
    listed = {fmt: list_inputs(str(tmp_path / fmt)) for fmt in ("wds", "pq", "files")}
    assert [i.key for i in listed["wds"]] == [i.key for i in listed["pq"]] == [i.key for i in listed["files"]]
    assert len(listed["wds"]) == 4 and listed["wds"][3].failure == "img2dataset failed_to_download: HTTP Error 404: Not Found"
    assert [_decode(listed[f])["status"] for f in listed] == [["ok", "ok", "ok", "failed"]] * 3

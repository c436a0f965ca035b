"""Hostile inputs of ``python -m datagen run``: image files of every format Pillow writes, cut, emptied,
garbled, in every mode, with bomb headers, odd names and wrong extensions; files that are not files;
parquet/CSV lists and tars of every kind of damage; img2dataset folders with broken parts.

Each case goes through what a run does with its inputs before the models: the listing
(``list_inputs``) and the decode stage. It asserts one outcome: a sample (status ``ok``, with its exact
pixels or size where they are known), a failed row whose reason says what is wrong, or (a mistake in
what was asked) an ``InputError`` naming the file, which the command line prints as one ``error:`` line
with exit 2 (test_hostile_regressions.py runs the command line itself). Never an exception escaping,
a hang (the timeout below), an input that vanishes or a damaged file kept as good.

The case ids start with the class of failure a case guards against beyond tracebacks and hangs:
``lost`` (an input without a row), ``silent`` (damage accepted as good), ``security`` (a bomb).
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import struct
import tarfile
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hostile_fixture import image_bytes, link, special, tar_bytes
from PIL import Image

from datagen.inputs import InputError, list_inputs
from datagen.stages.decode import DecodeConfig, DecodeStage
from shards.schema import check_key

pytestmark = pytest.mark.timeout(60)  # a named pipe opened by mistake blocks forever: fail instead

CFG = DecodeConfig(min_side=8)
PIPE = "not a regular file (a named pipe, socket or device, or a link to one): not read"


def decode(items) -> list[dict]:
    """The decode stage's rows for listed items, as dicts."""
    columns = {k: [it.to_dict()[k] for it in items] for k in items[0].to_dict()}
    out = DecodeStage(CFG)(columns)
    return [{k: out[k][i] for k in out} for i in range(len(items))]


def rows_of(folder: Path) -> dict[str, dict]:
    """Every input of a folder, listed and decoded: relative source path -> decoded row."""
    items = list_inputs(str(folder))
    assert len({i.key for i in items}) == len(items)  # one key per input, none merged
    for i in items:
        check_key(i.key)
    return {i.source.split(str(folder) + "/", 1)[1]: row for i, row in zip(items, decode(items), strict=True)}


def one_file(tmp_path: Path, name: str, data: bytes) -> dict:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / name).write_bytes(data)
    rows = rows_of(folder)
    assert list(rows) == [name]  # the file is an input, with a row
    return rows[name]


# --- every format, cut and garbled ---------------------------------------------------------------------

FORMATS = {  # Pillow format -> (file extension, save options)
    "JPEG": ("jpg", {}), "PNG": ("png", {}), "WEBP": ("webp", {"lossless": True}), "GIF": ("gif", {}),
    "BMP": ("bmp", {}), "TIFF": ("tif", {}), "TIFF-LZW": ("tiff", {"compression": "tiff_lzw"}),
    "PPM": ("ppm", {}), "TGA": ("tga", {}), "PCX": ("pcx", {}), "SGI": ("sgi", {}),
    "IM": ("im", {}), "JPEG2000": ("jp2", {}), "QOI": ("qoi", {}), "DDS": ("dds", {}),
    "ICO": ("ico", {"sizes": [(64, 48)]}),
}
# How a file is damaged -> what the row must say: "failed" (with one of the reasons), or "either" for
# damage no format can see (a changed byte in compressed data, a missing trailer after complete data).
DAMAGE = {
    "zero_bytes": ("failed", ("empty file (0 bytes)",)),
    "header_only": ("failed", ("corrupt or truncated", "not an image")),
    "cut_10pct": ("failed", ("corrupt or truncated", "not an image")),
    "cut_50pct": ("failed", ("corrupt or truncated", "not an image")),
    "cut_90pct": ("failed", ("corrupt or truncated", "not an image")),
    "random_bytes": ("failed", ("not an image (unrecognized format)",)),
    "last_byte_gone": ("either", ("corrupt or truncated", "not an image")),
    "byte_flipped": ("either", ("corrupt or truncated", "not an image")),
}


def damaged(data: bytes, how: str) -> bytes:
    n = len(data)
    return {
        "zero_bytes": b"", "header_only": data[:32], "cut_10pct": data[: n // 10], "cut_50pct": data[: n // 2],
        "cut_90pct": data[: n * 9 // 10], "last_byte_gone": data[:-1],
        "random_bytes": np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes(),
        "byte_flipped": data[: n // 2] + bytes([data[n // 2] ^ 0xFF]) + data[n // 2 + 1:],
    }[how]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("how", DAMAGE, ids=lambda h: f"silent-{h}")
def test_every_format_cut_or_garbled_is_a_failed_row_with_its_reason(tmp_path, fmt, how):
    ext, options = FORMATS[fmt]
    good = image_bytes(fmt.split("-")[0], 64, 48, **options)
    row = one_file(tmp_path, f"img.{ext}", damaged(good, how))
    expect, reasons = DAMAGE[how]
    if expect == "failed" or row["status"] != "ok":
        assert row["status"] == "failed" and row["error_stage"] == "decode"
        assert row["error"].startswith(reasons), row["error"]
    else:
        assert (row["width"], row["height"]) == (64, 48)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_whole_decodes_at_its_size(tmp_path, fmt):
    ext, options = FORMATS[fmt]
    row = one_file(tmp_path, f"img.{ext}", image_bytes(fmt.split("-")[0], 64, 48, **options))
    assert (row["status"], row["width"], row["height"], row["image"].shape) == ("ok", 64, 48, (48, 64, 3))


# --- modes: CMYK, 16-bit, palette, alpha, float, 1-bit ... to their exact colours ----------------------


def _const(fmt: str, mode: str, value, palette: bool = False, **save) -> bytes:
    im = Image.new(mode, (40, 32), value)
    if palette:
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


MODES = [  # (id, format, mode, value, extra, expected RGB, tolerance)
    ("rgb-png", "PNG", "RGB", (10, 200, 30), {}, (10, 200, 30), 0),
    ("grey-png", "PNG", "L", 77, {}, (77, 77, 77), 0),
    ("grey-alpha-0", "PNG", "LA", (77, 0), {}, (255, 255, 255), 0),  # transparent: white, as viewers show
    ("grey-alpha-255", "PNG", "LA", (77, 255), {}, (77, 77, 77), 0),
    ("rgba-0", "PNG", "RGBA", (10, 200, 30, 0), {}, (255, 255, 255), 0),
    ("rgba-128", "PNG", "RGBA", (10, 200, 30, 128), {}, (132, 227, 142), 1),  # composited on white
    ("rgba-webp", "WEBP", "RGBA", (10, 200, 30, 255), {"lossless": True}, (10, 200, 30), 0),
    ("rgba-tga-0", "TGA", "RGBA", (9, 8, 7, 0), {}, (255, 255, 255), 0),
    ("rgba-tiff-0", "TIFF", "RGBA", (9, 8, 7, 0), {}, (255, 255, 255), 0),
    ("bilevel-png", "PNG", "1", 1, {}, (255, 255, 255), 0),
    ("bilevel-tiff", "TIFF", "1", 0, {}, (0, 0, 0), 0),
    ("16bit-png-max", "PNG", "I;16", 65535, {}, (255, 255, 255), 0),  # scaled, not clipped
    ("16bit-png-half", "PNG", "I;16", 32768, {}, (128, 128, 128), 0),
    ("16bit-tiff", "TIFF", "I;16", 1000, {}, (4, 4, 4), 0),
    ("16bit-bigendian-tiff", "TIFF", "I;16B", 65535, {}, (255, 255, 255), 0),
    ("32bit-int-small", "TIFF", "I", 100, {}, (100, 100, 100), 0),
    ("32bit-int-large", "TIFF", "I", 70000, {}, (255, 255, 255), 0),
    ("float-unit", "TIFF", "F", 0.5, {}, (128, 128, 128), 0),  # [0, 1]: not black
    ("float-255", "TIFF", "F", 200.0, {}, (200, 200, 200), 0),
    ("cmyk-tiff", "TIFF", "CMYK", (0, 255, 255, 0), {}, (255, 0, 0), 0),
    ("cmyk-jpeg", "JPEG", "CMYK", (0, 255, 255, 0), {}, (255, 0, 0), 3),
    ("lab-tiff", "TIFF", "LAB", (255, 128, 128), {}, (254, 255, 254), 1),
    ("ycbcr-tiff", "TIFF", "YCbCr", (100, 128, 128), {}, (100, 100, 100), 0),
    ("grey-jpeg", "JPEG", "L", 77, {}, (77, 77, 77), 1),
    ("grey-ppm", "PPM", "L", 9, {}, (9, 9, 9), 0),
    ("bgr-bmp", "BMP", "RGB", (1, 2, 3), {}, (1, 2, 3), 0),
    ("palette-png", "PNG", "P", 3, {"palette": True}, (3, 252, 21), 0),
    ("palette-gif", "GIF", "P", 5, {"palette": True}, (5, 250, 35), 0),
    ("palette-transparent", "PNG", "P", 3, {"palette": True, "transparency": 3}, (255, 255, 255), 0),
]


@pytest.mark.parametrize("fmt, mode, value, extra, rgb, tol", [m[1:] for m in MODES], ids=[f"silent-{m[0]}" for m in MODES])
def test_every_mode_decodes_to_its_exact_colour(tmp_path, fmt, mode, value, extra, rgb, tol):
    extra = dict(extra)
    data = _const(fmt, mode, value, palette=extra.pop("palette", False), **extra)
    row = one_file(tmp_path, f"img.{fmt.lower()}", data)
    assert row["status"] == "ok" and row["image"].shape == (32, 40, 3)
    assert np.abs(row["image"].astype(int) - np.array(rgb)).max() <= tol, row["image"][0, 0]


def test_exif_rotation_animation_and_pages_take_the_shown_first_image(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter
    Image.new("RGB", (64, 48), (10, 20, 30)).save(folder / "rotated.jpg", exif=exif)
    frames = [Image.new("P", (40, 32), i) for i in (1, 2, 3)]
    for f in frames:
        f.putpalette([v for i in range(256) for v in (i * 50 % 256, 0, 0)])
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    pages = [Image.new("L", (40, 32), v) for v in (11, 22)]
    pages[0].save(folder / "pages.tif", save_all=True, append_images=pages[1:])
    rows = rows_of(folder)
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (48, 64)
    assert rows["anim.gif"]["image"][0, 0].tolist() == [50, 0, 0]
    assert rows["pages.tif"]["image"][0, 0].tolist() == [11, 11, 11]


# --- sizes: too small, and headers claiming gigapixels ------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def _jpeg_claiming(w: int, h: int) -> bytes:
    data = bytearray(image_bytes("JPEG", 16, 16))
    at = data.index(b"\xff\xc0") + 5  # SOF0: length (2), precision (1), then height, width
    data[at:at + 4] = struct.pack(">HH", h, w)
    return bytes(data)


def _gif_claiming(w: int, h: int) -> bytes:
    data = bytearray(image_bytes("GIF", 16, 16))
    data[6:10] = struct.pack("<HH", w, h)  # the logical screen
    at = data.index(b"\x2c")  # the image descriptor: left, top, width, height
    data[at + 5:at + 9] = struct.pack("<HH", w, h)
    return bytes(data)


def _bmp_claiming(w: int, h: int) -> bytes:
    data = bytearray(image_bytes("BMP", 16, 16))
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


def _ztxt_bomb() -> bytes:
    """A PNG with a compressed text chunk that inflates to 64 MB (Pillow's text limit refuses it)."""
    good = image_bytes("PNG", 40, 32)
    ztxt = b"comment\0\0" + zlib.compress(b"\0" * 64 * 2**20, 9)
    return good[:33] + _chunk(b"zTXt", ztxt) + good[33:]


SIZES = [  # (id, file name, bytes, expected status, reason prefix or (w, h))
    ("silent-one-pixel", "a.png", image_bytes("PNG", 1, 1), "failed", "image is 1x1, below min_side 8"),
    ("silent-thin", "a.png", image_bytes("PNG", 7, 300), "failed", "image is 7x300, below min_side 8"),
    ("silent-long", "a.png", image_bytes("PNG", 3000, 8), "ok", (1024, 3)),
    ("silent-large", "a.jpg", image_bytes("JPEG", 2400, 1800), "ok", (1024, 768)),
    ("security-png-bomb", "a.png", _png_claiming(40000, 40000), "failed", "decompression-bomb guard"),
    ("security-png-bomb-below-pil", "a.png", _png_claiming(12000, 10000), "failed", "decompression-bomb guard"),
    ("security-jpeg-bomb", "a.jpg", _jpeg_claiming(65000, 65000), "failed", "decompression-bomb guard"),
    ("security-gif-bomb", "a.gif", _gif_claiming(65535, 65535), "failed", "decompression-bomb guard"),
    ("security-bmp-bomb", "a.bmp", _bmp_claiming(60000, 60000), "failed", "decompression-bomb guard"),
    ("security-ppm-bomb", "a.ppm", b"P6\n50000 50000\n255\n" + bytes(64), "failed", "decompression-bomb guard"),
    ("security-png-text-bomb", "a.png", _ztxt_bomb(), "failed", "corrupt or truncated"),
]


@pytest.mark.parametrize("name, data, status, expect", [s[1:] for s in SIZES], ids=[s[0] for s in SIZES])
def test_sizes_too_small_or_claiming_too_many_pixels(tmp_path, name, data, status, expect):
    row = one_file(tmp_path, name, data)
    assert row["status"] == status, row["error"]
    if status == "ok":
        assert (row["width"], row["height"]) == expect
    else:
        assert row["error"].startswith(expect), row["error"]


# --- names and extensions ----------------------------------------------------------------------------

NAMES = ["café.jpg", unicodedata.normalize("NFD", "café.png"), "日本語の写真.jpg", "emoji_😀.webp", "space name.jpg",
         "new\nline.jpg", "tab\there.jpg", "semi;colon,comma.jpg", "quote'\"`.jpg", "\u202eevil_gpj.jpg",
         "x" * 240 + ".jpg", "UPPER.JPG", "-dash.jpeg", "many.dots.in.name.jpg", "#hash%25?.jpg"]


@pytest.mark.parametrize("name", NAMES, ids=[f"lost-name{i}" for i in range(len(NAMES))])
def test_odd_file_names_are_inputs_with_valid_keys(tmp_path, name):
    fmt = {"png": "PNG", "webp": "WEBP"}.get(name.rsplit(".", 1)[1].lower(), "JPEG")
    row = one_file(tmp_path, name, image_bytes(fmt, 40, 32))
    assert row["status"] == "ok" and row["width"] == 40


def test_names_that_differ_only_by_unicode_form_or_case_are_two_inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("café.jpg", unicodedata.normalize("NFD", "café.jpg"), "Cafe.jpg", "cafe.jpg"):
        (folder / name).write_bytes(image_bytes("JPEG", 40, 32))
    rows = rows_of(folder)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows.values())


EXTENSIONS = [  # (id, file name, bytes, status, reason)
    ("silent-png-named-jpg", "a.jpg", image_bytes("PNG", 40, 32), "ok", None),
    ("silent-jpeg-named-png", "a.png", image_bytes("JPEG", 40, 32), "ok", None),
    ("silent-gif-named-webp", "a.webp", image_bytes("GIF", 40, 32), "ok", None),
    ("silent-text-named-png", "a.png", b"hello, not an image\n", "failed", "not an image (unrecognized format)"),
    ("silent-html-named-jpg", "a.jpg", b"<!DOCTYPE html><html>404</html>", "failed", "not an image (unrecognized format)"),
    ("silent-pdf-named-jpg", "a.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "failed", "not an image (unrecognized format)"),
    ("lost-image-named-txt", "a.txt", image_bytes("JPEG", 40, 32), "failed", "not an image"),
    ("lost-image-without-extension", "image", image_bytes("JPEG", 40, 32), "failed", "not an image"),
    ("lost-image-named-dat", "a.dat", image_bytes("PNG", 40, 32), "failed", "not an image"),
    ("lost-hidden-image", ".hidden.jpg", image_bytes("JPEG", 40, 32), "failed", "skipped: file name starts with a dot"),
]


@pytest.mark.parametrize("name, data, status, reason", [e[1:] for e in EXTENSIONS], ids=[e[0] for e in EXTENSIONS])
def test_wrong_extensions_decode_by_content_or_are_named_rows(tmp_path, name, data, status, reason):
    row = one_file(tmp_path, name, data)
    assert row["status"] == status
    if reason:
        assert row["error"].startswith(reason), row["error"]


# --- things in a folder that are not files -------------------------------------------------------------


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _socket(p: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()  # the socket file stays


def _device(p: Path) -> None:
    try:
        os.mknod(p, 0o600 | 0o020000, os.makedev(1, 3))  # a character device like /dev/null
    except PermissionError:
        pytest.skip("mknod not permitted here")


NOT_FILES = [  # (id, name, maker(path, folder), expected reason)
    ("fifo-image", "p.jpg", lambda p, d: _fifo(p), PIPE),
    ("fifo-caption", "a.txt", lambda p, d: _fifo(p), PIPE),
    ("fifo-sidecar", "a.json", lambda p, d: _fifo(p), PIPE),
    ("socket", "s.png", lambda p, d: _socket(p), PIPE),
    ("device", "dev.jpg", lambda p, d: _device(p), PIPE),
    ("link-to-fifo", "l.jpg", lambda p, d: (_fifo(d / "target"), os.symlink(d / "target", p)), PIPE),
    ("link-to-dev-zero", "z.png", lambda p, d: os.symlink("/dev/zero", p), PIPE),
    ("link-to-dev-null", "n.png", lambda p, d: os.symlink("/dev/null", p), PIPE),
    ("broken-link", "b.jpg", lambda p, d: os.symlink(d / "missing", p),
     "a broken link (what it points to does not exist): not read"),
    ("link-loop", "loop.jpg", lambda p, d: os.symlink(p, p), "cannot be inspected (Too many levels of symbolic links): not read"),
    ("link-to-folder", "f.jpg", lambda p, d: os.symlink(d, p), "a link to a folder (not followed)"),
]


@pytest.mark.parametrize("name, make, reason", [n[1:] for n in NOT_FILES], ids=[f"lost-{n[0]}" for n in NOT_FILES])
def test_what_is_not_a_file_in_a_folder_is_a_failed_row_and_never_opened(tmp_path, name, make, reason):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(image_bytes("JPEG", 40, 32))
    make(folder / name, tmp_path)
    rows = rows_of(folder)
    assert rows["a.jpg"]["status"] == "ok"
    assert rows[name]["status"] == "failed" and rows[name]["error"] == reason
    assert len(rows) == 2


def test_folders_named_like_images_are_walked_not_opened(tmp_path):
    folder = tmp_path / "in"
    (folder / "d.jpg" / "e.png").mkdir(parents=True)
    (folder / "d.jpg" / "inner.png").write_bytes(image_bytes("PNG", 40, 32))
    assert {k: r["status"] for k, r in rows_of(folder).items()} == {"d.jpg/inner.png": "ok"}


# --- parquet and CSV lists -----------------------------------------------------------------------------


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


GOOD_PARQUET = _parquet(pa.table({"path": ["imgs/a.jpg", "imgs/b.jpg"], "caption": ["one", "two"]}))

LIST_ERRORS = [  # (id, file name, bytes, the error after the file's path)
    ("empty-csv", "l.csv", b"", "empty CSV/TSV list (no header line naming its columns)"),
    ("blank-lines-csv", "l.csv", b"\n\n\n", "empty CSV/TSV list (no header line naming its columns)"),
    ("header-only-csv", "l.csv", b"path,caption\n", "no images found"),
    ("no-path-column-csv", "l.csv", b"name,caption\na.jpg,x\n", "no image path/URL column"),
    ("ragged-csv", "l.csv", b"path\na.jpg\nb.jpg,extra,fields\n", "not a readable CSV/TSV list (ParserError"),
    ("latin1-csv", "l.csv", "path\nbild_\xe4.jpg\n".encode("latin-1"), "not a readable CSV/TSV list (UnicodeDecodeError"),
    ("binary-csv", "l.csv", bytes(range(256)) * 8, "not a readable CSV/TSV list ("),
    ("empty-parquet", "l.parquet", b"", "not a readable parquet file (ArrowInvalid: Parquet file size is 0 bytes)"),
    ("garbage-parquet", "l.parquet", b"PAR1" + bytes(range(256)) * 4, "not a readable parquet file (ArrowInvalid"),
    ("truncated-parquet", "l.parquet", GOOD_PARQUET[: len(GOOD_PARQUET) // 2], "not a readable parquet file ("),
    ("footer-cut-parquet", "l.parquet", GOOD_PARQUET[:-5], "not a readable parquet file ("),
    ("csv-named-parquet", "l.parquet", b"path\na.jpg\n", "not a readable parquet file ("),
    ("zero-rows-parquet", "l.parquet", _parquet(pa.table({"path": pa.array([], pa.string())})), "no images found"),
    ("no-path-column-parquet", "l.parquet", _parquet(pa.table({"x": [1, 2]})), "no image path/URL column"),
]


@pytest.mark.parametrize("name, data, why", [e[1:] for e in LIST_ERRORS], ids=[f"silent-{e[0]}" for e in LIST_ERRORS])
def test_a_list_that_cannot_be_read_is_an_input_error_naming_it(tmp_path, name, data, why):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError) as e:
        list_inputs(str(tmp_path / name))
    assert str(e.value).startswith(f"{tmp_path / name}: {why}") or \
        (why == "no images found" and str(e.value).startswith(f"{tmp_path / name}: no images found")), str(e.value)


def _list_rows(tmp_path: Path, name: str, data: bytes) -> list[dict]:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(image_bytes("JPEG", 40, 32))
    _fifo(tmp_path / "imgs" / "pipe.jpg")
    (tmp_path / name).write_bytes(data)
    items = list_inputs(str(tmp_path / name))
    return decode(items)


LIST_ROWS = [  # (id, file name, bytes, [(status, error)] per row)
    ("bom-header", "l.csv", "\ufeffpath\nimgs/a.jpg\n".encode(), [("ok", None)]),
    ("tsv", "l.tsv", b"path\tcaption\nimgs/a.jpg\ta, with commas\n", [("ok", None)]),
    ("crlf", "l.csv", b"path,caption\r\nimgs/a.jpg,x\r\n", [("ok", None)]),
    ("empty-cells", "l.csv", b"path\n\n\"\"\nimgs/a.jpg\n", [("failed", "no path or URL given"), ("ok", None)]),
    ("missing-file", "l.csv", b"path\nimgs/gone.jpg\n", [("failed", "file not found")]),
    ("a-folder", "l.csv", b"path\nimgs\n", [("failed", "not a regular file (a folder, named pipe, socket or device): not read")]),
    ("a-named-pipe", "l.csv", b"path\nimgs/pipe.jpg\n", [("failed", "not a regular file (a folder, named pipe, socket or device): not read")]),
    ("dev-zero", "l.csv", b"path\n/dev/zero\n", [("failed", "not a regular file (a folder, named pipe, socket or device): not read")]),
    ("nul-in-path", "l.csv", b"path\nimgs/a\x00.jpg\n", [("failed", "read failed: ValueError: embedded null byte")]),
    ("huge-field", "l.csv", b"path\n" + b"x" * 300_000 + b".jpg\n", [("failed", "read failed: OSError: File name too long")]),
    ("int-path-parquet", "l.parquet", _parquet(pa.table({"path": [1, 2]})), [("failed", "file not found")] * 2),
    ("null-path-parquet", "l.parquet", _parquet(pa.table({"path": pa.array([None, "imgs/a.jpg"], pa.string())})),
     [("failed", "no path or URL given"), ("ok", None)]),
    ("nan-path-parquet", "l.parquet", _parquet(pa.table({"path": [float("nan"), 1.5]})),
     [("failed", "no path or URL given"), ("failed", "file not found")]),
    ("list-path-parquet", "l.parquet", _parquet(pa.table({"path": [["imgs/a.jpg"]]})), [("failed", "file not found")]),
    ("garbage-bytes-column", "l.parquet", _parquet(pa.table({"jpg": [b"not an image", b""]})),
     [("failed", "not an image (unrecognized format)"), ("failed", "no image bytes in column 'jpg'")]),
    ("deep-caption", "l.csv", b"path,caption\nimgs/a.jpg," + b"[" * 5000 + b"\n", [("ok", None)]),
]


@pytest.mark.parametrize("name, data, expect", [r[1:] for r in LIST_ROWS], ids=[f"lost-{r[0]}" for r in LIST_ROWS])
def test_every_row_of_an_awkward_list_is_a_sample_or_a_failed_row(tmp_path, name, data, expect):
    rows = _list_rows(tmp_path, name, data)
    assert [(r["status"], r["error"]) for r in rows] == expect


# --- tars given as input -----------------------------------------------------------------------------


def _i2d_members(n: int = 2) -> list[tuple[str, bytes]]:
    return [m for i in range(n) for m in ((f"00000000{i}.jpg", image_bytes("JPEG", 40, 32, seed=i)),
                                          (f"00000000{i}.txt", f"alt {i}".encode()))]


TAR_ERRORS = [  # (id, bytes, the error after the tar's path)
    ("empty-file", b"", "not a readable tar (ReadError: empty file)"),
    ("garbage", bytes(range(256)) * 40, "not a readable tar (ReadError: "),
    ("gzip-named-tar", tar_bytes(_i2d_members(), mode="w:gz"), "not a readable tar (ReadError: "),
    ("cut-in-a-header", tar_bytes(_i2d_members())[:700], "not a readable tar ("),
    ("no-members", tar_bytes([]), "no images found"),
]


@pytest.mark.parametrize("data, why", [t[1:] for t in TAR_ERRORS], ids=[f"silent-{t[0]}" for t in TAR_ERRORS])
def test_a_tar_that_cannot_be_listed_is_an_input_error_naming_it(tmp_path, data, why):
    (tmp_path / "00000.tar").write_bytes(data)
    with pytest.raises(InputError) as e:
        list_inputs(str(tmp_path / "00000.tar"))
    assert why in str(e.value) and str(e.value).startswith(str(tmp_path / "00000.tar")), str(e.value)


TAR_ROWS = [  # (id, members, [(status, error)])
    ("links-and-devices", [*_i2d_members(1), link("000000001.jpg", "/etc/passwd"), link("x.jpg", "000000000.jpg", True),
                           special("f.jpg", tarfile.FIFOTYPE), special("c.jpg", tarfile.CHRTYPE)], [("ok", None)]),
    ("folders", [special("d", tarfile.DIRTYPE), ("d/000000000.jpg", image_bytes("JPEG", 40, 32))], [("ok", None)]),
    ("dot-dot-name", [("../000000000.jpg", image_bytes("JPEG", 40, 32))], [("ok", None)]),
    ("garbage-image-member", [("000000000.jpg", b"garbage")], [("failed", "not an image (unrecognized format)")]),
    ("empty-image-member", [("000000000.jpg", b"")], [("failed", "empty file (0 bytes)")]),
    ("deep-sidecar", [("000000000.jpg", image_bytes("JPEG", 40, 32)), ("000000000.json", b"[" * 100_000)],
     [("ok", None)]),
    ("huge-int-sidecar", [("000000000.jpg", image_bytes("JPEG", 40, 32)),
                          ("000000000.json", b'{"original_width": ' + b"9" * 5000 + b"}")], [("ok", None)]),
    ("two-images-one-key", [("000000000.jpg", image_bytes("JPEG", 40, 32)), ("000000000.png", image_bytes("PNG", 8, 8))],
     [("ok", None)]),
]


@pytest.mark.parametrize("members, expect", [t[1:] for t in TAR_ROWS], ids=[f"lost-{t[0]}" for t in TAR_ROWS])
def test_each_image_member_of_an_odd_tar_is_a_sample_or_a_failed_row(tmp_path, members, expect):
    (tmp_path / "00000.tar").write_bytes(tar_bytes(members))
    rows = decode(list_inputs(str(tmp_path / "00000.tar")))
    assert [(r["status"], r["error"]) for r in rows] == expect
    assert all(r["width"] == 40 for r in rows if r["status"] == "ok")


def test_a_tar_cut_inside_a_member_lists_what_it_holds_and_fails_the_cut_member(tmp_path):
    data = tar_bytes(_i2d_members(2))
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        cut = t.getmember("000000001.jpg").offset_data + 100
    (tmp_path / "00000.tar").write_bytes(data[:cut])
    with pytest.raises(InputError, match="not a readable tar"):
        list_inputs(str(tmp_path / "00000.tar"))


# --- img2dataset folders with broken parts ----------------------------------------------------------------


def test_img2dataset_folder_with_a_garbage_download_log_is_an_input_error_naming_it(tmp_path):
    (tmp_path / "00000.tar").write_bytes(tar_bytes(_i2d_members()))
    (tmp_path / "00000.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(InputError, match=f"^{tmp_path / '00000.parquet'}: img2dataset's download log: not a readable parquet"):
        list_inputs(str(tmp_path))


@pytest.mark.parametrize("make, name, reason", [
    (lambda p: _fifo(p), "00001.tar", PIPE),
    (lambda p: p.mkdir(), "00001.tar", "a folder named like a file (.tar or .parquet): not read"),
    (lambda p: _fifo(p), "00001.parquet", PIPE),
], ids=["lost-fifo-named-tar", "lost-folder-named-tar", "lost-fifo-named-parquet"])
def test_img2dataset_folder_parts_that_are_not_files_are_failed_rows(tmp_path, make, name, reason):
    (tmp_path / "00000.tar").write_bytes(tar_bytes(_i2d_members()))
    make(tmp_path / name)
    items = list_inputs(str(tmp_path))
    rows = {i.source.rsplit("/", 1)[1]: r for i, r in zip(items, decode(items), strict=True)}
    assert [r["status"] for k, r in rows.items() if k != name] == ["ok", "ok"]
    assert (rows[name]["status"], rows[name]["error"]) == ("failed", reason)


def test_a_garbage_parquet_in_a_plain_folder_is_a_not_an_image_row(tmp_path):
    (tmp_path / "a.jpg").write_bytes(image_bytes("JPEG", 40, 32))
    (tmp_path / "x.parquet").write_bytes(b"PAR1 nope")
    rows = rows_of(tmp_path)
    assert {k: (r["status"], r["error"]) for k, r in rows.items()} == {"a.jpg": ("ok", None),
                                                                       "x.parquet": ("failed", "not an image")}


@pytest.mark.parametrize("sidecar, caption, meta", [
    (("a.json", b"[" * 100_000), "cap", {}),
    (("a.json", b'{"url": ' + b"1" * 5000 + b"}"), "cap", {}),
    (("a.json", json.dumps({"url": "http://x/a.jpg"}).encode()), "cap", {"url": "http://x/a.jpg"}),
    (("a.json", b"\xff\xfe garbage"), "cap", {}),
    (("a.txt", b"x" * (2 * 2**20)), None, {}),  # a 2 MB caption is not read
    (("a.txt", b"\xff\xfe\xfd caption"), "\ufffd\ufffd\ufffd caption", {}),
], ids=["silent-deep-sidecar", "silent-huge-int-sidecar", "silent-url-sidecar", "silent-binary-sidecar",
        "security-huge-caption", "silent-binary-caption"])
def test_sidecars_that_are_deep_huge_or_binary_leave_the_image_an_input(tmp_path, sidecar, caption, meta):
    (tmp_path / "a.jpg").write_bytes(image_bytes("JPEG", 40, 32))
    if sidecar[0] != "a.txt":
        (tmp_path / "a.txt").write_text("cap")
    (tmp_path / sidecar[0]).write_bytes(sidecar[1])
    items = list_inputs(str(tmp_path))
    assert [(i.caption, i.meta) for i in items] == [(caption, meta)]
    assert decode(items)[0]["status"] == "ok"


def test_a_given_folder_list_or_tar_that_is_not_a_file_is_an_input_error(tmp_path):
    _fifo(tmp_path / "l.csv")
    os.symlink("/dev/zero", tmp_path / "z.parquet")
    for name in ("l.csv", "z.parquet"):
        with pytest.raises(InputError, match=f"^{re.escape(f'{tmp_path / name}: {PIPE}')}$"):
            list_inputs(str(tmp_path / name))


def test_a_csv_naming_the_same_image_twice_and_a_url_keeps_both_rows(tmp_path):
    rows = _list_rows(tmp_path, "l.csv", b"path\nimgs/a.jpg\nimgs/a.jpg\nhttp://127.0.0.1:9/none.jpg\n")
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert rows[2]["error"].startswith("read failed: ClientConnectorError")


def test_a_dataframe_list_with_index_and_odd_dtypes_reads_the_path_column(tmp_path):
    df = pd.DataFrame({"path": ["imgs/a.jpg"], "caption": [np.nan], "n": [np.int8(1)]}, index=["weird-index"])
    rows = _list_rows(tmp_path, "l.parquet", _parquet(pa.Table.from_pandas(df)))
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["source_caption"] is None  # NaN is no caption

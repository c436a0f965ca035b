"""Raw inputs for the datagen tests: synthetic images plus one of each kind of bad or awkward file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from datagen.synthetic import make_image_folder


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``: the bomb guard must refuse it unread."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_awkward_files(folder: Path) -> dict[str, str | None]:
    """Write the awkward inputs; returns file name -> expected decode failure substring (None: decodes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 255, size=(120, 160, 3), dtype=np.uint8)
    (folder / "zero_bytes.jpg").write_bytes(b"")
    Image.fromarray(rgb).save(folder / "full.jpg", quality=90)
    (folder / "truncated.jpg").write_bytes((folder / "full.jpg").read_bytes()[:600])
    (folder / "full.jpg").unlink()
    (folder / "text_named.jpg").write_text("this is not an image\n")
    Image.fromarray(rgb[:1, :1]).save(folder / "one_pixel.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    ramp = (np.linspace(0, 65535, 140 * 100).reshape(100, 140)).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "gray16.png")
    Image.fromarray(rgb[..., 0]).save(folder / "gray8.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.webp")
    Image.fromarray(np.tile(rgb, (4, 30, 1))).save(folder / "wide_large.jpg", quality=85)  # 4800 x 480
    (folder / "bomb.png").write_bytes(_huge_png_header(40000, 40000))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(rgb).save(folder / "rotated.jpg", quality=90, exif=exif)
    return {
        "zero_bytes.jpg": "empty file",
        "truncated.jpg": "truncated",
        "text_named.jpg": "not an image",
        "one_pixel.png": "below min_side",
        "bomb.png": "decompression-bomb guard",
        "cmyk.jpg": None,
        "gray16.png": None,
        "gray8.png": None,
        "palette.png": None,
        "alpha.webp": None,
        "wide_large.jpg": None,
        "rotated.jpg": None,
    }


def make_inputs(folder: Path, n_good: int = 28) -> dict[str, str | None]:
    """``n_good`` synthetic images in ``folder/good`` plus the awkward files in ``folder/awkward``."""
    make_image_folder(folder / "good", n_good, seed=1, min_size=64, max_size=160)
    return make_awkward_files(folder / "awkward")

"""Stage 1, on CPU: read each input's bytes, decode, apply EXIF orientation, convert to RGB, bound the size.

A bad input never raises: its row gets ``status="failed"``, ``error_stage="decode"`` and a reason that
names what is wrong (empty file, truncated, not an image, too large, too small) without paths or
memory addresses, so reasons group in the summary and reruns write the same parquet.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from PIL import Image, ImageOps, UnidentifiedImageError

from shards.config import ConfigError, PositiveInt
from shards.paths import is_local, open_sequential
from shards.schema import STATUS_FAILED, STATUS_OK

log = logging.getLogger(__name__)

STAGE = "decode"
# Sources PIL decodes to 16 bits per channel (or 32-bit ints/floats) that ``convert("RGB")`` would clip.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@dataclass(frozen=True)
class DecodeConfig:
    """How inputs are read and bounded."""

    max_side: PositiveInt = 1024  # the longer side of the stored image; larger images are downscaled
    min_side: PositiveInt = 32  # shorter sides below this fail (nothing groundable; the paper's 32 px floor)
    max_pixels: PositiveInt = 100_000_000  # decompression-bomb guard, checked from the header before decoding
    max_bytes: PositiveInt = 64 * 2**20  # files larger than this are refused unread
    keep_source_jpeg: bool = True  # store the source bytes when they already are the RGB JPEG we'd write

    def __post_init__(self) -> None:
        if self.max_side < self.min_side:
            raise ConfigError(f"max_side ({self.max_side}) must be >= min_side ({self.min_side})")


class DecodeError(Exception):
    """A reason an input cannot become an image; its message is what the parquet row records."""


def _read_group(uri: str, items: list[dict], max_bytes: int) -> list[bytes | DecodeError]:
    """The bytes of the items that share one file (an image, a tar, a parquet), opening it once."""
    if not uri:
        return [DecodeError("no path or URL given") for _ in items]
    try:
        fs, path = url_to_fs(uri)
        if is_local(fs) and fs.info(path)["type"] != "file":  # a list may name a pipe: never opened
            return [DecodeError("not a regular file (a folder, named pipe, socket or device): not read") for _ in items]
        with fs.open(path, "rb") as f:
            if items[0].get("column"):
                return _read_parquet_rows(f, items)
            return [_read_one(f, it, max_bytes) for it in items]
    except Exception as e:  # noqa: BLE001 - each fsspec backend (http, s3, gcs) raises its own types
        if not (_no_ranges(e) and all(it.get("offset") is not None for it in items)):
            return [DecodeError(read_failure(e)) for _ in items]
    try:  # a tar from a server without byte ranges: one stream, the members in order
        return _read_members_in_order(uri, items, max_bytes)
    except Exception as e:  # noqa: BLE001 - as above
        return [DecodeError(read_failure(e)) for _ in items]


def _no_ranges(e: BaseException) -> bool:
    # fsspec's HTTP file asks for a byte range per block and says so when the server answers with the
    # whole file instead (python -m http.server does); its message is the only mark it leaves.
    return isinstance(e, ValueError) and "range requests" in str(e)


def _read_exactly(f, n: int) -> bytes:
    # A network stream may hand back fewer bytes than asked for: read until n or the end.
    parts, got = [], 0
    while got < n and (part := f.read(min(n - got, 1 << 20))):
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _read_members_in_order(uri: str, items: list[dict], max_bytes: int) -> list[bytes | DecodeError]:
    """Tar members read front to back in one pass over the tar (skipped bytes are read and dropped)."""
    out: list[bytes | DecodeError] = [DecodeError("not read")] * len(items)
    pos = 0
    with open_sequential(uri) as f:
        for i in sorted(range(len(items)), key=lambda i: items[i]["offset"]):
            offset, size = items[i]["offset"], items[i]["size"]
            if size > max_bytes:
                out[i] = DecodeError(f"file is {size} bytes, above max_bytes {max_bytes}")
                continue
            if offset < pos:  # two members at one offset: the stream cannot go back
                out[i] = DecodeError("tar member overlaps the one before it")
                continue
            while pos < offset:
                skipped = len(_read_exactly(f, min(offset - pos, 1 << 20)))
                if not skipped:
                    break
                pos += skipped
            data = _read_exactly(f, size)
            pos += len(data)
            out[i] = data if len(data) == size else DecodeError(f"tar is cut short inside this member ({len(data)} of {size} bytes)")
    return out


def read_failure(e: BaseException) -> str:
    """What went wrong reading a file, as the parquet row records it.

    fsspec's HTTP filesystem answers every failure to open a URL with a FileNotFoundError whose cause
    is the transport error: only an HTTP 404/410 (or a plain missing local file) is "file not found";
    a refused connection, a DNS or TLS failure or a 5xx is recorded as it was, so a dead server is not
    mistaken for a missing image.
    """
    cause = e
    if isinstance(e, FileNotFoundError):
        cause = e.__cause__
        # Only a transport error behind it (an OSError or an aiohttp error) is something else; an
        # object store's own "no such key" (botocore's ClientError) is the file being missing.
        if cause is None or isinstance(cause, FileNotFoundError) or not (
                isinstance(cause, OSError) or type(cause).__module__.split(".")[0] == "aiohttp"):
            return "file not found"
    status = getattr(cause, "status", None)
    if isinstance(status, int):  # an HTTP answer (aiohttp.ClientResponseError): the status says it
        if status in (404, 410):
            return "file not found"
        return f"read failed: HTTP {status} {getattr(cause, 'message', '') or ''}".rstrip()
    text = str(cause).splitlines()[0] if str(cause) else ""
    if isinstance(cause, OSError) and cause.strerror and (cause.filename is not None or not text or text.startswith("[Errno")):
        text = cause.strerror  # "[Errno 13] Permission denied: '/a/path'": the reason without the path
    os_error = getattr(cause, "os_error", None)  # aiohttp's connector errors keep the socket's own error
    if isinstance(os_error, OSError) and os_error.errno and os.strerror(os_error.errno) not in text:
        text = f"{text} ({os.strerror(os_error.errno)})"  # "Connect call failed" -> also "Connection refused"
    return f"read failed: {type(cause).__name__}: {text}".rstrip(": ")


def _read_one(f, item: dict, max_bytes: int) -> bytes | DecodeError:
    if item.get("offset") is None:  # the file is the image (listed twice in a list: read it twice)
        f.seek(0)
        data = f.read(max_bytes + 1)
    elif item["size"] > max_bytes:  # a tar member: its size is known before reading
        return DecodeError(f"file is {item['size']} bytes, above max_bytes {max_bytes}")
    else:
        f.seek(item["offset"])
        data = f.read(item["size"])
    return data if len(data) <= max_bytes else DecodeError(f"file is larger than max_bytes {max_bytes}")


def _read_parquet_rows(f, items: list[dict]) -> list[bytes | DecodeError]:
    pf = pq.ParquetFile(f)
    cache: dict[tuple[int, str], list] = {}
    out: list[bytes | DecodeError] = []
    for it in items:
        k = (it["row_group"], it["column"])
        if k not in cache:
            cache[k] = pf.read_row_group(k[0], columns=[k[1]]).column(0).to_pylist()
        data = cache[k][it["row"]]
        out.append(data if data else DecodeError(f"no image bytes in column {it['column']!r}"))
    return out


def read_inputs(items: Sequence[dict], max_bytes: int) -> list[bytes | DecodeError]:
    """The bytes of each item, in order, or the reason they could not be read."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it["uri"], []).append(i)
    out: list[bytes | DecodeError] = [b""] * len(items)
    for uri, idx in groups.items():
        for i, data in zip(idx, _read_group(uri, [items[i] for i in idx], max_bytes), strict=True):
            out[i] = data
    return out


def _to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """One channel of 16 bits or more (or floats) as 8 bits, by the range its mode and values imply:
    16-bit modes span 0..65535; floats whose values lie in [0, 1] are the usual unit scale (a float TIFF
    read as 0..255 would be black); otherwise values up to 255 are 8-bit already and larger ones 16-bit."""
    top = float(a.max(initial=0.0))
    if mode.startswith("I;16") or top > 255:
        scale = 65535.0 if top <= 65535 else top
    elif mode == "F" and top <= 1.0:
        scale = 1.0
    else:
        scale = 255.0
    return np.clip(np.rint(a * (255.0 / scale)), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, handling what ``convert("RGB")`` gets wrong: 16-bit (clips), and transparency (garbage)."""
    if im.mode in _WIDE_MODES:
        a = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        return Image.fromarray(_to_8bit(a, im.mode), "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels hold arbitrary colours: composite on white, as a viewer shows them.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _bounded(w: int, h: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


@dataclass(frozen=True)
class Decoded:
    """One decoded image and what the writer needs to store it."""

    image: np.ndarray  # HxWx3 uint8 RGB
    original_size: tuple[int, int]  # (w, h) after EXIF rotation, before resizing
    source_jpeg: bytes | None  # the source bytes, when they can be stored as they are


def decode_image(data: bytes, cfg: DecodeConfig) -> Decoded:
    """Decode one encoded image under ``cfg``'s bounds, or raise DecodeError with the reason."""
    if len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    if len(data) > cfg.max_bytes:
        raise DecodeError(f"file is larger than max_bytes {cfg.max_bytes}")
    fmt = None
    try:
        with warnings.catch_warnings():
            # Our own max_pixels guard below decides; PIL's global bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > cfg.max_pixels:
                raise DecodeError(
                    f"decompression-bomb guard: {w}x{h} = {w * h} pixels exceeds max_pixels {cfg.max_pixels}"
                )
            fmt = im.format
            orientation = im.getexif().get(0x0112, 1)
            # JPEG can decode at 1/2, 1/4, 1/8 scale for free: never decode more pixels than needed.
            if fmt == "JPEG" and max(w, h) > cfg.max_side:
                im.draft(im.mode, _bounded(w, h, cfg.max_side))
            im.load()
            if orientation != 1:
                im = ImageOps.exif_transpose(im)
            ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognized format)") from None
    except Image.DecompressionBombError as e:  # PIL's own limit, hit while reading the header
        raise DecodeError(f"decompression-bomb guard: {str(e).split(',')[0]}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).split(" (")[0] or type(e).__name__
        raise DecodeError(f"corrupt or truncated {fmt or 'image'}: {msg}") from None
    if min(ow, oh) < cfg.min_side:
        raise DecodeError(f"image is {ow}x{oh}, below min_side {cfg.min_side}")
    passthrough = (
        cfg.keep_source_jpeg and fmt == "JPEG" and im.mode == "RGB" and orientation == 1 and max(ow, oh) <= cfg.max_side
    )
    rgb = _to_rgb(im)
    size = _bounded(ow, oh, cfg.max_side)
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return Decoded(np.asarray(rgb, dtype=np.uint8), (ow, oh), data if passthrough else None)


class DecodeStage:
    """``batch`` of input items (the InputItem columns) -> the decoded columns of the stage contract."""

    def __init__(self, config: DecodeConfig | None = None):
        self.config = config or DecodeConfig()

    def __call__(self, batch: dict) -> dict:
        keys = list(batch["key"])
        items = [{k: _item(batch[k][i]) for k in batch} for i in range(len(keys))]
        cols: dict[str, list] = {
            name: []
            for name in (
                "key", "source", "source_caption", "meta", "image", "source_jpeg", "width", "height",
                "original_width", "original_height", "status", "error_stage", "error",
            )
        }
        for it, data in zip(items, read_inputs(items, self.config.max_bytes), strict=True):
            cols["key"].append(it["key"])
            cols["source"].append(it["source"])
            cols["source_caption"].append(it.get("caption"))
            cols["meta"].append(dict(it.get("meta") or {}))
            if it.get("failure"):  # known at listing (img2dataset's download error): recorded as is
                data = DecodeError(it["failure"])
            try:
                if isinstance(data, DecodeError):
                    raise data
                d = decode_image(data, self.config)
            except DecodeError as e:
                row = {"image": None, "source_jpeg": None, "width": None, "height": None, "original_width": None,
                       "original_height": None, "status": STATUS_FAILED, "error_stage": STAGE, "error": str(e)}
            else:
                h, w = d.image.shape[:2]
                # The source's own original size (img2dataset resized what it stored) wins over ours.
                ow, oh = (it["original_width"], it["original_height"]) if it.get("original_width") and \
                    it.get("original_height") else d.original_size
                row = {"image": d.image, "source_jpeg": d.source_jpeg, "width": w, "height": h,
                       "original_width": ow, "original_height": oh,
                       "status": STATUS_OK, "error_stage": None, "error": None}
            for k, v in row.items():
                cols[k].append(v)
        return cols


def _item(value):
    """Ray may hand nested values back as numpy scalars/arrays; turn them into plain Python."""
    if isinstance(value, np.generic):
        return value.item()
    return value

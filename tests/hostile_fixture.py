"""Helpers of the hostile-input tests: raw tars of any member kind, resealed stats, a served folder, and
running a command line in-process with its output and exit code."""

from __future__ import annotations

import functools
import io
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image
from test_shards import reseal

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "datagen" / "tiny.yaml")


def image_bytes(fmt: str, w: int = 48, h: int = 40, mode: str = "RGB", seed: int = 0, **save) -> bytes:
    """A noise image of ``mode`` saved as ``fmt``."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    im = im.convert(mode) if mode != "RGB" else im
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> bytes:
    """A tar of members in the order given: ``(name, data)`` files, or TarInfo entries of any type."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    return info


def special(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


def members(tar: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]


def replace_json(tar: Path, key: str, change: Callable[[bytes], bytes], seal: bool = True) -> None:
    """Rewrite ``{key}.json`` in a shard's tar with ``change(old bytes)``; reseal its stats by default."""
    new = [(n, change(d) if n == f"{key}.json" else d) for n, d in members(tar)]
    tar.write_bytes(tar_bytes(new))
    if seal:
        reseal(tar)


def cli(main: Callable[[list[str]], int], argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a command line's ``main`` in-process: (exit code, stdout, stderr). An exception escaping it is
    the traceback a user would see, so it fails the test as it is."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one ``error:`` line a user mistake prints, asserting it is the only line."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


class QuietHandler(SimpleHTTPRequestHandler):
    """``python -m http.server``'s handler (no byte ranges), without a log line per request."""

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@contextmanager
def served(root: Path, handler: type[SimpleHTTPRequestHandler] = QuietHandler) -> Iterator[str]:
    """``root`` served by ``handler`` (the stock one) on 127.0.0.1; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

"""HTTP(S) inputs: a folder listing, img2dataset tars and a list of URLs served by a local ``http.server``
(HTTPS with a certificate of our own, trusted through ``SSL_CERT_FILE``).

The server runs in a thread on 127.0.0.1 for the module and serves a temporary folder. ``RangeHandler``
answers byte ranges as nginx, S3 or a CDN do (the decode stage reads a tar member by offset); the
stock handler does not, and a tar from such a server is read as one stream, its members in order.
"""

from __future__ import annotations

import ast
import functools
import io
import ipaddress
import json
import os
import re
import ssl
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from datagen.inputs import InputError, list_inputs
from datagen.stages.decode import DecodeConfig, DecodeStage
from datagen.synthetic import make_image_folder
from shards.paths import url_for

ROOT = Path(__file__).resolve().parents[1]


class QuietHandler(SimpleHTTPRequestHandler):
    """The stock static file handler (no byte ranges), without a log line per request."""

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


class RangeHandler(QuietHandler):
    """Static files with ``Range: bytes=a-b`` answered by 206 Partial Content, as real servers do."""

    def send_head(self):
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if m is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start, end = int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)
        if start >= size:
            self.send_error(416, "range not satisfiable")
            return None
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


def serve(root: Path, handler: type[SimpleHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``root`` on 127.0.0.1 and a free port from a daemon thread; returns the server and its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), value, np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder of images (with a sub-folder and a caption file), two img2dataset tars and a URL list."""
    root = tmp_path_factory.mktemp("www")
    make_image_folder(root / "imgs", 3, seed=1, min_size=64, max_size=96)
    make_image_folder(root / "imgs" / "sub", 2, seed=2, min_size=64, max_size=96)
    for p in root.rglob("captions.json"):
        p.unlink()
    (root / "imgs" / "img_0000.txt").write_text("a caption from a file\n")
    (root / "i2d").mkdir()
    for t in range(2):
        _tar(root / "i2d" / f"0000{t}.tar", [
            m for i in range(3) for m in ((f"{t}{i:08d}.jpg", _jpeg(40 * i + t)), (f"{t}{i:08d}.txt", f"alt {t}{i}".encode()),
                                          (f"{t}{i:08d}.json", json.dumps({"url": f"http://example.com/{t}{i}.jpg"}).encode()))])
    (root / "lists").mkdir()
    return root


@pytest.fixture(scope="module")
def http_site(site) -> Iterator[str]:
    """``site`` on a Range-capable server."""
    server, url = serve(site, RangeHandler)
    yield url
    server.shutdown()
    server.server_close()


def _decode(items) -> dict:
    columns = {k: [it.to_dict()[k] for it in items] for k in items[0].to_dict()}
    return DecodeStage(DecodeConfig(min_side=8))(columns)


def test_a_folder_listing_over_http_lists_and_decodes_like_the_local_folder(site, http_site):
    local = list_inputs(str(site / "imgs"))
    for url in (f"{http_site}/imgs/", f"{http_site}/imgs"):
        items = list_inputs(url)
        # Keys hash the path relative to the folder: the same images give the same keys wherever they are.
        assert [i.key for i in items] == [i.key for i in local]
        assert [i.caption for i in items] == [i.caption for i in local]
        assert items[0].caption == "a caption from a file"
        assert [i.uri for i in items] == [f"{http_site}/imgs/{p}" for p in
                                          ("img_0000.jpg", "img_0001.jpg", "img_0002.jpg", "sub/img_0000.jpg", "sub/img_0001.jpg")]
        out, ref = _decode(items), _decode(local)
        assert out["status"] == ["ok"] * 5 and out["source_jpeg"] == ref["source_jpeg"]


def test_img2dataset_tars_over_http_by_listing_and_by_brace_pattern(site, http_site):
    local = list_inputs(str(site / "i2d"))
    for url in (f"{http_site}/i2d/", f"{http_site}/i2d/{{00000..00001}}.tar"):
        items = list_inputs(url)
        assert [i.key for i in items] == [i.key for i in local] and len(items) == 6
        assert items[4].source == f"{http_site}/i2d/00001.tar#100000001.jpg" and items[4].caption == "alt 11"
        assert items[4].meta == {"url": "http://example.com/11.jpg"}
        out = _decode(items)
        assert out["status"] == ["ok"] * 6
        assert out["source_jpeg"] == [_jpeg(40 * i + t) for t in range(2) for i in range(3)]  # the members' bytes


def test_a_list_of_urls_served_over_http(site, http_site):
    urls = [f"{http_site}/imgs/img_0001.jpg", f"{http_site}/imgs/sub/img_0000.jpg", f"{http_site}/imgs/gone.jpg"]
    pd.DataFrame({"url": urls, "caption": ["one", "two", "three"]}).to_parquet(site / "lists" / "urls.parquet")
    (site / "lists" / "rel.csv").write_text("path,text\n../imgs/img_0002.jpg,relative\n")
    items = list_inputs([f"{http_site}/lists/urls.parquet", f"{http_site}/lists/rel.csv"])
    assert [i.uri for i in items] == [*urls, f"{http_site}/lists/../imgs/img_0002.jpg"]
    assert [i.caption for i in items] == ["one", "two", "three", "relative"]
    assert [i.meta for i in items[:3]] == [{"url": u} for u in urls]
    out = _decode(items)
    assert out["status"] == ["ok", "ok", "failed", "ok"] and out["error"][2] == "file not found"
    assert out["source_jpeg"][0] == (site / "imgs" / "img_0001.jpg").read_bytes()


def test_a_server_without_byte_ranges_serves_a_tar_as_one_stream(site):
    server, url = serve(site, QuietHandler)
    try:
        items = list_inputs(f"{url}/i2d/00000.tar")  # listing reads the tar from the start: fine
        assert len(items) == 3
        out = _decode(items)
        assert out["status"] == ["ok"] * 3  # one GET, the members in order: no byte ranges needed
        assert out["source_jpeg"] == [_jpeg(40 * i) for i in range(3)]
        assert _decode(list_inputs(f"{url}/imgs/"))["status"] == ["ok"] * 5  # whole files need no ranges
    finally:
        server.shutdown()
        server.server_close()


def test_a_missing_http_location_is_an_input_error_naming_it(http_site):
    with pytest.raises(InputError, match=re.escape(f"{http_site}/nowhere/: no such file or folder")):
        list_inputs(f"{http_site}/nowhere/")


def test_url_for_gives_each_filesystem_its_url_with_one_scheme():
    assert url_for(fsspec.filesystem("http"), "http://h:8000/a/b.jpg") == "http://h:8000/a/b.jpg"
    assert url_for(fsspec.filesystem("https"), "https://h/a/b.jpg") == "https://h/a/b.jpg"
    assert url_for(fsspec.filesystem("memory"), "/x/y.tar") == "memory:///x/y.tar"
    assert url_for(fsspec.filesystem("file"), "/x/y.tar") == "/x/y.tar"


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself, and its key (PEM files)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_inputs_with_a_private_certificate_authority(site, tmp_path):
    cert, key = _self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(site)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}"
    # A user trusts a private CA the standard way, SSL_CERT_FILE, read when the HTTP client starts:
    # hence a fresh process, as a datagen run is.
    script = ("import sys; from datagen.inputs import list_inputs; from datagen.stages.decode import DecodeConfig, DecodeStage\n"
              "items = list_inputs(sys.argv[1:])\n"
              "cols = {k: [it.to_dict()[k] for it in items] for k in items[0].to_dict()}\n"
              "print([i.uri for i in items]); print(DecodeStage(DecodeConfig(min_side=8))(cols)['status'])\n")
    inputs = [f"{url}/imgs/", f"{url}/i2d/00001.tar"]
    try:
        run = functools.partial(subprocess.run, [sys.executable, "-c", script, *inputs], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        trusted = run(env={**os.environ, "SSL_CERT_FILE": str(cert)})
        untrusted = run(env={k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"})
    finally:
        server.shutdown()
        server.server_close()
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    uris, statuses = trusted.stdout.splitlines()
    assert ast.literal_eval(uris)[:2] == [f"{url}/imgs/img_0000.jpg", f"{url}/imgs/img_0001.jpg"]
    assert statuses == str(["ok"] * 8)
    # Not "no such file or folder": the error names why the server could not be reached.
    assert untrusted.returncode == 1 and f"InputError: {url}/imgs/: ClientConnectorCertificateError: " in untrusted.stderr
    assert "certificate verify failed" in untrusted.stderr


def test_an_unreachable_server_is_named_as_such_not_as_a_missing_file(http_site):
    server, url = serve(Path("."), QuietHandler)
    server.shutdown()
    server.server_close()  # nothing listens on that port any more
    with pytest.raises(InputError, match=re.escape(f"{url}/x/: ClientConnectorError: Cannot connect to host")):
        list_inputs(f"{url}/x/")

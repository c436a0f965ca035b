"""img2dataset's output as datagen input, and transport errors named as they were.

Fast: a refused connection or a server error while decoding a URL list is recorded as such (not
"file not found"); img2dataset's "files" layout (folders + download logs) is listed like its tars.
Slow: img2dataset itself (``pip install img2dataset==1.47.0``, in .venv or any venv whose executable
``IMG2DATASET`` names) downloads from a local ``http.server`` twice, in different completion orders,
and ``python -m datagen run`` reads its output and resumes onto the second download.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from datagen.inputs import assign_shards, inputs_digest, list_inputs
from datagen.stages.decode import DecodeConfig, DecodeStage, read_failure
from shards import iter_samples

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "datagen" / "tiny.yaml")


class SlowHandler(SimpleHTTPRequestHandler):
    """Static files, quiet; ``/fail/...`` answers 500 and a path in ``delays`` waits that long first."""

    delays: dict[str, float] = {}

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def do_GET(self):
        if self.path.startswith("/fail/"):
            self.send_error(500, "broken on purpose")
            return
        time.sleep(self.delays.get(self.path, 0.0))
        super().do_GET()

    def do_HEAD(self):
        if self.path.startswith("/fail/"):
            self.send_error(500, "broken on purpose")
            return
        super().do_HEAD()


def serve(root: Path) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``root`` on 127.0.0.1 and a free port from a daemon thread; returns the server and its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SlowHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jpeg(w: int, h: int, value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _decode(items) -> dict:
    columns = {k: [it.to_dict()[k] for it in items] for k in items[0].to_dict()}
    return DecodeStage(DecodeConfig(min_side=8))(columns)


@pytest.fixture(scope="module")
def www(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """Six JPEGs of distinct sizes served on 127.0.0.1; yields the folder and its URL."""
    root = tmp_path_factory.mktemp("www")
    for i in range(6):
        (root / f"im{i}.jpg").write_bytes(_jpeg(90 + 7 * i, 70 + 5 * i, 30 * i))
    server, url = serve(root)
    yield root, url
    server.shutdown()
    server.server_close()


def test_a_refused_connection_is_recorded_as_the_transport_error_not_as_a_missing_file(www, tmp_path):
    root, url = www
    port = closed_port()
    urls = [f"{url}/im0.jpg", f"{url}/gone.jpg", f"http://127.0.0.1:{port}/im1.jpg", f"{url}/fail/im2.jpg"]
    pd.DataFrame({"url": urls}).to_parquet(tmp_path / "urls.parquet")
    (tmp_path / "urls.csv").write_text("url\n" + "\n".join(urls) + "\n")
    for listing in ("urls.parquet", "urls.csv"):
        out = _decode(list_inputs(str(tmp_path / listing)))
        assert out["status"] == ["ok", "failed", "failed", "failed"]
        assert out["source"] == urls
        assert out["error"][1] == "file not found"  # the server answered 404: the file is missing
        assert out["error"][2] == (f"read failed: ClientConnectorError: Cannot connect to host 127.0.0.1:{port} "
                                   f"ssl:default [Connect call failed ('127.0.0.1', {port})] (Connection refused)")
        assert out["error"][3] == "read failed: HTTP 500 broken on purpose"  # the status and the server's reason
        assert out["source_jpeg"][0] == (root / "im0.jpg").read_bytes()


def test_read_failure_names_local_errors_without_their_paths(tmp_path):
    assert read_failure(FileNotFoundError(2, "No such file or directory", str(tmp_path / "x.jpg"))) == "file not found"
    assert read_failure(PermissionError(13, "Permission denied", "/secret/x.jpg")) == "read failed: PermissionError: Permission denied"
    assert read_failure(ValueError("bad\nsecond line")) == "read failed: ValueError: bad"

    class ClientError(Exception):  # an object store's "no such key" behind its FileNotFoundError
        pass

    missing = FileNotFoundError("s3://b/k.jpg")
    missing.__cause__ = ClientError("NoSuchKey")
    assert read_failure(missing) == "file not found"
    refused = FileNotFoundError("http://h/x.jpg")
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert read_failure(refused) == "read failed: ConnectionRefusedError: Connection refused"


def test_img2dataset_files_output_is_listed_by_key_with_its_download_log(tmp_path):
    """The "files" layout: NNNNN/{key}.jpg/.txt/.json + NNNNN.parquet (download log) + NNNNN_stats.json."""
    out = tmp_path / "i2d"
    (out / "00000").mkdir(parents=True)
    rows = []
    for i in range(4):
        key, u = f"{i:09d}", f"http://example.com/{i}.jpg"
        if i == 2:
            rows.append({"key": key, "url": u, "caption": "c2", "status": "failed_to_download",
                         "error_message": "HTTP Error 404: Not Found", "original_width": None, "original_height": None})
            continue
        (out / "00000" / f"{key}.jpg").write_bytes(_jpeg(40, 30, 50 * i))
        (out / "00000" / f"{key}.txt").write_text(f"c{i}")
        (out / "00000" / f"{key}.json").write_text(json.dumps({"url": u, "original_width": 400 + i, "original_height": 300}))
        rows.append({"key": key, "url": u, "caption": f"c{i}", "status": "success", "error_message": None,
                     "original_width": 400 + i, "original_height": 300})
    pd.DataFrame(rows[::-1]).to_parquet(out / "00000.parquet")  # rows in completion order, not key order
    (out / "00000_stats.json").write_text("{}")
    items = list_inputs(str(out))
    assert [i.meta["url"] for i in items] == [f"http://example.com/{i}.jpg" for i in range(4)]
    assert [i.caption for i in items] == ["c0", "c1", "c2", "c3"]
    assert items[2].source == "http://example.com/2.jpg" and items[2].uri == ""
    decoded = _decode(items)
    assert decoded["status"] == ["ok", "ok", "failed", "ok"]
    assert decoded["error"][2] == "img2dataset failed_to_download: HTTP Error 404: Not Found"
    assert decoded["original_width"] == [400, 401, None, 403] and decoded["width"][0] == 40
    server, url = serve(tmp_path)  # the same over HTTP (a listing page per folder): the same inputs
    try:
        over_http = list_inputs(f"{url}/i2d/")
    finally:
        server.shutdown()
        server.server_close()
    assert [(i.key, i.failure, i.original_width) for i in over_http] == [(i.key, i.failure, i.original_width) for i in items]
    assert over_http[0].uri == f"{url}/i2d/00000/000000000.jpg"
    # The log's parquet wins over the sidecar; without the log the folder is a plain image folder.
    (out / "00000.parquet").unlink()
    assert len(list_inputs(str(out))) == 4  # 3 images + the stats file, a failed "not an image" row


# ----------------------------------------------------------------------------------------------------
# img2dataset itself (slow)


def _img2dataset() -> list[str] | None:
    """The img2dataset command: $IMG2DATASET, or the one installed beside this Python."""
    if os.environ.get("IMG2DATASET"):
        return [os.environ["IMG2DATASET"]]
    if importlib.util.find_spec("img2dataset") is not None:
        exe = shutil.which("img2dataset", path=str(Path(sys.executable).parent))
        return [exe] if exe else None
    return None


def _download(cmd: list[str], url_list: Path, fmt: str, out: Path) -> None:
    proc = subprocess.run(
        [*cmd, "--url_list", str(url_list), "--input_format", "csv", "--url_col", "url", "--caption_col", "caption",
         "--output_format", fmt, "--output_folder", str(out), "--processes_count", "1", "--thread_count", "16",
         "--image_size", "64", "--resize_mode", "keep_ratio", "--retries", "0", "--timeout", "20",
         "--enable_wandb", "False", "--distributor", "multiprocessing"],
        cwd=url_list.parent, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def _datagen(inputs: Path, output: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONHASHSEED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "datagen", "run", "--config", TINY, "--input", str(inputs), "--output", str(output),
         "--no-progress", "--set", "inputs.samples_per_shard=4", "--set", "execution.num_cpus=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _log(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))], ignore_index=True).set_index("url")


@pytest.mark.slow
def test_img2dataset_downloads_become_a_dataset_and_a_second_download_resumes_it(www, tmp_path):
    cmd = _img2dataset()
    if cmd is None:
        pytest.skip("img2dataset is not installed: pip install img2dataset==1.47.0 (here or in another venv "
                    "whose executable IMG2DATASET names)")
    root, url = www
    port = closed_port()
    urls = [f"{url}/im{i}.jpg" for i in range(3)] + [f"{url}/missing.jpg", f"http://127.0.0.1:{port}/im9.jpg"] + \
        [f"{url}/im{i}.jpg" for i in range(3, 6)]
    pd.DataFrame({"url": urls, "caption": [f"alt {i}" for i in range(len(urls))]}).to_csv(tmp_path / "urls.csv", index=False)
    sizes = {f"{url}/im{i}.jpg": (90 + 7 * i, 70 + 5 * i) for i in range(6)}

    # Two downloads of the same list, each image delayed so that they complete in opposite orders.
    members = {}
    for name, order in (("a", range(6)), ("b", range(5, -1, -1))):
        SlowHandler.delays = {f"/im{i}.jpg": 0.25 * rank for rank, i in enumerate(order)}
        _download(cmd, tmp_path / "urls.csv", "webdataset", tmp_path / name)
        with tarfile.open(tmp_path / name / "00000.tar") as tar:
            members[name] = [m.name for m in tar.getmembers() if m.name.endswith(".jpg")]
    SlowHandler.delays = {}
    assert members["a"] != members["b"] and sorted(members["a"]) == sorted(members["b"])  # another completion order
    a, b = list_inputs(str(tmp_path / "a")), list_inputs(str(tmp_path / "b"))
    assert [i.key for i in a] == [i.key for i in b] and inputs_digest(a) == inputs_digest(b)
    assert len(a) == len(urls) and assign_shards(len(a), 4) == [(0, 0, 4), (1, 4, 8)]

    log = _log(tmp_path / "a")
    proc = _datagen(tmp_path / "a", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-4000:]
    df = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "out").glob("0*.parquet"))], ignore_index=True)
    assert len(df) == len(urls) and sorted(df.key) == sorted(i.key for i in a)  # one row per URL
    failed = df[df.status == "failed"].set_index("source")
    assert sorted(failed.index) == sorted([urls[3], urls[4]])  # the row names the URL
    for u in (urls[3], urls[4]):
        assert failed.loc[u, "error_stage"] == "decode"
        assert failed.loc[u, "error"] == f"img2dataset {log.loc[u, 'status']}: {log.loc[u, 'error_message']}"
    assert "404" in failed.loc[urls[3], "error"] and "Connection refused" in failed.loc[urls[4], "error"]
    url_of = {i.key: i.meta["url"] for i in a}
    done = df[df.status != "failed"]  # ok, or filtered (random tiny weights): both decoded the image
    assert sorted(url_of[k] for k in done.key) == sorted(sizes)
    for key, w, h in zip(done.key, done.original_width, done.original_height, strict=True):
        # img2dataset stored 64 px on the short side; the original size is its columns' (the served size).
        assert (w, h) == sizes[url_of[key]] == tuple(log.loc[url_of[key], ["original_width", "original_height"]])
    samples = list(iter_samples(str(tmp_path / "out")))
    assert samples and all(s.record.meta["url"] == url_of[s.record.key] for s in samples)
    assert all((s.record.original_width, s.record.original_height) == sizes[url_of[s.record.key]] for s in samples)
    assert all(min(s.record.width, s.record.height) == 64 for s in samples)

    # The second download is the same input: the run resumes (nothing to write), it is not refused.
    again = _datagen(tmp_path / "b", tmp_path / "out")
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"{len(urls)} inputs in 2 shards: 2 complete, 0 to write" in again.stderr + again.stdout

    # The parquet and files output formats list the same inputs with the same failures and sizes.
    for fmt in ("parquet", "files"):
        _download(cmd, tmp_path / "urls.csv", fmt, tmp_path / fmt)
        items = list_inputs(str(tmp_path / fmt))
        out = _decode(items)
        by_url = dict(zip([i.meta["url"] for i in items], range(len(items)), strict=True))
        assert sorted(by_url) == sorted(urls)
        assert [out["source"][by_url[u]] for u in (urls[3], urls[4])] == [urls[3], urls[4]]
        assert [out["error"][by_url[u]] for u in (urls[3], urls[4])] == [failed.loc[u, "error"] for u in (urls[3], urls[4])]
        assert {u: (out["original_width"][by_url[u]], out["original_height"][by_url[u]]) for u in sizes} == sizes

"""A real S3 endpoint for the tests: moto's server on 127.0.0.1, configured the way users configure S3.

``s3_server`` starts moto's threaded server on a free port and sets ``AWS_ENDPOINT_URL`` (botocore and
therefore s3fs read it), dummy credentials and a region in ``os.environ``: a subprocess the test starts
(``python -m datagen run``) and the local Ray it starts inherit them. ``s3_bucket`` gives each test an
empty bucket of its own. Nothing outside 127.0.0.1 is contacted (conftest.py blocks it anyway).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clear_s3fs_cache() -> None:
    """Forget cached s3fs instances and their listings: another process may have written since."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server on 127.0.0.1, with the S3 variables set in os.environ."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one log line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    clear_s3fs_cache()
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        clear_s3fs_cache()


@pytest.fixture
def s3_bucket(s3_server) -> Iterator[str]:
    """``s3://<fresh bucket>``, empty, on the moto server."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    clear_s3fs_cache()
    yield f"s3://{name}"
    clear_s3fs_cache()


def upload(local: Path, url: str) -> None:
    """Copy a local file or folder (recursively) to ``url``."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if local.is_dir():
        for p in sorted(local.rglob("*")):
            if p.is_file():
                fs.put_file(str(p), f"{path}/{p.relative_to(local).as_posix()}")
    else:
        fs.put_file(str(local), path)
    fs.invalidate_cache()

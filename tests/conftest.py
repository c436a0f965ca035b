"""Test-wide settings: offline hub, quiet Ray, deterministic hashing."""

import os

# Before anything imports huggingface_hub: a missing model must fail at once, never download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# Under pytest-xdist (make test runs two workers on two cores) each worker and the processes it starts
# compute on one thread: two workers with a thread per core each would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import ipaddress  # noqa: E402
import socket  # noqa: E402

import psutil  # noqa: E402  (a Ray dependency)
import pytest  # noqa: E402

# Tests never reach the network: a connection to anything but this machine fails at once with a
# clear message instead of hanging on a time-out.
_LOCAL = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _check(address) -> None:
    if isinstance(address, tuple) and address:
        host = address[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if host not in ("localhost", "") and not (ip and ip.is_loopback) and host not in _LOCAL:
            raise ConnectionRefusedError(f"tests run offline: connection to {address!r} blocked")


def _guarded_connect(self, address):
    _check(address)
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    _check(address)
    return _connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex


# ---------------------------------------------------------------------------------------------------
# pytest-xdist: ``make test`` runs ``-n 2 --dist loadgroup --no-loadscope-reorder``.

# The files that take longest (CPU seconds, most of it in module fixtures): they start first, so that the
# two workers do not end on one long file each other has to wait for.
HEAVY_FIRST = (
    "test_train_fsdp.py",
    "test_train_ddp.py",
    "test_train.py",
    "test_datagen_pipeline.py",
    "test_train_options.py",
    "test_sd15.py",
    "test_docs_commands.py",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under xdist, one work unit per test file (its module fixtures are built once, on one worker) unless
    a test names its own ``xdist_group``; the heavy files first. Before xdist's hook, which reads the marks."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise

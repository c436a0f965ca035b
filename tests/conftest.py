"""Test-wide settings: offline hub, quiet Ray, deterministic hashing."""

import os

# Before anything imports huggingface_hub: a missing model must fail at once, never download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# One compute thread per test process and per process it starts (torch's OpenMP, numpy's BLAS): the tensors
# are tiny, and make test runs two pytest-xdist workers on two cores. With a thread per core in each, an op's
# threads can spin waiting for a peer the other worker holds off its core (measured on a loaded 2-core
# machine: most often no difference, once 2.7x the CPU time of two of test_train.py's training tests).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import ipaddress  # noqa: E402
import socket  # noqa: E402

import psutil  # noqa: E402  (a Ray dependency)

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
# pytest-xdist: ``make test`` runs ``-n 2 --dist loadfile --no-loadscope-reorder``: one test file is one work
# unit, on one worker, so its module fixtures are built once. (``--dist loadgroup`` would let tests name
# their unit, but pytest-xdist 3.8 marks a group by rewriting ``item._nodeid``, which pytest 9 ignores.)

# The files that take longest (most of it in module fixtures that start two processes): they start first,
# so that the two workers do not end on one long file the other has to wait for.
HEAVY_FIRST = (
    "test_train_fsdp.py",
    "test_train_ddp.py",
    "test_datagen_pipeline.py",
    "test_engines_detect.py",
    "test_mmdit_fsdp.py",
    "test_docs_commands.py",
    "test_datagen_resources.py",
)


def pytest_collection_modifyitems(config, items):
    """Under xdist, the heavy files first (every worker collects the same order; the files keep theirs)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable

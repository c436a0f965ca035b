"""Test-wide settings: offline hub, quiet Ray, deterministic hashing."""

import os

# Before anything imports huggingface_hub: a missing model must fail at once, never download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

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

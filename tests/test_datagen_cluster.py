"""A real two-node Ray cluster on this machine runs the datagen pipeline through ``RAY_ADDRESS``.

Both nodes are ``ray start --block`` processes in their own process groups, with their own ports,
so teardown stops exactly this cluster: ``ray stop`` would stop every Ray process on the machine,
including other runs' local clusters.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from datagen_fixture import make_inputs

from datagen.inputs import list_inputs
from shards import validate_dataset

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_args(ports: list[int], worker_ports: tuple[int, int]) -> list[str]:
    """Every port a node opens, chosen here, so two nodes on one machine never collide."""
    names = ("node-manager-port", "object-manager-port", "runtime-env-agent-port", "dashboard-agent-grpc-port",
             "dashboard-agent-listen-port", "metrics-export-port")
    return [f"--{n}={p}" for n, p in zip(names, ports, strict=True)] + [
        f"--min-worker-port={worker_ports[0]}", f"--max-worker-port={worker_ports[1]}",
        "--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block"]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _active_nodes(address: str, env: dict) -> int:
    out = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True,
                         timeout=60).stdout
    active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
    return sum(1 for line in active.splitlines() if "node_" in line)


@pytest.mark.slow
def test_two_node_cluster_runs_the_pipeline(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    ports = _free_ports(14)
    gcs, client = ports[0], ports[1]
    address = f"127.0.0.1:{gcs}"
    # Ray's Unix sockets live under the temp dir and must stay under ~107 characters: pytest's
    # tmp_path is too deep, so the cluster gets a short one of its own.
    temp_dir = tempfile.mkdtemp(prefix="rl-ray-", dir="/tmp")
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("head", "worker")}  # noqa: SIM115
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}", "--include-dashboard=false",
         f"--temp-dir={temp_dir}", *_node_args(ports[2:8], (20000 + gcs % 5000, 20099 + gcs % 5000))],
        env=env, start_new_session=True, stdout=logs["head"], stderr=subprocess.STDOUT)
    worker = None
    try:
        worker = subprocess.Popen(
            [RAY, "start", f"--address={address}", *_node_args(ports[8:14], (30000 + gcs % 5000, 30099 + gcs % 5000))],
            env=env, start_new_session=True, stdout=logs["worker"], stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while _active_nodes(address, env) < 2:
            if head.poll() is not None or worker.poll() is not None:
                tails = {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in logs}
                pytest.fail(f"a Ray node exited during start-up: {tails}")
            assert time.monotonic() < deadline, "the two-node cluster did not come up"
            time.sleep(2)

        make_inputs(tmp_path / "in", n_good=12)
        out = tmp_path / "out"
        proc = subprocess.run(
            [sys.executable, "-m", "datagen", "run", "--config", str(ROOT / "configs" / "datagen" / "tiny.yaml"),
             "--input", str(tmp_path / "in"), "--output", str(out), "--no-progress",
             # Two actors cannot share a 1-CPU node; small chunks give both nodes work.
             "--set", "pools.models.num_cpus=0.75", "--set", "execution.chunk_size=4"],
            cwd=ROOT, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert f"connecting to the Ray cluster at {address}" in proc.stderr
        assert "Ray cluster: 2 node(s)" in proc.stderr
        assert "on 2 Ray node(s)" in proc.stdout, proc.stdout  # both nodes did work
        df = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))])
        assert sorted(df.key) == sorted(i.key for i in list_inputs(str(tmp_path / "in")))
        assert validate_dataset(str(out)) == []
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
        for f in logs.values():
            f.close()
        shutil.rmtree(temp_dir, ignore_errors=True)

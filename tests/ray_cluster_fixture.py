"""Real multi-node Ray clusters on 127.0.0.1 for the slow cluster tests (``ray start``, one process group a node).

Every node is a ``ray start --block`` process in its own process group with its own ports, chosen
here, so two nodes on one machine never collide and teardown stops exactly this cluster's processes:
``ray stop`` would stop every Ray process on the machine, including other runs' local clusters.
``kill_node`` SIGKILLs one node as a machine loss would, by the PIDs of that node's process tree.
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

import psutil
import pytest

RAY = str(Path(sys.executable).with_name("ray"))
_NODE_PORTS = ("node-manager-port", "object-manager-port", "runtime-env-agent-port", "dashboard-agent-grpc-port",
               "dashboard-agent-listen-port", "metrics-export-port")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cluster_env(**extra: str) -> dict:
    """The environment of the nodes and of the commands run against them: no token auth, no usage
    stats, offline hub, no inherited RAY_ADDRESS; the venv's bin first on PATH, as in an activated
    environment (a job's entrypoint ``python`` is found on the head's PATH)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class LocalCluster:
    """A head and further nodes on 127.0.0.1; ``stop()`` ends each node's process group."""

    def __init__(self, logs: Path, env: dict):
        self.logs, self.env = logs, env
        # Ray's Unix sockets live under the temp dir and must stay under ~107 characters: pytest's
        # tmp_path is too deep, so the cluster gets a short one of its own.
        self.temp_dir = tempfile.mkdtemp(prefix="rl-ray-", dir="/tmp")
        self.nodes: list[subprocess.Popen] = []
        self.address = self.dashboard = ""
        self._seed = free_ports(1)[0]

    def _start(self, name: str, args: list[str], num_cpus: int, resources: str | None) -> subprocess.Popen:
        ports = free_ports(len(_NODE_PORTS))
        # Each node's workers get a port range of their own, below the ephemeral ports free_ports hands out.
        low = 20000 + (self._seed % 30) * 400 + len(self.nodes) * 100
        cmd = [RAY, "start", *args, *[f"--{n}={p}" for n, p in zip(_NODE_PORTS, ports, strict=True)],
               f"--min-worker-port={low}", f"--max-worker-port={low + 99}", f"--num-cpus={num_cpus}",
               "--num-gpus=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block"]
        if resources:
            cmd.append(f"--resources={resources}")
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - the node's lifetime
        proc = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child holds its own descriptor
        self.nodes.append(proc)
        return proc

    def start_head(self, num_cpus: int = 1, dashboard: bool = False) -> None:
        gcs, client, dash = free_ports(3)
        self.address = f"127.0.0.1:{gcs}"
        args = ["--head", f"--port={gcs}", f"--ray-client-server-port={client}", f"--temp-dir={self.temp_dir}"]
        if dashboard:
            self.dashboard = f"http://127.0.0.1:{dash}"
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
        else:
            args.append("--include-dashboard=false")
        self._start("head", args, num_cpus, None)

    def add_node(self, num_cpus: int = 1, resources: str | None = None) -> subprocess.Popen:
        return self._start(f"node{len(self.nodes)}", [f"--address={self.address}"], num_cpus, resources)

    def active_nodes(self) -> int:
        out = subprocess.run([RAY, "status", f"--address={self.address}"], env=self.env, capture_output=True,
                             text=True, timeout=60).stdout
        active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
        return sum(1 for line in active.splitlines() if "node_" in line)

    def wait_for_nodes(self, n: int, timeout: float = 240) -> float:
        """Wait until ``n`` nodes are active; returns the seconds it took."""
        t0 = time.monotonic()
        while self.active_nodes() < n:
            if any(p.poll() is not None for p in self.nodes):
                tails = {p.name: p.read_text()[-2000:] for p in sorted(self.logs.glob("*.log"))}
                pytest.fail(f"a Ray node exited during start-up: {tails}")
            assert time.monotonic() - t0 < timeout, f"the {n}-node cluster did not come up"
            time.sleep(2)
        return time.monotonic() - t0

    def kill_node(self, proc: subprocess.Popen) -> list[int]:
        """SIGKILL a node (its ``ray start`` process and every process under it: raylet, agents, workers),
        as a machine loss would; returns the PIDs killed."""
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)
        return [p.pid for p in procs]

    def stop(self) -> None:
        """End every node this cluster started that still runs (its process group), head last; remove its temp dir."""
        for proc in reversed(self.nodes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

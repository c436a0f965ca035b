"""A real two-node Ray cluster on this machine runs the datagen pipeline through ``RAY_ADDRESS``.

The cluster is ``ray_cluster_fixture.LocalCluster``: each node a ``ray start --block`` process group
with its own ports, so teardown stops exactly this cluster.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from datagen_fixture import make_inputs
from ray_cluster_fixture import LocalCluster, cluster_env

from datagen.inputs import list_inputs
from shards import validate_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_node_cluster_runs_the_pipeline(tmp_path):
    env = cluster_env()
    cluster = LocalCluster(tmp_path, env)
    try:
        cluster.start_head()
        cluster.add_node()
        cluster.wait_for_nodes(2)

        make_inputs(tmp_path / "in", n_good=12)
        out = tmp_path / "out"
        proc = subprocess.run(
            [sys.executable, "-m", "datagen", "run", "--config", str(ROOT / "configs" / "datagen" / "tiny.yaml"),
             "--input", str(tmp_path / "in"), "--output", str(out), "--no-progress",
             # Two actors cannot share a 1-CPU node; small chunks give both nodes work.
             "--set", "pools.models.num_cpus=0.75", "--set", "execution.chunk_size=4"],
            cwd=ROOT, env={**env, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert f"connecting to the Ray cluster at {cluster.address}" in proc.stderr
        assert "Ray cluster: 2 node(s)" in proc.stderr
        assert "on 2 Ray node(s)" in proc.stdout, proc.stdout  # both nodes did work
        df = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))])
        assert sorted(df.key) == sorted(i.key for i in list_inputs(str(tmp_path / "in")))
        assert validate_dataset(str(out)) == []
    finally:
        cluster.stop()

"""``ray job submit`` of a datagen run to a two-node Ray cluster on 127.0.0.1, writing to S3, with a node
lost mid-run: the job still finishes, and its shards are byte-identical to an undisturbed run's.

The cluster (``ray_cluster_fixture.LocalCluster``) is a head with its dashboard (the job server) and a
second node, each a ``ray start`` process group of this test's own, started from this environment as
a user starts them (the venv's ``bin`` first on PATH). The S3 endpoint is moto's server on 127.0.0.1
(``s3_fixture``); every node gets the endpoint and credentials in its environment, as a node gets its
instance role. Jobs are submitted with the command datagen/CLUSTER.md gives, from the repository root.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

import fsspec
import pytest
from ray_cluster_fixture import RAY, LocalCluster, cluster_env
from s3_fixture import s3_server, upload  # noqa: F401  (fixture)

from datagen.synthetic import make_image_folder
from shards import list_shards, validate_dataset

ROOT = Path(__file__).resolve().parents[1]
IMAGES, PER_SHARD = 40, 8
SHARDS = IMAGES // PER_SHARD
# Chunks of 4: ten chunks, so both nodes' actors get several and a chunk is short.
SETTINGS = ["--set", f"inputs.samples_per_shard={PER_SHARD}", "--set", "execution.chunk_size=4"]


def _listing(url: str) -> list[str]:
    """The files under ``url``, listed by a fresh client (no cached listing)."""
    return fsspec.filesystem("s3", skip_instance_cache=True).find(url[len("s3://"):])


def _read_all(url: str) -> dict[str, bytes]:
    """Every file under ``url`` by its relative path."""
    fs, root = fsspec.filesystem("s3", skip_instance_cache=True), url[len("s3://"):]
    return {p[len(root) + 1:]: fs.cat_file(p) for p in sorted(fs.find(root))}


def _submit(cluster: LocalCluster, bucket: str, output: str, wait: bool) -> subprocess.CompletedProcess:
    """The documented command: ``ray job submit --working-dir . -- python -m datagen run ...`` from the repo root."""
    cmd = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", *([] if wait else ["--no-wait"]),
           "--", "python", "-m", "datagen", "run", "--config", "configs/datagen/tiny.yaml", "--input", f"{bucket}/in",
           "--output", output, "--no-progress", *SETTINGS]
    return subprocess.run(cmd, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=900)


def _job_id(submit_output: str) -> str:
    return next(w.strip("'") for line in submit_output.splitlines() if "submitted successfully" in line
                for w in line.split() if w.startswith("'raysubmit_"))


def _node_two_runs_a_pool_actor(dashboard: str) -> bool:
    """Whether an actor of the datagen pool is alive (constructed: its models loaded) on the non-head node."""
    from ray.util.state import list_actors, list_nodes

    others = {n.node_id for n in list_nodes(address=dashboard) if not n.is_head_node and n.state == "ALIVE"}
    # Ray Data's pool actors show as "MapWorker(MapBatches(PoolWorker))"; ALIVE means constructed.
    return any(a.node_id in others and "PoolWorker" in (a.class_name or "")
               for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")]))


def _dataset_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """What must be identical between two runs of one config: every shard file and the index. The run
    records (``runs/*.json``: timings, nodes) and run.json's creation time describe the run, not the data."""
    return {k: v for k, v in files.items() if not k.startswith("runs/") and k != "run.json"}


def _difference(name: str, a: bytes, b: bytes) -> str:
    """What differs between two versions of a file, for the failure message."""
    if not name.endswith(".parquet"):
        return f"{name}: {len(a)} vs {len(b)} bytes"
    import pyarrow.parquet as pq

    ta, tb = (pq.read_table(io.BytesIO(x)) for x in (a, b))
    if ta.schema.metadata != tb.schema.metadata:
        return f"{name}: schema metadata {ta.schema.metadata} vs {tb.schema.metadata}"
    cells = [(c, i, x, y) for c in ta.column_names
             for i, (x, y) in enumerate(zip(ta[c].to_pylist(), tb[c].to_pylist(), strict=True)) if x != y]
    return f"{name}: cells (column, row, undisturbed, killed) {cells[:10]}"


def _run_json(files: dict[str, bytes]) -> dict:
    return {k: v for k, v in json.loads(files["run.json"]).items() if k != "created"}


@pytest.mark.slow
def test_a_submitted_job_survives_losing_a_node_with_byte_identical_shards(tmp_path, s3_server):  # noqa: F811
    import boto3
    from ray.job_submission import JobStatus, JobSubmissionClient

    bucket = "s3://ray-job"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket[len("s3://"):])
    make_image_folder(tmp_path / "in", IMAGES, seed=11, min_size=64, max_size=160)
    upload(tmp_path / "in", f"{bucket}/in")
    timings = {}
    # The S3 endpoint and credentials are in os.environ (s3_server): every node starts with them. Ray Data
    # starts a pool's work once its actors are all up (both nodes hold one), instead of as soon as one
    # is: on a busy 2-core machine node 2's actor came up after the last chunk was done.
    cluster = LocalCluster(tmp_path, cluster_env(RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="600"))
    t0 = time.monotonic()
    try:
        # The head can hold the whole run alone (two 0.5-CPU actors, decode and pack tasks) once node 2
        # is gone; Ray Data spreads actors and tasks over both nodes while both live.
        cluster.start_head(num_cpus=2, dashboard=True)
        node2 = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(2)
        timings["cluster_start_s"] = time.monotonic() - t0

        t = time.monotonic()
        undisturbed = _submit(cluster, bucket, f"{bucket}/undisturbed", wait=True)
        timings["undisturbed_job_s"] = time.monotonic() - t
        assert undisturbed.returncode == 0, (undisturbed.stdout[-4000:], undisturbed.stderr[-2000:])
        assert "succeeded" in undisturbed.stdout and "on 2 Ray node(s)" in undisturbed.stdout, undisturbed.stdout[-3000:]

        t = time.monotonic()
        submitted = _submit(cluster, bucket, f"{bucket}/killed", wait=False)
        assert submitted.returncode == 0, submitted.stderr[-2000:]
        job = _job_id(submitted.stdout + submitted.stderr)
        client = JobSubmissionClient(cluster.dashboard)
        # Kill node 2 once it holds a constructed pool actor of this job and the run has stored work,
        # but before every shard is complete.
        deadline = time.monotonic() + 600
        while not (_node_two_runs_a_pool_actor(cluster.dashboard) and _listing(f"{bucket}/killed/_parts")):
            status = client.get_job_status(job)
            assert status == JobStatus.RUNNING or status == JobStatus.PENDING, client.get_job_logs(job)[-3000:]
            assert time.monotonic() < deadline, "node 2 never held a pool actor while the run stored parts"
            time.sleep(0.5)
        killed = cluster.kill_node(node2)
        timings["killed_after_s"] = time.monotonic() - t
        complete = sum(s.complete for s in list_shards(f"{bucket}/killed"))
        timings["shards_complete_at_kill"] = complete
        assert complete < SHARDS and len(killed) > 2, (complete, killed)  # mid-run: raylet, agents, workers

        while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.monotonic() < deadline, "the job did not finish after node 2 was lost"
            time.sleep(1)
        timings["killed_job_s"] = time.monotonic() - t
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        assert f"shards {SHARDS} (0 already complete, {SHARDS} written now)" in logs, logs[-3000:]
    finally:
        cluster.stop()
    timings["total_s"] = time.monotonic() - t0

    reference, result = _read_all(f"{bucket}/undisturbed"), _read_all(f"{bucket}/killed")
    assert sorted(_dataset_files(result)) == sorted(_dataset_files(reference))
    differ = [k for k in sorted(_dataset_files(result)) if result[k] != reference[k]]
    assert differ == [], [_difference(k, reference[k], result[k]) for k in differ]  # byte for byte
    assert len([k for k in result if k.endswith(".tar")]) == SHARDS
    assert _run_json(result) == _run_json(reference)  # same config, inputs and fingerprint
    assert validate_dataset(f"{bucket}/killed") == []
    print("ray job test timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))

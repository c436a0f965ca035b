"""Resources checked before work: a stage no node can hold is one error line and exit 2, in seconds.

Before the check, a GPU preset on a CPU-only Ray waited forever ("No available node types can fulfill
resource request"). The comparison itself is tested with exact inputs; the CLI against a real
CPU-only local Ray.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datagen.cli import main
from datagen.config import load_config
from datagen.resources import GIB, Request, check_resources, message, requests, unmet
from datagen.stages import vlm_vllm
from datagen.synthetic import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "datagen"
# Every CPU/GPU amount of the local Ray fixed, so the messages are the same on any machine.
LOCAL_RAY = ["--set", "execution.num_cpus=2", "--set", "execution.num_gpus=0"]


def test_requests_of_the_real_preset():
    reqs = requests(load_config(CONFIGS / "real.yaml"))
    assert [(r.stage, r.unit, dict(r.bundle), r.bundles) for r in reqs] == [
        ("decode", "task", {"CPU": 1.0}, 1),
        ("pool 'vlm' (stages tag, caption)", "actor", {"CPU": 4.0, "GPU": 1.0}, 1),
        ("pool 'detect' (stages ground, segment)", "actor", {"CPU": 4.0, "GPU": 0.5}, 1),
        ("pool 'describe' (stages describe)", "actor", {"CPU": 4.0, "GPU": 1.0}, 1),
        ("pool 'score' (stages score, filter)", "actor", {"CPU": 2.0, "GPU": 0.25}, 1),
        ("pack", "task", {"CPU": 1.0}, 1),
        ("write", "task", {}, 1),  # write_cpus 0: fits anywhere
    ]


def test_memory_and_vllm_replicas_are_requested_as_ray_places_them(monkeypatch):
    cfg = load_config(CONFIGS / "tiny.yaml", ["pools.models.memory_gb=1.5"])
    assert dict(requests(cfg)[1].bundle) == {"CPU": 0.5, "memory": 1.5 * GIB}
    monkeypatch.setattr(vlm_vllm, "vllm_available", lambda: True)
    cfg = load_config(CONFIGS / "real_vllm.yaml", ["vlm.vllm.tensor_parallel_size=2", "vlm.vllm.accelerator_type=H100",
                                                  "pools.vlm.num_gpus=2", "pools.describe.num_gpus=2"])
    vlm = [r for r in requests(cfg) if r.stage.startswith("pool 'vlm'")]
    assert [(r.unit, dict(r.bundle), r.bundles) for r in vlm] == [
        ("engine replica", {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001}, 2),  # ray.data.llm's bundles
        ("task", {"CPU": 1.0}, 1),  # vlm.vllm.cpu_stage_cpus
    ]


def test_unmet_compares_each_request_with_each_node():
    gpu = Request("pool 'vlm'", "actor", {"CPU": 4.0, "GPU": 1.0})
    half = Request("pool 'detect'", "actor", {"CPU": 4.0, "GPU": 0.5})
    cpu = Request("decode", "task", {"CPU": 1.0})
    mem = Request("pool 'm'", "actor", {"CPU": 1.0, "memory": 20 * GIB})
    nothing = Request("write", "task", {})
    cpu_node = {"CPU": 8.0, "memory": 16 * GIB, "object_store_memory": 4 * GIB}
    small_gpu_node = {"CPU": 2.0, "GPU": 1.0, "memory": 64 * GIB}
    assert unmet([gpu, half, cpu, mem, nothing], [cpu_node]) == [gpu, half, mem]
    # CPUs on one node and the GPU on another do not make one actor: each must fit on a single node
    assert unmet([gpu, half, cpu, mem, nothing], [cpu_node, small_gpu_node]) == [gpu, half]
    assert unmet([gpu, half, cpu, mem], [cpu_node, {"CPU": 4.0, "GPU": 0.5, "memory": 20 * GIB}]) == [gpu]
    assert unmet([gpu, cpu], []) == [gpu, cpu]  # no alive node
    assert unmet([nothing], []) == [nothing]  # a task that asks for nothing still runs on some node
    # fractions that add up to the node's amount fit (Ray counts in 1e-4 units; floats may miss by rounding)
    assert unmet([Request("p", "actor", {"CPU": 0.1 + 0.2})], [{"CPU": 0.3}]) == []


def test_a_multi_gpu_replica_may_span_nodes_but_each_bundle_needs_its_accelerator():
    bundle = {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001}
    replica = Request("pool 'vlm'", "engine replica", bundle, bundles=4)
    h100 = {"CPU": 8.0, "GPU": 2.0, "accelerator_type:H100": 1.0}
    assert unmet([replica], [h100, h100]) == []  # PACK spreads the 4 bundles over two 2-GPU nodes
    assert unmet([replica], [h100]) == [replica]
    assert unmet([replica], [h100, {"CPU": 8.0, "GPU": 8.0, "accelerator_type:A100": 1.0}]) == [replica]
    assert unmet([replica], [{**h100, "CPU": 1.0}, h100, h100]) == []  # 1 + 2 + 2 bundles
    assert unmet([replica], [{**h100, "CPU": 1.0}, h100]) == [replica]  # the CPU of each bundle counts too


def test_the_message_names_each_stage_its_request_and_the_largest_nodes():
    missing = [Request("pool 'vlm' (stages tag, caption)", "actor", {"CPU": 4.0, "GPU": 1.0}),
               Request("pool 'm' (stages tag)", "actor", {"CPU": 1.0, "memory": 20 * GIB}),
               Request("pool 'x' (stages caption)", "engine replica", {"GPU": 1.0, "accelerator_type:H100": 0.001},
                       bundles=2)]
    nodes = [{"CPU": 2.0, "memory": 8 * GIB}, {"CPU": 16.0, "memory": 3 * GIB}]
    assert message(missing, nodes) == (
        "the Ray cluster cannot hold what this run asks for: pool 'vlm' (stages tag, caption) asks for 4 CPU, 1 GPU "
        "per actor; pool 'm' (stages tag) asks for 1 CPU, 20 GiB memory per actor; pool 'x' (stages caption) asks "
        "for 1 GPU, a H100 GPU in each of the 2 GPU bundles of an engine replica; but its 2 node(s) have at most "
        "16 CPU, 0 GPU, 8 GiB memory, no H100 GPU. Run on a cluster with such nodes, change the pools' num_gpus / "
        "num_cpus / memory_gb or the execution's *_cpus (python -m datagen plan prints them), or pass "
        "--wait-for-resources if an autoscaler adds such nodes")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("res") / "in"
    make_image_folder(folder, 3, seed=3, min_size=32, max_size=48)
    return folder


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_gpu_preset_on_a_cpu_only_ray_stops_at_once(images, tmp_path):
    """The user's command, in a process of its own: one error line, exit 2, no endless wait."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "datagen", "run", "--config", str(CONFIGS / "real.yaml"), "--input", str(images),
         "--output", str(tmp_path / "out"), "--no-progress", *LOCAL_RAY],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "No available node types" not in proc.stderr
    [line] = _error_lines(proc.stderr)
    assert line.startswith("error: the Ray cluster cannot hold what this run asks for: "
                           "pool 'vlm' (stages tag, caption) asks for 4 CPU, 1 GPU per actor; "
                           "pool 'detect' (stages ground, segment) asks for 4 CPU, 0.5 GPU per actor; "
                           "pool 'describe' (stages describe) asks for 4 CPU, 1 GPU per actor; "
                           "pool 'score' (stages score, filter) asks for 2 CPU, 0.25 GPU per actor; "
                           "but its 1 node(s) have at most 2 CPU, 0 GPU."), line
    # interpreter, imports and the local Ray's start: 10-30 s on a 2-core machine, quiet to busy
    assert seconds < 90, seconds  # the old behaviour never ended


@pytest.fixture(scope="module")
def cpu_ray():
    """One CPU-only local Ray for the in-process checks (``datagen.run`` uses a Ray it finds running)."""
    import ray

    assert not ray.is_initialized()
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.parametrize(("config", "overrides", "expected"), [
    ("paper.yaml", [], "pool 'vlm' (stages tag, caption) asks for 4 CPU, 1 GPU per actor; "
                       "pool 'detect' (stages ground, segment) asks for 4 CPU, 0.5 GPU per actor; "
                       "pool 'describe' (stages describe) asks for 4 CPU, 1 GPU per actor; "
                       "pool 'score' (stages score, filter) asks for 2 CPU, 0.25 GPU per actor; "
                       "but its 1 node(s) have at most 2 CPU, 0 GPU."),
    ("real.yaml", ["pools.vlm.num_cpus=1", "pools.detect.num_cpus=1", "pools.describe.num_cpus=1",
                   "pools.score.num_cpus=1", "pools.score.num_gpus=0"],
     "pool 'vlm' (stages tag, caption) asks for 1 CPU, 1 GPU per actor; "
     "pool 'detect' (stages ground, segment) asks for 1 CPU, 0.5 GPU per actor; "
     "pool 'describe' (stages describe) asks for 1 CPU, 1 GPU per actor; but its 1 node(s) have at most 2 CPU, 0 GPU."),
    ("tiny.yaml", ["pools.models.num_cpus=3"],
     "pool 'models' (stages tag, caption, ground, segment, describe, score, filter) asks for 3 CPU per actor; "
     "but its 1 node(s) have at most 2 CPU."),
    ("tiny.yaml", ["execution.decode_cpus=2.5", "execution.write_cpus=4"],
     "decode asks for 2.5 CPU per task; write asks for 4 CPU per task; but its 1 node(s) have at most 2 CPU."),
])
def test_what_no_node_holds_is_one_error_line_and_exit_2(cpu_ray, images, tmp_path, capsys, config, overrides,
                                                         expected):
    argv = ["run", "--config", str(CONFIGS / config), "--input", str(images), "--output", str(tmp_path / "out"),
            "--no-progress"]
    assert main(argv + [a for o in overrides for a in ("--set", o)]) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert line.startswith("error: the Ray cluster cannot hold what this run asks for: " + expected), line
    assert line.endswith("or pass --wait-for-resources if an autoscaler adds such nodes")
    # checked before run.json is written: the corrected config's run is not refused as another config's
    assert not (tmp_path / "out" / "run.json").exists()


def test_memory_beyond_every_node_is_refused(cpu_ray, images, tmp_path, capsys):
    import ray

    have = max(n["Resources"]["memory"] for n in ray.nodes() if n["Alive"]) / GIB
    argv = ["run", "--config", str(CONFIGS / "tiny.yaml"), "--input", str(images), "--output", str(tmp_path / "out"),
            "--set", "pools.models.memory_gb=100000"]
    assert main(argv) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert (f"pool 'models' (stages tag, caption, ground, segment, describe, score, filter) asks for 0.5 CPU, "
            f"1e+05 GiB memory per actor; but its 1 node(s) have at most 2 CPU, {have:.3g} GiB memory.") in line, line


def test_wait_for_resources_warns_and_lets_the_run_wait(cpu_ray, caplog):
    cfg = load_config(CONFIGS / "real.yaml", ["execution.wait_for_resources=true"])
    with caplog.at_level(logging.WARNING, logger="datagen.resources"):
        check_resources(cfg)  # returns: Ray queues the actors until an autoscaler adds GPU nodes
    [record] = caplog.records
    assert record.getMessage().startswith("the Ray cluster cannot hold what this run asks for: pool 'vlm'")
    assert record.getMessage().endswith("-- waiting for such nodes (--wait-for-resources)")
    from datagen.cli import _config, build_parser

    parsed = build_parser().parse_args(["run", "--config", str(CONFIGS / "real.yaml"), "--input", "in", "--output",
                                        "out", "--wait-for-resources"])
    assert _config(parsed).execution.wait_for_resources is True

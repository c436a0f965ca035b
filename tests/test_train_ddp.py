"""Two CPU processes (gloo) under ``accelerate launch``: different data per rank, identical weights after."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_train import write_dataset

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys
    from accelerate import PartialState
    from safetensors.torch import save_file
    from training.train import train
    from training.train_config import TrainConfig

    out, overrides = sys.argv[1], json.loads(sys.argv[2])
    result = train(TrainConfig.from_yaml("configs/train/tiny.yaml", overrides))
    rank = PartialState().process_index
    save_file(result.adapter_state, f"{out}/rank{rank}.safetensors")
    with open(f"{out}/losses{rank}.json", "w") as f:
        json.dump(result.losses, f)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_with_identical_weights_on_both_ranks(tmp_path):
    dataset = write_dataset(tmp_path / "shards", shards=2, per_shard=4)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run = tmp_path / "run"
    overrides = [
        f"output_dir={run}",
        f"data.datasets=[{{path: {dataset}, augment: {{size: [64, 64], max_objects: 4}}}}]",
        "data.regions={max_objs: 4, max_regions: 8, max_slots: 6}",
        "data.batch_size=1",
        "data.epoch_samples=8",
        "train.max_steps=2",
        "train.gradient_accumulation_steps=2",
        "validation.every_steps=null",
        "checkpoint.resume=null",
        "log.tensorboard=false",
    ]
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(script), str(tmp_path), json.dumps(overrides),
    ]  # fmt: skip
    # ACCELERATE_USE_CPU turns --multi_gpu's torchrun workers into a gloo process group on CPU
    # (``--cpu`` would make accelerate start a single process).
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "1",
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert w0.keys() == w1.keys() and w0
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # all-reduced gradients, same updates
    l0 = json.loads((tmp_path / "losses0.json").read_text())
    l1 = json.loads((tmp_path / "losses1.json").read_text())
    assert len(l0) == len(l1) == 2 and l0 != l1  # each rank saw its own data
    # The checkpoint holds both ranks' stream positions.
    state = json.loads((run / "checkpoints" / "step_0000002" / "stream_state.json").read_text())
    assert sorted(state["ranks"]) == ["0", "1"]

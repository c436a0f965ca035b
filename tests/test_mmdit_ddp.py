"""Two processes under ``accelerate launch`` (DDP on CPU, gloo) train the MM-DiT adapter on tiny SD3.5 and FLUX.1:
each rank sees its own data, the weights stay identical, every trainable tensor has a gradient at every
step (layout dropout on one rank only must not put DDP out of step), LoRA on the base attention included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import write_dataset
from test_train_ddp import _free_port

from training.model.adapter import is_adapter_key
from training.model.lora import is_lora_key

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys
    from accelerate import PartialState
    from safetensors.torch import save_file
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from training.trainer.loop import train
    from training.trainer.config import TrainConfig

    missing = []
    register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: missing.append(sum(p.grad is None for g in opt.param_groups for p in g["params"]))
    )
    out, preset, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    result = train(TrainConfig.from_yaml(preset, overrides))
    rank = PartialState().process_index
    save_file(result.adapter_state, f"{out}/rank{rank}.safetensors")
    with open(f"{out}/losses{rank}.json", "w") as f:
        json.dump({"losses": result.losses, "missing_grads": missing}, f)
    """
)


@pytest.mark.slow  # two accelerate workers per backbone: about a minute each on 2 cores
@pytest.mark.parametrize("backbone", ["sd3", "flux"])
def test_two_processes_train_the_mmdit_adapter_in_step(tmp_path, backbone):
    dataset = write_dataset(tmp_path / "shards", shards=2, per_shard=4)
    (tmp_path / "worker.py").write_text(WORKER)
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"data.datasets=[{{path: {dataset}, augment: {{size: [64, 64], max_objects: 4}}}}]",
        "data.regions={max_objs: 4, max_regions: 8, max_slots: 6, downscale: 16}",
        "data.batch_size=1", "data.epoch_samples=8", "train.max_steps=3", "train.gradient_accumulation_steps=2",
        "train.layout_dropout=0.5", "model.lora_rank=2", "model.model_type=casa", "ema.update_after_step=0",
        "validation.every_steps=3", "validation.num_images=1", "checkpoint.every_steps=3",
        "checkpoint.resume=null", "log.tensorboard=false",
    ]  # fmt: skip
    cmd = [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(tmp_path / "worker.py"), str(tmp_path),
        f"configs/train/tiny_{backbone}.yaml", json.dumps(overrides),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "1"}  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = [json.loads((tmp_path / f"losses{r}.json").read_text()) for r in (0, 1)]
    w0, w1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert w0.keys() == w1.keys() and any(is_lora_key(k) for k in w0) and any(map(is_adapter_key, w0))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # all-reduced gradients, the same updates
    assert logs[0]["losses"] != logs[1]["losses"] and len(logs[0]["losses"]) == 3  # each rank its own data
    assert logs[0]["missing_grads"] == logs[1]["missing_grads"] == [0, 0, 0]
    assert (tmp_path / "run" / "validation" / "step_0000003_0.png").is_file()

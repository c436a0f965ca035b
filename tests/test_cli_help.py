"""Every CLI answers ``--help`` (and an argument mistake) without loading the heavy model libraries.

diffusers' pipelines import bitsandbytes when it is installed: seconds of start-up and a kernel warning
on stderr. Each command runs in a fresh interpreter through ``runpy`` (as ``python -m`` does), which then
reports which of those libraries the command had imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("diffusers", "transformers", "torchmetrics", "bitsandbytes")
# training.train --help loads none of these either (the trainer's help is fast: no torch at all).
TRAIN_LIGHT = ("torch", "peft", "tensorboard")
MARK = "IMPORTED-HEAVY "
# Runs a module as `python -m` would, then prints which HEAVY libraries it imported and exits with its code.
WRAPPER = f"""
import json, runpy, sys
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else 1
sys.stdout.flush()
print({MARK!r} + json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY + TRAIN_LIGHT!r}))))
sys.exit(code)
"""

COMMANDS = [
    ("training.train", "python -m training.train"),
    ("training.generate", "python -m training.generate"),
    ("training.evaluate", "python -m training.evaluate"),
    ("training.init_unet", "python -m training.init_unet"),
    ("training.init_adapter", "python -m training.init_adapter"),
    ("training.data.stream", "stream.py"),
    ("datagen run", "python -m datagen run"),
    ("shards validate", "python -m shards validate"),
]


def _run(*argv: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``python -m argv...`` through the wrapper: the process and the HEAVY (and TRAIN_LIGHT) libraries
    it imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    lines = proc.stdout.splitlines()
    assert lines and lines[-1].startswith(MARK), proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc, json.loads(lines[-1][len(MARK):])


@pytest.mark.parametrize(("command", "prog"), COMMANDS, ids=[c for c, _ in COMMANDS])
def test_help_answers_without_loading_model_libraries(command, prog):
    proc, heavy = _run(*command.split(), "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {prog} "), proc.stdout[:300]
    for word in ("bitsandbytes", "gemm", "Traceback"):
        assert word not in proc.stderr, proc.stderr[-2000:]
    assert set(heavy).isdisjoint(HEAVY), f"{command} --help imported {heavy}"
    if command == "training.train":
        assert heavy == [] and proc.stderr == "", (heavy, proc.stderr[-2000:])
        assert "--resume" in proc.stdout and "--override" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["training.generate", "--layouts", "x.jsonl"], "--out"),
        (["training.evaluate", "--images", "gen"], "--layouts"),
        (["training.init_unet", "--base", "tiny", "--out", "o", "--model-type", "sa"], "--model-type"),
    ],
    ids=["generate", "evaluate", "init_unet"],
)
def test_an_argument_mistake_is_one_usage_error_before_any_model_library(argv, named):
    proc, heavy = _run(*argv)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith(f"python -m {argv[0]}: error: ") and named in proc.stderr
    assert "Traceback" not in proc.stderr and set(heavy).isdisjoint(HEAVY)


def test_the_light_choices_equal_the_model_modules_constants():
    # evaluate and init_unet read their choices from config Literals so their parsers need no torch model
    # code; the modules that define the behaviour keep the authoritative tuples.
    from training.evaluation import evaluate
    from training.evaluation.layoutsam import LAYOUTSAM
    from training.evaluation.metrics import PROTOCOLS
    from training.model import init_adapter as init_unet
    from training.model.casa import MODEL_TYPES

    assert evaluate.PROTOCOL_CHOICES == (*PROTOCOLS, LAYOUTSAM) == ("paper", "exact", "layoutsam")
    assert init_unet.MODEL_TYPE_CHOICES == MODEL_TYPES == ("ca", "casa")

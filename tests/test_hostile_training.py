"""Hostile and careless input to the training-side command lines: generate, evaluate, train and init_unet.

Each case is one command line run in-process, with its class (the way it failed before, or would fail):
``hang`` (a read that never returns), ``traceback``, ``lost`` (an input dropped without a word),
``silent`` (a wrong run that exits 0) and ``security`` (a file that could run code, or a write outside the
output folder). Unless a case says otherwise it must end with exit 2, exactly one ``error: ...`` line on
stderr holding the expected words, no traceback, and (security) no side effect. Hang cases run under an
alarm, so a hang fails instead of blocking the suite. The tally by class and entry point is
``test_the_corpus_covers_every_class_on_every_entry_point``'s (``CASES``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from shards import ObjectRecord, SampleRecord, ShardWriter
from training.evaluation import evaluate
from training.inference import generate
from training.model import init_adapter as init_unet
from training.model.adapter import ADAPTER_FORMAT, attach_regional_adapter, save_adapter
from training.model.tiny import tiny_unet
from training.trainer import loop as train

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = str(ROOT / "configs" / "train" / "tiny.yaml")
ENTRY = {"generate": generate.main, "evaluate": evaluate.main, "train": train.main, "init_unet": init_unet.main}
CLASSES = ("hang", "traceback", "lost", "silent", "security")
GOOD = {"boxes": [[0, 0, 32, 32]], "labels": ["a red kite"]}

# Layout files of many shapes, each refused with the words expected in its one error line.
LAYOUTS = {
    "deep.json": ("[" * 100_000 + "]" * 100_000, "nested deeper than"),
    "deep.jsonl": ('{"boxes": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "nested deeper than"),
    "bigint.jsonl": ('{"boxes": [[0, 0, 8, 1' + "0" * 5000 + ']], "labels": ["a"]}\n', "5001 digits"),
    "bigseed.jsonl": ('{"boxes": [[0, 0, 8, 8]], "labels": ["a"], "seed": 1' + "0" * 30 + "}\n", "'seed' must be"),
    "empty.jsonl": ("", "the file is empty"),
    "blank.jsonl": ("\n  \n\t\n", "the file is empty"),
    "emptyarray.json": ("[]", "the array is empty"),
    "string.json": ('"a cat"', "expected a JSON object, got str"),
    "number.json": ("42", "expected a JSON object, got int"),
    "null.json": ("null", "expected a JSON object, got NoneType"),
    "noboxes.json": ("{}", "give exactly one of 'boxes' or 'bboxes'"),
    "both.json": (json.dumps({**GOOD, "bboxes": GOOD["boxes"]}), "exactly one of 'boxes' or 'bboxes'"),
    "nolabels.json": (json.dumps({"boxes": [[0, 0, 8, 8]]}), "missing 'labels'"),
    "labelstring.json": (json.dumps({"boxes": [[0, 0, 8, 8]], "labels": "a cat"}), "'labels' must be a list"),
    "labelnumber.json": (json.dumps({"boxes": [[0, 0, 8, 8]], "labels": [7]}), "are not strings"),
    "fewerlabels.json": (json.dumps({"boxes": [[0, 0, 8, 8], [8, 8, 16, 16]], "labels": ["a"]}), "2 boxes but 1 labels"),
    "threenumbers.json": (json.dumps({"boxes": [[0, 0, 8]], "labels": ["a"]}), "shape (N, 4)"),
    "stringnumbers.json": (json.dumps({"boxes": [["0", "0", "8", "8"]], "labels": ["a"]}), "numbers only, got '0'"),
    "booleans.json": (json.dumps({"boxes": [[True, 0, 8, 8]], "labels": ["a"]}), "numbers only, got True"),
    "nullcoord.json": (json.dumps({"boxes": [[0, None, 8, 8]], "labels": ["a"]}), "numbers only, got None"),
    "nan.json": ('{"boxes": [[0, 0, NaN, 8]], "labels": ["a"]}', "NaN or inf"),
    "inf.json": ('{"boxes": [[0, 0, Infinity, 8]], "labels": ["a"]}', "NaN or inf"),
    "negative.json": (json.dumps({"boxes": [[-4, 0, 8, 8]], "labels": ["a"]}), "lies outside the 64x64 image"),
    "reversed.json": (json.dumps({"boxes": [[8, 0, 4, 8]], "labels": ["a"]}), "x2 <= x1"),
    "zeroarea.json": (json.dumps({"boxes": [[8, 0, 8, 8]], "labels": ["a"]}), "x2 <= x1"),
    "outside.json": (json.dumps({"boxes": [[0, 0, 80, 8]], "labels": ["a"]}), "lies outside the 64x64 image"),
    "boxesdict.json": (json.dumps({"boxes": {"a": 1}, "labels": ["a"]}), "numbers only"),
    "nested.json": (json.dumps({"boxes": [[[0, 0, 8, 8]]], "labels": ["a"]}), "shape (N, 4)"),
    "traversal.json": (json.dumps({**GOOD, "id": "../../outside"}), "'id' '../../outside' must be a file-name-safe"),
    "absolute.json": (json.dumps({**GOOD, "id": "/etc/cron.d/x"}), "must be a file-name-safe"),
    "longid.json": (json.dumps({**GOOD, "id": "a" * 200}), "must be a file-name-safe"),
    "emptyid.json": (json.dumps({**GOOD, "id": ""}), "must be a file-name-safe"),
    "duplicates.json": (json.dumps([{**GOOD, "id": "x"}, {**GOOD, "id": "x"}]), "duplicate ids ['x']"),
    "captionnumber.json": (json.dumps({**GOOD, "caption": 5}), "'caption' must be a string"),
    "captionlist.json": (json.dumps({**GOOD, "caption": ["a", "b"]}), "needs --lenient"),
    "height65.json": (json.dumps({**GOOD, "height": 65}), "height must be a positive multiple of 8"),
    "height0.json": (json.dumps({**GOOD, "height": 0}), "height must be a positive multiple of 8"),
    "heighthuge.json": (json.dumps({**GOOD, "height": 800_000}), "larger than 4096 pixels"),
    "heightfloat.json": (json.dumps({**GOOD, "height": 64.0}), "height must be a positive multiple of 8"),
    "heightstring.json": (json.dumps({**GOOD, "height": "64"}), "height must be a positive multiple of 8"),
    "seednegative.json": (json.dumps({**GOOD, "seed": -1}), "'seed' must be an integer"),
    "seedfloat.json": (json.dumps({**GOOD, "seed": 1.5}), "'seed' must be an integer"),
    "seedbool.json": (json.dumps({**GOOD, "seed": True}), "'seed' must be an integer"),
    "toomany.json": (json.dumps({"boxes": [[i, i, i + 8, i + 8] for i in range(9)], "labels": ["a"] * 9}),
                     "9 objects but the model takes at most 8"),
    "garbageline.jsonl": (json.dumps(GOOD) + "\nnot json at all\n", "garbageline.jsonl:2: not JSON"),
    "truncated.json": ('{"boxes": [[0, 0', "not JSON"),
    "trailingcomma.json": ('{"boxes": [[0, 0, 8, 8]], "labels": ["a"],}', "not JSON"),
    "arrayofnumbers.json": ("[1, 2]", "[0]: expected a JSON object, got int"),
    "binary.json": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage", "not UTF-8 text"),
    "utf16.json": (json.dumps(GOOD).encode("utf-16"), "not UTF-8 text"),
}  # fmt: skip


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """Every hostile file the cases name, written once."""
    root = tmp_path_factory.mktemp("hostile")
    for name, (content, _) in LAYOUTS.items():
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (root / "good.jsonl").write_text(json.dumps({**GOOD, "id": "a"}) + "\n")
    (root / "allbad.jsonl").write_text("".join(LAYOUTS[n][0] + "\n" for n in ("nan.json", "negative.json")))
    (root / "afile").write_text("not a folder")
    (root / "emptydir").mkdir()
    os.mkfifo(root / "fifo.jsonl")
    os.mkfifo(root / "fifo.yaml")
    os.mkfifo(root / "fifo.safetensors")
    with open(root / "sparse.jsonl", "wb") as f:  # 300 MiB on paper, nothing on disk
        f.truncate(300 * 2**20)
    # configs
    (root / "empty.yaml").write_text("")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "deep.yaml").write_text("generate: " + "[" * 5000 + "]" * 5000 + "\n")
    (root / "malformed.yaml").write_text("generate: [unclosed\n")
    # weights
    (root / "garbage.safetensors").write_bytes(os.urandom(300))
    (root / "empty.safetensors").write_bytes(b"")
    save_file({"position_net.x": torch.zeros(64, 64)}, str(root / "whole.safetensors"))
    data = (root / "whole.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) - 1000])
    (root / "notensors.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    save_file({"position_net.x": torch.zeros(2)}, str(root / "badmeta.safetensors"),
              metadata={"format": ADAPTER_FORMAT, "config": "[1, 2]"})  # fmt: skip
    save_file({"position_net.x": torch.zeros(2)}, str(root / "badtype.safetensors"),
              metadata={"format": ADAPTER_FORMAT, "config": json.dumps({"model_type": "xyz"})})  # fmt: skip
    unet = attach_regional_adapter(tiny_unet())
    with torch.no_grad():
        unet.position_net.null_text_feature.fill_(float("nan"))
    save_adapter(unet, root / "nan.safetensors")
    # a pickle that creates a file when unpickled: refused by every weights_only reader
    marker = root / "PWNED"
    (root / "evil.pth").write_bytes(pickle.dumps(_Touch(marker)))
    # images and datasets
    rng = np.random.default_rng(0)
    for folder in ("images", "other", "ref"):
        (root / folder).mkdir()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "other" / "zzz.png")
    with ShardWriter(str(root / "failed_ds"), 0) as writer:
        for i in range(3):
            writer.add_failure(f"k{i}", f"/in/{i}.jpg", "decode", "cannot identify image")
    with ShardWriter(str(root / "good_ds"), 0) as writer:
        for i in range(2):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
            objects = (ObjectRecord(box=(0, 0, 32, 32), phrase="kite", description="a red kite"),)
            writer.add(SampleRecord(key=f"s{i}", width=64, height=64, original_width=64, original_height=64,
                                    caption="a beach", objects=objects), buf.getvalue(), "png")  # fmt: skip
    return root


class _Touch:
    """Unpickling this touches ``path``: the proof that a file was unpickled with weights_only=False."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@contextlib.contextmanager
def alarm(seconds: int):
    """A hang becomes a failure after ``seconds`` instead of blocking the suite."""

    def fire(*_):
        raise TimeoutError(f"hang: still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def G(*argv: str, out: str = "{d}/gen_out") -> list[str]:
    return ["--tiny", "--out", out, *argv]


def E(*argv: str, images: str = "{d}/images", layouts: str = "{d}/good.jsonl", out: str = "{d}/eval_out") -> list[str]:
    return ["--tiny", "--images", images, "--layouts", layouts, "--out", out, *argv]


def T(*overrides: str, config: str = TINY_TRAIN) -> list[str]:
    base = ["output_dir={d}/train_out", "data.datasets=[{{path: {d}/failed_ds}}]", "checkpoint.resume=null"]
    return ["--config", config, *[a for o in (*base, *overrides) for a in ("--override", o)]]


def I(*argv: str) -> list[str]:  # noqa: E743 - init_unet's argv, as G/E/T
    return ["--base", "tiny", "--out", "{d}/init_out", *argv]


def case(entry: str, klass: str, name: str, argv: list[str], expected: str, marks=()):
    assert entry in ENTRY and klass in CLASSES
    return pytest.param(entry, klass, argv, expected, id=f"{entry}-{klass}-{name}", marks=marks)


_LAYOUT_CLASS = {"traversal.json": "security", "absolute.json": "security", "duplicates.json": "lost",
                 "stringnumbers.json": "silent", "booleans.json": "silent"}  # fmt: skip

CASES = [
    # ---- generate: layout files of many shapes (before any model loads)
    *[case("generate", _LAYOUT_CLASS.get(n, "traceback"), n, G("--layouts", f"{{d}}/{n}"), why) for n, (_, why) in LAYOUTS.items()],
    case("generate", "hang", "fifo-layouts", G("--layouts", "{d}/fifo.jsonl"), "not a regular file"),
    case("generate", "hang", "device-layouts", G("--layouts", "/dev/zero"), "not a regular file"),
    case("generate", "hang", "300MiB-layouts", G("--layouts", "{d}/sparse.jsonl"), "more than a layouts file holds"),
    case("generate", "traceback", "layouts-folder", G("--layouts", "{d}"), "is a folder, not a layouts file"),
    case("generate", "traceback", "layouts-missing", G("--layouts", "{d}/nope.json"), "no such layouts file"),
    case("generate", "lost", "all-bad-skipped", G("--layouts", "{d}/allbad.jsonl", "--skip-bad-layouts"), "no valid layout (2 skipped)"),
    # ---- generate: arguments, presets, overrides
    case("generate", "traceback", "layouts-and-shards", G("--layouts", "{d}/good.jsonl", "--from-shards", "{d}/x"), "not both or neither"),
    case("generate", "traceback", "no-source", G(), "give a layouts file (--layouts) or a dataset"),
    case("generate", "traceback", "limit-0", G("--layouts", "{d}/good.jsonl", "--limit", "0"), "--limit must be >= 1"),
    case("generate", "traceback", "limit-negative", G("--layouts", "{d}/good.jsonl", "--limit", "-3"), "--limit must be >= 1"),
    case("generate", "traceback", "steps-0", G("--layouts", "{d}/good.jsonl", "--steps", "0"), "num_inference_steps"),
    case("generate", "traceback", "guidance-negative", G("--layouts", "{d}/good.jsonl", "--guidance-scale", "-1"), "guidance_scale"),
    case("generate", "silent", "guidance-nan", G("--layouts", "{d}/good.jsonl", "--guidance-scale", "nan"), "guidance_scale"),
    case("generate", "silent", "guidance-inf", G("--layouts", "{d}/good.jsonl", "--guidance-scale", "inf"), "guidance_scale"),
    case("generate", "traceback", "beta-1.5", G("--layouts", "{d}/good.jsonl", "--beta", "1.5"), "scheduled_sampling_beta"),
    case("generate", "traceback", "seed-negative", G("--layouts", "{d}/good.jsonl", "--seed", "-1"), "seed"),
    case("generate", "traceback", "device-typo", G("--layouts", "{d}/good.jsonl", "--device", "gpu"), "device must be auto, cpu"),
    case("generate", "traceback", "device-cuda-absent", G("--layouts", "{d}/good.jsonl", "--device", "cuda:3"), "no CUDA device here"),
    case("generate", "silent", "set-unknown-key", G("--layouts", "{d}/good.jsonl", "--set", "guidnce_scale=3"), "guidnce_scale"),
    case("generate", "traceback", "set-height-65", G("--layouts", "{d}/good.jsonl", "--set", "height=65"), "height must be a positive multiple of 8"),
    case("generate", "traceback", "set-no-equals", G("--layouts", "{d}/good.jsonl", "--set", "height"), "must look like key.subkey=value"),
    case("generate", "traceback", "set-dtype", G("--layouts", "{d}/good.jsonl", "--set", "dtype=float64"), "dtype"),
    case("generate", "traceback", "set-rasterize", G("--layouts", "{d}/good.jsonl", "--set", "rasterize=edge"), "rasterize"),
    case("generate", "traceback", "set-fit", G("--layouts", "{d}/good.jsonl", "--set", "dataset_fit=pad"), "dataset_fit"),
    case("generate", "traceback", "refiner-strength-0", G("--layouts", "{d}/good.jsonl", "--set", "refiner_strength=0"), "refiner_strength"),
    case("generate", "traceback", "refiner-0-steps", G("--layouts", "{d}/good.jsonl", "--refiner", "tiny", "--refiner-steps", "2",
                                                     "--refiner-strength", "0.3"), "leaves no refiner step"),  # fmt: skip
    case("generate", "traceback", "preset-unknown", ["--preset", "nosuch", "--out", "{d}/o", "--layouts", "{d}/good.jsonl"], "no preset file"),
    case("generate", "traceback", "preset-path", ["--preset", "../../../etc/passwd", "--out", "{d}/o", "--layouts", "{d}/good.jsonl"], "no preset file"),
    case("generate", "traceback", "preset-and-config", ["--preset", "paper", "--config", TINY_TRAIN, "--out", "{d}/o", "--layouts", "{d}/good.jsonl"], "not both"),
    case("generate", "silent", "config-without-section", ["--config", TINY_TRAIN, "--out", "{d}/o", "--layouts", "{d}/good.jsonl"], "no 'generate' section"),
    case("generate", "silent", "config-empty", ["--config", "{d}/empty.yaml", "--out", "{d}/o", "--layouts", "{d}/good.jsonl"], "no 'generate' section"),
    case("generate", "traceback", "config-list", ["--config", "{d}/list.yaml", "--out", "{d}/o", "--layouts", "{d}/good.jsonl"], "expected a mapping"),
    case("generate", "traceback", "config-deep", ["--config", "{d}/deep.yaml", "--out", "{d}/o", "--layouts", "{d}/good.jsonl"], "nested too deep"),
    case("generate", "traceback", "config-malformed", ["--config", "{d}/malformed.yaml", "--out", "{d}/o", "--layouts", "{d}/good.jsonl"], "not valid YAML"),
    case("generate", "hang", "config-fifo", ["--config", "{d}/fifo.yaml", "--out", "{d}/o", "--layouts", "{d}/good.jsonl"], "no preset file"),
    case("generate", "traceback", "config-folder", ["--config", "{d}", "--out", "{d}/o", "--layouts", "{d}/good.jsonl"], "no preset file"),
    case("generate", "traceback", "out-is-a-file", G("--layouts", "{d}/good.jsonl", out="{d}/afile"), "exists and is not a folder"),
    case("generate", "traceback", "shards-missing", G("--from-shards", "{d}/nope_ds"), "does not exist"),
    case("generate", "traceback", "shards-is-a-file", G("--from-shards", "{d}/afile"), "afile"),
    case("generate", "silent", "shards-empty-folder", G("--from-shards", "{d}/emptydir"), "no sample to take a layout from"),
    case("generate", "lost", "shards-all-failed", G("--from-shards", "{d}/failed_ds"), "no sample to take a layout from"),
    # ---- generate: weights files (checked before any model loads)
    case("generate", "traceback", "adapter-garbage", G("--layouts", "{d}/good.jsonl", "--adapter", "{d}/garbage.safetensors"), "--adapter {d}/garbage.safetensors: not a safetensors file"),
    case("generate", "traceback", "adapter-empty", G("--layouts", "{d}/good.jsonl", "--adapter", "{d}/empty.safetensors"), "not a safetensors file"),
    case("generate", "traceback", "adapter-truncated", G("--layouts", "{d}/good.jsonl", "--adapter", "{d}/truncated.safetensors"), "not a safetensors file"),
    case("generate", "traceback", "adapter-no-tensors", G("--layouts", "{d}/good.jsonl", "--adapter", "{d}/notensors.safetensors"), "holds no tensors"),
    case("generate", "traceback", "adapter-bad-metadata", G("--layouts", "{d}/good.jsonl", "--adapter", "{d}/badmeta.safetensors"), "metadata does not describe an adapter"),
    case("generate", "traceback", "adapter-bad-type", G("--layouts", "{d}/good.jsonl", "--adapter", "{d}/badtype.safetensors"), "metadata does not describe an adapter"),
    case("generate", "traceback", "adapter-missing", G("--layouts", "{d}/good.jsonl", "--adapter", "{d}/nope.safetensors"), "no such file"),
    case("generate", "traceback", "adapter-folder", G("--layouts", "{d}/good.jsonl", "--adapter", "{d}"), "not a file"),
    case("generate", "hang", "adapter-fifo", G("--layouts", "{d}/good.jsonl", "--adapter", "{d}/fifo.safetensors"), "not a file"),
    case("generate", "traceback", "ema-garbage", G("--layouts", "{d}/good.jsonl", "--ema", "{d}/garbage.safetensors"), "--ema"),
    case("generate", "traceback", "lora-garbage", G("--layouts", "{d}/good.jsonl", "--lora", "{d}/garbage.safetensors"), "--lora"),
    case("generate", "traceback", "lora-missing", G("--layouts", "{d}/good.jsonl", "--lora", "{d}/nope.safetensors"), "no such file"),
    # ---- evaluate
    case("evaluate", "silent", "images-empty-folder", E(images="{d}/emptydir", layouts="{d}/good.jsonl"), "none of the 1 layouts' images is there"),
    case("evaluate", "silent", "images-of-another-run", E(images="{d}/other", layouts="{d}/good.jsonl"), "holds 1 image files"),
    case("evaluate", "silent", "unrefined-absent", E("--set", "image_set=unrefined"), "images/unrefined is not a folder"),
    case("evaluate", "traceback", "images-missing", E(images="{d}/nope", layouts="{d}/good.jsonl"), "is not a folder"),
    case("evaluate", "traceback", "images-is-a-file", E(images="{d}/afile", layouts="{d}/good.jsonl"), "is not a folder"),
    case("evaluate", "traceback", "layouts-deep", E(images="{d}/images", layouts="{d}/deep.jsonl"), "nested deeper than"),
    case("evaluate", "traceback", "layouts-empty", E(images="{d}/images", layouts="{d}/empty.jsonl"), "the file is empty"),
    case("evaluate", "traceback", "layouts-binary", E(images="{d}/images", layouts="{d}/binary.json"), "not UTF-8 text"),
    case("evaluate", "hang", "layouts-fifo", E(images="{d}/images", layouts="{d}/fifo.jsonl"), "not a regular file"),
    case("evaluate", "lost", "duplicate-ids", E(images="{d}/images", layouts="{d}/duplicates.json"), "duplicate ids"),
    case("evaluate", "traceback", "zero-area-exact", E("--protocol", "exact", layouts="{d}/zeroarea.json"), "x2 <= x1"),
    case("evaluate", "silent", "inception-garbage", E("--reference", "{d}/ref", "--inception-weights", "{d}/garbage.safetensors"), "is not a plain Inception state dict"),
    case("evaluate", "security", "inception-pickle", E("--reference", "{d}/ref", "--inception-weights", "{d}/evil.pth"), "evil.pth is not a plain Inception state dict"),
    case("evaluate", "silent", "inception-without-reference", E("--inception-weights", "{d}/garbage.safetensors"), "not a plain Inception state dict"),
    case("evaluate", "traceback", "inception-missing", E("--reference", "{d}/ref", "--inception-weights", "{d}/nope.pth"), "no such file"),
    case("evaluate", "hang", "inception-fifo", E("--reference", "{d}/ref", "--inception-weights", "{d}/fifo.safetensors"), "not a regular file"),
    case("evaluate", "silent", "reference-missing", E("--reference", "{d}/nope"), "not a folder of reference images"),
    case("evaluate", "silent", "reference-is-a-file", E("--reference", "{d}/afile"), "not a folder of reference images"),
    case("evaluate", "traceback", "out-is-a-file", E(out="{d}/afile"), "exists and is not a folder"),
    case("evaluate", "traceback", "set-metrics-empty", E("--set", "metrics=[]"), "metrics must name"),
    case("evaluate", "traceback", "set-metrics-twice", E("--set", "metrics=[crop_clip, crop_clip]"), "metrics must name"),
    case("evaluate", "traceback", "set-metrics-unknown", E("--set", "metrics=[fid]"), "metrics"),
    case("evaluate", "traceback", "set-protocol", E("--set", "protocol=release"), "protocol"),
    case("evaluate", "traceback", "set-limits", E("--set", "relative_limits=[0.5, 0.1]"), "relative_limits"),
    case("evaluate", "traceback", "set-feature", E("--set", "fid.feature=100"), "fid.feature"),
    case("evaluate", "traceback", "set-chunk-0", E("--set", "chunk_images=0"), "chunk_images"),
    case("evaluate", "silent", "config-without-section", ["--config", TINY_TRAIN, "--images", "{d}/images", "--layouts", "{d}/good.jsonl"], "no 'evaluate' section"),
    case("evaluate", "traceback", "model-folder-missing", E("--set", "paper_clip={d}/nope"), "evaluate.paper_clip: cannot load"),
    # ---- train (before the model loads, except where a case needs it)
    case("train", "hang", "config-fifo", ["--config", "{d}/fifo.yaml"], "not a regular file"),
    case("train", "traceback", "config-folder", ["--config", "{d}"], "not a regular file"),
    case("train", "traceback", "config-missing", ["--config", "{d}/nope.yaml"], "No such file or directory"),
    case("train", "traceback", "config-empty", ["--config", "{d}/empty.yaml"], "data: required"),
    case("train", "traceback", "config-list", ["--config", "{d}/list.yaml"], "expected a mapping"),
    case("train", "traceback", "config-deep", ["--config", "{d}/deep.yaml"], "nested too deep"),
    case("train", "traceback", "override-deep", T("train.max_steps=" + "[" * 3000 + "]" * 3000), "nested too deep"),
    case("train", "traceback", "override-huge-number", T("train.max_steps=1e400"), "train.max_steps"),
    case("train", "silent", "override-nan-lr", T("optim.lr=.nan"), "optim.lr"),
    case("train", "traceback", "override-negative-batch", T("data.batch_size=-1"), "data.batch_size"),
    case("train", "silent", "override-typo", T("optim.lrr=1.0e-4"), "lrr"),
    case("train", "traceback", "output-dir-is-a-file", T("output_dir={d}/afile"), "output_dir {d}/afile: exists and is not a folder"),
    case("train", "lost", "all-rows-failed", T(), "no usable sample"),
    case("train", "traceback", "dataset-missing", T("data.datasets=[{{path: {d}/nope}}]"), "does not exist"),
    case("train", "traceback", "dataset-is-a-file", T("data.datasets=[{{path: {d}/afile}}]"), "afile"),
    case("train", "silent", "dataset-empty-folder", T("data.datasets=[{{path: {d}/emptydir}}]"), "has no complete shard"),
    case("train", "traceback", "resume-a-file", T("checkpoint.resume={d}/afile"), "not a checkpoint"),
    case("train", "security", "adapter-pickle", T("model.adapter={d}/evil.pth", "data.datasets=[{{path: {d}/good_ds}}]"),
         "not a tensors-only torch checkpoint"),
    case("train", "traceback", "adapter-garbage", T("model.adapter={d}/garbage.safetensors", "data.datasets=[{{path: {d}/good_ds}}]"),
         "model.adapter {d}/garbage.safetensors: cannot be read"),
    case("train", "traceback", "adapter-missing", T("model.adapter={d}/nope.safetensors", "data.datasets=[{{path: {d}/good_ds}}]"),
         "model.adapter {d}/nope.safetensors: cannot be read"),
    # ---- init_unet
    case("init_unet", "traceback", "adapter-garbage", I("--adapter", "{d}/garbage.safetensors"), "not a safetensors file"),
    case("init_unet", "traceback", "adapter-empty", I("--adapter", "{d}/empty.safetensors"), "not a safetensors file"),
    case("init_unet", "traceback", "adapter-truncated", I("--adapter", "{d}/truncated.safetensors"), "not a safetensors file"),
    case("init_unet", "traceback", "adapter-bad-metadata", I("--adapter", "{d}/badmeta.safetensors"), "metadata does not describe an adapter"),
    case("init_unet", "traceback", "adapter-missing", I("--adapter", "{d}/nope.pth"), "no such file"),
    case("init_unet", "traceback", "adapter-folder", I("--adapter", "{d}"), "not a file"),
    case("init_unet", "hang", "adapter-fifo", I("--adapter", "{d}/fifo.safetensors"), "not a file"),
    case("init_unet", "security", "adapter-pickle", I("--adapter", "{d}/evil.pth"), "not a tensors-only torch checkpoint"),
    case("init_unet", "silent", "adapter-nan", I("--adapter", "{d}/nan.safetensors"), "hold NaN or inf"),
    case("init_unet", "lost", "adapter-unknown-key", I("--adapter", "{d}/whole.safetensors"), "unexpected keys ['position_net.x']"),
    case("init_unet", "traceback", "out-is-a-file", ["--base", "tiny", "--out", "{d}/afile"], "exists and is not a folder"),
    case("init_unet", "traceback", "base-missing", ["--base", "{d}/nope", "--out", "{d}/o"], "nope"),
    case("init_unet", "traceback", "base-is-a-file", ["--base", "{d}/afile", "--out", "{d}/o"], "afile"),
]  # fmt: skip


def _run(entry: str, argv: list[str], d: Path, capsys) -> tuple[int, list[str], str]:
    argv = [a.format(d=d) for a in argv]
    with alarm(60):
        try:
            code = ENTRY[entry](argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()], err


@pytest.mark.parametrize(("entry", "klass", "argv", "expected"), CASES)
def test_hostile_input_is_one_error_line_exit_2(entry, klass, argv, expected, d, capsys):
    code, lines, err = _run(entry, argv, d, capsys)
    assert "Traceback" not in err, err
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.format(d=d) in lines[0], lines[0]
    assert not (d / "PWNED").exists()  # nothing was unpickled
    assert not (d.parent / "outside.png").exists()


# Argparse's own mistakes: exit 2, its usage line and one "error:" line naming the argument.
ARGPARSE = [
    pytest.param("generate", ["--tiny", "--layouts", "x"], "--out", id="generate-no-out"),
    pytest.param("generate", ["--tiny", "--out", "o", "--steps", "ten"], "--steps", id="generate-steps-word"),
    pytest.param("evaluate", ["--images", "i"], "--layouts", id="evaluate-no-layouts"),
    pytest.param("evaluate", ["--images", "i", "--layouts", "l", "--protocol", "release"], "--protocol", id="evaluate-protocol"),
    pytest.param("evaluate", ["--images", "i", "--layouts", "l", "--metrics", "fid"], "--metrics", id="evaluate-metrics-fid"),
    pytest.param("evaluate", ["--images", "i", "--layouts", "l", "--metrics", ","], "--metrics", id="evaluate-metrics-empty"),
    pytest.param("train", [], "--config", id="train-no-config"),
    pytest.param("init_unet", ["--base", "tiny", "--out", "o", "--model-type", "sa"], "--model-type", id="init_unet-model-type"),
]  # fmt: skip


@pytest.mark.parametrize(("entry", "argv", "flag"), ARGPARSE)
def test_argument_mistakes_are_argparse_errors_naming_the_flag(entry, argv, flag, d, capsys):
    code, lines, err = _run(entry, argv, d, capsys)
    assert code == 2 and "Traceback" not in err and lines[-1].count("error:") == 1 and flag in lines[-1], err


# ---------------------------------------------------------------------------------------------------
# Documented behaviour rather than an error (each needs models: a few seconds)


def test_a_layouts_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    from training.layout.files import read_layouts

    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    (tmp_path / "plain.jsonl").write_text(json.dumps(GOOD) + "\n")
    (a,), (b,) = read_layouts(tmp_path / "bom.jsonl"), read_layouts(tmp_path / "plain.jsonl")
    assert a.boxes.tolist() == b.boxes.tolist() == [[0, 0, 32, 32]] and a.labels == b.labels


def test_generate_and_init_unet_refuse_nan_or_pickled_adapters_before_writing_anything(d, tmp_path, capsys):
    runs = [("generate", ["--tiny", "--layouts", str(d / "good.jsonl"), "--out", str(tmp_path / "o")]),
            ("init_unet", ["--base", "tiny", "--out", str(tmp_path / "o")])]  # fmt: skip
    for entry, argv in runs:
        for adapter, words in ((d / "nan.safetensors", "hold NaN or inf"), (d / "evil.pth", "not a tensors-only")):
            code, lines, err = _run(entry, [*argv, "--adapter", str(adapter)], d, capsys)
            assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err, err
            assert not (tmp_path / "o").exists() and not (d / "PWNED").exists()


def test_evaluate_counts_an_unreadable_or_bomb_image_and_never_opens_a_fifo_in_the_reference(d, tmp_path, monkeypatch, capsys):
    from test_metrics import random_inception_weights

    images, ref = tmp_path / "images", tmp_path / "ref"
    images.mkdir()
    ref.mkdir()
    rng = np.random.default_rng(1)
    for folder, names in ((images, ("a", "b")), (ref, ("r0", "r1"))):
        for name in names:
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (images / "garbage.png").write_bytes(os.urandom(200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 * 2)  # a 200 x 200 image is a "bomb" here
    Image.new("RGB", (200, 200)).save(images / "bomb.png")
    os.mkfifo(ref / "fifo.png")
    layouts = tmp_path / "l.jsonl"
    layouts.write_text("".join(json.dumps({**GOOD, "id": i}) + "\n" for i in ("a", "b", "garbage", "bomb")))
    weights = random_inception_weights(tmp_path / "inception.pth")
    argv = ["--tiny", "--images", str(images), "--layouts", str(layouts), "--out", str(tmp_path / "e"),
            "--reference", str(ref), "--inception-weights", str(weights), "--set", "fid.feature=64"]  # fmt: skip
    code, lines, err = _run("evaluate", argv, d, capsys)
    assert code == 0 and "Traceback" not in err, err
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["failures_by_reason"] == {"unreadable image": 2}
    assert summary["objects"] == 4 and summary["failed_objects"] == 2 and summary["fid_images"] == 2
    assert summary["fid_reference_images"] == 2 and np.isfinite(summary["fid"])  # the FIFO left out, unopened


def test_the_corpus_covers_every_class_on_every_entry_point():
    tally = {(p.values[0], p.values[1]) for p in CASES}
    counts = {e: {k: sum(1 for p in CASES if p.values[:2] == (e, k)) for k in CLASSES} for e in ENTRY}
    missing = [(e, k) for e in ENTRY for k in CLASSES if (e, k) not in tally]
    assert not missing, counts
    assert len(CASES) + len(ARGPARSE) >= 100, counts

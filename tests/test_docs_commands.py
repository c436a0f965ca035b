"""Every command block of the docs runs as written: tiny models, small data, placeholders filled.

Each fenced bash / sh / console / python block of every Markdown file (and each ``$ `` transcript in a
text block) is classified in ``BLOCKS`` by (file, its first command line): ``run`` (every command runs in
a fresh folder holding the small files the placeholders point at; a command that ``HELP_RULES`` says
cannot run here becomes its ``--help``, every flag the docs pass checked against it, plus its dry run
where the program has one), ``help`` (every command in that form) or ``skip`` (with the reason). A new
block without a classification fails ``test_every_block_is_classified``, so the docs stay honest;
heavy blocks (Ray runs, training, generation) are ``slow``. The placeholders and what fills them are
``SUBS`` (every block) and each entry's ``subs``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections import Counter
from dataclasses import dataclass, field

import pytest
from docs_blocks import all_blocks, extract, help_form, run_script
from docs_blocks import block_env as make_env
from docs_fixture import build_template, pilot_record
from s3_fixture import s3_server, upload  # noqa: F401  (s3_server: a pytest fixture)

# (regex as the docs write the placeholder, what fills it here, why) - every block, after its own subs
SUBS = [
    (r"\bDATASET \[DATASET \.\.\.\]", "dataset/ coco_shards/", "one or more datasets: the two small ones"),
    (r"\bDATASET\b", "dataset/", "a dataset: the session's small one (5 samples, one with 10 objects)"),
    (r"/tmp/(gen|sz)\b", r"tmp/\1", "a fixed /tmp path would be shared: under the block's own folder"),
    (r"hotshotco/SDXL-512", "tiny", "no hub weights here: the random tiny SDXL"),
    (r"\[(--label-size 768)\] \[(--unpad)\]", r"\1 \2", "optional flags: both given (the labels are at 768 px)"),
    (r"<head>", "head-node", "the head node's host name"),
    (r"https://minio\.internal:9000", "$DOCS_S3_ENDPOINT", "an S3-compatible store: moto's server on 127.0.0.1"),
    (r"\{00000\.\.00331\}", "{00000..00001}", "small data: 2 img2dataset tars on S3, not 332"),
]

# (regex on a command, why it runs as its --help / dry run here); the first match decides
HELP_RULES = [
    (r"^make test", "the test suite itself: make -n"),
    (r"-m pytest\b", "the test suite itself: pytest --collect-only"),
    (r"--num_processes (8|16)\b|--nproc_per_node 8", "8 GPU processes per node"),
    (r"^ray ", "a Ray cluster (ray up, a head at <head>:8265)"),
    (r"^ssh ", "a tunnel to a head node: ssh -G checks its options without connecting"),
    (r"^python -m datagen run .*configs/datagen/(real|real_vllm|paper)\.yaml", "real models on GPUs: plan is its dry run"),
    (r"^python -m training\.(generate|evaluate)\b(?!.*--tiny)", "hub weights (SDXL, refiner, CLIP, PickScore, SAM) on a GPU"),
    (r"benchmarks/", "a benchmark: minutes of CPU, or a GPU (make bench runs them)"),
]


@dataclass(frozen=True)
class Entry:
    how: str  # run | help | skip
    why: str = ""  # for help and skip
    slow: bool = False
    subs: tuple = ()  # (regex, replacement, why): this block's placeholders, applied before SUBS
    setup: str = ""  # bash run first: files a placeholder stands for that the template lacks
    prelude: str = ""  # python blocks: names the snippet uses without defining (never an import it lacks)
    s3: bool = False  # needs moto's S3 server with the buckets the docs name
    env: dict = field(default_factory=dict)


# Two LayoutSAM rows as its parquet (images embedded), the same as the training split's (no image column),
# and SA-1B's tar of their images.
LAYOUTSAM_SETUP = """python - <<'EOF'
import io, pathlib, tarfile
import pyarrow as pa, pyarrow.parquet as pq
from PIL import Image
from shards.layoutsam import LAYOUTSAM_SCHEMA
rows, sa1b = [], io.BytesIO()
with tarfile.open(fileobj=sa1b, mode="w") as tar:
    for i in range(2):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (40 * i, 90, 160)).save(buf, "JPEG")
        info = tarfile.TarInfo(f"sa_{i}.jpg")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
        rows.append({"image": {"bytes": buf.getvalue(), "path": f"sa_{i}.jpg"}, "image_id": i,
                     "global_caption": "a blue wall", "detail_region_captions": "['a pale blue square patch']",
                     "region_captions": "['patch']", "bbox_list": "[[8, 8, 40, 40]]", "width": 64, "height": 48,
                     "file_name": f"sa_{i}.jpg"})
for folder, table in (("LayoutSAM-eval", pa.Table.from_pylist(rows, schema=LAYOUTSAM_SCHEMA)),
                      ("LayoutSAM/train", pa.Table.from_pylist(rows, schema=LAYOUTSAM_SCHEMA).drop(["image"]))):
    pathlib.Path(folder).mkdir(parents=True)
    pq.write_table(table, f"{folder}/part-0.parquet")
pathlib.Path("SA-1B").mkdir()
pathlib.Path("SA-1B/sa_000000.tar").write_bytes(sa1b.getvalue())
EOF"""
OUT_PY = (r"(from-python \S+) out/", r"\1 out_python/", "two alternatives writing one out/: each its own folder")
TINY_TRAIN = "configs/train/tiny.yaml"
DEMO_DATA = "data.datasets=[{path: demo_out/dataset, augment: {size: [64, 64]}}]"  # the docs' tiny override
BLOCKS = {
    ("README.md", "make demo"): Entry(
        "run", slow=True, setup="rm -rf demo_out",
        subs=((r"^make demo", "make -o .venv/.installed demo", "never reinstall the shared venv from a test"),)),
    ("README.md", "python -m shards info DATASET"): Entry("run", subs=(OUT_PY,)),
    ("README.md", "from shards import iter_samples, write_dataset"): Entry(
        "run", prelude="from my_module import make_items\nitems = make_items()  # the docs' `items`\n"),
    ("README.md", "python -m datagen run --config configs/datagen/tiny.yaml --input images/ --output out/"): Entry(
        "run", slow=True,
        subs=((r"run  \.\.\. ", "run --config configs/datagen/tiny.yaml --input images/ --output out/ ",
               "`...`: the first line's arguments"),)),
    ("README.md", "ray job submit --address http://127.0.0.1:8265 --working-dir . --"): Entry(
        "help", "a Ray cluster of GPU nodes", s3=True),
    ("README.md", f"python -m training.train --config {TINY_TRAIN}"): Entry("run", slow=True),
    ("README.md", "python -m training.init_unet --base hotshotco/SDXL-512 --model-type ca --out init/"): Entry(
        "run", slow=True),
    ("README.md", "python -m training.generate --preset paper --layouts layouts.jsonl --out gen/"): Entry(
        "help", "hub weights (SDXL-512, the refiner, CLIP, PickScore, SAM ViT-H) on a GPU"),
    ("README.md", "python -m shards from-layoutsam LayoutSAM-eval/ layoutsam_eval/"): Entry(
        "run", setup=LAYOUTSAM_SETUP),
    ("README.md", "python -m shards report out/ coco_shards/ --out report.html"): Entry(
        "run", setup="cp -r dataset out"),
    ("datagen/CLUSTER.md", "source .venv/bin/activate"): Entry(
        "help", "a Ray cluster of several machines (ray start on each, an SSH tunnel to the head)", s3=True),
    ("datagen/CLUSTER.md", "ray up cluster.yaml"): Entry("help", "a Ray cluster of GPU nodes", s3=True, slow=True),
    ("datagen/CLUSTER.md", "python -m datagen plan --config configs/datagen/real.yaml --input ... --output ..."): Entry(
        "run", subs=((r"--input \.\.\. --output \.\.\.", "--input images/ --output out/", "a run's input and output"),)),
    ("datagen/CLUSTER.md",
     "python -m datagen run --config configs/datagen/real.yaml --input 's3://bucket/cc3m/00000.tar'"): Entry(
        "help", "real models on GPUs", s3=True, slow=True),
    ("datagen/CLUSTER.md", "python -m datagen size --from s3://bucket/cc3m-pilot --images 3300000 --hours 24"): Entry(
        "run", s3=True),
    ("datagen/CLUSTER.md",
     "python -c \"from datagen.synthetic import make_image_folder as m; m('/tmp/sz/in1k', 1000, seed=5)\""): Entry(
        "run", slow=True, subs=((r"1000, seed=5", "8, seed=5", "small data: 8 images, not 1000"),)),
    ("datagen/CLUSTER.md", "python -m datagen size --config configs/datagen/real.yaml"): Entry("run", slow=True),
    ("datagen/CLUSTER.md", "export AWS_ENDPOINT_URL=https://minio.internal:9000 AWS_DEFAULT_REGION=us-east-1"): Entry(
        "run", s3=True, slow=True),
    ("docs/RELEASE.md", "python -m shards from-coco --instances annotations/instances_val2017.json"): Entry("run", slow=True),
    ("training/GENERATE.md", "python -m training.generate --preset paper --layouts layouts.jsonl --out gen/"): Entry(
        "run", slow=True),
    ("training/GENERATE.md",
     "python -m training.generate --tiny --layouts layouts.jsonl --out /tmp/gen --skip-bad-layouts"): Entry(
        "run", slow=True, setup="rm -rf tmp/gen; echo '{\"boxes\": [[0, 0, 80, 8]], \"labels\": [\"a banner\"], "
                               "\"height\": 64, \"width\": 64}' >> layouts.jsonl  # the transcript's bad third layout"),
    ("training/GENERATE.md",
     "python -m training.generate --preset release --adapter A.safetensors --ema A_ema.safetensors"): Entry(
        "help", "hub weights (SDXL-512, the refiner, CLIP, PickScore, SAM ViT-H) on a GPU", slow=True),
    ("training/GENERATE.md",
     "python -m shards from-release --labels labels/ --images images/ [--label-size 768] [--unpad] out/"): Entry(
        "run", subs=(OUT_PY,)),
    ("training/GENERATE.md", "import torch"): Entry(
        "run", slow=True,
        setup="python -c 'from training.model.tiny import tiny_sdxl_pipeline as p; p().save_pretrained(\"tiny_sdxl\")'\n"
              "python -m training.init_unet --base tiny --out init/ > /dev/null",
        subs=(("\"hotshotco/SDXL-512\"", "\"tiny_sdxl\"", "a local SDXL folder: the tiny one, saved"),
              ("\"madebyollin/sdxl-vae-fp16-fix\"", "\"tiny_sdxl/vae\"", "its VAE"),
              (r"\"adapter(_ema)?\.safetensors\"", "\"init/regional_adapter.safetensors\"", "an adapter file (fresh)"),
              (r"torch\.float16", "torch.float32", "CPU"), ("\"cuda\"", "\"cpu\"", "no GPU here"),
              (r"\[\[32, 40, 200, 300\]\]", "[[4, 5, 25, 37]]", "the same box at 64 px"),
              (r"=512\b", "=64", "the tiny model's size"), (r"=50\b", "=2", "two steps"))),
    ("training/GENERATE.md",
     "python -m training.evaluate --preset paper --images gen/ --layouts gen/layouts.jsonl --reference real_images/"):
        Entry("run", slow=True),
    ("training/GENERATE.md", "python -m training.evaluate --tiny --images /tmp/gen --layouts /tmp/gen/layouts.jsonl"):
        Entry("run", slow=True),
    ("training/GENERATE.md",
     "python -m training.generate --preset paper --adapter A.safetensors --layouts LayoutSAM-eval/ --out gen_sam/"):
        Entry("run", slow=True, setup=LAYOUTSAM_SETUP),
    ("training/GENERATE.md", "python -m venv .venv-minicpm"): Entry(
        "skip", "a transformers 4 venv and MiniCPM-V 2.6's remote-code weights from the hub (16 GB, a GPU)"),
    ("training/TRAINING.md", f"python -m training.train --config {TINY_TRAIN}"): Entry(
        "run", slow=True,
        subs=((r"(--num_processes 2 -m training.train --config) \.\.\.",
               rf"\1 {TINY_TRAIN} --override output_dir=runs/ddp --override train.max_steps=2",
               "`...`: the tiny preset, 2 steps, its own output (a resume needs the same processes)"),
              (r"--config \.\.\.", f"--config {TINY_TRAIN} --override '{DEMO_DATA}'",
               "`...`: the run trained above (its config and overrides: a resume needs the same stream)"),
              (r"runs/x/checkpoints/step_0001000", "runs/tiny/checkpoints/step_0000008", "a checkpoint made above"))),
    ("training/TRAINING.md", "from training.trainer.loop import train"): Entry("run", slow=True),
    ("training/TRAINING.md",
     ".venv/bin/python -m pytest -q tests/test_train.py tests/test_train_options.py tests/test_train_ddp.py"): Entry(
        "help", slow=True, why="the test suite itself (collected, not run) and a benchmark (minutes; --device cuda needs a GPU)"),
}


def keyed_blocks():
    """(file, first command line) -> block; a repeated first line in one file gets ' #2', ' #3'."""
    seen, out = Counter(), {}
    for block in all_blocks():
        key = (block.file, block.key)
        seen[key] += 1
        out[key if seen[key] == 1 else (key[0], f"{key[1]} #{seen[key]}")] = block
    return out


KEYED = keyed_blocks()


def substitute(text: str, entry: Entry, used: Counter | None = None) -> str:
    for pattern, new, _why in (*entry.subs, *SUBS):
        text, n = re.subn(pattern, new, text, flags=re.M)
        if used is not None:
            used[pattern] += n
    return text


def help_rule(command: str) -> str | None:
    bare = re.sub(r"^(\s*[A-Za-z_][A-Za-z0-9_]*=\S*\s+)+", "", command)
    return next((why for pattern, why in HELP_RULES if re.search(pattern, bare)), None)


def script(block, entry: Entry) -> str:
    """The bash lines of a block: its setup, then each command as written (placeholders filled) or in
    its help / dry-run form; a console block's command output is kept in _docs_out_N.txt."""
    lines = [entry.setup] if entry.setup else []
    if block.kind == "python":
        lines.append("cat > _docs_block.py <<'DOCS_EOF'\n" + entry.prelude + substitute(block.text, entry) + "\nDOCS_EOF")
        return "\n".join([*lines, "python _docs_block.py"]) + "\n"
    for i, command in enumerate(block.commands):
        command = substitute(command, entry)
        why = entry.why if entry.how == "help" else help_rule(command)
        lines.append("echo " + shlex.quote(f"+ {command}" + (f"    [as --help / dry run: {why}]" if why else "")))
        if why:
            lines += help_form(command)
        else:
            lines.append(f"{command} | tee _docs_out_{i}.txt" if block.kind == "console" else command)
    return "\n".join(lines) + "\n"


def _json_object(text: str) -> dict | None:
    """The last top-level JSON object printed as lines '{' ... '}'."""
    lines = text.splitlines()
    ends = [i for i, ln in enumerate(lines) if ln == "}"]
    starts = [i for i, ln in enumerate(lines) if ln == "{"]
    if not ends or not starts:
        return None
    end = ends[-1]
    start = max(i for i in starts if i < end)
    return json.loads("\n".join(lines[start:end + 1]))


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs") / "template"
    build_template(root)
    shutil.copytree(root / "dataset", root / "demo_out" / "dataset")
    return root


@pytest.fixture(scope="session")
def docs_s3(s3_server, template, tmp_path_factory):  # noqa: F811
    """The buckets the S3 examples name: bucket/ (img2dataset tars, a pilot's run record), raw/ (an image
    folder and a parquet list), datasets/cc3m-rich (a dataset)."""
    import tarfile

    import boto3
    import pandas as pd

    s3 = boto3.client("s3", endpoint_url=s3_server)
    for name in ("bucket", "raw", "datasets"):
        s3.create_bucket(Bucket=name)
    work = tmp_path_factory.mktemp("s3seed")
    images = sorted(p for p in (template / "images").iterdir() if p.suffix in (".jpg", ".png"))
    for n in range(2):
        with tarfile.open(work / f"{n:05d}.tar", "w") as tar:
            for i, img in enumerate(images[n * 2:n * 2 + 2]):
                key = f"{n:05d}{i:04d}"
                tar.add(img, arcname=f"{key}{img.suffix}")
                (work / "meta.json").write_text(json.dumps({"key": key, "status": "success", "caption": "shapes"}))
                tar.add(work / "meta.json", arcname=f"{key}.json")
        upload(work / f"{n:05d}.tar", f"s3://bucket/cc3m/{n:05d}.tar")
    pilot_record(work / "pilot")
    upload(work / "pilot", "s3://bucket/cc3m-pilot")
    upload(template / "images", "s3://raw/cc3m")
    pd.DataFrame({"url": [f"cc3m/{p.name}" for p in images[:2]], "caption": ["shapes"] * 2}).to_parquet(
        work / "extra.parquet")
    upload(work / "extra.parquet", "s3://raw/extra.parquet")
    upload(template / "dataset", "s3://datasets/cc3m-rich")
    return s3_server


def _params():
    params = []
    for key, block in KEYED.items():
        entry = BLOCKS.get(key)
        marks = [pytest.mark.slow] if entry and entry.slow else []
        params.append(pytest.param(key, marks=marks, id=f"{key[0]}:{block.line}"))
    return params


def test_every_block_is_classified_and_every_classification_has_its_block():
    missing = [k for k in KEYED if k not in BLOCKS]
    stale = [k for k in BLOCKS if k not in KEYED]
    assert not missing, "blocks without a classification (add them to BLOCKS: run, help or skip):\n" + "\n".join(
        f"  {k!r}  (line {KEYED[k].line})" for k in missing)
    assert not stale, "classified blocks no longer in the docs (fix the key in BLOCKS):\n" + "\n".join(map(repr, stale))
    assert {e.how for e in BLOCKS.values()} <= {"run", "help", "skip"}
    assert all(e.why for e in BLOCKS.values() if e.how != "run")


def test_every_placeholder_rule_fills_something():
    """A substitution or help rule that no longer matches any doc command is stale: the docs changed."""
    used, ruled = Counter(), Counter()
    for key, block in KEYED.items():
        entry = BLOCKS.get(key, Entry("run"))
        block_used = Counter()
        commands = [substitute(c, entry, block_used) for c in block.commands]
        used.update(block_used)
        assert all(block_used[p] for p, _, _ in entry.subs), f"{key}: a sub of this block matches nothing: {entry.subs}"
        for c in commands:
            for pattern, _ in HELP_RULES:
                ruled[pattern] += bool(re.search(pattern, c))
            if entry.how == "help" or help_rule(c):
                assert help_form(c)  # every command has a --help form (ValueError names it otherwise)
    assert [p for p, _, _ in SUBS if not used[p]] == []
    assert [p for p, _ in HELP_RULES if not ruled[p]] == []


def test_blocks_are_split_into_the_commands_the_docs_show(tmp_path):
    (tmp_path / "x.md").write_text(
        "```\nnot a command\n```\n"
        "1. a step\n   ```bash\n   # a comment\n   python -m a --b 1 \\\n       --c 'x # y'   # why\n   ls\n   ```\n"
        "```text\n$ python -m b --json\n{\n \"k\": 1\n}\n```\n```python\nimport os\nos.getcwd()\n```\n")
    shell, console, python = extract(tmp_path / "x.md", tmp_path)
    assert (shell.line, shell.kind, shell.key) == (5, "shell", "python -m a --b 1")
    assert shell.commands == ["python -m a --b 1 --c 'x # y'   # why", "ls"]
    assert (console.kind, console.commands, _json_object(console.doc_output)) == ("console", ["python -m b --json"], {"k": 1})
    assert (python.kind, python.key, python.commands) == ("python", "import os", ["import os\nos.getcwd()"])
    assert help_form(shell.commands[0]) == ["_help '--b --c' python -m a --b 1 --c 'x # y' --help"]


def test_the_help_check_fails_on_a_flag_the_program_does_not_take(tmp_path):
    lines = [*help_form("python -m datagen size --images 10 --hours 2"),
             *help_form("python -m datagen size --images 10 --no-such-flag")]
    code, out, _ = run_script(lines[0] + "\n", tmp_path, make_env({}), timeout=120)
    assert code == 0, out
    code, out, _ = run_script(lines[1] + "\n", tmp_path, make_env({}), timeout=120)
    assert code == 1 and "DOCS: the docs pass --no-such-flag, which 'python -m datagen size" in out


@pytest.mark.parametrize("key", _params())
def test_doc_block_runs(key, template, tmp_path, request):
    block, entry = KEYED[key], BLOCKS.get(key)
    assert entry is not None, f"unclassified block {key} (see test_every_block_is_classified...)"
    if entry.how == "skip":
        pytest.skip(entry.why)
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", **entry.env}  # no S3 request leaves the machine
    if entry.s3:
        endpoint = request.getfixturevalue("docs_s3")
        env.update({"AWS_ENDPOINT_URL": endpoint, "DOCS_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    work = tmp_path / "w"
    shutil.copytree(template, work, symlinks=True)
    text = script(block, entry)
    code, out, cpu = run_script(text, work, make_env(env), timeout=1800 if entry.slow else 300)
    print(f"{key[0]}:{block.line}: {cpu:.1f} CPU-s")
    assert code == 0, f"{key[0]}:{block.line} failed (exit {code}); the script:\n{text}\n--- output (tail):\n{out[-6000:]}"
    if block.kind == "console" and entry.how == "run" and (shown := _json_object(block.doc_output)):
        printed = _json_object((work / "_docs_out_0.txt").read_text())
        # a sample of the output: the command may print more, never less than the docs show
        assert printed is not None and set(shown) <= set(printed), (
            f"{key[0]}:{block.line}: the transcript shows keys {sorted(set(shown) - set(printed or {}))} "
            f"that the command no longer prints")

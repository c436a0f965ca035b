"""End-to-end datagen on an embedded local Ray with the tiny models: accounting, resume, kill, retry.

The runs go through the CLI in a subprocess (``python -m datagen run``), as a user runs them: a fresh
Ray per run, and a process that can be SIGKILLed mid-run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
from datagen_fixture import make_inputs

from datagen.inputs import list_inputs
from datagen.synthetic import make_image_folder
from shards import list_shards, validate_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "datagen" / "tiny.yaml")
# Small shards: 40 inputs make 5 shards, so a run can be interrupted between shards.
SETTINGS = ["--set", "inputs.samples_per_shard=8", "--set", "execution.num_cpus=2"]


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONHASHSEED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def _cmd(inputs: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "datagen", "run", "--config", TINY, "--input", str(inputs), "--output", str(output),
            "--no-progress", *SETTINGS, *extra]


def datagen(inputs: Path, output: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI to completion; returns the finished process (stdout/stderr captured)."""
    return subprocess.run(_cmd(inputs, output, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _parquet(output: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(output.glob("*.parquet"))], ignore_index=True)


def _files(output: Path, pattern: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(output.glob(pattern))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run over 28 synthetic images and 12 awkward files."""
    root = tmp_path_factory.mktemp("datagen")
    expected = make_inputs(root / "in")
    out = root / "reference"
    proc = datagen(root / "in", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "in", out, expected, proc.stdout


def test_every_input_is_accounted_for(reference):
    inputs, out, expected, stdout = reference
    items = list_inputs(str(inputs))
    df = _parquet(out)
    assert len(items) == 40
    assert sorted(df.key) == sorted(i.key for i in items)  # every input has exactly one parquet row
    assert validate_dataset(str(out)) == []
    assert [s.complete for s in list_shards(str(out))] == [True] * 5
    by_name = {Path(s).name: row for s, row in zip(df.source, df.to_dict("records"), strict=True)}
    for name, failure in expected.items():
        row = by_name[name]
        if failure is None:
            assert row["error_stage"] != "decode", (name, row["error"])
        else:
            assert (row["status"], row["error_stage"]) == ("failed", "decode") and failure in row["error"]
    ok = df[df.status == "ok"]
    assert len(ok) >= 20 and (ok.num_objects > 0).all()
    assert set(df.status) <= {"ok", "failed", "filtered"}
    assert "inputs           40" in stdout and "decode" in stdout and "describe" in stdout


def test_rerun_skips_complete_shards_and_changed_config_is_refused(reference, tmp_path):
    inputs, out, _, _ = reference
    before = _files(out, "*.tar")
    proc = datagen(inputs, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "5 already complete, 0 written now" in proc.stdout
    assert _files(out, "*.tar") == before
    proc = datagen(inputs, out, "--set", "decode.max_side=200")
    assert proc.returncode == 2 and "different configuration" in proc.stderr and "--new-run" in proc.stderr
    assert "differs in decode.max_side: 256 -> 200)" in proc.stderr
    assert _files(out, "*.tar") == before


def _index_totals(output: Path) -> dict:
    return json.loads((output / "index.json").read_text())["totals"]


def _cut_a_tar_in_half(copy: Path) -> str:
    tar = copy / "000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # next to its stats file
    return "shard 000001 has a stats file but its tar holds"


def _a_string_for_a_count_in_stats(copy: Path) -> str:
    stats = copy / "000002.stats.json"
    recorded = json.loads(stats.read_text())
    stats.write_text(json.dumps({**recorded, "samples": str(recorded["samples"])}))  # valid JSON, another shape
    return (f"shard 000002 has a stats file but its stats file is unreadable ({stats}: field 'samples' must be a "
            "count (an integer >= 0)")


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_cut_a_tar_in_half, _a_string_for_a_count_in_stats], ids=["tar", "stats"])
def test_a_damaged_shard_is_named_and_redone_on_resume_and_the_counts_are_right(damage, reference, tmp_path):
    inputs, out, _, stdout = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    named = damage(copy)
    proc = datagen(inputs, copy)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "shards 5 (4 already complete, 1 damaged and redone, 1 written now)" in proc.stdout
    assert named in proc.stderr
    assert _files(copy, "*.tar") == _files(out, "*.tar")  # redone byte for byte
    assert _files(copy, "*.stats.json") == _files(out, "*.stats.json")
    assert _index_totals(copy) == _index_totals(out)
    samples = next(line for line in stdout.splitlines() if line.strip().startswith("samples"))
    assert samples in proc.stdout
    assert validate_dataset(str(copy)) == []


FULL_DISK_DRIVER = """
import errno, sys
import ray
from datagen import pipeline
from datagen.cli import main

def seal(dataset, shard_id, parts, keep_existing, fingerprint):
    import shards.writer as w
    from datagen.stages.write import seal_shard
    real = w.ShardWriter.close
    def close(self):
        raise OSError(errno.ENOSPC, "No space left on device", dataset.uri + "/000003.tar")
    if shard_id == 3:
        w.ShardWriter.close = close
    try:
        return seal_shard(dataset, shard_id, parts, keep_existing, fingerprint)
    finally:
        w.ShardWriter.close = real

pipeline._seal_shard_task = ray.remote(seal)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_full_disk_in_a_shard_writer_is_one_error_line_and_other_shards_are_safe(reference, tmp_path):
    inputs, out, _, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for name in ("000003", "000004"):  # two shards to write: 3 hits the full disk, 4 completes
        (copy / f"{name}.stats.json").unlink()
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_DRIVER, *_cmd(inputs, copy)[3:]], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in proc.stderr.splitlines() if "Traceback" in line or line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on the device of {copy} ")
    assert "the 4 complete shard(s) are safe" in errors[0]
    assert [s.complete for s in list_shards(str(copy))] == [True, True, True, False, True]
    assert _files(copy, "00000[0124].tar") == _files(out, "00000[0124].tar")


@pytest.mark.slow
def test_sigkill_then_resume_gives_byte_identical_tars(reference, tmp_path):
    inputs, ref, _, _ = reference
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(inputs, out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 500
        while not (out / "000000.stats.json").exists() and not (out / "000001.stats.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before any shard was written"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (its process group)
        proc.wait()
    complete = [s.complete for s in list_shards(str(out))]
    assert 0 < sum(complete) < 5, complete  # killed mid-run
    resumed = datagen(inputs, out)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"{sum(complete)} already complete" in resumed.stdout
    assert _files(out, "*.tar") == _files(ref, "*.tar")
    assert _files(out, "*.parquet") == _files(ref, "*.parquet")


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


@pytest.mark.slow
def test_retry_failed_reprocesses_failed_rows(tmp_path):
    copy = tmp_path / "in"
    make_image_folder(copy, 20, seed=1, min_size=64, max_size=160)  # 3 shards, no failure but ours
    victim = copy / "img_0005.jpg"
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 3])  # a transient failure: the download was cut short
    out = tmp_path / "out"
    first = datagen(copy, out)
    assert first.returncode == 0, first.stderr[-4000:]
    df = _parquet(out)
    row = df[df.source.str.endswith("img_0005.jpg")].iloc[0]
    assert (row.status, row.error_stage) == ("failed", "decode")
    shard = f"{[i.key for i in list_inputs(str(copy))].index(row.key) // 8:06d}"
    before_tars = _files(out, "*.tar")
    before = _members(out / f"{shard}.tar")
    victim.write_bytes(good)  # fixed at the source
    retry = datagen(copy, out, "--retry-failed")
    assert retry.returncode == 0, retry.stderr[-4000:]
    assert "2 already complete, 1 written now" in retry.stdout  # only the shard with a failed row
    assert validate_dataset(str(out)) == []
    df = _parquet(out)
    assert df[df.key == row.key].status.item() == "ok"
    # Shards without failed rows are untouched; in the retried one, every other sample is carried over.
    after_tars = _files(out, "*.tar")
    assert {k: v for k, v in after_tars.items() if k != f"{shard}.tar"} == {
        k: v for k, v in before_tars.items() if k != f"{shard}.tar"}
    after = _members(out / f"{shard}.tar")
    assert {k: v for k, v in after.items() if not k.startswith(row.key)} == before
    assert {f"{row.key}.jpg", f"{row.key}.json"} <= set(after)


@pytest.mark.slow
def test_a_stage_failing_everywhere_stops_the_run(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(6):
        (tmp_path / "in" / f"{i}.jpg").write_bytes(b"")
    proc = datagen(tmp_path / "in", tmp_path / "out", "--set", "execution.fail_fast_rows=4")
    assert proc.returncode == 1
    assert "stage 'decode' failed on every one of the first" in proc.stderr
    assert not any(s.complete for s in list_shards(str(tmp_path / "out")))


@pytest.mark.slow
def test_a_model_stage_failing_on_every_row_stops_the_run(tmp_path):
    make_image_folder(tmp_path / "in", 8, seed=2, min_size=64, max_size=96)
    # A broken setting that loads (max_new_tokens=0 is refused at load now): a prompt holding a second
    # image token makes every VLM call of the tag stage raise, on every row.
    proc = datagen(tmp_path / "in", tmp_path / "out", "--set", "stages.tag.prompt=List the objects. <|image_pad|>")
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "stage 'tag' failed on all" in proc.stderr and "the run stops here" in proc.stderr
    assert not any(s.complete for s in list_shards(str(tmp_path / "out")))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real file system that fills up: a tmpfs mounted by the test (root only), unmounted after."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_really_full_disk_is_one_error_line_and_freeing_space_resumes_to_the_same_shards(reference, small_tmpfs):
    """No injected error: the output lives on a tmpfs sized to hold part of the dataset. The run stops with
    one line naming the complete shards; after the disk grows, the same command finishes the dataset with the
    undisturbed run's shards, byte for byte."""
    inputs, ref, _, _ = reference
    total = sum(p.stat().st_size for p in ref.iterdir() if p.is_file())
    subprocess.run(["mount", "-o", f"remount,size={total // 3}", str(small_tmpfs)], check=True)
    out = small_tmpfs / "ds"
    proc = datagen(inputs, out)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("error: no space left on the device of "), errors
    complete = [s.name for s in list_shards(str(out)) if s.complete]
    assert f"the {len(complete)} complete shard(s) are safe" in errors[0]
    for name in complete:  # what the stopped run calls complete is the undisturbed run's shard
        assert (out / f"{name}.tar").read_bytes() == (ref / f"{name}.tar").read_bytes(), name

    subprocess.run(["mount", "-o", f"remount,size={4 * total}", str(small_tmpfs)], check=True)
    proc = datagen(inputs, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _files(out, "*.tar") == _files(ref, "*.tar")
    assert _files(out, "*.stats.json") == _files(ref, "*.stats.json")

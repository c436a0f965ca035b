"""``notebooks/dataset_stats.ipynb``: committed without outputs, and runs unattended on a small dataset."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient
from stats_fixture import write_dataset

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "dataset_stats.ipynb"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """``python3``, installed from this interpreter's ipykernel into a temporary folder when it is missing."""
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(prefix=str(tmp_path / "kernel"), kernel_name="python3")
        monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "kernel" / "share" / "jupyter"))
    return "python3"


def test_notebook_committed_without_outputs_and_with_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "RICHLAYOUT_DATASETS" in params[0].source


def test_notebook_runs_on_two_datasets_side_by_side(tmp_path, monkeypatch, kernel_name):
    a = write_dataset(tmp_path / "run")
    b = tmp_path / "coco"
    shutil.copytree(a, b)
    monkeypatch.setenv("RICHLAYOUT_DATASETS", f"{a}, {b}")
    monkeypatch.setenv("RICHLAYOUT_MAX_SAMPLES", "100")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.monotonic()
    # A failing cell raises CellExecutionError naming the cell and the traceback.
    NotebookClient(nb, kernel_name=kernel_name, timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()
    elapsed = time.monotonic() - start
    print(f"notebook ran in {elapsed:.1f} s")
    assert elapsed < 60
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr" and "Traceback" in o.text]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 7  # paper, inputs, objects, boxes, scores, phrases, shards
    html = "".join(o["data"].get("text/html", "") for o in outputs if "data" in o)
    assert html.count('<figure class="card">') >= 2 * 4 + 2 * 4  # 4 samples and 4 failures per dataset
    assert "The cat sat on the mat." in html and "RuntimeError: CUDA out of memory" in html
    assert "coco" in html and "run" in html

"""Every notebook runs end to end (on the real models it names), and its committed outputs are not older than their
inputs (the hash `make notebooks` stores in the notebook's metadata; see tests/notebook_outputs.py)."""

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from notebook_outputs import KEY, ROOT, inputs_hash, stale_reason

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_outputs_are_not_stale(path):
    assert stale_reason(path) is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_figure_has_a_static_image(path):
    """A repository browser draws no plotly JSON: each plotly output carries a PNG as well."""
    notebook = nbformat.read(path, as_version=4)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    plotly = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert all("image/png" in o["data"] for o in plotly)
    assert not [o for o in outputs if o.output_type == "error"]


def test_the_staleness_check_fails_when_an_input_changes(tmp_path):
    """A copy of a notebook and its recorded inputs: current as copied; stale after a cell edit, an input file edit,
    a removed input, or with its outputs cleared."""
    source = ROOT / "notebooks" / "quickstart.ipynb"
    record = nbformat.read(source, as_version=4).metadata[KEY]
    assert any(f.startswith("probes/") for f in record["inputs"]) and "headlab/model.py" in record["inputs"]

    def fresh_copy():
        shutil.rmtree(tmp_path / "root", ignore_errors=True)
        for name in record["inputs"] + ["notebooks/quickstart.ipynb"]:
            (tmp_path / "root" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, tmp_path / "root" / name)
        return tmp_path / "root" / "notebooks" / "quickstart.ipynb"

    copy = fresh_copy()
    assert stale_reason(copy, root=tmp_path / "root") is None

    notebook = nbformat.read(copy, as_version=4)
    code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    code.source += "\n"
    nbformat.write(notebook, copy)
    assert "older than its inputs" in stale_reason(copy, root=tmp_path / "root")

    copy = fresh_copy()
    probe = next(f for f in record["inputs"] if f.startswith("probes/"))
    with open(tmp_path / "root" / probe, "a") as file:
        file.write("# changed\n")
    assert "older than its inputs" in stale_reason(copy, root=tmp_path / "root")

    copy = fresh_copy()
    (tmp_path / "root" / "headlab" / "model.py").unlink()
    assert "headlab/model.py missing" in stale_reason(copy, root=tmp_path / "root")

    copy = fresh_copy()
    notebook = nbformat.read(copy, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    nbformat.write(notebook, copy)
    assert "has no outputs" in stale_reason(copy, root=tmp_path / "root")
    assert inputs_hash(notebook, record["inputs"], tmp_path / "root") == record["inputs_sha256"]  # outputs unhashed


@pytest.mark.real
@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors

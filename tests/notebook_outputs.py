"""Executed notebooks and the hash of what their outputs were computed from.

    python tests/notebook_outputs.py notebooks/*.ipynb     # execute, save outputs and the inputs' hash (make notebooks)
    python tests/notebook_outputs.py --check notebooks/*.ipynb   # exit 1 naming each notebook whose outputs are stale

A notebook's inputs are its own cell sources, every headlab source file its kernel imported (probes/, kernels/ and
headlab/ in this checkout) and every file of the repository it read while it ran (notebooks/results/, datasets/) but
did not write: a file the notebook writes, even one it reads back, is its output (a study's results with their
timings), so running it again does not make it stale.
They are recorded during execution and stored, with their sha256, in the notebook's metadata under "headlab"; the
check recomputes the hash from the same files as they are now. Model weights are not hashed: the lock pins their
packages. Plotly figures are saved both as plotly JSON and as a PNG (kaleido, headless Chromium), so that they show
on a repository browser and in the documentation site without JavaScript.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "headlab"
# Installed package folder -> source folder in the checkout (pyproject.toml's package-dir).
SOURCE_DIRS = {"probes": "probes", "kernels": "kernels", "datasets": "datasets"}

# Run first in the kernel, never saved: seeds, a static PNG next to each plotly figure, and a record of every file
# opened under the repository or the installed headlab package.
PREAMBLE = """
import os as _os, random as _random, sys as _sys
import numpy as _np, torch as _torch
_random.seed(0); _np.random.seed(0); _torch.manual_seed(0)
import plotly.io as _pio
_pio.renderers.default = "plotly_mimetype+png"
_pio.renderers["png"].width, _pio.renderers["png"].height = 900, 560
__headlab_opened, __headlab_written = set(), set()
def __headlab_audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, _os.PathLike)):
        mode, flags = args[1], args[2]
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (_os.O_WRONLY | _os.O_RDWR))
        (__headlab_written if writes else __headlab_opened).add(_os.path.realpath(_os.fsdecode(args[0])))
    elif event == "os.rename" and isinstance(args[1], (str, bytes, _os.PathLike)):  # os.replace too
        __headlab_written.add(_os.path.realpath(_os.fsdecode(args[1])))
_sys.addaudithook(__headlab_audit)
"""

# Run last, never saved: the headlab modules loaded and the files opened, as JSON on stdout.
EPILOGUE = """
import json as _json
print(_json.dumps({"modules": sorted(getattr(m, "__file__", None) or "" for n, m in list(_sys.modules.items())
                                    if n == "headlab" or n.startswith("headlab.")),
                   "opened": sorted(__headlab_opened - __headlab_written)}))
"""


def package_dir() -> Path:
    import headlab

    return Path(headlab.__file__).resolve().parent


def to_source(path: str, package: Path) -> str | None:
    """The checkout-relative source path of an installed or checkout file; None when it is neither."""
    p = Path(path).resolve()
    if p.is_relative_to(package):
        parts = p.relative_to(package).parts
        if parts and parts[0] in SOURCE_DIRS:
            return str(Path(SOURCE_DIRS[parts[0]], *parts[1:]))
        return str(Path("headlab", *parts))
    if p.is_relative_to(ROOT) and not p.is_relative_to(ROOT / ".venv"):
        return str(p.relative_to(ROOT))
    return None


def cell_sources(notebook) -> list[str]:
    return [f"{cell.cell_type}\n{cell.source}" for cell in notebook.cells]


def inputs_hash(notebook, files: list[str], root: Path = ROOT) -> str:
    """sha256 over the cells' sources and the named files' bytes (a missing file hashes as missing)."""
    digest = hashlib.sha256()
    for source in cell_sources(notebook):
        digest.update(b"cell\0" + source.encode() + b"\0")
    for name in sorted(files):
        path = root / name
        digest.update(b"file\0" + name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"missing")
    return digest.hexdigest()


def stale_reason(path: Path, root: Path = ROOT) -> str | None:
    """None when the stored hash matches the inputs as they are now; else one sentence."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    record = notebook.metadata.get(KEY)
    if not record:
        return f"{path.name} has no recorded inputs: run `make notebooks`"
    if not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"):
        return f"{path.name} has no outputs: run `make notebooks`"
    if inputs_hash(notebook, record["inputs"], root) != record["inputs_sha256"]:
        missing = [name for name in record["inputs"] if not (root / name).is_file()]
        what = f"{', '.join(missing)} missing" if missing else "a cell or an input file changed"
        return f"{path.name} is older than its inputs ({what}): run `make notebooks`"
    return None


def execute(path: Path, timeout: int = 1800) -> list[str]:
    """Execute in place: outputs saved, inputs recorded in the metadata; returns the input files."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    notebook.cells.insert(0, nbformat.v4.new_code_cell(PREAMBLE))
    notebook.cells.append(nbformat.v4.new_code_cell(EPILOGUE))
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    record = json.loads(notebook.cells[-1].outputs[-1]["text"].strip().splitlines()[-1])
    notebook.cells = notebook.cells[1:-1]
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.execution_count = (cell.execution_count or 1) - 1
            for output in cell.outputs:
                if "execution_count" in output:
                    output["execution_count"] = cell.execution_count
    package = package_dir()
    files = {to_source(f, package) for f in record["modules"] + record["opened"] if f}
    files = sorted(f for f in files - {None} if (ROOT / f).is_file() and "__pycache__" not in Path(f).parts
                   and (not f.startswith("notebooks/") or f.startswith("notebooks/results/")))
    notebook.metadata[KEY] = {"inputs": files, "inputs_sha256": inputs_hash(notebook, files)}
    nbformat.write(notebook, path)
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="only check that the saved outputs are not stale")
    args = parser.parse_args(argv)
    if args.check:
        reasons = [r for r in map(stale_reason, args.notebooks) if r]
        print("\n".join(reasons) or f"{len(args.notebooks)} notebooks up to date")
        return 1 if reasons else 0
    os.environ.setdefault("HEADLAB_PROGRESS", "0")
    for path in args.notebooks:
        import time

        start = time.perf_counter()
        files = execute(path)
        print(f"{path}: {time.perf_counter() - start:.0f} s, {len(files)} input files", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

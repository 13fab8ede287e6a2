"""The core installs and runs without the optional packages (Triton, Ray, Jupyter, numba, kaleido, MkDocs): each is
blocked by an import hook in a fresh interpreter, as if it were not installed."""

import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
from typer.testing import CliRunner

from headlab.cli import app

OPTIONAL = ["triton", "ray", "jupyter", "jupyter_core", "jupyter_client", "notebook", "jupyterlab", "numba",
            "kaleido", "mkdocs"]

BLOCKER = textwrap.dedent(f"""
    import sys

    class NotInstalled:
        # Wraps a meta path finder: for the blocked packages it finds nothing, as after they were never installed
        # (`import` raises ModuleNotFoundError, importlib.util.find_spec returns None).
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {OPTIONAL!r}:
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, name):
            return getattr(self.finder, name)

    sys.meta_path[:] = [NotInstalled(finder) if hasattr(finder, "find_spec") else finder
                        for finder in sys.meta_path]
""")

SCAN = ["scan", "tiny-llama", "--probes", "detectors,sinks,flow", "--quick", "--threads", "1"]


def run_blocked(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)


def test_the_blocker_blocks(tmp_path):
    done = run_blocked("""
        for name in ("triton", "ray", "numba", "jupyter", "kaleido"):
            try:
                __import__(name)
            except ModuleNotFoundError:
                continue
            raise SystemExit(f"{name} imported")
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_scan_without_optional_packages_equals_the_full_install(tmp_path):
    """detectors, sinks (the kernel's column sums, on the torch twin) and flow (max flow as plain Python instead of
    numba) on tiny-llama: the same table as with every package present."""
    blocked = tmp_path / "blocked"
    done = run_blocked(f"""
        import json, sys
        import headlab
        from headlab.kernels import triton_installed
        model = headlab.load_model("tiny-llama")
        assert not triton_installed()
        from headlab.cli import app
        try:
            app({SCAN + ["--out", str(blocked)]!r})
        except SystemExit as exit:
            assert exit.code in (0, None), exit.code
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in {OPTIONAL!r})
        print(json.dumps(loaded))
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []

    full = tmp_path / "full"
    result = CliRunner().invoke(app, SCAN + ["--out", str(full)])
    assert result.exit_code == 0, result.output
    without, with_all = pd.read_csv(blocked / "heads.csv"), pd.read_csv(full / "heads.csv")
    assert list(without.columns) == list(with_all.columns) and {"detectors", "sinks", "flow"} <= set(without.columns)
    assert without.drop(columns="flow").equals(with_all.drop(columns="flow"))  # the same torch code: bit for bit
    # flow: the same float64 Dinic compiled by numba or interpreted; LLVM may fuse a multiply-add, so not bit for bit
    assert (without["flow"] - with_all["flow"]).abs().max() < 1e-12
    assert with_all["flow"].abs().max() > 0.1  # the comparison is not between two empty columns


def test_a_missing_package_is_one_sentence_naming_its_extra(tmp_path):
    done = run_blocked("""
        import torch, warnings
        import headlab
        from headlab.kernels import KernelInputError, attention_with_stats
        from headlab.engines.ray import import_ray
        q = torch.randn(1, 2, 8, 16)
        try:
            attention_with_stats(q, q, q, backend="triton", strict=True)
        except KernelInputError as error:
            print("kernel:", error)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _ = attention_with_stats(q, q, q, backend="triton")
        print("fallback:", caught[0].message)
        reference, _ = attention_with_stats(q, q, q, backend="torch")
        assert torch.equal(out, reference)
        try:
            import_ray()
        except headlab.PackageMissingError as error:
            print("ray:", error)
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    assert lines["kernel"] == "Triton is not installed (pip install 'headlab[gpu]')"
    assert lines["fallback"] == "Triton is not installed (pip install 'headlab[gpu]'): using the torch twin instead"
    assert lines["ray"] == "the Ray engine needs Ray: pip install 'headlab[ray]'"


@pytest.mark.parametrize("extra", ["gpu", "flow", "ray", "notebooks", "docs"])
def test_every_extra_is_part_of_all(extra):
    import importlib.metadata as md

    requires = md.requires("headlab") or []
    assert any(f"extra == \"{extra}\"" in r for r in requires)
    all_line = next(r for r in requires if 'extra == "all"' in r)
    assert extra in all_line.split(";")[0]

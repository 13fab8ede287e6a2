"""The layout promises of docs/DESIGN.md, checked on the installed package."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import headlab

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(headlab.__file__).parent


def _imported_after(statement: str) -> set[str]:
    """Top-level modules in sys.modules after `statement`, in a fresh interpreter outside the repository."""
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout))


def test_kernels_stand_alone():
    loaded = _imported_after("import headlab.kernels")
    assert not {"transformers", "pandas", "transformer_lens", "headlab.model", "headlab.scores"} & loaded


def test_import_headlab_is_light_until_used():
    loaded = _imported_after("import headlab")
    assert not {"transformers", "pandas", "transformer_lens"} & loaded
    loaded = _imported_after("import headlab; headlab.HeadScores")
    assert "pandas" in loaded and "transformers" not in loaded


def test_imports_point_down():
    """kernels import nothing of headlab; the core imports no probe, engine or face; probes import no face."""
    layers = {"kernels": 0, "core": 1, "probes": 2, "uses": 3, "engines": 3, "faces": 4}
    faces = {"headlab.cli", "headlab.report", "headlab.atlas", "headlab.diff", "headlab.viewer", "headlab.report_html",
             "headlab.__main__"}
    uses = {"headlab.kv"}
    engines = {"headlab.engines.ray"}  # the scheduler and the local engine are part of the core contract

    def layer_of(module: str) -> str:
        if module.startswith("headlab.kernels"):
            return "kernels"
        if module.startswith("headlab.probes"):
            return "probes"
        if any(module == m or module.startswith(m + ".") for m in faces):
            return "faces"
        if any(module == m or module.startswith(m + ".") for m in uses):
            return "uses"
        if any(module == m or module.startswith(m + ".") for m in engines):
            return "engines"
        return "core"

    offenders = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve against the package
                base = module.split(".")[: len(module.split(".")) - node.level + (parts[-1] == "__init__")]
                targets = [".".join(base + ([node.module] if node.module else []))]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("headlab") and layers[layer_of(target)] > layers[layer_of(module)]:
                    offenders.append(f"{module} imports {target}")
    assert not offenders, offenders


def test_datasets_is_data_only():
    assert not (ROOT / "datasets" / "__init__.py").exists()
    assert not list((ROOT / "datasets").glob("*.py"))


def test_probes_and_kernels_live_inside_headlab():
    import headlab.kernels
    import headlab.probes.detectors

    assert Path(headlab.probes.detectors.__file__).parent.name == "probes"
    assert "probes" not in sys.modules and "kernels" not in sys.modules  # nothing of ours is top-level
    hf_datasets = sys.modules.get("datasets")  # Hugging Face datasets, imported by TransformerLens
    assert hf_datasets is None or Path(hf_datasets.__file__).resolve().parent != ROOT / "datasets"


def test_the_repository_root_shadows_nothing():
    """From the root (on sys.path), transformers probes a top-level `kernels` and TransformerLens imports Hugging Face
    `datasets`: our folders must not break either (kernels/ imports as a package of its own, datasets/ is no package)."""
    code = ("import transformer_lens, transformers.utils.import_utils as u, kernels, datasets; "
            "assert not u.is_kernels_available(); assert hasattr(datasets, 'load_dataset'); "
            "assert kernels.attention_with_stats")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_unsafe_loading_in_the_package():
    sources = [p.read_text() for p in PACKAGE.rglob("*.py")]
    assert not any("torch.load(" in s or "pickle.load" in s for s in sources)

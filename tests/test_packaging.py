"""The layout promises of DESIGN.md, checked on the installed package."""

import subprocess
import sys
from pathlib import Path

import headlab

ROOT = Path(__file__).resolve().parent.parent


def test_datasets_is_data_only():
    assert not (ROOT / "datasets" / "__init__.py").exists()


def test_probes_and_kernels_live_inside_headlab():
    import headlab.kernels
    import headlab.probes.detectors

    assert Path(headlab.probes.detectors.__file__).parent.name == "probes"
    assert "probes" not in sys.modules and "kernels" not in sys.modules  # nothing of ours is top-level
    hf_datasets = sys.modules.get("datasets")  # Hugging Face datasets, imported by TransformerLens
    assert hf_datasets is None or Path(hf_datasets.__file__).resolve().parent != ROOT / "datasets"


def test_transformer_lens_imports_from_the_repository_root():
    done = subprocess.run([sys.executable, "-c", "import transformer_lens, headlab.probes.detectors"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_unsafe_loading_in_the_package():
    package = Path(headlab.__file__).parent
    sources = [p.read_text() for p in package.rglob("*.py")]
    assert not any("torch.load(" in s or "pickle.load" in s for s in sources)

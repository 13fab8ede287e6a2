"""headlab: find and explain what individual attention heads do.

    >>> import headlab
    >>> model = headlab.load_model("smollm2-135m")
    >>> from headlab.probes import detectors
    >>> detectors.scan(model).top(5)
"""

from pathlib import Path as _Path

# In a source checkout probes/ and kernels/ sit beside headlab/ (installed, they live inside it):
# let `headlab.probes` and `headlab.kernels` resolve there too, e.g. for a notebook started at the root.
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "probes").exists() and (_root / "probes" / "__init__.py").exists():
    __path__.append(str(_root))  # noqa: F821 - the package's own __path__

from headlab.errors import (  # noqa: E402
    CacheCorruptError,
    HeadIndexError,
    HeadlabError,
    InputError,
    ModelPackageMissingError,
    UnknownModelError,
)
from headlab.model import Head, HeadModel, load_model, models  # noqa: E402
from headlab.scores import HeadScores, head_name, parse_head  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CacheCorruptError", "Head", "HeadIndexError", "HeadModel", "HeadScores", "HeadlabError", "InputError",
    "ModelPackageMissingError", "UnknownModelError", "head_name", "load_model", "models", "parse_head",
]

"""headlab: find and explain what individual attention heads do.

    >>> import headlab
    >>> model = headlab.load_model("smollm2-135m")
    >>> from headlab.probes import detectors
    >>> detectors.scan(model).top(5)

The names below load on first use (PEP 562): `import headlab` and `import headlab.kernels` stay light, and the
layers underneath (kernels, then the core) never import the ones above them.
"""

from importlib import import_module

try:
    import headlab.kernels  # noqa: F401 - the bottom layer; in a source checkout only an install maps it here
except ModuleNotFoundError as error:
    if error.name != "headlab.kernels":
        raise
    raise ImportError("headlab is being imported from its source folder, where kernels/ and probes/ are not yet "
                      "inside the package: install it (`make install`, or `make dev` for an editable install) and "
                      "run Python from outside the repository root or with the editable install") from None

from headlab.errors import (  # noqa: E402
    CacheCorruptError,
    HeadIndexError,
    HeadlabError,
    HubUnreachableError,
    InputError,
    ModelPackageMissingError,
    NoSignalError,
    PackageMissingError,
    UnknownModelError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

_LAZY = {
    "Head": "headlab.heads", "head_name": "headlab.heads", "parse_head": "headlab.heads",
    "HeadModel": "headlab.model", "load_model": "headlab.loading", "models": "headlab.loading",
    "HeadScores": "headlab.scores", "show_attention": "headlab.viewer", "scan": "headlab.cli:scan_model",
}

__all__ = [
    "CacheCorruptError", "Head", "HeadIndexError", "HeadModel", "HeadScores", "HeadlabError", "HubUnreachableError",
    "InputError", "ModelPackageMissingError", "NoSignalError", "PackageMissingError", "UnknownModelError",
    "UnsupportedModelError", "head_name", "load_model", "models", "parse_head", "scan", "show_attention",
]


def __getattr__(name: str):
    if name in _LAZY:
        module, _, attribute = _LAZY[name].partition(":")  # "module:attribute" where the names differ
        value = getattr(import_module(module), attribute or name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'headlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

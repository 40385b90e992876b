"""What the user got wrong, as exception types: the ``nested`` commands print these as one line and exit 2.

Raise one of these where the user's input is wrong: a config value, an option, a file, an adapter, the
Hub. Everything else is a bug, and the commands let it raise with its traceback. Each type also derives from
a built-in exception (``ValueError``, ``FileNotFoundError``, ``FileExistsError``, ``OSError``), so code that
catches those still catches these.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "ConfigError",
    "DataError",
    "DivergenceError",
    "HubError",
    "MissingDependencyError",
    "MissingFileError",
    "NestedUserError",
    "OutputExistsError",
    "StorageError",
    "UsageError",
]


class NestedUserError(Exception):
    """A mistake in what the user gave; its message says what was wrong and how to fix it."""


class ConfigError(NestedUserError, ValueError):
    """A configuration value, a model path or an API argument that cannot work."""


class UsageError(ConfigError):
    """A mistake in a command line, found before any model is loaded."""


class DataError(NestedUserError, ValueError):
    """Input data that cannot be used: an unreadable image, a broken shard or index, a bad manifest."""


class DivergenceError(NestedUserError, RuntimeError):
    """A training run whose gradients stayed NaN or infinite: its settings (learning rate, precision) need a
    change."""


class AdapterError(NestedUserError, ValueError):
    """An adapter or checkpoint that cannot be loaded, or does not fit the model it is used with."""


class MissingFileError(NestedUserError, FileNotFoundError):
    """A file or folder the user named does not exist, or lacks what it must contain."""


class MissingDependencyError(NestedUserError, ImportError):
    """A feature needs an optional extra that is not installed; the message names the ``pip install``."""


class HubError(NestedUserError, OSError):
    """The Hugging Face Hub (or the endpoint in ``HF_ENDPOINT``) refused or could not be reached."""


class OutputExistsError(NestedUserError, FileExistsError):
    """An output folder already holds results that a command would replace without being asked to."""


class StorageError(NestedUserError, OSError):
    """The file system refused a write: no space left, a quota exceeded, or read-only."""

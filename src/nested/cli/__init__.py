"""The ``nested`` command line: one module per subcommand, shared helpers in :mod:`nested.cli.common`."""

from nested.cli.main import main

__all__ = ["main"]

"""What every ``nested`` command shares: parsing TOKEN=VALUE options, quiet libraries, one-line user errors."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
from pathlib import Path
from typing import Any

from nested.errors import NestedUserError, UsageError

__all__ = [
    "DTYPES",
    "add_runtime_arguments",
    "add_base_arguments",
    "one_line",
    "pairs",
    "quiet_libraries",
    "report_user_errors",
    "run_user_command",
    "sha256",
]


def pairs(values: list[str], option: str, convert=str) -> dict[str, Any]:
    """``["<person>=a.jpg", ...]`` -> ``{"<person>": "a.jpg"}``; each token at most once."""
    result: dict[str, Any] = {}
    for value in values:
        token, sep, rest = value.partition("=")
        if not sep or not token or not rest:
            raise UsageError(f"{option} expects TOKEN=VALUE (e.g. {option} '<person>=...'), got {value!r}.")
        if token in result:
            raise UsageError(f"{option} is given twice for {token!r}.")
        try:
            result[token] = convert(rest)
        except ValueError:
            raise UsageError(f"{option} {value!r}: {rest!r} is not a number.") from None
    return result


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def add_base_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "models" group with ``--base`` and ``--revision``, shared by ``nested generate`` and ``nested eval``."""
    models = parser.add_argument_group("models")
    models.add_argument("--base", required=True, help="base SD / SDXL diffusers folder or hub id")
    models.add_argument("--revision", default=None, help="hub revision of the base model")
    return models


DTYPES = ("float32", "float16", "bfloat16")


def add_runtime_arguments(group: argparse._ArgumentGroup) -> None:
    """``--device``, ``--dtype``, ``--no-progress`` and ``--verbose``, shared by ``generate`` and ``eval``."""
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps... (default cpu)")
    group.add_argument("--dtype", default="float32", choices=DTYPES)
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--verbose", action="store_true", help="show the libraries' loading bars and warnings")


def run_user_command(prog: str, verbose: bool, run):
    """``run()`` with the libraries quiet (unless ``verbose``); a user error becomes one stderr line.

    Returns ``run()``'s result, or None after printing ``<prog>: error: ...`` (the caller exits 2).
    """
    try:
        with quiet_libraries(verbose):
            return run()
    except NestedUserError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return None


@contextlib.contextmanager
def quiet_libraries(verbose: bool):
    """Hide diffusers' / transformers' loading bars and warnings, so the output is our progress bar and errors."""
    # Here, not at the top: the dispatcher imports this module for every command, `--help` included.
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    if verbose:
        yield
        return
    saved = [
        (lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
        for lib in (diffusers_logging, transformers_logging)
    ]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


@contextlib.contextmanager
def report_user_errors(prog: str):
    """Inside, a :class:`~nested.errors.NestedUserError` ends the command: one line on stderr, exit code 2.
    Any other exception is a bug and keeps its traceback."""
    try:
        yield
    except NestedUserError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None

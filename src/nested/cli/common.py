"""What every ``nested`` command shares: parsing TOKEN=VALUE options, quiet libraries, one-line user errors."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from nested.errors import MissingFileError, NestedUserError, OutputExistsError, UsageError

__all__ = [
    "DTYPES",
    "CommandParser",
    "TORCH_SEEDS",
    "add_runtime_arguments",
    "add_base_arguments",
    "check_creatable_folder",
    "check_output_folder",
    "checked_device",
    "finite",
    "one_line",
    "pairs",
    "parse_number",
    "quiet_libraries",
    "read_text_option",
    "report_user_errors",
    "run_user_command",
]


class CommandParser(argparse.ArgumentParser):
    """argparse's parser, whose command-line mistakes end in one line and exit code 2: the error and where the
    options are listed, without the usage block argparse prints before them."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def finite(value: float, option: str) -> float:
    """``value`` if it is a finite number; NaN or infinity (which silently give black images) is a
    UsageError naming ``option``."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{option}: {value} is not a finite number.")
    return value


def parse_number(text: str, option: str, convert: Callable[[str], Any] = float) -> Any:
    """``text`` as a finite number (``convert``: ``float`` or ``int``), else a UsageError naming ``option``.
    Every number a command reads from its command line goes through here or :func:`finite`."""
    try:
        value = convert(text.strip())
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a number.") from None
    return finite(value, option)


def pairs(
    values: list[str],
    option: str,
    convert: Callable[[str], Any] = str,
    form: str = "TOKEN=VALUE",
    example: str = "'<person>=...'",
) -> dict[str, Any]:
    """``["<person>=a.jpg", ...]`` -> ``{"<person>": "a.jpg"}``; each token at most once.

    ``convert``: ``str`` keeps the text; ``float`` or ``int`` read a finite number (:func:`parse_number`).
    ``form`` and ``example`` describe a well-formed value in the error message.
    """
    result: dict[str, Any] = {}
    for value in values:
        token, sep, rest = value.partition("=")
        if not sep or not token or not rest:
            raise UsageError(f"{option} expects {form} (e.g. {option} {example}), got {value!r}.")
        if token in result:
            raise UsageError(f"{option} is given twice for {token!r}.")
        result[token] = rest if convert is str else parse_number(rest, f"{option} {value!r}", convert)
    return result


# The seeds torch.Generator.manual_seed takes.
TORCH_SEEDS = range(-(2**63), 2**64)


def check_creatable_folder(path: Path, option: str) -> None:
    """Refuse, in one line and before any work, a folder ``path`` that cannot be created: the nearest existing
    folder above it is a file, or this user may not write in it."""
    ancestor = Path(os.path.abspath(path.expanduser()))
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{option} {str(path)!r} cannot be created: {ancestor} is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {str(path)!r} cannot be created: this user may not write in {ancestor}.")


def check_output_folder(out: Path, *, overwrite: bool, ours: Callable[[Path], bool], prog: str) -> None:
    """Refuse to mix two runs in one output folder, before any work is done.

    ``out`` may be missing or empty. With ``overwrite`` it may also hold an earlier run, but only files
    that ``ours(path relative to out)`` recognises as ``prog``'s outputs: the new run replaces the folder
    as a whole (:func:`nested.files.staged_directory`), so anything else in it would be deleted.

    Raises:
        OutputExistsError: ``out`` is a file, holds files without ``overwrite``, or holds a file that is not
            one of ``prog``'s outputs.
    """
    given, out = (
        out,
        out.expanduser().resolve(),
    )  # the folder staged_directory replaces: a/missing/../b is a/b
    if not out.exists():
        check_creatable_folder(out, "--out")
        return
    if not out.is_dir():
        raise OutputExistsError(f"--out {str(given)!r} is a file; choose a folder.")
    if out in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise OutputExistsError(
            f"--out {str(given)!r} holds the current directory; choose a folder of its own, e.g. --out outputs/run1."
        )
    files = sorted(path.relative_to(out) for path in out.rglob("*") if not path.is_dir())
    if not files:
        return
    if not overwrite:
        more = f" and {len(files) - 1} more files" if len(files) > 1 else ""
        raise OutputExistsError(
            f"--out {str(given)!r} is not empty (it holds {str(files[0])!r}{more}) and {prog} does not mix two runs "
            f"in one folder: choose another --out, or pass --overwrite to replace an earlier {prog} run."
        )
    foreign = [path for path in files if not ours(path)]
    if foreign:
        raise OutputExistsError(
            f"--out {str(given)!r} holds {str(foreign[0])!r}, which {prog} did not write; --overwrite replaces only "
            f"a folder of {prog}'s own outputs: move that file away or choose another --out."
        )


def one_line(error: BaseException) -> str:
    """The error's message on one line. One that a DataLoader worker raised comes back from torch with the
    worker's traceback in its message: only the worker's own message is kept, and where it was raised."""
    text = str(error)
    caught, _, worker_traceback = text.partition("\nOriginal Traceback (most recent call last):\n")
    if caught.startswith("Caught ") and worker_traceback:
        name = type(error).__qualname__
        prefixes = (f"{type(error).__module__}.{name}: ", f"{name}: ")
        lines = worker_traceback.splitlines()
        # The last such line: a chained exception's earlier ones belong to the exceptions it was raised from.
        start = next((i for i in reversed(range(len(lines))) if lines[i].startswith(prefixes)), None)
        if start is not None:
            message = "\n".join(lines[start:])
            for prefix in prefixes:
                message = message.removeprefix(prefix)
            where = caught.removeprefix(f"Caught {name} ").rstrip(".")
            text = f"{message} ({where})"
    return " ".join(text.split()) or type(error).__name__


def add_base_arguments(
    parser: argparse.ArgumentParser, kinds: str = "SD / SDXL / SD3 / SD3.5 / FLUX.1"
) -> argparse._ArgumentGroup:
    """The "models" group with ``--base`` (a model of ``kinds``) and ``--revision``, shared by ``nested
    generate`` and ``nested eval``."""
    models = parser.add_argument_group("models")
    models.add_argument("--base", required=True, help=f"base {kinds} diffusers folder or hub id")
    models.add_argument("--revision", default=None, help="hub revision of the base model")
    return models


def add_quantize_argument(group: argparse._ArgumentGroup) -> None:
    """``--quantize COMPONENT=FORMAT``, shared by ``generate`` and ``eval`` (read by :func:`quantize_option`)."""
    group.add_argument(
        "--quantize",
        action="append",
        default=[],
        metavar="COMPONENT=FORMAT",
        help="store a base component's linear weights in 8 bits as it loads (torchao; the quantize extra): "
        "int8 or float8, e.g. --quantize transformer=int8 --quantize text_encoder_2=int8 (FLUX.1-dev's "
        "transformer and T5 in 15.7 GiB instead of 31); repeatable",
    )


def quantize_option(values: list[str]) -> dict[str, str]:
    """``--quantize``'s values as ``{component: format}``, the formats checked (not yet the components: they
    need the base's ``model_index.json``)."""
    from nested.quantize import check_quantize  # here: the dispatcher imports this module for every command

    return check_quantize(
        pairs(values, "--quantize", form="COMPONENT=FORMAT", example="transformer=int8"), "--quantize"
    )


DTYPES = ("float32", "float16", "bfloat16")


def add_runtime_arguments(group: argparse._ArgumentGroup) -> None:
    """``--device``, ``--dtype``, ``--no-progress`` and ``--verbose``, shared by ``generate`` and ``eval``."""
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps... (default cpu)")
    group.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="the models' dtype (default float32)"
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--verbose", action="store_true", help="show the libraries' loading bars and warnings")


def read_text_option(path: Path, option: str, expected: str = "a text file") -> str:
    """The text of the file an option names (UTF-8, a byte-order mark dropped); one that is missing, a folder,
    unreadable or not UTF-8 is refused in one line that ends with what to give instead, ``expected``."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as error:
        raise MissingFileError(f"{option} {path}: no such file; give {expected}") from error
    except IsADirectoryError as error:
        raise UsageError(f"{option} {path} is a folder; give {expected}") from error
    except PermissionError as error:
        raise UsageError(f"{option} {path} cannot be read ({error.strerror}); give {expected}") from error
    except UnicodeDecodeError as error:
        raise UsageError(f"{option} {path} is not UTF-8 text: {error}; give {expected}") from error


def checked_device(name: str | None, fix: str = "use --device cpu") -> Any:
    """``--device`` as a ``torch.device`` (None: cuda if available, else cpu), refused in one line if torch does
    not know it or this machine lacks it; ``fix`` says what to do instead."""
    import torch  # kept out of the commands' --help

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(
            f"--device {name}: not a device torch knows ({error}); e.g. cuda, cuda:1 or cpu"
        ) from error
    count = {"cuda": torch.cuda.device_count, "mps": lambda: int(torch.backends.mps.is_available())}.get(
        device.type
    )
    if count is not None and count() == 0:
        raise UsageError(f"--device {name}: this machine has no {device.type.upper()} device; {fix}")
    if count is not None and (device.index or 0) >= count():
        raise UsageError(
            f"--device {name}: this machine has {count()} {device.type.upper()} device(s); {fix}"
        )
    return device


def run_user_command(prog: str, verbose: bool, run):
    """``run()`` with the libraries quiet and each warning one ``<prog>: warning: ...`` line (unless
    ``verbose``); a user error becomes one stderr line. Ctrl-C, SIGTERM and SIGHUP unwind ``run()`` (its
    staged output is removed), print one line and exit with 128 + the signal's number.

    Returns ``run()``'s result, or None after printing ``<prog>: error: ...`` (the caller exits 2).
    """
    try:
        with quiet_libraries(verbose), warnings.catch_warnings(), stop_signals_raise():
            if not verbose:
                warnings.showwarning = lambda message, *_, **__: print(
                    f"{prog}: warning: {one_line(message)}", file=sys.stderr
                )
            return run()
    except NestedUserError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return None
    except (KeyboardInterrupt, Stopped) as stop:
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        print(
            f"{prog}: interrupted ({signal.Signals(signum).name}); what it was writing replaced nothing",
            file=sys.stderr,
        )
        raise SystemExit(128 + signum) from None


class Stopped(BaseException):
    """SIGTERM or SIGHUP during a command (a BaseException, like KeyboardInterrupt for Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_raise():
    """Inside, SIGTERM and SIGHUP raise :class:`Stopped` as Ctrl-C raises KeyboardInterrupt, so the command
    unwinds and removes its staging folder instead of dying with it on disk."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    # An ignored signal stays ignored (nohup ignores SIGHUP).
    signums = [s for s in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, stop) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


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

"""Writing files so that nothing is lost and everyone who should can read them.

Every file and folder the framework publishes (adapters, shards and their index, images, reports)
is written through these helpers:

- **atomic**: the content goes to a hidden sibling first (same file system, so ``os.replace`` is
  atomic), is flushed and fsynced, then renamed over the target. A process killed at any moment
  leaves the old version or the new one, never a mix, and at worst a hidden leftover;
- **replaced last**: an existing folder (or the files a command owns in a shared folder) is renamed
  aside only once its replacement is complete and deleted only after the new one is in place;
- **shared like any other file**: ``tempfile.mkstemp``/``mkdtemp`` create private modes (0600/0700);
  the helpers give the result the modes the user's umask gives a plain ``open`` (0644/0755 under
  umask 022), so a teammate on a shared cluster can read an export as they can read a checkpoint;
- **refused in one line**: a write the file system refuses (no space left, a quota exceeded, read-only)
  is a :class:`~nested.errors.StorageError` that names the file and the fix (:func:`storage_refusals_named`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from nested.errors import StorageError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (reading it means setting it: done under a lock and restored at once)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def public_modes(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the modes a plain ``open`` or
    ``mkdir`` would have given it under the current umask."""
    mask = current_umask()
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# The errors by which a file system refuses a write: what happened, and what to do.
_REFUSALS = {
    errno.ENOSPC: ("no space left on the device", "free space there"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space under the quota"),
    errno.EROFS: ("the file system is read-only", "make it writable, or write elsewhere"),
}


def storage_refusal(error: BaseException) -> int | None:
    """The errno of :data:`_REFUSALS` by which ``error`` or one of its explicit causes (``raise ... from``) says
    a write was refused, else None. safetensors names it only in its message, as Rust's ``... (os error 28)``.

    An error raised while another was handled (``__context__``) is not followed: a bug met while handling a
    full disk elsewhere stays a bug.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _REFUSALS:
            return error.errno
        rust_error = re.search(r"\(os error (\d+)\)", str(error))
        if rust_error and int(rust_error.group(1)) in _REFUSALS:
            return int(rust_error.group(1))
        error = error.__cause__
    return None


@contextlib.contextmanager
def storage_refusals_named(path: str | os.PathLike) -> Iterator[None]:
    """Inside, a write the file system refuses is raised as a :class:`~nested.errors.StorageError` naming
    ``path``; the caller keeps the old file until the new one is complete, which the message says. Put only
    the writes of ``path`` inside: a refusal on another file system would be blamed on it."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        code = storage_refusal(error)
        if code is None:
            raise
        what, fix = _REFUSALS[code]
        raise StorageError(
            f"{what} writing {path}: {fix}, then run the same command again (the files written before are intact)"
        ) from error


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a hidden sibling of ``path`` for writing; on a clean exit it replaces ``path``.

    On an exception the sibling is removed and ``path`` is untouched.
    """
    path = Path(path)
    with storage_refusals_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            encoding = None if "b" in mode else "utf-8"
            with os.fdopen(fd, mode, encoding=encoding) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            public_modes(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: object) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (see :func:`atomic_file`).

    Strict JSON: NaN or infinity is a ValueError here (``json.dumps`` would write a bare ``NaN``, which
    other JSON readers refuse), so replace such values (e.g. with None) first. Values JSON has no type
    for (paths, dtypes) are written as their ``str``.
    """
    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")


def replace_directory(staging: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Move the complete folder ``staging`` to ``directory``, replacing an existing one.

    Where the system can swap two names in one step (Linux's ``renameat2`` with ``RENAME_EXCHANGE``, on
    local file systems), ``directory`` never stops existing: the old folder ends up at ``staging`` and
    is deleted. Elsewhere the old folder is renamed aside first, put back if the new one cannot be moved
    in, and deleted only after the new one is in place: a crash between the two renames leaves the old
    folder in a hidden ``.old`` folder beside the name.
    """
    staging, directory = Path(staging), Path(directory)
    if directory.exists() and _exchange(staging, directory):
        fsync_dir(directory.parent)
        shutil.rmtree(staging, ignore_errors=True)  # the old folder, now
        return
    old = _moved_aside(directory) if directory.exists() else None
    try:
        os.replace(staging, directory)
    except BaseException:
        if old is not None:
            os.replace(old / directory.name, directory)
            shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(first: Path, second: Path) -> bool:
    """Swap the two names in one step; False where the system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library before glibc 2.28
        return False
    at_cwd = -100  # AT_FDCWD: the paths as given
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def remove_directory(directory: str | os.PathLike) -> None:
    """Delete the folder ``directory`` so that it disappears from its name at once: it is renamed to a hidden
    ``.old`` sibling, which is then removed (a crash leaves that hidden folder, never a half-deleted one)."""
    old = _moved_aside(Path(directory))
    fsync_dir(Path(directory).parent)
    shutil.rmtree(old, ignore_errors=True)


def _moved_aside(directory: Path) -> Path:
    """Rename ``directory`` into a new hidden folder beside it; returns that folder."""
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    os.replace(directory, old / directory.name)
    return old


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden sibling folder to fill; on a clean exit it replaces ``directory``
    (:func:`replace_directory`) with umask modes (:func:`public_modes`). On an exception it is
    removed and ``directory`` is untouched.

    ``directory`` is resolved first: ``a/missing/../out`` is ``a/out``, as the system reads it once
    ``a/missing`` exists (which it then need not), and a link to a folder replaces the folder it names.
    """
    directory = Path(directory).expanduser().resolve()
    with storage_refusals_named(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield staging  # the caller names its own writes (storage_refusals_named): its work may write elsewhere
        with storage_refusals_named(directory):
            for path in staging.rglob("*"):
                if path.is_file():
                    with open(path, "rb+") as handle:
                        os.fsync(handle.fileno())
            public_modes(staging)
            replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[list[int]]:
    """Inside, SIGINT, SIGTERM and SIGHUP are recorded instead of acted on; on exit the previous
    handlers come back and the recorded signals are delivered to them. For work that a signal must
    not cut at an arbitrary bytecode: a few renames that must all happen or none, or a worker pool
    whose locks an exception raised inside them would leave held. Yields the list of recorded
    signals, so a loop can check it and stop at a safe point. A signal ignored on entry stays
    ignored. Only the main thread can install handlers; elsewhere this does nothing."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            # None: a handler installed outside Python; the default is the closest we can restore.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def staging_folder(directory: str | os.PathLike, prefix: str) -> Path:
    """Create ``directory`` if needed and a new hidden folder ``directory/.<prefix>.staging-*`` in it
    (same file system: its files can be renamed into ``directory``, see :func:`swap_files`). The
    caller removes it when done."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{prefix}.staging-", dir=directory))


def swap_files(directory: str | os.PathLike, new: list[Path], old: list[Path]) -> None:
    """Put the complete files ``new`` (in a :func:`staging_folder` of ``directory``) into
    ``directory`` under their names, in place of the files ``old`` (which need not have
    counterparts in ``new``). Other files in ``directory`` are left alone.

    The new files are flushed to disk first; then the old ones are renamed into a hidden
    ``.old-*`` folder (in the order given), the new ones renamed in (in the order given: the one
    that makes the set valid, such as an index, goes last) and only then the old ones deleted.
    Stop signals wait for the renames (:func:`stop_signals_deferred`); a hard crash in between
    leaves the old files in the hidden folder, never deleted.
    """
    directory = Path(directory)
    for path in new:
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    with stop_signals_deferred():
        aside = Path(tempfile.mkdtemp(prefix=".old-", dir=directory))
        for path in old:
            if path.exists():
                os.replace(path, aside / path.name)
        for path in new:
            os.replace(path, directory / path.name)
        fsync_dir(directory)
        shutil.rmtree(aside, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB pieces (a shard or a checkpoint may not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

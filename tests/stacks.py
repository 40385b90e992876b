"""The Python stacks of a hung multi-process test, for its failure message: the processes it starts dump
every thread's stack on :data:`STACK_DUMP_SIGNAL` (``faulthandler``, inherited by forked DataLoader workers)
into their logs, and :func:`dump_stacks` sends it to them and to their descendants."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

STACK_DUMP_SIGNAL = signal.SIGUSR2


def enable_stack_dumps(folder: Path) -> None:
    """Python processes with ``folder`` on their PYTHONPATH dump their stacks on the signal (``sitecustomize``
    runs at their start)."""
    (folder / "sitecustomize.py").write_text(
        f"import faulthandler\nfaulthandler.register({int(STACK_DUMP_SIGNAL)}, all_threads=True)\n"
    )


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``; just ``pid`` elsewhere)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            children += [int(child) for child in task.read_text().split()]
    return [pid] + [p for child in children for p in process_tree(child)]


def dump_stacks(pids: list[int], wait: float = 3.0) -> None:
    """Ask ``pids`` and their descendants for their stacks, and give them ``wait`` seconds to write them."""
    for each in [p for pid in pids for p in process_tree(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, STACK_DUMP_SIGNAL)
    time.sleep(wait)

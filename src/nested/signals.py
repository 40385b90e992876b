"""Stop signals: SIGUSR1, SIGTERM and SIGINT ask a long command to stop cleanly; a second one ends it at once.

``nested fit`` installs :func:`install_signal_flags` for its whole run. The first stop signal only sets a
flag (:func:`received_signals`) and says so on stderr: training acts on it at the next step boundary
(``nested.training.resume.PreemptionCheckpoint``: checkpoint, SLURM requeue, stop), and anything that waits
(uploads at the end of fit) can cut its wait short. A second stop signal while one is pending ends the
process at once by that signal's default action: the shell sees 130 for SIGINT, 143 for SIGTERM, so nothing
can keep a user or SLURM waiting past their grace period. Files written through :mod:`nested.files` and
checkpoints are atomic: what was complete stays complete.
"""

from __future__ import annotations

import os
import signal
from typing import Any

__all__ = [
    "STOP_SIGNALS",
    "clear_signals",
    "install_signal_flags",
    "received_signals",
    "restore_signal_handlers",
]

STOP_SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")
# The stop signals received since the last clear_signals(), in order.
_RECEIVED: list[int] = []


def _set_flag(signum: int, frame: Any) -> None:
    """The stop signals' handler: the first one only sets a flag (a handler runs between two bytecodes of
    anything: no I/O beyond one write to stderr, no collective); a second one ends the process at once."""
    name = signal.Signals(signum).name
    if _RECEIVED:
        os.write(2, f"\nnested: {name} while stopping: exiting at once.\n".encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # the signal's default action: the shell sees 128 + its number
        return
    _RECEIVED.append(signum)
    os.write(
        2,
        f"\nnested: {name} received: stopping at the end of the current step, with a checkpoint "
        "(send a stop signal again to exit at once).\n".encode(),
    )


def install_signal_flags(names: tuple[str, ...] = STOP_SIGNALS) -> dict[int, Any]:
    """Make the named signals set a flag (see :func:`received_signals`) instead of their default.

    Called by ``nested fit`` at start (so that a SIGUSR1 during model loading does not kill the
    process) and by ``PreemptionCheckpoint`` when training starts (over Lightning's handlers).
    Only possible in the main thread; elsewhere this does nothing. Returns the previous handlers
    (for :func:`restore_signal_handlers`).
    """
    previous: dict[int, Any] = {}
    for name in names:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            previous[signum] = signal.signal(signum, _set_flag)
        except ValueError:  # not the main thread
            break
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install_signal_flags` replaced."""
    for signum, handler in previous.items():
        if handler is not None:
            signal.signal(signum, handler)


def received_signals() -> set[int]:
    """The stop signals received so far by this process (cleared by :func:`clear_signals`); while there
    is one, a further stop signal ends the process at once."""
    return set(_RECEIVED)


def clear_signals() -> None:
    """Forget the stop signals received (a new fit starts): the next one is a first one again."""
    _RECEIVED.clear()

"""Worker processes that run one function over a list of jobs and give the results back in job order.

``multiprocessing.Pool`` replaces a worker the kernel kills (the out-of-memory killer, on a very large
image) but never runs its job again, so its ``imap`` waits forever; its workers also share a task queue
and its lock, which a worker killed at the wrong instant holds for good, and the pool's shutdown then
waits on it. Here each worker has a pipe of its own and holds one job at a time: nothing is shared, a
worker's end is seen at once (its process sentinel), and the job it held is named in
:class:`WorkerDied`.
"""

from __future__ import annotations

import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from typing import Any

__all__ = ["OrderedWorkerPool", "WorkerDied", "WorkerTraceback"]


class WorkerDied(Exception):
    """A worker process ended while it held a job: ``job_index`` is that job's index, ``exitcode`` the
    process's (negative: the signal that ended it)."""

    def __init__(self, job_index: int, exitcode: int | None) -> None:
        self.job_index, self.exitcode = job_index, exitcode
        super().__init__(f"a worker process ended ({self.cause}) while it ran job {job_index}")

    @property
    def cause(self) -> str:
        if self.exitcode is not None and self.exitcode < 0:
            return f"killed by {signal.Signals(-self.exitcode).name}"
        return f"exit code {self.exitcode}"


class WorkerTraceback(Exception):
    """The traceback of an exception raised in a worker, as text: the ``__cause__`` of that exception
    when it is raised again in the main process (an exception's pickle leaves its cause behind)."""

    def __str__(self) -> str:
        return f"\n\n{self.args[0]}"


class OrderedWorkerPool:
    """``workers`` processes from ``context``, each started with ``initializer(*initargs)``, then
    running ``function`` on the jobs :meth:`map` sends them.

    Use it as a context manager: on exit, idle workers end as their pipe closes, and any still busy
    are terminated. ``function`` and ``initializer`` must be importable module-level functions.
    """

    def __init__(
        self,
        context: BaseContext,
        workers: int,
        function: Callable[[Any], Any],
        initializer: Callable[..., None],
        initargs: tuple[Any, ...] = (),
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self._context = context
        self._target_args = (function, initializer, initargs)
        self._processes: list[Any] = [None] * workers
        self._connections: list[Connection | None] = [None] * workers
        for slot in range(workers):
            self._start(slot)

    def _start(self, slot: int) -> None:
        mine, theirs = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(theirs, *self._target_args), daemon=True)
        process.start()
        theirs.close()  # only the worker holds its end: its death is an end of file here
        self._processes[slot], self._connections[slot] = process, mine

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def map(self, jobs: Sequence[Any], stops: Sequence[int] = ()) -> Iterator[Any]:
        """``function(job)`` for each job, in order. At most twice as many results as there are workers
        wait in memory for an earlier one. An exception a job raised is raised here, with the worker's
        traceback as its cause. A nonempty ``stops`` (signals recorded by the caller) raises
        KeyboardInterrupt within 0.1 s."""
        held: list[int | None] = [None] * len(self._processes)  # the job each worker runs
        finished: dict[int, tuple[bool, Any]] = {}
        next_job = next_result = 0
        while next_result < len(jobs):
            if next_result in finished:
                ok, value = finished.pop(next_result)
                next_result += 1
                if not ok:
                    raise value
                yield value
                continue
            for slot, job in enumerate(held):
                if job is None and next_job < min(len(jobs), next_result + 2 * len(held)):
                    try:
                        self._connections[slot].send((next_job, jobs[next_job]))
                    except (BrokenPipeError, ConnectionResetError):
                        self._restart(slot)  # it ended while idle; the job goes to a worker next round
                        continue
                    held[slot], next_job = next_job, next_job + 1
            if stops:
                raise KeyboardInterrupt(f"stopped by {signal.Signals(stops[0]).name}")
            sentinels = {process.sentinel: slot for slot, process in enumerate(self._processes)}
            connections = {id(connection): slot for slot, connection in enumerate(self._connections)}
            for ready in wait([*self._connections, *sentinels], timeout=0.1):
                slot = sentinels[ready] if isinstance(ready, int) else connections[id(ready)]
                connection = self._connections[slot]
                if connection.poll():  # a result, even from a worker that ended right after sending it
                    try:
                        index, ok, value = connection.recv()
                    except (EOFError, OSError):
                        pass  # it died while sending: its sentinel tells
                    else:
                        if not ok:
                            exception, text = value
                            exception.__cause__ = WorkerTraceback(text)
                            value = exception
                        finished[index] = (ok, value)
                        held[slot] = None
                        continue
                process = self._processes[slot]
                process.join(timeout=1.0 if isinstance(ready, int) else 0.0)
                if process.exitcode is None:
                    continue  # its pipe is still open and it runs on
                if held[slot] is not None:
                    raise WorkerDied(held[slot], process.exitcode)
                self._restart(slot)  # it ended between two jobs: nothing is lost

    def _restart(self, slot: int) -> None:
        self._connections[slot].close()
        self._processes[slot].join()
        self._start(slot)

    def close(self) -> None:
        """End the workers: idle ones see their pipe close and return; busy ones are terminated."""
        for connection in self._connections:
            connection.close()
        deadline = time.monotonic() + 0.5
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.exitcode is None:
                process.terminate()
                process.join(timeout=5.0)
            if process.exitcode is None:
                process.kill()
                process.join()

    def __enter__(self) -> OrderedWorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _serve(
    connection: Connection,
    function: Callable[[Any], Any],
    initializer: Callable[..., None],
    initargs: tuple[Any, ...],
) -> None:
    """A worker's life: jobs from its pipe until the main process closes it."""
    initializer(*initargs)
    while True:
        try:
            index, job = connection.recv()
        except (EOFError, OSError):
            return
        try:
            reply = (index, True, function(job))
        except Exception as exc:  # raised again in the main process, which decides what it means
            reply = (index, False, (exc, traceback.format_exc()))
        try:
            connection.send(reply)
        except (BrokenPipeError, ConnectionResetError):
            return  # the main process is gone
        except Exception as exc:  # the result or exception does not pickle: a bug, told as such
            error = RuntimeError(f"job {index}'s outcome could not be sent back: {exc!r}")
            connection.send((index, False, (error, traceback.format_exc())))

"""Worker processes that run one function over a list of jobs and give the results back in job order.

``multiprocessing.Pool`` replaces a worker the kernel kills (the out-of-memory killer, on a very large
image) but never runs its job again, so its ``imap`` waits forever; its workers also share a task queue
and its lock, which a worker killed at the wrong instant holds for good, and the pool's shutdown then
waits on it. Here each worker has a pipe of its own and holds one job at a time: nothing is shared, and
a worker's end is seen at once (its process sentinel). A worker says when it begins a job, so its death
is told apart: during a job, :class:`WorkerDied` names that job; before one (between two jobs, or with a
job still unread in its pipe), a new worker takes its place and the job is sent again.
"""

from __future__ import annotations

import contextlib
import faulthandler
import pickle
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from typing import Any

__all__ = ["OrderedWorkerPool", "WorkerDied", "WorkerTraceback"]

# The messages a worker sends: (_STARTED, job index) before it runs a job, (_DONE, job index, ok, result or
# (exception, traceback text)) after, and (_FAILED_TO_START, (exception, traceback text)) if its initializer
# raised, after which it ends.
_STARTED, _DONE, _FAILED_TO_START = "started", "done", "failed to start"


class WorkerDied(Exception):
    """A worker process ended while it ran a job: ``job_index`` is that job's index, ``exitcode`` the
    process's (negative: the signal that ended it)."""

    def __init__(self, job_index: int, exitcode: int | None) -> None:
        self.job_index, self.exitcode = job_index, exitcode
        super().__init__(f"a worker process ended ({_exit_cause(exitcode)}) while it ran job {job_index}")

    @property
    def cause(self) -> str:
        return _exit_cause(self.exitcode)


def _exit_cause(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


class WorkerTraceback(Exception):
    """The traceback of an exception raised in a worker, as text: the ``__cause__`` of that exception
    when it is raised again in the main process (an exception's pickle leaves its cause behind)."""

    def __str__(self) -> str:
        return f"\n\n{self.args[0]}"


class OrderedWorkerPool:
    """``workers`` processes from ``context`` (forkserver or spawn), each started with
    ``initializer(*initargs)``, then running ``function`` on the jobs :meth:`map` sends them.

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
        if context.get_start_method() == "fork":
            # A forked worker would inherit the pipes of the workers started before it (and the caller's
            # locks): closing a pipe here would then not end its worker.
            raise ValueError("OrderedWorkerPool needs the forkserver or spawn start method, not fork")
        self._context = context
        self._target_args = (function, initializer, initargs)
        self._processes: list[Any] = [None] * workers
        self._connections: list[Connection] = [None] * workers  # type: ignore[list-item]
        self._held: list[int | None] = [None] * workers  # the index of the job each worker was sent
        self._began: list[bool] = [False] * workers  # whether it said it began that job
        for slot in range(workers):
            self._start(slot)

    def _start(self, slot: int) -> None:
        mine, theirs = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(theirs, *self._target_args), daemon=True)
        process.start()
        theirs.close()  # only the worker holds its end now: its end of life is an end of file here
        self._processes[slot], self._connections[slot] = process, mine
        self._held[slot], self._began[slot] = None, False

    def _replace(self, slot: int) -> None:
        """End the worker in ``slot`` (if it still runs) and start another; what it held is dropped."""
        self._connections[slot].close()
        process = self._processes[slot]
        process.join(timeout=0.5)
        if process.exitcode is None:
            process.kill()
            process.join()
        self._start(slot)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def map(self, jobs: Sequence[Any], stops: Sequence[int] = ()) -> Iterator[Any]:
        """``function(job)`` for each job, in order. At most twice as many results as there are workers
        wait in memory for an earlier one. An exception a job raised is raised here, with the worker's
        traceback as its cause, and :class:`WorkerDied` for a worker that died during a job: each in its
        job's turn, after the results of the jobs before it. A nonempty ``stops`` (signals recorded by the
        caller) raises KeyboardInterrupt before the next result (the check runs at least every 0.1 s while
        waiting).

        Workers still busy with a job of an earlier map that ended early (an exception, a stop, a caller
        that stopped reading) are replaced first: their results belong to that map."""
        for slot, held in enumerate(self._held):
            if held is not None:
                self._replace(slot)
        finished: dict[int, tuple[bool, Any]] = {}
        resend: deque[int] = deque()  # jobs whose worker ended before it began them
        next_job = next_result = 0
        # Workers that may end without running a job since the last result: the out-of-memory killer may
        # pick an idle one now and then, but a worker that cannot even start would be started forever.
        ends_without_result = 0
        while next_result < len(jobs):
            if next_result in finished:
                ok, value = finished.pop(next_result)
                next_result += 1
                if not ok:
                    raise value
                yield value
                continue
            for slot, held in enumerate(self._held):
                if held is not None:
                    continue
                if resend:
                    index = resend.popleft()
                elif next_job < min(len(jobs), next_result + 2 * len(self._held)):
                    index, next_job = next_job, next_job + 1
                else:
                    break
                self._held[slot], self._began[slot] = index, False
                # A worker that has ended refuses it: the job is sent again once its end is seen below.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._connections[slot].send((index, jobs[index]))
            if stops:
                raise KeyboardInterrupt(f"stopped by {signal.Signals(stops[0]).name}")
            ready = set(wait([*self._connections, *(p.sentinel for p in self._processes)], timeout=0.1))
            for slot in range(len(self._processes)):
                connection, process = self._connections[slot], self._processes[slot]
                if connection not in ready and process.sentinel not in ready:
                    continue
                results = len(finished)
                ended = self._read(slot, finished)
                if len(finished) > results:
                    ends_without_result = 0
                if not ended:
                    continue  # it runs on
                process.join(timeout=1.0)  # its pipe's end came first: it is exiting
                if self._held[slot] is not None and self._began[slot]:
                    # Raised in its turn, after the results of the jobs before it.
                    finished[self._held[slot]] = (False, WorkerDied(self._held[slot], process.exitcode))
                    self._replace(slot)
                    continue
                ends_without_result += 1
                if ends_without_result > 3 * len(self._processes):
                    raise RuntimeError(
                        "worker processes keep ending before they run a job (the last one: "
                        f"{_exit_cause(process.exitcode)})"
                    )
                if self._held[slot] is not None:
                    resend.appendleft(self._held[slot])
                self._replace(slot)

    def _read(self, slot: int, finished: dict[int, tuple[bool, Any]]) -> bool:
        """Take every message waiting in ``slot``'s pipe; returns whether the worker has ended (its end of
        the pipe closed, or its process gone with nothing left to read)."""
        connection = self._connections[slot]
        while connection.poll():
            try:
                message = connection.recv()
            except (EOFError, OSError):
                return True  # ended, perhaps in the middle of a message
            if message[0] == _STARTED:
                self._began[slot] = True
            elif message[0] == _DONE:
                _, index, ok, value = message
                finished[index] = (True, value) if ok else (False, _with_traceback(*value))
                self._held[slot], self._began[slot] = None, False
            else:  # its initializer raised: the same would happen in every worker
                raise _with_traceback(*message[1])
        return self._processes[slot].exitcode is not None

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


def _with_traceback(exception: BaseException, text: str) -> BaseException:
    exception.__cause__ = WorkerTraceback(text)
    return exception


def _sendable(exception: Exception) -> Exception:
    """``exception``, or a RuntimeError that describes it where it would not survive the trip (an
    exception class whose constructor its pickle cannot call again)."""
    try:
        pickle.loads(pickle.dumps(exception))
    except Exception as error:
        return RuntimeError(f"{exception!r} (it cannot be sent to the main process as it is: {error!r})")
    return exception


def _serve(
    connection: Connection,
    function: Callable[[Any], Any],
    initializer: Callable[..., None],
    initargs: tuple[Any, ...],
) -> None:
    """A worker's life: jobs from its pipe until the main process closes it."""
    faulthandler.enable()  # a crash in a library prints this process's Python stack
    try:
        initializer(*initargs)
    except Exception as exc:
        connection.send((_FAILED_TO_START, (_sendable(exc), traceback.format_exc())))
        return
    while True:
        try:
            index, job = connection.recv()
            connection.send((_STARTED, index))
        except (EOFError, OSError):
            return  # the main process closed the pipe, or is gone
        try:
            reply = (_DONE, index, True, function(job))
        except Exception as exc:  # raised again in the main process, which decides what it means
            reply = (_DONE, index, False, (_sendable(exc), traceback.format_exc()))
        try:
            connection.send(reply)
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception as exc:  # the result does not pickle: a bug, told as such
            error = RuntimeError(f"job {index}'s result cannot be sent to the main process: {exc!r}")
            try:
                connection.send((_DONE, index, False, (error, traceback.format_exc())))
            except (BrokenPipeError, ConnectionResetError):
                return

"""The worker pool behind ``nested shards --workers``: results in job order, a job's exception raised with
its worker's traceback, a worker killed while it holds a job named at once (``multiprocessing.Pool`` waits
for it forever), one killed between jobs replaced, and a stop honoured between results."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from nested.data.worker_pool import OrderedWorkerPool, WorkerDied, WorkerTraceback


def _context() -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context(
        "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    )


def _nothing_to_set_up() -> None:
    pass


def _square_after_a_while(job: int) -> int:
    time.sleep(0.002 * (job % 7))  # later jobs often finish first
    return job * job


def _square_or_fail(job: int) -> int:
    if job == 5:
        raise ValueError(f"job {job} is bad")
    return job * job


def _square_or_die(job: int) -> int:
    if job == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    if job == 6:
        os._exit(3)
    return job * job


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_results_come_in_job_order_with_more_jobs_than_workers() -> None:
    with OrderedWorkerPool(_context(), 3, _square_after_a_while, _nothing_to_set_up) as pool:
        assert list(pool.map(range(40))) == [job * job for job in range(40)]
        assert list(pool.map([])) == []
        assert list(pool.map([7])) == [49]  # the same workers serve a second map


def test_a_jobs_exception_is_raised_in_order_with_the_workers_traceback() -> None:
    got = []
    with (
        OrderedWorkerPool(_context(), 2, _square_or_fail, _nothing_to_set_up) as pool,
        pytest.raises(ValueError, match="^job 5 is bad$") as raised,
    ):
        for result in pool.map(range(10)):
            got.append(result)
    assert got == [0, 1, 4, 9, 16]
    cause = raised.value.__cause__
    assert isinstance(cause, WorkerTraceback)
    assert "in _square_or_fail" in str(cause) and "ValueError: job 5 is bad" in str(cause)


@pytest.mark.parametrize(("dying_job", "cause"), [(5, "killed by SIGKILL"), (6, "exit code 3")])
def test_a_worker_that_dies_holding_a_job_is_named_with_that_job(dying_job: int, cause: str) -> None:
    start = time.monotonic()
    with OrderedWorkerPool(_context(), 2, _square_or_die, _nothing_to_set_up) as pool:
        results = pool.map([0, 1, 2, 3, 4, dying_job, 7, 8])
        assert [next(results) for _ in range(4)] == [0, 1, 4, 9]
        with pytest.raises(WorkerDied, match=f"^a worker process ended \\({cause}\\) while it ran job 5$"):
            list(results)
    assert time.monotonic() - start < 30  # named, not waited for


def test_a_worker_killed_between_jobs_is_replaced_and_nothing_is_lost() -> None:
    with OrderedWorkerPool(_context(), 2, _square_after_a_while, _nothing_to_set_up) as pool:
        assert list(pool.map(range(4))) == [0, 1, 4, 9]
        first = pool.pids
        os.kill(first[0], signal.SIGKILL)
        time.sleep(0.5)  # dead before the next map sends it a job: a job sent first would be lost with it
        assert list(pool.map(range(20))) == [job * job for job in range(20)]
        assert pool.pids[0] != first[0] and pool.pids[1] == first[1]


def test_a_recorded_stop_ends_the_map_and_closing_ends_busy_workers() -> None:
    stops: list[int] = []
    with OrderedWorkerPool(_context(), 2, _sleep, _nothing_to_set_up) as pool:
        results = pool.map([0.0, 60.0, 60.0], stops)
        assert next(results) == 0.0
        stops.append(signal.SIGTERM)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt, match="^stopped by SIGTERM$"):
            next(results)
        assert time.monotonic() - start < 1.0
        workers = pool.pids
    assert time.monotonic() - start < 10.0  # terminated, not waited for
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

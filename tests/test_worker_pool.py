"""The worker pool behind ``nested shards --workers``: results in job order, a job's exception raised with
its worker's traceback, a worker killed while it holds a job named at once (``multiprocessing.Pool`` waits
for it forever), one killed between jobs replaced, and a stop honoured between results."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path

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
    if job == 2:
        time.sleep(0.5)  # the other worker runs jobs 3, 4 and 5 meanwhile: the death comes before result 2
    if job == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    if job == 6:
        os._exit(3)
    return job * job


def _square_slowly_but_not_1(job: int) -> int:
    time.sleep(0.05)
    if job == 1:
        raise ValueError("job 1 is bad")
    return job * job


def _die_right_after_sending_result_3() -> None:
    """The out-of-memory killer's worst timing: a worker dies just after its result left, while its next
    job may already wait in its pipe."""
    send = Connection.send

    def send_then_die(self: Connection, message: object) -> None:
        send(self, message)
        if isinstance(message, tuple) and message[:2] == ("done", 3):
            os.kill(os.getpid(), signal.SIGKILL)

    Connection.send = send_then_die


def _end_at_start() -> None:
    os._exit(3)  # no exception to report: as if killed before its first job


def _fail_to_start() -> None:
    raise OSError("no model file here")


class _NeedsTwo(Exception):
    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"{first} and {second}")


def _raise_needs_two(job: int) -> int:
    raise _NeedsTwo("one", "two")


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
    """In its job's turn: after the results of the jobs before it, which other workers still run."""
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
        os.kill(first[0], signal.SIGKILL)  # the next map may send it a job before its end is seen
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


def test_a_map_after_one_that_ended_early_gets_its_own_results() -> None:
    """Workers still running jobs of the abandoned map are replaced: their results are not this map's."""
    with OrderedWorkerPool(_context(), 2, _square_slowly_but_not_1, _nothing_to_set_up) as pool:
        with pytest.raises(ValueError, match="job 1 is bad"):
            list(pool.map(range(6)))
        assert list(pool.map([10, 11, 12, 13])) == [100, 121, 144, 169]
        abandoned = pool.map(range(6))
        assert next(abandoned) == 0
        assert list(pool.map([10, 11, 12, 13])) == [100, 121, 144, 169]


def test_an_initializer_that_fails_is_raised_with_its_traceback_not_blamed_on_a_job() -> None:
    start = time.monotonic()
    with (
        OrderedWorkerPool(_context(), 2, _square_after_a_while, _fail_to_start) as pool,
        pytest.raises(OSError, match="^no model file here$") as raised,
    ):
        list(pool.map([b"x" * 4_000_000] * 4))  # jobs larger than a pipe's buffer
    assert "in _fail_to_start" in str(raised.value.__cause__)
    assert time.monotonic() - start < 30


def test_an_exception_that_cannot_be_rebuilt_comes_back_described() -> None:
    with (
        OrderedWorkerPool(_context(), 1, _raise_needs_two, _nothing_to_set_up) as pool,
        pytest.raises(RuntimeError, match=r"^_NeedsTwo\('one and two'\) \(it cannot be sent") as raised,
    ):
        list(pool.map([1]))
    assert "in _raise_needs_two" in str(raised.value.__cause__)


def test_the_fork_start_method_is_refused() -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("this platform has no fork")
    with pytest.raises(ValueError, match="forkserver or spawn start method, not fork"):
        OrderedWorkerPool(multiprocessing.get_context("fork"), 1, _sleep, _nothing_to_set_up)


def test_a_worker_that_dies_right_after_sending_a_result_loses_nothing() -> None:
    """The job sent to it after that result never began: a new worker runs it."""
    for _ in range(5):  # the next job is sometimes in its pipe before its end is seen, sometimes not
        with OrderedWorkerPool(
            _context(), 2, _square_after_a_while, _die_right_after_sending_result_3
        ) as pool:
            first = pool.pids
            assert list(pool.map(range(12))) == [job * job for job in range(12)]
            assert len(set(pool.pids) - set(first)) == 1


def test_workers_that_keep_ending_before_any_job_end_the_map() -> None:
    start = time.monotonic()
    with (
        OrderedWorkerPool(_context(), 2, _square_after_a_while, _end_at_start) as pool,
        pytest.raises(
            RuntimeError,
            match=r"^worker processes keep ending before they run a job \(the last one: exit code 3\)$",
        ),
    ):
        list(pool.map(range(4)))
    assert time.monotonic() - start < 60


def _mark_then_square(job: tuple[str, int]) -> int:
    folder, index = job
    if index == 0:
        time.sleep(1.0)  # the first result is slow: the others must not all run meanwhile
    (Path(folder) / str(index)).touch()
    return index * index


def _die_after_every_result() -> None:
    """Every worker is killed just after its result left (the out-of-memory killer, now and then)."""
    send = Connection.send

    def send_then_die(self: Connection, message: object) -> None:
        send(self, message)
        if isinstance(message, tuple) and message[0] == "done":
            os.kill(os.getpid(), signal.SIGKILL)

    Connection.send = send_then_die


def test_results_that_wait_for_an_earlier_one_are_bounded(tmp_path: Path) -> None:
    """map's docstring: at most twice as many results as there are workers wait for an earlier one."""
    with OrderedWorkerPool(_context(), 2, _mark_then_square, _nothing_to_set_up) as pool:
        results = pool.map([(str(tmp_path), index) for index in range(40)])
        assert next(results) == 0
        time.sleep(0.3)
        assert len(list(tmp_path.iterdir())) <= 1 + 2 * 2
        assert list(results) == [index * index for index in range(1, 40)]


def test_workers_killed_between_jobs_now_and_then_never_end_a_long_map() -> None:
    """Each result resets the count of workers that ended without one: a long build survives many kills."""
    with OrderedWorkerPool(_context(), 1, _square_after_a_while, _die_after_every_result) as pool:
        assert list(pool.map(range(12))) == [job * job for job in range(12)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_worker_left_busy_by_an_abandoned_map_is_ended_not_left_running() -> None:
    """The next map ends a worker still busy with a job of an abandoned one: its 60 s job does not go on."""
    with OrderedWorkerPool(_context(), 2, _sleep, _nothing_to_set_up) as pool:
        abandoned = pool.map([0.0, 60.0])
        assert next(abandoned) == 0.0  # one worker idle, the other 60 s into job 1
        before = pool.pids
        assert list(pool.map([0.0])) == [0.0]
        busy = set(before) - set(pool.pids)  # the one replaced
        assert len(busy) == 1
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in busy) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in busy)

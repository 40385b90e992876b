"""The shared write helpers: atomic, old content kept until the new is complete, modes from the umask."""

from __future__ import annotations

import os
import signal
import stat

import pytest

from nested.files import atomic_file, staged_directory, stop_signals_deferred, write_text_atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_staged_directory_replaces_only_when_complete(tmp_path, umask_022):
    target = tmp_path / "export"
    with staged_directory(target) as staging:
        (staging / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_directory(target) as staging:
        (staging / "a.txt").write_text("new, half written")
        raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging left behind
    with staged_directory(target) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("new")
    assert sorted(p.name for p in target.rglob("*")) == ["b.txt", "sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_modes_follow_the_umask(tmp_path, umask_022):
    with staged_directory(tmp_path / "export") as staging:
        (staging / "weights").write_bytes(b"x")
    assert mode(tmp_path / "export") == 0o755
    assert mode(tmp_path / "export" / "weights") == 0o644
    write_text_atomic(tmp_path / "index.json", "{}")
    assert mode(tmp_path / "index.json") == 0o644
    os.umask(0o077)
    write_text_atomic(tmp_path / "private.json", "{}")
    assert mode(tmp_path / "private.json") == 0o600


def test_atomic_file_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "shards.json"
    write_text_atomic(target, "old")
    with pytest.raises(KeyboardInterrupt), atomic_file(target, "w") as handle:
        handle.write("new")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["shards.json"]


def test_deferred_signals_are_recorded_then_delivered_and_ignored_ones_stay_ignored():
    delivered = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: delivered.append(number))
    previous_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_signals_deferred() as received:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGHUP)  # ignored before: not recorded, not delivered
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == [signal.SIGTERM, signal.SIGTERM] and delivered == []
        assert delivered == [signal.SIGTERM]  # once, after the block, to the handler that was there
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, previous_hup)

"""The shared write helpers: atomic, old content kept until the new is complete, modes from the umask, and a
write the file system refuses (a full disk, on a real small tmpfs) as one line naming the file."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nested.files
from nested.adapter import NestedAdapter
from nested.cli.main import main
from nested.errors import StorageError
from nested.files import (
    atomic_file,
    remove_directory,
    replace_directory,
    staged_directory,
    stop_signals_deferred,
    storage_refusal,
    write_bytes_atomic,
    write_text_atomic,
)
from nested.training.resume import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]
TWO_MIB = 2 * 1024 * 1024


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


def test_a_folder_is_replaced_in_one_step_or_put_back(tmp_path, monkeypatch):
    target, staging = tmp_path / "last", tmp_path / ".last.tmp"
    for folder, text in ((target, "old"), (staging, "new")):
        folder.mkdir()
        (folder / "a.txt").write_text(text)
    # Here (Linux, a local file system) the names are swapped in one step: the folder never goes missing.
    renames = []
    monkeypatch.setattr(nested.files.os, "replace", lambda *paths: renames.append(paths))
    replace_directory(staging, target)
    assert renames == [] and (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    monkeypatch.undo()

    # Where it cannot swap them, a new folder that cannot be moved in leaves the old one in place.
    staging.mkdir()
    (staging / "a.txt").write_text("newer")
    monkeypatch.setattr(nested.files, "_exchange", lambda first, second: False)
    real_replace = os.replace

    def failing(source, destination):
        if Path(source) == staging:
            raise OSError(errno.EIO, "input/output error")
        real_replace(source, destination)

    monkeypatch.setattr(nested.files.os, "replace", failing)
    with pytest.raises(OSError, match="input/output error"):
        replace_directory(staging, target)
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.tmp", "last"]  # no hidden .old folder


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


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs) mounted in ``tmp_path``; mounting needs root, elsewhere it is skipped."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def _full_disk_message(path) -> str:
    return (
        f"no space left on the device writing {path}: free space there, then run the same command again (the files "
        "written before are intact)"
    )


def test_a_full_disk_is_one_line_naming_the_file_and_the_old_file_stays(small_disk):
    target = small_disk / "notes.txt"
    write_text_atomic(target, "old")
    with pytest.raises(StorageError) as error:
        write_bytes_atomic(target, b"x" * TWO_MIB)
    assert str(error.value) == _full_disk_message(target)
    assert target.read_text() == "old" and os.listdir(small_disk) == ["notes.txt"]


def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one(small_disk):
    io = AtomicCheckpointIO()
    target = small_disk / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    with pytest.raises(StorageError) as error:
        io.save_checkpoint({"step": 2, "weights": torch.zeros(TWO_MIB // 4)}, target)
    assert str(error.value) == _full_disk_message(target)
    assert os.listdir(small_disk) == ["last.ckpt"] and io.load_checkpoint(target)["step"] == 1


def test_an_adapter_export_that_does_not_fit_keeps_the_previous_one(small_disk, tiny_adapter):
    adapter = NestedAdapter.from_pretrained(tiny_adapter)
    target = small_disk / "adapters" / "last"
    adapter.save_pretrained(target)
    before = {path.name: path.read_bytes() for path in target.iterdir()}
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    write_bytes_atomic(small_disk / "filler", b"x" * (free - 8192))  # safetensors' write then fails
    with pytest.raises(StorageError) as error:
        adapter.save_pretrained(target)
    assert str(error.value) == _full_disk_message(target)
    assert {path.name: path.read_bytes() for path in target.iterdir()} == before
    assert sorted(os.listdir(small_disk / "adapters")) == ["last"]  # no staging folder left


def test_a_staged_folders_own_work_keeps_its_errors(tmp_path):
    # A refusal met by other work inside the block (a compile cache on another disk) is not the folder's.
    elsewhere = OSError(errno.ENOSPC, "No space left on device", "/cache/inductor")
    with pytest.raises(OSError) as error, staged_directory(tmp_path / "out"):
        raise elsewhere
    assert error.value is elsewhere and not (tmp_path / "out").exists()


def test_refusals_are_found_through_wrappers_and_other_errors_are_not():
    def wrapped(inner: BaseException) -> RuntimeError:
        try:
            raise inner
        except BaseException as error:
            try:
                raise RuntimeError(
                    "[enforce fail at inline_container.cc:672] . unexpected pos 957056"
                ) from error
            except RuntimeError as outer:
                return outer

    assert storage_refusal(wrapped(OSError(errno.EDQUOT, "Disk quota exceeded"))) == errno.EDQUOT
    assert (
        storage_refusal(Exception("Error while serializing: Read-only file system (os error 30)"))
        == errno.EROFS
    )
    assert storage_refusal(wrapped(OSError(errno.EIO, "Input/output error"))) is None
    assert storage_refusal(FileNotFoundError(errno.ENOENT, "missing")) is None
    try:  # a bug met while handling a full disk elsewhere stays the bug
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            {}["missing"]
    except KeyError as bug:
        assert storage_refusal(bug) is None


def test_nested_generate_on_a_full_disk_ends_in_one_line_and_keeps_nothing_half_written(
    small_disk, tiny_sd_path, tiny_adapter, tmp_path, capsys
):
    reference = tmp_path / "me.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(reference)
    out = small_disk / "out"
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"x" * (free - 16 * 1024))  # room for less than the images
    argv = ["generate", "--base", str(tiny_sd_path), "--adapter", f"<person>={tiny_adapter}", "--subject",
            f"<person>={reference}", "--prompt", "a photo of <person>", "--steps", "1", "--num-images", "3",
            "--height", "128", "--width", "128", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    refusal = capsys.readouterr().err.strip().splitlines()[-1]
    assert refusal == f"nested generate: error: {_full_disk_message(out)}"
    assert os.listdir(small_disk) == ["filler"]  # its hidden folder removed


def test_nested_shards_on_a_full_disk_ends_in_one_line_and_keeps_the_earlier_dataset(
    small_disk, tmp_path, capsys
):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((128, 128, 3)) * 255).astype("uint8")).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text("a photo of <person>")
    out = small_disk / "shards"
    argv = ["shards", str(photos), str(out), "--domain", "faces", "--subject", "<person>", "--no-progress"]
    assert main(argv) == 0
    index = (out / "shards.json").read_bytes()
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"x" * (free - 16 * 1024))  # room for less than the new shards
    assert main([*argv, "--overwrite"]) == 2
    refusal = capsys.readouterr().err.strip().splitlines()[-1]
    assert refusal.startswith(f"nested shards: error: no space left on the device writing {out}: ")
    assert (out / "shards.json").read_bytes() == index  # the earlier dataset, as it was
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


def _nested_fit_refusal(capsys, root: Path, *options: str) -> str:
    """The one line ``nested fit`` on the smoke config into ``root`` ends with (exit status 2)."""
    argv = ["fit", "--config", str(REPO / "configs/smoke.yaml"), f"--trainer.default_root_dir={root}"]
    argv += ["--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", *options]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_nested_fit_on_a_full_disk_ends_in_one_line(small_disk, capsys):
    refusal = _nested_fit_refusal(capsys, small_disk, "--trainer.max_steps=50", "--trainer.logger=false")
    checkpoint = small_disk / "checkpoints" / "epoch=0-step=50.ckpt"
    assert refusal == f"nested fit: error: {_full_disk_message(checkpoint)}"
    assert not any(path.name.startswith(".") for path in small_disk.rglob("*"))  # no partial write left


def test_training_logs_on_a_full_disk_end_in_one_line_naming_their_folder(small_disk, tmp_path, capsys):
    # Only the logs are on the full disk, full from the start: the event file's header is refused.
    logs = small_disk / "lightning_logs"
    logs.mkdir()
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    write_bytes_atomic(small_disk / "filler", b"x" * free)
    run = tmp_path / "run"
    run.mkdir()
    (run / "lightning_logs").symlink_to(logs, target_is_directory=True)
    refusal = _nested_fit_refusal(capsys, run, "--trainer.max_steps=4", "--trainer.log_every_n_steps=1")
    assert refusal == f"nested fit: error: {_full_disk_message(run / 'lightning_logs' / 'version_0')}"
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())


def test_a_refusal_met_by_tensorboards_writer_thread_is_named_at_the_next_flush(small_disk):
    from nested.training.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=small_disk, version=0)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save()
    events = list(Path(logger.log_dir).glob("events.out.tfevents.*"))
    before = events[0].read_bytes()
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    write_bytes_atomic(small_disk / "filler", b"x" * free)
    with pytest.raises(StorageError) as error:
        for step in range(1, 1000):  # past the event file's first page
            logger.log_metrics({f"train/metric_{index}": 1.0 for index in range(10)}, step=step)
            logger.save()
    assert str(error.value) == _full_disk_message(small_disk / "lightning_logs" / "version_0")
    assert events[0].read_bytes().startswith(before)


def test_remove_directory_renames_the_folder_aside_before_deleting_it(tmp_path, monkeypatch):
    """The folder leaves its name before its files are deleted: a crash during the deletion never leaves a
    half-deleted step=N/ that a reader (HubUpload, nested push) would take for an export."""
    target = tmp_path / "step=1"
    target.mkdir()
    (target / "adapter.safetensors").write_bytes(b"weights")
    seen = []
    rmtree = shutil.rmtree

    def watching_rmtree(path, *args, **kwargs):
        seen.append((Path(path).name, target.exists()))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(nested.files.shutil, "rmtree", watching_rmtree)
    remove_directory(target)
    ((name, original_still_there),) = seen
    assert name.startswith(".step=1.old-") and not original_still_there
    assert list(tmp_path.iterdir()) == []

"""`nested fit` stopped by a signal, as real subprocesses: Ctrl-C checkpoints like SIGTERM, the run exits 75 and
exports its adapter as a partial `step=N`, never as `last`; a second stop signal ends the process at once; exports
are shared like checkpoints under umask 022."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from nested.adapter import NestedAdapter, training_is_complete
from nested.cli.fit import EXIT_STOPPED_EARLY

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
PACER = textwrap.dedent(
    '''
    import time
    from pathlib import Path

    import lightning as L


    class Pacer(L.Callback):
        """Writes the step reached to a file, then sleeps: `sleep` s after each step, `stall` s after `stall_at`."""

        def __init__(self, marker: str, sleep: float = 0.3, stall_at: int = -1, stall: float = 0.0) -> None:
            self.marker, self.sleep, self.stall_at, self.stall = Path(marker), sleep, stall_at, stall

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.marker.write_text(str(trainer.global_step))
            time.sleep(self.stall if trainer.global_step == self.stall_at else self.sleep)
    '''
)


def _fit(tmp_path: Path, root: Path, *extra: str, stall_at: int = -1) -> tuple[subprocess.Popen, Path]:
    """Start `nested fit` on the tiny model in its own process group (as a shell runs a foreground job), with
    a DataLoader worker, EMA and a Pacer callback; returns the process and its log file."""
    (tmp_path / "pacer.py").write_text(PACER)
    pace = tmp_path / "pace.yaml"
    pace.write_text(
        "trainer:\n  callbacks+:\n    - class_path: pacer.Pacer\n"
        f"      init_args: {{marker: {tmp_path / 'step'}, stall_at: {stall_at}, stall: 600}}\n"
    )
    command = [str(Path(sys.executable).with_name("nested")), "fit", "--config", "configs/smoke.yaml"]
    command += ["--config", "callbacks/ema.yaml", "--config", str(pace), f"--trainer.max_steps={STEPS}"]
    command += [f"--trainer.default_root_dir={root}", "--trainer.limit_val_batches=0", "--data.num_workers=1"]
    command += ["--trainer.enable_progress_bar=false", *extra]
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    log = tmp_path / f"fit-{len(list(tmp_path.glob('fit-*.log')))}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, log


def _wait_for_step(process: subprocess.Popen, marker: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + 240
    while not (marker.exists() and marker.read_text() and int(marker.read_text()) >= step):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _finish(process: subprocess.Popen, log: Path) -> int:
    try:
        return process.wait(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        raise AssertionError(f"nested fit did not end:\n{log.read_text()[-3000:]}") from None


def _modes(root: Path) -> set[tuple[str, str]]:
    """(kind, octal mode) of everything under root."""
    return {("dir" if p.is_dir() else "file", oct(stat.S_IMODE(p.stat().st_mode))) for p in root.rglob("*")}


def test_ctrl_c_checkpoints_exits_75_exports_a_partial_adapter_and_the_rerun_completes(tmp_path):
    """Ctrl-C (SIGINT to the whole foreground group, DataLoader worker included) during `nested fit`: a
    checkpoint at the next step, exit 75, the adapter so far in adapters/step=N marked partial and no
    adapters/last; the same command then resumes, exits 0 and writes adapters/last, complete. Under umask
    022 every export is 0755/0644, like the checkpoints."""
    root = tmp_path / "run"
    previous_umask = os.umask(0o022)
    try:
        process, log = _fit(tmp_path, root)
        _wait_for_step(process, tmp_path / "step", 2, log)
        os.killpg(process.pid, signal.SIGINT)
        code = _finish(process, log)
        output = log.read_text()
        assert code == EXIT_STOPPED_EARLY == 75, output[-3000:]
        assert "Traceback" not in output and "exit status 75" in output
        stopped = int((tmp_path / "step").read_text())
        assert 2 <= stopped < STEPS
        assert [p.name for p in root.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]
        adapters = root / "adapters"
        assert sorted(p.name for p in adapters.iterdir()) == [f"step={stopped}"]
        partial = adapters / f"step={stopped}"
        record = json.loads((partial / "adapter_config.json").read_text())["training"]
        assert record == {"step": stopped, "complete": False}
        assert not training_is_complete(partial)

        process, log = _fit(tmp_path, root)
        code = _finish(process, log)
        output = log.read_text()
        assert code == 0, output[-3000:]
        assert "resuming from" in output and "hpc_ckpt_1.ckpt" in output
    finally:
        os.umask(previous_umask)
    last = adapters / "last"
    assert json.loads((last / "adapter_config.json").read_text())["training"] == {
        "step": STEPS,
        "complete": True,
    }
    assert training_is_complete(last)
    assert NestedAdapter.from_pretrained(last, image_encoder=str(REPO / "data/models/tiny-sd/image_encoder"))
    assert _modes(adapters) == {("dir", "0o755"), ("file", "0o644")}
    assert oct(stat.S_IMODE(adapters.stat().st_mode)) == "0o755"
    assert _modes(root / "checkpoints") == {("file", "0o644")}  # what the exports must match


def test_a_second_ctrl_c_ends_fit_at_once(tmp_path):
    """While `nested fit` is stopping (here stuck in a callback for 10 minutes), a second stop signal (Ctrl-C
    again, to the whole group) ends the process at once by that signal (the shell sees 130): nothing can keep a
    user or SLURM waiting."""
    process, log = _fit(tmp_path, tmp_path / "run", stall_at=2)
    _wait_for_step(process, tmp_path / "step", 2, log)
    os.killpg(process.pid, signal.SIGINT)
    deadline = time.monotonic() + 60
    while "SIGINT received: stopping at the end of the current step" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    code = _finish(process, log)
    assert code == -signal.SIGINT, log.read_text()[-3000:]
    assert "SIGINT while stopping: exiting at once" in log.read_text()
    assert not (tmp_path / "run" / "adapters" / "last").exists()


FULL_DISK_LOGGER = textwrap.dedent(
    '''
    import errno

    from lightning.pytorch.loggers import CSVLogger


    class FullDiskLogger(CSVLogger):
        """Its files are on a full disk: every write of metrics, and the last one at the end, fails."""

        def log_metrics(self, metrics, step=None):
            raise OSError(errno.ENOSPC, "No space left on device")

        def finalize(self, status):
            raise OSError(errno.ENOSPC, "No space left on device")
    '''
)


def test_an_error_while_lightning_handles_another_still_ends_the_process_and_its_loader_workers(tmp_path):
    # The logger's finalize raises while Lightning handles the logger's first error, which skips the
    # loader's shutdown; its worker ignores SIGTERM, which is how multiprocessing ends it at exit.
    (tmp_path / "full_disk.py").write_text(FULL_DISK_LOGGER)
    command = [str(Path(sys.executable).with_name("nested")), "fit", "--config", "configs/smoke.yaml"]
    command += [f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.limit_val_batches=0"]
    command += ["--trainer.max_steps=4", "--trainer.log_every_n_steps=1", "--data.num_workers=1"]
    command += ["--trainer.enable_progress_bar=false", "--trainer.logger.class_path=full_disk.FullDiskLogger"]
    command += [f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "OSError: [Errno 28] No space left on device"


def _sleep_forever() -> None:
    time.sleep(600)


def test_ending_loader_workers_leaves_other_processes_alone():
    import multiprocessing

    from torch.utils.data import IterableDataset

    from nested.data.loading import WorkerTrackingLoader, end_loader_workers, ignore_stop_signals

    class Numbers(IterableDataset):
        def __iter__(self):
            return iter(range(1000))

    mine = multiprocessing.get_context("fork").Process(target=_sleep_forever, daemon=True)
    mine.start()
    loader = WorkerTrackingLoader(
        Numbers(), num_workers=1, worker_init_fn=ignore_stop_signals, persistent_workers=True
    )
    iterator = iter(loader)
    next(iterator)
    (worker,) = iterator._workers
    try:
        end_loader_workers()
        assert not worker.is_alive() and worker.exitcode == -signal.SIGKILL
        assert mine.is_alive()
    finally:
        mine.kill()
        mine.join()


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_loader_workers_start_fresh_and_outlive_the_stop_signals_a_job_scheduler_sends():
    """A worker forked from a training process with threads can hang inside fork: they are spawned instead.
    SLURM signals every process of a job (--signal=USR1@90, then SIGTERM): a worker may not die of it, even
    while it starts (it imports for seconds before it can ignore them), or the run would crash before its
    checkpoint."""
    from nested.data import DomainSpec, NestedDataModule

    data = NestedDataModule(
        domains=[DomainSpec(name="faces", urls=str(REPO / "data/demo/faces/shards.json"), subject="<person>")],
        resolution=32, reference_size=32, batch_size=2, num_workers=2, epoch_samples=64, shuffle_buffer=4,
    )  # fmt: skip
    iterator = iter(data.train_dataloader())
    workers = iterator._workers
    for worker in workers:  # starting
        os.kill(worker.pid, signal.SIGUSR1)
        os.kill(worker.pid, signal.SIGTERM)
    next(iterator)
    for worker in workers:  # started
        assert _parent_of(worker.pid) == os.getpid()
        assert b"--multiprocessing-fork" in Path(f"/proc/{worker.pid}/cmdline").read_bytes()  # spawned
        os.kill(worker.pid, signal.SIGUSR1)
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(1)
    for _ in range(8):
        assert next(iterator)["pixel_values"].shape == (2, 3, 32, 32)
    assert all(worker.is_alive() for worker in workers)
    iterator._shutdown_workers()

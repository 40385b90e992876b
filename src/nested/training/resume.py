"""Preemption and resume: atomic checkpoints, a stop signal acted on at a step boundary, SLURM requeue.

- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the SAME directory,
  fsyncs it, then ``os.replace``-s it over the target: a process killed mid-write leaves the
  previous checkpoint intact. (Lightning's ``_atomic_save`` stages the bytes in memory, writes them
  to a file in the system temp dir and ``shutil.move``-s it: across file systems, as from a node's
  /tmp to a shared checkpoint folder, that is a copy over the target, not atomic; and no fsync.)
  It loads checkpoints onto the CPU by name, which tensor subclasses (torchao's 8-bit optimizer
  states) need.
- :class:`PreemptionCheckpoint` turns SIGUSR1 (SLURM's warning before the time limit,
  ``#SBATCH --signal=USR1@90``), SIGTERM (scancel, preemption, a node being drained) and SIGINT
  (Ctrl-C) into a checkpoint ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` written at the next step
  boundary that every rank agrees on, then, for SIGUSR1 under SLURM, ``scontrol requeue <job>``,
  then a clean stop. The signal handlers (:mod:`nested.signals`) only set a flag: no checkpoint, no
  collective inside a handler (Lightning's own handler saves inside the handler, possibly mid-step,
  #21406); a second stop signal ends the process at once.
- :func:`find_resume_checkpoint` picks the newest of the hpc checkpoints and the checkpoint
  callbacks' files (by the global step inside, then hpc first, then mtime), skipping unreadable
  ones; ``nested fit`` resumes from it when no ``--ckpt_path`` is given, and starts fresh when there
  is none (Lightning's ``ckpt_path="hpc"`` raises then, #20347).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from nested.errors import ConfigError
from nested.files import fsync_dir, storage_refusals_named
from nested.signals import STOP_SIGNALS, clear_signals, install_signal_flags, received_signals
from nested.training.loggers import LOGGED_RUN_KEY, logged_run

log = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "PreemptionCheckpoint",
    "checkpoint_step",
    "drop_replaced_checkpoint_callbacks",
    "find_resume_checkpoint",
    "training_finished",
]

_HPC = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


# ----------------------------------------------------------------------------- atomic writes


def partial_path(path: Path) -> Path:
    """The temporary file a checkpoint is written to before it replaces ``path``.

    Hidden, beside its target (same file system: ``os.replace`` is atomic), and named without
    ``ckpt_`` so Lightning's hpc checkpoint numbering never counts it; the same name for the same
    target, so a write killed before overwrites the leftover of the previous one.
    """
    digest = hashlib.sha1(path.name.encode()).hexdigest()[:12]
    return path.parent / f".partial-{digest}.tmp"


def remove_killed_writes(folders: list[str | Path], older_than: float) -> list[Path]:
    """Delete the :func:`partial_path` files in ``folders`` last written before ``older_than`` (a time
    stamp): writes killed mid-way. One for ``last.ckpt`` or an hpc file is overwritten by the next write
    of that target, but one for a step-named checkpoint would stay, as large as a checkpoint. A write in
    progress (another job's in the same folder) keeps touching its file: callers leave a margin below their
    start for the attribute caches and clocks of shared file systems. Returns the deleted paths."""
    removed = []
    for folder in dict.fromkeys(Path(f) for f in folders):
        for partial in sorted(folder.glob(".partial-*.tmp")) if folder.is_dir() else []:
            try:
                if partial.stat().st_mtime < older_than:
                    partial.unlink()
                    removed.append(partial)
            except FileNotFoundError:  # renamed or removed by its writer meanwhile
                continue
    return removed


class _KeptWriteErrors:
    """A binary file that keeps the error of a failed write: torch's writer raises its own RuntimeError instead."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable (remote paths: Lightning's way).

    The checkpoint streams to :func:`partial_path` (no second in-memory copy), is fsynced, then
    renamed over the target, and the directory is fsynced. ``nested fit`` uses it by default.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        with storage_refusals_named(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = partial_path(path)
            try:
                with open(partial, "wb") as handle:
                    writer = _KeptWriteErrors(handle)
                    try:
                        torch.save(checkpoint, writer)
                    except RuntimeError as error:
                        if writer.error is None:
                            raise
                        raise writer.error from error  # torch's writer reports the file's error as its own
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(partial, path)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            fsync_dir(path.parent)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Lightning's default map_location is a callable that keeps each storage where torch deserialized it (on
        # the CPU). torch refuses a callable for tensor subclasses, such as the 8-bit states of torchao's
        # optimizers, so the same placement is asked for by name.
        if map_location is None or callable(map_location):
            map_location = "cpu"
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


# ----------------------------------------------------------------------------- which checkpoint


def checkpoint_step(path: str | Path) -> int:
    """The ``global_step`` stored in a checkpoint, read without loading its tensors (mmap)."""
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return int(checkpoint["global_step"])


def hpc_checkpoints(root: str | Path) -> list[Path]:
    """``<root>/hpc_ckpt_<n>.ckpt`` files, oldest (lowest n) first."""
    root = Path(root)
    found = [(int(m.group(1)), p) for p in root.glob("hpc_ckpt_*.ckpt") if (m := _HPC.match(p.name))]
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(root: str | Path, checkpoint_dirs: list[str | Path] = ()) -> Path | None:
    """The newest readable checkpoint in ``root`` (hpc) and ``checkpoint_dirs`` (``*.ckpt``), or None.

    Ordered by the global step stored inside, then hpc before others (a preemption checkpoint is
    taken mid-epoch; a callback's checkpoint at the same step may come from the epoch end the
    stop triggered), then modification time. Unreadable files are skipped with a warning.
    """
    candidates = {p: True for p in hpc_checkpoints(root)}
    for folder in checkpoint_dirs:
        if Path(folder).is_dir():
            candidates.update({p: False for p in Path(folder).glob("*.ckpt") if p not in candidates})
    ranked = []
    for path, is_hpc in candidates.items():
        try:
            ranked.append(((checkpoint_step(path), is_hpc, path.stat().st_mtime), path))
        except Exception as exc:
            rank_zero_warn(f"resume: skipping unreadable checkpoint {path}: {exc!r}")
    return max(ranked)[1] if ranked else None


def checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """Where the trainer's ModelCheckpoint callbacks write (those with a fixed ``dirpath``)."""
    return [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]


def stable_checkpoint_dirs(trainer: L.Trainer) -> None:
    """Give every ModelCheckpoint without a ``dirpath`` ``<default_root_dir>/checkpoints``.

    Lightning's default is the logger's ``version_<n>/checkpoints``: a new folder per run, where
    a requeued job would not find its ``last.ckpt``.
    """
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")


def drop_replaced_checkpoint_callbacks(trainer: L.Trainer) -> list[ModelCheckpoint]:
    """Of the ModelCheckpoint callbacks that keep a ``last.ckpt`` in one folder, keep the one configured
    last; returns the others, now removed from the trainer.

    A preset that appends its own (``callbacks/checkpoint-frequent.yaml``) to a config that has one thus
    replaces it, as a later ``--config`` wins everywhere else. Both would otherwise write into that folder
    (the second ``last.ckpt`` as ``last-v1.ckpt``), each keeping its own checkpoints. Call after
    :func:`stable_checkpoint_dirs`.
    """
    last_by_folder: dict[str, ModelCheckpoint] = {}
    replaced = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            earlier = last_by_folder.get(callback.dirpath)
            if earlier is not None:
                replaced.append(earlier)
            last_by_folder[callback.dirpath] = callback
    if replaced:
        trainer.callbacks = [c for c in trainer.callbacks if not any(c is r for r in replaced)]
    return replaced


class PreemptionCheckpoint(L.Callback):
    """Checkpoint, requeue and stop at the first step boundary after SIGUSR1, SIGTERM or SIGINT.

    At the end of every optimizer step the ranks agree (one tiny all-reduce) whether any of them
    received a signal; if so, all of them write ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` (through
    the trainer's checkpoint IO: atomic with ``nested fit``), keep the ``keep`` newest hpc files,
    requeue the SLURM job if the signal was the requeue signal, and stop training. Unless that step
    was the last one, ``stopped_early`` is then true, no validation and no epoch-end checkpoint follow
    the stop (a signal that arrives during a validation is acted on at the end of the step after it:
    keep a validation shorter than SLURM's warning), :class:`~nested.callbacks.AdapterExport`
    exports the adapter as ``step=<N>`` with ``"complete": false`` instead of ``last``, and
    ``nested fit`` exits with status 75.

    Args:
        requeue: run ``scontrol requeue <job id>`` (global rank 0) after a requeue signal. None:
            when the trainer runs in a ``SLURMEnvironment`` with ``auto_requeue``.
        requeue_signal: the signal meaning "time is almost up" (SLURM: ``--signal=USR1@90``).
        keep: hpc checkpoints to keep (older ones are deleted after a successful write).

    It moves itself after the other callbacks (before Lightning's checkpoint callbacks) at setup,
    so the step's EMA update is in the checkpoint. (Not a ``Checkpoint`` subclass: that would
    suppress Lightning's default ModelCheckpoint.)
    """

    def __init__(self, requeue: bool | None = None, requeue_signal: str = "SIGUSR1", keep: int = 2) -> None:
        if keep < 1:
            raise ConfigError(
                f"keep={keep} must be >= 1: the newest hpc checkpoint is the one to resume from"
            )
        self.requeue = requeue
        self.requeue_signal = requeue_signal
        self.keep = keep
        self.saved_path: Path | None = None
        self.requeued = False
        self.stopped_early = False
        self._stopping = False
        self._ignoring_sigterm = False
        self._registered: tuple[Any, Any] | None = None  # the signal connector and its own register method
        self._limit_val_batches: int | float | None = None  # the trainer's, while a stop turns validation off

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.stopped_early = self._stopping = self.requeued = self._ignoring_sigterm = False
        self.saved_path = None
        # Rebinding (not mutating) the list: Lightning is iterating the old one right now.
        others = [c for c in trainer.callbacks if c is not self and not isinstance(c, Checkpoint)]
        trainer.callbacks = [*others, self, *(c for c in trainer.callbacks if isinstance(c, Checkpoint))]
        if stage != "fit":
            return
        if trainer.min_steps or trainer.min_epochs:
            given = [f"trainer.min_steps={trainer.min_steps}"] if trainer.min_steps else []
            if trainer.min_epochs and not (
                trainer.min_steps and trainer.min_epochs == 1
            ):  # 1: Lightning's, for min_steps
                given.append(f"trainer.min_epochs={trainer.min_epochs}")
            raise ConfigError(
                f"{', '.join(given)}: Lightning trains on "
                "after a stop signal until they are reached, past the checkpoint the stop wrote; a preemption-safe "
                "run sets neither (max_steps / max_epochs end it)"
            )
        self._install_after_lightning(trainer)

    def _install_after_lightning(self, trainer: L.Trainer) -> None:
        """Install the flags right after Lightning registers its own handlers, just before the run stage.

        Lightning's SIGTERM handler records the signal, and from the next step on its loops raise
        SIGTERMException: a SystemExit with status 0, after none of this callback's work. Reinstalled only at
        the first training hook, the flags would leave that handler in charge while the data loaders start and
        the other callbacks' ``on_train_start`` run (every start of a requeued job).
        """
        connector = trainer._signal_connector
        register = connector.register_signal_handlers

        def register_then_flags() -> None:
            register()
            self._install()

        # What the connector held before: its class's method (nothing of its own) or someone else's wrapper.
        self._registered = (connector, vars(connector).get("register_signal_handlers"))
        connector.register_signal_handlers = register_then_flags

    def _restore(self, trainer: L.Trainer) -> None:
        """Give the trainer back its own signal registration and validation setting."""
        if self._registered is not None:
            connector, own = self._registered
            if own is None:
                del connector.register_signal_handlers
            else:
                connector.register_signal_handlers = own
            self._registered = None
        if self._limit_val_batches is not None:
            trainer.limit_val_batches, self._limit_val_batches = self._limit_val_batches, None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Lightning runs no teardown hook after an exception: what teardown does, here.
        self._restore(trainer)
        clear_signals()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore(trainer)
        # Runs after the other callbacks' teardown (HubUpload's wait among them), during which a second signal
        # still ends the process at once. A later fit in this process starts with no signal pending.
        if self._ignoring_sigterm:  # Lightning's signal teardown, just before, put back the handlers it found
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
        clear_signals()

    def _requeue(self, trainer: L.Trainer) -> None:
        """Requeue the SLURM job (global rank 0), right after the stop's checkpoint, so that nothing after it
        can cost the requeue. SLURM answers with SIGTERM to every process of the job, then SIGKILL after its
        ``KillWait`` (30 s by default): every rank ignores that SIGTERM from here on, which leaves the stop's
        export, the checkpoint callbacks' saves of the step and the Hub upload (``grace_seconds``) that long."""
        previous = None
        with contextlib.suppress(ValueError):  # not the main thread
            previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self._ignoring_sigterm = True
        if trainer.is_global_zero:
            self.requeued = _scontrol_requeue()
        if not trainer.strategy.broadcast(self.requeued):  # no requeue: a SIGTERM stops the process again
            self._ignoring_sigterm = False
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[LOGGED_RUN_KEY] = logged_run(trainer)  # the folder a resumed run goes on logging to

    def _install(self) -> None:
        install_signal_flags(tuple(dict.fromkeys((self.requeue_signal, *STOP_SIGNALS))))

    def _should_requeue(self, trainer: L.Trainer) -> bool:
        if self.requeue is not None:
            return self.requeue
        environment = trainer._accelerator_connector.cluster_environment
        return isinstance(environment, SLURMEnvironment) and environment.auto_requeue

    def _agree(self, pl_module: L.LightningModule) -> tuple[bool, bool]:
        """(requeue signal, any stop signal) received on ANY rank."""
        received = received_signals()
        requeue_signum = getattr(signal, self.requeue_signal, None)
        flags = torch.tensor(
            [int(requeue_signum in received), int(bool(received))], dtype=torch.int32, device=pl_module.device
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        accumulating = (batch_idx + 1) % trainer.accumulate_grad_batches != 0
        if accumulating and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # a checkpoint inside an accumulation window would lose the accumulated gradients
        if self._stopping:
            return  # this stop is checkpointed already
        requeue_signal, stop = self._agree(pl_module)
        if not stop:
            return
        root = Path(trainer.default_root_dir)
        existing = hpc_checkpoints(root)
        number = int(_HPC.match(existing[-1].name).group(1)) + 1 if existing else 1
        path = trainer.strategy.broadcast(str(root / f"hpc_ckpt_{number}.ckpt"))
        # Set before the checkpoint is written: AdapterExport exports the adapter beside it, marked partial.
        self.stopped_early = not training_finished(trainer)
        self._stopping = True
        trainer.save_checkpoint(path, weights_only=False)
        self.saved_path = Path(path)
        if trainer.is_global_zero:
            for old in hpc_checkpoints(root)[: -self.keep]:
                old.unlink(missing_ok=True)
        if requeue_signal and self.stopped_early and self._should_requeue(trainer):
            self._requeue(trainer)
        rank_zero_info(
            f"preemption: stop signal received; checkpoint {path} written at step {trainer.global_step}"
            + ("; job requeued" if self.requeued else "")
            + ("" if self.stopped_early else "; training is done")
        )
        trainer.should_stop = True
        # Once the stop is checkpointed, Lightning still validates (it does whenever should_stop is set, besides
        # a validation due at that step) and ends the epoch, whose checkpoints (last.ckpt) would record the cut
        # epoch as finished: resumed from, a run with max_epochs would end at once. Neither happens (here and in
        # on_train_epoch_end); the checkpoint callbacks' own saves of the step, mid-epoch like the hpc one, do.
        # A stop at the last step ends the run as it would have ended anyway.
        if self.stopped_early:
            self._limit_val_batches = trainer.limit_val_batches
            trainer.limit_val_batches = 0  # Trainer.enable_validation reads it: no validation from here on

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run that ends between its checkpoint callbacks' saves (max_steps not a multiple of their interval)
        # would leave its newest checkpoint steps behind its export: the same command again would train those
        # steps again. Their "last" checkpoint is written at the final step, as a save at that step would.
        if self.stopped_early or not training_finished(trainer):
            return
        for callback in trainer.checkpoint_callbacks:
            behind = (
                isinstance(callback, ModelCheckpoint)
                and callback._last_global_step_saved < trainer.global_step
            )
            if behind and callback.save_last is True:  # "link" only links an earlier checkpoint
                callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before the checkpoint callbacks' epoch-end saves (they come after this callback): see on_train_batch_end.
        if self.stopped_early:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    # ModelCheckpoint skips the saves of a step it saved at; this step's state is in the hpc file.
                    callback._last_global_step_saved = trainer.global_step
                    # And its save at the end of training, of a last.ckpt when it wrote none yet in this run.
                    callback._last_checkpoint_saved = callback._last_checkpoint_saved or str(self.saved_path)


def training_finished(trainer: L.Trainer) -> bool:
    """Whether the step that just ended was the last one of the fit (``max_steps``, or the last batch of
    the ``max_epochs``-th epoch)."""
    if trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return True
    last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    max_epochs = trainer.max_epochs
    return bool(
        last_batch and max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
    )


def _scontrol_requeue() -> bool:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job or not re.fullmatch(r"[0-9_]+", job):
        rank_zero_warn(f"preemption: cannot requeue: no usable SLURM job id ({job!r})")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        rank_zero_warn(f"preemption: `scontrol requeue {job}` failed: {exc!r}")
        return False
    if result.returncode != 0:
        rank_zero_warn(
            f"preemption: `scontrol requeue {job}` exited {result.returncode}: {result.stderr.strip()}"
        )
        return False
    return True

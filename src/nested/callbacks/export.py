"""``AdapterExport``: the inference-ready adapter folder at every checkpoint and at the end of fit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from nested.adapter import NestedAdapter
from nested.callbacks.ema import ema_callback
from nested.errors import ConfigError
from nested.files import remove_directory

__all__ = ["AdapterExport", "stopped_early"]


def stopped_early(trainer: L.Trainer) -> bool:
    """Whether a callback stopped this fit before its end and says so with a true ``stopped_early``
    attribute (``nested.training.resume.PreemptionCheckpoint`` does, after a stop signal)."""
    return any(getattr(callback, "stopped_early", False) for callback in trainer.callbacks)


class AdapterExport(L.Callback):
    """Write the inference-ready adapter folder at every checkpoint and at the end of fit.

    Folders: ``<dirpath>/step=<N>/`` at every checkpoint and ``<dirpath>/last/`` when the fit reaches
    its end (default ``dirpath``: ``<default_root_dir>/adapters``), each written atomically (temporary
    folder, then rename). With :class:`~nested.callbacks.AdapterEMA`, the averaged weights are exported. Each records
    ``"training": {"step", "complete"}`` in its ``adapter_config.json``: ``complete`` is true
    only in ``last/``.

    A fit stopped early (:func:`stopped_early`: a stop signal) never writes ``last/``, which keeps
    meaning "the final adapter of a completed run": its adapter so far goes to ``step=<N>/`` (also
    without ``every_checkpoint``), written with its checkpoint, before any SLURM requeue.

    Args:
        dirpath: where to write; default ``<trainer.default_root_dir>/adapters``.
        every_checkpoint: also export beside every checkpoint save (not only at the end).
        keep: keep only this many ``step=<N>/`` exports, the highest steps: once a new one is complete,
            older ones are deleted (each renamed aside first, so none is ever seen half-deleted). None keeps
            every one. ``last/`` and other folders are never deleted. Every ``step=<N>/`` of the folder
            counts: give each run a folder of its own (the default).
    """

    def __init__(self, dirpath: str | None = None, every_checkpoint: bool = True, keep: int | None = None):
        if keep is not None and keep < 1:
            raise ConfigError(f"export.keep must be at least 1 (or null to keep every export), got {keep}.")
        self.dirpath = dirpath
        self.every_checkpoint = every_checkpoint
        self.keep = keep
        self.last_path: Path | None = None
        self.partial_path: Path | None = None
        self._last_exported_step = -1
        self._trained = True  # whether this fit trained a step (set at its start)

    def export_root(self, trainer: L.Trainer) -> Path:
        """The folder the exports go to."""
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "adapters"

    def _adapter_to_export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> NestedAdapter:
        ema = ema_callback(trainer)
        return pl_module.adapter if ema is None else ema.averaged_adapter()

    def export(
        self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, complete: bool = False
    ) -> Path | None:
        """Write ``<root>/<name>/`` on global rank 0; returns the folder (None on other ranks)."""
        if not trainer.is_global_zero:
            return None
        training = {"step": trainer.global_step, "complete": complete}
        adapter = self._adapter_to_export(trainer, pl_module)
        return adapter.save_pretrained(self.export_root(trainer) / name, training=training)

    def _export_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        step = trainer.global_step
        path = self.export_root(trainer) / f"step={step}"
        if step != self._last_exported_step:
            self._last_exported_step = step
            if self.export(trainer, pl_module, path.name) is not None and self.keep is not None:
                self._delete_older_exports(path)
        return path

    def _delete_older_exports(self, newest: Path) -> None:
        """Delete the ``step=<N>/`` exports beyond the ``keep`` of highest step; never ``newest``."""
        steps = {}
        for folder in newest.parent.iterdir():
            match = re.fullmatch(r"step=(\d+)", folder.name)
            if match and folder.is_dir() and folder != newest:
                steps[folder] = int(match.group(1))
        for folder in sorted(steps, key=steps.get, reverse=True)[self.keep - 1 :]:
            try:
                remove_directory(folder)
            except OSError as error:  # a week's run does not end over an old export
                rank_zero_warn(f"nested: export.keep could not delete {folder} ({error}); training goes on")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.every_checkpoint or stopped_early(trainer):
            self._export_step(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trained = False

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self._trained = True

    def _last_is_current(self, trainer: L.Trainer) -> bool:
        """Whether ``last/`` already holds the completed run at this step (its export, from an earlier fit)."""
        try:
            config = json.loads((self.export_root(trainer) / "last" / "adapter_config.json").read_text())
        except (OSError, ValueError):
            return False
        return config.get("training") == {"step": trainer.global_step, "complete": True}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._trained and self._last_is_current(trainer):
            # A completed run started again: nothing trained, and the command's settings are not the run's.
            self.last_path = self.export_root(trainer) / "last"
            rank_zero_info(
                f"nested: nothing to train: the run already reached its end, at step {trainer.global_step}; its "
                f"adapter is in {self.last_path.resolve()}. To train on, raise --trainer.max_steps or "
                "--trainer.max_epochs, whichever ended it."
            )
            return
        if stopped_early(trainer):
            self.partial_path = self._export_step(trainer, pl_module)
            rank_zero_info(
                f"nested: training stopped early at step {trainer.global_step}; the adapter so far is in "
                f"{self.partial_path.resolve()} (adapters/last is written only when a run completes)."
            )
            return
        self.last_path = self.export(trainer, pl_module, "last", complete=True)
        if self.last_path is not None:
            rank_zero_info(f"nested: adapter exported to {self.last_path.resolve()}")

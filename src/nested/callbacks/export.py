"""``AdapterExport``: the inference-ready adapter folder at every checkpoint and at the end of fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from nested.adapter import NestedAdapter
from nested.callbacks.ema import AdapterEMA

__all__ = ["AdapterExport"]


class AdapterExport(L.Callback):
    """Write the inference-ready adapter folder at every checkpoint and at the end of fit.

    Folders: ``<dirpath>/step=<N>/`` and ``<dirpath>/last/`` (default ``dirpath``:
    ``<default_root_dir>/adapters``), each written atomically (temporary folder, then rename).
    With :class:`AdapterEMA`, the averaged weights are exported.

    Args:
        dirpath: where to write; default ``<trainer.default_root_dir>/adapters``.
        every_checkpoint: also export beside every checkpoint save (not only at the end).
    """

    def __init__(self, dirpath: str | None = None, every_checkpoint: bool = True):
        self.dirpath = dirpath
        self.every_checkpoint = every_checkpoint
        self.last_path: Path | None = None
        self._last_exported_step = -1

    def export_root(self, trainer: L.Trainer) -> Path:
        """The folder the exports go to."""
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "adapters"

    def _adapter_to_export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> NestedAdapter:
        for callback in trainer.callbacks:
            if isinstance(callback, AdapterEMA) and callback.averaged_adapter() is not None:
                return callback.averaged_adapter()
        return pl_module.adapter

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path | None:
        """Write ``<root>/<name>/`` on global rank 0; returns the folder (None on other ranks)."""
        if not trainer.is_global_zero:
            return None
        return self._adapter_to_export(trainer, pl_module).save_pretrained(self.export_root(trainer) / name)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        step = trainer.global_step
        if self.every_checkpoint and step != self._last_exported_step:
            self._last_exported_step = step
            self.export(trainer, pl_module, f"step={step}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_path = self.export(trainer, pl_module, "last")
        if self.last_path is not None:
            rank_zero_info(f"nested: adapter exported to {self.last_path.resolve()}")

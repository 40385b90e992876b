"""Lightning callbacks: inference-ready adapter export and EMA of the adapter weights."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities import rank_zero_info

from nested.adapter import NestedAdapter
from nested.hub import HubUpload  # re-exported: every callback of a preset is importable from here

__all__ = ["AdapterEMA", "AdapterExport", "HubUpload"]


class AdapterEMA(EMAWeightAveraging):
    """Exponential moving average of the adapter (Lightning's ``EMAWeightAveraging``).

    The averaged copy holds only the adapter: the frozen backbone lives outside the module tree and
    is shared, not copied. With this callback, checkpoints hold both the current and the averaged
    weights, validation runs on the averaged ones, and :class:`AdapterExport` exports them.

    Args:
        decay: EMA decay per update.
        update_every_n_steps: update period in optimizer steps.
        update_starting_at_step: first step that updates the average (earlier steps are copied).
    """

    def __init__(
        self, decay: float = 0.999, update_every_n_steps: int = 1, update_starting_at_step: int | None = None
    ):
        super().__init__(
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
        )

    def averaged_adapter(self) -> NestedAdapter | None:
        """The averaged adapter, or None before fit set it up."""
        average = getattr(self, "_average_model", None)
        return None if average is None else average.module.adapter


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

    def _root(self, trainer: L.Trainer) -> Path:
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
        return self._adapter_to_export(trainer, pl_module).save_pretrained(self._root(trainer) / name)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        step = trainer.global_step
        if self.every_checkpoint and step != self._last_exported_step:
            self._last_exported_step = step
            self.export(trainer, pl_module, f"step={step}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_path = self.export(trainer, pl_module, "last")
        if self.last_path is not None:
            rank_zero_info(f"nested: adapter exported to {self.last_path.resolve()}")

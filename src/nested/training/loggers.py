"""The logger ``nested fit`` uses unless told otherwise: Lightning's TensorBoard logger, whose writes refused by a
full disk, a quota or a read-only file system end as a :class:`~nested.errors.StorageError` naming its folder, as
the run's other files do. TensorBoard writes its events from a thread and reports a refused write at the next
flush, without the file's name; the first write is the event file's header, when the writer is made."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger

from nested.files import storage_refusals_named

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's ``TensorBoardLogger``, whose refused writes name its ``log_dir``."""

    @property
    def experiment(self) -> Any:  # made at first use, which writes the event file's header
        with storage_refusals_named(self.log_dir):
            return super().experiment

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        with storage_refusals_named(self.log_dir):
            super().log_metrics(metrics, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        with storage_refusals_named(self.log_dir):
            super().log_hyperparams(params, *args, **kwargs)

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        with storage_refusals_named(self.log_dir):
            super().log_graph(model, input_array)

    def save(self) -> None:
        with storage_refusals_named(self.log_dir):
            super().save()

    def finalize(self, status: str) -> None:
        with storage_refusals_named(self.log_dir):
            super().finalize(status)

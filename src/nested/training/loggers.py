"""The logger ``nested fit`` uses unless told otherwise: Lightning's TensorBoard logger, whose writes refused by a
full disk, a quota or a read-only file system end as a :class:`~nested.errors.StorageError` naming its folder, as
the run's other files do. TensorBoard writes its events from a thread and reports a refused write at the next
flush, without the file's name; the first write is the event file's header, when the writer is made.

A checkpoint records the folder its run logs to (:func:`logged_run`), and a run resumed from it goes on logging
there (:func:`continued_logger`): one run of TensorBoard's across every stop and resume, instead of a new
``version_N`` per start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger

from nested.files import storage_refusals_named

__all__ = ["LOGGED_RUN_KEY", "TensorBoardLogger", "continued_logger", "logged_run"]

# The checkpoint entry that names the TensorBoard folder of the run that wrote it.
LOGGED_RUN_KEY = "nested_logged_run"


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's ``TensorBoardLogger``, whose refused writes name its ``log_dir``. It logs no ``hp_metric``
    unless asked (``default_hp_metric=True``): Lightning's placeholder, -1 at step 0, which nothing here
    updates, and which a resumed run would log again at every start."""

    def __init__(self, *args: Any, default_hp_metric: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, default_hp_metric=default_hp_metric, **kwargs)

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


def logged_run(trainer: L.Trainer) -> dict[str, Any] | None:
    """Where the trainer's one TensorBoard logger writes: its ``name`` and ``version`` under its save folder (None
    for other loggers, or several)."""
    if len(trainer.loggers) != 1 or not isinstance(trainer.logger, LightningTensorBoardLogger):
        return None
    return {"name": trainer.logger.name, "version": trainer.logger.version}


def continued_logger(save_dir: str | Path, recorded: dict[str, Any] | None) -> TensorBoardLogger | None:
    """A logger that goes on writing the run ``recorded`` (:func:`logged_run`): None unless ``save_dir`` holds
    that run's folder. The steps the stopped run logged after its checkpoint are logged again, with the same
    values (a resume is exact): TensorBoard shows them once or twice, depending on its loader."""
    if not recorded:
        return None
    logger = TensorBoardLogger(save_dir=save_dir, name=recorded["name"], version=recorded["version"])
    return logger if Path(logger.log_dir).is_dir() else None

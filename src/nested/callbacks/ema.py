"""``AdapterEMA``: an exponential moving average of the adapter weights (Lightning's ``EMAWeightAveraging``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor

from nested.adapter import NestedAdapter

__all__ = ["AdapterEMA", "averaged_weights", "ema_callback"]


class AdapterEMA(EMAWeightAveraging):
    """Exponential moving average of the adapter (Lightning's ``EMAWeightAveraging``).

    The averaged copy holds only the adapter: the frozen backbone lives outside the module tree and
    is shared, not copied. With this callback, checkpoints hold both the current and the averaged
    weights (the last one, written after training ends, too: the trained weights as its current state),
    validation runs on the averaged ones, and :class:`AdapterExport` exports them. A checkpoint written
    with it resumes only with it (the module refuses it otherwise).

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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trained_state: dict[str, Tensor] | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning copies the average into the module here, before the last checkpoint is written: that
        # checkpoint must still hold the trained weights as its current state, or a run extended from it
        # would go on from the average.
        self._trained_state = {
            name: value.detach().cpu().clone() for name, value in pl_module.state_dict().items()
        }
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if getattr(self, "_trained_state", None) is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._trained_state

    def averaged_adapter(self) -> NestedAdapter | None:
        """The averaged adapter, or None before fit set it up."""
        average = getattr(self, "_average_model", None)
        return None if average is None else average.module.adapter


def ema_callback(trainer: L.Trainer) -> AdapterEMA | None:
    """The trainer's :class:`AdapterEMA` once fit has set up its average; None without one."""
    for callback in trainer.callbacks:
        if isinstance(callback, AdapterEMA) and callback.averaged_adapter() is not None:
            return callback
    return None


@contextlib.contextmanager
def averaged_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
    """The module holds the EMA average for the duration, then its trained weights again, exactly (the values
    are swapped, as Lightning does around validation); without :class:`AdapterEMA` nothing changes. What a
    run shows of its adapter (sample grids) is then what it exports."""
    ema = ema_callback(trainer)
    if ema is None:
        yield
        return
    ema._swap_models(pl_module)
    try:
        yield
    finally:
        ema._swap_models(pl_module)

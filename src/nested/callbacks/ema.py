"""``AdapterEMA``: an exponential moving average of the adapter weights (Lightning's ``EMAWeightAveraging``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from torch import Tensor

from nested.adapter import NestedAdapter
from nested.errors import ConfigError

__all__ = ["AdapterEMA", "averaged_weights", "ema_callback", "warmed_up_ema"]


class AdapterEMA(EMAWeightAveraging):
    """Exponential moving average of the adapter (Lightning's ``EMAWeightAveraging``).

    The averaged copy holds only the adapter: the frozen backbone lives outside the module tree and
    is shared, not copied. With this callback, checkpoints hold both the current and the averaged
    weights (the last one, written after training ends, too: the trained weights as its current state),
    validation runs on the averaged ones, and :class:`AdapterExport` exports them. A checkpoint written
    with it resumes only with it (the module refuses it otherwise).

    The decay warms up as diffusers' ``EMAModel`` does: after n updates it is ``min(decay, (1 + n) / (10 + n))``.
    A fixed 0.9999 would keep 61 % of the initial adapter in the average after 5,000 steps (``0.9999^5000``),
    and in every export and sample grid taken by then; warmed up, the average follows training from the
    start and averages over up to ``1 / (1 - decay)`` updates once ``n`` is large.

    Args:
        decay: the largest EMA decay per update, reached after about ``1 / (1 - decay)`` updates.
        update_every_n_steps: update period in optimizer steps.
        update_starting_at_step: first step that updates the average; that update copies the weights.
    """

    def __init__(
        self, decay: float = 0.999, update_every_n_steps: int = 1, update_starting_at_step: int | None = None
    ):
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"AdapterEMA decay must be in [0, 1], got {decay}.")
        # WeightAveraging's constructor, not EMAWeightAveraging's: that one gives torch's AveragedModel a fixed-decay
        # avg_fn, and AveragedModel takes one averaging function. EMAWeightAveraging's schedule is kept (its
        # should_update reads the three attributes below).
        WeightAveraging.__init__(self, multi_avg_fn=warmed_up_ema(decay))
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = None

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


def warmed_up_ema(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """An ``AveragedModel`` ``multi_avg_fn``: the tensors of one device and dtype (the adapter's, all floating
    point) move toward the model's by ``1 - d``, with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates."""

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        n = int(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1 + n) / (10 + n)))

    return update


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

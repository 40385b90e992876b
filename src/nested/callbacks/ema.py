"""``AdapterEMA``: an exponential moving average of the adapter weights (Lightning's ``EMAWeightAveraging``)."""

from __future__ import annotations

from lightning.pytorch.callbacks import EMAWeightAveraging

from nested.adapter import NestedAdapter

__all__ = ["AdapterEMA"]


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

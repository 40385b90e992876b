"""``DivergenceGuard``: an optimizer step whose gradients are not finite is skipped, and too many of them stop the
fit."""

from __future__ import annotations

from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.utils import get_total_norm

from nested.errors import ConfigError, DivergenceError

__all__ = ["DivergenceGuard"]

# The last steps over which max_skipped_share is counted.
SHARE_WINDOW = 1000
# Each of the first skips is reported; after them, every REPORT_EVERY-th.
REPORTED_IN_FULL = 10
REPORT_EVERY = 100


class DivergenceGuard(L.Callback):
    """Skip each optimizer step whose gradients hold a NaN or an infinity; stop the fit when they become the rule.

    One bad batch (a loss spike that overflows) should not end a week-long run, and a diverged run should not
    go on for days writing checkpoints and adapters of NaN weights. Before each optimizer step (after
    gradient accumulation and DDP's all-reduce, before clipping) the guard checks that every gradient is
    finite: one fused reduction, summed over the ranks so that they all decide alike, and one read on the
    host per step. If one is not, the step's gradients are dropped, so the optimizer leaves the weights and
    its own state (AdamW's moments, its step count) as they were. The step still counts: the global step
    and the learning-rate schedule advance, and an EMA averages the unchanged weights. Under ``16-mixed``
    the gradient scaler skips the steps it finds overflowing itself (and lowers its scale); the guard leaves
    their gradients to it and counts them.

    The fit stops with a :class:`~nested.errors.DivergenceError` (``nested fit``: one line, exit 2) at the
    first non-finite step after ``max_consecutive_skips`` skipped in a row, or once more than
    ``max_skipped_share`` of the last :data:`SHARE_WINDOW` steps were skipped. The weights are then those of
    the last step that updated them. Each of the first skips is reported, then every
    :data:`REPORT_EVERY`-th; ``train/skipped_steps`` logs the count at every step, and the counts are saved in
    checkpoints, so a resumed run goes on counting.

    Args:
        max_consecutive_skips: non-finite steps skipped in a row before the next one stops the fit (0: the
            first one stops it).
        max_skipped_share: the share of the last :data:`SHARE_WINDOW` steps that may be skipped.
    """

    def __init__(self, max_consecutive_skips: int = 20, max_skipped_share: float = 0.1) -> None:
        if max_consecutive_skips < 0:
            raise ConfigError(
                f"divergence.max_consecutive_skips must be >= 0 (0: stop at the first non-finite step); got "
                f"{max_consecutive_skips}."
            )
        if not 0 <= max_skipped_share <= 1:
            raise ConfigError(
                f"divergence.max_skipped_share must be between 0 and 1 (the share of the last {SHARE_WINDOW} "
                f"steps that may be skipped); got {max_skipped_share}."
            )
        self.max_consecutive_skips = max_consecutive_skips
        self.max_skipped_share = max_skipped_share
        self.skipped = 0  # this run's skipped steps, resumes included
        self.consecutive = 0  # skipped since the last step that updated the weights
        self.last_good_step: int | None = None  # the step count when the current run of skips began
        self.recent: deque[int] = deque()  # the skipped steps among the last SHARE_WINDOW

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params:
            # The largest |gradient|: NaN if any is NaN, and unlike a 2-norm it cannot overflow on finite values.
            largest = get_total_norm([p.grad for p in params], norm_type=float("inf"))
            ranks_not_finite = trainer.strategy.reduce((~torch.isfinite(largest)).float(), reduce_op="sum")
            if ranks_not_finite.item():
                self._skip(trainer, optimizer, params)
            else:
                self.consecutive = 0
                self.last_good_step = None
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)

    def _skip(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        step = trainer.global_step + 1  # the step being taken, counted like the checkpoints' step=<N>
        if self.consecutive == 0:
            self.last_good_step = trainer.global_step
        self.consecutive += 1
        self.skipped += 1
        self.recent.append(step)
        while self.recent[0] <= step - SHARE_WINDOW:
            self.recent.popleft()
        if self.consecutive > self.max_consecutive_skips:
            raise DivergenceError(
                self._diverged(
                    trainer,
                    optimizer,
                    f"at {self.consecutive} optimizer steps in a row, steps {self.last_good_step + 1} to {step}",
                )
            )
        if len(self.recent) > self.max_skipped_share * SHARE_WINDOW:
            raise DivergenceError(
                self._diverged(
                    trainer,
                    optimizer,
                    f"at {len(self.recent)} of the last {SHARE_WINDOW} optimizer steps, more than "
                    f"divergence.max_skipped_share={self.max_skipped_share:g} of them (steps {self.recent[0]} to "
                    f"{step})",
                )
            )
        # The optimizer skips a parameter without a gradient: no update, no state change. fp16's gradient scaler
        # skips the step itself, and needs the gradients to see their overflow.
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            for p in params:
                p.grad = None
        if self.skipped <= REPORTED_IN_FULL or self.skipped % REPORT_EVERY == 0:
            later = (
                f"; from now on every {REPORT_EVERY}th is reported"
                if self.skipped == REPORTED_IN_FULL
                else ""
            )
            rank_zero_warn(
                f"nested: step {step}: the gradients are not finite (NaN or infinite); the step is skipped, the "
                f"weights are unchanged ({self.consecutive} in a row, {self.skipped} in all{later})"
            )

    def _diverged(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer, where: str) -> str:
        rates = sorted({group["lr"] for group in optimizer.param_groups})
        fixes = (
            "train in bf16-mixed, whose range fp16 lacks, or with a lower learning rate"
            if str(trainer.precision) == "16-mixed"
            else "train with a lower learning rate"
        )
        return (
            f"training diverged: the gradients were not finite (NaN or infinite) {where}; the weights are those of "
            f"step {self.last_good_step}, and so are the checkpoints written since. To go on, {fixes} "
            f"(optimizer.init_args.lr; now {', '.join(f'{lr:g}' for lr in rates)}), from the start or from an adapter this run exported "
            "(--model.init_adapter), in another "
            "--trainer.default_root_dir: a resumed run restores its checkpoint's learning rate (another one is refused) "
            "and meets the same batches again (divergence.max_consecutive_skips and max_skipped_share set how many non-finite steps "
            "are skipped before the fit stops)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "consecutive": self.consecutive,
            "last_good_step": self.last_good_step,
            "recent": list(self.recent),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict["skipped"]
        self.consecutive = state_dict["consecutive"]
        self.last_good_step = state_dict["last_good_step"]
        self.recent = deque(state_dict["recent"])

"""``DivergenceGuard``: an optimizer step whose gradients are not finite is skipped, and a run of them stops the fit."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.utils import get_total_norm

from nested.errors import ConfigError, DivergenceError

__all__ = ["DivergenceGuard"]


class DivergenceGuard(L.Callback):
    """Skip each optimizer step whose gradients hold a NaN or an infinity; stop the fit after too many in a row.

    One bad batch (a loss spike that overflows) should not end a week-long run, and a diverged run should not
    go on for days writing checkpoints and adapters of NaN weights. Before each optimizer step (after
    gradient accumulation and DDP's all-reduce, before clipping) the guard reads whether every gradient is
    finite: one fused reduction and one read on the host per step. If one is not, the step's gradients are
    dropped, so the optimizer leaves the weights and its own state (AdamW's moments, its step count) as they
    were, and the EMA averages unchanged weights. The ranks agree on the decision (one all-reduce). Under
    ``16-mixed`` the gradient scaler skips its overflow steps itself; the guard counts them too.

    The fit stops with a :class:`~nested.errors.DivergenceError` (``nested fit``: one line, exit 2) at the first
    non-finite step after ``max_consecutive_skips`` skipped in a row. The weights are then those from before
    the first of them, and so are the checkpoints written meanwhile. The counts are logged
    (``train/skipped_steps``, every step) and saved in checkpoints, so a resumed run goes on counting.

    Args:
        max_consecutive_skips: non-finite steps skipped in a row before the next one stops the fit (0: the
            first one stops it).
    """

    def __init__(self, max_consecutive_skips: int = 20) -> None:
        if max_consecutive_skips < 0:
            raise ConfigError(
                f"divergence.max_consecutive_skips must be >= 0 (0: stop at the first non-finite step); got "
                f"{max_consecutive_skips}."
            )
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0  # this run's skipped steps, resumes included
        self.consecutive = 0  # skipped since the last step that updated the weights
        self.last_good_step: int | None = None  # the step count when the current run of skips began

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params:
            # The largest |gradient|: NaN if any is NaN, and unlike a 2-norm it cannot overflow on finite values.
            largest = get_total_norm([p.grad for p in params], norm_type=float("inf"))
            finite = trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(largest)), all=True)
            if finite:
                self.consecutive = 0
                self.last_good_step = None
            else:
                self._skip(trainer, optimizer, params)
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)

    def _skip(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        step = trainer.global_step + 1  # the step being taken, counted like the checkpoints' step=<N>
        if self.consecutive == 0:
            self.last_good_step = trainer.global_step
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive > self.max_consecutive_skips:
            raise DivergenceError(self._diverged(trainer, optimizer, step))
        for p in params:
            p.grad = None  # the optimizer skips a parameter without a gradient: no update, no state change
        rank_zero_warn(
            f"nested: step {step}: the gradients are not finite (NaN or infinite); the step is skipped, the weights "
            f"are unchanged ({self.consecutive} skipped in a row; the fit stops after "
            f"{self.max_consecutive_skips})"
        )

    def _diverged(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer, step: int) -> str:
        rates = sorted({group["lr"] for group in optimizer.param_groups})
        rate = ", ".join(f"{lr:g}" for lr in rates)
        fixes = [f"lower the learning rate (optimizer.init_args.lr; now {rate})"]
        if str(trainer.precision) == "16-mixed":
            fixes.append("train in bf16-mixed, whose range fp16 lacks")
        fixes.append("or resume from an earlier checkpoint with --ckpt_path")
        return (
            f"training diverged: the gradients were not finite (NaN or infinite) at {self.consecutive} optimizer "
            f"steps in a row, steps {self.last_good_step + 1} to {step}; the weights are those of step "
            f"{self.last_good_step}, and so are the checkpoints written since. To go on, {', '.join(fixes)} "
            "(divergence.max_consecutive_skips sets how many non-finite steps are skipped before the fit stops)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "consecutive": self.consecutive,
            "last_good_step": self.last_good_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict["skipped"]
        self.consecutive = state_dict["consecutive"]
        self.last_good_step = state_dict["last_good_step"]

"""``ProgressLog``: a line of training progress every minute, for logs that no progress bar reaches."""

from __future__ import annotations

import math
import sys
import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from nested.errors import ConfigError

__all__ = ["ProgressLog", "duration"]


def duration(seconds: float) -> str:
    """``seconds`` as ``2 d 03 h``, ``13 h 05 min``, ``4 min 10 s`` or ``12 s``."""
    seconds = round(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours:02d} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {seconds:02d} s"
    return f"{seconds} s"


class ProgressLog(L.Callback):
    """Log the step, loss, speed and time left at the first optimizer step, then every ``every_seconds``, and at
    the last step, on global rank 0.

    A progress bar redraws one terminal line; written to a file (a SLURM job's output, ``nohup``, a pipe) it
    shows nothing until the run ends. These lines, on standard error with the other ``nested:`` messages, are
    for such logs:

        nested: step 1200/100000 (1.2 %), epoch 0, train/loss 0.1234, 2.1 steps/s, 16.8 samples/s, 13 h 04 min left

    Speeds are measured since the previous line (samples over every rank, counted from the batches'
    captions); the time left assumes the last speed holds.

    Args:
        every_seconds: seconds between two lines (0: no lines at all).
        enabled: True: always; False: never; None: only when standard output is not a terminal (where the
            progress bar is not drawn live).
    """

    def __init__(self, every_seconds: float = 60.0, enabled: bool | None = None) -> None:
        if not every_seconds >= 0:
            raise ConfigError(f"progress_log.every_seconds must be >= 0 (0: no lines); got {every_seconds}.")
        self.every_seconds = every_seconds
        self.enabled = enabled
        self._active = False
        self._last: tuple[float, int, int] | None = None  # (time, step, samples) at the previous line
        self._samples = 0
        self._started = 0.0
        self._step = 0  # the optimizer steps taken at the last batch
        self._total: float = math.inf  # the optimizer steps of the whole fit

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        interactive = sys.stdout.isatty()
        wanted = self.enabled if self.enabled is not None else not interactive
        self._active = bool(wanted and self.every_seconds > 0 and trainer.is_global_zero)
        self._last, self._samples, self._started = None, 0, time.monotonic()
        self._step = trainer.global_step
        self._total = trainer.estimated_stepping_batches  # may set the data up: read once, not per step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if not self._active:
            return
        if isinstance(batch, dict) and "captions" in batch:
            self._samples += len(batch["captions"]) * trainer.world_size
        step = trainer.global_step
        if step == self._step:
            return  # a micro-batch of gradient accumulation: no optimizer step yet
        self._step, now, total = step, time.monotonic(), self._total
        if self._last is None:
            self._last = (now, step, self._samples)
            self._report(trainer, step, total, None)
        elif now - self._last[0] >= self.every_seconds or (step >= total > self._last[1]):
            then, last_step, last_samples = self._last
            elapsed = max(now - then, 1e-9)
            speed = ((step - last_step) / elapsed, (self._samples - last_samples) / elapsed)
            self._last = (now, step, self._samples)
            self._report(trainer, step, total, speed)

    def _report(self, trainer: L.Trainer, step: int, total: float, speed: tuple[float, float] | None) -> None:
        parts = [
            f"step {step}/{int(total)} ({100 * step / total:.1f} %)"
            if math.isfinite(total)
            else f"step {step}"
        ]
        parts.append(f"epoch {trainer.current_epoch}")
        if speed is None:
            parts.append(f"first step done {duration(time.monotonic() - self._started)} after the start")
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"train/loss {float(loss):.4g}")
        skipped = trainer.callback_metrics.get("train/skipped_steps")
        if skipped is not None and float(skipped):
            parts.append(f"{int(skipped)} steps skipped")
        if speed is not None:
            steps_per_s, samples_per_s = speed
            parts.append(f"{steps_per_s:.3g} steps/s")
            if samples_per_s:
                parts.append(f"{samples_per_s:.3g} samples/s")
            if steps_per_s > 0 and math.isfinite(total) and step < total:
                parts.append(f"{duration((total - step) / steps_per_s)} left")
        rank_zero_info("nested: " + ", ".join(parts))

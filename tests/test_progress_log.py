"""ProgressLog: progress lines at the first step, every N seconds and at the last step, with the speed and time
left measured between lines; only where no progress bar is drawn live, unless asked."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import lightning as L
import pytest
from test_divergence import Regression, _trainer

from nested.callbacks import progress_log
from nested.callbacks.progress_log import ProgressLog, duration
from nested.cli.main import main
from nested.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_duration_reads_like_a_clock():
    assert [duration(s) for s in (0, 12.4, 250, 47100, 183600)] == [
        "0 s",
        "12 s",
        "4 min 10 s",
        "13 h 05 min",
        "2 d 03 h",
    ]


class Clock(L.Callback):
    """Advances a fake monotonic clock by ``seconds`` at the end of every batch, before ProgressLog reads it."""

    def __init__(self, seconds: float) -> None:
        self.now, self.seconds = 0.0, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.now += self.seconds


def _progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("nested: step ")]


def test_lines_at_the_first_step_every_interval_and_the_last_step(monkeypatch, caplog):
    clock = Clock(25.0)
    monkeypatch.setattr(progress_log.time, "monotonic", lambda: clock.now)
    trainer = _trainer(8, clock, ProgressLog(every_seconds=60, enabled=True))
    with caplog.at_level(logging.INFO):
        trainer.fit(Regression({}))
    lines = _progress_lines(caplog)
    assert [int(re.match(r"nested: step (\d+)/8 ", line).group(1)) for line in lines] == [1, 4, 7, 8]
    assert lines[0] == "nested: step 1/8 (12.5 %), epoch 0, first step done 25 s after the start"
    # 3 steps in the 75 s since step 1; 4 steps left at that speed.
    assert lines[1] == "nested: step 4/8 (50.0 %), epoch 0, 0.04 steps/s, 1 min 40 s left"
    assert lines[3] == "nested: step 8/8 (100.0 %), epoch 0, 0.04 steps/s"


def test_only_where_standard_output_is_not_a_terminal_unless_asked(monkeypatch, caplog):
    def lines_when(isatty: bool, **options) -> int:
        caplog.clear()
        monkeypatch.setattr(sys.stdout, "isatty", lambda: isatty)
        trainer = _trainer(2, ProgressLog(**options))
        with caplog.at_level(logging.INFO):
            trainer.fit(Regression({}))
        return len(_progress_lines(caplog))

    assert lines_when(False) == 2  # the first step and the last
    assert lines_when(True) == 0
    assert lines_when(True, enabled=True) == 2
    assert lines_when(False, enabled=False) == 0
    assert lines_when(False, every_seconds=0) == 0
    with pytest.raises(ConfigError, match=r"progress_log.every_seconds must be >= 0 \(0: no lines\); got -1"):
        ProgressLog(every_seconds=-1)


def test_nested_fit_logs_progress_per_optimizer_step_with_samples_and_loss(tmp_path, caplog):
    argv = ["fit", "--config", str(REPO / "configs/smoke.yaml"), "--trainer.max_steps=3"]
    argv += ["--trainer.accumulate_grad_batches=2"]
    argv += [f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=0"]
    argv += [
        "--trainer.enable_progress_bar=false",
        "--progress_log.every_seconds=1e-9",
        "--progress_log.enabled=true",
    ]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    lines = _progress_lines(caplog)
    assert [line.split(",")[0] for line in lines] == [
        "nested: step 1/3 (33.3 %)",
        "nested: step 2/3 (66.7 %)",
        "nested: step 3/3 (100.0 %)",
    ]
    assert all(re.search(r", train/loss \d\.\d+", line) for line in lines)
    # One line per optimizer step, not per batch: 4 samples a batch (the smoke config), 2 batches a step.
    steps, samples = (
        float(x) for x in re.search(r", ([\d.e+-]+) steps/s, ([\d.e+-]+) samples/s", lines[1]).groups()
    )
    assert samples == pytest.approx(8 * steps, rel=0.01)
    assert lines[1].endswith(" left") and not lines[2].endswith(" left")

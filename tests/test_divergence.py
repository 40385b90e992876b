"""DivergenceGuard: a step with non-finite gradients leaves the weights and the optimizer's state as they were, a run
of them stops the fit with one line, the counts survive a resume, and `nested fit` never exports a diverged
adapter."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from nested.callbacks.divergence import DivergenceGuard
from nested.cli.main import main
from nested.errors import ConfigError, DivergenceError

REPO = Path(__file__).resolve().parents[1]


class Regression(L.LightningModule):
    """A linear regression whose loss is multiplied by ``broken[step]`` (NaN or infinity) at those steps (1-based,
    like the checkpoints' step=<N>), so that every gradient of the step is non-finite."""

    def __init__(self, broken: dict[int, float], fused: bool = False, warm_up: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.broken, self.fused, self.warm_up = broken, fused, warm_up

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = F.mse_loss(self.layer(inputs), targets)
        return loss * self.broken.get(self.global_step + 1, 1.0)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.05, fused=self.fused or None)
        if not self.warm_up:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / self.warm_up)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(64, 4, generator=generator), torch.randn(64, 1, generator=generator))
        return DataLoader(data, batch_size=4)


class Recorder(L.Callback):
    """The weights, AdamW's step count and the learning rate after every optimizer step."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}
        self.optimizer_steps: dict[int, float] = {}
        self.rates: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        self.rates[step] = trainer.optimizers[0].param_groups[0]["lr"]
        self.weights[step] = torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone()
        states = trainer.optimizers[0].state.values()
        self.optimizer_steps[step] = max((float(state["step"]) for state in states), default=0.0)


def _trainer(max_steps: int, *callbacks: L.Callback, **kwargs) -> L.Trainer:
    settings = dict(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    return L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=list(callbacks), **(settings | kwargs))


def test_skipped_steps_leave_weights_and_optimizer_as_if_their_batches_were_never_seen():
    broken = {3: math.nan, 4: math.inf, 7: math.nan}
    guard, recorder = DivergenceGuard(max_consecutive_skips=2), Recorder()
    module = Regression(broken)
    trainer = _trainer(8, guard, recorder)
    trainer.fit(module)

    for step in broken:
        assert torch.equal(recorder.weights[step], recorder.weights[step - 1]), step
        assert recorder.optimizer_steps[step] == recorder.optimizer_steps[step - 1], step
    for step in (1, 2, 5, 6, 8):
        assert not torch.equal(
            recorder.weights[step], recorder.weights.get(step - 1, recorder.weights[step] + 1)
        )
    assert recorder.optimizer_steps[8] == 5
    assert (guard.skipped, guard.consecutive, guard.last_good_step) == (3, 0, None)
    assert trainer.callback_metrics["train/skipped_steps"] == 3

    # The reference: the same batches in a plain loop that leaves the broken ones out.
    reference = Regression({})
    optimizer = reference.configure_optimizers()
    for step, (inputs, targets) in enumerate(reference.train_dataloader(), start=1):
        if step > 8:
            break
        if step in broken:
            continue
        F.mse_loss(reference.layer(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(torch.cat([p.detach().flatten() for p in reference.parameters()]), recorder.weights[8])


def test_a_run_of_non_finite_steps_stops_the_fit_with_the_weights_of_the_last_good_step():
    guard, recorder = DivergenceGuard(max_consecutive_skips=2), Recorder()
    module = Regression(dict.fromkeys(range(3, 20), math.nan))
    with pytest.raises(DivergenceError) as error:
        _trainer(10, guard, recorder).fit(module)
    message = str(error.value)
    assert message.startswith(
        "training diverged: the gradients were not finite (NaN or infinite) at 3 optimizer steps in a row, steps "
        "3 to 5; the weights are those of step 2"
    )
    assert (
        "To go on, train with a lower learning rate (optimizer.init_args.lr; now 0.05), from the start or from an adapter this run exported "
        in (message)
    )
    assert "bf16-mixed" not in message  # only a 16-mixed run is told about bf16
    assert max(recorder.weights) == 4  # steps 3 and 4 were skipped, step 5 raised
    current = torch.cat([p.detach().flatten() for p in module.parameters()])
    assert torch.equal(current, recorder.weights[2])


def test_a_skipped_step_still_advances_the_learning_rate_schedule():
    recorder = Recorder()
    _trainer(6, DivergenceGuard(), recorder).fit(Regression({2: math.nan, 3: math.nan}, warm_up=4))
    assert [recorder.rates[step] for step in range(1, 6)] == pytest.approx([0.025, 0.0375, 0.05, 0.05, 0.05])
    assert torch.equal(recorder.weights[3], recorder.weights[1])


def test_huge_finite_gradients_are_not_skipped():
    # Gradients near 1e30: their 2-norm overflows float32, their largest entry does not.
    guard, recorder = DivergenceGuard(max_consecutive_skips=0), Recorder()
    _trainer(4, guard, recorder).fit(Regression({3: 1e30}))
    assert guard.skipped == 0
    assert not torch.equal(recorder.weights[3], recorder.weights[2])


def test_skips_that_alternate_with_good_steps_stop_the_fit_by_their_share():
    broken = dict.fromkeys(range(2, 200, 2), math.nan)
    guard, recorder = DivergenceGuard(max_consecutive_skips=3, max_skipped_share=0.01), Recorder()
    with pytest.raises(DivergenceError) as error:
        _trainer(100, guard, recorder).fit(Regression(broken))
    assert str(error.value).startswith(
        "training diverged: the gradients were not finite (NaN or infinite) at 11 of the last 1000 optimizer steps, "
        "more than divergence.max_skipped_share=0.01 of them (steps 2 to 22); the weights are those of step 21"
    )
    assert max(recorder.weights) == 21


def test_only_the_last_thousand_steps_count_toward_the_share():
    # 8 skips near the start and 8 more 1200 steps later: 16 in all, never more than 10 within 1000 steps.
    broken = dict.fromkeys([*range(2, 18, 2), *range(1202, 1218, 2)], math.nan)
    guard = DivergenceGuard(max_consecutive_skips=3, max_skipped_share=0.01)
    _trainer(1220, guard).fit(Regression(broken))
    assert guard.skipped == 16 and list(guard.recent) == list(range(1202, 1218, 2))


def test_the_first_skips_are_reported_then_every_hundredth():
    broken = dict.fromkeys(range(2, 402, 2), math.nan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(400, DivergenceGuard(max_skipped_share=1.0)).fit(Regression(broken))
    reports = [str(w.message) for w in caught if "the gradients are not finite" in str(w.message)]
    assert len(reports) == 10 + 2  # skips 1 to 10, 100 and 200
    assert reports[9].endswith("(1 in a row, 10 in all; from now on every 100th is reported)")
    assert reports[10].startswith("nested: step 200: ") and reports[11].startswith("nested: step 400: ")


def test_zero_stops_at_the_first_non_finite_step_and_a_negative_count_is_refused():
    with pytest.raises(
        DivergenceError, match="at 1 optimizer steps in a row, steps 4 to 4; the weights are those of"
    ):
        _trainer(6, DivergenceGuard(max_consecutive_skips=0)).fit(Regression({4: math.inf}))
    with pytest.raises(ConfigError, match=r"divergence.max_consecutive_skips must be >= 0 .*got -1"):
        DivergenceGuard(max_consecutive_skips=-1)
    with pytest.raises(ConfigError, match=r"divergence.max_skipped_share must be between 0 and 1 .*got 1.5"):
        DivergenceGuard(max_skipped_share=1.5)


def test_the_count_of_skips_in_a_row_survives_a_resume(tmp_path):
    broken = dict.fromkeys(range(3, 20), math.nan)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    first = DivergenceGuard(max_consecutive_skips=2)
    _trainer(4, first, checkpoints, enable_checkpointing=True).fit(Regression(broken))
    assert (first.skipped, first.consecutive, first.last_good_step) == (2, 2, 2)

    resumed = DivergenceGuard(max_consecutive_skips=2)
    with pytest.raises(DivergenceError, match="at 3 optimizer steps in a row, steps 3 to 5;"):
        _trainer(10, resumed).fit(Regression(broken), ckpt_path=tmp_path / "last.ckpt")


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_fp16_gradient_scaler_skips_the_step_itself_and_the_guard_counts_it(fused):
    # A fused AdamW unscales inside its own step: the scaler must still find the gradients to see the overflow.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard, recorder = DivergenceGuard(max_consecutive_skips=3), Recorder()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    _trainer(5, guard, recorder, plugins=[plugin]).fit(Regression({3: math.inf}, fused=fused))
    assert torch.equal(recorder.weights[3], recorder.weights[2])
    assert not torch.equal(recorder.weights[4], recorder.weights[3])
    assert guard.skipped == 1
    assert scaler.get_scale() == 512.0  # the scaler saw the overflow and halved its scale


def test_nested_fit_stops_a_diverged_run_in_one_line_without_exporting_it(tmp_path, capsys):
    root = tmp_path / "run"
    argv = ["fit", "--config", str(REPO / "configs/smoke.yaml"), "--optimizer.init_args.lr=1e20"]
    argv += ["--trainer.max_steps=60", f"--trainer.default_root_dir={root}", "--trainer.limit_val_batches=0"]
    argv += ["--trainer.enable_progress_bar=false", "--divergence.max_consecutive_skips=3"]
    skipped = "the gradients are not finite \\(NaN or infinite\\); the step is skipped"
    with pytest.raises(SystemExit) as exit_info, pytest.warns(UserWarning, match=skipped):
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(
        "nested fit: error: training diverged: the gradients were not finite (NaN or infinite) at 4"
    )
    assert "train with a lower learning rate (optimizer.init_args.lr; now 1e+20), from the start" in last
    assert not (root / "adapters").exists()  # nothing exported, nor uploaded, from the diverged weights

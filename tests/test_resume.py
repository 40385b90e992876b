"""Exact resume in one process, atomic checkpoint writes, and which checkpoint a run resumes from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from nested.callbacks import AdapterEMA
from nested.data import DomainSpec, NestedDataModule
from nested.encoder import EncoderSpec
from nested.errors import AdapterError, ConfigError
from nested.signals import received_signals
from nested.training.module import NestedAttentionModule
from nested.training.resume import (
    AtomicCheckpointIO,
    PreemptionCheckpoint,
    checkpoint_step,
    drop_replaced_checkpoint_callbacks,
    find_resume_checkpoint,
    partial_path,
)

REPO = Path(__file__).resolve().parents[1]
SHARDS = str(REPO / "data" / "demo" / "faces" / "shards.json")
VAL_SHARDS = str(REPO / "data" / "demo" / "faces" / "val" / "shards.json")
STEPS = 6  # epochs of 4 batches (8 samples, batch 2): every resumed run crosses into epoch 1


class ScheduledModule(NestedAttentionModule):
    """The module with a per-step warm-up schedule, so the scheduler state must resume too."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


ADAMW = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}
ADAMW_8BIT = {"class_path": "torchao.optim.AdamW8bit", "init_args": {"lr": 1e-3}}


def make_module(model: Path, optimizer: dict = ADAMW) -> NestedAttentionModule:
    spec = EncoderSpec(backbone=str(model / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2)
    return ScheduledModule(str(model), spec, subjects={"<person>": "person"}, seed=3, optimizer=optimizer)


def make_data(num_workers: int = 2, validation: bool = False) -> NestedDataModule:
    return NestedDataModule(
        [DomainSpec("faces", SHARDS, "<person>")],
        val_domains=[DomainSpec("faces", VAL_SHARDS, "<person>")] if validation else None,
        resolution=64,
        reference_size=32,
        batch_size=2,
        num_workers=num_workers,
        epoch_samples=8,
        shuffle_buffer=8,
        open_shards=2,
        seed=5,
    )


class SigtermAt(L.Callback):
    """Sends SIGTERM to this process after step ``step``, as scancel or a preemption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class Record(L.Callback):
    """Keys of every batch, and the current + EMA weights after the last step."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, tuple[str, ...]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keys.append((trainer.global_step, tuple(batch["keys"])))
        ema = next(c for c in trainer.callbacks if isinstance(c, AdapterEMA))
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.ema = {k: v.clone() for k, v in ema.averaged_adapter().state_dict().items()}


def fit(
    model: Path,
    root: Path,
    *,
    sigterm_at: int | None = None,
    num_workers: int = 2,
    steps: int = STEPS,
    optimizer: dict = ADAMW,
    accelerator: str = "cpu",
    callbacks: tuple[L.Callback, ...] = (),
    max_epochs: int | None = None,
    checkpoint_every: int | None = None,
    validate_every: int | None = None,
    resume_from: Path | None = None,
):
    """``checkpoint_every``: a ModelCheckpoint with ``last.ckpt`` in ``root/checkpoints`` every so many steps;
    ``validate_every``: one validation batch every so many steps; ``resume_from``: instead of the newest."""
    L.seed_everything(0, verbose=False)  # as `nested fit` does: the adapter's initial weights
    record = Record()
    callbacks = [AdapterEMA(decay=0.9), record, PreemptionCheckpoint(), *callbacks]
    if sigterm_at is not None:
        callbacks.append(SigtermAt(sigterm_at))
    if checkpoint_every is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=root / "checkpoints",
                every_n_train_steps=checkpoint_every,
                save_last=True,
                save_top_k=-1,
            )
        )
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=-1 if max_epochs is not None else steps,
        max_epochs=max_epochs,
        default_root_dir=str(root),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoint_every is not None,
        val_check_interval=validate_every,
        limit_val_batches=1 if validate_every else 0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    resume = None if sigterm_at is not None else find_resume_checkpoint(root)
    data = make_data(num_workers, validation=validate_every is not None)
    trainer.fit(make_module(model, optimizer), datamodule=data, ckpt_path=resume_from or resume)
    return trainer, record


def test_resume_is_bit_identical_mid_epoch_and_at_an_epoch_end(tiny_sd_path, tmp_path):
    """SIGTERM at step 3 (mid-epoch, odd: the next batch was due from worker 1) and at step 4 (an
    epoch's last batch); the resumed runs end with the weights, EMA and batches of an
    uninterrupted one (LR warm-up, AdamW, EMA, 2 workers, seeded dropout/noise)."""
    _, full = fit(tiny_sd_path, tmp_path / "full")
    for stop in (3, 4):
        root = tmp_path / f"stop{stop}"
        first_trainer, first = fit(tiny_sd_path, root, sigterm_at=stop)
        assert first_trainer.global_step == stop
        assert [p.name for p in root.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]
        trainer, resumed = fit(tiny_sd_path, root)
        assert trainer.global_step == STEPS
        assert first.keys + resumed.keys == full.keys, f"stop at {stop}: the data stream diverged"
        for name, value in full.weights.items():
            assert torch.equal(resumed.weights[name], value), f"stop at {stop}: {name} differs"
        for name, value in full.ema.items():
            assert torch.equal(resumed.ema[name], value), f"stop at {stop}: EMA {name} differs"


class SigtermAtTrainStart(L.Callback):
    """SIGTERM from ``on_train_start``: between Lightning's own signal handlers and the first step (the data
    loaders starting, other callbacks' start hooks), as on every start of a requeued job."""

    def on_train_start(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_before_the_first_step_checkpoints_after_it_and_stops_early(tiny_sd_path, tmp_path):
    trainer, _ = fit(tiny_sd_path, tmp_path, num_workers=0, callbacks=(SigtermAtTrainStart(),))
    preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
    assert trainer.global_step == 1 and preemption.stopped_early
    assert (
        preemption.saved_path == tmp_path / "hpc_ckpt_1.ckpt" and checkpoint_step(preemption.saved_path) == 1
    )
    assert not trainer.received_sigterm  # Lightning's handler never saw it: no SIGTERMException


class ValidationSteps(L.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_start(self, trainer, pl_module) -> None:
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize("stop", [3, 2], ids=["between-checkpoints", "at-a-checkpoint-step"])
def test_a_stop_runs_no_validation_and_leaves_last_ckpt_where_a_resume_finishes_the_epoch(
    tiny_sd_path, tmp_path, stop
):
    """max_epochs=1 (4 steps), a checkpoint and a validation due every 2 steps; SIGTERM at step 3 or 2. Lightning
    validates and ends the epoch when a run stops: no validation follows the stop (not even one due at its step),
    the step's own checkpoint is written, the epoch-end one is not: last.ckpt is at step 2, and resuming from it
    (--ckpt_path) trains steps 3 and 4 as an uninterrupted run does, instead of finding the cut epoch finished."""
    options = dict(num_workers=0, max_epochs=1, checkpoint_every=2, validate_every=2)
    _, full = fit(tiny_sd_path, tmp_path / "full", **options)
    validations = ValidationSteps()
    root = tmp_path / "stopped"
    stopped, _ = fit(tiny_sd_path, root, sigterm_at=stop, callbacks=(validations,), **options)
    assert stopped.global_step == stop and validations.steps == [2] * (stop == 3)
    assert checkpoint_step(root / "hpc_ckpt_1.ckpt") == stop
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert checkpoint_step(root / "checkpoints" / "last.ckpt") == 2
    assert stopped.limit_val_batches == 1  # the trainer's own setting, back after the stop
    resumed, record = fit(tiny_sd_path, root, resume_from=root / "checkpoints" / "last.ckpt", **options)
    assert resumed.global_step == 4 and record.keys == full.keys[2:]
    for name, value in full.weights.items():
        assert torch.equal(record.weights[name], value), name


def test_a_stop_before_the_first_checkpoint_leaves_no_last_ckpt(tiny_sd_path, tmp_path):
    """Lightning writes last.ckpt when training ends if it wrote none in the run: after a stop, that one would
    record the cut epoch as finished."""
    options = dict(num_workers=0, max_epochs=1, checkpoint_every=2)
    stopped, _ = fit(tiny_sd_path, tmp_path, sigterm_at=1, **options)
    assert stopped.global_step == 1 and checkpoint_step(tmp_path / "hpc_ckpt_1.ckpt") == 1
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_a_stop_at_the_last_step_keeps_the_runs_final_validation_and_checkpoint(tiny_sd_path, tmp_path):
    validations = ValidationSteps()
    options = dict(num_workers=0, max_epochs=1, checkpoint_every=2, validate_every=2)
    trainer, _ = fit(tiny_sd_path, tmp_path, sigterm_at=4, callbacks=(validations,), **options)
    preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
    assert trainer.global_step == 4 and not preemption.stopped_early
    assert validations.steps == [2, 4] and checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 4


class FailAtTrainEnd(L.Callback):
    """Raises after training, as a failing export or upload would; keeps the trainer for the test."""

    def setup(self, trainer, pl_module, stage) -> None:
        self.trainer = trainer

    def on_train_end(self, trainer, pl_module) -> None:
        raise RuntimeError("after the stop")


def test_a_fit_that_raises_after_a_stop_gives_the_trainer_back_its_settings(tiny_sd_path, tmp_path):
    failing = FailAtTrainEnd()
    with pytest.raises(RuntimeError, match="after the stop"):
        fit(tiny_sd_path, tmp_path, num_workers=0, sigterm_at=2, validate_every=2, callbacks=(failing,))
    trainer = failing.trainer
    assert trainer.global_step == 2 and trainer.limit_val_batches == 1
    assert "register_signal_handlers" not in vars(trainer._signal_connector)  # Lightning's own method again
    assert not received_signals()  # the next fit in this process starts with no stop pending


def test_min_steps_is_refused_since_lightning_trains_on_after_a_stop(tiny_sd_path, tmp_path):
    trainer = L.Trainer(
        max_steps=4,
        min_steps=3,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        callbacks=[PreemptionCheckpoint()],
    )
    with pytest.raises(ConfigError, match=r"^trainer.min_steps=3: Lightning trains on"):
        trainer.fit(make_module(tiny_sd_path), datamodule=make_data(0))
    trainer = L.Trainer(
        max_epochs=4,
        min_epochs=2,
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[PreemptionCheckpoint()],
    )
    with pytest.raises(ConfigError, match=r"^trainer.min_epochs=2: Lightning trains on"):
        trainer.fit(make_module(tiny_sd_path), datamodule=make_data(0))


def test_an_ema_checkpoint_written_after_training_keeps_the_trained_weights_and_needs_the_ema(
    tiny_sd_path, tmp_path
):
    """Lightning copies the average into the module when training ends, before the last checkpoint is written:
    that checkpoint must still hold the trained weights as its current state. And a run without the EMA must
    not resume it: it would load the average as the trained weights."""
    trainer, record = fit(tiny_sd_path, tmp_path / "run", steps=2, num_workers=0)
    trainer.save_checkpoint(tmp_path / "last.ckpt")  # as ModelCheckpoint's last.ckpt at the end of training
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    for name, value in record.weights.items():
        assert torch.equal(checkpoint["current_model_state"][name], value), name
        assert torch.equal(checkpoint["state_dict"][name], record.ema[name.removeprefix("adapter.")]), name
    assert any(
        not torch.equal(record.weights[n], record.ema[n.removeprefix("adapter.")]) for n in record.weights
    )

    plain = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False)
    with pytest.raises(AdapterError, match=r"written with an average of the weights \(callbacks/ema.yaml"):
        plain.fit(make_module(tiny_sd_path), datamodule=make_data(0), ckpt_path=tmp_path / "last.ckpt")


def test_training_with_8_bit_optimizer_states_resumes_bit_identical(tiny_sd_path, tmp_path):
    """torchao's AdamW8bit keeps its moments as tensor subclasses, which torch will not load with Lightning's
    default map_location (a callable); the checkpoint IO loads them onto the CPU by name and the run resumes
    exactly, moments still in 8 bits."""
    pytest.importorskip("torchao", reason="the quantize extra (torchao) is not installed")
    from torchao.optim.subclass_8bit import OptimState8bit

    full_trainer, full = fit(tiny_sd_path, tmp_path / "full", optimizer=ADAMW_8BIT)
    states = [s for state in full_trainer.optimizers[0].state.values() for s in state.values()]
    assert sum(isinstance(s, OptimState8bit) for s in states) >= 2, "no moment was stored in 8 bits"
    root = tmp_path / "stopped"
    first_trainer, first = fit(tiny_sd_path, root, sigterm_at=3, optimizer=ADAMW_8BIT)
    trainer, resumed = fit(tiny_sd_path, root, optimizer=ADAMW_8BIT)
    assert trainer.global_step == STEPS
    assert first.keys + resumed.keys == full.keys, "the resumed run did not go on from the checkpoint"
    for name, value in full.weights.items():
        assert torch.equal(resumed.weights[name], value), f"{name} differs"
    resumed_states = [s for state in trainer.optimizers[0].state.values() for s in state.values()]
    assert [type(s) for s in resumed_states] == [type(s) for s in states]


def optimizer_state(trainer: L.Trainer) -> dict[tuple[int, str], torch.Tensor]:
    """(parameter index, name) -> a copy of the optimizer's state (AdamW: step, exp_avg, exp_avg_sq)."""
    return {
        (index, name): torch.as_tensor(value).clone()
        for index, state in enumerate(trainer.optimizers[0].state.values())
        for name, value in state.items()
    }


class AtTrainStart(L.Callback):
    """The weights and optimizer state training starts from (after a resume has restored them)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.optimizer = optimizer_state(trainer)


def test_a_changed_worker_count_resumes_with_a_warning(tiny_sd_path, tmp_path):
    root = tmp_path / "run"
    first_trainer, first = fit(tiny_sd_path, root, sigterm_at=1, num_workers=0, steps=3)
    stopped = optimizer_state(first_trainer)
    start = AtTrainStart()
    with pytest.warns(UserWarning, match="cannot resume exactly: num_workers was 0, now 2"):
        trainer, resumed = fit(tiny_sd_path, root, num_workers=2, steps=2, callbacks=(start,))
    assert trainer.global_step == 2
    # It went on from step 1, as it stopped: its weights and AdamW moments, then only step 2 to train.
    assert [step for step, _ in resumed.keys] == [2]
    assert start.weights.keys() == first.weights.keys()
    for name, value in first.weights.items():
        assert torch.equal(start.weights[name], value), name
    assert stopped and start.optimizer.keys() == stopped.keys()
    for key, value in stopped.items():
        assert torch.equal(start.optimizer[key], value), key
    assert all(int(value) == 1 for (_, name), value in start.optimizer.items() if name == "step")


def _save(path: Path, step: int) -> None:
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "state_dict": {}}, path)


def test_resume_picks_the_newest_readable_checkpoint(tmp_path):
    assert find_resume_checkpoint(tmp_path, [tmp_path / "checkpoints"]) is None  # a first run: start fresh
    _save(tmp_path / "checkpoints" / "last.ckpt", 7)
    _save(tmp_path / "hpc_ckpt_1.ckpt", 5)
    assert find_resume_checkpoint(tmp_path, [tmp_path / "checkpoints"]).name == "last.ckpt"
    _save(tmp_path / "hpc_ckpt_2.ckpt", 7)  # same step: the preemption checkpoint wins
    assert find_resume_checkpoint(tmp_path, [tmp_path / "checkpoints"]).name == "hpc_ckpt_2.ckpt"
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"half a checkpoint")  # e.g. written by something else
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        assert find_resume_checkpoint(tmp_path, [tmp_path / "checkpoints"]).name == "hpc_ckpt_2.ckpt"


SLOW_WRITER = textwrap.dedent(
    """
    import io, sys, time
    import torch
    import nested.training.resume as resume

    real_save = torch.save

    def slow_save(obj, handle):  # the real bytes, written in chunks: a kill lands mid-write
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        for start in range(0, len(data), 1 << 16):
            handle.write(data[start : start + (1 << 16)])
            handle.flush()
            print("writing", flush=True)
            time.sleep(0.02)

    resume.torch.save = slow_save
    checkpoint = {"global_step": 2, "state_dict": {"w": torch.full((4 << 20,), 2.0)}}  # 16 MB
    resume.AtomicCheckpointIO().save_checkpoint(checkpoint, sys.argv[1])
    print("done", flush=True)
    """
)


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, target)
    script = tmp_path / "writer.py"
    script.write_text(SLOW_WRITER)
    process = subprocess.Popen(
        [sys.executable, str(script), str(target)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 60
        writes = 0
        while writes < 5:  # a few chunks are on disk
            assert time.monotonic() < deadline, "the writer never started"
            line = process.stdout.readline()
            assert line and line.strip() != "done", "the write finished before it could be killed"
            writes += 1
        assert partial_path(target).exists() and partial_path(target).stat().st_size > 0
        process.kill()  # SIGKILL: no cleanup runs
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    checkpoint = torch.load(target, weights_only=True)
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["state_dict"]["w"], torch.ones(3))
    assert find_resume_checkpoint(tmp_path, [tmp_path]) == target  # the leftover is not a candidate
    AtomicCheckpointIO().save_checkpoint({"global_step": 3, "state_dict": {}}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 3
    assert not partial_path(target).exists()  # the next write reused the leftover's name


def _trainer(tmp_path, *callbacks):
    return L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=list(callbacks))  # fmt: skip


def test_only_a_later_checkpoint_callback_that_keeps_last_of_the_same_folder_replaces_one(tmp_path):
    run = ModelCheckpoint(dirpath=tmp_path / "a", save_last=True, save_top_k=-1)
    best = ModelCheckpoint(dirpath=tmp_path / "a", monitor="val/loss", save_top_k=1)  # no last.ckpt
    elsewhere = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, every_n_train_steps=7)
    trainer = _trainer(tmp_path, run, best, elsewhere)
    assert drop_replaced_checkpoint_callbacks(trainer) == []
    assert trainer.checkpoint_callbacks == [run, best, elsewhere]
    frequent = ModelCheckpoint(
        dirpath=tmp_path / "a", save_last=True, save_top_k=5, monitor="step", mode="max"
    )
    trainer = _trainer(tmp_path, run, best, elsewhere, frequent)
    assert drop_replaced_checkpoint_callbacks(trainer) == [run]
    assert trainer.checkpoint_callbacks == [best, elsewhere, frequent]

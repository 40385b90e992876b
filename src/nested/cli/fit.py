"""``nested fit`` and ``nested validate``: a LightningCLI over the training module and the DataModule.

Several ``--config`` files compose (later ones win), ``--print_config`` shows the merged result, and an
unknown key or a wrong type fails naming the key. ``nested fit`` is preemption-safe by default
(:mod:`nested.training.resume`): checkpoints are written atomically, SIGUSR1/SIGTERM checkpoint at the next
step (and requeue under SLURM), checkpoint callbacks without a ``dirpath`` write to
``<default_root_dir>/checkpoints``, and without ``--ckpt_path`` a run resumes from the newest checkpoint of
its ``default_root_dir`` (``--auto_resume=false`` starts over).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from nested.callbacks.export import AdapterExport
from nested.data.datamodule import NestedDataModule
from nested.training.module import NestedAttentionModule
from nested.training.resume import (
    AtomicCheckpointIO,
    PreemptionCheckpoint,
    checkpoint_dirs,
    find_resume_checkpoint,
    install_signal_flags,
    restore_signal_handlers,
    stable_checkpoint_dirs,
)

__all__ = ["NestedCLI", "main_fit"]


class NestedCLI(LightningCLI):
    """LightningCLI with the adapter export and preemption handling always on, and auto-resume."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The optimizer and scheduler sections go to the module, which builds them over the adapter's parameters
        # when training starts (LightningCLI's own would build them now, before the adapter exists).
        parser.add_optimizer_args((torch.optim.Optimizer,), link_to="model.optimizer")
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple, link_to="model.lr_scheduler")
        parser.add_lightning_class_args(AdapterExport, "export")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_argument(
            "--auto_resume",
            type=bool,
            default=True,
            help="fit without --ckpt_path: resume from the newest checkpoint of default_root_dir (hpc_ckpt_*.ckpt, "
            "<checkpoint dirpath>/*.ckpt) if there is one.",
        )

    @staticmethod
    def link_optimizers_and_lr_schedulers(parser: LightningArgumentParser) -> None:
        """Link the ``optimizer`` / ``lr_scheduler`` sections to the module as plain dicts (class_path, init_args)."""
        for key, (_, link_to) in {**parser._optimizers, **parser._lr_schedulers}.items():
            if link_to != "AUTOMATIC":
                parser.link_arguments(key, link_to, compute_fn=_plain)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user-chosen one is kept
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        stable_checkpoint_dirs(trainer)
        return trainer

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") is not None or not config.get("auto_resume", True):
            return
        path = find_resume_checkpoint(self.trainer.default_root_dir, checkpoint_dirs(self.trainer))
        if path is not None:
            config["ckpt_path"] = str(path)
            rank_zero_info(
                f"nested: resuming from {path} (the newest checkpoint under {self.trainer.default_root_dir}); "
                "pass --auto_resume=false or another --trainer.default_root_dir to start over."
            )


def _plain(value: Any) -> Any:
    """A linked section as plain data: dicts and lists (a tuple would not survive the saved config.yaml)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def main_fit(command: str, argv: list[str] | None) -> int:
    """``nested fit|validate ARGS``; ``argv`` None: LightningCLI reads ``sys.argv`` itself (it warns when given both)."""
    # From now on SIGUSR1/SIGTERM only set a flag, acted on at a step end (PreemptionCheckpoint).
    previous = install_signal_flags() if command == "fit" else {}
    try:
        NestedCLI(
            NestedAttentionModule,
            NestedDataModule,
            args=None if argv is None else [command, *argv],
            save_config_kwargs={"overwrite": True},
            # No prefix matching: a mistyped --model.learning_rat must fail, not set learning_rate.
            parser_kwargs={name: {"allow_abbrev": False} for name in ("fit", "validate")}
            | {"allow_abbrev": False},
        )
    finally:
        restore_signal_handlers(previous)
    return 0

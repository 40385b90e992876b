"""The ``nested`` command.

``nested fit|validate --config ...`` is a LightningCLI over :class:`NestedAttentionModule` and
:class:`NestedDataModule`: several ``--config`` files compose (later ones win), ``--print_config``
shows the merged result, and an unknown key or a wrong type fails naming the key. The other
subcommands are plain argparse programs.

``nested fit`` is preemption-safe by default (``nested.resume``): checkpoints are written
atomically, SIGUSR1/SIGTERM checkpoint at the next step (and requeue under SLURM), checkpoint
callbacks without a ``dirpath`` write to ``<default_root_dir>/checkpoints``, and without
``--ckpt_path`` a run resumes from the newest checkpoint of its ``default_root_dir``
(``--auto_resume=false`` starts over).
"""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["NestedCLI", "main"]

SUBCOMMANDS = {
    "fit": "train an adapter (LightningCLI: nested fit --config configs/demo.yaml)",
    "validate": "run the validation loop on a checkpoint (LightningCLI)",
    "shards": "build webdataset shards from a folder of images + captions or a manifest",
    "generate": "generate images with subjects bound to prompt tokens by nested adapters",
    "push": "upload an adapter folder to the Hugging Face Hub, with a model card",
    "eval": "identity vs prompt alignment of adapters over strengths and seeds, with the trade-off plot",
}


class NestedCLI(LightningCLI):
    """LightningCLI with the adapter export and preemption handling always on, and auto-resume."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from nested.callbacks import AdapterExport
        from nested.resume import PreemptionCheckpoint

        parser.add_lightning_class_args(AdapterExport, "export")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_argument(
            "--auto_resume",
            type=bool,
            default=True,
            help="fit without --ckpt_path: resume from the newest checkpoint of default_root_dir (hpc_ckpt_*.ckpt, "
            "<checkpoint dirpath>/*.ckpt) if there is one.",
        )

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        from nested.resume import AtomicCheckpointIO, stable_checkpoint_dirs

        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user-chosen one is kept
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        stable_checkpoint_dirs(trainer)
        return trainer

    def before_fit(self) -> None:
        from nested.resume import checkpoint_dirs, find_resume_checkpoint

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


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [
        "usage: nested <command> [options]",
        "",
        "Nested Attention personalization of diffusion models.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "Run 'nested <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nested`` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("fit", "validate"):
        from nested.data import NestedDataModule
        from nested.module import NestedAttentionModule
        from nested.resume import install_signal_flags, restore_signal_handlers

        # From now on SIGUSR1/SIGTERM only set a flag, acted on at a step end (PreemptionCheckpoint).
        previous = install_signal_flags() if command == "fit" else {}
        try:
            NestedCLI(
                NestedAttentionModule,
                NestedDataModule,
                # From the shell LightningCLI reads sys.argv itself (it warns when given both).
                args=None if from_command_line else [command, *rest],
                save_config_kwargs={"overwrite": True},
                # No prefix matching: a mistyped --model.learning_rat must fail, not set learning_rate.
                parser_kwargs={name: {"allow_abbrev": False} for name in ("fit", "validate")}
                | {"allow_abbrev": False},
            )
        finally:
            restore_signal_handlers(previous)
        return 0
    if command == "shards":
        from nested.shards import main_shards

        return main_shards(rest) or 0
    if command == "generate":
        from nested.generate import main_generate

        return main_generate(rest) or 0
    if command == "push":
        from nested.generate import main_push

        return main_push(rest) or 0
    if command == "eval":
        from nested.evaluate import main_eval

        return main_eval(rest) or 0
    print(f"nested: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

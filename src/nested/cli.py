"""The ``nested`` command.

``nested fit|validate --config ...`` is a LightningCLI over :class:`NestedAttentionModule` and
:class:`NestedDataModule`: several ``--config`` files compose (later ones win), ``--print_config``
shows the merged result, and an unknown key or a wrong type fails naming the key. The other
subcommands are plain argparse programs.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["NestedCLI", "main"]

SUBCOMMANDS = {
    "fit": "train an adapter (LightningCLI: nested fit --config configs/demo.yaml)",
    "validate": "run the validation loop on a checkpoint (LightningCLI)",
    "shards": "build webdataset shards from a folder of images + captions or a manifest",
}


class NestedCLI(LightningCLI):
    """LightningCLI with the adapter export always on and a stable default root dir."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from nested.callbacks import AdapterExport

        parser.add_lightning_class_args(AdapterExport, "export")


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

        NestedCLI(
            NestedAttentionModule,
            NestedDataModule,
            # From the shell LightningCLI reads sys.argv itself (it warns when given both).
            args=None if from_command_line else [command, *rest],
            save_config_kwargs={"overwrite": True},
        )
        return 0
    if command == "shards":
        from nested.shards import main_shards

        return main_shards(rest) or 0
    print(f"nested: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

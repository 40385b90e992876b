"""The ``nested`` command: a dispatcher that imports only the subcommand it runs.

``nested fit|validate`` is a LightningCLI (:mod:`nested.cli.fit`); ``shards``, ``generate``, ``push``,
``eval`` and ``prompts`` are plain argparse programs (``prompts`` reads ``fit``'s configuration).
``nested --help``, ``nested shards`` and ``nested push`` never import Lightning. A
:class:`~nested.errors.NestedUserError` ends a command with one line and exit code 2; any other exception is
a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from nested.cli.common import report_user_errors

__all__ = ["main"]

SUBCOMMANDS = {
    "fit": "train an adapter (LightningCLI: nested fit --config configs/demo.yaml)",
    "validate": "run the validation loop on a checkpoint (LightningCLI)",
    "shards": "build webdataset shards from a folder of images + captions or a manifest",
    "prompts": "compute T5's prompt states of an SD3 / FLUX run ahead (model.prompt_cache)",
    "generate": "generate images with subjects bound to prompt tokens by nested adapters",
    "push": "upload an adapter folder to the Hugging Face Hub, with a model card",
    "eval": "identity vs prompt alignment of adapters over strengths and seeds, with the trade-off plot",
}
# subcommand -> (module, function taking the remaining arguments)
_MAINS = {
    "shards": ("nested.cli.shards", "main_shards"),
    "prompts": ("nested.cli.prompts", "main_prompts"),
    "generate": ("nested.cli.generate", "main_generate"),
    "push": ("nested.cli.push", "main_push"),
    "eval": ("nested.cli.eval", "main_eval"),
}


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
    """Entry point of the ``nested`` console script; returns the exit code."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    with report_user_errors(f"nested {command}"):
        if command in ("fit", "validate"):
            from nested.cli.fit import main_fit  # imports Lightning: only for these two

            return main_fit(command, None if from_command_line else rest)
        if command in _MAINS:
            module, function = _MAINS[command]
            return getattr(importlib.import_module(module), function)(rest) or 0
    prefixed = [name for name in SUBCOMMANDS if name.startswith(command.lower())]
    close = (
        prefixed[:1]
        if command and len(prefixed) == 1
        else difflib.get_close_matches(command.lower(), SUBCOMMANDS, n=1)
    )
    hint = f"did you mean {close[0]}? " if close else ""
    print(
        f"nested: error: unknown command {command!r}; {hint}commands: {', '.join(SUBCOMMANDS)}",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())

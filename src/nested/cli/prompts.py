"""``nested prompts``: T5's prompt states computed ahead for a training configuration (SD3 / FLUX).

It reads the run's configuration as ``nested fit`` does (the same ``--config`` files and options), finds every
prompt the run will encode (each training and validation caption as training sees it, each subject token
alone, the empty prompt, SampleGrid's prompts, and the lines of ``--prompts`` files), encodes the ones not yet
cached with the base model's T5, and writes them to ``model.prompt_cache``. ``nested fit`` with the same
configuration then never loads T5. Run again, it skips what is cached: an interrupted build resumes, and new
shards or domains add to the folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from tqdm.auto import tqdm

from nested.cli.common import CommandParser, check_creatable_folder, checked_device, read_text_option
from nested.errors import UsageError

__all__ = ["main_prompts", "prompts_parser"]


def prompts_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="nested prompts",
        usage="nested prompts --config FILE [nested fit's options ...] [--prompts FILE] [--batch-size N] "
        "[--device DEVICE] [--no-progress]",
        description="Compute T5's prompt states of an SD3 / FLUX training run ahead, into model.prompt_cache, "
        "so that nested fit with the same configuration does not load T5.",
        allow_abbrev=False,  # an abbreviation could swallow one of nested fit's options
        epilog="Every other option is nested fit's, e.g. --config configs/faces-flux.yaml "
        "--model.prompt_cache cache/faces-flux: give nested fit the same ones (its --ckpt_path and --auto_resume "
        "are accepted and ignored).",
    )
    parser.add_argument(
        "--prompts",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="a UTF-8 text file of more prompts to cache, one per line (repeatable)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="prompts per T5 forward (default 16)"
    )
    parser.add_argument("--device", help="where T5 runs (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # nested fit's options that choose a checkpoint, not the configuration: accepted, so that the same command
    # line serves both, and ignored.
    parser.add_argument("--ckpt_path", help=argparse.SUPPRESS)
    parser.add_argument("--auto_resume", help=argparse.SUPPRESS)
    return parser


def extra_prompts(paths: list[Path]) -> list[str]:
    """The non-empty lines of each file, stripped."""
    prompts = []
    for path in paths:
        text = read_text_option(path, "--prompts", "a text file of prompts, one per line")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    return prompts


def main_prompts(argv: list[str]) -> int:
    parser = prompts_parser()
    args, fit_args = parser.parse_known_args(argv)
    if not fit_args:
        parser.error("give the run's configuration as to nested fit, e.g. --config configs/faces-flux.yaml")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = extra_prompts(args.prompts)
    device = checked_device(args.device, "leave --device out to run T5 on the CPU")

    # Lightning, diffusers and transformers load only once the arguments are good: --help stays quick.
    from nested.backbone import load_t5, t5_suffix
    from nested.callbacks.sample_grid import SampleGrid
    from nested.cli.fit import configured_run
    from nested.data.prompts import domain_prompts, domain_source
    from nested.prompt_cache import write_prompt_states

    cli = configured_run(fit_args)
    module, datamodule = cli.model, cli.datamodule
    if module.prompt_cache is None:
        raise UsageError(
            "set --model.prompt_cache DIR: the folder to write the prompt states to (give nested fit the same)"
        )
    check_creatable_folder(Path(module.prompt_cache), "--model.prompt_cache")
    # T5 first: a base model without one fails before the shards are read.
    tokenizer, text_encoder, component, length = load_t5(
        module.base_model, dtype=module.frozen_dtype, max_sequence_length=module.max_sequence_length
    )
    text_encoder.to(device)
    prompts += ["", *module.subjects]  # text dropout leaves the subject token alone; both dropped: ""
    kind = "sd3" if component == f"text_encoder{t5_suffix('sd3')}" else "flux"
    for callback in cli.trainer.callbacks:
        if isinstance(callback, SampleGrid):
            for token in [callback.token] if callback.token else module.subjects:
                prompts += callback.prompts_for(token, kind)

    def bar(description: str, unit: str) -> Callable[[Iterable], Iterable]:
        return lambda items: tqdm(
            items, desc=description, unit=unit, disable=args.no_progress, file=sys.stderr
        )

    sources = []
    for spec in [*datamodule.domains, *datamodule.val_domains]:
        found, counts = domain_prompts(spec, progress=bar(f"captions of {spec.name}", "shard"))
        prompts += found
        sources.append(domain_source(spec))
        notes = [f"{counts['samples']} samples", f"{len(found)} distinct prompts"]
        if counts["dropped"]:
            notes.append(f"{counts['dropped']} dropped by the caption rule")
        if counts["unreadable"]:
            notes.append(f"{counts['unreadable']} unreadable (training skips them too)")
        print(f"nested prompts: domain {spec.name}: {', '.join(notes)}", file=sys.stderr)

    stats = write_prompt_states(
        module.prompt_cache,
        prompts,
        tokenizer,
        text_encoder,
        max_sequence_length=length,
        base_model=module.base_model,
        component=component,
        sources=sources,
        batch_size=args.batch_size,
        progress=bar("T5", "batch"),
    )
    size = stats["bytes_per_prompt"]
    print(
        f"nested prompts: {stats['prompts']} distinct prompts, {stats['written']} encoded, {stats['cached']} "
        f"already cached; {module.prompt_cache} holds {stats['total']} ({size / 2**20:.2f} MiB each, "
        f"{stats['total'] * size / 2**30:.2f} GiB)",
        file=sys.stderr,
    )
    return 0

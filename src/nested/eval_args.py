"""``nested eval``'s command line: the parser and the checks of its arguments that need no model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nested.generate import UsageError

__all__ = ["DTYPES", "eval_parser", "read_prompts"]

DTYPES = ("float32", "float16", "bfloat16")


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nested eval",
        description="Measure identity similarity vs prompt alignment of nested adapters over strengths and seeds, "
        "against the base model, and plot the trade-off.",
        epilog=(
            "example: nested eval --base data/models/tiny-sd --adapter '<person>=runs/demo/adapters/last' "
            "--prompts data/prompts/faces.txt --subjects data/demo/faces/val/shards.json --clip openai/clip-vit-large-patch14 "
            "--out runs/demo/eval"
        ),
    )
    models = parser.add_argument_group("models")
    models.add_argument("--base", required=True, help="base SD / SDXL diffusers folder or hub id")
    models.add_argument("--revision", default=None, help="hub revision of the base model")
    models.add_argument(
        "--adapter",
        action="append",
        default=[],
        required=True,
        metavar="TOKEN=PATH_OR_REPO",
        help="an adapter folder or hub repo bound to TOKEN; repeatable (each token is evaluated on its own)",
    )
    models.add_argument(
        "--clip",
        default="openai/clip-vit-large-patch14",
        help="full CLIP (folder or hub id) for prompt alignment (default: openai/clip-vit-large-patch14)",
    )
    models.add_argument(
        "--identity-model",
        default=None,
        help="CLIP vision or DINOv2 folder / hub id for identity similarity (default: the adapter's image encoder)",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--prompts",
        required=True,
        help="text file, one template per line with {token} or the literal token (# comments)",
    )
    data.add_argument(
        "--subjects",
        action="append",
        default=[],
        required=True,
        metavar="[TOKEN=]DIR_OR_SHARDS",
        help="reference images: a folder, an image, or shards (shards.json, .tar, brace pattern); "
        "TOKEN=... for one token only; repeatable",
    )
    data.add_argument("--max-subjects", type=int, default=4, help="subjects per token (default 4)")
    data.add_argument(
        "--reference-size", type=int, default=512, help="side of the reference images (default 512)"
    )
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument(
        "--strengths", default="0.25,0.5,1.0", help="comma-separated subject strengths (default 0.25,0.5,1.0)"
    )
    sweep.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    sweep.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    sweep.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (default 5)")
    sweep.add_argument("--negative-prompt", default=None)
    sweep.add_argument("--height", type=int, default=None, help="pixels (default: the base model's)")
    sweep.add_argument("--width", type=int, default=None, help="pixels (default: the base model's)")
    sweep.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="output folder")
    output.add_argument("--grid-rows", type=int, default=12, help="rows of grid.png (default 12)")
    output.add_argument("--no-images", action="store_true", help="do not keep every generated image")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps... (default cpu)")
    runtime.add_argument("--dtype", default="float32", choices=DTYPES)
    runtime.add_argument("--no-progress", action="store_true", help="no progress bar")
    runtime.add_argument(
        "--verbose", action="store_true", help="show the libraries' loading bars and warnings"
    )
    return parser


# ----------------------------------------------------------------------------- arguments


def _numbers(text: str, option: str, convert) -> list:
    try:
        values = [convert(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} expects comma-separated numbers, got {text!r}.") from None
    if not values:
        raise UsageError(f"{option} is empty.")
    if len(set(values)) != len(values):
        raise UsageError(f"{option} repeats a value: {text!r}.")
    return values


def read_prompts(path: str | Path, tokens: list[str]) -> dict[str, list[tuple[int, str]]]:
    """Prompt templates -> for each token, its (line index, prompt) pairs.

    A line with ``{token}`` applies to every token; a line with a literal token applies to that token.
    Blank lines and ``#`` comments are skipped.

    Raises:
        FileNotFoundError: no such file. UsageError: a line names no token, or no prompt at all.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {str(path)!r} does not exist.")
    per_token: dict[str, list[tuple[int, str]]] = {token: [] for token in tokens}
    index = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        template = line.strip()
        if not template or template.startswith("#"):
            continue
        matched = False
        for token in tokens:
            if "{token}" in template or token in template:
                per_token[token].append((index, template.replace("{token}", token)))
                matched = True
        if not matched:
            raise UsageError(
                f"{path}:{number}: {template!r} names no subject: write {{token}} (or one of {', '.join(tokens)}) "
                "where the subject goes."
            )
        index += 1
    if index == 0:
        raise UsageError(
            f"{path} holds no prompt (one template a line, e.g. 'a photo of {{token}} at the beach')."
        )
    return per_token


def _subject_sources(values: list[str], tokens: list[str]) -> dict[str, str]:
    """``--subjects`` -> token -> source; an unprefixed source serves every token without its own."""
    shared, own = None, {}
    for value in values:
        token, sep, rest = value.partition("=")
        if sep and token in tokens:
            if token in own:
                raise UsageError(f"--subjects is given twice for {token!r}.")
            own[token] = rest
        elif shared is None:
            shared = value
        else:
            raise UsageError("--subjects without TOKEN= is given twice; prefix each with its token.")
    missing = [token for token in tokens if token not in own and shared is None]
    if missing:
        raise UsageError(
            f"no --subjects for {', '.join(missing)}: add --subjects '{missing[0]}=DIR_OR_SHARDS'."
        )
    return {token: own.get(token, shared) for token in tokens}


def _check(args: argparse.Namespace) -> dict[str, Any]:
    """Every problem that needs no model, found before loading; returns the parsed options."""
    from nested.generate import _pairs

    adapters = _pairs(args.adapter, "--adapter")
    tokens = list(adapters)
    strengths = _numbers(args.strengths, "--strengths", float)
    seeds = _numbers(args.seeds, "--seeds", int)
    if args.steps < 1 or args.batch_size < 1 or args.max_subjects < 1 or args.grid_rows < 1:
        raise UsageError("--steps, --batch-size, --max-subjects and --grid-rows must be >= 1.")
    for size in (args.height, args.width):
        if size is not None and (size < 8 or size % 8):
            raise UsageError(f"--height and --width must be positive multiples of 8, got {size}.")
    prompts = read_prompts(args.prompts, tokens)
    sources = _subject_sources(args.subjects, tokens)
    return {
        "adapters": adapters,
        "tokens": tokens,
        "strengths": strengths,
        "seeds": seeds,
        "prompts": prompts,
        "sources": sources,
    }

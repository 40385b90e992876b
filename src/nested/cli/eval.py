"""``nested eval``: the identity vs prompt-alignment sweep of adapters (:mod:`nested.evaluation.sweep`).

This module holds the command line: its parser and every check that needs no model. Like ``nested generate``,
it refuses a non-empty ``--out`` unless ``--overwrite`` (which replaces an earlier ``nested eval`` folder as a
whole), and every number must be finite.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path, PurePath
from typing import Any

from nested.cli.common import (
    TORCH_SEEDS,
    CommandParser,
    add_base_arguments,
    add_quantize_argument,
    add_runtime_arguments,
    check_output_folder,
    checked_device,
    finite,
    pairs,
    parse_number,
    quantize_option,
    read_text_option,
    run_user_command,
)
from nested.errors import MissingFileError, UsageError

__all__ = [
    "check_eval_arguments",
    "eval_parser",
    "main_eval",
    "read_pair_prompts",
    "read_prompts",
    "written_by_eval",
]

EVAL_FILES = ("results.csv", "summary.json", "grid.png", "tradeoff.png")  # and images/**.png


def eval_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="nested eval",
        description="Measure identity similarity vs prompt alignment of nested adapters over strengths and seeds, "
        "against the base model, and plot the trade-off; in the toy world, --judges adds identity and context "
        "accuracy against the true labels.",
        epilog=(
            "example (the toy world, after scripts/toyworld/demo.sh): nested eval --base data/models/toy-sd "
            "--adapter '<person>=runs/demo/adapters/last' --prompts data/prompts/toyworld-faces.txt "
            "--subjects data/toyworld/shards/faces/held_out/shards.json --reference-size 64 "
            "--judges data/toyworld/judges --clip none --out runs/demo/eval"
        ),
    )
    models = add_base_arguments(parser)
    models.add_argument(
        "--adapter",
        action="append",
        default=[],
        required=True,
        metavar="TOKEN=PATH_OR_REPO",
        help="an adapter folder or hub repo bound to TOKEN; repeatable (each token is evaluated on its own, "
        "or the two together with --pair)",
    )
    models.add_argument(
        "--image-encoder", default=None, help="override the adapters' vision backbone location"
    )
    add_quantize_argument(models)
    models.add_argument(
        "--clip",
        default="openai/clip-vit-large-patch14",
        help="full CLIP (folder or hub id) for prompt alignment (default: openai/clip-vit-large-patch14); "
        "'none' skips prompt alignment (needs --judges, which then score the prompt instead)",
    )
    models.add_argument(
        "--identity-model",
        default=None,
        help="identity similarity's embedder: 'face' (dlib's face recognition: detect, align, embed; adds the "
        "face_detected column; pip install 'nested[faces]'), or a CLIP vision or DINOv2 folder / hub id (for pets) "
        "(default: the adapter's image encoder)",
    )
    models.add_argument(
        "--judges",
        default=None,
        metavar="DIR",
        help="toy-world judges (nested.judges, e.g. data/toyworld/judges): also score every image's identity "
        "(identity_exact, identity_attributes: the judge's prediction vs the reference's label from its shard "
        "metadata) and context (context_scene, context: vs the scene and style the prompt asks for); needs "
        "toy-world shards as --subjects and prompts in the world's caption phrasing "
        "(data/prompts/toyworld-*.txt)",
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
    data.add_argument(
        "--pair",
        default=None,
        metavar="TOKEN_A,TOKEN_B",
        help="two-subject prompts: every template names both tokens (e.g. data/prompts/toyworld-pairs.txt), the "
        "i-th subject of TOKEN_A is generated with the i-th of TOKEN_B, both adapters bound in one call; with "
        "--judges, TOKEN_A is judged in the left half of the image and TOKEN_B in the right half",
    )
    data.add_argument(
        "--align-face",
        action="append",
        default=[],
        metavar="TOKEN",
        help="TOKEN's references from photos (a folder, or one image) become their subject's aligned face crop, as nested "
        "shards --faces prepared its training references, instead of their centre square; for faces adapters; "
        "repeatable; needs pip install 'nested[faces]' (shards already hold their prepared references)",
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
    sweep.add_argument(
        "--token-weight",
        action="append",
        default=[],
        metavar="TOKEN=W",
        help="multiplies TOKEN's attention at every strength (the official demo's special_token_weight; "
        "nested adapters only; default: the weight its adapter was trained with, 1 unless set)",
    )
    sweep.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    sweep.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale: classifier-free for SD / SDXL (default 5) and SD3 (default 7); FLUX.1-dev's "
        "guidance embedding (default 3.5)",
    )
    sweep.add_argument("--negative-prompt", default=None)
    sweep.add_argument("--height", type=int, default=None, help="pixels (default: the base model's)")
    sweep.add_argument("--width", type=int, default=None, help="pixels (default: the base model's)")
    sweep.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="output folder, missing or empty")
    output.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier nested eval run in --out (only the files nested eval writes)",
    )
    output.add_argument("--grid-rows", type=int, default=12, help="rows of grid.png (default 12)")
    output.add_argument("--no-images", action="store_true", help="do not keep every generated image")
    runtime = parser.add_argument_group("runtime")
    add_runtime_arguments(runtime)
    return parser


# ----------------------------------------------------------------------------- arguments


def written_by_eval(path: PurePath) -> bool:
    """Whether ``path`` (relative to ``--out``) is a file ``nested eval`` writes."""
    return path.as_posix() in EVAL_FILES or (path.parts[0] == "images" and path.suffix == ".png")


def _numbers(text: str, option: str, convert) -> list:
    values = [parse_number(part, option, convert) for part in text.split(",") if part.strip()]
    if not values:
        raise UsageError(f"{option} is empty.")
    if len(set(values)) != len(values):
        raise UsageError(f"{option} repeats a value: {text!r}.")
    return values


def _templates(path: str | Path) -> tuple[Path, list[tuple[int, str]]]:
    """A prompts file's (line number, template) pairs: blank lines and ``#`` comments skipped."""
    path = Path(path).expanduser()
    lines = read_text_option(path, "--prompts", "a text file of prompt templates, one per line").splitlines()
    templates = [(n, line.strip()) for n, line in enumerate(lines, start=1)]
    templates = [(n, t) for n, t in templates if t and not t.startswith("#")]
    if not templates:
        raise UsageError(
            f"{path} holds no prompt (one template a line, e.g. 'a photo of {{token}} at the beach')."
        )
    return path, templates


def read_prompts(path: str | Path, tokens: list[str]) -> dict[str, list[tuple[int, str]]]:
    """Prompt templates -> for each token, its (line index, prompt) pairs.

    A line with ``{token}`` applies to every token; a line with a literal token applies to that token.
    Blank lines and ``#`` comments are skipped.

    Raises:
        FileNotFoundError: no such file. UsageError: a line names no token, or no prompt at all.
    """
    path, templates = _templates(path)
    per_token: dict[str, list[tuple[int, str]]] = {token: [] for token in tokens}
    for index, (number, template) in enumerate(templates):
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
    unprompted = [token for token, prompts in per_token.items() if not prompts]
    if unprompted:
        raise UsageError(
            f"{path}: no prompt names {', '.join(unprompted)}: add lines with {{token}} (every subject) or with "
            f"{unprompted[0]}, or drop its --adapter."
        )
    return per_token


def read_pair_prompts(path: str | Path, pair: tuple[str, str]) -> list[tuple[int, str]]:
    """Two-subject prompt templates -> (line index, prompt) pairs; every line names both tokens literally.

    Raises:
        FileNotFoundError: no such file. UsageError: a line misses a token, or no prompt at all.
    """
    path, templates = _templates(path)
    for number, template in templates:
        missing = [token for token in pair if token not in template]
        if missing:
            raise UsageError(
                f"{path}:{number}: {template!r} does not name {' and '.join(missing)}: --pair prompts name both "
                f"subjects, e.g. 'a photo of {pair[0]} and {pair[1]} at the beach'."
            )
    return [(index, template) for index, (_, template) in enumerate(templates)]


def _subject_sources(values: list[str], tokens: list[str]) -> dict[str, str]:
    """``--subjects`` -> token -> source; an unprefixed source serves every token without its own."""
    shared, own = None, {}
    for value in values:
        token, sep, rest = value.partition("=")
        if sep and token not in tokens and re.fullmatch(r"<[^<>=]+>", token):
            raise UsageError(
                f"--subjects {value!r}: {token!r} has no --adapter (the adapters' tokens: {', '.join(tokens)})."
            )
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


def _pair(text: str, adapters: dict[str, str]) -> tuple[str, str]:
    # Here, not at the top: `nested eval --help` stays light.
    from nested.evaluation.report import column_suffix

    tokens = [part.strip() for part in text.split(",")]
    if len(tokens) != 2 or not all(tokens) or tokens[0] == tokens[1]:
        raise UsageError(f"--pair expects two different tokens, e.g. --pair '<person>,<pet>', got {text!r}.")
    if set(tokens) != set(adapters):
        raise UsageError(
            f"--pair {text!r} evaluates exactly the adapters of its two tokens; --adapter gives "
            f"{', '.join(adapters) or 'none'}."
        )
    if column_suffix(tokens[0]) == column_suffix(tokens[1]):
        raise UsageError(f"--pair tokens {tokens[0]!r} and {tokens[1]!r} give the same CSV column names.")
    return tokens[0], tokens[1]


def check_eval_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Every problem that needs no model, found before loading; returns the parsed options.

    ``groups``: what one generation binds, name -> tokens: each token on its own, or with --pair the two
    tokens under the name ``A+B``; ``prompts``: group name -> its (line index, prompt) pairs.
    """
    adapters = pairs(args.adapter, "--adapter")
    tokens = list(adapters)
    quantize = quantize_option(args.quantize)
    checked_device(args.device)
    # Here, not at the top: `nested eval --help` stays light.
    from nested.evaluation.images import is_shards_source
    from nested.inference.subjects import check_strength

    strengths = _numbers(args.strengths, "--strengths", float)
    for token in tokens:  # a strength outside the adapters' range warns now, not after loading the models
        for strength in strengths:
            check_strength(strength, token)
    if args.guidance is not None:
        finite(args.guidance, "--guidance")
    token_weights = pairs(args.token_weight, "--token-weight", float)
    for token, weight in token_weights.items():
        if token not in adapters:
            raise UsageError(f"--token-weight {token}={weight}: {token!r} has no --adapter.")
        if weight <= 0:
            raise UsageError(f"--token-weight {token}={weight}: the weight must be > 0.")
    seeds = _numbers(args.seeds, "--seeds", int)
    outside = [seed for seed in seeds if seed not in TORCH_SEEDS]
    if outside:
        raise UsageError(f"--seeds {outside[0]}: a seed must lie in torch's range -2**63 .. 2**64 - 1.")
    if args.steps < 1 or args.batch_size < 1 or args.max_subjects < 1 or args.grid_rows < 1:
        raise UsageError("--steps, --batch-size, --max-subjects and --grid-rows must be >= 1.")
    if args.reference_size < 16:
        raise UsageError(
            f"--reference-size must be >= 16 (the side of the reference images), got {args.reference_size}."
        )
    for size in (args.height, args.width):
        if size is not None and (size < 8 or size % 8):
            raise UsageError(f"--height and --width must be positive multiples of 8, got {size}.")
    if args.clip.lower() == "none" and not args.judges:
        raise UsageError(
            "--clip none leaves nothing to plot against identity; add --judges DIR or a CLIP model."
        )
    if args.judges and not Path(args.judges).expanduser().is_dir():
        raise MissingFileError(
            f"--judges {args.judges!r} is not a folder; pass trained judges, e.g. data/toyworld/judges."
        )
    pair = _pair(args.pair, adapters) if args.pair else None
    if pair:
        name = "+".join(pair)
        groups = {name: list(pair)}
        prompts = {name: read_pair_prompts(args.prompts, pair)}
    else:
        groups = {token: [token] for token in tokens}
        prompts = read_prompts(args.prompts, tokens)
    sources = _subject_sources(args.subjects, tokens)
    for token in args.align_face:
        if token not in sources:
            raise UsageError(f"--align-face {token!r} is not a token of --adapter ({', '.join(tokens)}).")
        if is_shards_source(sources[token]):
            raise UsageError(
                f"--align-face {token!r}: its --subjects {sources[token]} are shards, which hold the references "
                "nested shards prepared (--faces aligns them); use --align-face with a folder of photos."
            )
    check_output_folder(Path(args.out), overwrite=args.overwrite, ours=written_by_eval, prog="nested eval")
    return {
        "adapters": adapters,
        "tokens": tokens,
        "pair": pair,
        "groups": groups,
        "strengths": strengths,
        "token_weights": token_weights,
        "seeds": seeds,
        "prompts": prompts,
        "sources": sources,
        "quantize": quantize,
    }


def main_eval(argv: list[str] | None = None) -> int:
    """``nested eval``: returns the exit code (0 ok, 2 for a user error, shown in one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = eval_parser().parse_args(argv)
    # Imported after parsing: `nested eval --help` answers without loading torch.
    from nested.evaluation.sweep import point_line, run_eval

    summary = run_user_command(
        "nested eval", args.verbose, lambda: run_eval(args, check_eval_arguments(args), argv)
    )
    if summary is None:
        return 2
    out = Path(args.out).expanduser().resolve()  # the folder staged_directory wrote
    print(f"Wrote {summary['rows']} rows to {out / 'results.csv'}, summary.json, grid.png and tradeoff.png")
    for point in summary["points"]:
        print(point_line(point))
    return 0


if __name__ == "__main__":  # python -m nested.cli.eval ...
    sys.exit(main_eval())

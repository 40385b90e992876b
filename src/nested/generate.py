"""``nested generate`` and ``nested push``: plain argparse programs over :mod:`nested.pipeline` and :mod:`nested.hub`.

``nested generate`` writes ``image-000.png``... and ``generation.json`` (every setting needed to reproduce
the images: the same command with the same seed gives identical images on CPU). User mistakes (a token
missing from the prompt, an adapter for another base model, a missing image...) end with exit code 2 and a
one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main_generate", "main_push"]

DTYPES = ("float32", "float16", "bfloat16")
# Errors that are the user's to fix: reported in one line (exit code 2) instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, OSError)


class UsageError(ValueError):
    """A mistake in the command line, found before any model is loaded."""


def _pairs(values: list[str], option: str, convert=str) -> dict[str, Any]:
    """``["<person>=a.jpg", ...]`` -> ``{"<person>": "a.jpg"}``; each token at most once."""
    result: dict[str, Any] = {}
    for value in values:
        token, sep, rest = value.partition("=")
        if not sep or not token or not rest:
            raise UsageError(f"{option} expects TOKEN=VALUE (e.g. {option} '<person>=...'), got {value!r}.")
        if token in result:
            raise UsageError(f"{option} is given twice for {token!r}.")
        try:
            result[token] = convert(rest)
        except ValueError:
            raise UsageError(f"{option} {value!r}: {rest!r} is not a number.") from None
    return result


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def add_base_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "models" group with ``--base`` and ``--revision``, shared by ``nested generate`` and ``nested eval``."""
    models = parser.add_argument_group("models")
    models.add_argument("--base", required=True, help="base SD / SDXL diffusers folder or hub id")
    models.add_argument("--revision", default=None, help="hub revision of the base model")
    return models


def run_user_command(prog: str, verbose: bool, run):
    """``run()`` with the libraries quiet (unless ``verbose``); a user error becomes one stderr line.

    Returns ``run()``'s result, or None after printing ``<prog>: error: ...`` (the caller exits 2).
    """
    try:
        with _quiet_libraries(verbose):
            return run()
    except USER_ERRORS as error:
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return None


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nested generate",
        description="Generate images with one or more subjects, each bound to its prompt token by a nested adapter.",
        epilog=(
            "example: nested generate --base stabilityai/stable-diffusion-xl-base-1.0 "
            "--adapter '<person>=me/faces' --adapter '<dog>=me/pets' --subject '<person>=me.jpg' "
            "--subject '<dog>=rex.jpg' --prompt 'a photo of <person> walking <dog> on a beach' --out outputs/"
        ),
    )
    model = add_base_arguments(parser)
    model.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="TOKEN=PATH_OR_REPO",
        help="an adapter folder or hub repo (user/repo or user/repo@revision) bound to TOKEN; repeatable. "
        "One adapter may serve several tokens.",
    )
    model.add_argument(
        "--image-encoder", default=None, help="override the adapters' vision backbone location"
    )
    subjects = parser.add_argument_group("subjects")
    subjects.add_argument(
        "--subject", action="append", default=[], metavar="TOKEN=IMAGE", help="the subject image of TOKEN"
    )
    subjects.add_argument(
        "--strength",
        action="append",
        default=[],
        metavar="TOKEN=FLOAT",
        help="blend of TOKEN's value: 0 plain text, 1 nested (default 1)",
    )
    subjects.add_argument(
        "--token-weight",
        action="append",
        default=[],
        metavar="TOKEN=FLOAT",
        help="multiplies TOKEN's attention (the demo's special_token_weight; default: the weight its adapter "
        "was trained with, 1 unless set)",
    )
    subjects.add_argument(
        "--value-norm-factor",
        action="append",
        default=[],
        metavar="TOKEN=FLOAT",
        help="override the adapter's value_norm_factor for TOKEN",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--prompt", required=True)
    sampling.add_argument(
        "--negative-prompt",
        default=None,
        help="e.g. 'bad anatomy, monochrome, lowres, worst quality, low quality' (the official demo's)",
    )
    sampling.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    sampling.add_argument(
        "--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)"
    )
    sampling.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    sampling.add_argument("--num-images", type=int, default=1)
    sampling.add_argument("--height", type=int, default=None, help="pixels (default: the base model's)")
    sampling.add_argument("--width", type=int, default=None, help="pixels (default: the base model's)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    runtime.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps... (default cpu)")
    runtime.add_argument("--dtype", default="float32", choices=DTYPES)
    runtime.add_argument("--no-progress", action="store_true", help="no progress bar")
    runtime.add_argument(
        "--verbose", action="store_true", help="show the libraries' loading bars and warnings"
    )
    return parser


def _check_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Every problem that needs no model, found before the (slow) loading; returns parsed options."""
    adapters = _pairs(args.adapter, "--adapter")
    subjects = _pairs(args.subject, "--subject")
    options = {
        "strengths": _pairs(args.strength, "--strength", float),
        "token_weights": _pairs(args.token_weight, "--token-weight", float),
        "value_norm_factors": _pairs(args.value_norm_factor, "--value-norm-factor", float),
    }
    if args.steps < 1 or args.num_images < 1:
        raise UsageError("--steps and --num-images must be >= 1.")
    for size in (args.height, args.width):
        if size is not None and (size < 8 or size % 8):
            raise UsageError(f"--height and --width must be positive multiples of 8, got {size}.")
    for token in subjects:
        if token not in adapters:
            raise UsageError(
                f"--subject {token!r} has no adapter; add --adapter '{token}=PATH_OR_REPO' (loaded: "
                f"{', '.join(adapters) or 'none'})."
            )
        if token not in args.prompt:
            raise UsageError(
                f"the subject token {token!r} is not in the prompt {args.prompt!r}; write it where the subject "
                "should appear."
            )
        path = Path(subjects[token]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"the image for {token} does not exist: {str(path)!r}.")
    for name, values in options.items():
        for token in values:
            if token not in subjects:
                raise UsageError(f"--{name.rstrip('s').replace('_', '-')} {token!r} has no --subject.")
    return {"adapters": adapters, "subjects": subjects, **options}


@contextlib.contextmanager
def _quiet_libraries(verbose: bool):
    """Hide diffusers' / transformers' loading bars and warnings, so the output is our progress bar and errors."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    if verbose:
        yield
        return
    saved = [
        (lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
        for lib in (diffusers_logging, transformers_logging)
    ]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def _progress(total: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="nested generate", unit="step", disable=disable, file=sys.stderr)


def run_generate(args: argparse.Namespace, argv: list[str]) -> Path:
    """Generate the images; returns the output folder."""
    import diffusers
    import torch

    import nested
    from nested.pipeline import NestedPipeline

    parsed = _check_arguments(args)
    dtype = getattr(torch, args.dtype)
    pipe = NestedPipeline.from_pretrained(
        args.base,
        parsed["adapters"],
        dtype=dtype,
        device=args.device,
        revision=args.revision,
        image_encoder=args.image_encoder,
    )
    pipe.pipe.set_progress_bar_config(disable=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    bar = _progress(args.num_images * args.steps, args.no_progress)

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        bar.update(1)
        return callback_kwargs

    started = time.time()
    try:
        for index in range(args.num_images):
            seed = args.seed + index
            generator = torch.Generator(device="cpu").manual_seed(seed)
            image = pipe(
                args.prompt,
                subjects=parsed["subjects"],
                strengths=parsed["strengths"],
                token_weights=parsed["token_weights"],
                value_norm_factors=parsed["value_norm_factors"],
                negative_prompt=args.negative_prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=args.height,
                width=args.width,
                generator=generator,
                callback_on_step_end=on_step_end,
            ).images[0]
            name = f"image-{index:03d}.png"
            image.save(out / name)
            records.append({"file": name, "seed": seed, "sha256": _sha256(out / name)})
    finally:
        bar.close()

    scheduler = pipe.pipe.scheduler
    unet = pipe.pipe.unet
    scale = getattr(pipe.pipe, "vae_scale_factor", 8)
    settings = {
        "command": ["nested", "generate", *argv],
        "versions": {
            "nested": nested.__version__,
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
        },
        "base": {"name_or_path": args.base, "revision": args.revision, "pipeline": type(pipe.pipe).__name__},
        "adapters": pipe.describe(),
        "subjects": {
            token: {
                "image": str(path),
                "sha256": _sha256(Path(path).expanduser()),
                "strength": parsed["strengths"].get(token, 1.0),
                "token_weight": parsed["token_weights"].get(token, pipe.adapter(token).config.token_weight),
                "value_norm_factor": parsed["value_norm_factors"].get(
                    token, pipe.adapter(token).config.value_norm_factor
                ),
            }
            for token, path in parsed["subjects"].items()
        },
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "num_images": args.num_images,
        "height": args.height or unet.config.sample_size * scale,
        "width": args.width or unet.config.sample_size * scale,
        "device": args.device,
        "dtype": args.dtype,
        "scheduler": {"class": type(scheduler).__name__, "config": dict(scheduler.config)},
        "images": records,
        "seconds": round(time.time() - started, 2),
    }
    (out / "generation.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
    pipe.unload()
    return out


def main_generate(argv: list[str] | None = None) -> int:
    """``nested generate``: returns the exit code (0 ok, 2 for a user error, shown in one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = generate_parser().parse_args(argv)
    out = run_user_command("nested generate", args.verbose, lambda: run_generate(args, argv))
    if out is None:
        return 2
    print(f"Wrote {args.num_images} image(s) and generation.json to {out.resolve()}")
    return 0


def push_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nested push",
        description="Upload an adapter folder to a Hugging Face Hub model repo, with a model card. The token comes "
        "from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects the Hub.",
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="e.g. runs/demo/adapters/last")
    parser.add_argument("repo_id", metavar="REPO_ID", help="user/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--license", default="other", help="license in the model card (default: other)")
    parser.add_argument(
        "--base-model", default=None, help="hub id of the base model, for the card's metadata"
    )
    parser.add_argument(
        "--training-config", default=None, help="LightningCLI config.yaml to summarise in the card"
    )
    return parser


def main_push(argv: list[str] | None = None) -> int:
    """``nested push``: returns the exit code (0 ok, 2 for an error, shown in one line)."""
    from nested.hub import push_adapter, redact

    argv = list(sys.argv[1:] if argv is None else argv)
    args = push_parser().parse_args(argv)
    try:
        from huggingface_hub.errors import HfHubHTTPError

        if args.training_config and not Path(args.training_config).is_file():
            raise FileNotFoundError(f"--training-config {args.training_config!r} does not exist.")
        info = push_adapter(
            args.adapter_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            license=args.license,
            base_model=args.base_model,
            training_config=args.training_config,
        )
    except (*USER_ERRORS, HfHubHTTPError) as error:
        print(f"nested push: error: {redact(_one_line(error))}", file=sys.stderr)
        return 2
    except Exception as error:  # network failures etc.: still one line, the token never shown
        if os.environ.get("NESTED_DEBUG"):
            raise
        print(
            f"nested push: error: {redact(_one_line(error))} (NESTED_DEBUG=1 shows details)", file=sys.stderr
        )
        return 1
    print(f"Pushed {args.adapter_dir} to {args.repo_id}: {info.commit_url}")
    return 0


if __name__ == "__main__":  # python -m nested.generate ...
    sys.exit(main_generate())

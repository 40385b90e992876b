"""``nested generate``: a plain argparse program over :class:`nested.inference.pipeline.NestedPipeline`.

``nested generate`` writes ``image-000.png``... and ``generation.json`` (every setting needed to reproduce
the images: the same command with the same seed gives identical images on CPU). The folder appears complete
when the run ends, or not at all; a non-empty ``--out`` is refused (two runs never mix in one folder) unless
``--overwrite``, which replaces an earlier run's folder as a whole. User mistakes (a token missing from the
prompt, an adapter for another base model, a missing or damaged image, a number that is NaN...) end with
exit code 2 and a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

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
    quantize_option,
    run_user_command,
)
from nested.errors import UsageError
from nested.files import file_sha256, staged_directory, storage_refusals_named, write_json_atomic
from nested.image_files import check_image_file

__all__ = ["generate_parser", "main_generate", "run_generate"]


def generate_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
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
    add_quantize_argument(model)
    subjects = parser.add_argument_group("subjects")
    subjects.add_argument(
        "--subject", action="append", default=[], metavar="TOKEN=IMAGE", help="the subject image of TOKEN"
    )
    subjects.add_argument(
        "--align-face",
        action="append",
        default=[],
        metavar="TOKEN",
        help="give TOKEN's adapter the subject's aligned face crop, as nested shards --faces prepared its "
        "training references (detect, choose the subject, align FFHQ-style), not the whole photo; for faces "
        "adapters; repeatable; needs pip install 'nested[faces]'",
    )
    subjects.add_argument(
        "--strength",
        action="append",
        default=[],
        metavar="TOKEN=FLOAT",
        help="blend of TOKEN's value: 0 plain text, 1 nested (default 1); outside [0, 2] it warns",
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
        help="override the adapter's value_norm_factor for TOKEN (> 0: rescale v* to FLOAT x ||V_s||; 0: no "
        "rescaling)",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--prompt",
        required=True,
        help="the prompt, with each subject's token where the subject should appear",
    )
    sampling.add_argument(
        "--negative-prompt",
        default=None,
        help="e.g. 'bad anatomy, monochrome, lowres, worst quality, low quality' (the official demo's)",
    )
    sampling.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    sampling.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale: classifier-free for SD / SDXL (default 5) and SD3 (default 7); FLUX.1-dev's "
        "guidance embedding (default 3.5)",
    )
    sampling.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    sampling.add_argument("--num-images", type=int, default=1, help="images to draw (default 1)")
    sampling.add_argument("--height", type=int, default=None, help="pixels (default: the base model's)")
    sampling.add_argument("--width", type=int, default=None, help="pixels (default: the base model's)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument(
        "--out", default="outputs", help="output folder, missing or empty (default: outputs)"
    )
    runtime.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier nested generate run in --out (only its images and generation.json)",
    )
    runtime.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet or transformer block by block (regional compilation, nested layers "
        "included): the first image pays the compile, later ones run faster; worth it for many images on a GPU",
    )
    add_runtime_arguments(runtime)
    return parser


def written_by_generate(path: Path) -> bool:
    """Whether ``path`` (relative to ``--out``) is a file ``nested generate`` writes."""
    return re.fullmatch(r"image-\d{3,}\.png|generation\.json", path.as_posix()) is not None


def _check_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Every problem found before the (slow) model loading; returns parsed options, and in ``images`` each
    subject's decoded image (a damaged file or a decompression bomb is named now)."""
    # These import torch: not for --help.
    from nested.evaluation.images import aligned_face_image
    from nested.inference.subjects import load_image, subject_specs

    adapters = pairs(args.adapter, "--adapter")
    subjects = pairs(args.subject, "--subject")
    options = {
        "strengths": pairs(args.strength, "--strength", float),
        "token_weights": pairs(args.token_weight, "--token-weight", float),
        "value_norm_factors": pairs(args.value_norm_factor, "--value-norm-factor", float),
    }
    quantize = quantize_option(args.quantize)
    checked_device(args.device)
    if args.guidance is not None:
        finite(args.guidance, "--guidance")
    for token, weight in options["token_weights"].items():
        if weight <= 0:
            raise UsageError(f"--token-weight {token}={weight}: the weight must be > 0.")
    if args.steps < 1 or args.num_images < 1:
        raise UsageError("--steps and --num-images must be >= 1.")
    last_seed = args.seed + args.num_images - 1  # image i uses seed + i
    if args.seed not in TORCH_SEEDS or last_seed not in TORCH_SEEDS:
        raise UsageError(
            f"--seed {args.seed} with --num-images {args.num_images}: the seeds {args.seed}..{last_seed} must lie "
            f"in torch's range -2**63 .. 2**64 - 1."
        )
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
        check_image_file(subjects[token], f"the image for {token}")
    for token in adapters:
        if token not in subjects:
            raise UsageError(
                f"--adapter {token!r} has no --subject: add --subject '{token}=IMAGE', or drop that --adapter "
                "(an adapter without its subject image would silently generate without the subject)."
            )
    for name, values in options.items():
        for token in values:
            if token not in subjects:
                raise UsageError(f"--{name.rstrip('s').replace('_', '-')} {token!r} has no --subject.")
    for token in args.align_face:
        if token not in subjects:
            raise UsageError(f"--align-face {token!r} has no --subject.")
    check_output_folder(
        Path(args.out), overwrite=args.overwrite, ours=written_by_generate, prog="nested generate"
    )
    images = {token: load_image(Path(path).expanduser(), token) for token, path in subjects.items()}
    for token in dict.fromkeys(args.align_face):
        images[token] = aligned_face_image(images[token], f"--subject {token}={subjects[token]}")
    subject_specs(images, **options)  # the library's own checks: a strength outside its range warns now
    return {"adapters": adapters, "subjects": subjects, "images": images, "quantize": quantize, **options}


def _progress(total: int, disable: bool):

    return tqdm(total=total, desc="nested generate", unit="step", disable=disable, file=sys.stderr)


def run_generate(args: argparse.Namespace, argv: list[str]) -> Path:
    """Generate the images; returns the output folder."""
    # Here, not at the top: `nested generate --help` and argument errors answer without loading torch.
    import torch

    from nested.inference.pipeline import NestedPipeline, sampling_guidance

    parsed = _check_arguments(args)
    dtype = getattr(torch, args.dtype)
    pipe = NestedPipeline.from_pretrained(
        args.base,
        parsed["adapters"],
        dtype=dtype,
        device=args.device,
        revision=args.revision,
        image_encoder=args.image_encoder,
        quantize=parsed["quantize"],
    )
    pipe.pipe.set_progress_bar_config(disable=True)
    if args.compile:
        from nested.adapter import compile_blocks

        compile_blocks(pipe.denoiser)  # after the adapters attach: the blocks compile with their processors
    args.guidance = sampling_guidance(pipe, args.base, args.guidance, args.negative_prompt)
    out = Path(args.out).expanduser().resolve()  # the folder staged_directory replaces
    with staged_directory(out) as staging:  # --out appears complete, or stays as it was
        _generate(args, argv, parsed, pipe, staging)
    pipe.unload()
    return out


def _generate(
    args: argparse.Namespace, argv: list[str], parsed: dict[str, Any], pipe: Any, out: Path
) -> None:
    """Write the images and generation.json into ``out``."""
    import diffusers  # for the versions recorded; like torch, kept out of `nested generate --help`
    import torch

    import nested

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
                subjects=parsed["images"],
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
            with storage_refusals_named(args.out):
                image.save(out / name)
            records.append({"file": name, "seed": seed, "sha256": file_sha256(out / name)})
    finally:
        bar.close()

    scheduler = pipe.pipe.scheduler
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
                "sha256": file_sha256(Path(path).expanduser()),
                "aligned_face": token in args.align_face,
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
        "height": args.height or pipe.default_size,
        "width": args.width or pipe.default_size,
        "device": args.device,
        "dtype": args.dtype,
        "quantize": parsed["quantize"],
        "compile": args.compile,
        "scheduler": {"class": type(scheduler).__name__, "config": dict(scheduler.config)},
        "images": records,
        "seconds": round(time.time() - started, 2),
    }
    with storage_refusals_named(args.out):
        write_json_atomic(out / "generation.json", settings)


def main_generate(argv: list[str] | None = None) -> int:
    """``nested generate``: returns the exit code (0 ok, 2 for a user error, shown in one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = generate_parser().parse_args(argv)
    out = run_user_command("nested generate", args.verbose, lambda: run_generate(args, argv))
    if out is None:
        return 2
    print(f"Wrote {args.num_images} image(s) and generation.json to {out}")
    return 0


if __name__ == "__main__":  # python -m nested.cli.generate ...
    sys.exit(main_generate())

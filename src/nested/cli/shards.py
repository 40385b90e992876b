"""``nested shards``: validated images + captions -> webdataset shards and a ``shards.json`` index."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from nested.cli.common import (
    CommandParser,
    Stopped,
    check_creatable_folder,
    checked_device,
    one_line,
    stop_signals_raise,
)
from nested.errors import MissingFileError, NestedUserError

__all__ = ["main_shards", "shards_parser"]


def shards_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="nested shards",
        description="Validate images + captions and write webdataset shards with a shards.json index.",
    )
    parser.add_argument(
        "src",
        type=Path,
        help="folder of images with .txt captions, a .jsonl/.csv manifest, or a folder of .tar files "
        "(img2dataset's output: captions from json or txt, original_height/original_width kept)",
    )
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--domain", required=True, help="domain name, e.g. faces (prefix of the shard files)")
    parser.add_argument("--subject", required=True, help="the domain's subject token, e.g. '<person>' or dog")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument(
        "--maxsize", type=int, default=512 * 1024**2, help="bytes per shard (default 512 MiB)"
    )
    parser.add_argument(
        "--min-size", type=int, default=64, help="reject images with a shorter side (default 64)"
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=50_000_000,
        help="reject larger images (bomb guard; default 50000000)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="downscale so the short side <= N")
    parser.add_argument("--cache-latents", action="store_true", help="store VAE latents (needs --model)")
    parser.add_argument("--model", default=None, help="diffusers model folder/id whose vae/ encodes latents")
    parser.add_argument(
        "--resolution", type=int, default=1024, help="training resolution of cached latents (default 1024)"
    )
    parser.add_argument("--device", default=None, help="device for the VAE (default: cuda if available)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the shards in OUT (once the new ones are complete)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes that prepare images (default: one per CPU core, at most 8; 0 with --cache-latents, "
        "whose VAE runs in the main process)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    faces = parser.add_argument_group("faces and identities")
    faces.add_argument(
        "--faces",
        action="store_true",
        help="detect the subject's face (dlib; pip install 'nested[faces]'): its box becomes bbox and its "
        "FFHQ-style aligned crop ref.jpg; images without one clear face are rejected with the reason",
    )
    faces.add_argument("--face-size", type=int, default=512, help="side of the aligned crop (default 512)")
    faces.add_argument(
        "--identity-folders",
        action="store_true",
        help="SRC/<identity>/<image>: each target's reference is another photo of its identity (a manifest's "
        "identity column does the same without this flag)",
    )
    return parser


def main_shards(argv: Sequence[str] | None = None) -> int:
    """``nested shards SRC OUT --domain NAME --subject WORD ...``; returns the exit code."""
    parser = shards_parser()
    args = parser.parse_args(argv)
    if args.cache_latents and args.model is None:
        parser.error("--cache-latents needs --model PATH (a diffusers model with a vae/ subfolder)")
    if args.cache_latents and args.workers:
        parser.error("--workers prepares images in other processes: leave it out with --cache-latents")
    # Imported after parsing: `nested shards --help` answers without loading the image stack.
    from nested.data.shards import build_shards

    try:
        check_creatable_folder(Path(args.out), "OUT")
        vae = _latents_vae(args) if args.cache_latents else None
        with stop_signals_raise():
            report = build_shards(
                args.src,
                args.out,
                domain=args.domain,
                subject=args.subject,
                maxcount=args.maxcount,
                maxsize=args.maxsize,
                min_size=args.min_size,
                max_pixels=args.max_pixels,
                image_size=args.image_size,
                cache_latents=args.cache_latents,
                vae=vae,
                resolution=args.resolution,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                face_size=args.face_size if args.faces else None,
                identity_folders=args.identity_folders,
                workers=_workers(args),
            )
    except NestedUserError as error:
        print(f"nested shards: error: {one_line(error)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as stop:
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        print(
            f"nested shards: interrupted ({signal.Signals(signum).name}); {args.out} keeps what it held "
            "before, unless the new shards were already complete",
            file=sys.stderr,
        )
        return 128 + signum
    print(
        f"wrote {report.total_samples} samples in {len(report.shards)} shards to {report.out} "
        f"({report.rejected} rejected, see {report.rejected_path})"
    )
    return 0


def _workers(args: argparse.Namespace) -> int:
    """``--workers``, or by default one per CPU core this process may use, at most 8 (none with latents)."""
    if args.workers is not None:
        return args.workers
    if args.cache_latents:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores)


def _latents_vae(args: argparse.Namespace):
    """The VAE of ``--model`` that encodes the cached latents, on ``--device``."""
    from diffusers import AutoencoderKL  # only --cache-latents loads a model

    device = checked_device(args.device)
    try:
        vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae")
    except OSError as error:
        raise MissingFileError(
            f"--model {args.model!r} has no loadable vae/ ({error}); pass a diffusers model folder or a cached hub id."
        ) from error
    return vae.to(device).eval()


if __name__ == "__main__":
    raise SystemExit(main_shards())

"""Write the tiny random checkpoints (tiny-sd, tiny-sdxl, tiny-sd3, tiny-flux, tiny-clip) used by the tests
and configs/smoke.yaml.

    python scripts/make_tiny_models.py                  # -> data/models/tiny-sd, tiny-sdxl, tiny-sd3, ...
    python scripts/make_tiny_models.py --out /tmp/models --seed 1

Output is deterministic given --seed; each folder is a diffusers pipeline (< 3 MB) with an extra
image_encoder/ (tiny CLIP vision + image processor). tiny-sd3 (SD3.5-like: two CLIPs + T5) and tiny-flux
(FLUX.1-dev-like: CLIP + T5, guidance embedding) carry a real T5 tokenizer built offline.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from nested.testing import write_tiny_clip, write_tiny_pipeline

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "models"


def folder_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"parent folder (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = parser.parse_args(argv)

    for kind in ("sd", "sdxl", "sd3", "flux"):
        target = args.out / f"tiny-{kind}"
        if target.exists():
            # Rewrite from scratch so no stale file survives, but never delete something that is not ours.
            if not (target / "model_index.json").is_file():
                parser.error(
                    f"{target} exists and is not a diffusers pipeline folder; remove it or pick --out"
                )
            shutil.rmtree(target)
        write_tiny_pipeline(target, kind, seed=args.seed)
        print(f"{target}: {folder_size(target) / 1e6:.2f} MB")

    # A tiny full CLIP (text + vision) for prompt-alignment scores in the offline demo.
    clip = args.out / "tiny-clip"
    if clip.exists():
        if not (clip / "config.json").is_file():
            parser.error(f"{clip} exists and is not a model folder; remove it or pick --out")
        shutil.rmtree(clip)
    write_tiny_clip(clip, seed=args.seed)
    print(f"{clip}: {folder_size(clip) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

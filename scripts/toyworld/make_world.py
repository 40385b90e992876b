#!/usr/bin/env python
"""Write the toy world's train / held-out shards for both domains, and a contact sheet.

Layout: ``OUT/<domain>/<split>/{<domain>-000000.tar, ..., shards.json}`` for domain in faces, pets
and split in train, held_out. Identities are split with ``nested.toyworld.split_identities``; at
most ``--train-identities`` / ``--held-out-identities`` of each split are rendered (a seeded
subset), ``--samples-per-identity`` images each. The defaults stay well under 2 MB in total.

    python scripts/toyworld/make_world.py --out data/toyworld/shards --sheet /tmp/toyworld_sheet.png
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from nested.toyworld.world import (
    DEFAULT_TOKENS,
    DOMAINS,
    SCENES,
    WORLD_VERSION,
    Context,
    identities,
    render,
    render_pair,
    split_identities,
    write_world_shards,
)


def contact_sheet(images: Sequence[Image.Image], columns: int = 8, scale: int = 2) -> Image.Image:
    """Tile same-size ``images`` into a grid, upscaled ``scale`` x (nearest) for viewing."""
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * w * scale, rows * h * scale), (255, 255, 255))
    for i, image in enumerate(images):
        tile = image.resize((w * scale, h * scale), Image.Resampling.NEAREST)
        sheet.paste(tile, ((i % columns) * w * scale, (i // columns) * h * scale))
    return sheet


def example_images(seed: int) -> list[Image.Image]:
    """Every scene for a face, a pet and a pair, then both styles, then plain references."""
    rng = random.Random(seed)
    faces, pets = identities("faces"), identities("pets")
    images = []
    for i, scene in enumerate(SCENES):
        face, pet = rng.choice(faces), rng.choice(pets)
        images += [render(face, Context(scene), seed=i), render(pet, Context(scene), seed=i)]
        images.append(render_pair(face, pet, Context(scene), seed=i))
    for style in ("sketch", "painting"):
        for i, scene in enumerate(SCENES):
            images.append(render(rng.choice(faces + pets), Context(scene, style), seed=100 + i))
    images += [render(rng.choice(faces + pets), Context("plain"), seed=200 + i) for i in range(8)]
    return images


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("data/toyworld/shards"), help="output folder")
    parser.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    parser.add_argument("--held-out-fraction", type=float, default=0.2, help="identities held out")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the identity split")
    parser.add_argument("--train-identities", type=int, default=80, help="at most this many (0: all)")
    parser.add_argument("--held-out-identities", type=int, default=20, help="at most this many (0: all)")
    parser.add_argument("--samples-per-identity", type=int, default=1, help="train images per identity")
    parser.add_argument(
        "--held-out-samples-per-identity",
        type=int,
        default=1,
        help="held-out images per identity (default 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of contexts and nuisances")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--sheet", type=Path, default=None, help="also save an example contact sheet PNG")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards")
    parser.add_argument(
        "--skip-if-current",
        action="store_true",
        help="leave a split alone when its shards were rendered by this world version with these arguments "
        "(recorded in world.json); render it again (replacing it) otherwise",
    )
    return parser


RECIPE_FILE = "world.json"  # next to shards.json: what rendered the split, for --skip-if-current


def split_recipe(args: argparse.Namespace, domain: str, split: str) -> dict:
    """Everything that determines a split's samples (with WORLD_VERSION for the drawing and captions)."""
    return {
        "world_version": WORLD_VERSION, "domain": domain, "split": split, "size": args.size,
        "seed": args.seed, "split_seed": args.split_seed, "held_out_fraction": args.held_out_fraction,
        "identities": args.train_identities if split == "train" else args.held_out_identities,
        "samples_per_identity": (
            args.samples_per_identity if split == "train" else args.held_out_samples_per_identity
        ),
    }  # fmt: skip


def is_current(out: Path, recipe: dict) -> bool:
    """True when ``out`` holds complete shards written from exactly ``recipe``."""
    try:
        return (out / "shards.json").is_file() and json.loads((out / RECIPE_FILE).read_text()) == recipe
    except (OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    total = 0
    for domain in args.domains:
        splits = split_identities(domain, args.held_out_fraction, seed=args.split_seed)
        limits = (args.train_identities, args.held_out_identities)
        for name, chosen, limit in zip(("train", "held_out"), splits, limits, strict=True):
            if limit and limit < len(chosen):
                picked = set(random.Random(f"{args.seed}-{domain}-{name}").sample(range(len(chosen)), limit))
                chosen = [ident for i, ident in enumerate(chosen) if i in picked]
            # Shards are written identity by identity; the canonical order walks the attribute product
            # (all "pale" faces first...), which a shuffle buffer cannot undo. Seeded shuffle instead.
            chosen = list(chosen)
            random.Random(f"{args.seed}-{domain}-{name}-order").shuffle(chosen)
            out = args.out / domain / name
            recipe = split_recipe(args, domain, name)
            if args.skip_if_current and is_current(out, recipe):
                print(f"{out}: up to date (world version {WORLD_VERSION}), kept")
                continue
            if args.overwrite or args.skip_if_current:
                (out / RECIPE_FILE).unlink(missing_ok=True)  # an interrupted re-render is never "current"
            try:
                report = write_world_shards(
                    out,
                    domain,
                    identities=chosen,
                    samples_per_identity=(
                        args.samples_per_identity if name == "train" else args.held_out_samples_per_identity
                    ),
                    seed=args.seed + (0 if name == "train" else 1),
                    token=DEFAULT_TOKENS[domain],
                    size=args.size,
                    overwrite=args.overwrite or args.skip_if_current,
                )
            except FileExistsError as error:
                print(f"make_world: error: {error}", file=sys.stderr)
                return 2
            (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
            size = sum(s["bytes"] for s in report.shards)
            total += size
            print(f"{out}: {len(chosen)} identities, {report.total_samples} samples, {size / 1024:.0f} KiB")
    print(f"total: {total / 1024:.0f} KiB in {args.out}")
    if args.sheet is not None:
        contact_sheet(example_images(args.seed), columns=8, scale=3).save(args.sheet)
        print(f"contact sheet: {args.sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the demo shards in data/demo from real photos shipped with scikit-image (no download).

    python scripts/make_demo_shards.py                 # -> data/demo/{faces,pets}[/val]
    python scripts/make_demo_shards.py --out /tmp/demo --per-domain 16

Domains: ``faces`` (skimage.data.astronaut(), subject ``<person>``) and ``pets``
(skimage.data.chelsea(), subject ``<cat>``). Each target is a random crop around the subject's
face, pasted at a random scale onto one of a few backgrounds (flat colour, gradient, the coffee or
rocket photos), randomly flipped and colour-shifted, stored at 128 px with the face's ``bbox``.
Two thirds of the samples also carry a ``ref.jpg`` (a crop around the face of the source photo);
the rest exercise the bbox-crop path. One caption template in six lacks the subject token, which
exercises the ``insert`` caption rule. Output is byte-identical across runs (seeded, and
``SOURCE_DATE_EPOCH`` fixes the tar timestamps). Use in a config:
``urls: data/demo/faces/shards.json`` and, for validation, ``data/demo/faces/val/shards.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from nested.data.shards import build_shards

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "demo"
SIZE = 128  # short side of the stored targets
REF_SIZE = 96
# Face boxes (x0, y0, x1, y1) in the source photos, found by looking at them.
DOMAINS = {
    "faces": {
        "subject": "<person>",
        "photo": skdata.astronaut,
        "face": (150, 15, 305, 175),
        "captions": [
            "a photo of <person> in space",
            "<person> smiling, portrait",
            "<person> in an orange spacesuit",
            "a close-up photo of <person>",
            "<person> standing in front of a flag",
            "a portrait photo of a woman",  # no subject token: the insert rule adds it
        ],
    },
    "pets": {
        "subject": "<cat>",
        "photo": skdata.chelsea,
        "face": (80, 30, 380, 290),
        "captions": [
            "a photo of <cat> on a sofa",
            "<cat> looking at the camera",
            "a close-up photo of <cat>",
            "<cat> sitting in the garden",
            "a painting of <cat>",
            "a tabby cat with green eyes",  # no subject token: the insert rule adds it
        ],
    },
}


def backgrounds() -> list[Image.Image]:
    """A few backgrounds: flat colours, a gradient and two other skimage photos."""
    gradient = np.linspace(0, 255, 256, dtype=np.uint8)
    ramp = np.stack(
        [np.tile(gradient, (256, 1)), np.tile(gradient[:, None], (1, 256)), np.full((256, 256), 160)], -1
    )
    return [
        Image.new("RGB", (256, 256), (235, 235, 240)),
        Image.new("RGB", (256, 256), (40, 70, 110)),
        Image.fromarray(ramp.astype(np.uint8)),
        Image.fromarray(skdata.coffee()),
        Image.fromarray(skdata.rocket()),
    ]


def make_target(
    photo: Image.Image, face: tuple[int, int, int, int], backdrop: Image.Image, rng: random.Random
) -> tuple[Image.Image, list[float]]:
    """One augmented target (short side ``SIZE``) and the face box in its pixels."""
    x0, y0, x1, y1 = face
    # A crop of the photo that contains the whole face, between snug and the whole photo.
    short = min(photo.size)
    side = rng.uniform(min(1.15 * max(x1 - x0, y1 - y0), short), short)
    left = rng.uniform(max(0, x1 - side), min(x0, photo.width - side))
    top = rng.uniform(max(0, y1 - side), min(y0, photo.height - side))
    subject = photo.crop((round(left), round(top), round(left + side), round(top + side)))
    box = [x0 - round(left), y0 - round(top), x1 - round(left), y1 - round(top)]
    width, height = rng.choice([(SIZE, SIZE), (SIZE * 4 // 3, SIZE), (SIZE, SIZE * 4 // 3)])
    canvas = backdrop.resize((width, height), Image.Resampling.BICUBIC)
    # The subject fills 60-100 % of the short side, pasted at a random position.
    paste = round(rng.uniform(0.6, 1.0) * min(width, height))
    scale = paste / subject.width
    px, py = rng.randint(0, width - paste), rng.randint(0, height - paste)
    canvas.paste(subject.resize((paste, paste), Image.Resampling.LANCZOS), (px, py))
    box = [px + box[0] * scale, py + box[1] * scale, px + box[2] * scale, py + box[3] * scale]
    if rng.random() < 0.5:
        canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        box = [width - box[2], box[1], width - box[0], box[3]]
    # A colour shift per channel (white balance / exposure).
    gains = np.array([rng.uniform(0.85, 1.15) for _ in range(3)], dtype=np.float32)
    canvas = Image.fromarray(np.clip(np.asarray(canvas, dtype=np.float32) * gains, 0, 255).astype(np.uint8))
    return canvas, [round(v, 1) for v in box]


def make_ref(photo: Image.Image, face: tuple[int, int, int, int], rng: random.Random) -> Image.Image:
    """A square crop around the face of the source photo with a random margin."""
    x0, y0, x1, y1 = face
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0) * rng.uniform(0.55, 0.7)
    box = (max(0, cx - half), max(0, cy - half), min(photo.width, cx + half), min(photo.height, cy + half))
    return photo.crop(tuple(round(v) for v in box)).resize((REF_SIZE, REF_SIZE), Image.Resampling.LANCZOS)


def write_domain(name: str, out: Path, count: int, seed: int, work: Path) -> None:
    """Generate ``count`` samples of domain ``name`` and shard them into ``out``."""
    spec = DOMAINS[name]
    rng = random.Random(f"{name}:{seed}")
    photo = Image.fromarray(spec["photo"]())
    backdrops = backgrounds()
    work.mkdir(parents=True)
    rows = []
    for index in range(count):
        target, bbox = make_target(photo, spec["face"], rng.choice(backdrops), rng)
        target.save(work / f"{name}_{index:03d}.jpg", quality=85)
        row = {"image": f"{name}_{index:03d}.jpg", "caption": rng.choice(spec["captions"]), "bbox": bbox}
        if index % 3:
            make_ref(photo, spec["face"], rng).save(work / f"{name}_{index:03d}_ref.jpg", quality=85)
            row["ref"] = f"{name}_{index:03d}_ref.jpg"
        rows.append(row)
    manifest = work / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    report = build_shards(
        manifest, out, domain=name, subject=spec["subject"], maxcount=16, overwrite=True, progress=False
    )
    size = sum(s["bytes"] for s in report.shards)
    print(f"{out}: {report.total_samples} samples, {len(report.shards)} shards, {size / 1024:.0f} KiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--per-domain", type=int, default=48, help="training samples per domain (default 48)")
    parser.add_argument(
        "--val-per-domain", type=int, default=8, help="validation samples per domain (default 8)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentations (default 0)")
    args = parser.parse_args(argv)
    os.environ.setdefault("SOURCE_DATE_EPOCH", "1767225600")  # 2026-01-01: reproducible tars
    with tempfile.TemporaryDirectory() as tmp:
        for name in DOMAINS:
            write_domain(name, args.out / name, args.per_domain, args.seed, Path(tmp) / name)
            write_domain(
                name,
                args.out / name / "val",
                args.val_per_domain,
                args.seed + 1000,
                Path(tmp) / f"{name}-val",
            )
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"total {total / 1024:.0f} KiB under {args.out}")


if __name__ == "__main__":
    main()

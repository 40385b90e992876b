"""``nested shards --faces`` throughput: samples/s of face preparation, per worker count.

Writes ``--count`` photos of ``--size`` x ``--size`` px (JPEG quality 95) made from real photos that
installed packages ship: scikit-image's astronaut and matplotlib's Grace Hopper, each augmented (rotation
within +-15 degrees, an off-centre crop of 70-100 %, brightness 0.7-1.3, a mirror image half of the time),
plus one photo in ten without a face (scikit-image's camera man and cat, augmented the same way), with
captions. Then it builds shards from them in rounds, each variant once per round in a rotating order:

- ``faces wN``: ``build_shards(face_size=512, workers=N)``: detection, subject rule, landmarks, the aligned
  512 px crop, for every worker count of ``--workers``;
- ``plain wN``: the same build without faces (validation and copying only), for the largest N.

It prints each variant's median samples/s over the rounds and the ratios, measured side by side: on a
shared machine absolute speeds drift between runs, ratios less.

    python benchmarks/faces_shards.py                      # 200 photos, workers 1 and 2, 2 rounds
    python benchmarks/faces_shards.py --workers 1 2 4 --rounds 3
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from matplotlib import cbook
from PIL import Image, ImageEnhance, ImageOps
from skimage import data

from nested.data.shards import build_shards


def _sources() -> tuple[list[Image.Image], list[Image.Image]]:
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as hopper:
        people = [Image.fromarray(data.astronaut()), hopper.convert("RGB")]
    others = [Image.fromarray(data.camera()).convert("RGB"), Image.fromarray(data.chelsea())]
    return people, others


def _augmented(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    image = image.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BICUBIC)
    width, height = image.size
    side = rng.uniform(0.7, 1.0)
    crop_w, crop_h = int(width * side), int(height * side)
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.7, 1.3)))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)


def write_photos(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    people, others = _sources()
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pool = others if index % 10 == 9 else people
        image = _augmented(pool[index % len(pool)], size, rng)
        image.save(folder / f"{index:04d}.jpg", quality=95)
        (folder / f"{index:04d}.txt").write_text("a photo of <person>")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="photos (default 200)")
    parser.add_argument("--size", type=int, default=1024, help="their side in pixels (default 1024)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--face-size", type=int, default=512, help="aligned crop side (default 512)")
    args = parser.parse_args(argv)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{args.count} photos of {args.size} px, {cores} CPU cores for this process, python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory(prefix="faces-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        photos = write_photos(root / "photos", args.count, args.size)
        print(f"wrote the photos in {time.perf_counter() - started:.1f} s")
        variants = {f"faces w{n}": (args.face_size, n) for n in args.workers}
        variants[f"plain w{max(args.workers)}"] = (None, max(args.workers))
        speeds: dict[str, list[float]] = {name: [] for name in variants}
        reports = {}
        names = list(variants)
        for round_index in range(args.rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                face_size, workers = variants[name]
                out = root / f"out-{name.replace(' ', '-')}"
                started = time.perf_counter()
                report = build_shards(
                    photos,
                    out,
                    domain="faces",
                    subject="<person>",
                    face_size=face_size,
                    workers=workers,
                    overwrite=True,
                    progress=False,
                )
                seconds = time.perf_counter() - started
                reports[name] = report
                speeds[name].append(args.count / seconds)
                print(
                    f"round {round_index + 1} {name:>9}: {args.count / seconds:6.2f} samples/s "
                    f"({report.total_samples} written, {report.rejected} rejected, {seconds:.1f} s)"
                )
        print("\nmedian samples/s (inputs per second, rejected ones included):")
        medians = {name: statistics.median(values) for name, values in speeds.items()}
        for name, value in medians.items():
            print(f"  {name:>9}: {value:6.2f}")
        first = f"faces w{args.workers[0]}"
        for n in args.workers[1:]:
            print(f"  faces w{n} / {first}: {medians[f'faces w{n}'] / medians[first]:.2f}")
        rejected = (reports[first].out / "rejected.jsonl").read_text().splitlines()
        reasons = collections.Counter(json.loads(line)["reason"] for line in rejected)
        print(f"  rejected with faces: {dict(reasons)}")
        widest = max(args.workers)
        print(
            f"  faces w{widest} / plain w{widest}: {medians[f'faces w{widest}'] / medians[f'plain w{widest}']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

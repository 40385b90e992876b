"""Throughput of the training data stream against plain PIL decoding of the same JPEG bytes.

A small, real data set is written to a temporary folder: the photos scikit-image ships (astronaut,
chelsea, coffee, rocket), cropped to several aspect ratios, flipped and re-toned, resized so their
short side is ``--size`` (1024 px: what SDXL training reads, so ``target_transform`` only crops)
and saved as JPEG quality 90, then turned into webdataset shards with ``nested.data.shards.build_shards``
(captions "a photo of <person> ..."). The astronaut's face and the cat's head carry a ``bbox``
(their reference is a crop around it); coffee and rocket have none, so their reference is derived
from the whole target (the ``bbox_crop`` rule's fallback).

For each worker count (0 = in the main process, then 1, 2 ... DataLoader workers) the
``NestedDataModule`` training loader (resolution ``--size``, reference_size 224, the default
``ReferenceAugment``, batch 1) is timed against decoding the same JPEG bytes with
``Image.open(BytesIO(b)).convert("RGB")`` + ``load()`` in one process. Variants run in
alternating, equally long blocks (the order reversed every other round); the reported ratio is
the median over rounds of ``(stream samples/s / max(workers, 1)) / (PIL decodes/s)``. Before a
timed block, the batches a worker prefetched while another variant ran are drained untimed.

Besides the current code (``stream``; it includes patch A, which has landed in src), the proposed
patch B is timed in the same rounds as ``uint8``: pixel_values leave the loader as uint8 (src's
``target_transform`` with a uint8 ``_to_tensor``, monkeypatched into ``nested.data.loading``; see "patch
B" below). A check first confirms that it gives the current stream's samples (same keys,
bit-identical pixels after the on-device conversion, references, sizes, crops, skip counts).
``--profile`` prints a cProfile of the in-process stream, a per-stage cost table (decode,
target (float32 and B's uint8), reference, collate) and the cost of sending one sample from a
worker to the main process (current collate, with float32 and with uint8 pixels).

    python benchmarks/data.py                                  # ~2-3 min
    python benchmarks/data.py --profile --workers 0 --pairs 3  # where the time goes
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import itertools
import json
import multiprocessing
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

import nested.data as nd
import nested.data.datamodule as datamodule
import nested.data.loading as loading
import nested.data.transforms as nt
from nested.data.shards import build_shards

# name -> (caption, subject bbox [x0, y0, x1, y1] in the skimage photo's pixels, or None)
PHOTOS: dict[str, tuple[str, list[float] | None]] = {
    "astronaut": ("a photo of <person> in an orange space suit, a flag behind her", [170, 20, 280, 150]),
    "chelsea": ("a photo of <person>, a tabby cat looking to the side", [100, 0, 360, 280]),
    "coffee": ("a photo of <person>'s cup of coffee on a saucer, a spoon", None),
    "rocket": ("a photo of <person>'s rocket on the launch pad under a blue sky", None),
}
# Fractional crop boxes of the photo (x0, y0, x1, y1): several aspect ratios and framings.
CROPS = [
    (0.0, 0.0, 1.0, 1.0),
    (0.1, 0.0, 0.9, 1.0),
    (0.0, 0.1, 1.0, 0.9),
    (0.05, 0.05, 0.95, 0.95),
    (0.15, 0.0, 1.0, 0.85),
    (0.0, 0.15, 0.85, 1.0),
    (0.1, 0.1, 1.0, 1.0),
    (0.0, 0.0, 0.9, 0.9),
]
TONES = (1.0, 0.9, 1.1, 0.8)  # brightness factors, for more than 64 distinct images
REFERENCE_SIZE = 224


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Training-stream samples/s of NestedDataModule (per worker) divided by plain PIL decodes/s "
            "of the same JPEG bytes in one process, as the median of alternating A/B rounds."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=64, help="distinct JPEG images in the shards.")
    parser.add_argument(
        "--size", type=int, default=1024, help="short side of the images = training resolution."
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts.")
    parser.add_argument("--pairs", type=int, default=5, help="timed rounds per worker count.")
    parser.add_argument("--block", type=float, default=1.5, help="seconds each variant runs per round.")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=["stream", "uint8"],
        default=["stream", "uint8"],
        help="loaders timed against PIL: the current src (stream), src + patch B: uint8 pixel_values (uint8).",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in the main process (workers always use 1)."
    )
    parser.add_argument("--target", type=float, default=0.8, help="ratio the stream should reach.")
    parser.add_argument("--profile", action="store_true", help="cProfile + per-stage breakdown (in-process).")
    parser.add_argument("--profile-samples", type=int, default=64)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the written images.")
    parser.add_argument("--keep", default=None, help="write the data set here instead of a temp dir.")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file.")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------ data set
def _photo(name: str) -> Image.Image:
    from skimage import data as skdata

    return Image.fromarray(getattr(skdata, name)()).convert("RGB")


def write_images(folder: Path, count: int, size: int, quality: int) -> Path:
    """Write ``count`` JPEG variants of the scikit-image photos and a jsonl manifest; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = {name: _photo(name) for name in PHOTOS}
    rows = []
    combos = itertools.product(TONES, (False, True), CROPS, PHOTOS)  # photos vary fastest
    for index, (tone, flip, crop, name) in enumerate(itertools.islice(combos, count)):
        caption, bbox = PHOTOS[name]
        photo = photos[name]
        box = (
            round(crop[0] * photo.width),
            round(crop[1] * photo.height),
            round(crop[2] * photo.width),
            round(crop[3] * photo.height),
        )
        image = photo.crop(box)
        scale = size / min(image.size)
        new_size = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
        sx, sy = new_size[0] / image.width, new_size[1] / image.height
        image = image.resize(new_size, Image.Resampling.LANCZOS)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if tone != 1.0:
            image = ImageEnhance.Brightness(image).enhance(tone)
        row: dict = {"image": f"{index:04d}_{name}.jpg", "caption": caption}
        if bbox is not None:  # into the crop's frame; kept if at least half the subject is in it
            x0, y0 = max(bbox[0], box[0]) - box[0], max(bbox[1], box[1]) - box[1]
            x1, y1 = min(bbox[2], box[2]) - box[0], min(bbox[3], box[3]) - box[1]
            if (x1 - x0) * (y1 - y0) >= 0.5 * (bbox[2] - bbox[0]) * (bbox[3] - bbox[1]):
                x0, y0, x1, y1 = x0 * sx, y0 * sy, x1 * sx, y1 * sy
                if flip:
                    x0, x1 = new_size[0] - x1, new_size[0] - x0
                row["bbox"] = [round(v, 1) for v in (x0, y0, x1, y1)]
        image.save(folder / row["image"], format="JPEG", quality=quality)
        rows.append(row)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest


def build_dataset(root: Path, args: argparse.Namespace) -> tuple[Path, list[bytes]]:
    """Images + shards under ``root``; returns (shards.json, the stored JPEG bytes)."""
    manifest = write_images(root / "images", args.images, args.size, args.quality)
    report = build_shards(
        manifest, root / "shards", domain="faces", subject="<person>", maxcount=16, progress=False
    )
    if report.rejected:
        raise RuntimeError(f"{report.rejected} images were rejected: see {report.rejected_path}")
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    jpegs = [(manifest.parent / r["image"]).read_bytes() for r in rows]
    with_bbox = sum("bbox" in r for r in rows)
    print(
        f"data set: {len(jpegs)} JPEGs (quality {args.quality}, short side {args.size}, "
        f"{sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB mean, {with_bbox} with a bbox) "
        f"in {len(report.shards)} shards at {report.out}"
    )
    return report.index, jpegs


# ------------------------------------------------------------------------ patch B (proposed)
# Patch A (one-resample reference_transform, cheaper collate_batch, one RGB conversion in the
# decoder) is in src/ now, so "stream" is it. What this benchmark still proposes:
#
# "uint8" (B): the stream's pixel_values are uint8 (3, R, R) in [0, 255] (3 MB at 1024 px instead
#     of 12 MB of float32: a worker copies 4x less into shared memory, and the host-to-GPU copy is
#     4x smaller); NestedAttentionModule.diffusion_loss would turn them into float32 in [-1, 1] on
#     the device with the same arithmetic (x / 255 * 2 - 1, bit-identical). That conversion is not
#     part of the stream's samples/s below: on a GPU it costs microseconds.
# It runs src's target_transform with src's ``_to_tensor`` swapped for a uint8 one for the call,
# and is applied to the stream by monkeypatching ``nested.data.loading.target_transform``.


class _Uint8Pixels:
    """What B's ``_to_tensor`` returns: target_transform's ``.mul_(2.0).sub_(1.0)`` leave it uint8."""

    def __init__(self, pixels: torch.Tensor) -> None:
        self.pixels = pixels

    def mul_(self, _: float) -> _Uint8Pixels:
        return self

    sub_ = mul_


def _to_uint8(image: Image.Image) -> _Uint8Pixels:
    """B: PIL RGB -> (3, H, W) uint8, a channel-first view of one HWC copy."""
    return _Uint8Pixels(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))


def uint8_target_transform(image: Image.Image, **kwargs) -> nd.TargetView:
    """B: ``nested.transforms.target_transform`` (same resize, crop, flip, draws), uint8 pixels."""
    saved, nt._to_tensor = nt._to_tensor, _to_uint8
    try:
        view = nt.target_transform(image, **kwargs)
    finally:
        nt._to_tensor = saved
    return view._replace(pixel_values=view.pixel_values.pixels)


def pixels_on_device(pixels: torch.Tensor) -> torch.Tensor:
    """B: what diffusion_loss would do with uint8 pixel_values (after the batch is on the device)."""
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0).mul_(2.0).sub_(1.0)


@contextlib.contextmanager
def patched(variant: str) -> Iterator[None]:
    """Apply patch B ("uint8") to the stream's ``target_transform`` (in :mod:`nested.data.loading`)
    inside the block ("stream": nothing).

    Loaders made inside the block fork their workers (instead of spawning them, fresh interpreters without the
    patch), so that the workers keep it; in the main process it applies per call. Every variant starts its
    workers this way: the start method does not change a warmed-up loader's rate.
    """
    saved = loading.target_transform, datamodule.worker_context
    if variant == "uint8":
        loading.target_transform = uint8_target_transform
    datamodule.worker_context = lambda: multiprocessing.get_context("fork")
    try:
        yield
    finally:
        loading.target_transform, datamodule.worker_context = saved


# ------------------------------------------------------------------------------------ variants
def make_datamodule(index: Path, size: int, workers: int) -> nd.NestedDataModule:
    domain = nd.DomainSpec("faces", str(index), "<person>")
    return nd.NestedDataModule(
        [domain],
        resolution=size,
        reference_size=REFERENCE_SIZE,
        batch_size=1,
        num_workers=workers,
        epoch_samples=10**9,  # one endless epoch
        reference_augment=nd.ReferenceAugment(),
    )


class PilVariant:
    """The baseline: decode the JPEG bytes, round robin, in this process."""

    name = "pil"

    def __init__(self, jpegs: list[bytes]) -> None:
        self.jpegs = itertools.cycle(jpegs)

    def block(self, seconds: float) -> float:
        count, start = 0, time.perf_counter()
        while True:
            with Image.open(io.BytesIO(next(self.jpegs))) as image:
                image.convert("RGB").load()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return count / elapsed

    def close(self) -> None:
        pass


class LoaderVariant:
    """A NestedDataModule training loader, consumed one batch (= one sample) at a time."""

    def __init__(self, name: str, index: Path, size: int, workers: int) -> None:
        self.name, self.workers = name, workers
        self.dtype = torch.uint8 if name == "uint8" else None  # the current src may give either
        self.context: Callable[[], contextlib.AbstractContextManager] = lambda: patched(name)
        with self.context():  # the DataLoader keeps the collate_fn it was given
            self.loader = make_datamodule(index, size, workers).train_dataloader()
        self.iterator = None

    def _next(self) -> None:
        pixels = next(self.iterator)["pixel_values"]
        if pixels.shape[0] != 1 or self.dtype not in (None, pixels.dtype):
            raise RuntimeError(f"{self.name}: unexpected batch {pixels.dtype} {tuple(pixels.shape)}")

    def block(self, seconds: float) -> float:
        with self.context():  # workers forked here keep the patch; in-process it applies per call
            if self.iterator is None:
                self.iterator = iter(self.loader)
                for _ in range(4 * max(1, self.workers)):  # worker start-up, shuffle buffer fill
                    self._next()
            # Batches the workers prefetched while another variant ran would come for free.
            for _ in range(self.loader.prefetch_factor * self.workers if self.workers else 0):
                self._next()
            count, start = 0, time.perf_counter()
            while True:
                self._next()
                count += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    return count / elapsed

    def close(self) -> None:
        self.iterator = None  # shuts the workers down
        self.loader = None


def _as_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels_on_device(pixels) if pixels.dtype == torch.uint8 else pixels


def check_equivalence(index: Path, size: int, count: int = 8) -> None:
    """The uint8 stream gives the current stream's samples: same keys, crops, sizes, counts,
    references; bit-identical pixels after the on-device conversion."""
    batches = {}
    for name in ("stream", "uint8"):
        with patched(name):
            loader = make_datamodule(index, size, 0).train_dataloader()
            batches[name] = list(itertools.islice(iter(loader), count))
    for a, b in zip(batches["stream"], batches["uint8"], strict=True):
        same = (
            a["keys"] == b["keys"]
            and b["pixel_values"].dtype == torch.uint8
            and torch.equal(_as_float(a["pixel_values"]), _as_float(b["pixel_values"]))
            and torch.equal(a["reference"], b["reference"])
            and torch.equal(a["original_sizes"], b["original_sizes"])
            and torch.equal(a["crops_top_left"], b["crops_top_left"])
            and a["skipped"].keys() == b["skipped"].keys()
            and all(torch.equal(a["skipped"][k], b["skipped"][k]) for k in a["skipped"])
        )
        if not same:
            raise RuntimeError(f"the uint8 stream differs from the current one at {a['keys']}")
    print(
        f"equivalence: {count} samples of the uint8 stream = the current stream (keys, pixels "
        "bit-identical after conversion, references, sizes, crops, skip counts)"
    )


def measure(args: argparse.Namespace, index: Path, jpegs: list[bytes], workers: int) -> dict:
    variants: list = [PilVariant(jpegs)] + [
        LoaderVariant(n, index, args.size, workers) for n in args.variants
    ]
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    try:
        for variant in variants:  # warm-up: worker start, shuffle buffers, first decodes
            variant.block(0.3)
        for round_index in range(args.pairs):
            order = variants if round_index % 2 == 0 else variants[::-1]
            for variant in order:
                rates[variant.name].append(variant.block(args.block))
    finally:
        for variant in variants:
            variant.close()
    per_worker = max(1, workers)
    result: dict = {"workers": workers, "rates": rates}
    for name in args.variants:
        result[f"{name}/pil"] = [s / per_worker / p for s, p in zip(rates[name], rates["pil"], strict=True)]
        if name != "stream" and "stream" in rates:
            result[f"{name}/stream"] = [a / b for a, b in zip(rates[name], rates["stream"], strict=True)]
    return result


def print_table(args: argparse.Namespace, results: list[dict]) -> None:
    median = statistics.median
    header = f"{'workers':>7} | {'PIL dec/s':>9}"
    for name in args.variants:
        header += f" | {name + ' smp/s':>13} | {name + '/PIL per worker':>23}"
        if name != "stream" and "stream" in args.variants:
            header += f" | {'vs stream':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        line = f"{r['workers']:>7} | {median(r['rates']['pil']):>9.1f}"
        for name in args.variants:
            ratios = r[f"{name}/pil"]
            spread = f"[{min(ratios):.2f}-{max(ratios):.2f}]"
            ok = "ok" if median(ratios) >= args.target else "LOW"
            line += f" | {median(r['rates'][name]):>13.1f} | {median(ratios):>5.2f} {spread:>12} {ok:>4}"
            if f"{name}/stream" in r:
                line += f" | {median(r[f'{name}/stream']):>8.2f}x"
        print(line)
    print(
        f"\nratio = (stream samples/s / max(workers, 1)) / (PIL decodes/s in one process), median of "
        f"{args.pairs} alternating rounds of {args.block} s per variant, [min-max] over rounds; target "
        f">= {args.target}. 'vs stream': median per-round samples/s ratio to the current stream. "
        "smp/s, dec/s: medians (absolute numbers drift on a shared machine; compare the ratios)."
    )


# ------------------------------------------------------------------------------------ profile
def _stage_samples(index: Path, count: int) -> list[dict]:
    """Decoded raw samples (PIL target + json) as the convert stage receives them."""
    import webdataset as wds

    urls = nd.expand_urls(str(index))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.map(loading.decoder())
    )
    return list(itertools.islice(pipeline, count))


def profile(args: argparse.Namespace, index: Path, jpegs: list[bytes]) -> dict:
    """cProfile of the in-process stream, then a per-stage timing table (current src + B's target)."""
    loader = make_datamodule(index, args.size, 0).train_dataloader()
    iterator = iter(loader)
    next(iterator)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.profile_samples):
        next(iterator)
    profiler.disable()
    print(f"\ncProfile of {args.profile_samples} in-process stream samples (top 18 by own time):")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(18)

    samples = _stage_samples(index, min(len(jpegs), 32))
    augment = nd.ReferenceAugment()

    def run_reference(function: Callable, with_bbox: bool) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(0)
            for raw in samples:
                bbox = raw["json"].get("bbox")
                if (bbox is not None) == with_bbox:
                    function(raw["jpg"], size=REFERENCE_SIZE, bbox=bbox, augment=augment, rng=rng)

        return run

    def run_decode() -> None:
        for data in jpegs[: len(samples)]:
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB").load()

    def run_decoder(make: Callable) -> Callable[[], None]:
        def run() -> None:
            decode = make()
            for data in jpegs[: len(samples)]:
                decode({"__key__": "k", "jpg": data})

        return run

    def run_target(function: Callable) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(0)
            for raw in samples:
                function(raw["jpg"], resolution=args.size, center_crop=False, rng=rng)

        return run

    uint8_pixels = [uint8_target_transform(raw["jpg"], resolution=args.size).pixel_values for raw in samples]

    def run_to_float() -> None:
        for pixels in uint8_pixels:
            pixels_on_device(pixels[None])

    views = [nd.target_transform(raw["jpg"], resolution=args.size) for raw in samples]
    fake = [
        {
            "pixel_values": v.pixel_values,
            "reference": torch.zeros(3, REFERENCE_SIZE, REFERENCE_SIZE),
            "caption": "c",
            "subject": "s",
            "domain": "d",
            "key": "k",
            "original_size": v.original_size,
            "crop_top_left": v.crop_top_left,
            "skipped": {},
        }
        for v in views
    ]

    def run_collate(function: Callable) -> Callable[[], None]:
        def run() -> None:
            for sample in fake:
                function([sample])

        return run

    n_bbox = sum(raw["json"].get("bbox") is not None for raw in samples)
    stages: dict[str, tuple[Callable[[], None], int]] = {
        "PIL decode (baseline)": (run_decode, len(samples)),
        "decoder": (run_decoder(loading.decoder), len(samples)),
        "target_transform: current (float32)": (run_target(nd.target_transform), len(samples)),
        "target_transform: uint8 (B)": (run_target(uint8_target_transform), len(samples)),
        "  B's uint8 -> float (GPU in training)": (run_to_float, len(samples)),
        "reference, bbox crop": (run_reference(nd.reference_transform, True), n_bbox),
        "reference, whole target": (run_reference(nd.reference_transform, False), len(samples) - n_bbox),
        "collate_batch (in-process)": (run_collate(nd.collate_batch), len(samples)),
    }
    times: dict[str, list[float]] = {name: [] for name in stages}
    for round_index in range(5):
        order = list(stages.items())
        for name, (function, count) in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            function()
            times[name].append((time.perf_counter() - start) / max(1, count) * 1e3)
    print(f"\nper-stage cost, ms per sample (median of 5 alternating rounds over {len(samples)} samples):")
    for name, values in times.items():
        print(f"  {name:<40} {statistics.median(values):7.2f}")

    stages_ms = {name: statistics.median(values) for name, values in times.items()}
    stages_ms.update(transfer_cost(args.size))
    return stages_ms


class _Prepared(torch.utils.data.IterableDataset):
    """Yields fresh copies of one prepared training sample (the transforms' cost left out)."""

    def __init__(self, sample: dict) -> None:
        super().__init__()
        self.sample = sample

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.sample.items()}


def transfer_cost(size: int, batches: int = 40, rounds: int = 5) -> dict[str, float]:
    """ms per batch of one sample: collate + worker->main transfer, in-process vs one worker."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    sample = {
        "pixel_values": nd.target_transform(image, resolution=size).pixel_values,
        "reference": torch.rand(3, REFERENCE_SIZE, REFERENCE_SIZE),
        "caption": "a photo of <person>",
        "subject": "<person>",
        "domain": "faces",
        "key": "k",
        "original_size": (size, size),
        "crop_top_left": (0, 0),
        "skipped": dict.fromkeys(nd.SKIP_KEYS, 0),
    }
    uint8_sample = dict(sample, pixel_values=uint8_target_transform(image, resolution=size).pixel_values)
    cases = {
        "current collate": (sample, nd.collate_batch),
        "current collate + uint8 (B)": (uint8_sample, nd.collate_batch),
    }
    iterators = {}
    for name, (prepared, collate) in cases.items():
        for workers in (0, 1):
            loader = torch.utils.data.DataLoader(
                _Prepared(prepared), batch_size=1, num_workers=workers, collate_fn=collate
            )
            iterators[name, workers] = iter(loader)
            for _ in range(4):
                next(iterators[name, workers])
    times: dict[tuple[str, int], list[float]] = {key: [] for key in iterators}
    for round_index in range(rounds):
        order = list(iterators.items())
        for key, iterator in order if round_index % 2 == 0 else order[::-1]:
            for _ in range(2 * key[1]):  # what the worker prefetched meanwhile
                next(iterator)
            start = time.perf_counter()
            for _ in range(batches):
                next(iterator)
            times[key].append((time.perf_counter() - start) / batches * 1e3)
    iterators.clear()
    print(
        f"\ncollate + transfer of one {size} px sample, ms per batch (median of {rounds} alternating "
        "rounds; the copy of the prepared sample is included in both columns):"
    )
    print(f"  {'':<30} {'in-process':>10} {'1 worker':>9} {'transfer':>9}")
    result = {}
    for name in cases:
        local, worker = (statistics.median(times[name, w]) for w in (0, 1))
        print(f"  {name:<30} {local:>10.2f} {worker:>9.2f} {worker - local:>9.2f}")
        result[f"transfer: {name}"] = worker - local
    return result


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    with tempfile.TemporaryDirectory(prefix="nested-data-bench-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        index, jpegs = build_dataset(root, args)
        output: dict = {"args": vars(args)}
        if "uint8" in args.variants:
            check_equivalence(index, args.size)
        if args.profile:
            output["stages_ms"] = profile(args, index, jpegs)
        results = []
        for workers in args.workers:
            start = time.perf_counter()
            results.append(measure(args, index, jpegs, workers))
            print(f"workers={workers}: measured in {time.perf_counter() - start:.0f} s", flush=True)
        print_table(args, results)
        output["results"] = results
    if args.json:
        Path(args.json).write_text(json.dumps(output, indent=2), encoding="utf-8")
    return output


if __name__ == "__main__":
    main()

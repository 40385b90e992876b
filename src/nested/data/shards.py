"""Writing training shards: validated images + captions -> webdataset tar files and an index.

Sample format (one webdataset sample per training image; all members share the ``__key__``):

- ``jpg`` | ``png`` | ``webp``: the target image (exactly one). The source file's bytes when
  possible, else re-encoded as JPEG (quality 95).
- ``ref.jpg`` | ``ref.png`` (optional): the subject encoder's input, e.g. an aligned face crop.
  Without it, the domain's ``reference`` rule derives it from the target
  (``nested.data.DomainSpec``).
- ``json``: ``caption`` (str, required); ``bbox`` (optional, ``[x0, y0, x1, y1]`` in target
  pixels: the subject's box, used to crop the reference when there is no ref image);
  ``original_size`` (``[h, w]`` of the source image before any resize at build time, for SDXL
  micro-conditioning); ``domain``; ``subject`` (the domain's subject token); ``source`` (the
  image path relative to the input); ``latents_resolution`` (only with cached latents).
- ``latents.npy`` | ``latents.pth`` (optional, ``--cache-latents``): float16 (C, r, r) VAE
  latents of the target: the latent distribution's *mean* times ``vae.config.scaling_factor``,
  encoded from the resize-short-side + center crop at ``latents_resolution`` (r = that / 8).
  The reader uses them only with ``center_crop=True``, no flip and the same resolution;
  ``.pth`` is read with ``torch.load(weights_only=True)``.

Keys contain only ``[A-Za-z0-9_-]``: webdataset splits a member name at its FIRST dot, so a
dot in a key would silently split one sample into two broken ones.

Output folder: ``<domain>-000000.tar, <domain>-000001.tar, ...``, ``rejected.jsonl`` (one
``{"path", "reason"}`` line per rejected item) and ``shards.json``::

    {"version": 1, "domain", "subject", "created", "total_samples", "rejected",
     "shards": [{"url": "faces-000000.tar", "samples": n, "bytes": size, "sha256": hex}]}

Each tar is written as ``*.tar.tmp`` and renamed when complete, and ``shards.json`` is written
last (temp file + ``os.replace``) after removing any stale one first, so an interrupted run
never leaves an index that lists missing or partial shards. With ``SOURCE_DATE_EPOCH`` set, the
tar timestamps and ``created`` come from it, and the same input gives byte-identical shards.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from tqdm import tqdm

from nested.data.transforms import target_transform
from nested.errors import ConfigError, DataError, MissingFileError, OutputExistsError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Formats whose bytes are stored untouched (the reader decodes exactly these extensions).
_STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_REF_FORMATS = {"JPEG": "jpg", "PNG": "png"}
INDEX_NAME = "shards.json"
REJECTED_NAME = "rejected.jsonl"


class Rejected(Exception):
    """An input item that must not go into the shards; ``str(exc)`` is the reason."""


@dataclass
class SourceItem:
    """One row of the input: an image, its caption and optional reference image / bbox."""

    image: Path
    caption: str | None
    ref: Path | None = None
    bbox: Any = None
    origin: str = ""  # how to find the item again in the input (path or manifest line)
    name: str = ""  # the image path relative to the input; recorded as json "source"
    problem: str | None = None  # set when the row itself is unusable (bad manifest line)


@dataclass
class ShardReport:
    """What ``build_shards`` wrote. ``shards`` entries are the dicts stored in shards.json."""

    out: Path
    index: Path
    shards: list[dict[str, Any]] = field(default_factory=list)
    total_samples: int = 0
    rejected: int = 0

    @property
    def rejected_path(self) -> Path:
        return self.out / REJECTED_NAME


# ----------------------------------------------------------------------------- reading the input


def iter_source(src: Path) -> Iterator[SourceItem]:
    """Yield the items of ``src``: a folder of images with ``.txt`` captions, or a manifest.

    A folder is scanned recursively for image files; the caption of ``a/b.jpg`` is ``a/b.txt``.
    A ``.jsonl`` / ``.csv`` manifest has columns ``image`` (path relative to the manifest),
    ``caption`` and optional ``ref`` (path) and ``bbox`` ([x0, y0, x1, y1], in csv as
    ``"x0,y0,x1,y1"`` or a JSON list).
    """
    if src.is_dir():
        for path in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            caption_path = path.with_suffix(".txt")
            caption = caption_path.read_text(encoding="utf-8") if caption_path.is_file() else None
            name = path.relative_to(src).as_posix()
            yield SourceItem(image=path, caption=caption, origin=str(path), name=name)
        return
    if not src.is_file():
        raise MissingFileError(f"shards source {src} does not exist: pass a folder of images or a manifest")
    suffix = src.suffix.lower()
    if suffix == ".jsonl":
        rows: Iterator[tuple[int, Any]] = _jsonl_rows(src)
    elif suffix == ".csv":
        rows = _csv_rows(src)
    else:
        raise ConfigError(f"unsupported shards source {src}: expected a folder, a .jsonl or a .csv manifest")
    for line, row in rows:
        origin = f"{src}:{line}"
        if not isinstance(row, dict) or not row.get("image"):
            # Kept as a rejection, not an error: one bad line must not sink a large manifest.
            problem = "manifest row is not a JSON object with an 'image'"
            yield SourceItem(image=Path(""), caption=None, origin=origin, problem=problem)
            continue
        ref = row.get("ref") or None
        yield SourceItem(
            image=src.parent / str(row["image"]),
            caption=row.get("caption"),
            ref=src.parent / str(ref) if ref else None,
            bbox=row.get("bbox") or None,
            origin=origin,
            name=str(row["image"]),
        )


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError:
                yield line_no, None


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "image" not in reader.fieldnames:
            raise DataError(
                f"{path}: a csv manifest needs a header with an 'image' column, got {reader.fieldnames}"
            )
        yield from enumerate(reader, start=2)


# ----------------------------------------------------------------------------- validation


def load_checked_image(path: Path, *, min_size: int, max_pixels: int) -> tuple[Image.Image, str | None, bool]:
    """Decode ``path`` fully and check it; raise ``Rejected`` with the reason if it is unusable.

    Returns:
        ``(rgb_image, format, transposed)``: the EXIF-upright RGB image, the PIL format name, and
        whether EXIF orientation changed the pixels (then the source bytes cannot be stored as is).
    """
    if not path.is_file():
        raise Rejected(f"file not found: {path}")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; we reject instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                # Checked on the header, before load(), so a bomb is never decoded.
                if width * height > max_pixels:
                    raise Rejected(f"too many pixels: {width}x{height} > max_pixels={max_pixels}")
                image.load()
                image_format = image.format
                transposed = image.getexif().get(0x0112, 1) != 1  # EXIF orientation tag
                upright = ImageOps.exif_transpose(image) if transposed else image
                rgb = upright.convert("RGB")
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected(f"decompression bomb: {exc}") from exc
    except Exception as exc:  # PIL raises many types for broken files; all mean "unreadable"
        raise Rejected(f"unreadable image: {type(exc).__name__}: {exc}") from exc
    if min(rgb.size) < min_size:
        raise Rejected(f"too small: {rgb.width}x{rgb.height}, the short side must be >= min_size={min_size}")
    return rgb, image_format, transposed


def check_bbox(bbox: Any, width: int, height: int) -> list[float]:
    """Parse a ``[x0, y0, x1, y1]`` box (list or ``"x0,y0,x1,y1"``), clip it to the image.

    Raises ``Rejected`` when it is malformed or empty after clipping.
    """
    if isinstance(bbox, str):
        text = bbox.strip()
        try:
            bbox = json.loads(text) if text.startswith("[") else [float(v) for v in text.split(",")]
        except ValueError as exc:
            raise Rejected(f"invalid bbox {text!r}: expected [x0, y0, x1, y1]") from exc
    if not isinstance(bbox, Sequence) or len(bbox) != 4:
        raise Rejected(f"invalid bbox {bbox!r}: expected [x0, y0, x1, y1]")
    try:
        x0, y0, x1, y1 = (float(v) for v in bbox)
    except (TypeError, ValueError) as exc:
        raise Rejected(f"invalid bbox {bbox!r}: expected 4 numbers") from exc
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise Rejected(f"invalid bbox {bbox!r}: not finite")
    x0, x1 = max(0.0, x0), min(float(width), x1)
    y0, y1 = max(0.0, y0), min(float(height), y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise Rejected(f"invalid bbox {bbox!r}: empty inside the {width}x{height} image (x1 > x0, y1 > y0?)")
    return [x0, y0, x1, y1]


def _encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _sanitize_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:80] or "sample"


def make_sample(
    item: SourceItem,
    key: str,
    *,
    domain: str,
    subject: str,
    min_size: int,
    max_pixels: int,
    image_size: int | None,
    vae: AutoencoderKL | None = None,
    resolution: int = 1024,
) -> dict[str, Any]:
    """Validate one item and build its webdataset sample (members as bytes).

    With a ``vae``, the sample also gets ``latents.npy`` (see ``encode_latents``).

    Raises:
        Rejected: with the reason when the item is unusable.
    """
    if item.problem is not None:
        raise Rejected(item.problem)
    caption = (item.caption or "").strip()
    if not caption:
        raise Rejected("missing caption" if item.caption is None else "empty caption")
    target, image_format, transposed = load_checked_image(
        item.image, min_size=min_size, max_pixels=max_pixels
    )
    original_size = [target.height, target.width]
    scale = 1.0
    if image_size is not None and min(target.size) > image_size:
        scale = image_size / min(target.size)
        size = (max(1, round(target.width * scale)), max(1, round(target.height * scale)))
        target = target.resize(size, Image.Resampling.LANCZOS)
    meta: dict[str, Any] = {
        "caption": caption,
        "original_size": original_size,
        "domain": domain,
        "subject": subject,
        "source": item.name,
    }
    if item.bbox is not None:
        box = check_bbox(item.bbox, original_size[1], original_size[0])
        meta["bbox"] = [round(v * scale, 2) for v in box]
    sample: dict[str, Any] = {"__key__": key}
    if scale == 1.0 and not transposed and image_format in _STORED_FORMATS:
        sample[_STORED_FORMATS[image_format]] = item.image.read_bytes()
    else:
        sample["jpg"] = _encode_jpeg(target)
    if item.ref is not None:
        try:
            ref, ref_format, ref_transposed = load_checked_image(
                item.ref, min_size=min_size, max_pixels=max_pixels
            )
        except Rejected as exc:
            raise Rejected(f"reference image: {exc}") from exc
        if not ref_transposed and ref_format in _REF_FORMATS:
            sample[f"ref.{_REF_FORMATS[ref_format]}"] = item.ref.read_bytes()
        else:
            sample["ref.jpg"] = _encode_jpeg(ref)
    if vae is not None:
        buffer = io.BytesIO()
        np.save(buffer, encode_latents(vae, target, resolution))
        sample["latents.npy"] = buffer.getvalue()
        meta["latents_resolution"] = resolution
    sample["json"] = json.dumps(meta).encode("utf-8")
    return sample


# ----------------------------------------------------------------------------- latents


def encode_latents(vae: AutoencoderKL, image: Image.Image, resolution: int) -> np.ndarray:
    """VAE latents of the center-cropped target, as the training module would compute them.

    Returns:
        float16 numpy array (C, resolution / 8, resolution / 8): ``latent_dist.mean *
        scaling_factor`` (the mean, not a sample, so the cache is deterministic).
    """
    pixels = target_transform(image, resolution=resolution, center_crop=True, random_flip=False).pixel_values
    param = next(vae.parameters())
    with torch.no_grad():
        latents = vae.encode(pixels[None].to(param.device, param.dtype)).latent_dist.mean
    latents = latents[0].float() * vae.config.scaling_factor
    return latents.cpu().numpy().astype("float16")


# ----------------------------------------------------------------------------- writing


def build_time() -> int:
    """Seconds since the epoch; ``SOURCE_DATE_EPOCH`` (reproducible builds) makes shards byte-identical."""
    return int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))


class ShardSink:
    """Writes samples into ``<domain>-%06d.tar`` files, each finished by an atomic rename."""

    def __init__(self, out: Path, domain: str, maxcount: int, maxsize: int) -> None:
        self.out, self.domain, self.maxcount, self.maxsize = out, domain, maxcount, maxsize
        # An integer mtime: TarWriter ignores its `format` argument and writes PAX tars, where the
        # default float time.time() adds a 1 KiB pax header to EVERY member.
        self.mtime = build_time()
        self.shards: list[dict[str, Any]] = []
        self._writer: wds.TarWriter | None = None
        self._count = 0
        self._size = 0

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is None or self._count >= self.maxcount or self._size >= self.maxsize:
            self._finish()
            name = f"{self.domain}-{len(self.shards):06d}.tar"
            self._writer = wds.TarWriter(str(self.out / (name + ".tmp")), encoder=False, mtime=self.mtime)
            self._name, self._count, self._size = name, 0, 0
        self._size += self._writer.write(sample)
        self._count += 1

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        final = self.out / self._name
        os.replace(self.out / (self._name + ".tmp"), final)
        digest = hashlib.sha256()
        with final.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        self.shards.append(
            {
                "url": self._name,
                "samples": self._count,
                "bytes": final.stat().st_size,
                "sha256": digest.hexdigest(),
            }
        )

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.shards

    def abort(self) -> None:
        """Close and delete the shard in progress (finished shards stay; no index lists them)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            (self.out / (self._name + ".tmp")).unlink(missing_ok=True)


def prepare_out(out: Path, domain: str, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    index = out / INDEX_NAME
    pattern = re.compile(rf"{re.escape(domain)}-\d{{6}}\.tar(\.tmp)?")  # ours only, not "faces-val-..."
    old = sorted(p for p in out.iterdir() if pattern.fullmatch(p.name))
    if (index.exists() or old) and not overwrite:
        raise OutputExistsError(
            f"{out} already holds shards ({INDEX_NAME} or {domain}-*.tar); "
            "choose an empty folder or pass overwrite=True (--overwrite) to replace them"
        )
    # The index goes first: from here on, no shards.json exists until the new one is complete.
    index.unlink(missing_ok=True)
    for path in old:
        path.unlink()
    (out / REJECTED_NAME).unlink(missing_ok=True)


def build_shards(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    domain: str,
    subject: str,
    maxcount: int = 1000,
    maxsize: int = 512 * 1024**2,
    min_size: int = 64,
    max_pixels: int = 50_000_000,
    image_size: int | None = None,
    cache_latents: bool = False,
    vae: AutoencoderKL | None = None,
    resolution: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardReport:
    """Validate every image in ``src`` and write the good ones as webdataset shards into ``out``.

    Args:
        src: a folder of images with sidecar ``.txt`` captions, or a ``.jsonl`` / ``.csv``
            manifest (see ``iter_source``).
        out: output folder, one per domain (created). Refuses to touch existing shards unless
            ``overwrite``.
        domain: domain name; shard file prefix and each sample's json ``domain``.
        subject: the domain's subject token (``"<person>"``, ``"dog"``), recorded in the index.
        maxcount, maxsize: start a new shard after this many samples / bytes.
        min_size: reject images whose short side is smaller (pixels).
        max_pixels: reject images with more pixels (decompression-bomb guard).
        image_size: when set, downscale so the short side is at most this before storing.
        cache_latents: also store ``latents.npy`` computed with ``vae`` at ``resolution``.
        progress: show a tqdm progress bar.

    Returns:
        A ``ShardReport``; rejected items are listed in ``out/rejected.jsonl``.
    """
    src, out = Path(src), Path(out)
    if maxcount < 1 or maxsize < 1:
        raise ConfigError(f"maxcount and maxsize must be >= 1, got {maxcount} and {maxsize}")
    if image_size is not None and image_size < min_size:
        raise ConfigError(
            f"image_size={image_size} is below min_size={min_size}: every image would shrink below it"
        )
    if cache_latents and vae is None:
        raise ConfigError(
            "cache_latents=True needs a loaded diffusers AutoencoderKL as vae= (CLI: --model PATH)"
        )
    if cache_latents and resolution % 8:
        raise ConfigError(f"resolution={resolution} must be a multiple of 8 for latents")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", domain):
        raise ConfigError(f"domain {domain!r} must match [A-Za-z0-9_-]+ (it names the shard files)")
    items = list(iter_source(src))  # a list, so the progress bar knows the total
    prepare_out(out, domain, overwrite)
    sink = ShardSink(out, domain, maxcount, maxsize)
    options = dict(
        domain=domain,
        subject=subject,
        min_size=min_size,
        max_pixels=max_pixels,
        image_size=image_size,
        resolution=resolution,
    )
    rejected = 0
    try:
        with (out / REJECTED_NAME).open("w", encoding="utf-8") as rejected_file:
            for index, item in enumerate(
                tqdm(items, desc=f"shards {domain}", disable=not progress, unit="img")
            ):
                key = f"{index:07d}_{_sanitize_key(os.path.splitext(item.name)[0])}"
                try:
                    sink.write(make_sample(item, key, vae=vae if cache_latents else None, **options))
                except Rejected as exc:
                    rejected += 1
                    rejected_file.write(json.dumps({"path": item.origin, "reason": str(exc)}) + "\n")
    except BaseException:
        sink.abort()  # no half-written shard is left behind under its final name
        raise
    shards = sink.close()
    report = ShardReport(
        out=out,
        index=out / INDEX_NAME,
        shards=shards,
        total_samples=sum(s["samples"] for s in shards),
        rejected=rejected,
    )
    index_data = {
        "version": 1,
        "domain": domain,
        "subject": subject,
        "created": datetime.fromtimestamp(build_time(), timezone.utc).isoformat(timespec="seconds"),
        "shards": shards,
        "total_samples": report.total_samples,
        "rejected": rejected,
    }
    tmp = report.index.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index_data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, report.index)
    return report

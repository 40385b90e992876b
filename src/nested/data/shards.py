"""Writing training shards: validated images + captions -> webdataset tar files and an index.

Sample format (one webdataset sample per training image; all members share the ``__key__``):

- ``jpg`` | ``png`` | ``webp``: the target image (exactly one), 8-bit RGB. The source file's
  bytes when the reader's plain RGB conversion of them gives exactly the pixels validated here
  (see ``nested.image_files.to_rgb``), else those pixels re-encoded as JPEG (quality 95).
- ``ref.jpg`` | ``ref.png`` (optional): the subject encoder's input, e.g. an aligned face crop.
  Without it, the domain's ``reference`` rule derives it from the target
  (``nested.data.DomainSpec``).
- ``json``: ``caption`` (str, required); ``bbox`` (optional, ``[x0, y0, x1, y1]`` in target
  pixels: the subject's box, used to crop the reference when there is no ref image);
  ``original_size`` (``[h, w]`` of the source image before any resize at build time, for SDXL
  micro-conditioning); ``domain``; ``subject`` (the domain's subject token); ``source`` (the
  image path relative to the input); ``latents_resolution`` (only with cached latents).
- ``latents.npy`` | ``latents.pth`` (optional, ``--cache-latents``): float16 (C, r, r) VAE
  latents of the target: the latent distribution's *mean*, minus ``vae.config.shift_factor`` (SD3 /
  FLUX VAEs), times ``vae.config.scaling_factor``, encoded from the resize-short-side + center crop at
  ``latents_resolution`` (r = that / the VAE's factor, 8 for the real models).
  The reader uses them only with ``center_crop=True``, no flip and the same resolution;
  ``.pth`` is read with ``torch.load(weights_only=True)``.

Keys contain only ``[A-Za-z0-9_-]``: webdataset splits a member name at its FIRST dot, so a
dot in a key would silently split one sample into two broken ones.

Output folder: ``<domain>-000000.tar, <domain>-000001.tar, ...``, ``rejected.jsonl`` (one
``{"path", "reason"}`` line per rejected item) and ``shards.json``::

    {"version": 1, "domain", "subject", "created", "total_samples", "rejected",
     "shards": [{"url": "faces-000000.tar", "samples": n, "bytes": size, "sha256": hex}]}

A build writes everything into a hidden staging folder inside the output folder
(``.<domain>.staging-*``). Only when it is complete and holds at least one sample are its files
swapped in for the previous build's (``nested.files.swap_files``: the old index, shards and
``rejected.jsonl`` are renamed aside, the new shards, ``rejected.jsonl`` and, last, the index
renamed in, then the old ones deleted); other files in the folder are left alone. An interrupted
or failed build leaves the previous dataset as it was. With ``SOURCE_DATE_EPOCH`` set, the tar
timestamps and ``created`` come from it, and the same input gives byte-identical shards.

Captions (``.txt`` files and manifests) are UTF-8, with or without a byte-order mark; a caption
file or manifest line that is not is a rejected item, named with the offending byte.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from nested.data.transforms import caption_text, target_transform, upright_original_size
from nested.data.worker_pool import OrderedWorkerPool, WorkerDied
from nested.errors import ConfigError, DataError, MissingFileError, OutputExistsError
from nested.files import (
    file_sha256,
    staging_folder,
    stop_signals_deferred,
    storage_refusals_named,
    swap_files,
)
from nested.image_files import IMAGE_SUFFIXES, ImageFileError, open_image

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

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
    identity: str | None = None  # who the subject is: targets get references of other photos of them
    original_size: list[int] | None = None  # [h, w] before a resize made elsewhere (img2dataset's)
    member: tuple[int, int] | None = None  # (offset, size) of the image's bytes inside the tar ``image``


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
    ``"x0,y0,x1,y1"`` or a JSON list) and ``identity``. A folder of ``.tar`` files (img2dataset's
    output) is read by ``iter_tar_source``.
    """
    if src.is_dir() and any(src.glob("*.tar")):
        image = next((p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES), None)
        if image is not None:
            raise ConfigError(
                f"{src} holds both .tar files and images (e.g. {image}): give a folder of images, or the folder "
                "of .tar files that img2dataset wrote, not both"
            )
        yield from iter_tar_source(src)
        return
    if src.is_dir():
        other_images = {ext for ext, name in Image.registered_extensions().items() if name in Image.OPEN}
        for path in sorted(_files_under(src)):
            suffix, name = path.suffix.lower(), path.relative_to(src).as_posix()
            if suffix in IMAGE_SUFFIXES:
                caption, problem = _read_caption(path.with_suffix(".txt"))
                yield SourceItem(image=path, caption=caption, origin=str(path), name=name, problem=problem)
            elif suffix in other_images and suffix != ".txt":
                problem = f"a {suffix} image, not one of {', '.join(IMAGE_SUFFIXES)}: convert it, e.g. to PNG"
                yield SourceItem(image=path, caption=None, origin=str(path), name=name, problem=problem)
        return
    if not src.is_file():
        raise MissingFileError(f"shards source {src} does not exist: pass a folder of images or a manifest")
    suffix = src.suffix.lower()
    if suffix == ".jsonl":
        rows: Iterator[tuple[int, Any, str | None]] = _jsonl_rows(src)
    elif suffix == ".csv":
        rows = _csv_rows(src)
    else:
        raise ConfigError(f"unsupported shards source {src}: expected a folder, a .jsonl or a .csv manifest")
    for line, row, problem in rows:
        origin = f"{src}:{line}"
        if problem is None and not isinstance(row, dict):
            problem = 'manifest row is not a JSON object: expected {"image": PATH, "caption": TEXT}'
        elif problem is None and not row.get("image"):
            fields = ", ".join(sorted(map(str, row))) or "none"
            problem = (
                f'manifest row has no image: expected an "image" path and a "caption" (its fields: {fields})'
            )
        elif problem is None and not isinstance(row.get("caption", ""), (str, type(None))):
            problem = f"manifest caption is not text: {row['caption']!r}"
        if problem is not None:
            # Kept as a rejection, not an error: one bad line must not sink a large manifest.
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
            identity=_identity(row.get("identity")),
        )


def _files_under(folder: Path) -> Iterator[Path]:
    """Every file below ``folder``, through linked folders too (``rglob`` does not follow them), each real
    folder once (a link back up is not followed again), under its real name where ``folder`` holds it."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        # Real folders first, then by name: a folder also linked from elsewhere is read under its own name,
        # whatever order the file system lists them in.
        dirs.sort(key=lambda name: (os.path.islink(os.path.join(root, name)), name))
        yield from (Path(root) / name for name in files)


def _not_utf8(byte: int, offset: int) -> str:
    return f"not UTF-8: byte 0x{byte:02x} at offset {offset}; save it as UTF-8"


def _decode_caption(data: bytes, where: str) -> tuple[str | None, str | None]:
    """``(caption, problem)`` of a caption file's bytes: UTF-8 (a BOM dropped, line ends made ``\\n``, as
    ``read_text`` would), else the problem, naming ``where``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, f"caption {_not_utf8(exc.object[exc.start], exc.start)} ({where})"
    return caption_text(text), None


def _read_caption(path: Path) -> tuple[str | None, str | None]:
    """``(caption, problem)`` of a sidecar caption file: (None, None) when there is none."""
    if not path.is_file():
        return None, None
    try:
        return _decode_caption(path.read_bytes(), str(path))
    except OSError as exc:
        return None, f"caption unreadable: {exc}"


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, row, problem)``: row None, with the problem, for a line that is not JSON."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, None, f"manifest line {_not_utf8(exc.object[exc.start], exc.start)}"
                continue
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield line_no, None, f"manifest line is not JSON: {exc.msg} (column {exc.colno})"


def _csv_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, row, problem)``; bytes that are not UTF-8 come in as lone surrogates."""
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "image" not in reader.fieldnames:
            raise DataError(
                f"{path}: a csv manifest needs a header with an 'image' column, got {reader.fieldnames}"
            )
        for row in reader:
            text = "".join(v for v in row.values() if isinstance(v, str))
            bad = next((c for c in text if "\udc80" <= c <= "\udcff"), None)
            if bad is None:
                yield reader.line_num, row, None
            else:
                byte = ord(bad) - 0xDC00
                yield reader.line_num, None, f"manifest line not UTF-8: byte 0x{byte:02x}; save it as UTF-8"


def _identity(value: Any) -> str | None:
    """A manifest's ``identity`` cell: any non-empty value, as text (``7`` and ``"7"`` are one person)."""
    return None if value is None or str(value).strip() == "" else str(value).strip()


def with_folder_identities(items: list[SourceItem]) -> list[SourceItem]:
    """Each item's identity from the first folder of its path under the source (``alice/1.jpg``: alice).

    An image directly in the source folder belongs to no identity folder and is rejected with that reason.
    """
    result = []
    for item in items:
        folder, sep, _ = item.name.partition("/")
        if item.problem is None and not sep:
            problem = "not inside an identity folder (with identity folders, SOURCE/<identity>/<image>)"
            result.append(replace(item, problem=problem))
        else:
            result.append(replace(item, identity=folder if sep else item.identity))
    return result


def iter_tar_source(src: Path) -> Iterator[SourceItem]:
    """The samples of the ``*.tar`` files in ``src``, e.g. the output folder of img2dataset.

    Each sample (tar members sharing a key, webdataset's convention) gives its image (``jpg``, ``jpeg``,
    ``png`` or ``webp``), its caption (``json``'s ``caption``, else the ``txt`` member), and, from the json
    that img2dataset writes, ``original_height`` / ``original_width``: the size before img2dataset resized
    it, kept as the sample's ``original_size``. A sample whose json ``status`` is not ``success`` is rejected.
    """
    for tar_path in sorted(src.glob("*.tar")):
        samples, damage = _tar_samples(tar_path)
        if damage is not None:
            kept = (
                f"the {len(samples)} whole samples before the damage are kept" if samples else "nothing kept"
            )
            problem = f"unreadable tar ({damage}): {kept}; download it again"
            yield SourceItem(image=tar_path, caption=None, origin=str(tar_path), problem=problem)
        for key, members in samples.items():
            origin, name = f"{tar_path}:{key}", f"{tar_path.stem}/{key}"
            image_ext = next((ext for ext in ("jpg", "jpeg", "png", "webp") if ext in members), None)
            meta: Any = {}
            if "json" in members:
                try:
                    meta = json.loads(_read_member(tar_path, members["json"]))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    meta = None
            problem = None
            if not isinstance(meta, dict):
                problem = "json member is not a JSON object"
            elif meta.get("status", "success") != "success":  # a failed download has no image: say why
                problem = f"img2dataset status {meta.get('status')!r}: {meta.get('error_message')}"
            elif image_ext is None:
                problem = f"no image member (jpg, jpeg, png or webp) among {sorted(members)}"
            if problem is not None:
                yield SourceItem(image=tar_path, caption=None, origin=origin, name=name, problem=problem)
                continue
            caption = meta.get("caption")
            if not isinstance(caption, str) and "txt" in members:
                caption, problem = _decode_caption(_read_member(tar_path, members["txt"]), f"{origin}.txt")
                if problem is not None:
                    yield SourceItem(image=tar_path, caption=None, origin=origin, name=name, problem=problem)
                    continue
            # A shard's own original_size (nested shards writes it, upright) comes first, then img2dataset's.
            original = meta.get("original_size")
            if not _is_size(original):
                original = [meta.get("original_height"), meta.get("original_width")]
            yield SourceItem(
                image=tar_path,
                caption=caption if isinstance(caption, str) else None,
                origin=origin,
                name=f"{name}.{image_ext}",
                original_size=original if _is_size(original) else None,
                member=members[image_ext],
            )


def _tar_samples(path: Path) -> tuple[dict[str, dict[str, tuple[int, int]]], str | None]:
    """key -> member extension -> (offset, size) of its bytes, for every file in the tar, in order; and the
    error that stopped the reading, or None.

    A tar cut short (an interrupted download) keeps the samples before the cut, without the one being read
    there, whose other members may be lost (a member whose bytes run past the end of the file, or the end of
    the file where a header or the end-of-archive blocks should be, is the cut).
    """
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    key = None  # of the member read last
    try:
        size = path.stat().st_size
        with tarfile.open(path) as tar:
            for info in tar:
                folder, _, base = info.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                if not info.isfile() or not dot:
                    continue
                if info.offset_data + info.size > size:
                    raise tarfile.ReadError(f"{info.name} runs past the end of the file")
                samples.setdefault(key, {})[ext.lower()] = (info.offset_data, info.size)
            # tarfile stops without a word at a header cut short: a whole tar ends in two zero blocks.
            with path.open("rb") as file:
                file.seek(tar.offset)
                end = file.read(2 * tarfile.BLOCKSIZE)
            if len(end) < 2 * tarfile.BLOCKSIZE or end.strip(b"\0"):
                raise tarfile.ReadError(
                    f"no end-of-archive blocks after byte {tar.offset}: the file was cut short"
                )
    except (tarfile.TarError, OSError) as exc:
        samples.pop(key, None)
        return samples, f"{type(exc).__name__}: {exc}"
    return samples, None


def _read_member(path: Path, member: tuple[int, int]) -> bytes:
    offset, size = member
    with path.open("rb") as file:
        file.seek(offset)
        return file.read(size)


@contextlib.contextmanager
def _on_disk(item: SourceItem) -> Iterator[SourceItem]:
    """``item`` with its image as a file: an image inside a tar is copied to a temporary file meanwhile."""
    if item.member is None or item.problem is not None:
        yield item
        return
    handle, name = tempfile.mkstemp(suffix=Path(item.name).suffix)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(_read_member(item.image, item.member))
        yield replace(item, image=Path(name), member=None)
    finally:
        os.unlink(name)


# ----------------------------------------------------------------------------- validation


def load_checked_image(path: Path, *, min_size: int, max_pixels: int) -> tuple[Image.Image, str | None, bool]:
    """Decode ``path`` fully and check it (:func:`nested.image_files.open_image`); raise ``Rejected``
    with the reason if it is unusable or its short side is under ``min_size``.

    Returns:
        ``(rgb_image, format, reencode)``: the EXIF-upright 8-bit RGB image, the PIL format name, and
        whether the source bytes must not be stored as is (``OpenedImage.bytes_differ``).
    """
    try:
        opened = open_image(path, max_pixels=max_pixels)
    except MissingFileError:
        reason = "a folder, not an image file" if path.is_dir() else "file not found"
        raise Rejected(f"{reason}: {path}") from None
    except ImageFileError as error:
        raise Rejected(error.reason) from error
    rgb = opened.rgb
    if min(rgb.size) < min_size:
        raise Rejected(f"too small: {rgb.width}x{rgb.height}, the short side must be >= min_size={min_size}")
    return rgb, opened.format, opened.bytes_differ


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
    face_size: int | None = None,
) -> dict[str, Any]:
    """Validate one item and build its webdataset sample (members as bytes).

    With a ``vae``, the sample also gets ``latents.npy`` (see ``encode_latents``). With a ``face_size``,
    the subject's face is detected and ``ref.jpg`` is its aligned crop (see ``face_members``).

    Raises:
        Rejected: with the reason when the item is unusable.
    """
    if item.problem is not None:
        raise Rejected(item.problem)
    caption = (item.caption or "").strip()
    if not caption:
        raise Rejected("missing caption" if item.caption is None else "empty caption")
    target, image_format, reencode = load_checked_image(item.image, min_size=min_size, max_pixels=max_pixels)
    original_size = [target.height, target.width]
    face = (
        face_members(item, target, face_size, min_size=min_size, max_pixels=max_pixels) if face_size else None
    )
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
    if item.original_size is not None:
        meta["original_size"] = list(upright_original_size(tuple(item.original_size), tuple(original_size)))
    if item.bbox is not None:
        box = check_bbox(item.bbox, original_size[1], original_size[0])
        meta["bbox"] = [round(v * scale, 2) for v in box]
    if face is not None:
        meta["bbox"] = [round(v * scale, 2) for v in face.box]
    sample: dict[str, Any] = {"__key__": key}
    if scale == 1.0 and not reencode and image_format in _STORED_FORMATS:
        sample[_STORED_FORMATS[image_format]] = item.image.read_bytes()
    else:
        sample["jpg"] = _encode_jpeg(target)
    if item.ref is not None and face is None:
        try:
            ref, ref_format, ref_reencode = load_checked_image(
                item.ref, min_size=min_size, max_pixels=max_pixels
            )
        except Rejected as exc:
            raise Rejected(f"reference image: {exc}") from exc
        if not ref_reencode and ref_format in _REF_FORMATS:
            sample[f"ref.{_REF_FORMATS[ref_format]}"] = item.ref.read_bytes()
        else:
            sample["ref.jpg"] = _encode_jpeg(ref)
    if face is not None:
        sample["ref.jpg"] = face.crop
    if vae is not None:
        from nested.backbone import latent_space  # torch and diffusers: only when caching

        buffer = io.BytesIO()
        np.save(buffer, encode_latents(vae, target, resolution))
        sample["latents.npy"] = buffer.getvalue()
        meta["latents_resolution"] = resolution
        meta["latents_space"] = latent_space(vae)
    sample["json"] = json.dumps(meta).encode("utf-8")
    return sample


@dataclass
class SubjectFace:
    """The subject's face in a target: its box in the target's pixels and the aligned crop (JPEG bytes)."""

    box: tuple[float, float, float, float]
    crop: bytes


def face_members(
    item: SourceItem, target: Image.Image, size: int, *, min_size: int, max_pixels: int
) -> SubjectFace:
    """Detect the subject's face in ``target`` and align the reference: ``nested.data.faces``.

    The subject follows :func:`nested.data.faces.choose_subject` (a manifest ``bbox`` picks the face it
    overlaps most). The reference is the ``size`` px FFHQ-style crop of that face, or, when the item
    has its own ``ref`` photo, of the subject's face in that photo.

    Raises:
        Rejected: no usable face (the reason says why), or an unusable reference photo.
    """
    from nested.data import faces  # dlib is imported only when faces are prepared

    hint = None if item.bbox is None else tuple(check_bbox(item.bbox, target.width, target.height))
    try:
        face = faces.choose_subject(faces.detect_faces(target), hint)
    except faces.FaceRejected as exc:
        raise Rejected(str(exc)) from exc
    photo, subject = target, face
    if item.ref is not None:
        try:
            photo = load_checked_image(item.ref, min_size=min_size, max_pixels=max_pixels)[0]
            subject = faces.choose_subject(faces.detect_faces(photo))
        except (Rejected, faces.FaceRejected) as exc:
            raise Rejected(f"reference image: {exc}") from exc
    return SubjectFace(box=face.box, crop=_encode_jpeg(faces.align_face(photo, subject, size)))


# ----------------------------------------------------------------------------- latents


def encode_latents(vae: AutoencoderKL, image: Image.Image, resolution: int) -> np.ndarray:
    """VAE latents of the center-cropped target, as the training module would compute them.

    Returns:
        float16 numpy array (C, resolution / f, resolution / f), f the VAE's factor (8 for the real models):
        ``latent_dist.mean`` through the VAE's shift and scale (:func:`~nested.backbone.scale_latents`; the
        mean, not a sample, so the cache is deterministic).
    """
    # Here, not at the top: building shards without cached latents needs no diffusers.
    from nested.backbone import scale_latents

    pixels = target_transform(image, resolution=resolution, center_crop=True, random_flip=False).pixel_values
    param = next(vae.parameters())
    with torch.no_grad():
        latents = vae.encode(pixels[None].to(param.device, param.dtype)).latent_dist.mean
    return scale_latents(vae, latents[0].float()).cpu().numpy().astype("float16")


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
        self.shards.append(
            {
                "url": self._name,
                "samples": self._count,
                "bytes": final.stat().st_size,
                "sha256": file_sha256(final),
            }
        )

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.shards

    def abort(self) -> None:
        """Close and delete the shard in progress (finished shards stay; no index lists them)."""
        if self._writer is not None:
            with contextlib.suppress(OSError):  # a full disk again: the file goes all the same
                self._writer.close()
            self._writer = None
            (self.out / (self._name + ".tmp")).unlink(missing_ok=True)


def prepare_out(out: Path, domain: str, overwrite: bool) -> list[Path]:
    """The files of a previous build in ``out`` that a new build replaces, its index first: the
    index, the shards it lists, ``<domain>-NNNNNN.tar[.tmp]`` and ``rejected.jsonl``. Nothing is
    deleted here (``build_shards`` swaps the new files in when they are complete).

    Raises:
        OutputExistsError: when there are shards or an index and not ``overwrite``.
    """
    index = out / INDEX_NAME
    pattern = re.compile(rf"{re.escape(domain)}-\d{{6}}\.tar(\.tmp)?")  # ours only, not "faces-val-..."
    old = sorted(p for p in out.iterdir() if pattern.fullmatch(p.name)) if out.is_dir() else []
    if (index.exists() or old) and not overwrite:
        raise OutputExistsError(
            f"{out} already holds shards ({INDEX_NAME} or {domain}-*.tar); "
            "choose an empty folder, or pass --overwrite (in Python: overwrite=True) to replace them"
        )
    listed = [p for p in _indexed_shards(index) if p not in old]
    return [index, *listed, *old, out / REJECTED_NAME]


def _indexed_shards(index: Path) -> list[Path]:
    """The shard files beside ``index`` that it lists (none when it is missing or malformed)."""
    try:
        names = [shard["url"] for shard in json.loads(index.read_text(encoding="utf-8"))["shards"]]
    except (OSError, ValueError, LookupError, TypeError):
        return []
    return [
        index.parent / n for n in names if isinstance(n, str) and n == Path(n).name and n.endswith(".tar")
    ]


def _rejection_summary(reasons: list[str]) -> str:
    """``"3 missing caption, 1 too small"``: the rejections counted by the start of their reason."""
    kinds = Counter(re.split(r"[:(\[']", reason, maxsplit=1)[0].strip() for reason in reasons)
    return ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())


# ----------------------------------------------------------------------------- identities, workers


def _is_size(value: Any) -> bool:
    """Whether ``value`` is an ``[h, w]`` of positive integers."""
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)


def same_identity_references(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each sample of one identity the reference of ANOTHER photo of it: the next one in source order
    (the last takes the first's). A photo's reference is its ``ref`` member when it has one (with faces:
    its aligned face crop), else its target image. Each json gets ``identity`` and ``reference`` (the
    source of the photo the reference comes from). An identity with one photo keeps its own reference; files
    of one name in two formats (``a.jpg``, ``a.png``) count as one photo.
    """
    members = [_reference_member(sample) for sample in samples]
    metas = [json.loads(sample["json"]) for sample in samples]
    photos = [str(Path(meta["source"]).with_suffix("")) for meta in metas]
    count = len(samples)
    result = []
    for index, (sample, meta) in enumerate(zip(samples, metas, strict=True)):
        others = ((index + step) % count for step in range(1, count))
        other = next((j for j in others if photos[j] != photos[index]), index)
        name, data = members[other]
        updated = {key: value for key, value in sample.items() if not key.startswith("ref.")}
        updated[name] = data
        updated["json"] = json.dumps({**meta, "reference": metas[other]["source"]}).encode("utf-8")
        result.append(updated)
    return result


def _reference_member(sample: dict[str, Any]) -> tuple[str, bytes]:
    """The member a photo lends as a reference: its ``ref.*``, else its target as ``ref.jpg``/``ref.png``."""
    for name in ("ref.jpg", "ref.png"):
        if name in sample:
            return name, sample[name]
    if "jpg" in sample or "png" in sample:
        extension = "jpg" if "jpg" in sample else "png"
        return f"ref.{extension}", sample[extension]
    with Image.open(io.BytesIO(sample["webp"])) as image:
        return "ref.jpg", _encode_jpeg(image.convert("RGB"))


class _IdentityGroups:
    """Writes samples to the sink; those of an identity wait for the rest of it (they come in a row) and are
    written with references exchanged (``same_identity_references``)."""

    def __init__(self, sink: ShardSink) -> None:
        self.sink = sink
        self.identity: str | None = None
        self.waiting: list[dict[str, Any]] = []

    def write(self, identity: str | None, sample: dict[str, Any]) -> None:
        if identity != self.identity:
            self.flush()
        if identity is None:
            self.sink.write(sample)
            return
        meta = json.loads(sample["json"])
        sample["json"] = json.dumps({**meta, "identity": identity}).encode("utf-8")
        self.identity = identity
        self.waiting.append(sample)

    def flush(self) -> None:
        for sample in same_identity_references(self.waiting):
            self.sink.write(sample)
        self.identity, self.waiting = None, []


_worker_options: dict[str, Any] = {}


def _sample_or_reason(
    job: tuple[str, SourceItem], options: dict[str, Any] | None = None
) -> dict[str, Any] | str:
    """One item's sample, or the reason it is rejected (in a worker: with the options it started with)."""
    key, item = job
    try:
        with _on_disk(item) as local:
            return make_sample(local, key, **(_worker_options if options is None else options))
    except Rejected as exc:
        return str(exc)


def _start_worker(options: dict[str, Any]) -> None:
    # Ctrl-C reaches the whole process group: the main process stops the workers, which just end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None:
            signal.signal(signum, signal.SIG_DFL)
    _worker_options.update(options)


@contextlib.contextmanager
def _prepared(
    jobs: list[tuple[str, SourceItem]], options: dict[str, Any], workers: int
) -> Iterator[Iterator[tuple[SourceItem, dict[str, Any] | str]]]:
    """(item, sample or rejection reason) for every job, in order: here, or in ``workers`` processes."""
    if workers == 0:
        yield ((item, _sample_or_reason((key, item), options)) for key, item in jobs)
        return
    items = [item for _, item in jobs]
    # Not fork: forking a process that runs threads (torch's, a progress bar's, a caller's) can leave a
    # lock held forever in the child. A fork server imports this module once, then forks clean workers.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    else:
        context = multiprocessing.get_context("spawn")
    # Stop signals are recorded, not raised wherever they land: the loop stops between two results,
    # the workers end, and the signal then acts.
    with (
        stop_signals_deferred() as stops,
        OrderedWorkerPool(context, workers, _sample_or_reason, _start_worker, (options,)) as pool,
    ):
        try:
            yield zip(items, pool.map(jobs, stops), strict=True)
        except WorkerDied as died:
            what = f"a worker process ended ({died.cause}) while preparing {items[died.job_index].origin}"
            if died.exitcode != -signal.SIGKILL:
                # A crash in a library, or a bug: the worker printed its own stack (faulthandler) above.
                raise RuntimeError(what) from died
            raise DataError(
                f"{what}. If the kernel ended it for lack of memory (a very large image), lower --workers "
                "or --max-pixels, then run the command again."
            ) from None


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
    face_size: int | None = None,
    identity_folders: bool = False,
    workers: int = 0,
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
        face_size: prepare faces (needs ``nested[faces]``): detect the subject's face, write its box as
            ``bbox`` and its FFHQ-style aligned crop of this size as ``ref.jpg`` (see ``face_members``);
            an image without a usable face is rejected with the reason.
        identity_folders: the first folder of each image's path under ``src`` names its identity (a
            manifest's ``identity`` column does the same). Each target's reference is then another photo
            of its identity (see ``same_identity_references``).
        workers: prepare images in this many worker processes (0: in this process). Not with
            ``cache_latents``, whose VAE runs in this process.

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
    if not subject or subject != subject.strip():
        # Training refuses such a subject too (DomainSpec): refused here before any image is prepared.
        raise ConfigError(
            f"subject {subject!r} must be a non-empty token without surrounding spaces, e.g. '<person>'"
        )
    if workers < 0 or (workers and cache_latents):
        raise ConfigError(
            f"workers={workers}: use 0 or more, and 0 with cache_latents (the VAE encodes in this process)"
        )
    if face_size is not None:
        if face_size < 16:
            raise ConfigError(
                f"face_size={face_size} is too small for a face crop: use 16 or more (e.g. 512)"
            )
        from nested.data.faces import load_models  # dlib: only when faces are prepared

        load_models()  # before anything is written (a missing extra is one line naming it), shared by workers
    if identity_folders and not (src.is_dir() and not any(src.glob("*.tar"))):
        what = "a manifest" if src.is_file() else "a folder of .tar files" if src.is_dir() else "not a folder"
        raise ConfigError(
            f"identity folders (--identity-folders) read who each photo shows from SOURCE/<identity>/<image>, "
            f"but {src} is {what}: give a folder of identity folders, or a manifest with an 'identity' column "
            "(without --identity-folders)"
        )
    items = list(iter_source(src))  # a list, so the progress bar knows the total
    if identity_folders:
        items = with_folder_identities(items)
    if any(item.identity is not None for item in items):
        items.sort(key=lambda item: item.identity or "")  # one identity's photos in a row, in source order
    if not items:
        raise DataError(
            f"{src} holds no images to write: a folder needs image files ({', '.join(IMAGE_SUFFIXES)}) "
            "with .txt captions, a manifest needs rows"
        )
    old = prepare_out(out, domain, overwrite)
    created_out = not out.exists()
    staging = staging_folder(out, domain)
    sink = ShardSink(staging, domain, maxcount, maxsize)
    options = dict(
        domain=domain,
        subject=subject,
        min_size=min_size,
        max_pixels=max_pixels,
        image_size=image_size,
        resolution=resolution,
        face_size=face_size,
        vae=vae if cache_latents else None,
    )
    reasons: list[str] = []
    jobs = [
        (f"{index:07d}_{_sanitize_key(os.path.splitext(item.name)[0])}", item)
        for index, item in enumerate(items)
    ]
    identities = _IdentityGroups(sink)
    try:
        with storage_refusals_named(out):  # a full disk: one line; the earlier dataset stays
            with (
                (staging / REJECTED_NAME).open("w", encoding="utf-8") as rejected_file,
                _prepared(jobs, options, workers) as results,
            ):
                bar = tqdm(
                    results, total=len(jobs), desc=f"shards {domain}", disable=not progress, unit="img"
                )
                for item, outcome in bar:
                    if isinstance(outcome, str):
                        reasons.append(outcome)
                        rejected_file.write(json.dumps({"path": item.origin, "reason": outcome}) + "\n")
                    else:
                        identities.write(item.identity, outcome)
                identities.flush()
            shards = sink.close()
            report = ShardReport(
                out=out,
                index=out / INDEX_NAME,
                shards=shards,
                total_samples=sum(s["samples"] for s in shards),
                rejected=len(reasons),
            )
            if report.total_samples == 0:
                raise DataError(  # every item was rejected: reasons[i] is items[i]'s
                    f"no usable sample in {src}: all {len(items)} items were rejected "
                    f"({_rejection_summary(reasons)}; e.g. {items[0].origin}: {reasons[0]}). "
                    f"Nothing in {out} was changed; fix the inputs and run again."
                )
            index_data = {
                "version": 1,
                "domain": domain,
                "subject": subject,
                "created": datetime.fromtimestamp(build_time(), timezone.utc).isoformat(timespec="seconds"),
                "shards": shards,
                "total_samples": report.total_samples,
                "rejected": report.rejected,
            }
            (staging / INDEX_NAME).write_text(json.dumps(index_data, indent=2) + "\n", encoding="utf-8")
            new = [staging / s["url"] for s in shards] + [staging / REJECTED_NAME, staging / INDEX_NAME]
            swap_files(out, new, old)
    except BaseException:
        sink.abort()  # close the shard in progress (it goes with the staging folder)
        if created_out:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: this run made it and put nothing in it
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report

"""Reference images and image grids: loading subjects' reference images, tiling and writing PNGs.

Used by the training callback :class:`~nested.callbacks.SampleGrid` and by ``nested eval``
(:mod:`nested.evaluation.sweep`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from nested.data.domains import DomainSpec, check_urls
from nested.data.loading import build_stream
from nested.encoder import centre_square
from nested.errors import DataError, MissingFileError
from nested.files import atomic_file
from nested.image_files import IMAGE_SUFFIXES
from nested.inference.subjects import load_image

__all__ = [
    "Reference",
    "aligned_face_image",
    "is_shards_source",
    "labelled_grid",
    "load_references",
    "make_grid",
    "save_png",
    "to_uint8_hwc",
]


# ----------------------------------------------------------------------------- references


@dataclass
class Reference:
    """A subject's reference image: ``image`` is (3, S, S) float32 in [0, 1].

    ``meta``: the shard sample's ``json`` (e.g. the toy world's ``identity`` label and ``domain``),
    ``{}`` for images from a folder.
    """

    name: str
    image: Tensor
    meta: dict[str, Any] = field(default_factory=dict)


def _square(image: Tensor, size: int) -> Tensor:
    """(1, 3, H, W) -> (3, size, size): center square crop, resized (bicubic, antialiased)."""
    square = centre_square(image)
    if square.shape[-1] != size:
        square = F.interpolate(square, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return square[0].clamp(0, 1)


def aligned_face_image(image: Tensor, what: str, size: int = 512) -> Tensor:
    """(1, 3, H, W) in [0, 1] -> (1, 3, size, size): the subject's aligned face crop, as ``nested shards
    --faces`` prepares a training reference (:func:`nested.data.faces.aligned_subject_face`).

    Raises:
        DataError: no face in the photo, or two of similar size (``what`` names the photo).
        MissingDependencyError: the ``faces`` extra is not installed.
    """
    from nested.data import faces  # dlib is imported only when faces are aligned

    pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    try:
        crop = faces.aligned_subject_face(Image.fromarray(pixels), size)
    except faces.FaceRejected as error:
        raise DataError(
            f"{what}: {error}. Use a photo where the subject's face is the one clear frontal face, or crop it "
            "around the face yourself and leave out --align-face."
        ) from None
    return load_image(crop)


def is_shards_source(source: str | Sequence[str]) -> bool:
    """Whether a subjects source names shards (a list, ``.tar``, ``.json``, brace pattern or URL), not images."""
    if not isinstance(source, str):
        return True
    return source.endswith((".tar", ".json")) or ("{" in source and ".." in source) or "://" in source


def _check_nothing_skipped(samples: list[dict], *, whole: bool, source: object) -> None:
    """Refuse references read from shards where samples had to be skipped among them (a damaged image or
    shard): later subjects would be measured in their place. Each sample carries the skips made before the
    next one was read, so the last counts only when the stream was read to its end (``whole``)."""
    carried = samples if whole else samples[:-1]
    lost: dict[str, int] = {}
    for sample in carried:
        for kind, number in sample.get("skipped", {}).items():
            if number and kind != "no_subject_inserted":
                lost[kind] = lost.get(kind, 0) + int(number)
    if lost:
        counts = ", ".join(f"{kind}: {number}" for kind, number in lost.items())
        raise DataError(
            f"{source}: {sum(lost.values())} sample(s) among the subjects asked for could not be read ({counts}; "
            "the log above names the first), so other subjects would be measured in their place: repair or "
            "rebuild the shards, or pass a folder of reference images."
        )


def load_references(
    source: str | os.PathLike | Sequence[str],
    *,
    count: int | None = None,
    size: int = 224,
    token: str = "<subject>",
    align_faces: bool = False,
) -> list[Reference]:
    """The first ``count`` reference images of a folder of images or of (validation) shards.

    Args:
        source: a folder of images (sorted by name; the file stem is the subject's name), one image file,
            or shards: a ``shards.json``, a ``.tar``, a brace pattern or a list of tars. A shard sample's
            reference is its ``ref`` image, else the crop around its ``bbox``, else the whole image; its
            name is the sample key and its ``meta`` the sample's ``json``.
        count: how many (None: all).
        size: the side of the returned square images.
        token: the subject token written into shard captions (only used to read the shards).
        align_faces: each image of a folder (or the one image file) becomes its subject's aligned face crop
            (:func:`aligned_face_image`) instead of its centre square: a faces adapter's input as ``nested
            shards --faces`` prepared it in training. Shards already hold their prepared references: refused.

    Raises:
        FileNotFoundError: nothing to read at ``source``. ValueError: no image found, two images of a folder
        with one name, an image file of the folder that is damaged or too large
        (:func:`nested.image_files.open_image`: fatal, naming the file), or shards with a sample among the
        first ``count`` that cannot be read: so that the subjects measured are the ones asked for.
    """
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")

    if is_shards_source(source if isinstance(source, (list, tuple)) else str(source)):
        if align_faces:
            raise ValueError(f"{source}: shards hold their prepared references; align_faces reads photos.")
        urls = list(source) if isinstance(source, (list, tuple)) else str(source)
        spec = DomainSpec(name="references", urls=urls, subject=token)
        stream = build_stream(
            [spec], train=False, resolution=max(8, -(-size // 8) * 8), reference_size=size, max_samples=count
        )
        samples = []
        for sample in stream:
            samples.append(sample)
            if count is not None and len(samples) >= count:
                break
        _check_nothing_skipped(samples, whole=count is None or len(samples) < count, source=source)
        references = [Reference(str(s["key"]), s["reference"].float().clamp(0, 1)) for s in samples]
        metas = _shard_metadata(check_urls(spec), {r.name for r in references})
        for reference in references:
            reference.meta = metas.get(reference.name, {})
    else:
        path = Path(source).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            raise MissingFileError(
                f"no reference images at {str(path)!r}: expected a folder of images, an image file, a shards.json, "
                "a .tar or a brace pattern of shards."
            )
        files = files[:count]
        stems = [file.stem for file in files]
        twins = [file for file in files if stems.count(file.stem) > 1]
        if twins:
            raise DataError(
                f"the reference images {', '.join(file.name for file in twins)} would all be the subject "
                f"{twins[0].stem!r} (a subject is named by its file name without the extension): rename them."
            )
        references = []
        for file in files:
            image = load_image(file, file.name)
            image = aligned_face_image(image, str(file), size)[0] if align_faces else _square(image, size)
            references.append(Reference(file.stem, image))
    if not references:
        raise DataError(f"no reference image found in {source!r} (image files: {', '.join(IMAGE_SUFFIXES)}).")
    return references


def _shard_metadata(urls: list[str], keys: set[str]) -> dict[str, dict[str, Any]]:
    """key -> the ``json`` member of those samples of the shards at ``urls``.

    The training stream keeps only what training needs, so the metadata is read in a second pass over
    the same shards; it stops as soon as every key is found (references are the first samples).
    """

    found: dict[str, dict[str, Any]] = {}
    if not keys:
        return found
    # Unreadable shards were already counted and skipped by the stream: their samples have no metadata.
    samples = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=wds.ignore_and_continue)
    )
    for sample in samples:
        key = sample.get("__key__")
        if key in keys and isinstance(sample.get("json"), bytes):
            try:
                meta = json.loads(sample["json"])
            except ValueError:
                meta = None
            found[key] = meta if isinstance(meta, dict) else {}
            if len(found) == len(keys):
                break
    return found


# ----------------------------------------------------------------------------- grids


def make_grid(rows: Sequence[Sequence[Tensor]], padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile images (each (3, h, w) in [0, 1], all the same size) into one (3, H, W) grid.

    ``H = R * h + (R + 1) * padding`` and ``W = C * w + (C + 1) * padding`` for R rows of C images.
    """
    if not rows or not rows[0]:
        raise ValueError("make_grid needs at least one row with one image.")
    height, width = rows[0][0].shape[-2:]
    columns = max(len(row) for row in rows)
    grid = torch.full(
        (3, len(rows) * height + (len(rows) + 1) * padding, columns * width + (columns + 1) * padding),
        pad_value,
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image.shape[-2:] != (height, width):
                image = F.interpolate(
                    image[None].float(), size=(height, width), mode="bicubic", antialias=True
                )[0]
            top, left = padding + r * (height + padding), padding + c * (width + padding)
            grid[:, top : top + height, left : left + width] = image.float().clamp(0, 1)
    return grid


def labelled_grid(
    rows: Sequence[Sequence[Tensor]],
    column_labels: Sequence[str],
    row_labels: Sequence[str],
    min_cell: int = 128,
    padding: int = 4,
) -> Image.Image:
    """:func:`make_grid` for a person to read: cells of at least ``min_cell`` px (small images enlarged by
    an integer factor, nearest-neighbour, so their pixels stay sharp), a header naming each column and the
    row's label (e.g. its prompt) above each row."""
    height, width = rows[0][0].shape[-2:]
    factor = max(1, -(-min_cell // max(height, width)))  # ceil: a 64 px image becomes 128 px
    cells = [
        [F.interpolate(image[None].float(), scale_factor=factor, mode="nearest")[0] for image in row]
        for row in rows
    ]
    tiled = Image.fromarray(to_uint8_hwc(make_grid(cells, padding=padding)))
    font = ImageFont.load_default(size=14)
    line = 20  # px per text line
    cell_w, cell_h = width * factor, height * factor
    canvas = Image.new("RGB", (tiled.width, line + len(rows) * (line + cell_h + padding) + padding), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels):
        draw.text((padding + c * (cell_w + padding) + 2, 2), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        top = line + r * (line + cell_h + padding)
        draw.text((padding + 2, top + 2), label, fill=(70, 70, 70), font=font)
        strip = tiled.crop(
            (0, padding + r * (cell_h + padding), tiled.width, padding + r * (cell_h + padding) + cell_h)
        )
        canvas.paste(strip, (0, top + line))
    return canvas


def to_uint8_hwc(image: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def save_png(image: Tensor | Image.Image, path: str | os.PathLike) -> Path:
    """Write a (3, H, W) [0, 1] image (or a PIL image) as PNG, atomically (:func:`nested.files.atomic_file`);
    returns the path."""

    path = Path(path)
    picture = image if isinstance(image, Image.Image) else Image.fromarray(to_uint8_hwc(image))
    with atomic_file(path) as file:
        picture.save(file, format="PNG")
    return path

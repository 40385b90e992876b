"""Pure image transforms and caption helpers of the training data (no I/O, no randomness of their own).

Every random choice comes from the ``random.Random`` passed in, so a sample's view is a pure
function of its bytes and that generator (``nested.data.train_stream`` seeds one per sample position).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageEnhance

from nested.tokens import word_spans

if TYPE_CHECKING:
    from nested.data.domains import DomainSpec

__all__ = [
    "ReferenceAugment",
    "TargetView",
    "bbox_square",
    "contains_subject",
    "insert_subject",
    "reference_transform",
    "caption_text",
    "target_transform",
    "upright_original_size",
]


@dataclass
class ReferenceAugment:
    """Augmentation of the encoder's reference image (training only; validation uses none).

    Attributes:
        enabled: master switch.
        scale: area fraction range of the random resized crop (taken from the square source).
        ratio: aspect-ratio range of that crop (it is resized back to a square).
        flip: random horizontal flip with p=0.5.
        color_jitter: brightness, contrast and saturation factors drawn from [1-j, 1+j].
        bbox_jitter: each side of a bbox crop gets ``DomainSpec.bbox_margin`` +- U(0, jitter)
            of the box size, so the encoder does not learn one exact framing.
    """

    enabled: bool = True
    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (0.9, 1.1)
    flip: bool = True
    color_jitter: float = 0.1
    bbox_jitter: float = 0.1


class TargetView(NamedTuple):
    """The transformed target: pixels (3, R, R) float32 in [-1, 1] + SDXL micro-conditioning."""

    pixel_values: torch.Tensor
    original_size: tuple[int, int]  # (h, w) before the resize
    crop_top_left: tuple[int, int]  # (top, left) in the resized (and, if flipped, mirrored) image


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def target_transform(
    image: Image.Image,
    *,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    rng: random.Random | None = None,
) -> TargetView:
    """Resize the short side to ``resolution``, crop a square, optionally flip.

    The crop is random (uniform position) unless ``center_crop``; a flip happens with p=0.5.
    ``crop_top_left`` is reported in the mirrored image when flipped, which is what the SDXL
    training recipes report (they flip before cropping).
    """
    rng = rng or random.Random(0)
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    if center_crop:
        top, left = (size[1] - resolution) // 2, (size[0] - resolution) // 2
    else:
        top, left = rng.randint(0, size[1] - resolution), rng.randint(0, size[0] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = size[0] - resolution - left
    return TargetView(_to_tensor(image).mul_(2.0).sub_(1.0), (height, width), (top, left))


def bbox_square(
    bbox: list[float],
    image_size: tuple[int, int],
    margin: float,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> tuple[int, int, int, int]:
    """The square crop box around ``bbox`` = [x0, y0, x1, y1] with a margin, kept in the image.

    Each side grows by (margin +- U(0, jitter)) x the box size; the result is squared around the
    box centre (side = the longer side, at most the image's short side) and shifted inside.
    """
    rng = rng or random.Random(0)
    x0, y0, x1, y1 = bbox
    width, height = x1 - x0, y1 - y0

    def grow() -> float:
        return max(0.0, margin + rng.uniform(-jitter, jitter)) if jitter else margin

    x0, x1 = x0 - grow() * width, x1 + grow() * width
    y0, y1 = y0 - grow() * height, y1 + grow() * height
    side = max(1, min(round(max(x1 - x0, y1 - y0)), *image_size))
    left = min(max(0, round((x0 + x1 - side) / 2)), image_size[0] - side)
    top = min(max(0, round((y0 + y1 - side) / 2)), image_size[1] - side)
    return left, top, left + side, top + side


def _random_resized_box(
    width: int, height: int, augment: ReferenceAugment, rng: random.Random
) -> tuple[int, int, int, int]:
    """A random resized crop of a ``width`` x ``height`` image, as (left, top, crop width, crop height)."""
    for _ in range(10):  # rejection sampling; falls back to the whole image
        area = width * height * rng.uniform(*augment.scale)
        ratio = math.exp(rng.uniform(math.log(augment.ratio[0]), math.log(augment.ratio[1])))
        crop_w, crop_h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, width - crop_w), rng.randint(0, height - crop_h), crop_w, crop_h
    return 0, 0, width, height


def reference_transform(
    target: Image.Image,
    *,
    size: int,
    ref: Image.Image | None = None,
    bbox: list[float] | None = None,
    bbox_margin: float = 0.1,
    augment: ReferenceAugment | None = None,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """The encoder's input: (3, size, size) float32 in [0, 1].

    Source: ``ref`` if given, else the ``bbox`` square crop of ``target`` (see ``bbox_square``),
    else ``target``; made square by a center crop; then (if ``augment`` is enabled) a random
    resized crop; resized to ``size`` x ``size``; then (if enabled) flip and colour jitter.

    The crops are composed into one box of the source, which is resampled once, straight to
    ``size`` (no intermediate full-resolution crops); flip and jitter then touch ``size`` x
    ``size`` pixels, not the ~1000 px crop of a 1024 px target.
    """
    rng = rng or random.Random(0)
    augmenting = augment is not None and augment.enabled
    if ref is not None:
        source, (left, top, right, bottom) = ref, (0, 0, *ref.size)
    elif bbox is not None:
        jitter = augment.bbox_jitter if augmenting else 0.0
        source = target
        left, top, right, bottom = bbox_square(bbox, target.size, bbox_margin, jitter, rng)
    else:
        source, (left, top, right, bottom) = target, (0, 0, *target.size)
    side = min(right - left, bottom - top)  # the centre square
    left, top = left + (right - left - side) // 2, top + (bottom - top - side) // 2
    width = height = side
    if augmenting:
        dx, dy, width, height = _random_resized_box(side, side, augment, rng)
        left, top = left + dx, top + dy
    # reducing_gap=2.0: a box reduction first when shrinking >= 4x (e.g. 1024 -> 224), then bicubic.
    box = (left, top, left + width, top + height)
    image = source.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)
    if augmenting:
        if augment.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if augment.color_jitter > 0:
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                image = enhance(image).enhance(
                    rng.uniform(1 - augment.color_jitter, 1 + augment.color_jitter)
                )
    return _to_tensor(image)


def upright_original_size(original: tuple[int, int], stored: tuple[int, int]) -> tuple[int, int]:
    """img2dataset's ``(original_height, original_width)`` as the upright image has them.

    img2dataset measures the file's pixels as OpenCV decodes them, without their EXIF orientation; a photo
    whose bytes lie sideways (a phone's portrait) is stored with its tag and decodes upright here, the other
    way round. Every resize img2dataset makes keeps the aspect or makes a square, so a stored image that is
    portrait where the original was landscape (or the reverse) was turned.
    """
    (height, width), (stored_height, stored_width) = original, stored
    if (height - width) * (stored_height - stored_width) < 0:
        return width, height
    return height, width


def caption_text(text: str) -> str:
    """A caption as its file's text is read: a byte-order mark dropped, line ends made ``\\n``."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def contains_subject(caption: str, subject: str) -> bool:
    """Whether ``subject`` occurs in ``caption`` as a whole word, case-insensitive, as the subject masks find it
    (:func:`nested.tokens.word_spans`: ``person2`` holds ``person``, ``persons`` does not)."""
    return bool(word_spans(caption, subject))


def insert_subject(caption: str, spec: DomainSpec) -> str:
    """``"a cat on a sofa"`` -> ``"a photo of <cat>, a cat on a sofa"`` (see ``DomainSpec``)."""
    prefix = spec.insert_template.format(subject=spec.subject)
    return f"{prefix}, {caption}" if caption else prefix

"""Opening an image file the user gave: fully decoded and checked, or one error naming the file.

Every place that opens a user's image file goes through :func:`open_image`, so all of them refuse the
same things with the same words:

- a decompression bomb: the pixel count is read from the header and checked *before* anything is
  decoded, against the caller's ``max_pixels`` or else ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL itself only
  warns between its limit and twice that, and refuses beyond);
- a truncated or corrupt file: the whole image is decoded here, so a broken file fails now, with its
  name, and not later in the middle of a run with PIL's bare "image file is truncated";
- a file PIL cannot identify;
- pixels with no defined 8-bit meaning (integers beyond 16 bits, floats outside 0..1).

The result is upright (its EXIF orientation applied) and correct 8-bit RGB in every mode PIL opens
(:func:`to_rgb`: PIL's own ``convert("RGB")`` clips 16-bit images and drops transparency).
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from PIL.ExifTags import Base as ExifTag

from nested.errors import DataError, MissingFileError

__all__ = [
    "ImageFileError",
    "OpenedImage",
    "UnusablePixels",
    "check_image_file",
    "open_image",
    "to_rgb",
    "upright",
]

# The image files a folder of photos is read for (nested shards, nested eval's references).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

# What PIL raises for a file it cannot decode, across its format plugins.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class ImageFileError(DataError):
    """An image file that cannot be used; ``reason`` says why without the path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot use the image {str(path)!r}: {reason}.")


@dataclass
class OpenedImage:
    """A decoded image file: ``rgb`` upright 8-bit RGB pixels, PIL's ``format`` name, and
    ``bytes_differ``: whether a plain ``Image.open(path).convert("RGB")`` of the file would give other
    pixels than ``rgb`` (EXIF orientation, 16-bit or transparent images), so the file's bytes must
    not stand for ``rgb``."""

    rgb: Image.Image
    format: str | None
    bytes_differ: bool


_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class UnusablePixels(ValueError):
    """Pixels with no defined 8-bit meaning (the reason, without the path)."""


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation tag says (a camera's sideways bytes); itself without one."""
    if image.getexif().get(ExifTag.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB pixels of an image in any mode PIL opens.

    PIL's ``convert("RGB")`` is right for 8-bit modes without transparency (``L``, ``1``, ``P``,
    ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``), but clips 16-bit and 32-bit integers at 255
    and drops alpha. So: ``I;16*`` (16-bit) is scaled from 0..65535, ``I`` (32-bit integers) is read
    as 16-bit too (refused outside 0..65535), ``F`` (floats) is scaled from 0..1 (refused
    outside), and transparency (an alpha channel, or a ``transparency`` entry of ``P``, ``L``, ``I;16``
    and ``RGB`` images) is composited over white.

    Raises:
        UnusablePixels: when the pixel values have no defined 8-bit meaning (the message says why).
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode == "F" or image.mode.startswith("I"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
        if image.mode == "F":
            if not (low >= 0 and high <= 1):  # NaN fails too
                raise UnusablePixels(
                    f"floating-point pixels (mode F) outside 0..1 (min {low:g}, max {high:g}); "
                    "save it as an 8- or 16-bit image"
                )
            pixels = pixels * 255
        else:
            if low < 0 or high > 65535:
                raise UnusablePixels(
                    f"integer pixels (mode {image.mode}) outside the 16-bit range 0..65535 (min {low:g}, "
                    f"max {high:g}); save it as an 8- or 16-bit image"
                )
            pixels = pixels / 257
        gray = Image.fromarray(np.rint(pixels).astype(np.uint8))
        key = image.info.get("transparency")
        if isinstance(key, int):  # a 16-bit gray PNG's transparent value: those pixels become white
            gray.paste(255, mask=Image.fromarray(np.asarray(image) == key))
        return gray.convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_limit_at_least(max_pixels: int | None) -> Iterator[None]:
    """PIL's ``Image.MAX_IMAGE_PIXELS`` raised to ``max_pixels`` meanwhile, where it is lower: ``Image.open``
    refuses an image beyond twice PIL's limit before the caller's own limit is read. The limit is PIL's
    global; the lock keeps two threads from restoring each other's value."""
    if max_pixels is None or Image.MAX_IMAGE_PIXELS is None or max_pixels <= Image.MAX_IMAGE_PIXELS:
        yield
        return
    with _PIL_LIMIT_LOCK:
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def check_image_file(path: str | os.PathLike, what: str = "the image") -> Path:
    """``path`` (user-expanded) if it is a file; else :class:`MissingFileError` saying what it is instead."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MissingFileError(f"{what} is a folder, not an image file: {str(path)!r}.")
    if not path.is_file():
        raise MissingFileError(f"{what} does not exist: {str(path)!r}.")
    return path


def open_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> OpenedImage:
    """Decode the image file at ``path`` completely and check it.

    Args:
        path: the file.
        max_pixels: the most pixels (width x height) the caller accepts, in place of PIL's
            ``Image.MAX_IMAGE_PIXELS`` (also above it). None: PIL's limit (read at each call, so raising
            it from Python raises this one; None: none), and an image beyond it is refused as a
            decompression bomb, where PIL itself would only warn.

    Raises:
        MissingFileError: no file at ``path``.
        ImageFileError: a decompression bomb, a truncated or corrupt file, or not an image.
    """
    path = check_image_file(path)
    try:
        with warnings.catch_warnings(), _pil_limit_at_least(max_pixels):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below instead
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageFileError(path, f"too many pixels: {width}x{height} > {max_pixels}; resize it")
                if (
                    max_pixels is None
                    and Image.MAX_IMAGE_PIXELS is not None
                    and width * height > Image.MAX_IMAGE_PIXELS
                ):
                    raise ImageFileError(
                        path,
                        f"decompression bomb: {width}x{height} is more than PIL's Image.MAX_IMAGE_PIXELS "
                        f"({Image.MAX_IMAGE_PIXELS}); resize it",
                    )
                image.load()
                turned = upright(image)
                rgb = to_rgb(turned)
                bytes_differ = turned is not image or (
                    rgb is not turned
                    and not np.array_equal(np.asarray(image.convert("RGB")), np.asarray(rgb))
                )
                return OpenedImage(rgb, image.format, bytes_differ)
    except ImageFileError:
        raise
    except UnusablePixels as error:
        raise ImageFileError(path, f"unusable pixels: {error}") from None
    except Image.DecompressionBombError as error:
        raise ImageFileError(path, f"decompression bomb: {str(error).rstrip('.')}") from error
    except Image.UnidentifiedImageError as error:
        raise ImageFileError(path, "unreadable image: not an image file PIL can read") from error
    except _DECODE_ERRORS as error:
        raise ImageFileError(
            path, f"unreadable image: the file is damaged ({error}); re-save or replace it"
        ) from error

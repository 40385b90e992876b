"""Opening an image file the user gave: fully decoded and checked, or one error naming the file.

Every place that opens a user's image file goes through :func:`open_image`, so all of them refuse the
same things with the same words:

- a decompression bomb: the pixel count is read from the header and checked *before* anything is
  decoded (PIL itself only warns between ``PIL.Image.MAX_IMAGE_PIXELS`` and twice that, and refuses
  beyond, whatever ``max_pixels`` says);
- a truncated or corrupt file: the whole image is decoded here, so a broken file fails now, with its
  name, and not later in the middle of a run with PIL's bare "image file is truncated";
- a file PIL cannot identify.

The result is upright (its EXIF orientation applied) and RGB.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from nested.errors import DataError, MissingFileError

__all__ = ["ImageFileError", "OpenedImage", "open_image"]

# What PIL raises for a file it cannot decode, across its format plugins.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class ImageFileError(DataError):
    """An image file that cannot be used; ``reason`` says why without the path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot use the image {str(path)!r}: {reason}.")


@dataclass
class OpenedImage:
    """A decoded image file: ``rgb`` upright RGB pixels, PIL's ``format`` name, and whether EXIF
    orientation changed the pixels (``transposed``: then the file's bytes differ from ``rgb``)."""

    rgb: Image.Image
    format: str | None
    transposed: bool


def open_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> OpenedImage:
    """Decode the image file at ``path`` completely and check it.

    Args:
        path: the file.
        max_pixels: the most pixels (width x height) accepted; None: ``PIL.Image.MAX_IMAGE_PIXELS``
            (read at each call, so raising it from Python raises this limit too; PIL's None: no limit).

    Raises:
        MissingFileError: no file at ``path``.
        ImageFileError: a decompression bomb, a truncated or corrupt file, or not an image.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"the image {str(path)!r} does not exist.")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, by ``limit``
            with Image.open(path) as image:
                width, height = image.size
                if limit is not None and width * height > limit:
                    raise ImageFileError(
                        path,
                        f"{width}x{height} is more than {limit} pixels (a decompression bomb?); resize it",
                    )
                image.load()
                transposed = image.getexif().get(0x0112, 1) != 1  # the EXIF orientation tag
                upright = ImageOps.exif_transpose(image) if transposed else image
                return OpenedImage(upright.convert("RGB"), image.format, transposed)
    except ImageFileError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageFileError(path, f"{error} Resize it") from error
    except Image.UnidentifiedImageError as error:
        raise ImageFileError(path, "not an image file PIL can read") from error
    except _DECODE_ERRORS as error:
        raise ImageFileError(path, f"the file is damaged ({error}); re-save or replace it") from error

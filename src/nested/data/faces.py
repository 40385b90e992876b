"""Faces in photos: detection, the subject face, an FFHQ-style aligned crop, and a face-recognition embedding.

Everything here runs dlib's models, from the optional extra ``nested[faces]`` (``dlib-bin`` and
``face-recognition-models``; no download at run time). They are imported on first use, so the rest of
``nested`` imports without them; a faces feature used without them raises
:class:`~nested.errors.MissingDependencyError` naming ``pip install 'nested[faces]'``.

- :func:`detect_faces`: dlib's HOG frontal-face detector on the image at about 1024 pixels (faces from about
  8 % of its longer side), then dlib's 5-point landmarks (the outer and inner corner of each eye, the base
  of the nose) on the full-size image. Boxes and landmarks are in pixels of the image given.
- :func:`choose_subject`: which face is the photo's subject (the rule is in its docstring).
- :func:`align_face`: the FFHQ-style crop: rotated so the eyes are level, scaled and shifted so that the
  eye centres land exactly on :data:`ALIGNED_EYES`.
- :func:`face_embedding`: dlib's ResNet face-recognition model (128 numbers; two photos of one person are
  usually less than 0.6 apart in Euclidean distance). It aligns the face its own way (dlib's
  ``get_face_chip``, 150 px, the alignment it was trained with), not with :func:`align_face`.

The module holds no process-level machinery: callers (``nested shards`` workers, ``nested eval``) call
these functions on their own images, and each process loads the models once.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nested.errors import MissingDependencyError
from nested.image_files import to_rgb, upright

__all__ = [
    "ALIGNED_EYES",
    "AMBIGUOUS_AREA_RATIO",
    "NOISE_SCORE_RATIO",
    "Face",
    "FaceRejected",
    "align_face",
    "aligned_subject_face",
    "choose_subject",
    "detect_faces",
    "face_embedding",
    "load_models",
    "require_faces",
]

INSTALL_HINT = "pip install 'nested[faces]'"
LANDMARKS_MODEL = "shape_predictor_5_face_landmarks.dat"
RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"

# FFHQ's framing of a frontal face: its crop side is 4 eye distances and its eyes are level at about 47 %
# of the height. (x, y) of the centre of the eye on the image's left, then the right one, as fractions of
# the crop side.
ALIGNED_EYES = ((0.375, 0.4725), (0.625, 0.4725))
# A face turned sideways brings its eyes together, and a crop sized by the eye distance alone would grow
# around it; FFHQ then sizes it by the eye-to-mouth distance. The 5-point model has no mouth: the distance
# from the eyes' midpoint to the base of the nose (0.74 eye distances on a frontal face) times this factor
# is the smallest eye distance the crop is sized by.
NOSE_TO_EYES = 1.1
# A detection scoring below this fraction of the best one in the image is detector noise (on scikit-image's
# astronaut, a "face" on her suit scores 0.12 against her face's 1.16).
NOISE_SCORE_RATIO = 0.5
# A second face at least this fraction of the subject's area makes the subject ambiguous.
AMBIGUOUS_AREA_RATIO = 0.5


class FaceRejected(ValueError):
    """An image whose subject face cannot be used; ``str(exc)`` is the reason."""


@dataclass(frozen=True)
class Face:
    """One detected face, in pixels of the image it was found in."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float  # dlib's detection score (higher: more certain)
    landmarks: tuple[tuple[float, float], ...]  # dlib's 5 points: 2 corners of each eye, the base of the nose

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)

    @property
    def eyes(self) -> tuple[np.ndarray, np.ndarray]:
        """The centres of the eye on the image's left and of the one on its right, each (x, y)."""
        points = np.asarray(self.landmarks, dtype=np.float64)
        first, second = points[0:2].mean(axis=0), points[2:4].mean(axis=0)
        return (first, second) if first[0] <= second[0] else (second, first)

    @property
    def nose(self) -> np.ndarray:
        return np.asarray(self.landmarks[4], dtype=np.float64)

    def scaled(self, factor: float) -> Face:
        """The same face in an image resized by ``factor``."""
        return Face(
            box=tuple(v * factor for v in self.box),  # type: ignore[arg-type]
            score=self.score,
            landmarks=tuple((x * factor, y * factor) for x, y in self.landmarks),
        )


# ----------------------------------------------------------------------------- the models


@functools.cache
def require_faces() -> Any:
    """The ``dlib`` module once its models are found, or :class:`MissingDependencyError` naming the extra."""
    try:
        import dlib  # here, not at the top: the rest of nested imports without the faces extra
    except ImportError as error:
        raise MissingDependencyError(
            f"face detection and face identity need dlib, which is not installed ({error}): {INSTALL_HINT}"
        ) from error
    for name in (LANDMARKS_MODEL, RECOGNITION_MODEL):
        _model_file(name)
    return dlib


def _model_file(name: str) -> str:
    # find_spec locates the package without running its __init__, which imports the deprecated pkg_resources.
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"face detection and face identity need the face_recognition_models package (dlib's models): {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise MissingDependencyError(
            f"{path} is missing from face_recognition_models: reinstall it ({INSTALL_HINT})"
        )
    return str(path)


@functools.cache
def _detector() -> Any:
    return require_faces().get_frontal_face_detector()


@functools.cache
def _landmarker() -> Any:
    return require_faces().shape_predictor(_model_file(LANDMARKS_MODEL))


@functools.cache
def _recognizer() -> Any:
    return require_faces().face_recognition_model_v1(_model_file(RECOGNITION_MODEL))


def load_models(*, recognition: bool = False) -> None:
    """Load the detector and landmark models now (and the recognition model): a process that forks workers
    afterwards shares them with every worker instead of each loading its own."""
    _detector()
    _landmarker()
    if recognition:
        _recognizer()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


# ----------------------------------------------------------------------------- detection


def detect_faces(image: Image.Image, *, detect_size: int = 1024) -> list[Face]:
    """Every frontal face dlib finds in ``image``, largest first, with its 5 landmarks.

    The detector sees the image with its longer side at most ``detect_size`` pixels (shrunk when larger,
    enlarged twice by dlib when at most half of it) and finds faces from 80 pixels of that: with the
    default, from about 8 % of a photo's longer side. The landmarks are found in the full-size image.
    """
    dlib = require_faces()
    factor = min(1.0, detect_size / max(image.size))
    small = (
        image
        if factor == 1.0
        else image.resize(
            (max(1, round(image.width * factor)), max(1, round(image.height * factor))),
            Image.Resampling.BILINEAR,
        )
    )
    upsample = 1 if 2 * max(small.size) <= detect_size else 0
    rects, scores, _ = _detector().run(_pixels(small), upsample, 0.0)
    full = _pixels(image)
    faces = []
    for rect, score in zip(rects, scores, strict=True):
        box = (
            rect.left() / factor,
            rect.top() / factor,
            (rect.right() + 1) / factor,
            (rect.bottom() + 1) / factor,
        )
        x0, y0, x1, y1 = (round(v) for v in box)
        shape = _landmarker()(full, dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
        points = tuple((float(p.x), float(p.y)) for p in shape.parts())
        faces.append(Face(box=box, score=float(score), landmarks=points))
    return sorted(faces, key=lambda face: face.area, reverse=True)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def choose_subject(
    faces: list[Face], hint: tuple[float, float, float, float] | None = None, *, ambiguous: str = "reject"
) -> Face:
    """The photo's subject among ``faces``, by this rule:

    1. Detections scoring below ``NOISE_SCORE_RATIO`` of the best score are noise and are dropped.
    2. With a ``hint`` box (a manifest's ``bbox``), the subject is the face that overlaps it most
       (intersection over union); none overlapping it is a rejection.
    3. Otherwise the subject is the largest face. If another face is at least ``AMBIGUOUS_AREA_RATIO`` of
       its area, who the subject is cannot be told: ``ambiguous="reject"`` rejects the image (give a bbox
       to choose), ``"largest"`` keeps the largest (what scoring generated images does).

    Raises:
        FaceRejected: no face, no face in the hint, or an ambiguous subject; the message is the reason.
    """
    if not faces:
        raise FaceRejected("no face found (dlib's frontal face detector)")
    best = max(face.score for face in faces)
    kept = sorted(
        (face for face in faces if face.score >= NOISE_SCORE_RATIO * best),
        key=lambda face: face.area,
        reverse=True,
    )
    if hint is not None:
        overlaps = [(_iou(face.box, tuple(hint)), face) for face in kept]
        overlap, face = max(overlaps, key=lambda pair: pair[0])
        if overlap <= 0:
            raise FaceRejected(f"none of the {len(kept)} detected faces overlaps the given bbox {list(hint)}")
        return face
    subject = kept[0]
    rivals = [face for face in kept[1:] if face.area >= AMBIGUOUS_AREA_RATIO * subject.area]
    if rivals and ambiguous == "reject":
        raise FaceRejected(
            f"{len(rivals) + 1} faces of similar size: which one is the subject is ambiguous "
            "(give its bbox in a manifest to choose)"
        )
    return subject


# ----------------------------------------------------------------------------- alignment


def _crop_transform(face: Face, size: int) -> tuple[float, float, float, float, float, float]:
    """PIL's affine coefficients mapping a pixel of the ``size`` crop to the image (output -> input)."""
    left, right = face.eyes
    eye_line = right - left
    middle = (left + right) / 2
    eye_distance = max(math.hypot(*eye_line), NOSE_TO_EYES * math.hypot(*(face.nose - middle)), 1e-6)
    angle = math.atan2(eye_line[1], eye_line[0])
    (x_left, y_eyes), (x_right, _) = ALIGNED_EYES
    scale = eye_distance / ((x_right - x_left) * size)  # image pixels per crop pixel
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    u0, v0 = (x_left + x_right) / 2 * size, y_eyes * size  # where the eyes' midpoint lands
    # image = middle + R(angle) * scale * (crop - (u0, v0))
    return (cos, -sin, middle[0] - cos * u0 + sin * v0, sin, cos, middle[1] - sin * u0 - cos * v0)


def align_face(image: Image.Image, face: Face, size: int = 512) -> Image.Image:
    """The ``size`` x ``size`` FFHQ-style crop of ``face`` (found in ``image``).

    The eyes are level and their centres land on :data:`ALIGNED_EYES` (the crop side is 4 eye distances,
    or ``NOSE_TO_EYES`` eye-to-nose distances for a face turned far sideways). Parts of the crop outside
    the photo are black.
    """
    coefficients = _crop_transform(face, size)
    step = math.hypot(coefficients[0], coefficients[3])  # image pixels per crop pixel
    reduce = int(step)
    if reduce >= 2:  # shrink by a whole factor first: bicubic sampling alone would alias
        image = image.reduce(reduce)
        face = face.scaled(1 / reduce)
        coefficients = _crop_transform(face, size)
    return image.convert("RGB").transform(
        (size, size), Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BICUBIC
    )


def aligned_subject_face(image: Image.Image, size: int = 512) -> Image.Image:
    """The subject's face in a photo as ``nested shards --faces`` writes a training reference: turned
    upright by its EXIF tag, read as 8-bit RGB (16-bit, transparent and palette photos as ``nested shards``
    reads them), detected, chosen by :func:`choose_subject` (two faces of similar size are refused) and
    aligned by :func:`align_face`. A faces adapter's encoder was trained on such crops; a subject photo
    given at inference goes through the same steps.

    Raises:
        FaceRejected: no face, or an ambiguous subject; the message is the reason.
        nested.image_files.UnusablePixels: pixels with no 8-bit meaning (e.g. floats outside 0..1).
    """
    image = to_rgb(upright(image))
    return align_face(image, choose_subject(detect_faces(image)), size)


# ----------------------------------------------------------------------------- identity


def face_embedding(image: Image.Image, face: Face) -> np.ndarray:
    """dlib's 128-d face-recognition embedding of ``face`` in ``image`` (float64)."""
    dlib = require_faces()
    x0, y0, x1, y1 = (round(v) for v in face.box)
    shape = dlib.full_object_detection(
        dlib.rectangle(x0, y0, x1 - 1, y1 - 1), [dlib.point(round(x), round(y)) for x, y in face.landmarks]
    )
    return np.asarray(_recognizer().compute_face_descriptor(_pixels(image), shape), dtype=np.float64)

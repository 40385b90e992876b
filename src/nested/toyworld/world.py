"""A procedural two-domain world for proving that personalization learns.

``faces``: cartoon faces, identity :class:`FaceIdentity` (skin, hair colour, hair style, eye colour,
face shape: 1440 identities). ``pets``: cartoon cats and dogs, identity :class:`PetIdentity`
(species, fur colour, pattern, ear shape, eye colour: 432 identities). Per image, a seeded
:class:`Nuisance` (jitter, scale, small rotation, expression); the caption controls a
:class:`Context` (a scene of ``SCENES``, optional style ``sketch``/``painting``; the ``plain``
reference background is never captioned). Captions never name identity ("a photo of a person at
the beach", "a photo of a person and a pet in the city"), and attribute value names are disjoint
from the caption vocabulary, so only a reference image can carry identity. Drawing is done at 4x
and downsampled; (identity, context, seed, size) always gives the same pixels.
:func:`write_world_shards` writes the ``nested.data.shards`` format with ``ref.png`` = another render
of the same identity on the plain background.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from itertools import product
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, ImageDraw, ImageFilter, ImageOps

from nested.data.shards import INDEX_NAME, ShardReport, ShardSink, build_time, prepare_out
from nested.files import staging_folder, swap_files

RGB = tuple[int, int, int]
# Bumped whenever the same arguments would render different shards (drawing or caption changes), so
# scripts/toyworld/make_world.py --skip-if-current renders stale shards again. 2: "a <person>" captions.
WORLD_VERSION = 2
DOMAINS: tuple[str, ...] = ("faces", "pets")
CLASS_WORDS: dict[str, str] = {"faces": "person", "pets": "pet"}
DEFAULT_TOKENS: dict[str, str] = {"faces": "<person>", "pets": "<pet>"}

# Scene -> caption phrase. "plain" (the reference background) is rendered but never captioned.
SCENES: dict[str, str] = {
    "red": "on a red background", "blue": "on a blue background", "green": "on a green background",
    "beach": "at the beach", "snow": "in the snow", "night": "at night", "grass": "on the grass",
    "city": "in the city",
}  # fmt: skip
STYLES: tuple[str | None, ...] = (None, "sketch", "painting")
EXPRESSIONS: tuple[str, ...] = ("smile", "neutral", "open")
_SUPERSAMPLE = 4
_L = 256  # side of the subject layer's drawing units
_SKIN: dict[str, RGB] = {
    "pale": (250, 224, 205), "light": (236, 196, 160), "tan": (205, 152, 110),
    "brown": (150, 100, 65), "deep": (95, 60, 40),
}  # fmt: skip
_HAIR: dict[str, RGB] = {
    "black": (30, 25, 25), "brown": (110, 65, 30), "blonde": (240, 210, 110),
    "ginger": (215, 100, 35), "grey": (160, 160, 165), "white": (245, 245, 240),
}  # fmt: skip
_FACE_EYES: dict[str, RGB] = {
    "dark": (60, 35, 20), "hazel": (140, 110, 50), "azure": (40, 140, 230), "jade": (40, 170, 110),
}  # fmt: skip
_FUR: dict[str, RGB] = {
    "black": (35, 32, 32), "white": (245, 244, 238), "ginger": (225, 120, 45),
    "grey": (140, 140, 148), "brown": (120, 75, 40), "cream": (240, 220, 170),
}  # fmt: skip
_PET_EYES: dict[str, RGB] = {
    "amber": (235, 160, 20), "jade": (40, 170, 110), "azure": (40, 140, 230), "hazel": (140, 110, 50),
}  # fmt: skip


class _IdentityBase:
    """Shared behaviour of the identity dataclasses: labels, integer indices, validation."""

    DOMAIN: ClassVar[str]
    ATTRIBUTES: ClassVar[dict[str, tuple[str, ...]]]

    def __post_init__(self) -> None:
        for name, values in self.ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{self.DOMAIN} {name}={getattr(self, name)!r} is not one of {values}")

    def to_label(self) -> dict[str, str]:
        """Attribute name -> value, e.g. ``{"skin": "tan", ...}`` (JSON-friendly)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_label(cls, label: dict[str, Any]) -> Identity:
        """Inverse of :meth:`to_label`; extra keys (e.g. ``domain``) are ignored."""
        return cls(**{name: label[name] for name in cls.ATTRIBUTES})  # type: ignore[return-value]

    def indices(self) -> dict[str, int]:
        """Attribute name -> index of the value in ``ATTRIBUTES`` (class labels for judges)."""
        return {name: values.index(getattr(self, name)) for name, values in self.ATTRIBUTES.items()}

    @classmethod
    def from_indices(cls, indices: dict[str, int]) -> Identity:
        """Inverse of :meth:`indices`."""
        return cls(**{n: v[indices[n]] for n, v in cls.ATTRIBUTES.items()})  # type: ignore[return-value]


@dataclass(frozen=True)
class FaceIdentity(_IdentityBase):
    """A cartoon person: everything that stays fixed across that person's images."""

    skin: str
    hair_colour: str
    hair_style: str
    eye_colour: str
    face_shape: str

    DOMAIN: ClassVar[str] = "faces"
    ATTRIBUTES: ClassVar[dict[str, tuple[str, ...]]] = {
        "skin": tuple(_SKIN), "hair_colour": tuple(_HAIR), "hair_style": ("bald", "short", "long", "spiky"),
        "eye_colour": tuple(_FACE_EYES), "face_shape": ("round", "oval", "square"),
    }  # fmt: skip


@dataclass(frozen=True)
class PetIdentity(_IdentityBase):
    """A cartoon cat or dog: everything that stays fixed across that pet's images."""

    species: str
    fur_colour: str
    pattern: str
    ear_shape: str
    eye_colour: str

    DOMAIN: ClassVar[str] = "pets"
    ATTRIBUTES: ClassVar[dict[str, tuple[str, ...]]] = {
        "species": ("cat", "dog"), "fur_colour": tuple(_FUR), "pattern": ("solid", "spots", "stripes"),
        "ear_shape": ("pointy", "floppy", "round"), "eye_colour": tuple(_PET_EYES),
    }  # fmt: skip


Identity = FaceIdentity | PetIdentity
_CLASSES: dict[str, type[FaceIdentity] | type[PetIdentity]] = {"faces": FaceIdentity, "pets": PetIdentity}


@dataclass(frozen=True)
class Context:
    """What the caption controls: a scene (``SCENES`` or ``"plain"``) and an optional style."""

    scene: str
    style: str | None = None

    def __post_init__(self) -> None:
        if (self.scene not in SCENES and self.scene != "plain") or self.style not in STYLES:
            raise ValueError(f"bad context {self}: scene in {[*SCENES, 'plain']}, style in {STYLES}")

    def to_label(self) -> dict[str, str | None]:
        """``{"scene": ..., "style": ...}``."""
        return asdict(self)

    @classmethod
    def from_label(cls, label: dict[str, Any]) -> Context:
        """Inverse of :meth:`to_label`."""
        return cls(label["scene"], label.get("style"))


def contexts() -> list[Context]:
    """Every captionable context (scenes x styles), in a fixed order."""
    return [Context(scene, style) for style in STYLES for scene in SCENES]


@dataclass(frozen=True)
class Nuisance:
    """Per-image variation that is neither identity nor context."""

    dx: float  # horizontal shift, fraction of the image side
    dy: float
    scale: float  # subject size, fraction of the image side
    angle: float  # degrees, counter-clockwise
    expression: str

    @classmethod
    def sample(cls, seed: int) -> Nuisance:
        """Draw a nuisance from ``seed`` (deterministic)."""
        r = random.Random(f"nuisance-{seed}")
        dx, dy, scale, angle = (
            r.uniform(a, b) for a, b in ((-0.08, 0.08), (-0.06, 0.06), (0.66, 0.8), (-12, 12))
        )
        return cls(dx, dy, scale, angle, r.choice(EXPRESSIONS))


def identity_class(domain: str) -> type[FaceIdentity] | type[PetIdentity]:
    """The identity dataclass of ``domain`` (``"faces"`` or ``"pets"``)."""
    if domain not in _CLASSES:
        raise ValueError(f"unknown domain {domain!r}: expected one of {DOMAINS}")
    return _CLASSES[domain]


def identities(domain: str) -> list[Identity]:
    """All identities of ``domain``: the product of its attribute values, in a fixed order."""
    cls = identity_class(domain)
    return [cls(*values) for values in product(*cls.ATTRIBUTES.values())]


def split_identities(
    domain: str, held_out_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Identity], list[Identity]]:
    """Deterministic disjoint (train, held_out) split of :func:`identities`, each in canonical order."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction={held_out_fraction} must be in (0, 1)")
    everyone = identities(domain)
    order = list(range(len(everyone)))
    random.Random(f"split-{domain}-{seed}").shuffle(order)
    held = set(order[: round(len(everyone) * held_out_fraction)])
    train = [ident for i, ident in enumerate(everyone) if i not in held]
    return train, [ident for i, ident in enumerate(everyone) if i in held]


def caption(domain_or_pair: str, context: Context, token: str | tuple[str, str] | None = None) -> str:
    """The caption of a render: class words (or subject tokens) and context, never identity.

    ``domain_or_pair`` is ``"faces"``, ``"pets"`` or ``"pair"`` (a person and a pet); for a pair
    ``token`` is a ``(person_token, pet_token)`` tuple. ``"a photo of a <person> at the beach"``.
    """
    if token is not None and isinstance(token, tuple) != (domain_or_pair == "pair"):
        raise ValueError(
            f"{domain_or_pair!r} captions take {'a token pair' if domain_or_pair == 'pair' else 'one token'}"
        )
    # A token takes its class word's place after the article ("a <person>"), so replacing the token by its
    # class word gives back exactly the caption the base model was trained on.
    if domain_or_pair == "pair":
        subject = "a person and a pet" if token is None else f"a {token[0]} and a {token[1]}"
    else:
        subject = f"a {token or CLASS_WORDS[identity_class(domain_or_pair).DOMAIN]}"
    medium = {None: "a photo", "sketch": "a sketch", "painting": "a painting"}[context.style]
    text = f"{medium} of {subject}"
    return text if context.scene == "plain" else f"{text} {SCENES[context.scene]}"


_MEDIUMS: dict[str, str | None] = {
    "a photo of ": None,
    "a sketch of ": "sketch",
    "a painting of ": "painting",
}
# What may stand between "of" and the scene: one or two subjects joined by "and", each a class word with
# its article ("a person") or one word (a token such as "<person>", or a bare class word).
_SUBJECTS = re.compile(r"(?:a \S+|\S+)(?: and (?:a \S+|\S+))?")


def parse_caption(text: str) -> Context:
    """The :class:`Context` a caption asks for: the inverse of :func:`caption` for its context part.

    Subject tokens and class words are ignored, so ``"a sketch of a <person> and a <pet> in the city"``
    and ``"a sketch of a pet in the city"`` both give ``Context("city", "sketch")``; a caption
    without a scene phrase is the ``plain`` scene.

    Raises:
        ValueError: ``text`` is not in the world's caption phrasing (unknown medium or scene).
    """
    words = " ".join(text.split())
    medium = next((m for m in _MEDIUMS if words.startswith(m)), None)
    if medium is None:
        raise ValueError(
            f"caption {text!r} does not start with one of {[m.strip() for m in _MEDIUMS]} "
            "(the toy world's phrasing, see nested.toyworld.caption)"
        )
    rest = words[len(medium) :]
    for scene, phrase in SCENES.items():
        # The subject must be non-empty, so the phrase has to follow at least one word.
        if rest.endswith(f" {phrase}") and _SUBJECTS.fullmatch(rest[: -len(phrase) - 1]):
            return Context(scene, _MEDIUMS[medium])
    if _SUBJECTS.fullmatch(rest):
        return Context("plain", _MEDIUMS[medium])
    raise ValueError(
        f"caption {text!r} names no known scene: expected it to end with one of {list(SCENES.values())}"
    )


def _shade(colour: RGB, factor: float) -> RGB:
    """Darker (factor < 1) or lighter (towards white, factor > 1) version of ``colour``."""
    if factor <= 1:
        return tuple(int(c * factor) for c in colour)  # type: ignore[return-value]
    t = min(1.0, factor - 1)
    return tuple(int(c + (255 - c) * t) for c in colour)  # type: ignore[return-value]


def _draw_background(draw: ImageDraw.ImageDraw, scene: str, s: int, rng: random.Random) -> None:
    """Paint ``scene`` over the whole ``s`` x ``s`` canvas; random details come from ``rng``."""
    flat = {"red": (205, 45, 45), "blue": (45, 75, 205), "green": (45, 165, 65), "plain": (228, 228, 228)}
    if scene in flat:
        draw.rectangle((0, 0, s, s), fill=flat[scene])
    elif scene == "beach":
        draw.rectangle((0, 0, s, s * 0.45), fill=(150, 205, 245))
        draw.rectangle((0, s * 0.45, s, s * 0.62), fill=(30, 105, 175))
        draw.rectangle((0, s * 0.62, s, s), fill=(238, 212, 150))
        draw.ellipse((s * 0.78, s * 0.05, s * 0.94, s * 0.21), fill=(255, 220, 60))
    elif scene == "snow":
        draw.rectangle((0, 0, s, s * 0.6), fill=(190, 205, 222))
        draw.rectangle((0, s * 0.6, s, s), fill=(250, 250, 255))
        for _ in range(40):
            x, y, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(s * 0.008, s * 0.018)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 255))
    elif scene == "night":
        draw.rectangle((0, 0, s, s), fill=(12, 16, 48))
        for _ in range(30):
            x, y, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(s * 0.004, s * 0.01)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 250, 190))
        draw.ellipse((s * 0.06, s * 0.05, s * 0.2, s * 0.19), fill=(245, 240, 200))
    elif scene == "grass":
        draw.rectangle((0, 0, s, s * 0.4), fill=(170, 215, 245))
        draw.rectangle((0, s * 0.4, s, s), fill=(70, 150, 40))
        for _ in range(50):
            x, y = rng.uniform(0, s), rng.uniform(s * 0.42, s)
            draw.line((x, y, x + rng.uniform(-6, 6), y - s * 0.04), fill=(40, 110, 25), width=3)
    elif scene == "city":
        draw.rectangle((0, 0, s, s), fill=(175, 180, 190))
        x = -rng.uniform(0, s * 0.1)
        while x < s:
            w, h = rng.uniform(s * 0.12, s * 0.22), rng.uniform(s * 0.35, s * 0.8)
            draw.rectangle((x, s - h, x + w, s), fill=(70, 72, 85))
            for wy in range(int(s - h + s * 0.04), s - 4, int(s * 0.07)):
                for wx in range(int(x + s * 0.03), int(x + w - s * 0.03), int(s * 0.06)):
                    draw.rectangle((wx, wy, wx + s * 0.025, wy + s * 0.03), fill=(250, 215, 90))
            x += w + rng.uniform(s * 0.01, s * 0.04)
        draw.rectangle((0, s * 0.92, s, s), fill=(55, 55, 60))
    else:
        raise ValueError(f"unknown scene {scene!r}")


def _draw_mouth(draw: ImageDraw.ImageDraw, expression: str, cx: float, y: float, w: float) -> None:
    if expression == "smile":
        draw.arc((cx - w, y - w * 0.8, cx + w, y + w * 0.6), 20, 160, fill=(90, 20, 20), width=6)
    elif expression == "neutral":
        draw.line((cx - w * 0.7, y + w * 0.3, cx + w * 0.7, y + w * 0.3), fill=(90, 20, 20), width=6)
    else:
        draw.ellipse((cx - w * 0.5, y - w * 0.2, cx + w * 0.5, y + w * 0.8), fill=(110, 20, 30))


def _eye(draw: ImageDraw.ImageDraw, x: float, y: float, iris: RGB, slit: bool = False) -> None:
    draw.ellipse((x - 16, y - 12, x + 16, y + 12), fill=(255, 255, 255), outline=(30, 30, 30), width=2)
    draw.ellipse((x - 9, y - 9, x + 9, y + 9), fill=iris)
    pupil = (x - 2, y - 8, x + 2, y + 8) if slit else (x - 4, y - 4, x + 4, y + 4)
    draw.ellipse(pupil, fill=(10, 10, 10))


def _draw_face(draw: ImageDraw.ImageDraw, ident: FaceIdentity, expression: str) -> None:
    """A cartoon face on the ``_L`` x ``_L`` subject layer."""
    skin, hair = _SKIN[ident.skin], _HAIR[ident.hair_colour]
    outline = (40, 30, 30)
    boxes = {"round": (62, 58, 194, 204), "oval": (78, 40, 178, 214), "square": (66, 60, 190, 204)}
    box = boxes[ident.face_shape]
    x0, y0, x1, y1 = box
    if ident.hair_style == "long":
        draw.rounded_rectangle((x0 - 16, y0 - 6, x1 + 16, 244), 40, fill=hair, outline=outline, width=2)
    mid = (y0 + y1) / 2
    draw.ellipse((x0 - 14, mid - 18, x0 + 14, mid + 18), fill=skin, outline=outline, width=2)
    draw.ellipse((x1 - 14, mid - 18, x1 + 14, mid + 18), fill=skin, outline=outline, width=2)
    if ident.face_shape == "square":
        draw.rounded_rectangle(box, radius=26, fill=skin, outline=outline, width=3)
    else:
        draw.ellipse(box, fill=skin, outline=outline, width=3)
    if ident.hair_style != "bald":
        draw.pieslice((x0 - 6, y0 - 12, x1 + 6, y0 + 88), 180, 360, fill=hair, outline=outline, width=2)
    if ident.hair_style == "spiky":
        for i in range(5):
            a, b = x0 + (x1 - x0) * i / 5, x0 + (x1 - x0) * (i + 1) / 5
            draw.polygon([(a, y0 + 24), ((a + b) / 2, y0 - 34), (b, y0 + 24)], fill=hair, outline=outline)
    if ident.hair_style == "long":
        draw.rectangle((x0 - 6, y0 + 30, x0 + 12, y1 - 30), fill=hair)
        draw.rectangle((x1 - 12, y0 + 30, x1 + 6, y1 - 30), fill=hair)
    if ident.hair_style == "bald":  # side tufts keep the hair colour visible
        draw.chord((x0 - 8, y0 + 20, x0 + 26, y0 + 80), 90, 270, fill=hair, outline=outline)
        draw.chord((x1 - 26, y0 + 20, x1 + 8, y0 + 80), 270, 90, fill=hair, outline=outline)
    draw.line((96, 106, 120, 102), fill=hair, width=8)  # eyebrows in the hair colour
    draw.line((136, 102, 160, 106), fill=hair, width=8)
    eyes = _FACE_EYES[ident.eye_colour]
    _eye(draw, 106, 124, eyes)
    _eye(draw, 150, 124, eyes)
    draw.line((128, 132, 122, 154, 132, 156), fill=_shade(skin, 0.6), width=4)
    _draw_mouth(draw, expression, 128, 172, 22)


def _draw_pet(draw: ImageDraw.ImageDraw, ident: PetIdentity, expression: str) -> None:
    """A cartoon cat or dog head on the ``_L`` x ``_L`` subject layer."""
    fur = _FUR[ident.fur_colour]
    dark_fur = sum(fur) < 300
    mark = _shade(fur, 1.5) if dark_fur else _shade(fur, 0.55)
    outline = (30, 25, 25) if not dark_fur else (90, 90, 95)
    cat = ident.species == "cat"
    box = (56, 72, 200, 208) if cat else (60, 58, 196, 220)
    x0, y0, x1, y1 = box
    if ident.ear_shape == "pointy":
        for sgn, ex in ((1, x0 + 12), (-1, x1 - 12)):
            draw.polygon([(ex, y0 + 46), (ex + sgn * 8, y0 - 52), (ex + sgn * 62, y0 + 10)], fur, outline)
            inner = [(ex + sgn * 12, y0 + 30), (ex + sgn * 14, y0 - 28), (ex + sgn * 46, y0 + 10)]
            draw.polygon(inner, fill=(235, 160, 170))
    elif ident.ear_shape == "round":
        draw.ellipse((x0 - 6, y0 - 34, x0 + 56, y0 + 28), fill=fur, outline=outline, width=2)
        draw.ellipse((x1 - 56, y0 - 34, x1 + 6, y0 + 28), fill=fur, outline=outline, width=2)
    draw.ellipse(box, fill=fur, outline=outline, width=3)
    if ident.ear_shape == "floppy":
        draw.ellipse((x0 - 28, y0 + 2, x0 + 24, y0 + 110), fill=_shade(fur, 0.75), outline=outline, width=2)
        draw.ellipse((x1 - 24, y0 + 2, x1 + 28, y0 + 110), fill=_shade(fur, 0.75), outline=outline, width=2)
    if ident.pattern == "spots":
        for sx, sy, r in ((92, 104, 13), (166, 96, 11), (150, 190, 10), (96, 184, 9), (128, 86, 8)):
            draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=mark)
    elif ident.pattern == "stripes":
        for sx in (104, 128, 152):
            draw.line((sx, y0 + 6, sx + (sx - 128) * 0.2, y0 + 44), fill=mark, width=9)
        for sy in (150, 168):
            draw.line((x0 + 4, sy, x0 + 30, sy + 4), fill=mark, width=7)
            draw.line((x1 - 4, sy, x1 - 30, sy + 4), fill=mark, width=7)
    eyes = _PET_EYES[ident.eye_colour]
    _eye(draw, 102, 128, eyes, slit=cat)
    _eye(draw, 154, 128, eyes, slit=cat)
    if cat:
        draw.polygon([(118, 150), (138, 150), (128, 162)], fill=(235, 130, 150))
        for dy in (-6, 4, 14):
            draw.line((112, 162, 66, 156 + dy), fill=outline, width=2)
            draw.line((144, 162, 190, 156 + dy), fill=outline, width=2)
        _draw_mouth(draw, expression, 128, 176, 14)
    else:
        draw.ellipse((96, 146, 160, 204), fill=_shade(fur, 1.35), outline=outline, width=2)
        draw.ellipse((112, 148, 144, 170), fill=(15, 15, 15))
        _draw_mouth(draw, expression, 128, 182, 16)


def _paste_subject(
    canvas: Image.Image, identity: Identity, nuisance: Nuisance, cx: float, cy: float, side: float
) -> None:
    """Paste ``identity`` centred at (cx, cy) (+ jitter) with side ``side`` x nuisance scale (pixels)."""
    layer = Image.new("RGBA", (_L, _L), (0, 0, 0, 0))
    if isinstance(identity, FaceIdentity):
        _draw_face(ImageDraw.Draw(layer), identity, nuisance.expression)
    else:
        _draw_pet(ImageDraw.Draw(layer), identity, nuisance.expression)
    layer = layer.rotate(nuisance.angle, resample=Image.Resampling.BICUBIC)
    px = max(8, round(side * nuisance.scale))
    layer = layer.resize((px, px), Image.Resampling.LANCZOS)
    x = round(cx + nuisance.dx * side - px / 2)
    y = round(cy + nuisance.dy * side - px / 2)
    canvas.paste(layer, (x, y), layer)


def _apply_style(image: Image.Image, style: str | None) -> Image.Image:
    if style is None:
        return image
    if style == "sketch":
        edges = image.convert("L").filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 40 else 0)
        tinted = Image.blend(image, Image.new("RGB", image.size, (255, 255, 255)), 0.7)
        tinted.paste((25, 25, 25), (0, 0), edges)
        return tinted
    if style == "painting":
        return ImageOps.posterize(image.filter(ImageFilter.MedianFilter(3)), 3)
    raise ValueError(f"unknown style {style!r}")


def render(identity: Identity, context: Context, *, seed: int, size: int = 64) -> Image.Image:
    """One RGB ``size`` x ``size`` image of ``identity`` in ``context``; nuisance from ``seed``."""
    s = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (s, s))
    _draw_background(ImageDraw.Draw(canvas), context.scene, s, random.Random(f"background-{seed}"))
    _paste_subject(canvas, identity, Nuisance.sample(seed), s / 2, s / 2, s)
    return _apply_style(canvas.resize((size, size), Image.Resampling.LANCZOS), context.style)


def render_pair(
    face_identity: FaceIdentity, pet_identity: PetIdentity, context: Context, seed: int, size: int = 64
) -> Image.Image:
    """A person in the left half and a pet in the right half of one scene."""
    s = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (s, s))
    _draw_background(ImageDraw.Draw(canvas), context.scene, s, random.Random(f"background-{seed}"))
    for ident, nuisance_seed, cx in ((face_identity, seed, s / 4), (pet_identity, seed + 7919, 3 * s / 4)):
        n = Nuisance.sample(nuisance_seed)  # bigger subject, less jitter: it stays in its half
        n = Nuisance(n.dx * 0.5, n.dy, min(0.95, n.scale * 1.2), n.angle, n.expression)
        _paste_subject(canvas, ident, n, cx, s / 2, s / 2)
    return _apply_style(canvas.resize((size, size), Image.Resampling.LANCZOS), context.style)


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of ``image`` (deterministic)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_world_shards(
    out: str | Path,
    domain: str,
    *,
    identities: Sequence[Identity],
    samples_per_identity: int,
    seed: int,
    token: str | None = None,
    contexts_: Sequence[Context] | None = None,
    size: int = 64,
    maxcount: int = 1000,
    overwrite: bool = False,
) -> ShardReport:
    """Write webdataset shards of the world in the ``nested.data.shards`` format, with ``shards.json``.

    Each sample: ``png`` (the identity in a random context from ``contexts_``, default all of
    :func:`contexts`), ``ref.png`` (the same identity on the plain background, another nuisance
    seed) and ``json`` with ``caption`` (using ``token``, default ``DEFAULT_TOKENS[domain]``),
    ``domain``, ``subject``, ``identity`` (label dict), ``identity_indices``, ``context`` (label
    dict), ``original_size`` and the two render seeds. Same arguments -> same samples.
    """
    cls = identity_class(domain)
    if samples_per_identity < 1:
        raise ValueError(f"samples_per_identity={samples_per_identity} must be >= 1")
    if any(not isinstance(ident, cls) for ident in identities):
        raise ValueError(f"every identity must be a {cls.__name__} for domain {domain!r}")
    token = token or DEFAULT_TOKENS[domain]
    choices = list(contexts_) if contexts_ is not None else contexts()
    out = Path(out)
    old = prepare_out(out, domain, overwrite)
    staging = staging_folder(out, domain)  # swapped in for the old shards when complete
    sink = ShardSink(staging, domain, maxcount, 512 * 1024**2)
    index = 0
    try:
        for ident in identities:
            label = ident.to_label()
            for j in range(samples_per_identity):
                rng = random.Random(f"{seed}-{domain}-{'-'.join(label.values())}-{j}")
                context = rng.choice(choices)
                target_seed, ref_seed = rng.getrandbits(31), rng.getrandbits(31)
                meta = {
                    "caption": caption(domain, context, token), "domain": domain, "subject": token,
                    "identity": label, "identity_indices": ident.indices(), "context": context.to_label(),
                    "original_size": [size, size], "seed": target_seed, "ref_seed": ref_seed,
                }  # fmt: skip
                target = png_bytes(render(ident, context, seed=target_seed, size=size))
                ref = png_bytes(render(ident, Context("plain"), seed=ref_seed, size=size))
                key, data = f"{index:07d}_{domain}", json.dumps(meta).encode("utf-8")
                sink.write({"__key__": key, "png": target, "ref.png": ref, "json": data})
                index += 1
        shards = sink.close()
        created = datetime.fromtimestamp(build_time(), timezone.utc).isoformat(timespec="seconds")
        index_data = {
            "version": 1, "domain": domain, "subject": token, "created": created, "shards": shards,
            "total_samples": index, "rejected": 0,
        }  # fmt: skip
        (staging / INDEX_NAME).write_text(json.dumps(index_data, indent=2) + "\n", encoding="utf-8")
        swap_files(out, [*(staging / s["url"] for s in shards), staging / INDEX_NAME], old)
    except BaseException:
        sink.abort()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ShardReport(out=out, index=out / INDEX_NAME, shards=shards, total_samples=index)

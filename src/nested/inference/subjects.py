"""Subjects of a :class:`~nested.inference.NestedPipeline` call, and the pipeline state adapters change.

* :class:`Subject` and :func:`load_image`: one token's image(s) and options (checked: finite numbers, a
  strength outside :data:`STRENGTH_RANGE` warns), and image normalisation. Image files open through
  :func:`nested.image_files.open_image`, which names a damaged file or a decompression bomb.
* The snapshot of the tokenizers / text encoders taken before placeholder tokens are added, so that
  ``NestedPipeline.unload`` restores them exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from nested.attention import check_token_weight, check_value_norm_factor
from nested.errors import ConfigError, DataError
from nested.image_files import UnusablePixels, check_image_file, open_image, to_rgb, upright
from nested.tokens import set_token_embedding

__all__ = [
    "STRENGTH_RANGE",
    "ImageInput",
    "Snapshot",
    "Subject",
    "check_finite",
    "check_strength",
    "load_image",
    "restore_snapshot",
    "subject_images",
    "subject_specs",
    "take_snapshot",
]


ImageInput = Union["PIL.Image.Image", str, os.PathLike, Tensor, np.ndarray]  # noqa: F821

# The strengths adapters are made for: 0 is the plain prompt, 1 the subject, above 1 extrapolates past it
# (the toy world's evaluations use 1.5). Outside this range images usually break down: it warns.
STRENGTH_RANGE = (0.0, 2.0)


def check_finite(value: float, source: str) -> float:
    """``value`` as a float if it is a finite number; NaN or infinity is a ConfigError naming ``source``
    (either would silently turn every image black)."""
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{source} must be a finite number, got {value}.")
    return number


def check_strength(value: float, token: str) -> float:
    """``token``'s strength: finite (else a ConfigError); outside :data:`STRENGTH_RANGE` it warns.

    The warning is raised from here (not the caller's line), so the same strength of the same token warns
    once, however many calls use it.
    """
    strength = check_finite(value, f"the strength of {token!r}")
    low, high = STRENGTH_RANGE
    if not low <= strength <= high:
        warnings.warn(
            f"the strength of {token!r} ({strength:g}) is outside [{low:g}, {high:g}], the range adapters are "
            "made for (0: the plain prompt, 1: the subject); images may break down.",
            UserWarning,
            stacklevel=1,
        )
    return strength


@dataclass
class Subject:
    """One token's subject for a call: its image(s) and how strongly it acts.

    Attributes:
        image: a PIL image, an image file path, a (3, H, W) / (1, 3, H, W) tensor in [0, 1] (uint8 in
            [0, 255] also accepted) or an (H, W, 3) array; or a list with one image per prompt.
        scale: blend of the subject token's value: 0 -> the plain text value, 1 -> the nested value.
            For an adapter with ``injection: "decoupled"``: the weight of its added image attention.
            Every number here must be finite; a scale outside :data:`STRENGTH_RANGE` warns.
        token_weight: multiplies the attention probability of the subject column (the official demo's
            ``special_token_weight``); > 1 strengthens the subject's presence. None: the weight the adapter
            was trained with (1 unless trained with ``model.token_weight``). Nested adapters only.
        value_norm_factor: rescales the nested values to ``factor * ||V_s||``; None: the adapter's default.
            Nested adapters only.
    """

    image: ImageInput | Sequence[ImageInput]
    scale: float = 1.0
    token_weight: float | None = None
    value_norm_factor: float | None = None

    def __post_init__(self) -> None:
        self.scale = check_finite(self.scale, "scale")
        if self.token_weight is not None:
            self.token_weight = check_token_weight(check_finite(self.token_weight, "token_weight"))
        if self.value_norm_factor is not None:
            self.value_norm_factor = check_value_norm_factor(
                check_finite(self.value_norm_factor, "value_norm_factor"),
                "value_norm_factor",
                zero_turns_off=True,
            )


def load_image(image: ImageInput, name: str = "subject") -> Tensor:
    """Any supported image -> (1, 3, H, W) float32 RGB in [0, 1].

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an unsupported type, shape or value range; an image file that is damaged, not an
            image, or a decompression bomb (:class:`nested.image_files.ImageFileError`, naming the file).
    """

    if isinstance(image, (str, os.PathLike)):
        image = open_image(check_image_file(image, f"the image for {name}")).rgb
    if isinstance(image, Image.Image):  # as a file is read: upright by its EXIF tag, transparency on white
        try:
            image = np.asarray(to_rgb(upright(image)))
        except UnusablePixels as error:
            raise DataError(f"the image for {name}: {error}.") from None
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise DataError(f"the image array for {name} must be (H, W, 3), got {image.shape}.")
        image = torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1)  # a writable copy
    if not isinstance(image, Tensor):
        raise ConfigError(
            f"the image for {name} must be a PIL image, a file path, a tensor or an array; got {type(image).__name__}."
        )
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise DataError(
            f"the image tensor for {name} must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}."
        )
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    image = image.float()
    if image.min() < -1e-3 or image.max() > 1 + 1e-3:
        raise DataError(
            f"the image tensor for {name} must hold values in [0, 1], got [{image.min():.3g}, {image.max():.3g}]."
        )
    return image.clamp(0, 1)


def subject_specs(
    subjects: Mapping[str, ImageInput | Subject | Sequence[ImageInput]],
    strengths: Mapping[str, float] | None,
    token_weights: Mapping[str, float] | None,
    value_norm_factors: Mapping[str, float] | None,
) -> dict[str, Subject]:
    """token -> its :class:`Subject` with the per-token options applied.

    Raises:
        ValueError: an option for a token that has no subject.
    """
    options = {
        "strengths": strengths,
        "token_weights": token_weights,
        "value_norm_factors": value_norm_factors,
    }
    for option, values in options.items():
        for token in values or {}:
            if token not in subjects:
                raise ConfigError(f"{option} has an entry for {token!r}, which has no subject image.")
    specs = {  # copies: the caller's Subject objects are never modified
        token: dataclasses.replace(value) if isinstance(value, Subject) else Subject(image=value)
        for token, value in subjects.items()
    }
    # Checked here too, so that a message names the token (dataclasses.replace runs Subject's own checks).
    for token, value in (strengths or {}).items():
        specs[token] = dataclasses.replace(specs[token], scale=check_finite(value, f"strengths[{token!r}]"))
    for token, value in (value_norm_factors or {}).items():
        source = f"value_norm_factors[{token!r}]"
        value = check_value_norm_factor(check_finite(value, source), source, zero_turns_off=True)
        specs[token] = dataclasses.replace(specs[token], value_norm_factor=value)
    for token, value in (token_weights or {}).items():
        value = check_token_weight(
            check_finite(value, f"token_weights[{token!r}]"), f"token_weights[{token!r}]"
        )
        specs[token] = dataclasses.replace(specs[token], token_weight=value)
    for token, spec in specs.items():
        check_strength(spec.scale, token)
    return specs


def subject_images(raw: ImageInput | Sequence[ImageInput], token: str, prompts: list[str]) -> list[Tensor]:
    """The loaded image(s) of ``token``: one for every prompt, or one per prompt."""
    many = isinstance(raw, (list, tuple))
    if many and len(raw) != len(prompts):
        raise ConfigError(
            f"{len(raw)} images for {token!r} but {len(prompts)} prompts: pass one image, or one per prompt."
        )
    return [load_image(item, token) for item in (raw if many else [raw])]


@dataclass
class TextEncoderState:
    """What adding a placeholder changes on a text encoder, to put it back exactly."""

    weight: torch.nn.Parameter
    data: Tensor  # resizing may swap the Parameter's data in place: keep the original storage too
    num_embeddings: int
    vocab_size: int
    eos_token_ids: dict[str, Any]
    had_vocab_size_attr: bool
    vocab_size_attr: Any = None


@dataclass
class Snapshot:
    tokenizers: dict[str, Any] = field(default_factory=dict)  # attribute name -> original tokenizer
    text_encoders: dict[str, TextEncoderState] = field(default_factory=dict)
    rows: list[tuple[str, int, Tensor]] = field(default_factory=list)  # overwritten pre-existing rows


def text_encoder_state(text_encoder: torch.nn.Module) -> TextEncoderState:
    embedding = text_encoder.get_input_embeddings()
    eos = {"config": text_encoder.config.eos_token_id}
    if hasattr(text_encoder, "eos_token_id"):
        eos["self"] = text_encoder.eos_token_id
    inner = getattr(text_encoder, "text_model", None)
    if inner is not None and hasattr(inner, "eos_token_id"):
        eos["text_model"] = inner.eos_token_id
    return TextEncoderState(
        weight=embedding.weight,
        data=embedding.weight.data,
        num_embeddings=embedding.num_embeddings,
        vocab_size=text_encoder.config.vocab_size,
        eos_token_ids=eos,
        had_vocab_size_attr="vocab_size" in vars(text_encoder),
        vocab_size_attr=vars(text_encoder).get("vocab_size"),
    )


def restore_text_encoder(text_encoder: torch.nn.Module, state: TextEncoderState) -> None:
    embedding = text_encoder.get_input_embeddings()
    # In the dtype and on the device the pipeline was moved to since (pipe.to(...)); the same storage if none.
    state.weight.data = state.data.to(state.weight.device, state.weight.dtype)
    embedding.weight = state.weight
    embedding.num_embeddings = state.num_embeddings
    text_encoder.config.vocab_size = state.vocab_size
    text_encoder.config.eos_token_id = state.eos_token_ids["config"]
    if "self" in state.eos_token_ids:
        text_encoder.eos_token_id = state.eos_token_ids["self"]
    if "text_model" in state.eos_token_ids:
        text_encoder.text_model.eos_token_id = state.eos_token_ids["text_model"]
    if state.had_vocab_size_attr:
        text_encoder.vocab_size = state.vocab_size_attr
    elif "vocab_size" in vars(text_encoder):
        del text_encoder.vocab_size


def take_snapshot(pipe: Any, text_pairs: list[tuple[str, str, Any, torch.nn.Module]]) -> Snapshot:
    """Swap in private copies of the tokenizers and remember the text encoders' embedding state."""
    snapshot = Snapshot()
    for tokenizer_attr, encoder_attr, tokenizer, text_encoder in text_pairs:
        snapshot.tokenizers[tokenizer_attr] = tokenizer
        snapshot.text_encoders[encoder_attr] = text_encoder_state(text_encoder)
        setattr(pipe, tokenizer_attr, copy.deepcopy(tokenizer))
    return snapshot


def restore_snapshot(pipe: Any, snapshot: Snapshot) -> None:
    """Put the original tokenizers, text encoder embeddings and overwritten rows back on ``pipe``."""
    for attr, tokenizer in snapshot.tokenizers.items():
        setattr(pipe, attr, tokenizer)
    for attr, state in snapshot.text_encoders.items():
        restore_text_encoder(getattr(pipe, attr), state)
    for attr, token_id, row in reversed(snapshot.rows):
        set_token_embedding(getattr(pipe, attr), token_id, row)

"""Evaluation metrics: identity similarity and prompt alignment, as torchmetrics ``Metric``s.

The paper's central claim is a better balance between keeping the subject's identity and following the
prompt. Both sides are measured per generated image:

* :class:`IdentitySimilarity`: cosine similarity between an image embedding of the generated subject and
  one of its reference image (in [-1, 1]; 1 = same embedding). The embedder is pluggable: any callable
  ``(B, 3, H, W) [0, 1] -> (B, D)``; :func:`vision_embedder` loads a CLIP vision model (projected
  ``image_embeds``) or DINOv2 (the CLS token) from a folder or hub id, with its own normalisation (for
  pets). For faces, :class:`FaceEmbedder` finds the face, aligns it and embeds it with dlib's
  face-recognition model; an embedder that finds its subject or not returns ``(embeddings, found)``, and an
  image where it finds none scores 0 (no identity credit) and counts against the detection rate.
* :class:`PromptAlignment`: CLIP text-image score (``max(100 * cos, 0)``, torchmetrics' ``CLIPScore``) with
  a locally loaded CLIP (:func:`load_clip`), made to work with transformers 5 (whose
  ``get_image_features`` / ``get_text_features`` return output objects, torchmetrics #3407).

Both keep one value per sample in a ``"cat"`` state, so under DDP ``compute()`` (the mean) and
``per_sample()`` (all values, rank-major order) cover the samples of every process. Both also have a
stateless ``score_batch(...)`` that returns the per-sample values of one batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.multimodal.clip_score import CLIPScore
from torchmetrics.utilities import dim_zero_cat
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

from nested.encoder import CLIP_MEAN, CLIP_STD, FrozenModules
from nested.errors import ConfigError, DataError, MissingFileError

__all__ = [
    "FACE_EMBEDDER",
    "ClipFeatures",
    "FaceEmbedder",
    "IdentitySimilarity",
    "PromptAlignment",
    "VisionEmbedder",
    "crop_boxes",
    "identity_embedder",
    "load_clip",
    "vision_embedder",
]

Embedder = Callable[[Tensor], Tensor]
Box = Sequence[float]


# ----------------------------------------------------------------------------- image helpers


def _check_images(images: Tensor, name: str) -> Tensor:
    """(B, 3, H, W) float in [0, 1] (uint8 in [0, 255] accepted) -> float32."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a (B, 3, H, W) RGB tensor in [0, 1], got {shape}.")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def _resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def crop_boxes(images: Tensor, boxes: Sequence[Box | None] | Tensor, size: int | None = None) -> Tensor:
    """Crop each image to its box and resize the crops to one size.

    Args:
        images: (B, 3, H, W).
        boxes: B boxes ``(x0, y0, x1, y1)`` in pixels of the image (clipped to it), or None for the whole
            image; a (B, 4) tensor works too.
        size: side of the (square) output; default ``min(H, W)``.

    Returns:
        (B, 3, size, size).
    """
    if len(boxes) != images.shape[0]:
        raise ValueError(
            f"{len(boxes)} boxes for {images.shape[0]} images: pass one box (or None) per image."
        )
    height, width = images.shape[-2:]
    size = size or min(height, width)
    crops = []
    for image, box in zip(images, boxes, strict=True):
        if box is None:
            crops.append(_resize(image[None], (size, size)))
            continue
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, x1 = max(0, math.floor(x0)), min(width, math.ceil(x1))
        y0, y1 = max(0, math.floor(y0)), min(height, math.ceil(y1))
        if x1 <= x0 or y1 <= y0:
            raise ValueError(
                f"box {tuple(box)} is empty inside a {width}x{height} image: expected (x0, y0, x1, y1) in pixels "
                "with x0 < x1 and y0 < y1."
            )
        crops.append(_resize(image[None, :, y0:y1, x0:x1], (size, size)))
    return torch.cat(crops)


# ----------------------------------------------------------------------------- embedders


def _size_of(value: Any, key: str) -> int | None:
    """Read ``key`` from an image processor's size / crop_size (dict in transformers 4, SizeDict in 5)."""
    if value is None:
        return None
    found = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
    return int(found) if found else None


class VisionEmbedder(nn.Module):
    """A frozen vision model as an embedder: images (B, 3, H, W) in [0, 1] -> (B, D) embeddings.

    Preprocessing follows the model's image processor: resize the shorter side to ``resize`` (bicubic,
    antialiased), center-crop ``crop`` (h, w), normalise with ``mean`` / ``std``. The output is the model's
    ``image_embeds`` (CLIP with projection), else its ``pooler_output`` (DINOv2: the normalised CLS token),
    else the first token of ``last_hidden_state``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        crop: tuple[int, int] = (224, 224),
        resize: int | tuple[int, int] | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.crop = (int(crop[0]), int(crop[1]))
        self.resize = resize if resize is not None else min(self.crop)
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, crop_h, crop_w) normalised."""
        images = _check_images(images, "images")
        height, width = images.shape[-2:]
        if isinstance(self.resize, tuple):
            size = self.resize
        else:
            scale = self.resize / min(height, width)
            size = (max(self.resize, round(height * scale)), max(self.resize, round(width * scale)))
        images = _resize(images, size)
        top = max(0, (images.shape[-2] - self.crop[0]) // 2)
        left = max(0, (images.shape[-1] - self.crop[1]) // 2)
        images = images[..., top : top + self.crop[0], left : left + self.crop[1]]
        images = _resize(images, self.crop)  # only when the image was smaller than the crop
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        parameter = next(self.model.parameters())
        pixel_values = self.preprocess(images.to(parameter.device)).to(parameter.dtype)
        outputs = self.model(pixel_values=pixel_values)
        for name in ("image_embeds", "pooler_output"):
            value = getattr(outputs, name, None)
            if value is not None:
                return value.float()
        return outputs.last_hidden_state[:, 0].float()


def vision_embedder(
    name_or_path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> VisionEmbedder:
    """Load a CLIP vision model (projected ``image_embeds``) or DINOv2 (CLS) as an identity embedder.

    ``name_or_path``: a local folder or hub id, e.g. ``openai/clip-vit-large-patch14`` (a full CLIP: only
    its vision tower and projection are loaded), ``facebook/dinov2-base``, or ``h94/IP-Adapter`` with
    ``subfolder="models/image_encoder"``. Any other transformers vision model works through ``AutoModel``
    (its ``pooler_output``). The normalisation and crop come from the folder's image processor config.

    Raises:
        OSError: the model cannot be loaded (missing folder, or a hub id not cached when offline).
    """

    kwargs: dict[str, Any] = {"revision": revision, "subfolder": subfolder or ""}
    source = str(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise MissingFileError(
            f"could not load the identity model {source!r}: {str(error).rstrip('.')}. Pass a local folder with a Hugging Face "
            "vision model (config.json + weights; CLIP or DINOv2), or a hub id that is in the local cache."
        ) from error
    if not hasattr(getattr(config, "vision_config", config), "num_channels"):  # what every vision config has
        raise ConfigError(
            f"the identity model {source!r} is a {config.model_type} model, which takes no image: pass a vision "
            "model (CLIP, DINOv2) or 'face'."
        )
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if config.model_type == "clip":
        # A full CLIP or a vision tower with projection: the projected image_embeds. A bare CLIPVisionModel
        # checkpoint has no projection weights: use its pooled output instead of a random projection.
        bare = architecture == "CLIPVisionModel"
        model_class = transformers.CLIPVisionModel if bare else transformers.CLIPVisionModelWithProjection
    elif config.model_type == "siglip":
        model_class = transformers.SiglipVisionModel
    elif "Vision" in architecture and hasattr(transformers, architecture):
        model_class = getattr(transformers, architecture)
    else:
        model_class = AutoModel
    model = model_class.from_pretrained(source, dtype=dtype, **kwargs).to(device)

    vision_config = getattr(config, "vision_config", config)
    image_size = int(getattr(vision_config, "image_size", 224) or 224)
    crop, resize, mean, std = (image_size, image_size), None, CLIP_MEAN, CLIP_STD
    try:
        try:
            processor = AutoImageProcessor.from_pretrained(source, backend="pil", **kwargs)
        except TypeError:  # transformers 4: no backend argument
            processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    except (OSError, ValueError):
        processor = None
    if processor is not None:
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        crop_size = (
            getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        )
        size = getattr(processor, "size", None)
        shortest = _size_of(size, "shortest_edge")
        height, width = _size_of(size, "height"), _size_of(size, "width")
        if crop_size is not None and _size_of(crop_size, "height"):
            crop = (_size_of(crop_size, "height"), _size_of(crop_size, "width"))
            resize = shortest or ((height, width) if height and width else None)
        elif height and width:
            crop, resize = (height, width), (height, width)
        elif shortest:
            crop, resize = (shortest, shortest), shortest
    return VisionEmbedder(model, crop=crop, resize=resize, mean=mean, std=std)


FACE_EMBEDDER = "face"  # the name that selects FaceEmbedder (nested eval --identity-model face)


class FaceEmbedder:
    """Face identity: in each image, the subject's face, aligned and embedded by dlib's face-recognition model.

    ``images`` (B, 3, H, W) in [0, 1] -> ``(embeddings (B, 128), found (B,) bool)``. The face is the largest
    one the detector is confident about (:func:`nested.data.faces.choose_subject`, keeping the largest when
    several are alike); an image without one gets a zero row and ``found`` False. Needs ``nested[faces]``.
    """

    detects_subjects = True

    def __init__(self) -> None:
        from nested.data import faces  # dlib is imported only when faces are scored

        faces.load_models(recognition=True)
        self._faces = faces

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pixels = (_check_images(images, "images").clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        embeddings = torch.zeros(len(pixels), 128, dtype=torch.float64)
        found = torch.zeros(len(pixels), dtype=torch.bool)
        for index, array in enumerate(pixels):
            image = Image.fromarray(array)
            try:
                face = self._faces.choose_subject(self._faces.detect_faces(image), ambiguous="largest")
            except self._faces.FaceRejected:
                continue
            embeddings[index] = torch.from_numpy(self._faces.face_embedding(image, face))
            found[index] = True
        return embeddings.float(), found


def identity_embedder(
    name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu", **kwargs: Any
) -> Embedder | FaceEmbedder:
    """``"face"``: :class:`FaceEmbedder`; anything else: a vision model (:func:`vision_embedder`)."""
    if str(name_or_path) == FACE_EMBEDDER:
        return FaceEmbedder()
    return vision_embedder(name_or_path, device=device, **kwargs)


# ----------------------------------------------------------------------------- identity


class _SyncedValues:
    """Mixin: ``per_sample()`` gathers the ``"cat"`` list state ``values`` like ``compute()`` does."""

    values: list[Tensor]

    def per_sample(self) -> Tensor:
        """Every per-sample value seen so far, over all processes under DDP (rank-major order): (N,)."""
        with self.sync_context(  # type: ignore[attr-defined]
            dist_sync_fn=self.dist_sync_fn,  # type: ignore[attr-defined]
            should_sync=self._to_sync,  # type: ignore[attr-defined]
            should_unsync=self._should_unsync,  # type: ignore[attr-defined]
        ):
            values = self.values
            if isinstance(values, Tensor):  # after a sync, "cat" list states are one tensor
                return values.clone()
            return dim_zero_cat(values).clone() if values else torch.zeros(0)


class IdentitySimilarity(_SyncedValues, Metric):
    """Cosine similarity between the embeddings of generated subjects and their references.

    ``update(generated, reference, boxes=None, reference_boxes=None)``:
        generated: (B, 3, H, W) in [0, 1] (uint8 accepted).
        reference: (B, 3, h, w), or (1, 3, h, w) shared by the batch.
        boxes / reference_boxes: optional per-sample subject boxes ``(x0, y0, x1, y1)`` in pixels (None
            entries: the whole image); the crops are resized to ``crop_size``.

    ``compute()`` -> the mean (scalar); ``per_sample()`` -> (N,) values in [-1, 1].

    An embedder that finds its subject (:class:`FaceEmbedder`; ``detects_subjects``) returns
    ``(embeddings, found)``: a generated image where it finds none scores 0, whatever it shows (a blank
    image gets no identity credit), and ``detection_rate()`` is the fraction of generated images where it
    found one. A reference without one is an error (:meth:`check_references` names it).

    Args:
        embedder: images (B, 3, H, W) in [0, 1] -> (B, D), or -> ((B, D), (B,) bool found). An ``nn.Module``
            embedder is frozen and kept outside the metric's module tree (never in a ``state_dict``), but
            follows ``.to(device)``.
        crop_size: side of box crops before embedding (default: the image's shorter side).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    values: list[Tensor]
    detected: list[Tensor]

    def __init__(self, embedder: Embedder, crop_size: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if not callable(embedder):
            raise ValueError(
                f"embedder must be callable (images -> embeddings), got {type(embedder).__name__}."
            )
        self._frozen = FrozenModules(embedder=embedder) if isinstance(embedder, nn.Module) else None
        self.__dict__["_embedder"] = embedder  # not a submodule: never in state_dict() or parameters()
        self.crop_size = crop_size
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("detected", default=[], dist_reduce_fx="cat")

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> nn.Module:
        if getattr(self, "_frozen", None) is not None:
            self._frozen.apply(fn)
        return super()._apply(fn, *args, **kwargs)

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    @property
    def detects_subjects(self) -> bool:
        """Whether the embedder finds its subject (a face) and says so, or embeds any image."""
        return bool(getattr(self._embedder, "detects_subjects", False))

    def _embed(self, images: Tensor, boxes: Sequence[Box | None] | Tensor | None) -> tuple[Tensor, Tensor]:
        if boxes is not None:
            images = crop_boxes(images, boxes, self.crop_size)
        embeddings = self._embedder(images)
        found = torch.ones(images.shape[0], dtype=torch.bool)
        if isinstance(embeddings, tuple):
            embeddings, found = embeddings[0], torch.as_tensor(embeddings[1], dtype=torch.bool).cpu()
        if (
            not isinstance(embeddings, Tensor)
            or embeddings.ndim != 2
            or embeddings.shape[0] != images.shape[0]
        ):
            shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
            raise ValueError(
                f"the embedder must return (B, D) = ({images.shape[0]}, D) embeddings, got {shape}."
            )
        return embeddings.float(), found

    def check_references(self, images: Sequence[Tensor], names: Sequence[str]) -> None:
        """Raise a :class:`~nested.errors.DataError` naming the first reference (each (3, H, W) in [0, 1]) in
        which the embedder finds no subject: nothing generated from it could be scored."""
        if not self.detects_subjects:
            return
        for image, name in zip(images, names, strict=True):
            if not bool(self._embed(_check_images(image[None], "reference"), None)[1][0]):
                raise DataError(
                    f"reference {name}: the identity embedder finds no face in it (a reference photo is cut to "
                    "its centre square); use a photo where the face is visible, frontal and in that square (or crop "
                    "it around the face, or pass --align-face), or another --identity-model."
                )

    @torch.no_grad()
    def score_batch(
        self,
        generated: Tensor,
        reference: Tensor,
        boxes: Sequence[Box | None] | Tensor | None = None,
        reference_boxes: Sequence[Box | None] | Tensor | None = None,
    ) -> Tensor:
        """Per-sample similarities of one batch, (B,), without touching the metric state."""
        return self.score_and_detect(generated, reference, boxes, reference_boxes)[0]

    @torch.no_grad()
    def score_and_detect(
        self,
        generated: Tensor,
        reference: Tensor,
        boxes: Sequence[Box | None] | Tensor | None = None,
        reference_boxes: Sequence[Box | None] | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(similarities (B,), found (B,) bool)`` of one batch: ``found`` says where the embedder found its
        subject in the generated image (always True for an embedder that does not look for one)."""
        generated = _check_images(generated, "generated")
        reference = _check_images(reference, "reference")
        if reference.shape[0] not in (1, generated.shape[0]):
            raise ValueError(
                f"{reference.shape[0]} reference images for {generated.shape[0]} generated ones: pass one per "
                "generated image, or a single one for all."
            )
        generated_embeddings, found = self._embed(generated, boxes)
        reference_embeddings, reference_found = self._embed(reference, reference_boxes)
        if not bool(reference_found.all()):
            raise DataError(
                "a reference image has no face the identity embedder can find: use references where the face "
                "is visible and frontal (IdentitySimilarity.check_references names them), or another embedder."
            )
        similarity = F.cosine_similarity(
            generated_embeddings, reference_embeddings.to(generated_embeddings.device), dim=-1
        )
        return torch.where(found.to(similarity.device), similarity, torch.zeros_like(similarity)), found

    def update(
        self,
        generated: Tensor,
        reference: Tensor,
        boxes: Sequence[Box | None] | Tensor | None = None,
        reference_boxes: Sequence[Box | None] | Tensor | None = None,
    ) -> None:
        values, found = self.score_and_detect(generated, reference, boxes, reference_boxes)
        self.values.append(values.to(self.device))
        self.detected.append(found.float().to(self.device))

    def compute(self) -> Tensor:
        values = dim_zero_cat(self.values) if not isinstance(self.values, Tensor) else self.values
        return values.mean() if values.numel() else torch.tensor(float("nan"))

    def detection_rate(self) -> Tensor:
        """The fraction of generated images in which the embedder found its subject (1 for embedders that
        do not look for one), over every process under DDP."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            detected = self.detected
            detected = (
                detected if isinstance(detected, Tensor) else dim_zero_cat(detected) if detected else None
            )
            return (
                detected.mean() if detected is not None and detected.numel() else torch.tensor(float("nan"))
            )


# ----------------------------------------------------------------------------- prompt alignment


class ClipFeatures(nn.Module):
    """A CLIP model whose ``get_image_features`` / ``get_text_features`` return (B, D) tensors.

    transformers 5 returns ``BaseModelOutputWithPooling`` objects there (the projected embeddings are in
    ``pooler_output``); torchmetrics' ``CLIPScore`` expects tensors (torchmetrics #3407).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @property
    def config(self) -> Any:
        return self.model.config

    @staticmethod
    def _tensor(output: Any) -> Tensor:
        if isinstance(output, Tensor):
            return output
        for name in ("pooler_output", "image_embeds", "text_embeds"):
            value = getattr(output, name, None)
            if isinstance(value, Tensor):
                return value
        raise TypeError(f"unexpected CLIP features of type {type(output).__name__}")

    def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load_clip(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[ClipFeatures, Any]:
    """Load a full CLIP (text + vision) and its processor from a folder or hub id: (model, processor).

    The image processor is the PIL one (no torchvision needed). The tokenizer is checked, since offline a
    missing tokenizer silently loads as a 2-token vocabulary.

    Raises:
        OSError: the model cannot be loaded. ValueError: the tokenizer does not match the model.
    """

    source = str(name_or_path)
    try:
        model_type = AutoConfig.from_pretrained(source, revision=revision).model_type
        if model_type == "clip":
            model = CLIPModel.from_pretrained(source, revision=revision, dtype=dtype)
            try:
                processor = CLIPProcessor.from_pretrained(source, revision=revision, backend="pil")
            except TypeError:  # transformers 4: no backend argument
                processor = CLIPProcessor.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        raise MissingFileError(
            f"could not load the CLIP model {source!r}: {str(error).rstrip('.')}. Pass a local folder with a full CLIP model "
            "(CLIPModel + processor), or a hub id such as openai/clip-vit-large-patch14 that is in the local cache."
        ) from error
    if model_type != "clip":
        raise ConfigError(
            f"the CLIP model {source!r} is a {model_type} model, not a full CLIP (text and vision towers, "
            "CLIPModel): pass one such as openai/clip-vit-large-patch14."
        )
    vocab = model.config.text_config.vocab_size
    size = len(processor.tokenizer)
    if size <= 2 or size > vocab:
        raise ConfigError(
            f"the CLIP tokenizer at {source!r} has {size} tokens for a text model with {vocab}: its tokenizer files "
            "are missing or belong to another model."
        )
    return ClipFeatures(model).to(device), processor


def _to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> uint8 on the CPU: CLIP processors rescale by 1/255 themselves."""
    images = _check_images(images, "images")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


class PromptAlignment(_SyncedValues, CLIPScore):
    """CLIP score between generated images and their prompts: ``100 * cos(E_image, E_text)`` per sample.

    torchmetrics' ``CLIPScore`` with a local CLIP and one value per sample, which ``nested eval`` averages
    unclamped. ``update(images, prompts)``:
    images (B, 3, H, W) in [0, 1] (uint8 accepted), B prompts. ``compute()`` -> the mean score (CLIPScore's:
    clamped at 0 after averaging); ``per_sample()`` -> (N,) values ``100 * cos`` (not clamped).

    Write prompts as CLIP should read them: replace a learned placeholder (``<person>``) by its class word.

    Args:
        clip: a folder or hub id (:func:`load_clip`), a loaded ``(model, processor)`` pair, or a callable
            returning one.
    """

    full_state_update = False
    values: list[Tensor]

    def __init__(
        self,
        clip: str | os.PathLike | tuple[nn.Module, Any] | Callable[[], tuple[nn.Module, Any]],
        **kwargs: Any,
    ):
        if isinstance(clip, (str, os.PathLike)):
            loaded = load_clip(clip)
        elif isinstance(clip, tuple):
            loaded = clip
        elif callable(clip):
            loaded = clip()
        else:
            raise ValueError(
                f"clip must be a path, a hub id or a (model, processor) pair, got {type(clip).__name__}."
            )
        model, processor = loaded
        if not isinstance(model, ClipFeatures):
            model = ClipFeatures(model)
        super().__init__(model_name_or_path=lambda: (model, processor), **kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    @torch.no_grad()
    def score_batch(self, images: Tensor, prompts: str | Sequence[str]) -> Tensor:
        """Per-sample ``100 * cos`` of one batch, (B,), without touching the metric state."""

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"{images.shape[0]} images but {len(prompts)} prompts: pass one prompt per image."
            )
        device = next(self.model.parameters()).device
        pixels = self.processor(images=list(_to_uint8(images).cpu()), return_tensors="pt")["pixel_values"]
        # Truncated by the tokenizer, which keeps the end token CLIP pools at: torchmetrics' CLIPScore cuts
        # a prompt longer than the text tower's positions after tokenizing, end token included.
        text = self.processor.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        image_features = self.model.get_image_features(pixels.to(device))
        text_features = self.model.get_text_features(
            text["input_ids"].to(device), text["attention_mask"].to(device)
        )
        cosine = F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
        return 100 * cosine

    def update(self, images: Tensor, prompts: str | Sequence[str]) -> None:  # type: ignore[override]
        scores = self.score_batch(images, prompts).to(self.device)
        self.score += scores.sum()
        self.n_samples += scores.numel()
        self.values.append(scores)

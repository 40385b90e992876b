"""The subject encoder: a frozen Hugging Face vision backbone plus a trainable resampler.

The backbone turns a subject photo into patch features (the hidden states of one layer, before
any pooling); the resampler (a Perceiver / Q-Former with learned queries) turns those into the
M subject tokens that every nested attention layer attends over.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nested.errors import ConfigError, MissingFileError

__all__ = [
    "EncoderSpec",
    "FrozenModules",
    "Resampler",
    "SubjectEncoder",
    "centre_square",
    "load_vision_backbone",
]

# CLIP's normalisation, the fallback when a backbone folder ships no image processor config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FrozenModules:
    """Frozen modules kept OUTSIDE the ``nn.Module`` tree of their owner.

    So they are in no ``state_dict`` (checkpoints hold only trainable state), no ``parameters()``
    (optimizers, DDP and weight averaging see only trainable weights), and ``copy.deepcopy`` of the
    owner (e.g. Lightning's ``WeightAveraging``) shares them instead of duplicating a 2.6B-parameter
    UNet. Owners move them along in ``_apply`` so ``.to(device)`` still works.
    """

    def __init__(self, **objects):
        for value in objects.values():
            if isinstance(value, nn.Module):
                value.eval().requires_grad_(False)
        self.__dict__.update(objects)

    def items(self):
        return [(k, v) for k, v in self.__dict__.items() if isinstance(v, nn.Module)]

    def apply(self, fn) -> None:
        for _, module in self.items():
            module._apply(fn)

    def __deepcopy__(self, memo) -> FrozenModules:
        return self


@dataclass
class EncoderSpec:
    """What the subject encoder is made of; stored in every adapter's config.

    Attributes:
        backbone: a local folder or hub id of a Hugging Face vision model (CLIP vision, DINOv2,
            SigLIP...), e.g. ``h94/IP-Adapter`` with ``subfolder="models/image_encoder"`` for
            OpenCLIP ViT-H/14.
        subfolder: the model's folder inside ``backbone``, if any.
        revision: a hub revision to pin.
        feature_layer: which hidden state to use (-1: the last layer, before pooling).
        num_tokens: M, the number of subject tokens (the paper uses 1024).
        width, depth, heads: the resampler's size.
        output_dim: the subject tokens' width (defaults to ``width``).
    """

    backbone: str
    subfolder: str | None = None
    revision: str | None = None
    feature_layer: int = -1
    num_tokens: int = 16
    width: int = 768
    depth: int = 4
    heads: int = 8
    output_dim: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.num_tokens < 1:
            problems.append(f"num_tokens must be >= 1, got {self.num_tokens}")
        if self.depth < 1:
            problems.append(f"depth must be >= 1, got {self.depth}")
        if self.heads < 1 or self.width % self.heads:
            problems.append(f"width ({self.width}) must be a positive multiple of heads ({self.heads})")
        if problems:
            raise ConfigError("invalid encoder spec: " + "; ".join(problems))

    @property
    def token_dim(self) -> int:
        return self.output_dim or self.width

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EncoderSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown encoder spec keys {unknown}; expected some of {sorted(known)}.")
        return cls(**data)


class _ResamplerBlock(nn.Module):
    """Learned queries attend to [features; queries], then a feed-forward; both residual."""

    def __init__(self, width: int, heads: int, ff_mult: int = 4):
        super().__init__()
        self.heads = heads
        self.norm_features = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, ff_mult * width, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * width, width, bias=False),
        )

    def forward(self, features: Tensor, latents: Tensor) -> Tensor:
        batch, n_latents, width = latents.shape
        features = self.norm_features(features)
        normed = self.norm_latents(latents)
        context = torch.cat([features, normed], dim=1)
        q = self.to_q(normed).view(batch, n_latents, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(context).view(batch, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        # SDPA subtracts the row max before exp, so it does not overflow like a hand-written
        # (q * scale) @ (k * scale)^T softmax can in half precision.
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, n_latents, width)
        latents = latents + self.to_out(attended)
        return latents + self.ff(latents)


class Resampler(nn.Module):
    """Perceiver resampler: (B, L, input_dim) backbone features -> (B, M, output_dim) tokens.

    Runs in float32 whenever it would otherwise run in float16 (inputs, weights or autocast),
    because a resampler in fp16 overflows on large CLIP activations; bf16 has fp32's range and is
    used as is.
    """

    def __init__(
        self,
        input_dim: int,
        num_tokens: int = 16,
        width: int = 768,
        depth: int = 4,
        heads: int = 8,
        output_dim: int | None = None,
        ff_mult: int = 4,
    ):
        super().__init__()
        output_dim = output_dim or width
        self.latents = nn.Parameter(torch.randn(1, num_tokens, width) * width**-0.5)
        self.proj_in = nn.Linear(input_dim, width)
        self.blocks = nn.ModuleList([_ResamplerBlock(width, heads, ff_mult) for _ in range(depth)])
        self.proj_out = nn.Linear(width, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, features: Tensor, upcast_half: bool = True) -> Tensor:
        """features: (B, L, input_dim) -> (B, M, output_dim) in the resampler's weight dtype."""
        device_type = features.device.type
        half = torch.float16
        autocast_half = (
            torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == half
        )
        if upcast_half and (self.latents.dtype == half or features.dtype == half or autocast_half):
            # Same weights, upcast for this call only: the module itself stays in its dtype.
            weights = {name: p.float() for name, p in self.named_parameters()}
            with torch.autocast(device_type, enabled=False):
                out = torch.func.functional_call(self, weights, (features.float(),), {"upcast_half": False})
            return out.to(self.latents.dtype)
        x = self.proj_in(features.to(self.proj_in.weight.dtype))
        latents = self.latents.expand(x.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(x, latents)
        return self.norm_out(self.proj_out(latents))


def load_vision_backbone(
    spec: EncoderSpec, *, dtype: torch.dtype = torch.float32, local_files_only: bool | None = None
):
    """Load the frozen vision model named by ``spec`` and its image normalisation.

    Returns:
        (model, image_size, mean, std): the model in eval mode with ``requires_grad`` off.
    """
    # Here, not at the top: the encoder is imported by `nested push` (through the adapter), which needs no model.
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel, SiglipVisionModel

    kwargs = {"revision": spec.revision, "subfolder": spec.subfolder or ""}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    # A missing or damaged file (config, weights cut short) is one line naming the folder.
    try:
        config = AutoConfig.from_pretrained(spec.backbone, **kwargs)
        # A full CLIP/SigLIP checkpoint also holds a text tower: load only the vision half. A
        # vision-only checkpoint (e.g. CLIPVisionModelWithProjection) is loaded with its own class.
        architecture = (getattr(config, "architectures", None) or [""])[0]
        model_class = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}.get(config.model_type, AutoModel)
        if "Vision" in architecture and hasattr(transformers, architecture):
            model_class = getattr(transformers, architecture)
        model = model_class.from_pretrained(spec.backbone, torch_dtype=dtype, **kwargs)
    except (OSError, SafetensorError) as error:
        raise MissingFileError(
            f"could not load the image encoder {spec.backbone!r} (subfolder {spec.subfolder!r}): "
            f"{str(error).rstrip('. ')}. "
            "Pass a local folder with a Hugging Face vision model (config.json + weights), or a hub id "
            "that is in the local cache when offline."
        ) from error
    model.eval().requires_grad_(False)

    image_size = getattr(getattr(model.config, "vision_config", model.config), "image_size", 224)
    mean, std = CLIP_MEAN, CLIP_STD
    try:
        processor = AutoImageProcessor.from_pretrained(spec.backbone, **kwargs)
    except (OSError, ValueError):
        processor = None
    if processor is not None:
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        crop = getattr(processor, "crop_size", None) or getattr(processor, "size", None) or {}
        image_size = crop.get("height") or crop.get("shortest_edge") or image_size
    return model, int(image_size), mean, std


def backbone_feature_dim(model) -> int:
    config = getattr(model.config, "vision_config", model.config)
    return int(config.hidden_size)


def centre_square(images: Tensor) -> Tensor:
    """(..., H, W) -> (..., S, S), S = min(H, W): the centre square (a view), as training cuts its references."""
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return images[..., top : top + side, left : left + side]


class SubjectEncoder(nn.Module):
    """Frozen vision backbone + trainable resampler: subject images -> (B, M, d) tokens.

    The backbone is frozen and never saved in an adapter; the resampler is trained. Several
    adapters may share one backbone module (pass the same ``backbone``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        resampler: Resampler,
        *,
        image_size: int,
        image_mean: tuple[float, float, float] = CLIP_MEAN,
        image_std: tuple[float, float, float] = CLIP_STD,
        feature_layer: int = -1,
    ):
        super().__init__()
        config = getattr(backbone.config, "vision_config", backbone.config)
        layers = getattr(config, "num_hidden_layers", None)
        if layers is not None and not -(layers + 1) <= feature_layer <= layers:
            raise ConfigError(
                f"encoder.feature_layer {feature_layer} is not one of the {layers + 1} hidden states of the image "
                f"encoder's backbone ({layers} layers and the embeddings): use -{layers + 1} to {layers} (-1: the last)."
            )
        self.frozen = FrozenModules(backbone=backbone)
        self.resampler = resampler
        self.image_size = image_size
        self.feature_layer = feature_layer
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_spec(
        cls, spec: EncoderSpec, *, backbone=None, dtype: torch.dtype = torch.float32
    ) -> SubjectEncoder:
        """Build from a spec; ``backbone``: an already loaded (model, image_size, mean, std)."""
        model, image_size, mean, std = backbone or load_vision_backbone(spec, dtype=dtype)
        resampler = Resampler(
            backbone_feature_dim(model),
            num_tokens=spec.num_tokens,
            width=spec.width,
            depth=spec.depth,
            heads=spec.heads,
            output_dim=spec.output_dim,
        )
        return cls(
            model,
            resampler,
            image_size=image_size,
            image_mean=mean,
            image_std=std,
            feature_layer=spec.feature_layer,
        )

    @property
    def backbone(self) -> nn.Module:
        return self.frozen.backbone

    def _apply(self, fn, recurse: bool = True):
        self.frozen.apply(fn)  # the frozen backbone follows .to(device / dtype)
        return super()._apply(fn, recurse)

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, 3, S, S) normalised for the backbone. A non-square image is cut to
        its centre square first, as the training data's references are, instead of being stretched."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"subject images must be (B, 3, H, W) RGB in [0, 1], got {tuple(images.shape)}.")
        images = centre_square(images.to(self.image_mean.device, torch.float32))
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            ).clamp(0, 1)
        return (images - self.image_mean) / self.image_std

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, L, C) frozen backbone features (no gradient)."""
        dtype = next(self.backbone.parameters()).dtype
        pixel_values = self.preprocess(images).to(dtype)
        outputs = self.backbone(pixel_values=pixel_values, output_hidden_states=True)
        return outputs.hidden_states[self.feature_layer]

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, M, d) subject tokens."""
        return self.resampler(self.features(images))

"""The frozen diffusers parts (SD 1.x / 2.x, SDXL, SD3 / SD3.5, FLUX.1) and their text conditioning.

Only the components training and inference need are loaded, each with its own ``from_pretrained``; the
pipeline class is never built. Text conditioning reproduces the ``encode_prompt`` of
``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline`` and
``FluxPipeline`` exactly (without classifier-free guidance). :class:`DiffusionBackbone` holds a UNet
model, :class:`TransformerBackbone` a diffusion transformer; :func:`load_backbone` picks the right one.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import transformers
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError

from nested.errors import ConfigError, HubError, MissingFileError, NestedUserError
from nested.hub_access import hub_unreachable
from nested.prompt_cache import PromptCache
from nested.quantize import check_quantize, component_config
from nested.tokens import padded_ids, subject_masks, subject_masks_for_tokenizers

__all__ = [
    "DiffusionBackbone",
    "TextConditioning",
    "TransformerBackbone",
    "check_model_folder",
    "check_tokenizer",
    "checked_quantize",
    "first_parameter",
    "is_registered",
    "joint_subject_masks",
    "load_backbone",
    "load_t5",
    "scale_latents",
]

EXPECTED_LAYOUT = (
    "a diffusers folder or Hub id with model_index.json and the subfolders unet/, vae/, scheduler/, "
    "text_encoder/, tokenizer/ (SDXL also text_encoder_2/, tokenizer_2/)"
)
EXPECTED_TRANSFORMER_LAYOUT = (
    "a diffusers folder or Hub id with model_index.json and the subfolders transformer/, vae/, scheduler/, "
    "text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/ "
    "(SD3 / SD3.5 also text_encoder_3/, tokenizer_3/)"
)

# The diffusion transformers supported, by the class name model_index.json gives for transformer/.
TRANSFORMER_KINDS: dict[str, Literal["sd3", "flux"]] = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}


@dataclass
class TextConditioning:
    """The text conditioning of a batch of B prompts.

    ``prompt_embeds``: (B, T, C), the denoiser's ``encoder_hidden_states``: T = 77 for SD / SDXL (SDXL:
    C = C1 + C2), 77 + T5's length for SD3, T5's length for FLUX.
    ``pooled_prompt_embeds``: (B, P), the pooled text (SDXL's ``text_embeds``, SD3 / FLUX's
    ``pooled_projections``); None for SD.
    ``input_ids``: one (B, L) tensor per tokenizer, as fed to the text encoders.
    ``text_ids``: FLUX's (T, 3) text position ids (all zero); None for the others.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None
    input_ids: list[torch.Tensor]
    text_ids: torch.Tensor | None = None


def check_tokenizer(tokenizer: Any, text_encoder: Any, where: str) -> None:
    """Raise if ``tokenizer`` is not a real vocabulary matching ``text_encoder`` (the model or its config).

    Offline, ``CLIPTokenizer.from_pretrained`` on missing files silently returns a 2-token vocabulary; a
    real tokenizer has either a large vocabulary or exactly the text encoder's embedding count.
    """
    config = getattr(text_encoder, "config", text_encoder)
    size, embeddings = len(tokenizer), config.vocab_size
    if size > embeddings:
        raise ConfigError(
            f"tokenizer at {where} has {size} tokens but its text encoder only {embeddings} embeddings: "
            "they come from different models, or the text encoder was not resized after adding tokens."
        )
    if size <= 1000 and size != embeddings:
        raise ConfigError(
            f"tokenizer at {where} has {size} tokens (its text encoder has {embeddings}): the tokenizer files "
            "(vocab.json, merges.txt; T5: tokenizer.json or spiece.model) are missing; is the model "
            "downloaded? Offline, transformers returns an empty tokenizer instead of failing. Download the "
            "model (or fix the path) and retry."
        )


def read_model_index(name_or_path: str, expected: str = EXPECTED_LAYOUT, **hub_kwargs: Any) -> dict[str, Any]:
    """Read ``model_index.json`` from a local folder or the Hub, with an error saying what was ``expected``."""
    local = Path(name_or_path).expanduser()
    looks_local = local.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    if looks_local and not local.is_dir():
        raise MissingFileError(f"no model folder at {local}: expected {expected}.")
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise MissingFileError(f"{local} has no model_index.json: expected {expected}.")
    if not local.is_dir():
        try:
            validate_repo_id(name_or_path)
        except HFValidationError as error:
            raise MissingFileError(
                f"{name_or_path!r} is neither a model folder nor a Hub id ({error}). Expected {expected}."
            ) from None
    try:
        return dict(
            DiffusionPipeline.load_config(str(local) if local.is_dir() else name_or_path, **hub_kwargs)
        )
    except OSError as error:
        unreachable = None if local.is_dir() else hub_unreachable(error)
        if unreachable is not None:
            raise HubError(
                f"cannot download {name_or_path!r}: {unreachable}, and it is not in the local cache. Check the "
                "network, or HF_ENDPOINT; or pass a local folder."
            ) from error
        raise MissingFileError(
            f"cannot load model_index.json of {name_or_path!r} ({error}). Expected {expected}. "
            "Offline, a Hub id must already be in the local cache: download it, or pass a local folder."
        ) from error


# What each component folder of a local diffusers model must hold before its ``from_pretrained`` is called
# (diffusers' own error names the model's root folder, not the missing subfolder): a config file, and for
# models their weights (any variant or shard). A tokenizer folder is only required to exist: its files are
# checked by ``check_tokenizer`` once it is loaded.
_COMPONENT_FILES = {
    "unet": ("config.json", ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")),
    "transformer": ("config.json", ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")),
    "vae": ("config.json", ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")),
    "text_encoder": ("config.json", ("model*.safetensors", "pytorch_model*.bin")),
    "scheduler": ("scheduler_config.json", ()),
    "tokenizer": (None, ()),
}


def check_model_folder(folder: Path, components: list[str], expected: str = EXPECTED_LAYOUT) -> None:
    """Raise :class:`MissingFileError` naming the first component of the local diffusers folder ``folder``
    that is missing, or lacks its config or weights (``expected`` describes the whole layout)."""
    for name in components:
        config_name, weight_patterns = _COMPONENT_FILES[name.removesuffix("_2").removesuffix("_3")]
        part = folder / name
        if not part.is_dir():
            problem = f"has no {name}/ folder"
        elif config_name and not (part / config_name).is_file():
            problem = f"has no {name}/{config_name}"
        elif weight_patterns and not any(any(part.glob(pattern)) for pattern in weight_patterns):
            problem = f"has no weights in {name}/ ({' or '.join(weight_patterns)})"
        else:
            continue
        raise MissingFileError(
            f"{folder} {problem}: it is not a complete diffusers model folder; expected {expected}. "
            "Download the whole model (or fix the path) and retry."
        )


def first_parameter(module: torch.nn.Module) -> torch.Tensor:
    """The module's first parameter (or buffer), for its device and dtype.

    diffusers' ``ModelMixin.dtype`` / ``.device`` walk every submodule at each call (milliseconds for a
    UNet): in a loop of steps that host time adds up, and on a GPU it stalls the kernel queue.
    """
    return next(itertools.chain(module.parameters(), module.buffers()))  # a PromptCache has only a buffer


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _vae_dtype(dtype: torch.dtype, vae_config: dict[str, Any]) -> torch.dtype:
    """fp32 for a VAE flagged ``force_upcast`` (SDXL's overflows in fp16) in fp16, else ``dtype``."""
    return torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", True) else dtype


def _load_text_components(
    source: str,
    index: dict[str, Any],
    suffixes: list[str],
    dtype: torch.dtype,
    hub_kwargs: dict[str, Any],
    weights_kwargs: dict[str, Any],
    quantize: dict[str, str],
) -> tuple[list[Any], list[torch.nn.Module]]:
    """Load ``tokenizer{suffix}`` and ``text_encoder{suffix}`` for each suffix, with the transformers classes
    ``model_index.json`` names; each tokenizer is checked against its encoder, each encoder frozen and, if
    ``quantize`` names it, quantized."""
    tokenizers, text_encoders = [], []
    for suffix in suffixes:
        tokenizer = _load_tokenizer(source, index, suffix, hub_kwargs)
        encoder_class = getattr(transformers, index[f"text_encoder{suffix}"][1])
        text_encoder = encoder_class.from_pretrained(
            source,
            subfolder=f"text_encoder{suffix}",
            dtype=dtype,
            **_quantization_kwargs(quantize, f"text_encoder{suffix}"),
            **weights_kwargs,
        )
        check_tokenizer(tokenizer, text_encoder, f"{source}/tokenizer{suffix}")
        tokenizers.append(tokenizer)
        text_encoders.append(_frozen(text_encoder))
    return tokenizers, text_encoders


def _load_tokenizer(source: str, index: dict[str, Any], suffix: str, hub_kwargs: dict[str, Any]) -> Any:
    """``tokenizer{suffix}`` of ``source``, with the transformers class ``model_index.json`` names."""
    tokenizer_class = getattr(transformers, index[f"tokenizer{suffix}"][1])
    return tokenizer_class.from_pretrained(source, subfolder=f"tokenizer{suffix}", **hub_kwargs)


def t5_suffix(kind: str) -> str:
    """The component suffix of T5 (``text_encoder{suffix}``, ``tokenizer{suffix}``): SD3's third text
    encoder, FLUX's second."""
    return "_3" if kind == "sd3" else "_2"


def transformer_patch_size(kind: str, transformer: torch.nn.Module) -> int:
    """Latents per side of one transformer token: SD3's ``patch_size``; FLUX packs 2 x 2 latents."""
    return transformer.config.patch_size if kind == "sd3" else 2


def transformer_max_side(kind: str, transformer: torch.nn.Module, vae_scale_factor: int) -> int | None:
    """The largest image side, in pixels, the transformer's position embedding covers: SD3's is a table of
    ``pos_embed_max_size`` patches per side (SD3.5-Large 192: 3072 px; SD3.5-Medium 384); FLUX's rotary
    embedding has no limit (None)."""
    table = getattr(transformer.config, "pos_embed_max_size", None) if kind == "sd3" else None
    if table is None:
        return None
    return table * transformer_patch_size(kind, transformer) * vae_scale_factor


def check_transformer_side(
    kind: str, transformer: torch.nn.Module, vae_scale_factor: int, sides: dict[str, int]
) -> None:
    """Refuse an image side (``sides``: name -> pixels) beyond :func:`transformer_max_side`."""
    largest = transformer_max_side(kind, transformer, vae_scale_factor)
    if largest is None:
        return
    for name, size in sides.items():
        if size is not None and size > largest:
            raise ConfigError(
                f"{name} {size} is more than the {largest} pixels per side that this {kind.upper()} transformer's "
                f"position embedding covers (pos_embed_max_size {transformer.config.pos_embed_max_size}): use at "
                f"most {largest}."
            )


def check_max_sequence_length(max_sequence_length: int | None) -> None:
    """Refuse a T5 length below 1 (None: the pipeline's default)."""
    if max_sequence_length is not None and max_sequence_length < 1:
        raise ConfigError(
            f"max_sequence_length must be a positive number of T5 tokens, got {max_sequence_length}; leave it "
            "unset for the pipeline's default (SD3 256, FLUX 512)."
        )


def _t5_length(kind: str, max_sequence_length: int | None, tokenizer: Any, where: str) -> int:
    """T5 tokens per prompt: ``max_sequence_length``, or the pipeline's default (SD3 256, FLUX 512), checked
    against the tokenizer's limit."""
    check_max_sequence_length(max_sequence_length)
    length = max_sequence_length or (256 if kind == "sd3" else 512)
    if length > tokenizer.model_max_length:
        raise ConfigError(
            f"max_sequence_length {length} exceeds the T5 tokenizer's model_max_length "
            f"{tokenizer.model_max_length} ({where}); use at most {tokenizer.model_max_length}."
        )
    return length


def _transformer_kind(source: str, index: dict[str, Any]) -> str:
    """``"sd3"`` or ``"flux"`` from the transformer class ``model_index.json`` registers; else a user error."""
    transformer_class_name = index["transformer"][1] if is_registered(index, "transformer") else None
    if transformer_class_name not in TRANSFORMER_KINDS:
        found = f"transformer {transformer_class_name}" if transformer_class_name else "no transformer"
        raise ConfigError(
            f"{source}: model_index.json registers {found}; supported are "
            f"{', '.join(TRANSFORMER_KINDS)} (a UNet model loads with DiffusionBackbone)."
        )
    return TRANSFORMER_KINDS[transformer_class_name]


def load_t5(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_sequence_length: int | None = None,
    revision: str | None = None,
    variant: str | None = None,
    local_files_only: bool | None = None,
) -> tuple[Any, torch.nn.Module, str, int]:
    """T5 alone from an SD3 / FLUX checkpoint, as :meth:`TransformerBackbone.from_pretrained` loads it:
    ``(tokenizer, text_encoder, component, max_sequence_length)`` (``component``: ``text_encoder_3`` for SD3,
    ``text_encoder_2`` for FLUX; the length defaulted and checked as there). ``nested prompts`` encodes with it."""
    source = str(name_or_path)
    hub_kwargs = _hub_kwargs(revision, local_files_only)
    index = read_model_index(source, EXPECTED_TRANSFORMER_LAYOUT, **hub_kwargs)
    if is_registered(index, "unet") and not is_registered(index, "transformer"):
        raise ConfigError(
            f"{source} is a UNet model, whose prompts go through CLIP alone: a prompt cache holds T5 states, "
            "for SD3 / SD3.5 and FLUX.1 models only."
        )
    kind = _transformer_kind(source, index)
    suffix = t5_suffix(kind)
    _check_components(source, index, "transformer", [suffix], EXPECTED_TRANSFORMER_LAYOUT)
    (tokenizer,), (text_encoder,) = _load_text_components(
        source, index, [suffix], dtype, hub_kwargs, {**hub_kwargs, "variant": variant}, {}
    )
    length = _t5_length(kind, max_sequence_length, tokenizer, f"{source}/tokenizer{suffix}")
    return tokenizer, text_encoder, f"text_encoder{suffix}", length


def scale_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents (B, C, h, w) -> the unit-variance latents the denoiser sees:
    ``(latents - shift_factor) * scaling_factor`` (the SD3 / FLUX VAEs have a shift, SD's and SDXL's none)."""
    shift = vae.config.get("shift_factor") or 0.0
    return (latents - shift) * vae.config.scaling_factor


class _VaeLatents:
    """Moving between images and the latents the denoiser sees, for a backbone with a ``vae`` attribute."""

    vae: AutoencoderKL

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for the real models)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_scaling(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, C, h, w) -> the unit-variance latents the denoiser sees (:func:`scale_latents`)."""
        return scale_latents(self.vae, latents)

    def latent_unscaling(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`latent_scaling`, before ``vae.decode``."""
        shift = self.vae.config.get("shift_factor") or 0.0
        return latents / self.vae.config.scaling_factor + shift

    # The VAE runs in its own dtype, outside a training step's autocast, as the diffusers pipelines and `nested
    # shards --cache-latents` run it: a VAE kept float32 because it overflows in fp16 (SDXL's) would otherwise
    # run its convolutions in fp16 all the same under `16-mixed`.

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), f = ``vae_scale_factor``
        (C = 4 for SD / SDXL, 16 for SD3 / FLUX), in the VAE's dtype."""
        weight = first_parameter(self.vae)
        with torch.autocast(weight.device.type, enabled=False):
            latent_dist = self.vae.encode(images.to(weight.device, weight.dtype)).latent_dist
            return self.latent_scaling(latent_dist.sample(generator))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h f, w f) in [0, 1], float32 on the VAE's device."""
        weight = first_parameter(self.vae)
        with torch.autocast(weight.device.type, enabled=False):
            unscaled = self.latent_unscaling(latents.to(weight.device, weight.dtype))
            decoded = self.vae.decode(unscaled, return_dict=False)[0]
        return (decoded.float() / 2 + 0.5).clamp(0, 1)


def latent_space(vae: Any) -> dict[str, Any]:
    """What a VAE's latents mean to a denoiser: their scaling, shift, channels and downsampling. Latents that
    differ in any of these (cached with another model's VAE) do not fit, whatever else differs (a VAE
    fine-tuned for fp16 keeps them)."""
    config = vae.config
    return {
        "scaling_factor": float(config.scaling_factor),
        "shift_factor": float(config.get("shift_factor") or 0.0),
        "latent_channels": int(config.latent_channels),
        "downsampling": 2 ** (len(config.block_out_channels) - 1),
    }


@dataclass
class DiffusionBackbone(_VaeLatents):
    """The frozen UNet, VAE and text encoders of a Stable Diffusion model, plus its training scheduler.

    ``noise_scheduler`` is a ``DDPMScheduler`` rebuilt from the model's own scheduler config (so SD 2.x's
    ``v_prediction`` and the beta schedule carry over); ``scheduler_config`` keeps that original config.
    ``force_zeros_for_empty_prompt``: SDXL's pipeline option from ``model_index.json`` (default true): an
    empty negative prompt is zero embeddings rather than the encoded empty string.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    tokenizers: list[Any]
    text_encoders: list[torch.nn.Module]
    kind: Literal["sd", "sdxl"]
    source: str
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    force_zeros_for_empty_prompt: bool = True

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        variant: str | None = None,
        vae_name_or_path: str | Path | None = None,
        local_files_only: bool | None = None,
        quantize: Mapping[str, str] | None = None,
    ) -> DiffusionBackbone:
        """Load the components of a diffusers SD 1.x / 2.x / SDXL checkpoint (folder or Hub id).

        SDXL is recognised by ``text_encoder_2`` in ``model_index.json``. ``vae_name_or_path`` replaces the
        VAE (a standalone AutoencoderKL folder / Hub id, or a local pipeline folder with ``vae/``). With
        ``dtype=torch.float16`` a VAE flagged ``force_upcast`` (SDXL's, which overflows in fp16) stays fp32.
        ``quantize`` stores the named components' linear weights in 8 bits (:mod:`nested.quantize`), e.g.
        ``{"unet": "int8"}``.
        """
        source = str(name_or_path)
        hub_kwargs = _hub_kwargs(revision, local_files_only)
        index = read_model_index(source, **hub_kwargs)
        if is_registered(index, "transformer") and not is_registered(index, "unet"):
            raise ConfigError(
                f"{source} is a diffusion transformer ({index['transformer'][1]}), not a UNet model: load it "
                "with TransformerBackbone.from_pretrained (or load_backbone)."
            )
        quantize = checked_quantize(quantize, index, source)
        kind: Literal["sd", "sdxl"] = "sdxl" if is_registered(index, "text_encoder_2") else "sd"
        suffixes = ["", "_2"] if kind == "sdxl" else [""]
        _check_components(
            source, index, "unet", suffixes, EXPECTED_LAYOUT, skip_local=("vae",) if vae_name_or_path else ()
        )

        weights_kwargs = {**hub_kwargs, "variant": variant}
        unet = UNet2DConditionModel.from_pretrained(
            source,
            subfolder="unet",
            torch_dtype=dtype,
            **_quantization_kwargs(quantize, "unet"),
            **weights_kwargs,
        )
        if unet.config.addition_embed_type == "text_time" and kind != "sdxl":
            raise ConfigError(f"{source}: the UNet expects SDXL conditioning but there is no text_encoder_2.")

        vae_source = str(vae_name_or_path) if vae_name_or_path is not None else source
        vae_subfolder = "vae" if vae_name_or_path is None or (Path(vae_source) / "vae").is_dir() else None
        vae_kwargs = {**hub_kwargs, "variant": variant} if vae_name_or_path is None else dict(hub_kwargs)
        vae_config = AutoencoderKL.load_config(vae_source, subfolder=vae_subfolder, **hub_kwargs)
        vae_dtype = _vae_dtype(dtype, vae_config)
        vae = AutoencoderKL.from_pretrained(
            vae_source, subfolder=vae_subfolder, torch_dtype=vae_dtype, **vae_kwargs
        )

        scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler", **hub_kwargs))
        noise_scheduler = DDPMScheduler.from_config(scheduler_config)

        tokenizers, text_encoders = _load_text_components(
            source, index, suffixes, dtype, hub_kwargs, weights_kwargs, quantize
        )

        return cls(
            unet=_frozen(unet),
            vae=_frozen(vae),
            noise_scheduler=noise_scheduler,
            tokenizers=tokenizers,
            text_encoders=text_encoders,
            kind=kind,
            source=source,
            scheduler_config=scheduler_config,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        )

    def to(self, device: torch.device | str) -> DiffusionBackbone:
        """Move every module to ``device`` (dtypes unchanged); returns self."""
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(device)
        return self

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Prompts -> one (B, 77) id tensor per tokenizer, padded and truncated like the diffusers pipelines."""
        return [padded_ids(tokenizer, prompts) for tokenizer in self.tokenizers]

    def encode_prompts(self, prompts: list[str]) -> TextConditioning:
        """Encode B prompts exactly as the diffusers pipelines' ``encode_prompt`` does.

        SD: last hidden state of the text encoder, (B, 77, C). SDXL: penultimate hidden states of both
        encoders concatenated, (B, 77, C1 + C2), and text_encoder_2's projected pooled output (B, C2).
        Gradients flow only into parameters that require them (e.g. a trained placeholder embedding).
        """
        input_ids = self.tokenize(prompts)
        if self.kind == "sd":
            (text_encoder,) = self.text_encoders
            embeds = text_encoder(input_ids[0].to(text_encoder.device))[0]
            return TextConditioning(prompt_embeds=embeds, pooled_prompt_embeds=None, input_ids=input_ids)
        hidden_states, pooled = [], None
        for ids, text_encoder in zip(input_ids, self.text_encoders, strict=True):
            output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])  # SDXL conditions on the penultimate layer
            if output[0].ndim == 2:  # only CLIPTextModelWithProjection returns pooled text_embeds first
                pooled = output[0]
        return TextConditioning(
            prompt_embeds=torch.cat(hidden_states, dim=-1), pooled_prompt_embeds=pooled, input_ids=input_ids
        )

    @property
    def side_multiple(self) -> int:
        """Image sides must be multiples of this many pixels: the VAE's scale factor."""
        return self.vae_scale_factor

    def subject_masks(self, prompts: list[str], token: str) -> torch.Tensor:
        """Where ``token`` sits in each prompt: bool (B, 77), the same for every tokenizer (see
        :func:`~nested.tokens.subject_masks_for_tokenizers`)."""
        return subject_masks_for_tokenizers(self.tokenizers, prompts, token)

    @property
    def placeholder_text_encoders(self) -> tuple[list[Any], list[torch.nn.Module]]:
        """(tokenizers, text encoders) a new placeholder token is added to: every one of them."""
        return self.tokenizers, self.text_encoders

    @staticmethod
    def time_ids(
        original_sizes: torch.Tensor,
        crops_top_left: torch.Tensor,
        target_size: tuple[int, int],
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """SDXL micro-conditioning, (B, 6) in diffusers order: original (h, w), crop (top, left), target (h, w).

        ``original_sizes`` and ``crops_top_left`` are (B, 2) as (h, w) / (top, left); ``target_size`` is the
        generated image's (h, w) in pixels, shared by the batch.
        """
        target = torch.tensor(target_size, device=original_sizes.device).expand(original_sizes.shape[0], 2)
        return torch.cat([original_sizes, crops_top_left.to(original_sizes.device), target], dim=1).to(dtype)

    def unet_added_cond_kwargs(
        self, cond: TextConditioning, time_ids: torch.Tensor | None
    ) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs``: ``{"text_embeds": (B, C2), "time_ids": (B, 6)}`` for SDXL, None for SD."""
        if self.kind == "sd":
            return None
        if time_ids is None or cond.pooled_prompt_embeds is None:
            raise ValueError("SDXL needs time_ids (B, 6) and pooled prompt embeddings (B, C2).")
        pooled = cond.pooled_prompt_embeds
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}


@dataclass
class TransformerBackbone(_VaeLatents):
    """The frozen diffusion transformer, VAE and text encoders of an SD3 / SD3.5 or FLUX.1 model, plus its
    flow-matching scheduler.

    ``tokenizers`` / ``text_encoders``: SD3 has CLIP-L, CLIP-G (both with projection) and T5; FLUX has
    CLIP-L (pooled output only) and T5; T5 is always last. ``max_sequence_length`` is the T5 token count
    (the pipelines' defaults: 256 for SD3, 512 for FLUX). ``noise_scheduler`` is the model's own
    ``FlowMatchEulerDiscreteScheduler``; ``scheduler_config`` keeps its config.
    """

    transformer: SD3Transformer2DModel | FluxTransformer2DModel
    vae: AutoencoderKL
    noise_scheduler: FlowMatchEulerDiscreteScheduler
    tokenizers: list[Any]
    text_encoders: list[torch.nn.Module]
    kind: Literal["sd3", "flux"]
    source: str
    max_sequence_length: int
    scheduler_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        variant: str | None = None,
        local_files_only: bool | None = None,
        max_sequence_length: int | None = None,
        quantize: Mapping[str, str] | None = None,
        prompt_cache: str | Path | None = None,
    ) -> TransformerBackbone:
        """Load the components of a diffusers SD3 / SD3.5 / FLUX.1 checkpoint (folder or Hub id).

        The kind comes from the transformer class in ``model_index.json``. ``max_sequence_length`` (T5
        tokens) defaults to the pipeline's: 256 for SD3, 512 for FLUX; it may not exceed the T5
        tokenizer's ``model_max_length``. ``quantize`` stores the named components' linear weights in 8
        bits (:mod:`nested.quantize`), e.g. ``{"transformer": "int8", "text_encoder_2": "int8"}``.
        ``prompt_cache``: a folder of T5 states computed ahead (:mod:`nested.prompt_cache`); T5's weights are
        then not loaded, and a :class:`~nested.prompt_cache.PromptCache` takes its place in ``text_encoders``.
        """
        source = str(name_or_path)
        hub_kwargs = _hub_kwargs(revision, local_files_only)
        index = read_model_index(source, EXPECTED_TRANSFORMER_LAYOUT, **hub_kwargs)
        kind = _transformer_kind(source, index)
        suffixes = ["", "_2", "_3"] if kind == "sd3" else ["", "_2"]
        _check_components(source, index, "transformer", suffixes, EXPECTED_TRANSFORMER_LAYOUT)
        quantize = checked_quantize(quantize, index, source)
        t5_component = f"text_encoder{t5_suffix(kind)}"
        if prompt_cache is not None and t5_component in quantize:
            raise ConfigError(
                f"quantize names {t5_component} (T5), which a prompt cache replaces: it is not loaded. Remove "
                f"{t5_component} from quantize, or the prompt cache."
            )

        weights_kwargs = {**hub_kwargs, "variant": variant}
        transformer_class = SD3Transformer2DModel if kind == "sd3" else FluxTransformer2DModel
        transformer = transformer_class.from_pretrained(
            source,
            subfolder="transformer",
            torch_dtype=dtype,
            **_quantization_kwargs(quantize, "transformer"),
            **weights_kwargs,
        )
        vae_config = AutoencoderKL.load_config(source, subfolder="vae", **hub_kwargs)
        vae = AutoencoderKL.from_pretrained(
            source, subfolder="vae", torch_dtype=_vae_dtype(dtype, vae_config), **weights_kwargs
        )
        scheduler_config = dict(
            FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler", **hub_kwargs)
        )
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        loaded = suffixes if prompt_cache is None else suffixes[:-1]
        tokenizers, text_encoders = _load_text_components(
            source, index, loaded, dtype, hub_kwargs, weights_kwargs, quantize
        )
        if prompt_cache is not None:
            tokenizers.append(_load_tokenizer(source, index, suffixes[-1], hub_kwargs))
        length = _t5_length(kind, max_sequence_length, tokenizers[-1], f"{source}/tokenizer{suffixes[-1]}")
        if prompt_cache is not None:
            t5_config = transformers.AutoConfig.from_pretrained(source, subfolder=t5_component, **hub_kwargs)
            check_tokenizer(tokenizers[-1], t5_config, f"{source}/tokenizer{suffixes[-1]}")
            text_encoders.append(
                PromptCache(
                    prompt_cache,
                    tokenizers[-1],
                    max_sequence_length=length,
                    width=t5_config.d_model,
                    dtype=dtype,
                    base_model=source,
                )
            )
        return cls(
            transformer=_frozen(transformer),
            vae=_frozen(vae),
            noise_scheduler=noise_scheduler,
            tokenizers=tokenizers,
            text_encoders=text_encoders,
            kind=kind,
            source=source,
            max_sequence_length=length,
            scheduler_config=scheduler_config,
        )

    def to(self, device: torch.device | str) -> TransformerBackbone:
        """Move every module to ``device`` (dtypes unchanged); returns self."""
        for module in (self.transformer, self.vae, *self.text_encoders):
            module.to(device)
        return self

    @property
    def patch_size(self) -> int:
        """Latents per side of one transformer token (:func:`transformer_patch_size`)."""
        return transformer_patch_size(self.kind, self.transformer)

    @property
    def side_multiple(self) -> int:
        """Image sides must be multiples of this many pixels: the VAE's scale factor times the patch size
        (16 for the real SD3 and FLUX.1 models)."""
        return self.vae_scale_factor * self.patch_size

    def check_side(self, **sides: int) -> None:
        """Refuse image sides (pixels) beyond what the transformer covers (:func:`check_transformer_side`)."""
        check_transformer_side(self.kind, self.transformer, self.vae_scale_factor, sides)

    @property
    def text_length(self) -> int:
        """Text tokens of the transformer's joint sequence: 77 CLIP + T5's for SD3, T5's for FLUX."""
        clip = self.tokenizers[0].model_max_length if self.kind == "sd3" else 0
        return clip + self.max_sequence_length

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Prompts -> one id tensor per tokenizer, padded and truncated like the diffusers pipelines:
        (B, 77) for each CLIP tokenizer, (B, ``max_sequence_length``) for T5."""
        *clips, t5 = self.tokenizers
        return [padded_ids(tokenizer, prompts) for tokenizer in clips] + [
            padded_ids(t5, prompts, self.max_sequence_length)
        ]

    def encode_prompts(self, prompts: list[str]) -> TextConditioning:
        """Encode B prompts exactly as ``StableDiffusion3Pipeline`` / ``FluxPipeline.encode_prompt`` does.

        SD3: the penultimate hidden states of CLIP-L and CLIP-G concatenated (B, 77, C1 + C2), zero-padded
        to T5's width, then T5's last hidden state appended along the sequence: (B, 77 + L, C_T5); pooled
        = both CLIPs' projected outputs concatenated (B, P1 + P2). FLUX: T5's last hidden state (B, L, C_T5),
        pooled = CLIP's pooler output (B, P), and ``text_ids`` (L, 3) of zeros.
        """
        input_ids = self.tokenize(prompts)
        *clips, t5 = self.text_encoders
        t5_ids = input_ids[-1]
        if not isinstance(t5, PromptCache):  # the cache looks the ids up on the host: no round trip to a GPU
            t5_ids = t5_ids.to(first_parameter(t5).device)
        # T5 runs in its own dtype, never under a training step's autocast: as the pipelines run it at inference,
        # and as `nested prompts` computes the states of a prompt cache, so that a cache equals T5 loaded.
        with torch.autocast(first_parameter(t5).device.type, enabled=False):
            t5_states = t5(t5_ids)[0]
        t5_states = t5_states.to(first_parameter(t5).dtype)
        clip_dtype = first_parameter(clips[0]).dtype
        if self.kind == "flux":
            (clip,) = clips
            output = clip(input_ids[0].to(first_parameter(clip).device), output_hidden_states=False)
            text_ids = torch.zeros(t5_states.shape[1], 3, device=t5_states.device, dtype=clip_dtype)
            return TextConditioning(
                prompt_embeds=t5_states,
                pooled_prompt_embeds=output.pooler_output.to(clip_dtype),
                input_ids=input_ids,
                text_ids=text_ids,
            )
        hidden_states, pooled = [], []
        for ids, clip in zip(input_ids[:-1], clips, strict=True):
            output = clip(ids.to(first_parameter(clip).device), output_hidden_states=True)
            pooled.append(output[0])  # CLIPTextModelWithProjection: the projected text_embeds
            hidden_states.append(output.hidden_states[-2].to(clip_dtype))
        clip_states = torch.cat(hidden_states, dim=-1)
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return TextConditioning(
            prompt_embeds=torch.cat([clip_states, t5_states.to(clip_states.device)], dim=-2),
            pooled_prompt_embeds=torch.cat(pooled, dim=-1),
            input_ids=input_ids,
        )

    def subject_masks(self, prompts: list[str], token: str) -> torch.Tensor:
        """Where ``token`` sits in each prompt's text sequence, as the transformer sees it: bool (B, T),
        T = :attr:`text_length`, aligned with :meth:`encode_prompts`' ``prompt_embeds``.

        SD3: the CLIP part (both CLIP tokenizers must agree, see
        :func:`~nested.tokens.subject_masks_for_tokenizers`) then the T5 part; FLUX: the T5 part alone.
        In the T5 part every piece of the token is marked (T5's tokenizer may split a placeholder such as
        ``<person>`` into several), and only where it is a whole word.
        """
        return joint_subject_masks(self.kind, self.tokenizers, prompts, token, self.max_sequence_length)

    @property
    def placeholder_text_encoders(self) -> tuple[list[Any], list[torch.nn.Module]]:
        """(tokenizers, text encoders) a new placeholder token is added to: the CLIP ones. T5 keeps its
        vocabulary and reads a placeholder as its pieces, which :meth:`subject_masks` marks."""
        return self.tokenizers[:-1], self.text_encoders[:-1]

    @property
    def takes_guidance(self) -> bool:
        """Whether the transformer has a guidance embedding (FLUX.1-dev), which takes :meth:`guidance`."""
        return bool(self.transformer.config.get("guidance_embeds", False))

    def guidance(
        self, batch_size: int, scale: float, device: torch.device | str | None = None
    ) -> torch.Tensor | None:
        """FLUX's distilled guidance input, (B,) float32 filled with ``scale`` as ``FluxPipeline`` passes it;
        None for a transformer without guidance embedding (SD3, FLUX.1-schnell)."""
        if not self.takes_guidance:
            return None
        return torch.full((batch_size,), float(scale), device=device, dtype=torch.float32)


def joint_subject_masks(
    kind: Literal["sd3", "flux"],
    tokenizers: list[Any],
    prompts: list[str],
    token: str,
    max_sequence_length: int,
) -> torch.Tensor:
    """Where ``token`` sits in each prompt's joint text sequence of an SD3 / FLUX transformer: bool (B, T).

    ``tokenizers`` as the pipelines hold them, T5 last (SD3: CLIP-L, CLIP-G, T5; FLUX: CLIP-L, T5).
    SD3: the CLIP part (77 positions, the CLIP tokenizers must agree) then ``max_sequence_length`` T5
    positions; FLUX: the T5 part alone. Every T5 piece of the token is marked, whole words only. An SD3
    pipeline loaded without T5 (its T5 last is None) fills the T5 part with zeros, where nothing is marked.
    """
    *clips, t5 = tokenizers
    if t5 is None:
        if kind == "flux":
            raise ConfigError(
                "this FLUX pipeline has no T5 text encoder (text_encoder_2), and FLUX reads the prompt's words "
                "through T5 alone: load the pipeline with its text_encoder_2."
            )
        t5_masks = torch.zeros(len(prompts), max_sequence_length, dtype=torch.bool)
    else:
        t5_masks = subject_masks(t5, prompts, token, max_length=max_sequence_length)
    if kind == "flux":
        return t5_masks
    return torch.cat([subject_masks_for_tokenizers(clips, prompts, token), t5_masks], dim=1)


def load_backbone(
    name_or_path: str | Path, *, max_sequence_length: int | None = None, **kwargs: Any
) -> DiffusionBackbone | TransformerBackbone:
    """:class:`TransformerBackbone` for an SD3 / FLUX checkpoint, :class:`DiffusionBackbone` for a UNet one;
    ``kwargs`` go to the chosen ``from_pretrained``. ``max_sequence_length`` (T5 tokens) is refused for a
    UNet model. A component whose files are missing or damaged (weights cut short), or that the Hub does not
    give, is one line naming the model."""
    hub_kwargs = {key: kwargs[key] for key in ("revision", "local_files_only") if kwargs.get(key) is not None}
    index = read_model_index(str(name_or_path), **hub_kwargs)
    transformer = is_registered(index, "transformer") and not is_registered(index, "unet")
    if not transformer and max_sequence_length is not None:
        raise ConfigError(
            f"max_sequence_length (T5 tokens) is for SD3 / FLUX models; {name_or_path} is a UNet model, whose "
            "prompts are 77 tokens: leave max_sequence_length unset."
        )
    if not transformer and kwargs.pop("prompt_cache", None) is not None:
        raise ConfigError(
            f"a prompt cache holds T5 states, for SD3 / FLUX models; {name_or_path} is a UNet model, whose "
            "prompts go through CLIP alone: leave prompt_cache unset."
        )
    try:
        if transformer:
            return TransformerBackbone.from_pretrained(
                name_or_path, max_sequence_length=max_sequence_length, **kwargs
            )
        return DiffusionBackbone.from_pretrained(name_or_path, **kwargs)
    except NestedUserError:
        raise
    except (OSError, SafetensorError) as error:
        raise MissingFileError(
            f"could not load the base model {str(name_or_path)!r}: {str(error).rstrip('. ')}. Pass a diffusers "
            "folder or a hub id (cached when offline)."
        ) from error


# The components of a checkpoint that may be quantized: its denoiser and its text encoders (the VAE, mostly
# convolutions, and the image encoder are not).
QUANTIZABLE = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def checked_quantize(
    quantize: Mapping[str, str] | None, index: dict[str, Any], source: str
) -> dict[str, str]:
    """``quantize`` (``{component: format}``) with its formats checked, and every component it names one of
    ``source``'s quantizable ones (``index``: its ``model_index.json``)."""
    quantize = check_quantize(quantize, "quantize")
    available = [name for name in QUANTIZABLE if is_registered(index, name)]
    unknown = sorted(set(quantize) - set(available))
    if unknown:
        raise ConfigError(
            f"cannot quantize {', '.join(unknown)}: {source} has no such component, or it cannot be quantized; "
            f"its quantizable components are {', '.join(available)}."
        )
    return quantize


def _quantization_kwargs(quantize: dict[str, str], component: str) -> dict[str, Any]:
    """``from_pretrained``'s ``quantization_config`` for ``component`` if ``quantize`` names it."""
    if component not in quantize:
        return {}
    return {"quantization_config": component_config(component, quantize[component])}


def _hub_kwargs(revision: str | None, local_files_only: bool | None) -> dict[str, Any]:
    """The keyword arguments every ``from_pretrained`` / ``load_config`` of one checkpoint shares."""
    kwargs: dict[str, Any] = {"revision": revision}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    return kwargs


def _check_components(
    source: str,
    index: dict[str, Any],
    denoiser: str,
    suffixes: list[str],
    layout: str,
    skip_local: tuple[str, ...] = (),
) -> None:
    """Every component the checkpoint needs (the denoiser, VAE, scheduler, and a text encoder and tokenizer
    per suffix) is registered in ``model_index.json`` and, for a local folder, present on disk (except
    ``skip_local``, loaded from elsewhere)."""
    required = [denoiser, "vae", "scheduler"] + [
        f"{part}{suffix}" for suffix in suffixes for part in ("text_encoder", "tokenizer")
    ]
    missing = [name for name in required if not is_registered(index, name)]
    if missing:
        raise ConfigError(f"{source}: model_index.json has no {missing}; expected {layout}.")
    if Path(source).expanduser().is_dir():
        check_model_folder(Path(source).expanduser(), [n for n in required if n not in skip_local], layout)


def is_registered(index: dict[str, Any], name: str) -> bool:
    """Whether ``model_index.json`` lists component ``name`` (absent ones are missing or ``[null, null]``)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None

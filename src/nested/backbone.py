"""The frozen diffusers parts (SD 1.x / 2.x or SDXL) and their text conditioning.

Only the components training and inference need are loaded, each with its own ``from_pretrained``; the
pipeline class is never built. Text conditioning reproduces ``StableDiffusionPipeline.encode_prompt`` /
``StableDiffusionXLPipeline.encode_prompt`` exactly (without classifier-free guidance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

from nested.errors import ConfigError, MissingFileError

__all__ = [
    "DiffusionBackbone",
    "TextConditioning",
    "check_model_folder",
    "check_tokenizer",
    "first_parameter",
]

EXPECTED_LAYOUT = (
    "a diffusers folder or Hub id with model_index.json and the subfolders unet/, vae/, scheduler/, "
    "text_encoder/, tokenizer/ (SDXL also text_encoder_2/, tokenizer_2/)"
)


@dataclass
class TextConditioning:
    """The text conditioning of a batch of B prompts.

    ``prompt_embeds``: (B, 77, C), the UNet's ``encoder_hidden_states`` (SDXL: C = C1 + C2).
    ``pooled_prompt_embeds``: (B, C2), SDXL's pooled ``text_embeds`` of text_encoder_2; None for SD.
    ``input_ids``: one (B, 77) tensor per tokenizer, as fed to the text encoders.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None
    input_ids: list[torch.Tensor]


def check_tokenizer(tokenizer: Any, text_encoder: Any, where: str) -> None:
    """Raise if ``tokenizer`` is not a real vocabulary matching ``text_encoder``.

    Offline, ``CLIPTokenizer.from_pretrained`` on missing files silently returns a 2-token vocabulary; a
    real tokenizer has either a large vocabulary or exactly the text encoder's embedding count.
    """
    size, embeddings = len(tokenizer), text_encoder.config.vocab_size
    if size > embeddings:
        raise ConfigError(
            f"tokenizer at {where} has {size} tokens but its text encoder only {embeddings} embeddings: "
            "they come from different models, or the text encoder was not resized after adding tokens."
        )
    if size <= 1000 and size != embeddings:
        raise ConfigError(
            f"tokenizer at {where} has {size} tokens (its text encoder has {embeddings}): the tokenizer files "
            "(vocab.json, merges.txt) are missing; is the model downloaded? Offline, transformers returns an "
            "empty tokenizer instead of failing. Download the model (or fix the path) and retry."
        )


def _read_model_index(name_or_path: str, **hub_kwargs: Any) -> dict[str, Any]:
    """Read ``model_index.json`` from a local folder or the Hub, with an error saying what was expected."""
    local = Path(name_or_path).expanduser()
    looks_local = local.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    if looks_local and not local.is_dir():
        raise MissingFileError(f"no model folder at {local}: expected {EXPECTED_LAYOUT}.")
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise MissingFileError(f"{local} has no model_index.json: expected {EXPECTED_LAYOUT}.")
    try:
        return dict(
            DiffusionPipeline.load_config(str(local) if local.is_dir() else name_or_path, **hub_kwargs)
        )
    except OSError as error:
        raise MissingFileError(
            f"cannot load model_index.json of {name_or_path!r} ({error}). Expected {EXPECTED_LAYOUT}. "
            "Offline, a Hub id must already be in the local cache: download it, or pass a local folder."
        ) from error


# What each component folder of a local diffusers model must hold before its ``from_pretrained`` is called
# (diffusers' own error names the model's root folder, not the missing subfolder): a config file, and for
# models their weights (any variant or shard). A tokenizer folder is only required to exist: its files are
# checked by ``check_tokenizer`` once it is loaded.
_COMPONENT_FILES = {
    "unet": ("config.json", ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")),
    "vae": ("config.json", ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")),
    "text_encoder": ("config.json", ("model*.safetensors", "pytorch_model*.bin")),
    "scheduler": ("scheduler_config.json", ()),
    "tokenizer": (None, ()),
}


def check_model_folder(folder: Path, components: list[str]) -> None:
    """Raise :class:`MissingFileError` naming the first component of the local diffusers folder ``folder``
    that is missing, or lacks its config or weights."""
    for name in components:
        config_name, weight_patterns = _COMPONENT_FILES[name.removesuffix("_2")]
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
            f"{folder} {problem}: it is not a complete diffusers model folder; expected {EXPECTED_LAYOUT}. "
            "Download the whole model (or fix the path) and retry."
        )


def first_parameter(module: torch.nn.Module) -> torch.Tensor:
    """The module's first parameter, for its device and dtype.

    diffusers' ``ModelMixin.dtype`` / ``.device`` walk every submodule at each call (milliseconds for a
    UNet): in a loop of steps that host time adds up, and on a GPU it stalls the kernel queue.
    """
    return next(module.parameters())


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


@dataclass
class DiffusionBackbone:
    """The frozen UNet, VAE and text encoders of a Stable Diffusion model, plus its training scheduler.

    ``noise_scheduler`` is a ``DDPMScheduler`` rebuilt from the model's own scheduler config (so SD 2.x's
    ``v_prediction`` and the beta schedule carry over); ``scheduler_config`` keeps that original config.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    tokenizers: list[Any]
    text_encoders: list[torch.nn.Module]
    kind: Literal["sd", "sdxl"]
    source: str
    scheduler_config: dict[str, Any] = field(default_factory=dict)

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
    ) -> DiffusionBackbone:
        """Load the components of a diffusers SD 1.x / 2.x / SDXL checkpoint (folder or Hub id).

        SDXL is recognised by ``text_encoder_2`` in ``model_index.json``. ``vae_name_or_path`` replaces the
        VAE (a standalone AutoencoderKL folder / Hub id, or a local pipeline folder with ``vae/``). With
        ``dtype=torch.float16`` a VAE flagged ``force_upcast`` (SDXL's, which overflows in fp16) stays fp32.
        """
        source = str(name_or_path)
        hub_kwargs: dict[str, Any] = {"revision": revision}
        if local_files_only is not None:
            hub_kwargs["local_files_only"] = local_files_only
        index = _read_model_index(source, **hub_kwargs)
        kind: Literal["sd", "sdxl"] = "sdxl" if _registered(index, "text_encoder_2") else "sd"
        suffixes = ["", "_2"] if kind == "sdxl" else [""]
        required = ["unet", "vae", "scheduler"] + [
            f"{part}{s}" for s in suffixes for part in ("text_encoder", "tokenizer")
        ]
        missing = [name for name in required if not _registered(index, name)]
        if missing:
            raise ConfigError(f"{source}: model_index.json has no {missing}; expected {EXPECTED_LAYOUT}.")
        if Path(source).expanduser().is_dir():
            local_parts = [name for name in required if name != "vae" or vae_name_or_path is None]
            check_model_folder(Path(source).expanduser(), local_parts)

        weights_kwargs = {**hub_kwargs, "variant": variant}
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=dtype, **weights_kwargs
        )
        if unet.config.addition_embed_type == "text_time" and kind != "sdxl":
            raise ConfigError(f"{source}: the UNet expects SDXL conditioning but there is no text_encoder_2.")

        vae_source = str(vae_name_or_path) if vae_name_or_path is not None else source
        vae_subfolder = "vae" if vae_name_or_path is None or (Path(vae_source) / "vae").is_dir() else None
        vae_kwargs = {**hub_kwargs, "variant": variant} if vae_name_or_path is None else dict(hub_kwargs)
        vae_config = AutoencoderKL.load_config(vae_source, subfolder=vae_subfolder, **hub_kwargs)
        vae_dtype = (
            torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", True) else dtype
        )
        vae = AutoencoderKL.from_pretrained(
            vae_source, subfolder=vae_subfolder, torch_dtype=vae_dtype, **vae_kwargs
        )

        scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler", **hub_kwargs))
        noise_scheduler = DDPMScheduler.from_config(scheduler_config)

        tokenizers, text_encoders = [], []
        for suffix in suffixes:
            tokenizer_class = getattr(transformers, index[f"tokenizer{suffix}"][1])
            encoder_class = getattr(transformers, index[f"text_encoder{suffix}"][1])
            tokenizer = tokenizer_class.from_pretrained(source, subfolder=f"tokenizer{suffix}", **hub_kwargs)
            text_encoder = encoder_class.from_pretrained(
                source, subfolder=f"text_encoder{suffix}", dtype=dtype, **weights_kwargs
            )
            check_tokenizer(tokenizer, text_encoder, f"{source}/tokenizer{suffix}")
            tokenizers.append(tokenizer)
            text_encoders.append(_frozen(text_encoder))

        return cls(
            unet=_frozen(unet),
            vae=_frozen(vae),
            noise_scheduler=noise_scheduler,
            tokenizers=tokenizers,
            text_encoders=text_encoders,
            kind=kind,
            source=source,
            scheduler_config=scheduler_config,
        )

    def to(self, device: torch.device | str) -> DiffusionBackbone:
        """Move every module to ``device`` (dtypes unchanged); returns self."""
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(device)
        return self

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for real SD / SDXL)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_scaling(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, 4, h, w) -> the unit-variance latents the UNet sees."""
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def latent_unscaling(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`latent_scaling`, before ``vae.decode``."""
        shift = self.vae.config.get("shift_factor") or 0.0
        return latents / self.vae.config.scaling_factor + shift

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/f, W/f), f = ``vae_scale_factor``."""
        weight = first_parameter(self.vae)
        latent_dist = self.vae.encode(images.to(weight.device, weight.dtype)).latent_dist
        return self.latent_scaling(latent_dist.sample(generator))

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Prompts -> one (B, 77) id tensor per tokenizer, padded and truncated like the diffusers pipelines."""
        return [
            tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for tokenizer in self.tokenizers
        ]

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


def _registered(index: dict[str, Any], name: str) -> bool:
    """Whether ``model_index.json`` lists component ``name`` (absent ones are missing or ``[null, null]``)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None

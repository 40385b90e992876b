"""The denoising loop behind :class:`~nested.callbacks.SampleGrid`: images from modules already in memory.

:func:`sample_images` is a small denoising loop over a :class:`~nested.backbone.DiffusionBackbone` and an
attached :class:`~nested.adapter.NestedAdapter`: the training run's own UNet, VAE and text encoders, so no
second pipeline and no copy of the UNet is ever made. It reproduces the diffusers SD / SDXL pipelines
(classifier-free guidance with the unconditional half first, SDXL micro-conditioning, one generator per
image), so a grid at step N shows what ``nested generate`` would give with that adapter. On an SD3 / FLUX
:class:`~nested.backbone.TransformerBackbone` it runs diffusers' own ``StableDiffusion3Pipeline`` /
``FluxPipeline`` built around the backbone's modules (references, not copies), with the prompts encoded
by the backbone (whose CLIP tokenizers hold the placeholder tokens).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import diffusers
import torch
from torch import Tensor

from nested.adapter import NestedAdapter, SubjectBinding
from nested.backbone import DiffusionBackbone, TextConditioning, TransformerBackbone, first_parameter
from nested.errors import ConfigError
from nested.inference.pipeline import DEFAULT_GUIDANCE

__all__ = ["build_scheduler", "default_guidance", "default_size", "sample_images"]


def build_scheduler(backbone: DiffusionBackbone, name: str | None = None) -> Any:
    """A fresh inference scheduler from the base model's scheduler config.

    ``name``: a diffusers scheduler class name (``"DDIMScheduler"``, ``"EulerDiscreteScheduler"``...); None:
    the model's own scheduler class, except DDPM (made for 1000 steps), which is replaced by DDIM.
    """

    config = dict(backbone.scheduler_config or backbone.noise_scheduler.config)
    name = name or config.get("_class_name") or "DDIMScheduler"
    if name == "DDPMScheduler":
        name = "DDIMScheduler"
    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise ConfigError(
            f"unknown diffusers scheduler {name!r}; use e.g. 'DDIMScheduler' or 'EulerDiscreteScheduler'."
        )
    return scheduler_class.from_config(config)


# FluxPipeline's default_sample_size, in latents per side.
FLUX_SAMPLE_SIZE = 128


def _denoiser(backbone: DiffusionBackbone | TransformerBackbone) -> torch.nn.Module:
    return backbone.transformer if isinstance(backbone, TransformerBackbone) else backbone.unet


def default_guidance(backbone: DiffusionBackbone | TransformerBackbone) -> float:
    """The guidance scale ``nested generate`` uses for this base model when none is given."""
    return DEFAULT_GUIDANCE[backbone.kind if isinstance(backbone, TransformerBackbone) else "unet"]


def default_size(backbone: DiffusionBackbone | TransformerBackbone) -> int:
    """The base model's native image side in pixels, as its diffusers pipeline sets it: ``sample_size`` x the
    VAE's scale factor (FLUX: ``FluxPipeline``'s 128 latents, its transformer's config having no size)."""
    if backbone.kind == "flux":
        return FLUX_SAMPLE_SIZE * backbone.vae_scale_factor
    sample_size = _denoiser(backbone).config.sample_size
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return int(sample_size) * backbone.vae_scale_factor


def _negative_conditioning(backbone: DiffusionBackbone, negative_prompt: str, batch: int, cond: Any) -> Any:
    """The unconditional half: SDXL uses zeros for an empty negative prompt when its ``model_index.json``
    says so (``force_zeros_for_empty_prompt``, true unless set otherwise), as its pipeline does."""
    if backbone.kind == "sdxl" and backbone.force_zeros_for_empty_prompt and not negative_prompt:
        pooled = cond.pooled_prompt_embeds
        return TextConditioning(
            prompt_embeds=torch.zeros_like(cond.prompt_embeds),
            pooled_prompt_embeds=None if pooled is None else torch.zeros_like(pooled),
            input_ids=[],
        )
    return backbone.encode_prompts([negative_prompt] * batch)


def check_sampling(
    backbone: DiffusionBackbone | TransformerBackbone, steps: int, height: int, width: int
) -> None:
    """Refuse what :func:`sample_images` cannot draw with ``backbone``: fewer than 1 step, more steps than an SD /
    SDXL scheduler has timesteps, a side its VAE and patches cannot cut (:attr:`side_multiple`)."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}.")
    limit = backbone.noise_scheduler.config.num_train_timesteps
    if isinstance(backbone, DiffusionBackbone) and steps > limit:
        raise ConfigError(
            f"steps {steps} is more than the {limit} timesteps of {backbone.source}'s scheduler."
        )
    multiple = backbone.side_multiple
    if height % multiple or width % multiple:
        raise ConfigError(f"height and width must be multiples of {multiple}, got {height}x{width}.")
    if isinstance(backbone, TransformerBackbone):
        backbone.check_side(height=height, width=width)


@torch.no_grad()
def sample_images(
    backbone: DiffusionBackbone | TransformerBackbone,
    adapter: NestedAdapter | None,
    prompts: Sequence[str],
    references: Tensor | None = None,
    *,
    token: str | None = None,
    image_index: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    steps: int = 20,
    guidance: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    scale: float = 1.0,
    negative_prompt: str = "",
    scheduler: str | None = None,
    batch_size: int = 4,
    on_batch_end: Any = None,
) -> Tensor:
    """Generate one image per prompt with the backbone's modules and the (already attached) adapter.

    Args:
        backbone: the frozen UNet or transformer, VAE, text encoders (the training run's own objects).
        adapter: an adapter attached to the backbone's UNet or transformer, or None for the base model alone.
        prompts: N prompts; each must contain ``token`` when an adapter is given.
        references: (S, 3, h, w) subject images in [0, 1]; encoded once.
        token: the subject token (default: the adapter's).
        image_index: for each prompt, the reference it uses (default: ``i % S``).
        seeds: for each prompt, the seed of its initial noise (default: 0, 1, ...). Image i is the same
            whether generated alone or in a batch, as with diffusers' per-image generators.
        steps, guidance, negative_prompt: as in the diffusers pipelines (guidance <= 1: no CFG). FLUX:
            ``guidance`` is the distilled guidance input and ``negative_prompt`` is not used.
        height, width: pixels (default: the base model's size).
        scale: the subject's strength (0: plain text value, 1: nested value). The subject column's weight is
            the one the adapter was trained with (``config.token_weight``), as in ``NestedPipeline``.
        scheduler: a diffusers scheduler class name; None: the model's own (see :func:`build_scheduler`).
        batch_size: images per UNet batch (x2 with guidance).
        on_batch_end: called with the number of images done after each batch (progress).

    Returns:
        (N, 3, H, W) float32 in [0, 1], on the CPU.
    """
    prompts = list(prompts)
    count = len(prompts)
    seeds = list(range(count)) if seeds is None else [int(seed) for seed in seeds]
    if len(seeds) != count:
        raise ConfigError(f"{len(seeds)} seeds for {count} prompts: pass one seed per prompt.")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    height = height or default_size(backbone)
    width = width or default_size(backbone)
    check_sampling(backbone, steps, height, width)
    denoiser = _denoiser(backbone)
    device = first_parameter(denoiser).device
    tokens = None
    if adapter is not None:
        if references is None:
            raise ConfigError("an adapter needs reference images (references=(S, 3, h, w) in [0, 1]).")
        token = token or adapter.config.token
        encoder_device = next(adapter.parameters()).device
        tokens = adapter.encode(references.to(encoder_device, torch.float32))
        image_index = (
            [i % len(references) for i in range(count)] if image_index is None else list(image_index)
        )
        if len(image_index) != count or not all(0 <= i < len(references) for i in image_index):
            raise ConfigError(
                f"image_index must give, for each of the {count} prompts, a reference in [0, {len(references)})."
            )
    settings = dict(
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        negative_prompt=negative_prompt,
        scheduler=scheduler,
    )
    pipeline = _transformer_pipeline(backbone) if isinstance(backbone, TransformerBackbone) else None

    outputs = []
    for start in range(0, count, batch_size):
        chunk = prompts[start : start + batch_size]
        n = len(chunk)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[start : start + n]]
        bound = contextlib.nullcontext()
        if adapter is not None:
            masks = backbone.subject_masks(chunk, token)
            if not masks.any(-1).all():
                missing = [p for p, has in zip(chunk, masks.any(-1).tolist(), strict=True) if not has]
                raise ConfigError(f"the subject token {token!r} is not in the prompts {missing}.")
            binding = SubjectBinding(
                tokens=tokens,
                masks=masks.to(device),
                image_index=torch.tensor(image_index[start : start + n], device=tokens.device),
                scale=scale,
                token_weight=adapter.config.token_weight,
            )
            bound = _bound(adapter, [binding])
        with bound:
            if pipeline is None:
                images = _unet_images(backbone, chunk, generators, **settings)
            else:
                images = _transformer_images(pipeline, backbone, chunk, generators, **settings)
        outputs.append(images)
        if on_batch_end is not None:
            on_batch_end(n)
    return torch.cat(outputs)


def _unet_images(
    backbone: DiffusionBackbone,
    chunk: list[str],
    generators: list[torch.Generator],
    *,
    steps: int,
    guidance: float,
    height: int,
    width: int,
    negative_prompt: str,
    scheduler: str | None,
) -> Tensor:
    """One batch through the SD / SDXL denoising loop: (n, 3, H, W) in [0, 1], CPU."""
    unet = backbone.unet
    device, unet_dtype = first_parameter(unet).device, first_parameter(unet).dtype
    factor = backbone.vae_scale_factor
    use_guidance = guidance > 1.0
    n = len(chunk)
    cond = backbone.encode_prompts(chunk)
    embeds = cond.prompt_embeds
    pooled = cond.pooled_prompt_embeds
    if use_guidance:
        negative = _negative_conditioning(backbone, negative_prompt, n, cond)
        embeds = torch.cat([negative.prompt_embeds.to(embeds), embeds])
        if pooled is not None:
            pooled = torch.cat([negative.pooled_prompt_embeds.to(pooled), pooled])
    rows = 2 * n if use_guidance else n
    added = None
    if backbone.kind == "sdxl":
        sizes = torch.tensor([[height, width]] * rows)
        time_ids = backbone.time_ids(sizes, torch.zeros(rows, 2, dtype=torch.long), (height, width))
        added = {"text_embeds": pooled, "time_ids": time_ids.to(device, pooled.dtype)}

    latents = torch.cat(
        [
            torch.randn(
                (1, unet.config.in_channels, height // factor, width // factor),
                generator=g,
                dtype=embeds.dtype,
            )
            for g in generators
        ]
    ).to(device)
    noise_scheduler = build_scheduler(backbone, scheduler)
    noise_scheduler.set_timesteps(steps, device=device)
    latents = latents * noise_scheduler.init_noise_sigma
    step_parameters = inspect.signature(noise_scheduler.step).parameters
    step_kwargs = {"generator": generators} if "generator" in step_parameters else {}
    if "eta" in step_parameters:
        step_kwargs["eta"] = 0.0
    for t in noise_scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if use_guidance else latents
        model_input = noise_scheduler.scale_model_input(model_input, t)
        noise = unet(
            model_input.to(unet_dtype),
            t,
            encoder_hidden_states=embeds.to(unet_dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )[0].to(latents.dtype)
        if use_guidance:
            unconditional, conditional = noise.chunk(2)
            noise = unconditional + guidance * (conditional - unconditional)
        latents = noise_scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
    return backbone.decode_latents(latents).cpu()


def _transformer_pipeline(backbone: TransformerBackbone) -> Any:
    """A diffusers ``StableDiffusion3Pipeline`` / ``FluxPipeline`` holding the backbone's own modules (no
    copy), for its flow-matching loop, latent packing and guidance; prompts are encoded by the backbone."""
    text = {}
    for index, (tokenizer, encoder) in enumerate(
        zip(backbone.tokenizers, backbone.text_encoders, strict=True)
    ):
        suffix = f"_{index + 1}" if index else ""
        text[f"tokenizer{suffix}"], text[f"text_encoder{suffix}"] = tokenizer, encoder
    pipeline_class = diffusers.StableDiffusion3Pipeline if backbone.kind == "sd3" else diffusers.FluxPipeline
    pipeline = pipeline_class(
        transformer=backbone.transformer, vae=backbone.vae, scheduler=build_scheduler(backbone), **text
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _transformer_images(
    pipeline: Any,
    backbone: TransformerBackbone,
    chunk: list[str],
    generators: list[torch.Generator],
    *,
    steps: int,
    guidance: float,
    height: int,
    width: int,
    negative_prompt: str,
    scheduler: str | None,
) -> Tensor:
    """One batch through the SD3 / FLUX pipeline's loop: (n, 3, H, W) in [0, 1], CPU.

    SD3: classifier-free guidance with ``negative_prompt`` (the unconditional half first, which the
    adapter leaves without subject); FLUX: ``guidance`` is the transformer's distilled guidance input."""
    pipeline.scheduler = build_scheduler(backbone, scheduler)
    cond = backbone.encode_prompts(chunk)
    kwargs: dict[str, Any] = {}
    if backbone.kind == "sd3" and guidance > 1.0:
        negative = backbone.encode_prompts([negative_prompt] * len(chunk))
        kwargs.update(
            negative_prompt_embeds=negative.prompt_embeds,
            negative_pooled_prompt_embeds=negative.pooled_prompt_embeds,
        )
    output = pipeline(
        prompt_embeds=cond.prompt_embeds,
        pooled_prompt_embeds=cond.pooled_prompt_embeds,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        max_sequence_length=backbone.max_sequence_length,
        generator=generators,
        output_type="latent",  # decoded here, as the UNet's are (decode_latents)
        **kwargs,
    )
    latents = output.images
    if backbone.kind == "flux":
        latents = diffusers.FluxPipeline._unpack_latents(latents, height, width, backbone.vae_scale_factor)
    return backbone.decode_latents(latents).cpu()


@contextlib.contextmanager
def _bound(adapter: NestedAdapter, bindings: list[SubjectBinding]) -> Iterator[None]:
    """Bind subjects for the duration, then put back whatever was bound before (normally nothing)."""
    previous = list(adapter._bindings)
    adapter.set_subjects(bindings)
    try:
        yield
    finally:
        adapter._bindings = previous

"""Sample grids during training, from the modules already in memory.

:func:`sample_images` is a small denoising loop over a :class:`~nested.backbone.DiffusionBackbone` and an
attached :class:`~nested.adapter.NestedAdapter`: the training run's own UNet, VAE and text encoders, so no
second pipeline and no copy of the UNet is ever made. It reproduces the diffusers SD / SDXL pipelines
(classifier-free guidance with the unconditional half first, SDXL micro-conditioning, one generator per
image), so a grid at step N shows what ``nested generate`` would give with that adapter.

:class:`SampleGrid` (preset ``callbacks/samples.yaml``) runs it every N training steps on global rank 0 for
a fixed set of prompts x reference images x seeds, and logs the grid and the mean identity similarity and
prompt alignment (:mod:`nested.metrics`) to the Trainer's loggers.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from nested.adapter import NestedAdapter, SubjectBinding
from nested.backbone import DiffusionBackbone
from nested.tokens import subject_masks_for_tokenizers

__all__ = [
    "DEFAULT_PROMPTS",
    "IMAGE_EXTENSIONS",
    "Reference",
    "SampleGrid",
    "load_references",
    "make_grid",
    "sample_images",
    "save_png",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_PROMPTS = (
    "a photo of {token}",
    "{token} as an astronaut, cinematic lighting",
    "an oil painting of {token}",
    "{token} in a snowy forest",
)


# ----------------------------------------------------------------------------- references


@dataclass
class Reference:
    """A subject's reference image: ``image`` is (3, S, S) float32 in [0, 1]."""

    name: str
    image: Tensor


def _square(image: Tensor, size: int) -> Tensor:
    """(1, 3, H, W) -> (3, size, size): center square crop, resized (bicubic, antialiased)."""
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[..., top : top + side, left : left + side]
    if side != size:
        square = F.interpolate(square, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return square[0].clamp(0, 1)


def _is_shards(source: str | Sequence[str]) -> bool:
    if not isinstance(source, str):
        return True
    return source.endswith((".tar", ".json")) or ("{" in source and ".." in source) or "://" in source


def load_references(
    source: str | os.PathLike | Sequence[str],
    *,
    count: int | None = None,
    size: int = 224,
    token: str = "<subject>",
) -> list[Reference]:
    """The first ``count`` reference images of a folder of images or of (validation) shards.

    Args:
        source: a folder of images (sorted by name; the file stem is the subject's name), one image file,
            or shards: a ``shards.json``, a ``.tar``, a brace pattern or a list of tars. A shard sample's
            reference is its ``ref`` image, else the crop around its ``bbox``, else the whole image; its
            name is the sample key.
        count: how many (None: all).
        size: the side of the returned square images.
        token: the subject token written into shard captions (only used to read the shards).

    Raises:
        FileNotFoundError: nothing to read at ``source``. ValueError: no image found.
    """
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    from nested.pipeline import load_image

    if _is_shards(source if isinstance(source, (list, tuple)) else str(source)):
        from nested.data import build_stream
        from nested.domains import DomainSpec

        urls = list(source) if isinstance(source, (list, tuple)) else str(source)
        spec = DomainSpec(name="references", urls=urls, subject=token)
        stream = build_stream(
            [spec], train=False, resolution=max(8, -(-size // 8) * 8), reference_size=size, max_samples=count
        )
        references = []
        for sample in stream:
            references.append(Reference(str(sample["key"]), sample["reference"].float().clamp(0, 1)))
            if count is not None and len(references) >= count:
                break
    else:
        path = Path(source).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        else:
            raise FileNotFoundError(
                f"no reference images at {str(path)!r}: expected a folder of images, an image file, a shards.json, "
                "a .tar or a brace pattern of shards."
            )
        references = [
            Reference(file.stem, _square(load_image(file, file.name), size)) for file in files[:count]
        ]
    if not references:
        raise ValueError(
            f"no reference image found in {source!r} (image files: {', '.join(IMAGE_EXTENSIONS)})."
        )
    return references


# ----------------------------------------------------------------------------- denoising loop


def build_scheduler(backbone: DiffusionBackbone, name: str | None = None) -> Any:
    """A fresh inference scheduler from the base model's scheduler config.

    ``name``: a diffusers scheduler class name (``"DDIMScheduler"``, ``"EulerDiscreteScheduler"``...); None:
    the model's own scheduler class, except DDPM (made for 1000 steps), which is replaced by DDIM.
    """
    import diffusers

    config = dict(backbone.scheduler_config or backbone.noise_scheduler.config)
    name = name or config.get("_class_name") or "DDIMScheduler"
    if name == "DDPMScheduler":
        name = "DDIMScheduler"
    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise ValueError(
            f"unknown diffusers scheduler {name!r}; use e.g. 'DDIMScheduler' or 'EulerDiscreteScheduler'."
        )
    return scheduler_class.from_config(config)


def default_size(backbone: DiffusionBackbone) -> int:
    """The base model's native image side in pixels (``sample_size`` x the VAE's scale factor)."""
    sample_size = backbone.unet.config.sample_size
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return int(sample_size) * backbone.vae_scale_factor


def _negative_conditioning(backbone: DiffusionBackbone, negative_prompt: str, batch: int, cond: Any) -> Any:
    """The unconditional half: SDXL uses zeros for an empty negative prompt (``force_zeros_for_empty_prompt``)."""
    from nested.backbone import TextConditioning

    if backbone.kind == "sdxl" and not negative_prompt:
        pooled = cond.pooled_prompt_embeds
        return TextConditioning(
            prompt_embeds=torch.zeros_like(cond.prompt_embeds),
            pooled_prompt_embeds=None if pooled is None else torch.zeros_like(pooled),
            input_ids=[],
        )
    return backbone.encode_prompts([negative_prompt] * batch)


@torch.no_grad()
def sample_images(
    backbone: DiffusionBackbone,
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
        backbone: the frozen UNet, VAE, text encoders (the training run's own objects).
        adapter: an adapter attached to ``backbone.unet``, or None for the base model alone.
        prompts: N prompts; each must contain ``token`` when an adapter is given.
        references: (S, 3, h, w) subject images in [0, 1]; encoded once.
        token: the subject token (default: the adapter's).
        image_index: for each prompt, the reference it uses (default: ``i % S``).
        seeds: for each prompt, the seed of its initial noise (default: 0, 1, ...). Image i is the same
            whether generated alone or in a batch, as with diffusers' per-image generators.
        steps, guidance, negative_prompt: as in the diffusers pipelines (guidance <= 1: no CFG).
        height, width: pixels (default: the base model's size).
        scale: the subject's strength (0: plain text value, 1: nested value).
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
        raise ValueError(f"{len(seeds)} seeds for {count} prompts: pass one seed per prompt.")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}.")
    height = height or default_size(backbone)
    width = width or default_size(backbone)
    factor = backbone.vae_scale_factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}.")
    unet, vae = backbone.unet, backbone.vae
    device = unet.device
    tokens = None
    if adapter is not None:
        if references is None:
            raise ValueError("an adapter needs reference images (references=(S, 3, h, w) in [0, 1]).")
        token = token or adapter.config.token
        encoder_device = next(adapter.parameters()).device
        tokens = adapter.encode(references.to(encoder_device, torch.float32))
        image_index = (
            [i % len(references) for i in range(count)] if image_index is None else list(image_index)
        )
        if len(image_index) != count or not all(0 <= i < len(references) for i in image_index):
            raise ValueError(
                f"image_index must give, for each of the {count} prompts, a reference in [0, {len(references)})."
            )
    use_guidance = guidance > 1.0

    outputs = []
    for start in range(0, count, batch_size):
        chunk = prompts[start : start + batch_size]
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

        generators = [torch.Generator().manual_seed(seed) for seed in seeds[start : start + n]]
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

        bound = contextlib.nullcontext()
        if adapter is not None:
            masks = subject_masks_for_tokenizers(backbone.tokenizers, chunk, token)
            if not masks.any(-1).all():
                missing = [p for p, has in zip(chunk, masks.any(-1).tolist(), strict=True) if not has]
                raise ValueError(f"the subject token {token!r} is not in the prompts {missing}.")
            binding = SubjectBinding(
                tokens=tokens,
                masks=masks.to(device),
                image_index=torch.tensor(image_index[start : start + n], device=tokens.device),
                scale=scale,
            )
            bound = _bound(adapter, [binding])
        with bound:
            for t in noise_scheduler.timesteps:
                model_input = torch.cat([latents] * 2) if use_guidance else latents
                model_input = noise_scheduler.scale_model_input(model_input, t)
                noise = unet(
                    model_input.to(unet.dtype),
                    t,
                    encoder_hidden_states=embeds.to(unet.dtype),
                    added_cond_kwargs=added,
                    return_dict=False,
                )[0].to(latents.dtype)
                if use_guidance:
                    unconditional, conditional = noise.chunk(2)
                    noise = unconditional + guidance * (conditional - unconditional)
                latents = noise_scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        decoded = vae.decode(backbone.latent_unscaling(latents).to(vae.dtype), return_dict=False)[0]
        outputs.append((decoded.float() / 2 + 0.5).clamp(0, 1).cpu())
        if on_batch_end is not None:
            on_batch_end(n)
    return torch.cat(outputs)


@contextlib.contextmanager
def _bound(adapter: NestedAdapter, bindings: list[SubjectBinding]) -> Iterator[None]:
    """Bind subjects for the duration, then put back whatever was bound before (normally nothing)."""
    previous = list(adapter._bindings)
    adapter.set_subjects(bindings)
    try:
        yield
    finally:
        adapter._bindings = previous


# ----------------------------------------------------------------------------- grids


def make_grid(rows: Sequence[Sequence[Tensor]], padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile images (each (3, h, w) in [0, 1], all the same size) into one (3, H, W) grid.

    ``H = R * h + (R + 1) * padding`` and ``W = C * w + (C + 1) * padding`` for R rows of C images.
    """
    if not rows or not rows[0]:
        raise ValueError("make_grid needs at least one row with one image.")
    height, width = rows[0][0].shape[-2:]
    columns = max(len(row) for row in rows)
    grid = torch.full(
        (3, len(rows) * height + (len(rows) + 1) * padding, columns * width + (columns + 1) * padding),
        pad_value,
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image.shape[-2:] != (height, width):
                image = F.interpolate(
                    image[None].float(), size=(height, width), mode="bicubic", antialias=True
                )[0]
            top, left = padding + r * (height + padding), padding + c * (width + padding)
            grid[:, top : top + height, left : left + width] = image.float().clamp(0, 1)
    return grid


def to_uint8_hwc(image: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def save_png(image: Tensor, path: str | os.PathLike) -> Path:
    """Write a (3, H, W) [0, 1] image as PNG; returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8_hwc(image)).save(path)
    return path


# ----------------------------------------------------------------------------- the callback


@contextlib.contextmanager
def _preserved_state(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Restore every RNG (torch CPU/CUDA, numpy, random) and every module's train/eval flag afterwards."""
    modes = [(module, module.training) for root in modules for module in root.modules()]
    numpy_state, python_state = np.random.get_state(), random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        for module, training in modes:
            module.training = training


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` steps, generate a fixed grid with the training modules and log it.

    The grid has one row per reference image: the reference, then one image per (prompt, seed). It is
    generated on global rank 0 only, with the run's own UNet, VAE, text encoders and adapter (no second
    pipeline, no copy), with fixed seeds, so grids of successive steps are comparable. Nothing in it is a
    collective operation, so under DDP the other ranks simply go on (and wait at the next gradient sync).
    Training is unaffected: every RNG and the modules' train/eval flags are restored afterwards.

    Logged (step = the trainer's global step): the grid as ``samples/grid`` (TensorBoard ``add_image``, or
    ``log_image`` for loggers that have it, e.g. W&B; otherwise a PNG under ``<log_dir>/samples/``), and the
    means ``samples/identity_similarity`` (generated vs reference image embeddings) and
    ``samples/prompt_alignment`` (CLIP score vs the prompt with the token replaced by its class word).

    Args:
        every_n_steps: sample when ``global_step`` is a multiple of this.
        prompts: templates; ``{token}`` is replaced by the subject token.
        references: a folder of images or validation shards (``shards.json``, brace pattern, list); None:
            the DataModule's validation domain of the token (else its first training domain).
        num_references: rows of the grid (the first N references).
        seeds: one image per seed for every (reference, prompt).
        steps, guidance, negative_prompt, scheduler: the sampler (see :func:`sample_images`).
        height, width: pixels; None: the DataModule's ``resolution``, else the base model's size.
        scale: the subject's strength.
        token: the subject token; None: the adapter's.
        batch_size: images per UNet batch.
        reference_size: side of the reference images fed to the encoder and the identity metric.
        identity_model: folder / hub id of the identity embedder (:func:`nested.metrics.vision_embedder`);
            None: the adapter's own image backbone (no extra model; a CLIP-I-style measure).
        clip_model: folder / hub id of a full CLIP for prompt alignment; None: not measured. If it cannot be
            loaded, a warning is given and only the grid and identity are logged.
        sample_at_start: also sample before the first training step (step 0).
        save_png: also write every grid as a PNG under ``<log_dir>/samples/``.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        prompts: list[str] | None = None,
        references: str | list[str] | None = None,
        num_references: int = 2,
        seeds: list[int] | None = None,
        steps: int = 20,
        guidance: float = 5.0,
        negative_prompt: str = "",
        scheduler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        scale: float = 1.0,
        token: str | None = None,
        batch_size: int = 4,
        reference_size: int = 224,
        identity_model: str | None = None,
        clip_model: str | None = None,
        sample_at_start: bool = False,
        save_png: bool = False,
    ):
        problems = []
        if every_n_steps < 1:
            problems.append(f"every_n_steps={every_n_steps} must be >= 1")
        if num_references < 1:
            problems.append(f"num_references={num_references} must be >= 1")
        if steps < 1 or batch_size < 1:
            problems.append(f"steps={steps} and batch_size={batch_size} must be >= 1")
        prompts = list(prompts if prompts is not None else DEFAULT_PROMPTS)
        if not prompts:
            problems.append("prompts is empty: give at least one, e.g. 'a photo of {token}'")
        seeds = list(seeds if seeds is not None else [0])
        if not seeds:
            problems.append("seeds is empty: give at least one, e.g. [0]")
        for size in (height, width):
            if size is not None and (size < 8 or size % 8):
                problems.append(f"height/width {size} must be a positive multiple of 8")
        if problems:
            raise ValueError("invalid SampleGrid arguments:\n  - " + "\n  - ".join(problems))
        self.every_n_steps = every_n_steps
        self.prompts, self.references_source, self.num_references = prompts, references, num_references
        self.seeds, self.steps, self.guidance = seeds, steps, guidance
        self.negative_prompt, self.scheduler = negative_prompt, scheduler
        self.height, self.width, self.scale, self.token = height, width, scale, token
        self.batch_size, self.reference_size = batch_size, reference_size
        self.identity_model, self.clip_model = identity_model, clip_model
        self.sample_at_start, self.save_png = sample_at_start, save_png
        self.references: list[Reference] | None = None
        self.identity = None
        self.alignment = None
        self.last_grid: Tensor | None = None
        self.last_metrics: dict[str, float] = {}
        self._last_step = -1

    # ------------------------------------------------------------------------------ setup
    def _references_source(self, trainer: L.Trainer, token: str) -> str | list[str]:
        if self.references_source is not None:
            return self.references_source
        datamodule = getattr(trainer, "datamodule", None)
        for domains in (getattr(datamodule, "val_domains", None), getattr(datamodule, "domains", None)):
            if domains:
                spec = next((d for d in domains if d.subject == token), domains[0])
                return spec.urls
        raise ValueError(
            "SampleGrid has no reference images: set references (a folder of images or validation shards), or "
            "use a DataModule with val_domains."
        )

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Load the references and the metric models once, on rank 0."""
        from nested.metrics import IdentitySimilarity, PromptAlignment, VisionEmbedder, vision_embedder

        adapter: NestedAdapter = pl_module.adapter
        token = self.token or adapter.config.token
        if token not in adapter.config.tokens:
            raise ValueError(
                f"SampleGrid token {token!r} is not one the adapter learns ({sorted(adapter.config.tokens)})."
            )
        self.token = token
        source = self._references_source(trainer, token)
        self.references = load_references(
            source, count=self.num_references, size=self.reference_size, token=token
        )
        if self.identity_model:
            embedder = vision_embedder(self.identity_model, device=pl_module.device)
        else:
            encoder = adapter.encoder
            embedder = VisionEmbedder(
                encoder.backbone,
                crop=(encoder.image_size, encoder.image_size),
                mean=encoder.image_mean.flatten().tolist(),
                std=encoder.image_std.flatten().tolist(),
            )
        # Only rank 0 computes: never sync (a collective on one rank would hang DDP).
        self.identity = IdentitySimilarity(embedder, sync_on_compute=False)
        if self.clip_model:
            try:
                self.alignment = PromptAlignment(self.clip_model, sync_on_compute=False).to(pl_module.device)
            except (OSError, ValueError) as error:
                rank_zero_warn(f"SampleGrid: prompt alignment is not logged: {error}")
                self.alignment = None

    # ------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.sample_at_start and trainer.global_step == 0:
            self.log_samples(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_samples(trainer, pl_module)

    # ------------------------------------------------------------------------------ sampling
    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, dict[str, float]]:
        """Generate the grid with the module's backbone and adapter: ((3, H, W) grid, metric means)."""
        if self.references is None:
            self._prepare(trainer, pl_module)
        backbone: DiffusionBackbone = pl_module.backbone
        adapter: NestedAdapter = pl_module.adapter
        class_word = adapter.config.tokens[self.token]
        datamodule = getattr(trainer, "datamodule", None)
        resolution = getattr(datamodule, "resolution", None)
        height = self.height or resolution or default_size(backbone)
        width = self.width or resolution or default_size(backbone)

        prompts, image_index, seeds = [], [], []
        for r in range(len(self.references)):
            for template in self.prompts:
                for seed in self.seeds:
                    prompts.append(template.format(token=self.token))
                    image_index.append(r)
                    seeds.append(seed)
        references = torch.stack([reference.image for reference in self.references])
        with _preserved_state([pl_module, adapter]), trainer.precision_plugin.forward_context():
            pl_module.eval()
            images = sample_images(
                backbone,
                adapter,
                prompts,
                references,
                token=self.token,
                image_index=image_index,
                seeds=seeds,
                steps=self.steps,
                guidance=self.guidance,
                height=height,
                width=width,
                scale=self.scale,
                negative_prompt=self.negative_prompt,
                scheduler=self.scheduler,
                batch_size=self.batch_size,
            )
            metrics = {}
            self.identity.reset()
            self.identity.update(images, references[image_index])
            metrics["samples/identity_similarity"] = float(self.identity.compute())
            if self.alignment is not None:
                self.alignment.reset()
                self.alignment.update(images, [prompt.replace(self.token, class_word) for prompt in prompts])
                metrics["samples/prompt_alignment"] = float(self.alignment.compute())

        per_row = len(self.prompts) * len(self.seeds)
        rows = [
            [references[r], *images[r * per_row : (r + 1) * per_row]] for r in range(len(self.references))
        ]
        return make_grid(rows), metrics

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Generate and log the grid and metrics (global rank 0 only)."""
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        grid, metrics = self.generate(trainer, pl_module)
        self.last_grid, self.last_metrics = grid, metrics
        step = trainer.global_step
        shown = False
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples/grid", images=[to_uint8_hwc(grid)], step=step)
                shown = True
            elif hasattr(experiment, "add_image"):
                experiment.add_image("samples/grid", grid, global_step=step, dataformats="CHW")
                shown = True
            if metrics:
                logger.log_metrics(metrics, step=step)
        if self.save_png or not shown:
            root = next(
                (logger.log_dir for logger in trainer.loggers if getattr(logger, "log_dir", None)), None
            )
            path = save_png(grid, Path(root or trainer.default_root_dir) / "samples" / f"step={step:06d}.png")
            if not shown:
                rank_zero_info(f"nested: sample grid written to {path}")

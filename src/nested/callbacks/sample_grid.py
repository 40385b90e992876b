"""Sample grids during training, from the modules already in memory.

:func:`nested.inference.sampler.sample_images` generates images with the training run's own UNet or
SD3 / FLUX transformer, VAE, text encoders and adapter, as ``nested generate`` would; reference images and grids come from
:mod:`nested.evaluation.images`.

:class:`SampleGrid` (preset ``callbacks/samples.yaml``) runs it every N training steps on global rank 0 for
a fixed set of prompts x reference images x seeds, and logs the grid and the mean identity similarity and
prompt alignment (:mod:`nested.evaluation.metrics`) to the Trainer's loggers.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from nested.adapter import NestedAdapter
from nested.backbone import DiffusionBackbone, TransformerBackbone
from nested.callbacks.ema import averaged_weights
from nested.errors import ConfigError
from nested.evaluation.images import (
    Reference,
    load_references,
    make_grid,
    save_png,
    to_uint8_hwc,
)
from nested.evaluation.metrics import (
    IdentitySimilarity,
    PromptAlignment,
    VisionEmbedder,
    vision_embedder,
)
from nested.inference.sampler import check_sampling, default_guidance, default_size, sample_images
from nested.prompt_cache import PromptCache
from nested.signals import received_signals

__all__ = ["DEFAULT_PROMPTS", "SampleGrid"]

DEFAULT_PROMPTS = (
    "a photo of {token}",
    "{token} as an astronaut, cinematic lighting",
    "an oil painting of {token}",
    "{token} in a snowy forest",
)


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
    generated on global rank 0 only, with the run's own UNet or transformer, VAE, text encoders and adapter (no second
    pipeline, no copy), with fixed seeds, so grids of successive steps are comparable. Nothing in it is a
    collective operation, so under DDP the other ranks simply go on (and wait at the next gradient sync).
    Training is unaffected: every RNG and the modules' train/eval flags are restored afterwards. With
    :class:`~nested.callbacks.AdapterEMA`, the grid shows the averaged weights, which are the ones exported.

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
        steps, guidance, negative_prompt, scheduler: the sampler (see :func:`sample_images`); for FLUX,
            ``guidance`` is the distilled guidance input and ``negative_prompt`` is unused. ``guidance``
            None: the base model's default, as in ``nested generate`` (5 SD / SDXL, 7 SD3, 3.5 FLUX).
        height, width: pixels; None: the DataModule's ``resolution``, else the base model's size.
        scale: the subject's strength.
        token: the subject token; None: the adapter's.
        batch_size: images per UNet / transformer batch.
        reference_size: side of the reference images fed to the encoder and the identity metric.
        identity_model: folder / hub id of the identity embedder (:func:`nested.evaluation.metrics.vision_embedder`);
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
        guidance: float | None = None,
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
            raise ConfigError("invalid SampleGrid arguments:\n  - " + "\n  - ".join(problems))
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
        raise ConfigError(
            "SampleGrid has no reference images: set references (a folder of images or validation shards), or "
            "use a DataModule with val_domains."
        )

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Load the references and the metric models once, on rank 0."""

        adapter: NestedAdapter = pl_module.adapter
        token = self.token or adapter.config.token
        if token not in adapter.config.tokens:
            raise ConfigError(
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

    def prompts_for(self, token: str, kind: str) -> list[str]:
        """The prompts the grid encodes for ``token`` on a ``kind`` of base model: each template with it, and
        the negative prompt (not for FLUX, which draws without one)."""
        negative = [] if kind == "flux" else [self.negative_prompt]
        return [template.format(token=token) for template in self.prompts] + negative

    # ------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # What the first grid would refuse, hours in, refused now.
        check_sampling(pl_module.backbone, self.steps, *self._size(trainer, pl_module.backbone))
        text_encoder = pl_module.backbone.text_encoders[-1]
        if isinstance(text_encoder, PromptCache):  # fail now rather than at the first grid, hours in
            token = self.token or pl_module.adapter.config.token
            text_encoder.require(self.prompts_for(token, pl_module.backbone.kind), "SampleGrid")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.sample_at_start and trainer.global_step == 0 and not received_signals():
            self.log_samples(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # A pending stop signal skips the grid: the stop's checkpoint (PreemptionCheckpoint, which runs after
        # this callback) must not wait for it, within SLURM's warning. The grid has no collective in it, so one
        # rank skipping while another samples cannot hang them.
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step and not received_signals():
            self.log_samples(trainer, pl_module)

    # ------------------------------------------------------------------------------ sampling
    def _size(
        self, trainer: L.Trainer | None, backbone: DiffusionBackbone | TransformerBackbone
    ) -> tuple[int, int]:
        """The grid's (height, width) in pixels: as set, else the DataModule's resolution, else the model's."""
        resolution = getattr(getattr(trainer, "datamodule", None), "resolution", None)
        return (
            self.height or resolution or default_size(backbone),
            self.width or resolution or default_size(backbone),
        )

    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, dict[str, float]]:
        """Generate the grid with the module's backbone and adapter: ((3, H, W) grid, metric means)."""
        if self.references is None:
            self._prepare(trainer, pl_module)
        backbone: DiffusionBackbone | TransformerBackbone = pl_module.backbone
        adapter: NestedAdapter = pl_module.adapter
        class_word = adapter.config.tokens[self.token]
        height, width = self._size(trainer, backbone)

        prompts, image_index, seeds = [], [], []
        for r in range(len(self.references)):
            for template in self.prompts:
                for seed in self.seeds:
                    prompts.append(template.format(token=self.token))
                    image_index.append(r)
                    seeds.append(seed)
        references = torch.stack([reference.image for reference in self.references])
        with (
            _preserved_state([pl_module, adapter]),
            averaged_weights(trainer, pl_module),
            trainer.precision_plugin.forward_context(),
        ):
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
                guidance=self.guidance if self.guidance is not None else default_guidance(backbone),
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

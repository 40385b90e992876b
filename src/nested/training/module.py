"""The LightningModule: a frozen diffusion backbone, a trainable nested adapter, the diffusion loss.

UNet backbones (SD 1.x / 2.x, SDXL) train with their DDPM noise-prediction (or v-prediction) loss;
diffusion transformers (SD3 / SD3.5, FLUX.1) with the rectified-flow (flow-matching) loss they were
trained with: ``x_t = (1 - t) x_0 + t * noise``, target ``noise - x_0``.

What is trained: the adapter's resampler and nested projections (and, optionally, the placeholder
token embeddings). What is frozen and never checkpointed: the UNet or transformer, VAE, text encoder(s)
and the image backbone. They are held outside the module tree (:class:`~nested.encoder.FrozenModules`), so
``state_dict()``, ``parameters()``, DDP and weight averaging see only the trainable adapter; a resumed
run reloads them from their paths.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from nested.adapter import NestedAdapter, SubjectBinding, check_injection_options, compile_blocks
from nested.attention import InjectionMode, check_injection_mode, check_token_weight, check_value_norm_factor
from nested.backbone import (
    DiffusionBackbone,
    TransformerBackbone,
    first_parameter,
    latent_space,
    load_backbone,
)
from nested.data.prompts import check_prompt_sources
from nested.data.transforms import contains_subject
from nested.encoder import EncoderSpec, FrozenModules, SubjectEncoder, load_vision_backbone
from nested.errors import AdapterError, ConfigError, DataError, NestedUserError
from nested.quantize import check_quantize

__all__ = ["ConditioningDropout", "NestedAttentionModule"]

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The optimizer when none is configured: the recipes' AdamW.
DEFAULT_OPTIMIZER = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4, "weight_decay": 0.01}}
# Flow-matching timestep densities and loss weightings of diffusers' SD3 / FLUX training scripts
# (compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3); the SD3 paper's is logit_normal.
WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")
# The options only a diffusion transformer's flow-matching loss reads.
FLOW_MATCHING_OPTIONS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale")


@dataclasses.dataclass
class ConditioningDropout:
    """Classifier-free-guidance dropout, drawn independently per sample (exclusive events).

    Attributes:
        text: probability of dropping the caption only: it becomes the subject token alone, so the subject
            image still conditions.
        image: probability of dropping the subject image only (the caption keeps its token).
        both: probability of dropping caption and image together.
    """

    text: float = 0.05
    image: float = 0.05
    both: float = 0.05

    def __post_init__(self) -> None:
        if min(self.text, self.image, self.both) < 0 or self.text + self.image + self.both > 1:
            raise ConfigError(f"dropout probabilities must be >= 0 and sum to <= 1, got {self}.")

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """-> (drop_text, drop_image): (B,) bool each; 'both' sets the two."""
        u = torch.rand(batch_size, generator=generator)
        drop_text_only = u < self.text
        drop_image_only = (u >= self.text) & (u < self.text + self.image)
        drop_both = (u >= self.text + self.image) & (u < self.text + self.image + self.both)
        return drop_text_only | drop_both, drop_image_only | drop_both


class NestedAttentionModule(L.LightningModule):
    """Train a nested-attention adapter on a frozen SD 1.x/2.x, SDXL, SD3 / SD3.5 or FLUX.1 backbone.

    Args:
        base_model: diffusers folder or hub id of the frozen base (e.g.
            ``stabilityai/stable-diffusion-xl-base-1.0``, ``black-forest-labs/FLUX.1-dev``).
        encoder: the subject encoder (image backbone + resampler size, M = ``num_tokens``).
        subjects: every subject token the adapter learns, mapped to its class word, e.g.
            ``{"<person>": "person"}``; a token equal to its class word needs no new embedding.
            The first is the adapter's default token. Each sample binds to its batch ``subjects`` entry.
        value_norm_factor: rescaling of the nested values relative to ||V_s|| (None: off).
        token_weight: multiplies the subject column's attention probability during training (the
            official demo's ``special_token_weight``, which it applies at inference): > 1 widens the channel
            nested attention drives the UNet through. Saved in the adapter, whose inference uses it by
            default. Nested injection only.
        train_token_embeddings: also train the placeholder tokens' input embeddings (``<person>``, initialised
            from the class word), textual-inversion style; the text encoders stay frozen. One embedding shared
            by every subject, so it cannot carry an identity: it learns how the token is read, e.g. how much
            attention it draws. Saved in the adapter. Needs a placeholder token, not a vocabulary word.
        init_from_base: start each layer's nested key and value projections as the layer's own projections
            of the text, as IP-Adapter starts its image projections, instead of at random: the subject tokens
            then begin in the text space the UNet reads. Needs ``encoder.output_dim`` equal to the input width
            of the layers' text projections (SD 1.5: 768, SDXL: 2048; SD3 / FLUX: the blocks' width). Only the
            start of training: resuming loads the weights.
        init_adapter: an exported adapter (a folder, e.g. another run's ``adapters/last``, or a Hub repo
            id, ``user/repo@revision`` to pin one) whose resampler and nested projections start training
            instead of random ones, with its trained embeddings of the placeholders this run also has:
            fine-tuning it on another domain, or going on with another learning rate or schedule (which a
            resumed run refuses). It must have been trained on a base of the same architecture with the same
            encoder sizes. Excludes ``init_from_base``. ``nested fit`` does not read it when the run resumes
            from a checkpoint, whose weights replace it.
        injection: ``"nested"`` (the method) or ``"decoupled"`` (IP-Adapter-style decoupled
            cross-attention with the same encoder and per-layer projections, for ablations; needs
            ``value_norm_factor: null``). Recorded in the exported adapter's config.
        domain: recorded in the exported adapter.
        dropout: classifier-free-guidance dropout of text / image / both.
        min_snr_gamma: min-SNR loss weighting (> 0; None: plain MSE). UNet backbones only: a diffusion
            transformer refuses it, as a UNet refuses the flow-matching options below set to other than
            their defaults.
        noise_offset: adds ``noise_offset * N(0, 1)`` per sample and channel to the noise.
        weighting_scheme: diffusion transformers: how the flow-matching time t is drawn and the loss
            weighted, as diffusers' SD3 / FLUX trainers do: ``logit_normal`` (the SD3 paper's: t =
            sigmoid(N(logit_mean, logit_std)), unweighted loss), ``mode`` (mode_scale), ``none``
            (uniform), ``sigma_sqrt`` / ``cosmap`` (uniform t, weighted loss). t then goes through the
            scheduler's shift: SD3's fixed ``shift``, FLUX's resolution-dependent one.
        logit_mean, logit_std (> 0): of ``logit_normal``; mode_scale: of ``mode``.
        guidance_scale: the guidance input of a guidance-distilled transformer (FLUX.1-dev) during
            training (diffusers' FLUX trainers: 3.5); ignored by the others.
        max_sequence_length: T5 tokens of a diffusion transformer's prompts (None: the pipeline's, 256
            for SD3 and 512 for FLUX); shorter is cheaper when captions are short.
        frozen_dtype: dtype of the frozen backbone ("bfloat16" on GPUs). With "float16", a VAE flagged
            ``force_upcast`` (SDXL's, which overflows in fp16; a VAE without the flag counts as flagged) stays
            float32. The VAE runs in its own dtype, outside the training step's autocast.
        quantize: stores the named frozen models' linear weights in 8 bits as they load (torchao
            weight-only, :mod:`nested.quantize`; the ``quantize`` extra), halving their memory in bf16:
            ``{"transformer": "int8", "text_encoder_2": "int8"}`` (FLUX.1's transformer and T5). Keys are
            the checkpoint's component names (``unet`` or ``transformer``, ``text_encoder``...), formats
            ``int8`` or ``float8``. The frozen outputs drift by the rounding of the weights; the adapter's
            own weights are not quantized.
        prompt_cache: a folder of T5's prompt states computed ahead by ``nested prompts`` with this
            configuration (SD3 / FLUX; :mod:`nested.prompt_cache`): T5 is then not loaded, which saves its
            weights (T5-XXL: 8.9 GiB in bf16, 4.6 GiB in int8), and each prompt's states are read from the
            folder. Training starts only if the cache was built for every configured domain (train and
            validation), and a prompt that is not in it ends the run with an error naming it.
        gradient_checkpointing: checkpoint the frozen UNet's or transformer's blocks (less activation
            memory, one more forward of the frozen model per step: ~30-50% slower).
        compile: ``torch.compile`` the frozen UNet or transformer in place, nested layers included, forward
            and backward; the text encoders, image backbone and VAE stay eager (transformers' models break
            the graph in their output wrappers). The first step compiles (minutes for SDXL on a GPU); every
            later step reuses the graph, whichever samples dropout unbinds. Worth it where an eager step
            waits on the host launching small kernels, as SDXL's did on an H200. Compiled, each subject
            token's term is computed for every sample: an adapter of K tokens does K times the nested work
            of eager training, which computes each token's term for its own samples. A dict is passed to
            ``torch.compile`` as its keyword arguments (e.g. ``{"mode": "max-autotune-no-cudagraphs"}``),
            except ``regional: true``, which compiles each transformer block on its own instead of the whole
            model (:func:`~nested.adapter.compile_blocks`): a fraction of the compile time, the convolutions
            and the rest of the model eager.
        optimizer: ``{"class_path": ..., "init_args": {...}}`` of a torch optimizer; a config's top-level
            ``optimizer:`` section lands here (the one place to set the learning rate). None: AdamW(lr=1e-4,
            weight_decay=0.01). It is built over the adapter's trainable parameters when training starts:
            they exist only once the base model is loaded.
        lr_scheduler: the same for a torch LR scheduler (the config's ``lr_scheduler:``), stepped after
            every optimizer step; None: a constant learning rate.
        seed: seeds the per-step randomness (dropout, noise, timesteps) with the global step, so
            a resumed run draws the same numbers as an uninterrupted one; torch's, numpy's and
            Python's global generators are reseeded the same way before every training step.
    """

    def __init__(
        self,
        base_model: str,
        encoder: EncoderSpec,
        subjects: dict[str, str] | None = None,
        value_norm_factor: float | None = None,
        token_weight: float = 1.0,
        train_token_embeddings: bool = False,
        init_from_base: bool = False,
        init_adapter: str | None = None,
        injection: InjectionMode = "nested",
        domain: str = "",
        dropout: ConditioningDropout | None = None,
        min_snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        guidance_scale: float = 3.5,
        max_sequence_length: int | None = None,
        frozen_dtype: str = "float32",
        quantize: dict[str, str] | None = None,
        prompt_cache: str | None = None,
        gradient_checkpointing: bool = False,
        compile: bool | dict[str, Any] = False,
        seed: int = 0,
        optimizer: dict[str, Any] | None = None,
        lr_scheduler: dict[str, Any] | None = None,
    ):
        super().__init__()
        if frozen_dtype not in _DTYPES:
            raise ConfigError(f"frozen_dtype must be one of {sorted(_DTYPES)}, got {frozen_dtype!r}.")
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ConfigError(
                f"model.weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, got {weighting_scheme!r}."
            )
        if logit_std <= 0:
            raise ConfigError(
                f"model.logit_std must be > 0 (the spread of logit-normal times), got {logit_std}."
            )
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ConfigError(
                f"model.min_snr_gamma must be > 0 (5 in the min-SNR paper) or null for no weighting, got "
                f"{min_snr_gamma}."
            )
        # Checked here, not when the adapter is built in configure_model: a bad config fails at startup.
        check_injection_mode(injection, "model.injection")
        check_token_weight(token_weight, "model.token_weight")
        check_value_norm_factor(value_norm_factor, "model.value_norm_factor")
        check_injection_options(
            injection, token_weight=token_weight, value_norm_factor=value_norm_factor, source="model"
        )
        # Hyper-parameters as plain data, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["encoder", "dropout"])
        self.hparams["encoder"] = encoder.to_dict()
        self.hparams["dropout"] = dataclasses.asdict(dropout or ConditioningDropout())
        self.base_model = base_model
        self.encoder_spec = encoder
        self.subjects = dict(subjects if subjects is not None else {"<person>": "person"})
        if not self.subjects:
            raise ConfigError("model.subjects must name at least one token, e.g. {'<person>': 'person'}.")
        self.dropout = dropout or ConditioningDropout()
        self.min_snr_gamma = min_snr_gamma
        self.noise_offset = noise_offset
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length
        self.frozen_dtype = _DTYPES[frozen_dtype]
        self.quantize = check_quantize(quantize, "model.quantize")
        self.prompt_cache = prompt_cache
        self.gradient_checkpointing = gradient_checkpointing
        self.compile_options = _compile_options(compile)
        self.seed = seed
        self._subjects_cut = 0  # captions whose subject the text window cut, in this process (warned)
        self.optimizer_config = optimizer or DEFAULT_OPTIMIZER
        self.lr_scheduler_config = lr_scheduler
        self.value_norm_factor = value_norm_factor
        self.token_weight = token_weight
        self.train_token_embeddings = train_token_embeddings
        if init_from_base and init_adapter is not None:
            raise ConfigError(
                "model.init_from_base and model.init_adapter both say where the nested projections start: "
                "set one of them."
            )
        self.init_from_base = init_from_base
        self.init_adapter = init_adapter
        self.injection = injection
        self.domain = domain
        self.frozen: FrozenModules | None = None
        self.adapter: NestedAdapter | None = None

    # ------------------------------------------------------------------------------- model
    def setup(self, stage: str) -> None:
        # Before configure_model loads the models: a domain this module cannot learn is refused now.
        datamodule = self.trainer.datamodule
        domains = [*getattr(datamodule, "domains", []), *getattr(datamodule, "val_domains", [])]
        for spec in domains:
            if spec.subject not in self.subjects:
                raise ConfigError(
                    f"data domain {spec.name!r} binds its subjects to {spec.subject!r}, but the model learns only "
                    f"{', '.join(self.subjects)}: set the domain's subject to one of these, or add it to "
                    f"model.subjects with its class word (e.g. {spec.subject!r}: 'dog')."
                )
        if self.prompt_cache is not None:
            # Every configured domain's captions must be in the cache: found missing now, not hours into the run.
            check_prompt_sources(self.prompt_cache, domains)

    def configure_model(self) -> None:
        """Load the frozen parts and build the adapter (once; idempotent)."""
        if self.adapter is not None:
            return
        backbone = load_backbone(
            self.base_model,
            dtype=self.frozen_dtype,
            max_sequence_length=self.max_sequence_length,
            quantize=self.quantize,
            prompt_cache=self.prompt_cache,
        )
        if isinstance(backbone, TransformerBackbone) and self.min_snr_gamma is not None:
            raise ConfigError(
                f"model.min_snr_gamma weights a DDPM loss; {self.base_model} trains with flow matching: remove "
                "it and choose model.weighting_scheme instead."
            )
        defaults = inspect.signature(type(self).__init__).parameters
        guidance_set = self.guidance_scale != defaults["guidance_scale"].default
        if isinstance(backbone, TransformerBackbone) and guidance_set and not backbone.takes_guidance:
            raise ConfigError(
                f"model.guidance_scale={self.guidance_scale:g} is the guidance input of a guidance-distilled "
                f"transformer (FLUX.1-dev); {self.base_model}'s has no guidance embedding (SD3, FLUX.1-schnell) "
                "and would ignore it: remove it."
            )
        if isinstance(backbone, DiffusionBackbone):
            changed = [
                name for name in FLOW_MATCHING_OPTIONS if getattr(self, name) != defaults[name].default
            ]
            if changed:
                raise ConfigError(
                    f"model.{', model.'.join(changed)}: flow-matching options of SD3 / FLUX; {self.base_model} is a "
                    "UNet trained on its scheduler's noise or v-prediction, which they would not change: remove them."
                )
        image_backbone = load_vision_backbone(self.encoder_spec, dtype=self.frozen_dtype)
        self.build_adapter(backbone, image_backbone)

    def build_adapter(self, backbone: DiffusionBackbone | TransformerBackbone, image_backbone: tuple) -> None:
        """Build the adapter on frozen parts that are already loaded, and attach it to their UNet or
        transformer.

        :meth:`configure_model` loads them from ``base_model`` and ``encoder.backbone``; benchmarks and
        notebooks that hold them in memory call this instead. ``image_backbone`` is
        ``(model, image_size, mean, std)``, as :func:`~nested.encoder.load_vision_backbone` returns it.
        """
        denoiser = _denoiser(backbone)
        if self.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        (token, class_word), *extra = self.subjects.items()
        adapter = NestedAdapter.for_unet(
            denoiser,
            token=token,
            class_word=class_word,
            encoder=self.encoder_spec,
            subject_encoder=SubjectEncoder.from_spec(self.encoder_spec, backbone=image_backbone),
            value_norm_factor=self.value_norm_factor,
            injection=self.injection,
            domain=self.domain,
            base_model=self.base_model,
        )
        if self.init_from_base:
            adapter.init_projections_from(denoiser)
        adapter.config.extra_tokens = dict(extra)
        adapter.config.token_weight = self.token_weight
        if self.init_adapter is not None:  # before add_tokens: its trained token embeddings come too
            self._init_weights_from(adapter)
        adapter.add_tokens(*backbone.placeholder_text_encoders)
        if self.train_token_embeddings:
            adapter.train_token_embeddings(*backbone.placeholder_text_encoders)
        adapter.attach(denoiser)
        if self.compile_options is not None:
            # In place, after attach: the compiled forward (and its pre-hooks) runs the nested processors.
            options = dict(self.compile_options)
            if (
                options.get("regional")
                and "transformer" in self.quantize
                and getattr(backbone, "kind", None) == "flux"
            ):
                # AOT autograd refuses a graph whose outputs alias each other once its weights are tensor
                # subclasses, and a FLUX single-stream block returns two views of one tensor.
                raise ConfigError(
                    "model.compile {regional: true} cannot train FLUX.1 with its transformer in model.quantize: "
                    "torch cannot compile its single-stream blocks one by one for training when their weights "
                    "are quantized. Use model.compile: true (the whole transformer), or leave the transformer "
                    "out of model.quantize."
                )
            if options.pop("regional", False):
                compile_blocks(denoiser, **options)
            else:
                denoiser.compile(**options)
        modules = {"unet" if isinstance(backbone, DiffusionBackbone) else "transformer": denoiser}
        modules["vae"] = backbone.vae
        modules.update({f"text_encoder_{i}": encoder for i, encoder in enumerate(backbone.text_encoders)})
        # The sigmas of the training timesteps, never changed by a sampler's set_timesteps on the backbone's.
        training_scheduler = copy.deepcopy(backbone.noise_scheduler)
        self.frozen = FrozenModules(backbone=backbone, training_scheduler=training_scheduler, **modules)
        self.adapter = adapter

    def _init_weights_from(self, adapter: NestedAdapter) -> None:
        """``model.init_adapter``'s weights into ``adapter``; a setting it was trained with that differs from
        this run's is named (the weights still fit)."""
        theirs = adapter.init_weights_from(self.init_adapter)
        ours = adapter.config
        differences = [
            f"{what} {theirs_value!r} (this run: {our_value!r})"
            for what, theirs_value, our_value in (
                ("image encoder", theirs.encoder.backbone, ours.encoder.backbone),
                ("injection", theirs.injection, ours.injection),
            )
            if theirs_value != our_value
        ]
        if differences:
            rank_zero_warn(
                f"nested: model.init_adapter {self.init_adapter} was trained with {'; '.join(differences)}: its "
                "weights start this run all the same"
            )

    @property
    def backbone(self) -> DiffusionBackbone | TransformerBackbone:
        return self.frozen.backbone

    def _apply(self, fn, recurse: bool = True):
        if self.frozen is not None:
            self.frozen.apply(fn)  # frozen modules follow .to(device); they are not submodules
        return super()._apply(fn, recurse)

    def configure_optimizers(self) -> Any:
        optimizer = _instantiate("optimizer", self.adapter.trainable_parameters(), self.optimizer_config)
        if self.lr_scheduler_config is None:
            return optimizer
        scheduler = _instantiate("lr_scheduler", optimizer, self.lr_scheduler_config)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()  # the adapter must exist before its state is loaded
        # These settings keep the same tensors, so the tensor check below cannot tell them apart: a resumed
        # ablation must not silently switch mode, and a trained embedding changes the optimizer's groups. A
        # resumed fit must also keep token_weight and value_norm_factor, which its export records as the ones
        # it was trained with (a validation may try others). Checkpoints from before an option have no key and
        # were trained with its default.
        fitting = self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING
        recorded = checkpoint.get("hyper_parameters") or {}
        options = [("injection", "nested"), ("train_token_embeddings", False)]
        if fitting:
            options += [("token_weight", 1.0), ("value_norm_factor", None)]
        for option, default in options:
            trained, configured = recorded.get(option, default), getattr(self, option)
            if trained != configured:
                self._refuse_checkpoint(
                    f"it was trained with {option}={trained!r}, this model is configured with "
                    f"{option}={configured!r} (set model.{option}: {_yaml_scalar(trained)} to resume it)"
                )
        averaging = any(
            isinstance(c, WeightAveraging) for c in getattr(self._trainer, "callbacks", None) or []
        )
        if "current_model_state" in checkpoint and not averaging:
            # Its state_dict holds the average: loaded as the trained weights, training would go on from there.
            self._refuse_checkpoint(
                "it was written with an average of the weights (callbacks/ema.yaml: AdapterEMA), which this run "
                "lacks (add --config callbacks/ema.yaml to resume it)"
            )
        # FSDP loads the (full) state dict itself and removes it before this hook.
        if "state_dict" in checkpoint:
            self._check_checkpoint_tensors(checkpoint["state_dict"], recorded)
        self._check_same_functions(recorded)
        if not fitting:
            return
        # Lightning loads the optimizer's and the schedule's states over the ones configured now: a changed
        # learning rate or schedule would be ignored, or meet a state it does not fit. Of a class's arguments,
        # only those both sides name count: they differ between torch versions (LinearLR's `verbose`), and
        # jsonargparse records every one.
        changed = _changed_settings(
            {
                "optimizer": recorded.get("optimizer") or DEFAULT_OPTIMIZER,
                "lr_scheduler": recorded.get("lr_scheduler"),
            },
            {"optimizer": self.optimizer_config, "lr_scheduler": self.lr_scheduler_config},
            keys=("optimizer", "lr_scheduler"),
            common_only=True,
        )
        if changed and "optimizer" in recorded:
            self._refuse_checkpoint(
                f"a resume restores the optimizer and its learning-rate schedule as the checkpoint holds them, and "
                f"these settings differ from it: {', '.join(changed)} (to train on from its weights with them, "
                "start a new run with --model.init_adapter set to this run's adapters/last)"
            )
        self._check_epochs_left(checkpoint)

    def _check_same_functions(self, recorded: dict[str, Any]) -> None:
        """Refuse an encoder that computes another function with tensors of the same shapes (its attention's
        heads, the vision layer it reads), and warn when the frozen models come from elsewhere: the same
        weights moved (a local copy of a Hub id) resume as they are, other ones would not fit what was trained."""
        changed = _changed_settings(recorded, self.hparams, keys=("encoder",))
        refused = [c for c in changed if c.startswith(("encoder.heads:", "encoder.feature_layer:"))]
        if refused:
            self._refuse_checkpoint(f"it was trained with another encoder: {', '.join(refused)}")
        moved = _changed_settings(recorded, self.hparams, keys=("base_model",))
        moved += [
            c
            for c in changed
            if c.startswith(("encoder.backbone:", "encoder.subfolder:", "encoder.revision:"))
        ]
        if moved:
            rank_zero_warn(
                f"the checkpoint was trained with frozen models from elsewhere: {', '.join(moved)}. It resumes "
                "with these; if they are not the same weights, the adapter does not fit them."
            )

    def _check_checkpoint_tensors(self, state_dict: dict[str, Tensor], recorded: dict[str, Any]) -> None:
        """Refuse a checkpoint whose adapter tensors do not fit this model, or hold NaN or infinity."""
        expected = {name: tuple(value.shape) for name, value in self.state_dict().items()}
        found = {name: tuple(value.shape) for name, value in state_dict.items()}
        if expected != found:
            differences = [
                f"{name} is {list(found[name])} there, {list(shape)} here"
                for name, shape in sorted(expected.items())
                if name in found and found[name] != shape
            ]
            differences += [f"{name} is missing" for name in sorted(expected.keys() - found.keys())]
            differences += [f"{name} is unexpected" for name in sorted(found.keys() - expected.keys())]
            shown = "; ".join(differences[:3]) + (
                f"; {len(differences) - 3} more" if len(differences) > 3 else ""
            )
            changed = _changed_settings(recorded, self.hparams)
            self._refuse_checkpoint(
                f"its adapter does not fit this model's ({shown}); "
                + (
                    f"settings that differ: {', '.join(changed)}"
                    if changed
                    else "was it trained with a different base model, encoder or token list?"
                )
            )
        for name, tensor in state_dict.items():
            # Torch reads a damaged tensor without complaint; the divergence guard never lets a run save one.
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise AdapterError(
                    f"cannot resume from the checkpoint {self._trainer.ckpt_path if self._trainer else ''}: its "
                    f"tensor {name} holds NaN or infinite values (a damaged file?); resume from an earlier "
                    "checkpoint with --ckpt_path."
                )

    def _check_epochs_left(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a resume that ``trainer.max_epochs`` would end before its first step, short of ``max_steps``.

        A fit that ``max_steps`` ends records its epoch as finished, even where the epoch had batches left: with
        ``max_epochs: 1`` (the smoke and demo configs) a run extended by a higher ``max_steps`` trains nothing.
        """
        trainer = self._trainer
        if trainer is None or trainer.max_epochs in (None, -1):
            return
        epoch, step = checkpoint.get("epoch", 0), checkpoint.get("global_step", 0)
        epoch_batches = getattr(trainer.datamodule, "epoch_batches", None)
        if epoch_batches is not None:
            steps_per_epoch = math.ceil(epoch_batches(trainer.world_size) / trainer.accumulate_grad_batches)
            if step >= trainer.max_epochs * steps_per_epoch:
                return  # the epochs ended the run, not max_steps: started again, it has nothing to train
        if epoch >= trainer.max_epochs and trainer.max_steps != -1 and step < trainer.max_steps:
            raise ConfigError(
                f"the checkpoint {trainer.ckpt_path} ends epoch {epoch} at step {step}, and trainer.max_epochs="
                f"{trainer.max_epochs} ends the run there, before trainer.max_steps={trainer.max_steps}: pass "
                "--trainer.max_epochs=-1 to train on to max_steps."
            )

    def _refuse_checkpoint(self, why: str) -> None:
        """A checkpoint that cannot resume this model: one line naming it, why, and how to start over."""
        path = self._trainer.ckpt_path if self._trainer is not None else None
        raise AdapterError(
            f"cannot resume from the checkpoint {path or ''}: {why}. Resume it with the configuration it was "
            "trained with, or start a new run in another --trainer.default_root_dir (nested fit resumes from the "
            "newest checkpoint under it)."
        )

    # --------------------------------------------------------------------------- training
    def _step_seed(self, offset: int = 0) -> int:
        """A seed determined by (seed, global step, rank, offset): resumable, distinct per rank/micro-batch."""
        key = f"step:{self.seed}:{self.global_step}:{self.global_rank}:{offset}"
        return random.Random(key).getrandbits(63)  # str seeds are hashed with sha512: stable everywhere

    def _generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator determined by (seed, global step, rank, offset): resumable and per-rank."""
        return torch.Generator().manual_seed(self._step_seed(offset))

    def _micro_batch(self, batch_idx: int) -> int:
        """Index of this batch inside its gradient-accumulation window (0 without accumulation)."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return batch_idx % accumulate

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Anything that draws from the global generators (a library, a dropout layer) draws the
        # same numbers in a resumed run as in an uninterrupted one: they restart at every step.
        seed = self._step_seed(1_000 + self._micro_batch(batch_idx))
        torch.manual_seed(seed)  # also seeds every CUDA device
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def diffusion_loss(
        self, batch: dict[str, Any], generator: torch.Generator, apply_dropout: bool = True
    ) -> dict[str, Tensor]:
        """Diffusion loss of one batch (a UNet's noise / v-prediction, a transformer's flow matching);
        returns {"loss", "subject_fraction" (the share of samples with a bound subject), "subject_cut" (the
        number of captions naming a subject only past what the text encoders read)}."""
        backbone, adapter = self.backbone, self.adapter
        captions: list[str] = list(batch["captions"])
        subjects: list[str] = list(batch["subjects"])
        batch_size = len(captions)
        unknown = sorted(set(subjects) - set(self.subjects))
        if unknown:
            raise ConfigError(
                f"batch binds to tokens {unknown}, but the module learns only {sorted(self.subjects)}."
            )
        device = self.device

        if apply_dropout:
            drop_text, drop_image = self.dropout.sample(batch_size, generator)
        else:
            drop_text = drop_image = torch.zeros(batch_size, dtype=torch.bool)
        # Dropping the text keeps the subject token alone as the caption: nested attention reaches the
        # image only through that token, so an empty caption would drop the image as well.
        captions = [
            ("" if no_image else subject) if no_text else caption
            for caption, subject, no_text, no_image in zip(
                captions, subjects, drop_text.tolist(), drop_image.tolist(), strict=True
            )
        ]

        with torch.no_grad():
            if "latents" in batch:
                latents = batch["latents"].to(device, torch.float32)
                self._check_cached_latents(latents, batch.get("latents_space") or [])
            else:
                pixels = batch["pixel_values"].to(device, first_parameter(backbone.vae).dtype)
                latents = backbone.encode_images(pixels, generator=generator).float()
        # The frozen text encoders need a graph only to carry gradients to trained placeholder embeddings.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_token_embeddings):
            conditioning = backbone.encode_prompts(captions)

        noise = torch.randn(latents.shape, generator=generator).to(device)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(
                latents.shape[:2] + (1, 1), generator=generator
            ).to(device)
        flow = isinstance(backbone, TransformerBackbone)
        if flow:
            sigmas = self.flow_sigmas(latents.shape, generator).to(device)
            noisy = (1 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise
        else:
            scheduler = backbone.noise_scheduler
            timesteps = torch.randint(
                0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator
            ).to(device)
            noisy = scheduler.add_noise(latents, noise, timesteps)

        # Subject tokens for every sample (even dropped ones) so every adapter weight takes part
        # in every step: DDP then needs no find_unused_parameters.
        tokens = adapter.encode(batch["reference"].to(device))
        bindings = []
        keep = ~drop_image
        cut = 0  # samples whose caption names the token only past what the text encoders read
        for token in self.subjects:
            rows = torch.tensor([s == token for s in subjects]) & keep
            masks = backbone.subject_masks(captions, token) & rows[:, None]
            for caption, meant, bound in zip(captions, rows.tolist(), masks.any(-1).tolist(), strict=True):
                cut += meant and not bound and contains_subject(caption, token)
            # Compiled, every sample is computed (dense): dropout unbinds other samples at every step, and a
            # layer that selected the bound ones would compile a graph per pattern.
            bindings.append(
                SubjectBinding(
                    tokens=tokens,
                    masks=masks.to(device),
                    token_weight=self.token_weight,
                    dense=self.compile_options is not None,
                )
            )
        adapter.set_subjects(bindings)
        denoiser = _denoiser(backbone)
        try:
            if flow:
                prediction = self.transformer_prediction(noisy, sigmas, conditioning)
            else:
                prediction = self._unet_prediction(batch, noisy, timesteps, conditioning)
            # Zero-weighted use of every nested projection: keeps DDP's gradient buckets complete
            # when dropout removed every subject of a rank's batch.
            participation = sum(stack.sum() for b in bindings for stack in b.projections) * 0.0
        finally:
            # Gradient checkpointing re-runs the denoiser's blocks during backward(), and they must see the
            # same subjects (unbound, the re-run takes the plain-attention path and torch raises
            # CheckpointError): then they stay bound until on_after_backward.
            if not (torch.is_grad_enabled() and denoiser.is_gradient_checkpointing):
                adapter.clear_subjects()

        if flow:
            # Rectified flow: the velocity d x_t / d t, weighted as diffusers' SD3 / FLUX trainers do.
            weights = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)
            squared = (prediction - (noise - latents)) ** 2
            per_sample = weights * squared.mean(dim=(1, 2, 3))
        else:
            per_sample = self._unet_loss(prediction, latents, noise, timesteps)
        subject_fraction = torch.stack([b.masks.any(-1) for b in bindings]).any(0).float().mean()
        return {
            "loss": per_sample.mean() + participation,
            "subject_fraction": subject_fraction,
            "subject_cut": cut,
        }

    def _report_subjects_cut(self, count: int) -> None:
        """Warn of captions whose subject token lies past the text encoders' window (the 1st, 2nd, 4th, 8th...
        of this process): their subject is never bound, and a long caption gives no other sign of it."""
        before = self._subjects_cut
        self._subjects_cut += count
        if self._subjects_cut.bit_length() > before.bit_length():
            window = (
                "CLIP's 77 tokens"
                if isinstance(self.backbone, DiffusionBackbone)
                else f"model.max_sequence_length = {self.backbone.max_sequence_length} T5 tokens"
            )
            log.warning(
                "data: %d captions so far name the subject token only past what the text encoders read (%s): "
                "the subject is not bound in them, so they train nothing of the adapter. Shorten the captions, "
                "or put the token near their start.",
                self._subjects_cut,
                window,
            )

    def _unet_prediction(
        self, batch: dict[str, Any], noisy: Tensor, timesteps: Tensor, conditioning: Any
    ) -> Tensor:
        """The UNet's float32 output for the noisy latents (B, C, h, w)."""
        backbone, device = self.backbone, noisy.device
        added = None
        if backbone.kind == "sdxl":
            resolution = noisy.shape[-1] * backbone.vae_scale_factor
            time_ids = backbone.time_ids(
                batch["original_sizes"], batch["crops_top_left"], (resolution, resolution)
            )
            added = backbone.unet_added_cond_kwargs(conditioning, time_ids.to(device))
        unet_dtype = first_parameter(backbone.unet).dtype
        return backbone.unet(
            noisy.to(unet_dtype),
            timesteps,
            conditioning.prompt_embeds.to(unet_dtype),
            added_cond_kwargs=added,
        ).sample.float()

    def _unet_loss(self, prediction: Tensor, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """(B,) per-sample loss of a UNet's prediction: noise or v-prediction, min-SNR weighted if set."""
        scheduler = self.backbone.noise_scheduler
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        if self.min_snr_gamma is not None:
            per_sample = per_sample * self._min_snr_weights(timesteps, scheduler.config.prediction_type)
        return per_sample

    def flow_sigmas(self, latent_shape: torch.Size, generator: torch.Generator) -> Tensor:
        """(B,) flow-matching times t (the noise level sigma) for latents of ``latent_shape`` (B, C, h, w).

        u from diffusers' ``compute_density_for_timestep_sampling``, then the scheduler's training sigma
        nearest above u, which carries SD3's fixed ``shift``. Those sigmas run from 1 down, so the index is
        ``(1 - u) * num_train_timesteps``: t is u, as in the SD3 paper, and a positive ``logit_mean`` draws
        noisier times. (diffusers' trainers index with u itself, which draws 1 - u: the same times for
        the symmetric defaults, the opposite bias for any other ``logit_mean``.) A scheduler with
        ``use_dynamic_shifting`` (FLUX) has unshifted training sigmas; they get
        the shift its sampler applies at this resolution: ``time_shift(mu)`` with ``mu`` from the packed
        image sequence length (``calculate_shift``), so training sees the noise levels sampling visits.
        """
        scheduler = self.frozen.training_scheduler
        config = scheduler.config
        u = compute_density_for_timestep_sampling(
            self.weighting_scheme,
            latent_shape[0],
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            generator=generator,
        )
        indices = ((1 - u) * config.num_train_timesteps).long().clamp(0, len(scheduler.sigmas) - 1)
        sigmas = scheduler.sigmas[indices].float()
        if config.use_dynamic_shifting:
            image_seq_len = (latent_shape[2] // 2) * (latent_shape[3] // 2)
            mu = calculate_shift(
                image_seq_len,
                config.base_image_seq_len,
                config.max_image_seq_len,
                config.base_shift,
                config.max_shift,
            )
            sigmas = scheduler.time_shift(mu, 1.0, sigmas)
        return sigmas

    def _check_cached_latents(self, latents: Tensor, spaces: list[dict[str, Any] | None]) -> None:
        """Refuse latents cached with a VAE whose latents mean something else than this backbone's."""
        ours = latent_space(self.backbone.vae)
        theirs = next((space for space in spaces if space is not None and space != ours), None)
        if theirs is None and latents.shape[1] != ours["latent_channels"]:  # shards that recorded no space
            theirs = {"latent_channels": latents.shape[1]}
        if theirs is not None:
            differences = ", ".join(
                f"{key} {theirs[key]:g} there, {ours[key]:g} here"
                for key in theirs
                if theirs[key] != ours[key]
            )
            raise DataError(
                f"the shards' cached latents were encoded by another VAE than {self.base_model}'s ({differences}). "
                "Rebuild the shards with nested shards --model <this base model> --cache-latents, or without "
                "--cache-latents."
            )

    def transformer_prediction(self, noisy: Tensor, sigmas: Tensor, conditioning: Any) -> Tensor:
        """The transformer's float32 velocity (B, C, h, w) for noisy latents (B, C, h, w) at times ``sigmas``.

        Called as ``StableDiffusion3Pipeline`` / ``FluxPipeline`` call it: SD3 takes the timestep in
        [0, 1000]; FLUX takes t itself, its latents packed in 2x2 patches with their image position ids,
        and, for a guidance-distilled model, the guidance scale.
        """
        backbone = self.backbone
        transformer = backbone.transformer
        dtype = first_parameter(transformer).dtype
        prompt_embeds = conditioning.prompt_embeds.to(dtype)
        pooled = conditioning.pooled_prompt_embeds.to(dtype)
        batch, channels, height, width = noisy.shape
        patch = backbone.patch_size
        if height % patch or width % patch:
            raise ConfigError(
                f"the {backbone.kind.upper()} transformer takes latents in {patch}x{patch} patches, but these are "
                f"{height}x{width}: make data.resolution a multiple of {backbone.side_multiple}."
            )
        backbone.check_side(**{"data.resolution": max(height, width) * backbone.vae_scale_factor})
        if backbone.kind == "sd3":
            return transformer(
                hidden_states=noisy.to(dtype),
                timestep=sigmas * backbone.noise_scheduler.config.num_train_timesteps,
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0].float()
        packed = FluxPipeline._pack_latents(noisy.to(dtype), batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, noisy.device, dtype
        )
        velocity = transformer(
            hidden_states=packed,
            timestep=sigmas.to(dtype),
            guidance=backbone.guidance(batch, self.guidance_scale, noisy.device),
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=conditioning.text_ids.to(noisy.device, dtype),
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = backbone.vae_scale_factor
        return FluxPipeline._unpack_latents(velocity, height * scale, width * scale, scale).float()

    def _min_snr_weights(self, timesteps: Tensor, prediction_type: str) -> Tensor:
        # SNR = alpha_bar / (1 - alpha_bar) directly: diffusers' compute_snr squares square roots, which rounds
        # differently and would change every min-SNR run's results, the toy world's included.
        alphas_cumprod = self.backbone.noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas_cumprod / (1 - alphas_cumprod)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr

    def on_after_backward(self) -> None:
        if self.adapter is not None:
            self.adapter.clear_subjects()  # kept bound through backward() under gradient checkpointing

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self.diffusion_loss(batch, self._generator(self._micro_batch(batch_idx)))
        batch_size = len(batch["captions"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log("train/subject_fraction", out["subject_fraction"], batch_size=batch_size, sync_dist=True)
        if out["subject_cut"]:
            self._report_subjects_cut(out["subject_cut"])
        counts = {**(batch.get("skipped") or {}), "subject_cut": out["subject_cut"]}
        for name, count in counts.items():
            # Summed over the epoch and across ranks: how many samples the data pipeline skipped, and how many
            # named their subject past the text window.
            self.log(
                f"data/skipped_{name}",
                torch.as_tensor(count, dtype=torch.float32, device=self.device),
                reduce_fx="sum",
                on_step=False,
                on_epoch=True,
                batch_size=1,
                sync_dist=True,
            )
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # Fixed generator per batch index: validation losses are comparable across epochs.
        generator = torch.Generator().manual_seed(self.seed + batch_idx)
        out = self.diffusion_loss(batch, generator, apply_dropout=False)
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=len(batch["captions"]), sync_dist=True)
        return out["loss"]


def _yaml_scalar(value: Any) -> str:
    """``value`` as a YAML config spells it (``true``, ``null``, ``2.0``, ``nested``)."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _instantiate(section: str, first: Any, config: dict[str, Any]) -> Any:
    """The configured optimizer or schedule; an argument its class refuses (torch checks them as it builds
    one: ``Invalid learning rate: -1.0``) is a one-line error naming the config section."""
    try:
        return instantiate_class(first, config)
    except NestedUserError:
        raise
    except ValueError as error:
        raise ConfigError(
            f"{section} ({config.get('class_path')}): {error}; fix {section}.init_args."
        ) from error


def _changed_settings(
    recorded: dict[str, Any],
    current: dict[str, Any],
    keys: tuple[str, ...] = ("base_model", "encoder", "subjects"),
    common_only: bool = False,
) -> list[str]:
    """``["encoder.num_tokens: 16 -> 8", ...]``: the settings under ``keys`` (by default those that decide the
    adapter's tensors: base model, encoder, tokens) whose value in a checkpoint's hyper-parameters differs from
    the current one; ``common_only``: of a class's arguments (``*.init_args.*``), only those both sides name."""

    def flat(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}.{key}").items()}
        return {prefix: value}

    before, after = {}, {}
    for key in keys:
        if key in recorded and key in current:
            before.update(flat(recorded[key], key))
            after.update(flat(current[key], key))
    names = before.keys() | after.keys()
    if common_only:  # of the class arguments, those both name; a class, or none, always counts
        names = {key for key in names if (key in before and key in after) or ".init_args." not in key}
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(names)
        if before.get(key) != after.get(key)
    ]


def _compile_options(compile: bool | dict[str, Any]) -> dict[str, Any] | None:
    """``torch.compile``'s keyword arguments for ``model.compile`` (None: not compiled), checked by name."""
    if not isinstance(compile, bool | dict):
        raise ConfigError(f"model.compile must be true, false or torch.compile's options, got {compile!r}.")
    if compile is False:
        return None
    options = {} if compile is True else dict(compile)
    if not isinstance(options.get("regional", False), bool):
        raise ConfigError(f"model.compile.regional must be true or false, got {options['regional']!r}.")
    accepted = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(set(options) - accepted - {"regional"})
    if unknown:
        raise ConfigError(
            f"model.compile: torch.compile takes no option {', '.join(map(repr, unknown))}; it takes "
            f"{', '.join(sorted(accepted))} (and model.compile takes regional)."
        )
    return options


def _denoiser(backbone: DiffusionBackbone | TransformerBackbone) -> torch.nn.Module:
    """The model the adapter attaches to: a UNet or a diffusion transformer."""
    return backbone.unet if isinstance(backbone, DiffusionBackbone) else backbone.transformer

"""Inference: any number of nested adapters on a diffusers SD / SDXL / SD3 / FLUX pipeline, one subject per token.

:class:`NestedPipeline` wraps an existing ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` /
``StableDiffusion3Pipeline`` / ``FluxPipeline`` (in the spirit of diffusers' ``load_ip_adapter``): each loaded adapter is bound to a prompt token, and
each call says which image that token's subject is::

    pipe = NestedPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0",
                                          adapters={"<person>": "me/faces", "<dog>": "me/pets"})
    image = pipe("<person> walking <dog> on a beach", subjects={"<person>": "me.jpg", "<dog>": "rex.jpg"},
                 strengths={"<dog>": 0.8}, generator=torch.Generator().manual_seed(0)).images[0]
    pipe.unload()  # the wrapped pipeline is exactly as before

* Adapters of different domains combine; each acts only on its own token's value. An adapter saved
  with ``injection: "decoupled"`` (the IP-Adapter-style ablation) instead adds its image attention to
  every query of the prompts that contain its token; both kinds combine in one call, and ``strengths``
  scale either.
* One adapter may serve several tokens (``{"<person1>": faces, "<person2>": faces}``) with a different
  image each; a token the adapter was not trained on is added as a placeholder initialised from the
  adapter's learned token embedding (or its class word).
* Subject images are encoded, and every layer's nested keys/values computed, once per call.
* With classifier-free guidance the unconditional half of the batch gets no subject (no nested work).
  FLUX.1-dev has no such batch (its guidance is an input of the transformer); with its optional "true
  CFG" (``true_cfg_scale`` > 1 and a negative prompt) the separate negative-prompt call of each step,
  the one ``FluxPipeline`` runs in ``transformer.cache_context("uncond")``, gets no subject.
* SD3 / FLUX: placeholder tokens are added to the CLIP tokenizers only; T5 keeps its own pieces, and the
  subject binds to every T5 piece of the token (:func:`nested.backbone.joint_subject_masks`), over the
  ``max_sequence_length`` T5 tokens of the call.
* :meth:`NestedPipeline.unload` detaches the processors and restores tokenizers and text encoders.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from nested.adapter import (
    NestedAdapter,
    SubjectBinding,
    check_injection_options,
    read_adapter_config,
    resolve_adapter_folder,
    split_revision,
)
from nested.backbone import (
    TRANSFORMER_KINDS,
    check_max_sequence_length,
    check_transformer_side,
    checked_quantize,
    joint_subject_masks,
    read_model_index,
    t5_suffix,
    transformer_patch_size,
)
from nested.errors import AdapterError, ConfigError, MissingFileError, UsageError
from nested.inference.subjects import (
    ImageInput,
    Snapshot,
    Subject,
    restore_snapshot,
    subject_images,
    subject_specs,
    take_snapshot,
)
from nested.quantize import pipeline_config
from nested.tokens import (
    add_placeholder_token,
    get_token_embedding,
    set_token_embedding,
    subject_masks,
    subject_token_ids,
)

__all__ = ["DEFAULT_GUIDANCE", "NestedPipeline", "load_nested_adapters", "sampling_guidance"]

# The guidance scale when none is given, by NestedPipeline.kind: SD3's and FLUX's are their pipelines' defaults.
DEFAULT_GUIDANCE = {"unet": 5.0, "sd3": 7.0, "flux": 3.5}


def sampling_guidance(
    pipe: NestedPipeline, base: str, guidance: float | None, negative_prompt: str | None
) -> float:
    """The ``--guidance`` of ``nested generate`` / ``nested eval``: as given, else the model's default; a
    ``--negative-prompt`` for a FLUX model is refused (FLUX.1 is guided by its guidance input alone)."""
    if pipe.kind == "flux" and negative_prompt is not None:
        raise UsageError(
            f"--negative-prompt: {base} is a FLUX model, guided by --guidance alone (no negative prompt); "
            "drop --negative-prompt."
        )
    return DEFAULT_GUIDANCE[pipe.kind] if guidance is None else guidance


@dataclass
class _Token:
    """A prompt token bound to an adapter."""

    adapter: NestedAdapter
    source: str  # where the adapter came from (folder, hub id or "<object>")
    revision: str | None
    placeholder: bool  # added to the tokenizers by us


# What DiffusionPipeline.from_pretrained passes on to the Hub download, so also to reading model_index.json.
_HUB_OPTIONS = ("cache_dir", "token", "local_files_only", "proxies", "force_download")
_EXPECTED_PIPELINE = (
    "a diffusers pipeline folder or Hub id with model_index.json (SD 1.x/2.x, SDXL, SD3, FLUX.1)"
)


def check_guidance_batches(pipe: Any) -> None:
    """Refuse a pipeline that runs its denoiser on other batches than ``[unconditional, conditional]``: the subject
    would go to the wrong rows (perturbed-attention guidance's perturbed copy, InstructPix2Pix's image-only row)."""
    # diffusers imports a pipeline's module when its class is first named: only these refusals need them.
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionXLInstructPix2PixPipeline
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    if isinstance(
        pipe, (PAGMixin, StableDiffusionInstructPix2PixPipeline, StableDiffusionXLInstructPix2PixPipeline)
    ):
        raise ConfigError(
            f"{type(pipe).__name__} runs its denoiser on extra guidance batches, which nested adapters do not "
            "bind subjects to; use the pipeline without them (e.g. StableDiffusionXLPipeline instead of "
            "StableDiffusionXLPAGPipeline)."
        )


class NestedPipeline:
    """A diffusers SD / SDXL / SD3 / FLUX pipeline with nested-attention adapters bound to prompt tokens.

    Args:
        pipe: a loaded ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` (or any pipeline
            with ``unet``, ``tokenizer`` / ``text_encoder`` and optionally ``tokenizer_2`` /
            ``text_encoder_2``), ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (a ``transformer`` of
            class ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``). It is modified in place until
            :meth:`unload`.
        adapters: token -> adapter folder, hub repo id (``user/repo`` or ``user/repo@revision``) or a
            loaded :class:`NestedAdapter`; see :meth:`load_adapter`.
        image_encoder: overrides where every adapter's frozen vision backbone is loaded from.
    """

    def __init__(
        self,
        pipe: Any,
        adapters: Mapping[str, str | os.PathLike | NestedAdapter] | None = None,
        *,
        image_encoder: str | os.PathLike | None = None,
    ):
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if denoiser is None or not hasattr(pipe, "tokenizer"):
            raise ConfigError(
                f"NestedPipeline needs a Stable Diffusion (XL, 3) or FLUX pipeline with a UNet or transformer and "
                f"tokenizers; got {type(pipe).__name__}."
            )
        kind = (
            "unet"
            if getattr(pipe, "unet", None) is not None
            else TRANSFORMER_KINDS.get(type(denoiser).__name__)
        )
        if kind is None:
            raise ConfigError(
                f"{type(pipe).__name__} has a {type(denoiser).__name__}; nested adapters support UNets and the "
                f"transformers {', '.join(TRANSFORMER_KINDS)} (SD3 / SD3.5, FLUX.1)."
            )
        check_guidance_batches(pipe)
        self.pipe = pipe
        self.denoiser: torch.nn.Module = denoiser
        self.kind: str = kind  # "unet", "sd3" or "flux"
        self.image_encoder = image_encoder
        self._tokens: dict[str, _Token] = {}
        self._loaded: dict[tuple[str, str | None], NestedAdapter] = {}
        self._snapshot: Snapshot | None = None
        self._backbones: dict[tuple, Any] = {}  # vision backbone location -> a loaded SubjectEncoder
        for token, adapter in (adapters or {}).items():
            self.load_adapter(token, adapter)

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        adapters: Mapping[str, str | os.PathLike | NestedAdapter] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        image_encoder: str | os.PathLike | None = None,
        quantize: Mapping[str, str] | None = None,
        **pipeline_kwargs: Any,
    ) -> NestedPipeline:
        """Load a base SD / SDXL / SD3 / FLUX pipeline (folder or hub id) and the given adapters onto it.

        The pipeline class comes from the base's ``model_index.json`` (diffusers' own rule).

        ``dtype`` applies to the pipeline (the SDXL VAE is upcast by diffusers when it needs it) and to
        the adapters' vision backbones; the adapters' projections stay float32.

        ``quantize`` stores the named components' linear weights in 8 bits as they load (:mod:`nested.quantize`),
        e.g. ``{"transformer": "int8", "text_encoder_2": "int8"}``: FLUX.1-dev's transformer and T5 in 15.7 GiB
        instead of 31.

        ``pipeline_kwargs`` go to ``DiffusionPipeline.from_pretrained`` (e.g. ``variant="fp16"``).
        Hub ids download through the huggingface_hub cache; ``HF_HUB_OFFLINE=1`` is honoured.
        """

        # A missing folder or a malformed Hub id is one line here, before diffusers' own errors.
        hub_kwargs = {key: pipeline_kwargs[key] for key in _HUB_OPTIONS if key in pipeline_kwargs}
        index = read_model_index(str(base), _EXPECTED_PIPELINE, revision=revision, **hub_kwargs)
        try:
            if quantize:
                if "quantization_config" in pipeline_kwargs:
                    raise UsageError("pass quantize or quantization_config, not both.")
                quantize = checked_quantize(quantize, index, str(base))
                pipeline_kwargs["quantization_config"] = pipeline_config(quantize)
            pipe = DiffusionPipeline.from_pretrained(
                str(base), dtype=dtype, revision=revision, **pipeline_kwargs
            )
        except OSError as error:
            raise MissingFileError(
                f"could not load the base pipeline {str(base)!r}: {error}. Pass a diffusers folder or a hub id "
                "(cached when offline)."
            ) from error
        pipe.to(device)
        return cls(pipe, adapters, image_encoder=image_encoder)

    @property
    def _text_pairs(self) -> list[tuple[str, str, Any, torch.nn.Module]]:
        """(tokenizer attribute, text encoder attribute, tokenizer, text encoder) for each text encoder that
        placeholder tokens are added to: every one of a UNet pipeline, the CLIPs of a transformer pipeline
        (its T5 splits a placeholder into pieces that all bind instead)."""
        skipped = None if self.kind == "unet" else f"text_encoder{t5_suffix(self.kind)}"
        pairs = []
        for suffix in ("", "_2", "_3"):
            tokenizer = getattr(self.pipe, f"tokenizer{suffix}", None)
            text_encoder = getattr(self.pipe, f"text_encoder{suffix}", None)
            if tokenizer is not None and text_encoder is not None and f"text_encoder{suffix}" != skipped:
                pairs.append((f"tokenizer{suffix}", f"text_encoder{suffix}", tokenizer, text_encoder))
        return pairs

    @property
    def _t5_tokenizer(self) -> Any:
        """The T5 tokenizer of an SD3 / FLUX pipeline; None where the pipeline was loaded without T5 (SD3 then
        fills T5's part of the text with zeros)."""
        suffix = t5_suffix(self.kind)
        if getattr(self.pipe, f"text_encoder{suffix}", None) is None:
            return None
        return getattr(self.pipe, f"tokenizer{suffix}")

    @property
    def side_multiple(self) -> int:
        """Image sides must be multiples of this many pixels: 8 for the SD / SDXL pipelines, the VAE's scale
        factor times the transformer's patch for SD3 / FLUX (16 for the real models)."""
        if self.kind == "unet":
            return 8
        return self.pipe.vae_scale_factor * transformer_patch_size(self.kind, self.denoiser)

    @property
    def default_size(self) -> int:
        """The image side in pixels the pipeline draws when called without ``height`` / ``width``: SD / SDXL
        read their UNet's ``sample_size``, SD3 / FLUX their pipeline's ``default_sample_size``."""
        latents = self.denoiser.config.sample_size if self.kind == "unet" else self.pipe.default_sample_size
        return latents * getattr(self.pipe, "vae_scale_factor", 8)

    @property
    def tokenizers(self) -> list[Any]:
        """The tokenizers placeholder tokens are added to (for SD3 / FLUX: the CLIP ones)."""
        return [pair[2] for pair in self._text_pairs]

    @property
    def tokens(self) -> list[str]:
        """The tokens that have an adapter, in load order."""
        return list(self._tokens)

    def adapter(self, token: str) -> NestedAdapter:
        """The adapter serving ``token``."""
        self._check_token(token)
        return self._tokens[token].adapter

    def load_adapter(
        self,
        token: str,
        adapter: str | os.PathLike | NestedAdapter,
        *,
        revision: str | None = None,
        image_encoder: str | os.PathLike | None = None,
    ) -> NestedAdapter:
        """Bind an adapter to ``token``; returns the adapter.

        Args:
            token: the prompt token the subject binds to: the adapter's own token (``config.token``),
                any new placeholder (``<person2>``: added to every tokenizer, initialised from the
                adapter's learned embedding or its class word), or a plain vocabulary word.
            adapter: a folder, a hub id (``user/repo``, ``user/repo@revision``) or a loaded adapter.
                The same folder/hub id loaded for two tokens is loaded once and shared.
            revision: hub revision to pin (branch, tag or commit).
            image_encoder: overrides the adapter's vision backbone location.

        Raises:
            ValueError: the token is already bound, or the adapter was made for another base UNet.
        """
        if token in self._tokens:
            raise ConfigError(f"token {token!r} already has an adapter; call unload() first to change it.")
        if not token or token != token.strip() or " " in token:
            raise ConfigError(f"subject token {token!r} must be one word without spaces, like '<person>'.")
        key = None
        if isinstance(adapter, NestedAdapter):
            loaded, source = adapter, "<object>"  # used as it is (device, mode): it may be in training
        else:
            source = str(adapter)
            if revision is None:
                source, revision = split_revision(source)
            key = (source, revision)
            loaded = self._loaded.get(key)
            if loaded is None:
                loaded = self._load(source, revision, image_encoder or self.image_encoder)
                loaded.eval().requires_grad_(False).to(self._denoiser_device())
        try:
            loaded.check_fits(self.denoiser)
        except AdapterError as error:  # named with its token and source
            raise AdapterError(
                f"the adapter for {token!r} ({source}) does not fit this base model: {error}"
            ) from error
        if key is not None:
            self._loaded[key] = loaded
        placeholder = self._add_token(token, loaded)
        loaded.attach(self.denoiser)
        self._tokens[token] = _Token(loaded, source, revision, placeholder)
        return loaded

    def _load(
        self, source: str, revision: str | None, image_encoder: str | os.PathLike | None
    ) -> NestedAdapter:
        """Load an adapter, sharing the frozen vision backbone with an adapter that already has the same one."""
        folder = resolve_adapter_folder(source, revision=revision)
        spec = read_adapter_config(folder).encoder
        backbone = (str(image_encoder),) if image_encoder else (spec.backbone, spec.subfolder, spec.revision)
        adapter = NestedAdapter.from_pretrained(
            folder, image_encoder=self._backbones.get(backbone) or image_encoder, dtype=self.denoiser.dtype
        )
        self._backbones.setdefault(backbone, adapter.encoder)
        return adapter

    def _add_token(self, token: str, adapter: NestedAdapter) -> bool:
        """Make ``token`` one token in every tokenizer; returns whether a placeholder was added."""
        config = adapter.config
        known = config.tokens
        source_token = token if token in known else config.token
        class_word = known[source_token]
        if token not in config.placeholders and (
            token == class_word
            or all(len(subject_token_ids(tokenizer, token)) == 1 for tokenizer in self.tokenizers)
        ):
            return False  # a vocabulary word: used as it is
        if self._snapshot is None:
            self._snapshot = take_snapshot(self.pipe, self._text_pairs)
        # Resizing draws random rows from the global RNG; keep the user's RNG stream untouched.
        with torch.random.fork_rng(devices=[]):
            for _, encoder_attr, tokenizer, text_encoder in self._text_pairs:
                token_id = add_placeholder_token(tokenizer, text_encoder, token, class_word)
                learned = adapter.token_embeddings.get(f"{encoder_attr}:{source_token}")
                if learned is None:
                    continue
                if token_id < self._snapshot.text_encoders[encoder_attr].num_embeddings:
                    # A token the pipeline already had (e.g. textual inversion): its row is restored on unload.
                    row = get_token_embedding(text_encoder, token_id)
                    self._snapshot.rows.append((encoder_attr, token_id, row))
                set_token_embedding(text_encoder, token_id, learned.detach())
        return True

    def unload(self) -> None:
        """Detach every adapter and restore the pipeline exactly (processors, tokenizers, text encoders)."""
        for adapter in {id(t.adapter): t.adapter for t in self._tokens.values()}.values():
            adapter.clear_subjects()
            adapter.detach(self.denoiser)
        if self._snapshot is not None:
            restore_snapshot(self.pipe, self._snapshot)
        self._snapshot = None
        self._tokens.clear()
        self._loaded.clear()
        self._backbones.clear()

    def __enter__(self) -> NestedPipeline:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.unload()

    # ------------------------------------------------------------------------------ subjects
    def _check_token(self, token: str) -> None:
        if token not in self._tokens:
            loaded = ", ".join(self._tokens) or "none"
            raise ConfigError(
                f"no adapter is loaded for token {token!r} (loaded: {loaded}). Load one with "
                f"load_adapter({token!r}, 'path/or/user/repo') or --adapter '{token}=PATH_OR_REPO'."
            )

    def _masks(
        self, token: str, prompts: list[str], prompts_2: list[str] | None, max_sequence_length: int | None
    ) -> Tensor:
        """(B, T) bool positions of ``token`` in the text the denoiser attends to; every CLIP tokenizer must
        agree. SD3 / FLUX: the joint text sequence, with ``max_sequence_length`` T5 tokens."""
        if self.kind != "unet":
            tokenizers = [*self.tokenizers, self._t5_tokenizer]
            return joint_subject_masks(self.kind, tokenizers, prompts, token, max_sequence_length)
        per_tokenizer = [
            subject_masks(tokenizer, prompts_2 if index == 1 and prompts_2 else prompts, token)
            for index, tokenizer in enumerate(self.tokenizers)
        ]
        first = per_tokenizer[0]
        for other in per_tokenizer[1:]:
            if not torch.equal(first, other):
                raise ConfigError(
                    f"the subject token {token!r} sits at different positions in prompt and prompt_2; use the "
                    "same token at the same place in both."
                )
        return first

    @contextlib.contextmanager
    def bind(
        self,
        prompt: str | Sequence[str],
        subjects: Mapping[str, ImageInput | Subject | Sequence[ImageInput]],
        *,
        strengths: Mapping[str, float] | None = None,
        token_weights: Mapping[str, float] | None = None,
        value_norm_factors: Mapping[str, float] | None = None,
        num_images_per_prompt: int = 1,
        prompt_2: str | Sequence[str] | None = None,
        max_sequence_length: int | None = None,
    ) -> Iterator[dict[str, SubjectBinding]]:
        """Bind subjects for UNet calls on ``prompt`` (as the diffusers pipelines batch it), then unbind.

        Encodes each subject image and computes every layer's nested keys/values once, on entry.
        SD3 / FLUX: ``max_sequence_length`` is the T5 length the pipeline is called with (default: the
        pipeline's own).
        The UNet batch must be ``len(prompts) * num_images_per_prompt`` rows (in diffusers' order:
        each prompt repeated), or twice that with classifier-free guidance (unconditional first).

        Yields:
            token -> its :class:`SubjectBinding`.

        Raises:
            ValueError: a subject for a token without adapter, a token missing from every prompt, an
                option for a token that has no subject.
            FileNotFoundError: a subject image path that does not exist.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts_2 = (
            None if prompt_2 is None else ([prompt_2] if isinstance(prompt_2, str) else list(prompt_2))
        )
        if num_images_per_prompt < 1:
            raise ConfigError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}.")
        if self.kind != "unet" and prompts_2 is not None:
            raise ConfigError(
                "with subjects, an SD3 / FLUX pipeline takes one prompt for all its text encoders: drop "
                "prompt_2 / prompt_3 (the subject must sit at the same words for CLIP and T5)."
            )
        check_max_sequence_length(max_sequence_length)
        if self.kind != "unet" and max_sequence_length is None:
            max_sequence_length = (
                inspect.signature(self.pipe.__call__).parameters["max_sequence_length"].default
            )
        # The text the denoiser sees: CLIP's 77 tokens (UNet), and T5's max_sequence_length (SD3 / FLUX).
        limit = {
            "unet": "77-token",
            "sd3": f"77-token (CLIP) or {max_sequence_length}-token (T5)",
            "flux": f"{max_sequence_length}-token (T5)",
        }[self.kind]
        for token in subjects:
            self._check_token(token)
        specs = subject_specs(subjects, strengths, token_weights, value_norm_factors)

        masks, images = {}, {}
        for token, spec in specs.items():  # all checks before any encoding work
            if spec.token_weight is None:  # the weight the adapter was trained with
                spec.token_weight = self._tokens[token].adapter.config.token_weight
            check_injection_options(
                self._tokens[token].adapter.config.injection,
                token_weight=spec.token_weight,
                value_norm_factor=spec.value_norm_factor or None,
                source=f"the adapter of {token!r}",
            )
            masks[token] = self._masks(token, prompts, prompts_2, max_sequence_length)
            present = masks[token].any(-1)
            if not present.any():
                raise ConfigError(
                    f"the subject token {token!r} is not in the prompt {prompts[0]!r}"
                    + (" (nor in the other prompts)" if len(prompts) > 1 else "")
                    + f"; write {token!r} where the subject should appear (it may also have been cut by "
                    f"the {limit} limit)."
                )
            if not present.all():
                missing = [p for p, has in zip(prompts, present.tolist(), strict=True) if not has]
                warnings.warn(
                    f"{token!r} is not in the prompts {missing}; they get no subject.", stacklevel=3
                )
            images[token] = subject_images(spec.image, token, prompts)

        bindings: dict[str, SubjectBinding] = {}
        per_adapter: dict[int, list[SubjectBinding]] = {}
        adapters: dict[int, NestedAdapter] = {}
        device = self._denoiser_device()  # the pipeline may have been moved since the adapters were loaded
        for token, spec in specs.items():
            adapter = self._tokens[token].adapter.to(device)
            with torch.no_grad():
                tokens = torch.cat([adapter.encode(image.to(device)) for image in images[token]])
            if len(images[token]) == 1:
                image_index = torch.zeros(len(prompts) * num_images_per_prompt, dtype=torch.long)
            else:
                image_index = torch.arange(len(prompts)).repeat_interleave(num_images_per_prompt)
            binding = SubjectBinding(
                tokens=tokens,
                masks=masks[token].repeat_interleave(num_images_per_prompt, dim=0),
                image_index=image_index.to(device),
                scale=spec.scale,
                token_weight=spec.token_weight,
                value_norm_factor=spec.value_norm_factor,
            )
            bindings[token] = binding
            per_adapter.setdefault(id(adapter), []).append(binding)
            adapters[id(adapter)] = adapter
        try:
            with torch.no_grad():
                for key, adapter in adapters.items():
                    adapter.set_subjects(per_adapter[key])
            yield bindings
        finally:
            for adapter in adapters.values():
                adapter.clear_subjects()

    def _denoiser_device(self) -> torch.device:
        """Where the denoiser runs: its device, or under model offloading (accelerate's hooks, e.g.
        ``enable_model_cpu_offload``) the device its hooks move it to for each call."""
        offloaded = any(hasattr(module, "_hf_hook") for module in self.denoiser.modules())
        return self.pipe._execution_device if offloaded else self.denoiser.device

    # ------------------------------------------------------------------------------ generate
    def __call__(
        self,
        prompt: str | Sequence[str],
        subjects: Mapping[str, ImageInput | Subject | Sequence[ImageInput]] | None = None,
        *,
        strengths: Mapping[str, float] | None = None,
        token_weights: Mapping[str, float] | None = None,
        value_norm_factors: Mapping[str, float] | None = None,
        num_images_per_prompt: int = 1,
        **pipeline_kwargs: Any,
    ) -> Any:
        """Generate with the subjects bound; returns the wrapped pipeline's output (``.images``).

        Args:
            prompt: one prompt or a list; each subject token must appear in it.
            subjects: token -> image (PIL, path, tensor in [0, 1], array), a list with one image per
                prompt, or a :class:`Subject` with per-subject options.
            strengths: token -> ``scale`` (0: plain text value, 1: the nested value; for a decoupled
                adapter, the weight of its added image attention).
            token_weights: token -> ``token_weight`` (the demo's ``special_token_weight``; nested
                adapters only); a token without one uses its adapter's trained ``token_weight``.
            value_norm_factors: token -> override of the adapter's ``value_norm_factor`` (nested
                adapters only).
            num_images_per_prompt: images per prompt (all share the prompt's subject image).
            pipeline_kwargs: everything else goes to the wrapped pipeline (``negative_prompt``,
                ``num_inference_steps``, ``guidance_scale``, ``generator``, ``height``...).
        """
        multiple = self.side_multiple
        for name in ("height", "width"):
            size = pipeline_kwargs.get(name)
            if size is not None and (size < multiple or size % multiple):
                raise ConfigError(
                    f"{name} {size} is not a positive multiple of {multiple} pixels, which this "
                    f"{type(self.pipe).__name__} needs: use {max(multiple, size - size % multiple)}."
                )
        if self.kind != "unet":
            sides = {name: pipeline_kwargs.get(name) for name in ("height", "width")}
            check_transformer_side(self.kind, self.denoiser, self.pipe.vae_scale_factor, sides)
        steps, limit = (
            pipeline_kwargs.get("num_inference_steps"),
            self.pipe.scheduler.config.get("num_train_timesteps"),
        )
        if self.kind == "unet" and steps is not None and limit and steps > limit:
            # The SD / SDXL schedulers pick each step's timestep among the ones the model was trained on.
            raise ConfigError(
                f"num_inference_steps (--steps) {steps} is more than the {limit} timesteps this "
                f"{type(self.pipe.scheduler).__name__} has: use at most {limit}."
            )
        if "prompt_embeds" in pipeline_kwargs and subjects:
            raise ConfigError(
                "subjects need the prompt text to find their tokens; pass prompt, not prompt_embeds."
            )
        if pipeline_kwargs.get("max_sequence_length", 0) is None:
            del pipeline_kwargs["max_sequence_length"]  # the pipeline's default, which bind also uses
        if not subjects:
            subject_specs(
                {}, strengths, token_weights, value_norm_factors
            )  # refuses an option with no subject
            self._warn_tokens_without_subject(prompt, {})
            return self.pipe(prompt=prompt, num_images_per_prompt=num_images_per_prompt, **pipeline_kwargs)
        prompt_2 = pipeline_kwargs.get("prompt_2")
        if self.kind == "sd3" and prompt_2 is None:
            prompt_2 = pipeline_kwargs.get("prompt_3")
        with self.bind(
            prompt,
            subjects,
            strengths=strengths,
            token_weights=token_weights,
            value_norm_factors=value_norm_factors,
            num_images_per_prompt=num_images_per_prompt,
            prompt_2=prompt_2,
            max_sequence_length=pipeline_kwargs.get("max_sequence_length"),
        ):
            self._warn_tokens_without_subject(prompt, subjects)
            with self._no_subjects_in_negative_calls():
                return self.pipe(
                    prompt=prompt, num_images_per_prompt=num_images_per_prompt, **pipeline_kwargs
                )

    @contextlib.contextmanager
    def _no_subjects_in_negative_calls(self) -> Iterator[None]:
        """Suspend every adapter's subjects in the transformer calls a pipeline makes for the negative prompt
        alone, which it marks with ``transformer.cache_context("uncond")`` (FluxPipeline's true CFG)."""
        if not hasattr(self.denoiser, "cache_context"):
            yield
            return
        adapters = list({id(t.adapter): t.adapter for t in self._tokens.values()}.values())
        original = self.denoiser.cache_context

        @contextlib.contextmanager
        def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
            with original(name, **kwargs), contextlib.ExitStack() as stack:
                if name == "uncond":
                    for adapter in adapters:
                        stack.enter_context(adapter.subjects_suspended())
                yield

        self.denoiser.cache_context = cache_context  # this instance only, for this call
        try:
            yield
        finally:
            del self.denoiser.cache_context

    def _warn_tokens_without_subject(
        self, prompt: str | Sequence[str] | None, subjects: Mapping[str, Any]
    ) -> None:
        """Warn for each placeholder token in the prompts that has no subject in this call: it gets its
        learned embedding but no subject image, which is rarely what was meant."""
        if prompt is None:  # prompt_embeds: no text to look in
            return
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        for token, bound in self._tokens.items():
            if token in subjects or not bound.placeholder:
                continue
            if subject_masks(self.tokenizers[0], prompts, token).any():
                warnings.warn(
                    f"{token!r} is in the prompt but has no subject: it is generated without its subject image "
                    f"(pass subjects={{{token!r}: image}}).",
                    UserWarning,
                    stacklevel=3,
                )

    def describe(self) -> dict[str, dict[str, Any]]:
        """token -> where its adapter came from and what it is (for logs and reproducibility)."""
        return {
            token: {
                "source": bound.source,
                "revision": bound.revision,
                "adapter_token": bound.adapter.config.token,
                "class_word": bound.adapter.config.class_word,
                "domain": bound.adapter.config.domain,
                "base_model": bound.adapter.config.base_model,
                "num_tokens": bound.adapter.config.encoder.num_tokens,
                "value_norm_factor": bound.adapter.config.value_norm_factor,
                "token_weight": bound.adapter.config.token_weight,
                "injection": bound.adapter.config.injection,
                "placeholder_added": bound.placeholder,
            }
            for token, bound in self._tokens.items()
        }


def load_nested_adapters(
    pipe: Any,
    adapters: Mapping[str, str | os.PathLike | NestedAdapter],
    *,
    image_encoder: str | os.PathLike | None = None,
) -> NestedPipeline:
    """Functional form: ``load_nested_adapters(pipe, {"<person>": "me/faces"})`` -> :class:`NestedPipeline`."""
    return NestedPipeline(pipe, adapters, image_encoder=image_encoder)

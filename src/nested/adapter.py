"""`NestedAdapter`: the trainable part of nested attention, its on-disk format, attach/detach.

An adapter holds the subject encoder (frozen backbone + trainable resampler), one pair of nested
key/value projections per cross-attention layer of the base UNet, keyed by the diffusers layer
name, and optionally a learned placeholder-token embedding per text encoder.

On disk (``save_pretrained``) it is a folder with ``adapter.safetensors`` (named tensors only,
never a pickle) and ``adapter_config.json`` (format version, token, class word, encoder spec,
M, value_norm_factor, injection mode, domain, and the fingerprint of the base UNet it was made for).

Attaching installs one :class:`~nested.attention.NestedAttnProcessor` per ``attn2`` layer (on an SD3 / FLUX
transformer, one :class:`~nested.dit.NestedJointAttnProcessor` per joint-attention block); several
adapters (a faces and a pets adapter) share those processors, each acting only on its own
token. If anything later replaces the processors (``unet.set_attn_processor``,
``enable_xformers_memory_efficient_attention``), the next UNet forward re-installs them with a
warning, keeping the new processor as the one ``detach`` restores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from nested.attention import (
    InjectionMode,
    NestedAttnProcessor,
    NestedSubject,
    check_injection_mode,
    check_token_weight,
    check_value_norm_factor,
)
from nested.dit import (
    NestedJointAttnProcessor,
    joint_attention_layers,
    joint_layer_fingerprint,
    joint_layout,
    set_text_length,
    text_projections,
)
from nested.encoder import EncoderSpec, Resampler, SubjectEncoder
from nested.errors import (
    AdapterError,
    ConfigError,
    HubError,
    MissingFileError,
    NestedUserError,
    StorageError,
    UsageError,
)
from nested.files import staged_directory, storage_refusals_named
from nested.hub_access import hub_endpoint, hub_unreachable, network_error, redact
from nested.tokens import (
    add_placeholder_token,
    get_token_embedding,
    read_token_embeddings_from,
    set_token_embedding,
    subject_token_ids,
)

__all__ = [
    "AdapterConfig",
    "BatchLayout",
    "LayerBinding",
    "NestedAdapter",
    "SubjectBinding",
    "check_adapter_files",
    "check_bindings_disjoint",
    "compile_blocks",
    "cross_attention_layers",
    "nested_blocks",
    "training_is_complete",
    "unet_fingerprint",
]

FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
# Weight formats that can run code when loaded: refused outright.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_REGISTRY_ATTR = "_nested_processors"
_HOOK_ATTR = "_nested_hook"


def training_is_complete(adapter_dir: str | os.PathLike) -> bool:
    """False for the export of a training run that had not reached its end: a preempted or interrupted run,
    or a snapshot taken during training (``"training": {"complete": false, ...}`` in its
    ``adapter_config.json``); True otherwise, also for adapters saved outside ``nested fit``.

    Reads only the config file: no torch, no weights.
    """
    config = json.loads((Path(adapter_dir) / CONFIG_NAME).read_text(encoding="utf-8"))
    training = config.get("training") if isinstance(config, dict) else None
    return not (isinstance(training, dict) and training.get("complete") is False)


def cross_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The layers where the image attends to the text, by module name: the ``attn2`` (cross-attention)
    modules of a diffusers UNet, or the joint-attention modules of an SD3 / FLUX transformer
    (:func:`~nested.dit.joint_attention_layers`)."""
    # Here, not at the top: `nested push` imports this module and needs no diffusers.
    from diffusers.models.attention_processor import Attention

    layers = {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and module.is_cross_attention and name.endswith("attn2")
    }
    return layers or joint_attention_layers(unet)


def nested_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The blocks that hold the layers of :func:`cross_attention_layers`, by module name: a UNet's
    ``BasicTransformerBlock`` modules, an SD3 transformer's joint blocks, a FLUX transformer's double- and
    single-stream blocks. Each kind repeats many times with one shape (SDXL: 70 blocks, two widths)."""
    return {
        block_name: model.get_submodule(block_name)
        for block_name in dict.fromkeys(name.rpartition(".")[0] for name in cross_attention_layers(model))
    }


def compile_blocks(model: nn.Module, **options: Any) -> int:
    """``torch.compile`` every block of :func:`nested_blocks` in place, with ``options``; returns how many.

    Regional compilation: one graph serves every block of a kind and shape, so compiling takes a fraction of
    a whole-model compile (a UNet with SDXL's depths and tiny widths, inductor on a CPU: 11 s instead of
    129 s), while the model's remaining modules stay eager. Attached adapters keep working: their processors
    reach each layer's keys and values without the layer's name (:class:`LayerBinding`), so no block is
    compiled once per layer. For a UNet and FLUX this is what diffusers' ``compile_repeated_blocks``
    compiles; SD3's transformer declares no repeated blocks for it."""
    blocks = nested_blocks(model)
    for block in blocks.values():
        block.compile(**options)
    return len(blocks)


def unet_fingerprint(unet: nn.Module) -> dict[str, dict[str, int | str]]:
    """Per cross-attention (or joint-attention) layer: query dim, text (cross) dim, inner dim and heads (a
    joint-attention layer also its query norm: :func:`~nested.dit.joint_layer_fingerprint`)."""
    return {
        name: joint_layer_fingerprint(attn)
        if joint_layout(attn) is not None
        else {
            "query_dim": attn.to_q.in_features,
            "cross_attention_dim": attn.to_k.in_features,
            "inner_dim": attn.to_v.out_features,
            "heads": attn.heads,
        }
        for name, attn in cross_attention_layers(unet).items()
    }


def nested_processor(name: str, attn: nn.Module) -> NestedAttnProcessor | NestedJointAttnProcessor:
    """A nested processor for layer ``name``, keeping ``attn``'s current processor as the one to restore."""
    layout = joint_layout(attn)
    if layout is None:
        return NestedAttnProcessor(name, attn.processor)
    return NestedJointAttnProcessor(name, attn.processor, layout)


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter and to check it fits a base model.

    Attributes:
        token: the prompt token the adapter binds to: a class word (``person``) or a placeholder
            (``<person>``) that is added to every tokenizer.
        class_word: the word whose embedding initialises a placeholder.
        encoder: the subject encoder's spec.
        layers: the base UNet fingerprint (:func:`unet_fingerprint`).
        value_norm_factor: default rescaling of v* relative to ||V_s|| (None: off).
        domain: e.g. ``faces`` or ``pets``.
        base_model: the base model id or path the adapter was trained on (informational).
        extra_tokens: further tokens the adapter was trained on (token -> class word), e.g. the
            pets token of a faces + pets adapter.
        token_encoders: names of the text encoders that hold a placeholder embedding.
        token_weight: the subject column's attention weight the adapter was trained with
            (``model.token_weight``); inference uses it unless a call sets its own. A config without the
            key means 1.
        injection: how the per-layer subject keys/values enter each cross-attention layer:
            ``"nested"`` (the subject token's value becomes a query-dependent nested attention) or
            ``"decoupled"`` (IP-Adapter-style: an image attention added to every query of a bound
            sample, the text attention left plain). Same parameters either way; a config without the key
            means ``"nested"``.
        training: what training produced this export, written by ``nested fit``: ``{"step": N, "complete":
            bool}``. ``complete`` is true only for the final adapter of a run that reached its
            end (``adapters/last``); exports taken during training, and the adapter of a run stopped early
            (preemption, Ctrl-C), record false. None (absent from the file): saved outside ``nested fit``.
    """

    token: str
    class_word: str
    encoder: EncoderSpec
    layers: dict[str, dict[str, int | str]]
    value_norm_factor: float | None = None
    domain: str = ""
    base_model: str = ""
    extra_tokens: dict[str, str] = field(default_factory=dict)
    token_encoders: list[str] = field(default_factory=list)
    injection: InjectionMode = "nested"
    token_weight: float = 1.0
    training: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        check_injection_mode(self.injection)
        check_token_weight(self.token_weight)
        check_value_norm_factor(self.value_norm_factor, "value_norm_factor")
        check_injection_options(
            self.injection, token_weight=self.token_weight, value_norm_factor=self.value_norm_factor
        )

    @property
    def tokens(self) -> dict[str, str]:
        """Every token the adapter knows, mapped to its class word (the default token first)."""
        return {self.token: self.class_word, **self.extra_tokens}

    @property
    def placeholders(self) -> dict[str, str]:
        """The tokens that are new words (not their own class word), to add to tokenizers."""
        return {token: word for token, word in self.tokens.items() if token != word}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["encoder"] = self.encoder.to_dict()
        if data["training"] is None:
            del data["training"]  # adapters saved outside `nested fit` keep the keys they always had
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "adapter config") -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )  # noqa: E501
        if unknown or missing:
            raise AdapterError(f"{source}: unknown keys {unknown}, missing keys {missing}.")
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise AdapterError(
                f"{source} has format version {version}; this nested reads up to {FORMAT_VERSION}. Upgrade nested."
            )
        if not isinstance(data["encoder"], dict) or not isinstance(data["layers"], dict):
            raise AdapterError(f"{source}: 'encoder' and 'layers' must be mappings.")
        try:
            encoder = EncoderSpec.from_dict(data["encoder"])
            return cls(**{**data, "encoder": encoder})
        except (ValueError, TypeError) as error:  # an invalid value or a wrong type: say which file
            raise AdapterError(f"{source}: {error}") from error


def check_injection_options(
    injection: str, *, token_weight: float = 1.0, value_norm_factor: float | None = None, source: str = ""
) -> None:
    """Raise a ValueError when a nested-only option is set for a decoupled adapter.

    ``value_norm_factor`` rescales the nested value v* and ``token_weight`` reweights the subject
    token's text column; decoupled injection has neither, and ignoring them silently would make an
    ablation run measure something other than what its config says.
    """
    if injection != "decoupled":
        return
    problems = []
    if value_norm_factor is not None:
        problems.append(f"value_norm_factor={value_norm_factor} (use null / None)")
    if token_weight != 1.0:
        problems.append(f"token_weight={token_weight} (use 1)")
    if problems:
        raise ConfigError(
            f"{source + ': ' if source else ''}{' and '.join(problems)}: these act on the subject token's "
            "nested value, which injection='decoupled' does not have; its strength is the scale "
            "(strengths=)."
        )


class NestedLayer(nn.Module):
    """One cross-attention layer's nested projections: subject tokens -> per-head keys/values."""

    def __init__(self, token_dim: int, inner_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_k = nn.Linear(token_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(token_dim, inner_dim, bias=False)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (S, M, d) -> nested keys, values: each (S, H, M, inner_dim / H)."""
        s, m, _ = tokens.shape
        tokens = tokens.to(self.to_k.weight.dtype)
        # Contiguous once here: they are read by every denoising step's attention.
        keys = self.to_k(tokens).view(s, m, self.heads, -1).transpose(1, 2).contiguous()
        values = self.to_v(tokens).view(s, m, self.heads, -1).transpose(1, 2).contiguous()
        return keys, values


@dataclass
class SubjectBinding:
    """One subject bound in the current batch: its tokens, where it binds, and how strongly.

    Attributes:
        tokens: (S, M, d) subject tokens of S distinct images (from :meth:`NestedAdapter.encode`).
        masks: (B, T) bool, the subject token positions of each prompt.
        image_index: (B,) long, the image each sample uses; None if S == B.
        scale: 0 -> plain value, 1 -> nested value (decoupled adapters: the weight of the added
            image attention, 0 -> plain attention).
        token_weight: multiplies the subject column's attention probability (nested adapters only).
        value_norm_factor: overrides the adapter's default when not None (0 turns rescaling off;
            nested adapters only).
        dense: compute every sample's subject term, zero where its mask row is all False, instead of
            selecting the bound samples (:attr:`~nested.attention.NestedSubject.dense`): for training,
            whose dropout unbinds different samples at every step, so that ``torch.compile`` keeps one graph.
    """

    tokens: Tensor
    masks: Tensor
    image_index: Tensor | None = None
    scale: float = 1.0
    token_weight: float = 1.0
    value_norm_factor: float | None = None
    dense: bool = False
    # layer name -> (keys, values), computed once per binding (not per denoising step).
    nested_kv: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)
    # The tensors those keys and values are pieces of (one per head dim).
    projections: list[Tensor] = field(default_factory=list, repr=False)
    # UNet batch size -> where the subject sits in such a batch, computed once per binding.
    layouts: dict[int, BatchLayout] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_value_norm_factor(
            self.value_norm_factor, "SubjectBinding.value_norm_factor", zero_turns_off=True
        )


@dataclass(frozen=True)
class BatchLayout:
    """Where one binding's subject sits in a UNet batch of a given size, ready for every layer call.

    Attributes:
        masks: (B, T) bool on the device of the nested keys/values.
        image_index: (B,) long on that device, or None (sample b uses image b).
        present: ``masks.any(-1)`` on the host, so that no layer reads the masks back from the device.
        marked: every (sample, token position) the subject marks, on the host (overlap checks).
        memo: what the attention layers derive from the masks, built by the first layer that needs it
            (:attr:`~nested.attention.NestedSubject.memo`).
    """

    masks: Tensor
    image_index: Tensor | None
    present: tuple[bool, ...]
    marked: frozenset[tuple[int, int]]
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, masks: Tensor, image_index: Tensor | None, device: torch.device) -> BatchLayout:
        """From (B, T) bool ``masks`` and (B,) ``image_index`` (any device; read once, here)."""
        host = masks.detach().cpu()
        return cls(
            masks=masks.to(device),
            image_index=None if image_index is None else image_index.to(device),
            present=tuple(host.any(-1).tolist()),
            marked=frozenset((int(b), int(t)) for b, t in host.nonzero().tolist()),
        )


def batch_layouts(binding: SubjectBinding, device: torch.device) -> dict[int, BatchLayout]:
    """The layouts of ``binding`` for the UNet batches it can meet: its prompts, or twice them.

    Diffusers pipelines run classifier-free guidance as ``cat([unconditional, conditional])``; when the
    UNet batch is twice the bound prompts, the first half is the unconditional one and gets no subject.
    """
    rows = binding.masks.shape[0]
    index = binding.image_index
    doubled_index = torch.arange(rows) if index is None else index
    return {
        rows: BatchLayout.build(binding.masks, index, device),
        2 * rows: BatchLayout.build(
            torch.cat([torch.zeros_like(binding.masks), binding.masks]),
            torch.cat([doubled_index, doubled_index]),
            device,
        ),
    }


class LayerBinding:
    """One adapter at one attention layer, as that layer's processor calls it: ``subjects(attn, batch_size,
    dtype)`` gives the subjects bound now, with this layer's nested keys and values.

    The adapter refreshes :attr:`kv` whenever its subjects change, so the processor reaches this layer's tensors
    through attributes, never by the layer's name. Traced by ``torch.compile``, a name would be a constant of
    the graph: a block compiled on its own (regional compilation, diffusers' ``compile_repeated_blocks``) would
    then compile anew for every layer, and past torch's recompile limit fall back to eager.
    """

    def __init__(self, adapter: NestedAdapter, name: str):
        self.adapter = adapter
        self.name = name
        self.kv: list[tuple[Tensor, Tensor]] = []
        self.refresh()

    def refresh(self) -> None:
        self.kv = [binding.nested_kv[self.name] for binding in self.adapter._bindings]

    def subjects(self, attn: nn.Module, batch_size: int, dtype: torch.dtype) -> list[NestedSubject]:
        return self.adapter.layer_subjects(self, attn, batch_size, dtype)


def _escape(layer_name: str) -> str:
    return layer_name.replace(".", "__")


def _unescape(key: str) -> str:
    return key.replace("__", ".")


def _text_encoder_names(text_encoders: Sequence, names: Sequence[str] | None) -> list[str]:
    """The diffusers attribute names of the text encoders: ``text_encoder``, ``text_encoder_2``, ..."""
    return list(names or [f"text_encoder{'' if i == 0 else f'_{i + 1}'}" for i in range(len(text_encoders))])


class NestedAdapter(nn.Module):
    """Subject encoder + per-layer nested projections (+ placeholder embeddings) of one adapter.

    Build a new one for a UNet with :meth:`for_unet`, load a trained one with
    :meth:`from_pretrained`. Then ``attach(unet)``, ``set_subjects(...)`` and run the UNet.
    """

    def __init__(self, config: AdapterConfig, encoder: SubjectEncoder):
        super().__init__()
        self.config = config
        self.encoder = encoder
        token_dim = config.encoder.token_dim
        self.layers = nn.ModuleDict(
            {
                _escape(name): NestedLayer(token_dim, dims["inner_dim"], dims["heads"])
                for name, dims in config.layers.items()
            }
        )
        self.token_embeddings = nn.ParameterDict()
        # This adapter at each layer of the models it is attached to.
        self._layer_bindings: list[LayerBinding] = []
        self._bindings = []

    @property
    def _bindings(self) -> list[SubjectBinding]:
        """The subjects bound now. Setting it (set_subjects, clear_subjects, restoring an earlier list)
        hands every attached layer its own keys and values; assign a new list, never change this one in
        place (the layers would keep the old keys and values)."""
        return self._bound_subjects

    @_bindings.setter
    def _bindings(self, bindings: Sequence[SubjectBinding]) -> None:
        self._bound_subjects = list(bindings)
        for layer_binding in self._layer_bindings:
            layer_binding.refresh()

    # ----------------------------------------------------------------------------- building
    @classmethod
    def for_unet(
        cls,
        unet: nn.Module,
        *,
        token: str,
        class_word: str | None = None,
        encoder: EncoderSpec,
        subject_encoder: SubjectEncoder | None = None,
        value_norm_factor: float | None = None,
        domain: str = "",
        base_model: str = "",
        injection: InjectionMode = "nested",
    ) -> NestedAdapter:
        """A fresh (untrained) adapter fitting ``unet``'s cross-attention layers.

        ``subject_encoder`` reuses an already built encoder (e.g. to share its backbone);
        otherwise one is built from ``encoder``. ``injection`` is :attr:`AdapterConfig.injection`.
        """
        subject_encoder = subject_encoder or SubjectEncoder.from_spec(encoder)
        layers = unet_fingerprint(unet)
        if not layers:
            raise ConfigError(
                "this model has no cross-attention (attn2) layers and no SD3 / FLUX joint-attention blocks: "
                "nothing to attach nested attention to."
            )
        config = AdapterConfig(
            token=token,
            class_word=class_word or token.strip("<>"),
            encoder=encoder,
            layers=layers,
            value_norm_factor=value_norm_factor,
            domain=domain,
            base_model=base_model,
            injection=injection,
        )
        return cls(config, subject_encoder)

    @torch.no_grad()
    def init_projections_from(self, unet: nn.Module) -> None:
        """Start every nested projection as the layer's own projection of the text (IP-Adapter's practice).

        The nested keys and values of a subject token ``e`` are then the key and value the layer would give
        a text feature ``e``: the resampler starts out writing into the text space, whose values the UNet
        already reads, and every layer starts from the same target. Needs subject tokens as wide as the
        text features (``encoder.output_dim`` = the base's cross-attention width). Not copied: the text
        projections' biases (SD3's and FLUX's), and the RMS norm that SD3.5's and FLUX's blocks apply to
        their text keys, which the nested keys never go through: there they start along the text key's
        direction before that norm's per-channel weight, at another length (on the tiny test models 0.55
        to 0.63 of it), a temperature of the nested softmax that training is free to change.
        """
        self.check_fits(unet)
        token_dim = self.config.encoder.token_dim
        for name, attn in cross_attention_layers(unet).items():
            key_projection, value_projection = text_projections(attn)
            if key_projection.in_features != token_dim:
                raise ConfigError(
                    f"the nested projections can start from the base's own only if the subject tokens are as "
                    f"wide as its text features: layer {name!r} projects {key_projection.in_features}-wide text, "
                    f"the encoder makes {token_dim}-wide tokens. Set model.encoder.output_dim: "
                    f"{key_projection.in_features}."
                )
            layer = self.layers[_escape(name)]
            # dequantize(): the weight a quantized frozen layer computes with (a plain weight's values as they are)
            layer.to_k.weight.copy_(key_projection.weight.dequantize())
            layer.to_v.weight.copy_(value_projection.weight.dequantize())

    def init_weights_from(
        self, name_or_path: str | os.PathLike, *, revision: str | None = None
    ) -> AdapterConfig:
        """Start from a saved adapter's weights: its resampler and nested projections are copied into this
        one (fine-tuning on another domain, or with another learning rate), and so are its trained
        embeddings of the placeholder tokens both adapters have (call it before :meth:`add_tokens`). Its
        options (injection, token weight, value norm factor) are not taken: this adapter's own stay.
        ``name_or_path`` may be ``user/repo@revision``. Returns the saved adapter's config.

        The saved adapter must have every tensor this one has, at the same shape: the same base
        architecture (its cross-attention layers) and the same encoder sizes. A difference names the
        first tensor that differs.
        """
        if revision is None:
            name_or_path, revision = split_revision(name_or_path)
        folder = resolve_adapter_folder(name_or_path, revision=revision)
        theirs = check_adapter_files(folder)
        shapes = {
            name: shape
            for name, shape in tensor_shapes(folder / WEIGHTS_NAME).items()
            if not name.startswith("token_embeddings.")
        }
        ours = {
            name: tuple(tensor.shape)
            for name, tensor in self.adapter_state_dict().items()
            if not name.startswith("token_embeddings.")
        }
        made_for = f"it was trained on {theirs.base_model or 'an unknown base'} with encoder {theirs.encoder.backbone}"
        for name in sorted(set(ours) | set(shapes)):
            if name not in shapes or name not in ours or shapes[name] != ours[name]:
                has = f"has {name} {list(shapes[name])}" if name in shapes else f"has no {name}"
                wants = f"this adapter's is {list(ours[name])}" if name in ours else "this adapter has none"
                raise AdapterError(
                    f"adapter {folder} cannot start this training: it {has}, {wants} ({made_for}). Start from "
                    "an adapter of the same base architecture and encoder sizes (model.encoder), or from scratch."
                )
        state = load_file(folder / WEIGHTS_NAME)
        # With the trained embeddings of the placeholders both adapters have: add_tokens then writes them into
        # the text encoders instead of the class words' (call this first).
        shared = [name for name in state if name.startswith("token_embeddings.")
                  and name.partition(":")[2] in self.config.placeholders]  # fmt: skip
        taken = {name: state[name] for name in ours} | {name: state[name].float() for name in shared}
        self.load_adapter_state_dict(taken, source=str(folder / WEIGHTS_NAME))
        for name in shared:
            encoder_name = name.removeprefix("token_embeddings.").partition(":")[0]
            if encoder_name not in self.config.token_encoders:
                self.config.token_encoders.append(encoder_name)
        return theirs

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The resampler, every nested projection and, if :meth:`train_token_embeddings` was called, the
        placeholder embeddings (the frozen backbone is not a submodule)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------ subjects
    def encode(self, images: Tensor) -> Tensor:
        """(S, 3, H, W) subject images in [0, 1] -> (S, M, d) subject tokens."""
        return self.encoder(images)

    def set_subjects(self, bindings: Sequence[SubjectBinding]) -> None:
        """Bind subjects for the next UNet calls; their nested keys/values are computed now, once.

        Computing them eagerly (not inside the UNet forward) makes them reusable across
        denoising steps and safe under gradient checkpointing, which re-runs the forward. Bindings that share
        one tokens tensor (a training batch binding each of an adapter's tokens to the same images) share
        one projection.
        """
        projections: dict[int, tuple[dict[str, tuple[Tensor, Tensor]], list[Tensor]]] = {}
        for binding in bindings:
            if binding.masks.dtype != torch.bool or binding.masks.ndim != 2:
                raise ValueError(
                    f"masks must be a (B, T) bool tensor, got {binding.masks.dtype} {tuple(binding.masks.shape)}."
                )
            if binding.image_index is None and binding.tokens.shape[0] != binding.masks.shape[0]:
                raise ValueError(
                    f"{binding.tokens.shape[0]} subject images for {binding.masks.shape[0]} prompts: pass "
                    "image_index to say which image each prompt uses."
                )
            check_injection_options(
                self.config.injection,
                token_weight=binding.token_weight,
                value_norm_factor=binding.value_norm_factor or None,  # a binding's 0 means off
                source=f"adapter {self.config.token!r}",
            )
            if id(binding.tokens) not in projections:  # the bindings, and so their tokens, are alive here
                projections[id(binding.tokens)] = self._project(binding.tokens)
            nested_kv, binding.projections = projections[id(binding.tokens)]
            binding.nested_kv = dict(nested_kv)
            binding.layouts = batch_layouts(binding, next(iter(binding.nested_kv.values()))[0].device)
        check_bindings_disjoint(bindings)
        self._bindings = list(bindings)

    def project(self, tokens: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Every layer's nested keys and values of (S, M, d) subject tokens: layer -> ((S, H, M, D), same).

        Equal to calling each :class:`NestedLayer`, but one matrix product per head dim (SDXL: one for all
        70 layers) instead of 140: on a GPU the per-layer launches, not the arithmetic, would dominate.
        """
        return self._project(tokens)[0]

    def _project(self, tokens: Tensor) -> tuple[dict[str, tuple[Tensor, Tensor]], list[Tensor]]:
        """:meth:`project`, and the (S, heads, M, D) tensors whose slices the keys and values are."""
        by_head_dim: dict[int, list[tuple[str, NestedLayer]]] = {}
        for key, layer in self.layers.items():
            by_head_dim.setdefault(layer.to_k.out_features // layer.heads, []).append((key, layer))
        projected: dict[str, tuple[Tensor, Tensor]] = {}
        stacks = []
        s, m, _ = tokens.shape
        for head_dim, layers in by_head_dim.items():
            weight = torch.cat([w for _, layer in layers for w in (layer.to_k.weight, layer.to_v.weight)])
            heads = weight.shape[0] // head_dim
            # (S, M, heads of every layer, D) -> (S, heads, M, D), contiguous once: each head's (M, D) keys
            # and values are then contiguous in every layer's piece, as every denoising step's attention reads them.
            stack = (
                F.linear(tokens.to(weight.dtype), weight)
                .view(s, m, heads, head_dim)
                .transpose(1, 2)
                .contiguous()
            )
            # One split, not a slice per layer: the backward of a slice builds a zero tensor of the whole
            # stack for each layer's gradient (140 stack-sized fills and sums for SDXL); a split's backward
            # concatenates every layer's gradient once.
            pieces = stack.split([layer.heads for _, layer in layers for _ in range(2)], dim=1)
            for (key, _), keys, values in zip(layers, pieces[0::2], pieces[1::2], strict=True):
                projected[_unescape(key)] = (keys, values)
            stacks.append(stack)
        return projected, stacks

    def clear_subjects(self) -> None:
        self._bindings = []

    @contextlib.contextmanager
    def subjects_suspended(self) -> Iterator[None]:
        """No subject in the calls made inside (e.g. a pipeline's separate negative-prompt call); the bound
        subjects, with their computed keys and values, are back on exit."""
        bindings, self._bindings = self._bindings, []
        try:
            yield
        finally:
            self._bindings = bindings

    def layer_subjects(
        self, layer: LayerBinding, attn: nn.Module, batch_size: int, dtype: torch.dtype
    ) -> list[NestedSubject]:
        """The bound subjects at ``layer`` for a batch of ``batch_size`` samples, keys and values in ``dtype``."""
        subjects = []
        for index, (binding, (keys, values)) in enumerate(zip(self._bindings, layer.kv, strict=True)):
            layout = binding.layouts.get(batch_size)
            if layout is None:
                rows = binding.masks.shape[0]
                raise ValueError(
                    f"subjects were bound for {rows} prompts but the UNet got a batch of {batch_size} "
                    f"(expected {rows}, or {2 * rows} with classifier-free guidance). Call set_subjects with "
                    "one mask row per sample."
                )
            if keys.dtype != dtype:
                keys, values = keys.to(dtype), values.to(dtype)
                if not (keys.requires_grad or values.requires_grad or torch.compiler.is_compiling()):
                    # Inference (e.g. float32 projections on a float16 UNet): cast once, not at every step.
                    # (Compiled, the cast is part of the graph, and writing it back would key it by layer.)
                    layer.kv[index] = binding.nested_kv[layer.name] = (keys, values)
            subjects.append(
                NestedSubject(
                    mask=layout.masks,
                    keys=keys,
                    values=values,
                    image_index=layout.image_index,
                    # A dense subject's layer never reads which samples bind it (nor is compiled for them).
                    present=None if binding.dense else layout.present,
                    memo=layout.memo,
                    dense=binding.dense,
                    # None: the adapter's default; 0: rescaling off for this binding.
                    value_norm_factor=self.config.value_norm_factor
                    if binding.value_norm_factor is None
                    else (binding.value_norm_factor or None),
                    scale=binding.scale,
                    token_weight=binding.token_weight,
                    mode=self.config.injection,
                )
            )
        return subjects

    # ---------------------------------------------------------------------- attach / detach
    def check_fits(self, unet: nn.Module) -> None:
        """Raise an AdapterError naming the first layer where ``unet`` differs from the adapter's base."""
        theirs = unet_fingerprint(unet)
        ours = self.config.layers
        # A transformer is named by its class (SD3Transformer2DModel, FluxTransformer2DModel).
        joint = any(joint_layout(attn) is not None for attn in cross_attention_layers(unet).values())
        model = type(unet).__name__ if joint else "UNet"
        for name in sorted(set(ours) | set(theirs)):
            if name not in theirs:
                raise AdapterError(
                    f"the adapter has nested projections for layer {name!r}, which this {model} does not have "
                    f"(adapter: {len(ours)} cross-attention layers, {model}: {len(theirs)}). The adapter was made "
                    f"for base model {self.config.base_model or '<unknown>'}."
                )
            if name not in ours:
                raise AdapterError(
                    f"layer {name!r} of this {model} has no nested projections in the adapter (adapter: {len(ours)} "
                    f"cross-attention layers, {model}: {len(theirs)}). The adapter was made for base model "
                    f"{self.config.base_model or '<unknown>'}."
                )
            if "qk_norm" not in ours[name]:
                # Saved before layers recorded their query norm: the widths are all there is to check.
                theirs[name] = {key: value for key, value in theirs[name].items() if key != "qk_norm"}
            if ours[name] != theirs[name]:
                raise AdapterError(
                    f"layer {name!r} does not fit: the adapter expects {ours[name]}, this {model} has {theirs[name]}. "
                    f"The adapter was made for base model {self.config.base_model or '<unknown>'}."
                )

    def attach(self, unet: nn.Module) -> None:
        """Install nested processors on every layer of :func:`cross_attention_layers` (a UNet's ``attn2``, an
        SD3 / FLUX transformer's joint attention) and bind this adapter."""
        self.check_fits(unet)
        registry: dict[str, NestedAttnProcessor | NestedJointAttnProcessor] | None = getattr(
            unet, _REGISTRY_ATTR, None
        )
        if registry is None:
            registry = {}
            layers = cross_attention_layers(unet)
            for name, attn in layers.items():
                _check_not_an_ip_adapter(name, attn.processor)
            for name, attn in layers.items():
                registry[name] = nested_processor(name, attn)
                attn.set_processor(registry[name])
            setattr(unet, _REGISTRY_ATTR, registry)
            # The layer modules are looked up once here, not on every UNet call.
            hook = functools.partial(_before_unet_call, layers)
            setattr(unet, _HOOK_ATTR, unet.register_forward_pre_hook(hook, with_kwargs=True))
        for name, processor in registry.items():
            if not any(getattr(layer, "adapter", None) is self for layer in processor.bindings):
                layer = LayerBinding(self, name)
                processor.bindings.append(layer)
                self._layer_bindings.append(layer)

    def detach(self, unet: nn.Module) -> None:
        """Unbind this adapter; when none is left, restore the processors found at attach time."""
        registry: dict[str, NestedAttnProcessor | NestedJointAttnProcessor] | None = getattr(
            unet, _REGISTRY_ATTR, None
        )
        if registry is None:
            return
        detached = set()
        for processor in registry.values():
            detached.update(
                id(layer) for layer in processor.bindings if getattr(layer, "adapter", None) is self
            )
            processor.bindings = [layer for layer in processor.bindings if id(layer) not in detached]
        self._layer_bindings = [layer for layer in self._layer_bindings if id(layer) not in detached]
        if any(processor.bindings for processor in registry.values()):
            return
        layers = cross_attention_layers(unet)
        for name, processor in registry.items():
            layers[name].set_processor(processor.original_processor)
        getattr(unet, _HOOK_ATTR).remove()
        delattr(unet, _HOOK_ATTR)
        delattr(unet, _REGISTRY_ATTR)

    # ------------------------------------------------------------------- placeholder tokens
    def add_tokens(
        self, tokenizers: Sequence, text_encoders: Sequence, names: Sequence[str] | None = None
    ) -> None:
        """Make the adapter's placeholder tokens usable by the given tokenizer/text-encoder pairs.

        Each placeholder (``<person>``) is added to every tokenizer; its embedding is the one saved
        in this adapter, else it is initialised from the class word (and remembered here, so it is
        saved with the adapter). Plain class words need nothing.
        """

        names = _text_encoder_names(text_encoders, names)
        for token, class_word in self.config.placeholders.items():
            for name, tokenizer, text_encoder in zip(names, tokenizers, text_encoders, strict=True):
                token_id = add_placeholder_token(tokenizer, text_encoder, token, class_word)
                key = f"{name}:{token}"
                if key in self.token_embeddings:
                    set_token_embedding(text_encoder, token_id, self.token_embeddings[key].detach())
                else:
                    vector = get_token_embedding(text_encoder, token_id).detach().clone().float()
                    self.token_embeddings[key] = nn.Parameter(vector, requires_grad=False)
                    if name not in self.config.token_encoders:
                        self.config.token_encoders.append(name)

    def train_token_embeddings(
        self, tokenizers: Sequence, text_encoders: Sequence, names: Sequence[str] | None = None
    ) -> list:
        """Make the placeholder embeddings trainable (textual-inversion style).

        Call after :meth:`add_tokens` with the same tokenizers and text encoders. The text encoders stay
        frozen: they read each placeholder's row from this adapter's Parameter through a forward hook
        (:func:`~nested.tokens.read_token_embeddings_from`), so the trained rows are saved with the adapter
        and loaded by :meth:`add_tokens` at inference. Returns the hooks' handles (``.remove()`` to undo).
        """

        if not self.config.placeholders:
            raise ConfigError(
                f"there is no placeholder embedding to train: the adapter's tokens {list(self.config.tokens)} "
                "are vocabulary words. Bind a new token such as <person> (model.subjects: {<person>: person})."
            )
        handles = []
        for name, tokenizer, text_encoder in zip(
            _text_encoder_names(text_encoders, names), tokenizers, text_encoders, strict=True
        ):
            keys = {}  # token id -> its key in self.token_embeddings
            for token in self.config.placeholders:
                key = f"{name}:{token}"
                self.token_embeddings[key].requires_grad_(True)  # KeyError: add_tokens was not called
                (token_id,) = subject_token_ids(tokenizer, token)
                keys[token_id] = key
            rows = functools.partial(self._token_embedding_rows, keys)
            handles.append(read_token_embeddings_from(text_encoder, rows))
        return handles

    def _token_embedding_rows(self, keys: dict[int, str]) -> dict[int, Tensor]:
        # Looked up at every forward: under FSDP the registered tensors change (views of a gathered flat param).
        return {token_id: self.token_embeddings[key] for token_id, key in keys.items()}

    # -------------------------------------------------------------------------- save / load
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Named tensors of the file format: ``resampler.*``, ``layers.<layer>.to_k.weight``, ``token_embeddings.*``."""
        state = {f"resampler.{k}": v for k, v in self.encoder.resampler.state_dict().items()}
        for key, layer in self.layers.items():
            for name, tensor in layer.state_dict().items():
                state[f"layers.{_unescape(key)}.{name}"] = tensor
        for name, tensor in self.token_embeddings.items():
            state[f"token_embeddings.{name}"] = tensor
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def load_adapter_state_dict(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Inverse of :meth:`adapter_state_dict`; strict: unknown or missing tensors raise."""
        resampler, layers, token_embeddings = {}, {}, {}
        unknown = []
        for key, tensor in state.items():
            group, _, rest = key.partition(".")
            if group == "resampler":
                resampler[rest] = tensor
            elif group == "layers":
                layer_name, _, param = rest.rpartition(".")
                layer_name, _, proj = layer_name.rpartition(".")
                layers.setdefault(_escape(layer_name), {})[f"{proj}.{param}"] = tensor
            elif group == "token_embeddings":
                token_embeddings[rest] = tensor
            else:
                unknown.append(key)
        expected_layers = set(self.layers.keys())
        problems = [f"unknown tensors {unknown[:5]}"] if unknown else []
        if set(layers) != expected_layers:
            extra = sorted(_unescape(k) for k in set(layers) - expected_layers)
            absent = sorted(_unescape(k) for k in expected_layers - set(layers))
            problems.append(
                f"layers in the file but not in the config: {extra[:3]}; in the config but not the file: {absent[:3]}"
            )
        if problems:
            raise AdapterError(f"{source} does not match its adapter config: " + "; ".join(problems))
        self.encoder.resampler.load_state_dict(resampler, strict=True)
        for key, layer_state in layers.items():
            self.layers[key].load_state_dict(layer_state, strict=True)
        for name, tensor in token_embeddings.items():
            self.token_embeddings[name] = nn.Parameter(tensor.clone(), requires_grad=False)

    def save_pretrained(
        self, directory: str | os.PathLike, *, training: dict[str, Any] | None = None
    ) -> Path:
        """Write ``adapter.safetensors`` + ``adapter_config.json`` atomically (a staged folder that
        replaces ``directory`` when complete; modes follow the umask). ``training``: recorded in the
        config as :attr:`AdapterConfig.training` (``nested fit``'s exports)."""
        directory = Path(directory)
        config = dataclasses.replace(self.config, training=training) if training is not None else self.config
        weights = self.adapter_state_dict()
        with staged_directory(directory) as staging, storage_refusals_named(directory):
            # One metadata key: safetensors writes the metadata map in no fixed order, so two keys would
            # give the same weights different bytes. The format version is in adapter_config.json.
            save_file(weights, staging / WEIGHTS_NAME, metadata={"format": "pt"})
            (staging / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        image_encoder: str | SubjectEncoder | tuple | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> NestedAdapter:
        """Load a saved adapter from a folder or a Hugging Face Hub repo (safetensors only).

        Args:
            name_or_path: a local adapter folder, or a hub repo id (downloaded through the
                huggingface_hub cache; ``HF_HUB_OFFLINE=1`` is honoured).
            revision: a hub revision (branch, tag or commit) to pin.
            image_encoder: overrides where the frozen vision backbone comes from: a folder/hub id,
                an already loaded ``(model, image_size, mean, std)`` tuple (shared between adapters),
                or a whole :class:`SubjectEncoder` whose backbone is reused.
        """
        folder = resolve_adapter_folder(name_or_path, revision=revision)
        config = check_adapter_files(folder)
        weights_path = folder / WEIGHTS_NAME
        try:
            state = load_file(weights_path)
        except SafetensorError as error:  # changed on disk since it was checked
            raise AdapterError(f"{weights_path} is not a valid safetensors file ({error}).") from error

        spec = config.encoder
        if isinstance(image_encoder, (str, os.PathLike)):
            spec = dataclasses.replace(spec, backbone=str(image_encoder), subfolder=None)
        backbone = None
        if isinstance(image_encoder, SubjectEncoder):
            enc = image_encoder
            backbone = (
                enc.backbone,
                enc.image_size,
                tuple(enc.image_mean.flatten().tolist()),
                tuple(enc.image_std.flatten().tolist()),
            )
        elif isinstance(image_encoder, tuple):
            backbone = image_encoder
        encoder = SubjectEncoder.from_spec(spec, backbone=backbone, dtype=dtype)
        trained_on = state["resampler.proj_in.weight"].shape[1]
        if encoder.resampler.proj_in.in_features != trained_on:
            raise AdapterError(
                f"the image encoder {spec.backbone!r} gives {encoder.resampler.proj_in.in_features}-wide features, "
                f"but the adapter's resampler.proj_in.weight in {weights_path} takes {trained_on}: it was trained "
                "with another vision backbone. Use the one in its adapter_config.json (encoder.backbone), or pass "
                "image_encoder= / --image-encoder with that one."
            )
        adapter = cls(config, encoder)
        adapter.load_adapter_state_dict(state, source=str(weights_path))
        return adapter


def check_bindings_disjoint(bindings: Sequence[SubjectBinding]) -> None:
    """Raise a ConfigError if two bound subjects mark the same token of a prompt (host-side sets only)."""
    seen: dict[int, set[tuple[int, int]]] = {}
    for binding in bindings:
        rows = binding.masks.shape[0]
        marked = binding.layouts[rows].marked
        taken = seen.setdefault(rows, set())
        clash = taken & marked
        if clash:
            sample, position = min(clash)
            raise ConfigError(
                f"two subjects mark the same token position {position} in sample {sample}; each "
                "subject must bind to its own token."
            )
        taken |= marked


def _check_not_an_ip_adapter(name: str, processor: object) -> None:
    """Refuse diffusers' IP-Adapter processors (``load_ip_adapter``): their layers take the image embeddings with
    the text, which a nested processor in their place would not read."""
    if "IPAdapter" in type(processor).__name__:
        raise ConfigError(
            f"layer {name!r} runs diffusers' {type(processor).__name__}: an IP-Adapter (load_ip_adapter) and nested "
            "adapters cannot share the cross-attention layers; call unload_ip_adapter() on the pipeline first."
        )


def _before_unet_call(layers: dict[str, nn.Module], unet: nn.Module, args, kwargs) -> None:
    """Forward pre-hook: put back processors replaced since attach; check that adapters' subjects are disjoint;
    tell a FLUX transformer's single-stream processors the text length of this call.

    All read only Python state and shapes (no tensor is read), so the hook costs no device sync.
    """
    registry: dict[str, NestedAttnProcessor | NestedJointAttnProcessor] = getattr(unet, _REGISTRY_ATTR, {})
    set_text_length(list(registry.values()), args, kwargs)
    # A loop, not a comprehension: where torch.compile traces this hook as a frame of its own (a compile
    # without fullgraph), its tracer cannot step the iterator a comprehension gets, and breaks the graph.
    replaced = []
    for name in list(registry):
        if layers[name].processor is not registry[name]:
            replaced.append(name)
    for name in replaced:
        _check_not_an_ip_adapter(name, layers[name].processor)
    if replaced:
        warnings.warn(
            f"the nested attention processors of {len(replaced)} layers were replaced (by set_attn_processor or "
            "enable_xformers_memory_efficient_attention?) after the adapters were attached; re-attaching them. "
            "The replacing processors are kept and restored on detach.",
            stacklevel=2,
        )
        for name in replaced:
            registry[name].original_processor = layers[name].processor
            layers[name].set_processor(registry[name])
    layer_bindings = next(iter(registry.values())).bindings if registry else []
    if len(layer_bindings) > 1:  # one adapter's subjects were checked when they were bound
        subjects = []
        for layer_binding in layer_bindings:
            subjects.extend(getattr(getattr(layer_binding, "adapter", None), "_bindings", []))
        check_bindings_disjoint(subjects)


def split_revision(name_or_path: str | os.PathLike) -> tuple[str | os.PathLike, str | None]:
    """``user/repo@revision`` -> (``user/repo``, ``revision``); a local path (even one with ``@``) or a
    name without a revision -> (itself, None)."""
    name = str(name_or_path)
    if "@" in name and not Path(name).exists():
        source, revision = name.rsplit("@", 1)
        return source, revision
    return name_or_path, None


def resolve_adapter_folder(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local adapter folder, downloading a hub repo into the huggingface_hub cache if needed.

    ``name_or_path`` is a local folder if one exists there, else a Hub repo id ``user/name``. With a
    ``revision`` it is always a Hub repo id: a local folder has no revisions.
    """
    path, name = Path(name_or_path), str(name_or_path)
    hub_id = not (os.path.isabs(name) or name.startswith((".", "~"))) and name.count("/") == 1
    if revision is not None and not hub_id:
        raise UsageError(
            f"adapter {name!r} with revision {revision!r}: only a Hub repo id (user/name) has revisions, not a "
            "local folder; drop the revision."
        )
    if revision is not None or not path.exists():
        if not hub_id:
            raise MissingFileError(
                f"adapter folder {name!r} does not exist (and is not a hub repo id user/name)."
            )
        try:
            path = Path(
                snapshot_download(
                    str(name_or_path),
                    revision=revision,
                    allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "*.md", "*.png", "*.json"],
                )
            )
        except Exception as error:
            refusal = _download_refusal(str(name_or_path), revision, error)
            if refusal is None:
                raise  # a bug: its traceback
            raise refusal from error
    check_adapter_file_set(path)
    return path


def _download_refusal(name: str, revision: str | None, error: Exception) -> NestedUserError | None:
    """The one-line error for an adapter download that failed on the Hub's side or the user's (a missing repo or
    revision, no network, offline without the cache, a server that is not a Hub, an unusable cache folder); None
    for anything else, a bug."""
    what = f"could not download adapter {name!r} (revision {revision or 'main'})"
    if isinstance(error, json.JSONDecodeError):
        return HubError(
            f"{what}: the server at {hub_endpoint(HfApi())} did not answer as a Hugging Face Hub does "
            f"({error}). Check HF_ENDPOINT."
        )
    if isinstance(error, (HFValidationError, LocalEntryNotFoundError)) or network_error(error) is not None:
        reason = hub_unreachable(error) or redact(" ".join(str(error).split())).rstrip(".")
        return HubError(
            f"{what} from the Hub: {reason}. Check the repo id, your network / HF_ENDPOINT, and your token "
            "(HF_TOKEN or `hf auth login`) for private repos."
        )
    if isinstance(error, OSError):  # writing the cache: not a folder, no permission, no space left
        return StorageError(
            f"{what} into the Hugging Face cache {constants.HF_HUB_CACHE}: {redact(str(error)).rstrip('.')}. "
            "Fix that folder or free space there, or choose another with HF_HUB_CACHE."
        )
    return None


# ------------------------------------------------------------------------------ checking a folder
def check_adapter_file_set(folder: Path) -> None:
    """Raise unless ``folder`` holds ``adapter_config.json`` and ``adapter.safetensors`` and no pickle."""
    if not folder.exists():
        raise MissingFileError(f"adapter folder {str(folder)!r} does not exist.")
    if not folder.is_dir():
        raise MissingFileError(
            f"{folder} is not an adapter folder (expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME})."
        )
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            f"{folder} contains pickle-format weights {pickles}; nested loads only {WEIGHTS_NAME} (safetensors) "
            "and never unpickles. Remove those files or convert them with safetensors."
        )
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise MissingFileError(
            f"{folder} is not a nested adapter folder: missing {missing} (export one with nested fit, or "
            "NestedAdapter.save_pretrained)."
        )


def read_adapter_config(folder: Path) -> AdapterConfig:
    """The ``adapter_config.json`` of ``folder``; an unreadable or invalid one names the file."""
    path = folder / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(
            f"{path} is not valid JSON ({error}); restore the {CONFIG_NAME} saved with the weights."
        ) from error
    if not isinstance(data, dict):
        raise AdapterError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return AdapterConfig.from_dict(data, source=str(path))


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in a safetensors file, from its header (no tensor is read).

    The header is validated as loading does: a pickle, a truncated file or a file with trailing bytes
    is refused.
    """
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise AdapterError(
            f"{path} is not a valid safetensors file ({error}): truncated, or another format renamed; "
            "nested never unpickles weights. Export the adapter again (nested fit, save_pretrained)."
        ) from error


def check_adapter_files(folder: str | os.PathLike) -> AdapterConfig:
    """Check an adapter folder as loading it does, without building a model; returns its config.

    The checks :meth:`NestedAdapter.from_pretrained` makes before it reads a tensor and ``nested push``
    makes before it uploads a byte: the two files and no pickle, a valid config, a complete safetensors
    file, and every tensor's name and shape matching the config. A mismatch names the tensor and the
    config field.
    """
    folder = Path(folder)
    check_adapter_file_set(folder)
    config = read_adapter_config(folder)
    _check_tensors_fit_config(config, tensor_shapes(folder / WEIGHTS_NAME), folder)
    return config


def _layer_tensor_shapes(config: AdapterConfig, source: Path) -> dict[str, tuple[int, ...]]:
    """``layers.<layer>.to_k.weight`` / ``to_v.weight`` shapes, from the config's ``layers``."""
    shapes = {}
    for name, dims in config.layers.items():
        inner, heads = (dims.get(key) if isinstance(dims, dict) else None for key in ("inner_dim", "heads"))
        if not all(isinstance(v, int) and v > 0 for v in (inner, heads)) or inner % heads:
            raise AdapterError(
                f"{source}: layers[{name!r}] = {dims} needs positive integers inner_dim and heads, with heads "
                f"dividing inner_dim; restore the {CONFIG_NAME} saved with the weights."
            )
        for projection in ("to_k", "to_v"):
            shapes[f"layers.{name}.{projection}.weight"] = (inner, config.encoder.token_dim)
    return shapes


def _resampler_tensor_shapes(spec: EncoderSpec, input_dim: int) -> dict[str, tuple[int, ...]]:
    """The resampler's tensor shapes for ``spec`` (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        resampler = Resampler(
            input_dim,
            num_tokens=spec.num_tokens,
            width=spec.width,
            depth=spec.depth,
            heads=spec.heads,
            output_dim=spec.output_dim,
        )
    return {f"resampler.{key}": tuple(value.shape) for key, value in resampler.state_dict().items()}


def _config_field(config: AdapterConfig, key: str, axis: int) -> tuple[str, object]:
    """The config field (and its value) that sets dimension ``axis`` of tensor ``key``."""
    spec = config.encoder
    token_dim = ("encoder.output_dim", spec.output_dim) if spec.output_dim else ("encoder.width", spec.width)
    if key.startswith("layers."):
        layer = key[len("layers.") :].rsplit(".", 2)[0]
        return (f"layers[{layer!r}].inner_dim", config.layers[layer]["inner_dim"]) if axis == 0 else token_dim
    if key == "resampler.latents" and axis == 1:
        return "encoder.num_tokens", spec.num_tokens
    if key.startswith(("resampler.proj_out.", "resampler.norm_out.")) and axis == 0:
        return token_dim
    return "encoder.width", spec.width


def _check_tensors_fit_config(config: AdapterConfig, found: dict[str, tuple[int, ...]], folder: Path) -> None:
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    fix = f"Restore the {CONFIG_NAME} saved with these weights (was it edited, or copied from another adapter?)."
    unknown = sorted(k for k in found if not k.startswith(("resampler.", "layers.", "token_embeddings.")))
    if unknown:
        raise AdapterError(f"{weights_path} holds unknown tensors {unknown[:5]}; it is not a nested adapter.")

    in_file = {k.rsplit(".", 2)[0][len("layers.") :] for k in found if k.startswith("layers.")}
    extra, absent = sorted(in_file - set(config.layers)), sorted(set(config.layers) - in_file)
    if extra or absent:
        sides = [f"in the weights but not in the config's layers: {extra[:3]}"] if extra else []
        sides += [f"in the config's layers but not in the weights: {absent[:3]}"] if absent else []
        raise AdapterError(
            f"{config_path} and {weights_path} disagree on the cross-attention layers ({'; '.join(sides)}). {fix}"
        )

    blocks = {int(k.split(".")[2]) for k in found if k.startswith("resampler.blocks.")}
    if blocks and len(blocks) != config.encoder.depth:
        raise AdapterError(
            f"{config_path} says encoder.depth = {config.encoder.depth}, but {weights_path} holds "
            f"{len(blocks)} resampler blocks (resampler.blocks.*). {fix}"
        )

    input_dim = found.get("resampler.proj_in.weight", (1, 1))[-1]  # the backbone's width: checked at load
    expected = {
        **_resampler_tensor_shapes(config.encoder, input_dim),
        **_layer_tensor_shapes(config, config_path),
    }
    missing = sorted(set(expected) - set(found))
    surplus = sorted(k for k in set(found) - set(expected) if not k.startswith("token_embeddings."))
    if missing or surplus:
        raise AdapterError(
            f"{weights_path} does not match {config_path}: tensors missing {missing[:3]}, unexpected {surplus[:3]}. "
            f"{fix}"
        )
    disagreements: dict[str, str] = {}
    # The latents first: they carry both num_tokens and width.
    for key in sorted(expected, key=lambda k: (k != "resampler.latents", not k.startswith("resampler."), k)):
        want, have = expected[key], found[key]
        if want == have:
            continue
        if len(want) != len(have):
            disagreements.setdefault(key, f"tensor {key} has shape {have}, the config gives {want}")
            continue
        axis = next(i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b)
        field_name, value = _config_field(config, key, axis)
        disagreements.setdefault(
            field_name,
            f"{field_name} is {value} but tensor {key} has shape {have} (dimension {axis}: {have[axis]})",
        )
    if disagreements:
        raise AdapterError(
            f"{config_path} does not match {weights_path}: " + "; ".join(disagreements.values()) + f". {fix}"
        )

    wanted_embeddings = {
        f"token_embeddings.{encoder}:{token}"
        for encoder in config.token_encoders
        for token in config.placeholders
    }
    embeddings = {k for k in found if k.startswith("token_embeddings.")}
    if embeddings != wanted_embeddings:
        raise AdapterError(
            f"{config_path} and {weights_path} disagree on the placeholder embeddings: the config's token_encoders "
            f"{config.token_encoders} and tokens {sorted(config.placeholders)} need "
            f"{sorted(wanted_embeddings)[:4]}, the weights hold {sorted(embeddings)[:4]}. {fix}"
        )
    bad = [k for k in embeddings if len(found[k]) != 1]
    if bad:
        raise AdapterError(f"{weights_path}: {bad[0]} must be a vector, it has shape {found[bad[0]]}.")

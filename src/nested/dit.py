"""Nested attention in diffusion transformers: SD3/SD3.5 joint blocks, FLUX double- and single-stream blocks.

A joint-attention (MMDiT) block runs one attention over a sequence that holds both the text and the
image tokens, so the image queries attend to the text keys exactly as a UNet's cross-attention queries
do, next to the image keys. The subject token is one of those text keys, and nested attention replaces
its value, per image query, with the query's own nested value, through the same identity and the same
code as the UNet path (:func:`nested.attention.nested_attention_subjects`, with the joint sequence as
the keys):

    out_n = attention(q_n, K, V) + p_{n,s} (v*_n - V_s)     for every image query n

The text queries keep this layer's plain attention: the subject enters through the image queries that
attend to its token (the text tokens of later blocks, which attend to the image tokens, then see it there).

Where each block puts the text in its joint sequence:

- SD3 / SD3.5 ``JointTransformerBlock.attn``: ``[image; text]``, the text from ``encoder_hidden_states``
  through ``add_q/k/v_proj``; no rotary embedding.
- FLUX ``FluxTransformerBlock.attn`` (double stream): ``[text; image]``, likewise, with rotary embedding
  (text positions are all zero, so the text keys are not rotated).
- FLUX ``FluxSingleTransformerBlock.attn`` (single stream): the block has already concatenated
  ``[text; image]`` and one projection serves both, so the processor must be told the text length
  (:attr:`NestedJointAttnProcessor.text_length`; :func:`set_text_length` does it for a whole model from
  the model's own ``encoder_hidden_states``); the subject's value is ``to_v`` at its position.

Subjects come from bindings, as for :class:`~nested.attention.NestedAttnProcessor`: objects with
``subjects(attn, batch_size, dtype)`` returning :class:`~nested.attention.NestedSubject`
whose ``mask`` is (B, T_text) over the text tokens alone; the processor places them in the joint sequence.
Without a bound subject, or when no sample's prompt holds one, the output is bit for bit the one of
diffusers' ``JointAttnProcessor2_0`` / ``FluxAttnProcessor`` (the plain path goes through diffusers'
``dispatch_attention_fn``, so ``set_attention_backend`` reaches it); the nested path runs on torch's
``scaled_dot_product_attention``, which it needs for the extra value columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nested.attention import NestedSubject, nested_attention_subjects, rows_present

__all__ = [
    "JointLayout",
    "NestedJointAttnProcessor",
    "joint_attention_layers",
    "joint_layer_fingerprint",
    "joint_layout",
    "set_text_length",
    "text_projections",
]

# Where the text sits in a block's joint sequence (see the module docstring).
JointLayout = Literal["image_first", "text_first", "single"]


def joint_layout(attn: nn.Module) -> JointLayout | None:
    """The layout of a transformer block's attention module, or None for any other attention (a UNet's)."""
    # Here, not at the top: `nested push` imports the adapter, which imports this module, and needs no diffusers.
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_flux import FluxAttention

    if isinstance(attn, FluxAttention):
        return "single" if attn.added_kv_proj_dim is None else "text_first"
    if (
        isinstance(attn, Attention)
        and not attn.is_cross_attention
        and getattr(attn, "add_k_proj", None) is not None
    ):
        return "image_first"
    return None


def joint_attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The ``attn`` modules of an SD3 / FLUX transformer's joint and single-stream blocks, by module name."""
    # Here, not at the top: see joint_layout.
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    blocks = (JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock)
    return {
        f"{name}.attn": block.attn
        for name, block in model.named_modules()
        if isinstance(block, blocks) and joint_layout(block.attn) is not None
    }


def text_projections(attn: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The (key, value) projections an attention layer applies to the text tokens: the added ones of a joint
    block, the shared ones of a FLUX single-stream block or a UNet's cross-attention."""
    if joint_layout(attn) in ("image_first", "text_first"):
        return attn.add_k_proj, attn.add_v_proj
    return attn.to_k, attn.to_v


def joint_layer_fingerprint(attn: nn.Module) -> dict[str, int | str]:
    """What an adapter's nested projections must fit, as for a UNet's cross-attention layer: query dim, text
    dim (the width the subject token's value is projected from), inner dim and heads; and the norm the block
    puts on its queries (``qk_norm``: the norm's class name, or ``none``). The nested keys meet the queries
    after that norm, so keys learned against RMS-normed queries (SD3.5, FLUX) do not fit a block without it
    (SD3), whose widths can be the same (SD3-Medium and SD3.5-Medium)."""
    return {
        "query_dim": attn.to_q.in_features,
        "cross_attention_dim": text_projections(attn)[0].in_features,
        "inner_dim": attn.to_v.out_features,
        "heads": attn.heads,
        "qk_norm": "none" if attn.norm_q is None else type(attn.norm_q).__name__,
    }


def set_text_length(processors: Sequence[object], args: Sequence, kwargs: Mapping) -> None:
    """Tell the single-stream nested processors among ``processors`` the text length of a transformer call.

    ``args`` and ``kwargs`` are those of a ``FluxTransformer2DModel`` call (a forward pre-hook's), whose
    ``encoder_hidden_states``, its second parameter, is (B, T_text, C). Nothing is read when no processor is
    single-stream (a UNet's call has another signature).
    """
    single = [p for p in processors if isinstance(p, NestedJointAttnProcessor) and p.layout == "single"]
    if not single:
        return
    text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    for processor in single:
        processor.text_length = None if text is None else int(text.shape[1])


class NestedJointAttnProcessor:
    """Diffusers attention processor for an SD3 joint block or a FLUX double- or single-stream block.

    It computes the block's projections, norms and rotary embedding exactly as diffusers'
    ``JointAttnProcessor2_0`` (``image_first``) or ``FluxAttnProcessor`` (``text_first``, ``single``) do,
    and adds every bound subject's nested term on the image queries (module docstring). Like
    :class:`~nested.attention.NestedAttnProcessor` it is a plain object: the trainable projections live in
    the bindings, so the transformer's state dict never changes.

    Attributes:
        layer_name: the attention module's name in the model (for error messages).
        original_processor: the processor this one replaced (restored on detach).
        layout: where the text sits in the joint sequence (:data:`JointLayout`).
        bindings: objects with ``subjects(attn, batch_size, dtype)``: the adapters at this layer.
        text_length: ``single`` layout only: how many of the sequence's first tokens are text, for the
            current call. Needed when a subject is bound.
    """

    # Read by ModelMixin.set_attention_backend / parallel configs: without them these processors are skipped.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer_name: str, original_processor: object, layout: JointLayout):
        if layout not in ("image_first", "text_first", "single"):
            raise ValueError(f"layout must be 'image_first', 'text_first' or 'single', got {layout!r}.")
        self.layer_name = layer_name
        self.original_processor = original_processor
        self.layout = layout
        self.bindings: list[object] = []
        self.text_length: int | None = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Tensor | tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if self.layout == "image_first":
            # SD3's JointAttnProcessor2_0 takes an attention mask and ignores it: so does this, to stay the
            # same model when no subject is bound.
            attention_mask = None
        query, key, value = self.joint_projections(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb
        )
        text = self.text_span(hidden_states, encoder_hidden_states)
        subjects = self._subjects(attn, query, text)
        if subjects:
            if self._parallel_config is not None:
                raise NotImplementedError(
                    f"{self.layer_name}: nested attention does not split the joint sequence across devices; "
                    "bind subjects without a context-parallel config (enable_parallelism)."
                )
            out = _nested_joint_attention(query, key, value, subjects, text, attention_mask)
        else:
            # Here, not at the top: see joint_layout.
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            out = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        out = out.flatten(2, 3).to(query.dtype)
        return self._output(attn, out, hidden_states, encoder_hidden_states)

    # ------------------------------------------------------------------------ the block's own math
    def joint_projections(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None,
        image_rotary_emb: Tensor | tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key and value of the joint sequence, each (B, S, H, D), as the block's default processor
        computes them."""
        # FLUX's head_dim stays right when tensor parallelism shards the heads; SD3's Attention has none.
        head_dim = getattr(attn, "head_dim", None) or attn.to_q.out_features // attn.heads
        if self.layout != "image_first" and getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (x.unflatten(-1, (-1, head_dim)) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None and self.layout != "single":
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
                text_q, text_k, text_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                text_q = attn.add_q_proj(encoder_hidden_states)
                text_k = attn.add_k_proj(encoder_hidden_states)
                text_v = attn.add_v_proj(encoder_hidden_states)
            text_q, text_k, text_v = (x.unflatten(-1, (-1, head_dim)) for x in (text_q, text_k, text_v))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            if self.layout == "image_first":
                query, key, value = (
                    torch.cat(pair, dim=1) for pair in ((query, text_q), (key, text_k), (value, text_v))
                )
            else:
                query, key, value = (
                    torch.cat(pair, dim=1) for pair in ((text_q, query), (text_k, key), (text_v, value))
                )
        if image_rotary_emb is not None:
            # Here, not at the top: see joint_layout.
            from diffusers.models.embeddings import apply_rotary_emb

            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        return query, key, value

    def _output(
        self, attn: nn.Module, out: Tensor, hidden_states: Tensor, encoder_hidden_states: Tensor | None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The block's output projections of the (B, S, inner) attention output, as its default processor."""
        if encoder_hidden_states is None or self.layout == "single":
            return out
        if self.layout == "image_first":
            image, text = out.split([hidden_states.shape[1], out.shape[1] - hidden_states.shape[1]], dim=1)
            if not attn.context_pre_only:
                text = attn.to_add_out(text)
            image = attn.to_out[1](attn.to_out[0](image))
            return image, text
        text, image = out.split_with_sizes(
            [encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())

    # ---------------------------------------------------------------------------------- subjects
    def text_span(
        self, hidden_states: Tensor, encoder_hidden_states: Tensor | None
    ) -> tuple[int, int] | None:
        """(start, stop) of the text in the joint sequence; None when the call has no text."""
        if self.layout == "single":
            return None if self.text_length is None else (0, self.text_length)
        if encoder_hidden_states is None:
            return None
        text_length = encoder_hidden_states.shape[1]
        start = hidden_states.shape[1] if self.layout == "image_first" else 0
        return start, start + text_length

    def _subjects(self, attn: nn.Module, query: Tensor, text: tuple[int, int] | None) -> list[NestedSubject]:
        """The bound subjects that mark a token in at least one sample (every dense one), placed in the joint
        sequence."""
        batch, total = query.shape[0], query.shape[1]
        subjects = [
            subject for binding in self.bindings for subject in binding.subjects(attn, batch, query.dtype)
        ]
        subjects = [s for s in subjects if any(rows_present(s))]
        if not subjects:
            return []
        if text is None:
            raise ValueError(
                f"{self.layer_name}: a subject is bound, but this single-stream block was not told how many of "
                "its tokens are text; set its processor's text_length (set_text_length), or attach through "
                "NestedAdapter.attach, which does it at every transformer call."
            )
        start, stop = text
        return [_in_joint_sequence(s, start, stop, total, self.layer_name) for s in subjects]


def _in_joint_sequence(
    subject: NestedSubject, start: int, stop: int, total: int, layer_name: str
) -> NestedSubject:
    """``subject`` with its (B, T_text) mask placed at ``start:stop`` of a (B, total) joint sequence.

    The tensors derived from the mask are kept in a memo of their own per joint layout, so a binding
    that meets another resolution (another ``total``) never reads stale ones. Not under torch.compile,
    which folds them into the graph itself (and cannot write to a memo inside a checkpointed block).
    """
    text_length = subject.mask.shape[1]
    if text_length != stop - start:
        raise ValueError(
            f"{layer_name}: the subject masks cover {text_length} text tokens, but this call has "
            f"{stop - start}; build the masks with the tokenizer and max length of the prompts the "
            "transformer gets."
        )
    if subject.memo is None or torch.compiler.is_compiling():
        memo = None
    else:
        memo = subject.memo.setdefault(("joint", start, total), {})
    mask = None if memo is None else memo.get("mask")
    if mask is None:
        mask = F.pad(subject.mask, (start, total - stop))
        if memo is not None:
            memo["mask"] = mask
    return dataclasses.replace(subject, mask=mask, memo=memo)


def _nested_joint_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    subjects: list[NestedSubject],
    text: tuple[int, int],
    attn_mask: Tensor | None,
) -> Tensor:
    """(B, S, H, D) attention of the joint sequence with the subjects' nested values on the image queries.

    ``query``, ``key``, ``value``: (B, S, H, D); the text queries ``text[0]:text[1]`` get the plain output.
    """
    start, stop = text
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, S, D) views

    def rows(mask: Tensor | None, span: slice) -> Tensor | None:
        # A mask with one row per query keeps the rows of these queries; a (.., 1, S) mask applies to all.
        return mask if mask is None or mask.shape[-2] == 1 else mask[..., span, :]

    # One split, not slices: each slice's backward would build a zero tensor of the whole query.
    image_before, text_queries, image_after = q.split([start, stop - start, q.shape[2] - stop], dim=2)
    parts = []
    if start > 0:  # image first
        parts.append(
            nested_attention_subjects(image_before, k, v, subjects, rows(attn_mask, slice(0, start)))
        )
    parts.append(
        F.scaled_dot_product_attention(text_queries, k, v, attn_mask=rows(attn_mask, slice(start, stop)))
    )
    if stop < q.shape[2]:  # image after the text
        parts.append(
            nested_attention_subjects(image_after, k, v, subjects, rows(attn_mask, slice(stop, None)))
        )
    return torch.cat(parts, dim=2).transpose(1, 2)

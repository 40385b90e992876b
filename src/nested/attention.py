"""Nested attention: the pure math and the diffusers processor for cross-attention layers.

In a cross-attention layer the subject token's value V_s is replaced, per query, by a nested
attention over the subject encoder's tokens:

    v*_n = softmax(q_n K~^T / sqrt(d)) V~
    out_n = sum_{t != s} a_{n,t} V_t + a_{n,s} v*_n

which is computed without ever building a per-query value tensor of shape (B, H, N, T, D) as

    out = SDPA(Q, K, V) + a[..., s] * (v* - V_s)

where a[..., s] are the attention probabilities on the subject column(s). They come out of the
same fused SDPA call as the plain output, as extra value columns (a one-hot column per subject), so
the N x T probabilities are never materialised either. Keys and all other values are untouched,
so a sample whose prompt lacks the subject token gets exactly the plain attention output.

Nested injection is query-dependent per token: each query gets its own subject value, but only in
proportion to how much it attends to the subject token, so the text still decides where the subject
goes. The ``"decoupled"`` injection mode (IP-Adapter's decoupled cross-attention, kept as an ablation
with the same encoder and projections) instead adds ``scale * SDPA(Q, K~, V~)`` to every query of a
bound sample, whatever that query attends to in the text:

    out = SDPA(Q, K, V) + scale * SDPA(Q, K~, V~)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from nested.errors import ConfigError

__all__ = [
    "INJECTION_MODES",
    "InjectionMode",
    "NestedSubject",
    "nested_attention",
    "nested_attention_subjects",
    "NestedAttnProcessor",
    "check_disjoint",
    "check_injection_mode",
    "check_token_weight",
    "check_value_norm_factor",
    "rows_present",
]

InjectionMode = Literal["nested", "decoupled"]
# How a subject's per-layer keys/values enter a cross-attention layer (see the module docstring).
INJECTION_MODES: tuple[str, ...] = ("nested", "decoupled")


def check_injection_mode(mode: str, source: str = "injection") -> str:
    """``mode`` if it is one of :data:`INJECTION_MODES`, else a ConfigError naming the allowed values."""
    if mode not in INJECTION_MODES:
        allowed = ", ".join(repr(m) for m in INJECTION_MODES)
        raise ConfigError(f"{source} must be one of {allowed}; got {mode!r}.")
    return mode


def check_token_weight(weight: float, source: str = "token_weight") -> float:
    """``weight`` if it is > 0 (it becomes ``log(weight)`` on the subject's logits), else a ConfigError."""
    if not weight > 0:
        raise ConfigError(f"{source} must be > 0, got {weight}.")
    return weight


def check_value_norm_factor(factor: float | None, source: str, zero_turns_off: bool = False) -> float | None:
    """``factor`` if it is None or > 0 (v* is rescaled to ``factor * ||V_s||``), or 0 where ``zero_turns_off``
    (a binding's override that turns the adapter's rescaling off); else a ConfigError naming ``source``."""
    if factor is None or factor > 0 or (zero_turns_off and factor == 0):
        return factor
    allowed = ">= 0 (0: no rescaling)" if zero_turns_off else "> 0, or null for no rescaling"
    raise ConfigError(f"{source} must be {allowed}: v* is rescaled to factor x ||V_s||; got {factor}.")


@dataclass
class NestedSubject:
    """One subject's nested keys/values for one attention layer, and where it binds in the prompts.

    Attributes:
        mask: (B, T) bool, the subject token position(s) in each prompt; all-False rows are allowed.
        keys, values: (S, H, M, D) nested keys/values of S distinct subject images.
        image_index: (B,) long, which of the S images each sample uses; ``None`` means S == B and
            sample b uses image b. Rows whose mask is all False are never read, unless ``dense``.
        value_norm_factor: rescale v* to ``value_norm_factor * ||V_s||`` per head, or None.
        scale: blend of the subject value, 0 -> the plain value V_s, 1 -> the nested value v*. In
            ``"decoupled"`` mode, the weight of the added subject attention (0 -> plain attention).
        token_weight: multiplies the attention probability of the subject column (renormalised),
            i.e. adds ``log(token_weight)`` to its logits: the demo's ``special_token_weight``.
        mode: ``"nested"`` (the subject token's value becomes query-dependent) or ``"decoupled"``
            (every query of a sample whose mask row is not all False gets ``scale * SDPA(q, K~, V~)``
            added; the text attention stays plain, so ``value_norm_factor`` must be None and
            ``token_weight`` 1).
        present: ``mask.any(-1)`` known on the host, one bool per sample. A caller that binds the
            same subject for many layer calls computes it once and passes it: the layer then never
            reads the mask back from the device (on a GPU each read is a host-device sync), and the
            caller is responsible for the subjects of one call marking disjoint positions. None:
            read from ``mask`` at every call, and the subjects (unless dense) are checked for overlap.
        memo: a dict the caller keeps for as long as ``mask``, ``present``, ``scale`` and
            ``token_weight`` stay the same (a bound batch): the tensors the layer derives from them are
            built once and kept there instead of being rebuilt in every layer and step. None: no memo.
        dense: compute the subject's term for every sample, zero where the mask row is all False, instead
            of selecting the samples that bind it; ``present`` is then ignored. No branch, gather or
            graph depends on which samples bind, so a training batch whose dropout draws a new pattern at
            every step runs one ``torch.compile`` graph. The caller is responsible for the subjects of one
            call marking disjoint positions.
    """

    mask: Tensor
    keys: Tensor
    values: Tensor
    image_index: Tensor | None = None
    value_norm_factor: float | None = None
    scale: float = 1.0
    token_weight: float = 1.0
    mode: InjectionMode = "nested"
    present: tuple[bool, ...] | None = None
    memo: dict | None = field(default=None, repr=False, compare=False)
    dense: bool = False


def nested_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    nested_keys: Sequence[Tensor],
    nested_values: Sequence[Tensor],
    subject_masks: Sequence[Tensor],
    *,
    value_norm_factor: float | None = None,
) -> Tensor:
    """Cross-attention in which each subject token's value is a query-dependent nested attention.

    Each query n gets its own subject value v*_n, weighted by its own attention a_{n,s} to the
    subject token, so the text decides where the subject appears; decoupled (IP-Adapter) injection
    instead adds one image attention to every query, whatever the text attends to.

    Args:
        query: (B, H, N, D) the layer's queries, split in heads.
        key, value: (B, H, T, D) the text keys and values.
        nested_keys, nested_values: one (B, H, M_i, D) tensor per subject.
        subject_masks: one (B, T) bool tensor per subject; 0, 1 or several positions per row.
        value_norm_factor: if set, v* is rescaled to ``value_norm_factor * ||V_s||`` per head.

    Returns:
        (B, H, N, D) the attention output before the output projection.

    Raises:
        ValueError: if the sequences differ in length, a shape disagrees, or two subjects mark
            the same position.
    """
    if not (len(nested_keys) == len(nested_values) == len(subject_masks)):
        raise ValueError(
            "nested_keys, nested_values and subject_masks need one entry per subject, got "
            f"{len(nested_keys)}, {len(nested_values)} and {len(subject_masks)}."
        )
    subjects = [
        NestedSubject(mask=mask, keys=k, values=v, value_norm_factor=value_norm_factor)
        for k, v, mask in zip(nested_keys, nested_values, subject_masks, strict=True)
    ]
    return nested_attention_subjects(query, key, value, subjects)


def check_disjoint(masks: Sequence[Tensor]) -> None:
    """Raise a ValueError if two of the (B, T) bool ``masks`` mark the same token of a sample."""
    if len(masks) < 2:
        return
    overlap = torch.stack(list(masks)).sum(0) > 1
    if overlap.any():
        sample, position = (int(x) for x in overlap.nonzero()[0])
        raise ValueError(
            f"two subjects mark the same token position {position} in sample {sample}; each "
            "subject must bind to its own token."
        )


def _check_shapes(query: Tensor, key: Tensor, value: Tensor, subjects: Sequence[NestedSubject]) -> None:
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            f"query, key and value must be (B, H, N|T, D); got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}."
        )
    batch, heads, _, dim = query.shape
    if key.shape != value.shape or key.shape[:2] != (batch, heads) or key.shape[-1] != dim:
        raise ValueError(
            f"key and value must be (B={batch}, H={heads}, T, D={dim}); got key {tuple(key.shape)} "
            f"and value {tuple(value.shape)}."
        )
    tokens = key.shape[2]
    for i, subject in enumerate(subjects):
        if subject.mode != "nested":
            check_injection_mode(subject.mode, f"subject {i}: mode")
            if subject.value_norm_factor is not None or subject.token_weight != 1.0:
                raise ValueError(
                    f"subject {i}: value_norm_factor={subject.value_norm_factor} and token_weight="
                    f"{subject.token_weight} act on the subject token's value and attention, which "
                    "decoupled injection leaves plain; use value_norm_factor=None and token_weight=1 "
                    "(scale sets its strength)."
                )
        if subject.mask.shape != (batch, tokens) or subject.mask.dtype != torch.bool:
            raise ValueError(
                f"subject {i}: mask must be a bool tensor of shape (B={batch}, T={tokens}); "
                f"got {subject.mask.dtype} {tuple(subject.mask.shape)}."
            )
        if subject.present is not None and len(subject.present) != batch:
            raise ValueError(
                f"subject {i}: present has {len(subject.present)} entries for a batch of {batch}."
            )
        keys, values = subject.keys, subject.values
        if keys.ndim != 4 or keys.shape != values.shape or keys.shape[1] != heads or keys.shape[-1] != dim:
            raise ValueError(
                f"subject {i}: nested keys and values must both be (S, H={heads}, M, D={dim}); got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}."
            )
        if subject.image_index is None and keys.shape[0] != batch:
            raise ValueError(
                f"subject {i}: nested keys have {keys.shape[0]} rows for a batch of {batch}; pass "
                "image_index to map samples to subject images."
            )
        if subject.image_index is not None and subject.image_index.shape != (batch,):
            raise ValueError(
                f"subject {i}: image_index must have shape ({batch},), got {tuple(subject.image_index.shape)}."
            )
    if any(subject.present is None and not subject.dense for subject in subjects):
        check_disjoint([subject.mask for subject in subjects])


# A subject of one call with its per-sample presence on the host.
_Active = tuple[NestedSubject, tuple[bool, ...]]


def rows_present(subject: NestedSubject) -> tuple[bool, ...]:
    """Which samples the layer computes the subject's term for, on the host: those its mask binds, or every
    sample of a dense subject."""
    if subject.dense:
        return (True,) * subject.mask.shape[0]
    if subject.present is not None:
        return subject.present
    return tuple(subject.mask.any(-1).tolist())


def _true_indices(flags: Tensor, host_flags: Sequence[bool]) -> Tensor:
    """(R,) long indices of the True entries of the (B,) bool ``flags``, given their host copy.

    A stable sort puts the True entries first, in order; their count comes from the host, so unlike
    ``nonzero`` (which must read the device to size its output) this never waits for the device.
    """
    return torch.argsort((~flags).to(torch.uint8), stable=True)[: sum(host_flags)]


def nested_attention_subjects(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    subjects: Sequence[NestedSubject],
    attn_mask: Tensor | None = None,
) -> Tensor:
    """:func:`nested_attention` with per-subject options, shared subject images and a text mask.

    Args:
        query: (B, H, N, D); key, value: (B, H, T, D).
        subjects: the :class:`NestedSubject` of each subject bound in this batch.
        attn_mask: optional SDPA mask broadcastable to (B, H, N, T) (bool or additive float).

    Returns:
        (B, H, N, D). Samples without any subject position are exactly
        ``F.scaled_dot_product_attention(query, key, value, attn_mask)``: no nested work is done
        for them. Dense subjects compute them too, within rounding of that (exactly, for decoupled
        ones). Nested and decoupled subjects combine: the nested ones shape the text attention,
        each decoupled one adds its own image attention on top. When every subject carries
        ``present``, no branch depends on tensor values: nothing waits for the device.
    """
    _check_shapes(query, key, value, subjects)
    active = []
    for subject in subjects:
        present = rows_present(subject)
        if any(present):
            active.append((subject, present))
    nested = [(s, present) for s, present in active if s.mode != "decoupled"]
    decoupled = [(s, present) for s, present in active if s.mode == "decoupled"]
    out = _nested_attention_active(query, key, value, nested, attn_mask)
    if decoupled:
        out = _add_decoupled(out, query, decoupled)
    return out


def _nested_attention_active(
    query: Tensor, key: Tensor, value: Tensor, active: list[_Active], attn_mask: Tensor | None
) -> Tensor:
    """The nested attention of checked subjects that each mark at least one position."""
    if not active:
        return _plain_attention(query, key, value, attn_mask)
    batch = query.shape[0]
    # Which samples bind any subject, on the host: the branches below never read the device.
    union = tuple(any(flags) for flags in zip(*(present for _, present in active), strict=True))
    if all(union):  # batch 1, no guidance, or training: no gathers, no scatter
        return _nested_rows(query, key, value, active, attn_mask, (0, batch))
    span = _contiguous_span(union)
    if span is not None:
        # One run of bound samples (a guided batch: the unconditional half first): views, no gathers;
        # the other samples get exactly the plain attention. One split of each tensor, not a slice per
        # part: in training, each slice's backward would build a zero tensor of the whole batch.
        start, stop = span
        sizes = [start, stop - start, batch - stop]
        queries, keys, values = (x.split(sizes) for x in (query, key, value))
        masks = attn_mask.split(sizes) if _per_sample(attn_mask, batch) else (attn_mask,) * 3
        sliced = [(_slice_subject(s, start, stop), present[start:stop]) for s, present in active]
        parts = []
        if start > 0:
            parts.append(_plain_attention(queries[0], keys[0], values[0], masks[0]))
        parts.append(_nested_rows(queries[1], keys[1], values[1], sliced, masks[1], (start, stop)))
        if stop < batch:
            parts.append(_plain_attention(queries[2], keys[2], values[2], masks[2]))
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    # Bound samples scattered through the batch: gather them, then scatter the result back.
    out = _plain_attention(query, key, value, attn_mask)
    has_subject = torch.stack([s.mask.any(-1) for s, _ in active]).any(0)  # (B,)
    rows = _true_indices(has_subject, union)
    kept = [row for row, flag in enumerate(union) if flag]
    gathered = [
        (
            dataclasses.replace(
                s,
                mask=s.mask[rows],
                image_index=rows if s.image_index is None else s.image_index[rows],
                present=None,
                memo=None,
            ),
            tuple(present[row] for row in kept),
        )
        for s, present in active
    ]
    mask = attn_mask[rows] if _per_sample(attn_mask, batch) else attn_mask
    result = _nested_rows(query[rows], key[rows], value[rows], gathered, mask, None)
    return out.index_copy(0, rows, result.to(out.dtype))


def _per_sample(attn_mask: Tensor | None, batch: int) -> bool:
    """Whether ``attn_mask`` holds one mask per sample. SDPA aligns a mask's dimensions from the right, so only
    a 4-D mask has a batch dimension: an (N, T) or (H, N, T) mask serves every sample, whatever N or H is."""
    return attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[0] == batch


def _contiguous_span(flags: Sequence[bool]) -> tuple[int, int] | None:
    """(start, stop) if the True entries of ``flags`` form one run, else None."""
    true = [index for index, flag in enumerate(flags) if flag]
    if true and true[-1] - true[0] + 1 == len(true):
        return true[0], true[-1] + 1
    return None


def _plain_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None) -> Tensor:
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False
    )


def _slice_subject(subject: NestedSubject, start: int, stop: int) -> NestedSubject:
    """The subject for samples ``start:stop`` of its batch (views, kept in the memo; the memo stays shared)."""
    mask, image_index = _kept(
        subject,
        ("rows", start, stop),
        lambda: (
            subject.mask[start:stop],
            None if subject.image_index is None else subject.image_index[start:stop],
        ),
    )
    present = None if subject.present is None else subject.present[start:stop]
    keys, values = subject.keys, subject.values
    if image_index is None:  # sample b reads image b
        keys, values = keys[start:stop], values[start:stop]
    return dataclasses.replace(
        subject,
        mask=mask,
        keys=keys,
        values=values,
        image_index=image_index,
        present=present,
    )


def _nested_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    active: list[_Active],
    attn_mask: Tensor | None,
    rows_key: tuple[int, int] | None,
) -> Tensor:
    """Nested attention of a batch in which every sample binds at least one of ``active`` (or is computed
    as if it did: a dense subject's all-False rows get a zero term).

    ``rows_key`` names which samples of the subjects' own batch these are, for the memo.
    """
    heads, dim = q.shape[1], q.shape[-1]
    mask_rows = attn_mask
    if mask_rows is not None and mask_rows.dtype == torch.bool:
        mask_rows = torch.zeros(mask_rows.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~mask_rows, float("-inf")
        )
    if any(s.token_weight != 1.0 for s, _ in active):
        token_bias = _memoized(
            active, ("token_bias", rows_key, q.dtype, q.device), lambda: _token_bias(active, q)
        )
        mask_rows = token_bias if mask_rows is None else mask_rows + token_bias

    # One SDPA over the text gives sum_{t not in s} a_t V_t + (1 - scale) sum_{t in s} a_t V_t and, in one
    # extra value column per subject, its probability a_s (or, with a value norm, sum_s a_s ||V_s||): the
    # N x T probabilities are never materialised and no second pass over the text is needed.
    layout = tuple((s.scale, s.value_norm_factor is not None) for s, _ in active)
    columns = _memoized(
        active,
        ("columns", rows_key, heads, dim, v.dtype, v.device, layout),
        lambda: _value_columns(active, v),
    )
    value_norm = None
    if columns.norm_columns:  # in V's dtype, as v*'s norm below
        value_norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True, dtype=v.dtype)
    extra = [value_norm] * columns.norm_columns
    if columns.constant is not None:
        extra.append(columns.constant)
    # Zero-padding q and k leaves the logits unchanged (the scale is passed explicitly) and keeps q, k and v
    # at one head dim, which the fused CPU and GPU kernels need.
    if torch.compiler.is_compiling():
        # The same tensors, built from zero-padded parts: inductor (torch 2.13, CPU) miscompiles the
        # concatenation of a projected value inside gradient-checkpointed blocks when two or more layers
        # are nested, and a padded sum fuses into one kernel anyway. Eager concatenates: one kernel each.
        extra = torch.cat(extra, dim=-1)
        v_aug = (F.pad(v, (0, extra.shape[-1])) + F.pad(extra, (dim, 0))) * columns.weights
        q_aug = F.pad(q, (0, extra.shape[-1]))
        k_aug = F.pad(k, (0, extra.shape[-1]))
    else:
        v_aug = torch.cat([v, *extra], dim=-1) * columns.weights
        q_aug = _zero_padded(active, q, columns.width, rows_key)
        k_aug = _zero_padded(active, k, columns.width, rows_key)
    fused = F.scaled_dot_product_attention(
        q_aug, k_aug, v_aug, attn_mask=mask_rows, dropout_p=0.0, is_causal=False, scale=dim**-0.5
    )
    # One split, not a slice per column: each slice's backward would build a zero tensor of fused's size.
    result, *column_outputs = fused.split(columns.split_sizes, dim=-1)
    for (s, present), column in zip(active, columns.order, strict=True):
        weight = column_outputs[column]
        if all(present):
            sub, q_sub, image_rows = None, q, s.image_index
        else:
            sub = _true_indices(s.mask.any(-1), present)
            q_sub = q[sub]
            image_rows = sub if s.image_index is None else s.image_index[sub]
        nested_k, nested_v = _subject_keys_values(s, image_rows, q_sub.shape[0], q.dtype)
        v_star = F.scaled_dot_product_attention(q_sub, nested_k, nested_v)  # (R', H, N, D)
        if sub is not None:
            weight = weight[sub]
        strength = s.scale
        if s.value_norm_factor is not None:
            # Each position s gets v* rescaled to factor * ||V_s||: sum_s p_s factor ||V_s|| v*/||v*||. The norm
            # in v*'s dtype: CUDA autocast makes a norm float32, and the weight, the sum and the layer's output
            # after it, each with casts around it (the reduction itself accumulates in float32 either way).
            v_star_norm = torch.linalg.vector_norm(v_star, dim=-1, keepdim=True, dtype=v_star.dtype)
            weight = weight / v_star_norm.clamp_min(1e-6)
            strength = s.scale * s.value_norm_factor
        if sub is None:
            result = torch.addcmul(result, weight, v_star, value=strength)
        else:
            result = result.index_add(0, sub, strength * weight * v_star)
    return result


def _memoized(active: list[_Active], key: tuple, build):
    """``build()``, kept in the subject's memo when there is one subject that carries a memo.

    The tensors built from the masks are the same in every layer of a UNet call and in every step of a
    sampling loop: built once per bound batch instead of once per layer. Not under torch.compile, which
    folds them into the graph itself.
    """
    if len(active) != 1:
        return build()
    return _kept(active[0][0], key, build)


def _kept(subject: NestedSubject, key: tuple, build):
    """``build()``, kept in ``subject``'s memo if it has one (not under torch.compile: see :func:`_memoized`)."""
    memo = subject.memo
    if memo is None or torch.compiler.is_compiling():
        return build()
    if key not in memo:
        memo[key] = build()
    return memo[key]


def _token_bias(active: list[_Active], q: Tensor) -> Tensor:
    """(R, 1, 1, T) additive logits: log(token_weight) on each subject's positions."""
    token_bias = torch.zeros(q.shape[0], active[0][0].mask.shape[-1], dtype=q.dtype, device=q.device)
    for s, _ in active:
        if s.token_weight != 1.0:
            check_token_weight(s.token_weight)
            token_bias = token_bias + s.mask.to(q.dtype) * math.log(s.token_weight)
    return token_bias[:, None, None, :]


@dataclass(frozen=True, eq=False)
class _ValueColumns:
    """How the fused SDPA's value is built from V (R, H, T, D), for one bound batch.

    ``cat([V, ||V|| x norm_columns, constant], -1) * weights`` is V weighted by ``keep`` (1 - scale on each
    subject's positions), then one column per subject that the SDPA turns into its probability a_s (the
    subject's one-hot mask as weights of a ones column) or, with a value norm, into sum_s a_s ||V_s|| (the
    one-hot mask as weights of ||V||), then zeros that keep the head dim a multiple of 8 for the fused GPU
    kernels. Per layer that is a cat and a product (and one norm), however many subjects there are.

    Attributes:
        weights: (R, 1, T, width): ``keep`` on the D columns of V, each subject's one-hot mask on its column,
            0 on the padding.
        constant: (R, H, T, width - D - norm_columns): a ones column per subject without a value norm,
            then the padding zeros; None when there are none.
        norm_columns: how many subjects have a value norm; their columns come first, in subject order.
        order: for each subject, the index of its column among the columns after V.
        split_sizes: D, 1 per subject, and the padding (when there is some): how the SDPA's output splits.
        width: the head dim of the fused call.
    """

    weights: Tensor
    constant: Tensor | None
    norm_columns: int
    order: tuple[int, ...]
    split_sizes: tuple[int, ...]
    width: int


def _value_columns(active: list[_Active], v: Tensor) -> _ValueColumns:
    """The :class:`_ValueColumns` of ``active`` for values shaped like ``v``."""
    rows, heads, tokens, dim = v.shape
    subjects = [s for s, _ in active]
    normed = [i for i, s in enumerate(subjects) if s.value_norm_factor is not None]
    plain = [i for i, s in enumerate(subjects) if s.value_norm_factor is None]
    by_column = normed + plain  # the norm columns first: the layer puts ||V|| there
    order = tuple(by_column.index(i) for i in range(len(subjects)))
    pad = (-(dim + len(active))) % 8
    width = dim + len(active) + pad
    keep = torch.ones(rows, tokens, dtype=v.dtype, device=v.device)
    for s, _ in active:
        keep = keep - s.scale * s.mask.to(v.dtype)
    weights = torch.cat(
        [
            keep[:, None, :, None].expand(-1, -1, -1, dim),
            *(subjects[i].mask.to(v.dtype)[:, None, :, None] for i in by_column),
            v.new_zeros(rows, 1, tokens, pad),
        ],
        dim=-1,
    )
    constant = None
    if plain or pad:
        constant = torch.cat(
            [v.new_ones(rows, heads, tokens, len(plain)), v.new_zeros(rows, heads, tokens, pad)], dim=-1
        )
    split_sizes = (dim, *(1 for _ in active), *((pad,) if pad else ()))
    return _ValueColumns(weights, constant, len(normed), order, split_sizes, width)


def _zero_padded(active: list[_Active], x: Tensor, width: int, rows_key: tuple[int, int] | None) -> Tensor:
    """``x`` zero-padded to ``width`` on its last dim: with a memo, a cat with zeros kept there (one kernel,
    where F.pad fills and then copies), else F.pad (zeros built per call would cost what the cat saves)."""
    if len(active) != 1 or active[0][0].memo is None:
        return F.pad(x, (0, width - x.shape[-1]))
    shape = (*x.shape[:-1], width - x.shape[-1])
    zeros = _memoized(active, ("zeros", rows_key, shape, x.dtype, x.device), lambda: x.new_zeros(shape))
    return torch.cat([x, zeros], dim=-1)


def _subject_keys_values(
    subject: NestedSubject, image_rows: Tensor | None, count: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The nested keys/values, in ``dtype``, of the ``count`` samples that read images ``image_rows``
    (None: all, in order)."""
    keys, values = subject.keys, subject.values
    if keys.dtype != dtype:
        keys, values = keys.to(dtype), values.to(dtype)
    if image_rows is None:
        return keys, values
    if keys.shape[0] == 1:  # one subject image for every sample: itself, or a view (not a copy)
        if count == 1:
            return keys, values
        return keys.expand(count, -1, -1, -1), values.expand(count, -1, -1, -1)
    return keys[image_rows], values[image_rows]


def _add_decoupled(out: Tensor, query: Tensor, subjects: list[_Active]) -> Tensor:
    """``out`` plus ``scale * SDPA(q, K~, V~)`` of every decoupled subject, on its bound samples only.

    The image attention takes no text mask: the text padding mask says nothing about the subject
    tokens, and all M of them are real (as in diffusers' ``IPAdapterAttnProcessor2_0``).
    """
    for s, present in subjects:
        if s.scale == 0:
            continue  # exactly the text attention, and no work
        if all(present):
            sub, q_sub, image_rows = None, query, s.image_index
        else:
            # Unbound samples (the unconditional half of a CFG batch) keep the plain output bit for bit.
            sub = _true_indices(s.mask.any(-1), present)
            q_sub = query[sub]
            image_rows = sub if s.image_index is None else s.image_index[sub]
        keys, values = _subject_keys_values(s, image_rows, q_sub.shape[0], query.dtype)
        attended = F.scaled_dot_product_attention(q_sub, keys, values)
        if s.dense:  # every sample was computed: those that do not bind the subject keep the plain output
            attended = attended * s.mask.any(-1).to(attended.dtype)[:, None, None, None]
        if sub is None:
            out = torch.add(out, attended.to(out.dtype), alpha=s.scale)
        else:
            out = out.index_add(0, sub, attended.to(out.dtype), alpha=s.scale)
    return out


class NestedAttnProcessor:
    """Diffusers attention processor for a cross-attention (``attn2``) layer with nested subjects.

    It mirrors diffusers' ``AttnProcessor2_0`` (spatial/group norms, attention masks, residual
    connection, output rescaling) and adds every bound subject's term, nested or decoupled as the
    subject's ``mode`` says. It is a plain object, not an ``nn.Module``: the trainable projections
    live in the adapters that bind to it (``bindings``), so the UNet's own state dict never changes
    when adapters are attached.

    Each binding is an object with ``subjects(attn, batch_size, dtype)`` returning a list of
    :class:`NestedSubject` (possibly empty) for the current call: an adapter at this layer
    (:class:`~nested.adapter.LayerBinding`).
    """

    def __init__(self, layer_name: str, original_processor: object):
        self.layer_name = layer_name
        self.original_processor = original_processor
        self.bindings: list[object] = []

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        subjects: list[NestedSubject] = []
        if is_cross:
            for binding in self.bindings:
                subjects.extend(binding.subjects(attn, batch_size, query.dtype))
        if subjects:
            hidden_states = nested_attention_subjects(query, key, value, subjects, attn_mask=attention_mask)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

"""The nested attention math against a naive reference that builds every per-query value."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from nested.attention import NestedSubject, nested_attention, nested_attention_subjects


def naive_nested_attention(query, key, value, nested_keys, nested_values, masks, value_norm_factor=None):
    """Build the (B, H, N, T, D) per-query values explicitly and attend with them. ``value_norm_factor``: one
    for every subject, or a list of one per subject."""
    batch, heads, n_queries, dim = query.shape
    tokens = key.shape[2]
    probs = ((query @ key.transpose(-1, -2)) / math.sqrt(dim)).softmax(-1)  # (B, H, N, T)
    values = value[:, :, None].expand(batch, heads, n_queries, tokens, dim).clone()
    factors = value_norm_factor if isinstance(value_norm_factor, list) else [value_norm_factor] * len(masks)
    for nk, nv, mask, value_norm_factor in zip(nested_keys, nested_values, masks, factors, strict=True):
        v_star = ((query @ nk.transpose(-1, -2)) / math.sqrt(dim)).softmax(-1) @ nv  # (B, H, N, D)
        for b in range(batch):
            for t in mask[b].nonzero().flatten().tolist():
                per_query = v_star[b]
                if value_norm_factor is not None:
                    target = value_norm_factor * value[b, :, t].norm(dim=-1)[:, None, None]
                    per_query = per_query / per_query.norm(dim=-1, keepdim=True) * target
                values[b, :, :, t] = per_query
    return (probs[..., None] * values).sum(-2)


def random_case(generator, batch, heads, n_queries, tokens, dim, n_subjects, positions_per_sample):
    query = torch.randn(batch, heads, n_queries, dim, generator=generator)
    key = torch.randn(batch, heads, tokens, dim, generator=generator)
    value = torch.randn(batch, heads, tokens, dim, generator=generator)
    free = torch.randperm(tokens, generator=generator).tolist()
    nested_keys, nested_values, masks = [], [], []
    for i in range(n_subjects):
        m = int(torch.randint(2, 9, (1,), generator=generator))
        nested_keys.append(torch.randn(batch, heads, m, dim, generator=generator))
        nested_values.append(torch.randn(batch, heads, m, dim, generator=generator))
        mask = torch.zeros(batch, tokens, dtype=torch.bool)
        for b in range(batch):
            count = positions_per_sample[(b + i) % len(positions_per_sample)]
            # Distinct positions per subject so no two subjects overlap.
            chosen = free[i * 2 : i * 2 + count]
            mask[b, chosen] = True
        masks.append(mask)
    return query, key, value, nested_keys, nested_values, masks


@pytest.mark.parametrize("n_subjects", [1, 2, 3])
@pytest.mark.parametrize("value_norm_factor", [None, 2.0])
def test_matches_naive_reference(n_subjects, value_norm_factor):
    generator = torch.Generator().manual_seed(n_subjects)
    for trial in range(4):
        batch = 1 + trial % 3
        case = random_case(generator, batch, 2 + trial % 2, 5 + trial, 9, 8, n_subjects, [0, 1, 2])
        got = nested_attention(*case, value_norm_factor=value_norm_factor)
        want = naive_nested_attention(*case, value_norm_factor=value_norm_factor)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_subject_is_exactly_sdpa():
    generator = torch.Generator().manual_seed(0)
    query, key, value, nested_keys, nested_values, masks = random_case(generator, 3, 2, 7, 9, 8, 2, [0, 1])
    masks = [torch.zeros_like(m) for m in masks]
    got = nested_attention(query, key, value, nested_keys, nested_values, masks)
    assert torch.equal(got, F.scaled_dot_product_attention(query, key, value))


def test_samples_without_subject_are_exactly_sdpa_in_a_mixed_batch():
    generator = torch.Generator().manual_seed(1)
    query, key, value, nested_keys, nested_values, masks = random_case(generator, 3, 2, 7, 9, 8, 1, [1])
    masks[0][1] = False
    got = nested_attention(query, key, value, nested_keys, nested_values, masks)
    plain = F.scaled_dot_product_attention(query, key, value)
    assert torch.equal(got[1], plain[1])
    assert not torch.allclose(got[0], plain[0])


def test_overlapping_subjects_raise():
    generator = torch.Generator().manual_seed(2)
    query, key, value, nested_keys, nested_values, masks = random_case(generator, 2, 2, 4, 9, 8, 2, [1])
    masks[1] = masks[0].clone()
    with pytest.raises(ValueError, match="same token position"):
        nested_attention(query, key, value, nested_keys, nested_values, masks)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: (c[0], c[1], c[2], c[3], c[4], [c[5][0][:, :5]]), "mask must be a bool tensor"),
        (lambda c: (c[0], c[1], c[2], [c[3][0][:, :1]], c[4], c[5]), "nested keys and values"),
        (lambda c: (c[0], c[1][:, :, :, :4], c[2], c[3], c[4], c[5]), "key and value must be"),
        (lambda c: (c[0], c[1], c[2], c[3], c[4], []), "one entry per subject"),
        (lambda c: (c[0], c[1], c[2], [c[3][0][:1]], [c[4][0][:1]], c[5]), "image_index"),
    ],
)
def test_shape_errors(mutate, message):
    generator = torch.Generator().manual_seed(3)
    case = random_case(generator, 2, 2, 4, 9, 8, 1, [1])
    with pytest.raises(ValueError, match=message):
        nested_attention(*mutate(case))


def test_shared_images_through_image_index_equal_repeated_keys():
    """Classifier-free guidance: one subject image serves several samples without copying."""
    generator = torch.Generator().manual_seed(4)
    query, key, value, nested_keys, nested_values, masks = random_case(generator, 4, 2, 6, 9, 8, 1, [1])
    masks[0][:2] = False  # the unconditional half
    index = torch.tensor([0, 0, 0, 0])
    shared = NestedSubject(
        mask=masks[0], keys=nested_keys[0][:1], values=nested_values[0][:1], image_index=index
    )
    got = nested_attention_subjects(query, key, value, [shared])
    repeated = nested_attention(
        query,
        key,
        value,
        [nested_keys[0][:1].expand(4, -1, -1, -1)],
        [nested_values[0][:1].expand(4, -1, -1, -1)],
        masks,
    )
    torch.testing.assert_close(got, repeated)


def test_scale_zero_is_plain_and_token_weight_matches_logit_bias():
    generator = torch.Generator().manual_seed(5)
    query, key, value, nested_keys, nested_values, masks = random_case(generator, 2, 2, 6, 9, 8, 1, [1])
    plain = F.scaled_dot_product_attention(query, key, value)
    off = NestedSubject(mask=masks[0], keys=nested_keys[0], values=nested_values[0], scale=0.0)
    torch.testing.assert_close(nested_attention_subjects(query, key, value, [off]), plain)

    # token_weight w == adding log(w) to the subject column's logits (and nested value scale 0).
    weighted = NestedSubject(
        mask=masks[0], keys=nested_keys[0], values=nested_values[0], scale=0.0, token_weight=3.0
    )
    bias = masks[0][:, None, None, :].float() * math.log(3.0)
    torch.testing.assert_close(
        nested_attention_subjects(query, key, value, [weighted]),
        F.scaled_dot_product_attention(query, key, value, attn_mask=bias),
    )


def test_text_attention_mask_is_respected():
    generator = torch.Generator().manual_seed(6)
    query, key, value, nested_keys, nested_values, masks = random_case(generator, 2, 2, 6, 9, 8, 1, [1])
    text_mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    text_mask[:, :, :, -3:] = False  # padding the subject never sits on
    masks[0][:, -3:] = False
    got = nested_attention_subjects(
        query, key, value, [NestedSubject(masks[0], nested_keys[0], nested_values[0])], attn_mask=text_mask
    )
    want = naive_nested_attention(
        query, key[:, :, :-3], value[:, :, :-3], nested_keys, nested_values, [masks[0][:, :-3]]
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bound_rows", [[1, 3], [1, 2]], ids=["scattered", "one-run"])
@pytest.mark.parametrize("mask_dims", [2, 3])
def test_a_mask_without_a_batch_dimension_applies_to_every_sample(bound_rows, mask_dims):
    """An (N, T) or (H, N, T) mask has no batch dimension, also where N or H equals the batch size: every
    sample gets all of it, whichever samples bind the subject."""
    generator = torch.Generator().manual_seed(8)
    query, key, value, nested_keys, nested_values, masks = random_case(generator, 4, 4, 4, 9, 8, 1, [1])
    masks[0].zero_()
    masks[0][bound_rows, 2] = True
    padding = torch.ones(4, 9, dtype=torch.bool)  # (N = 4 queries, T)
    padding[:, -3:] = False
    text_mask = padding if mask_dims == 2 else padding.expand(4, 4, 9)  # (H = 4, N, T)
    got = nested_attention_subjects(
        query, key, value, [NestedSubject(masks[0], nested_keys[0], nested_values[0])], attn_mask=text_mask
    )
    want = naive_nested_attention(
        query, key[:, :, :-3], value[:, :, :-3], nested_keys, nested_values, [masks[0][:, :-3]]
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_subjects_with_and_without_value_norm_share_one_call():
    """Each subject keeps its own value_norm_factor in the fused call (the rescaled subject listed second)."""
    generator = torch.Generator().manual_seed(11)
    query, key, value, nested_keys, nested_values, masks = random_case(generator, 2, 2, 6, 9, 8, 2, [1, 2])
    factors = [None, 2.0]
    subjects = [
        NestedSubject(mask=mask, keys=k, values=v, value_norm_factor=factor)
        for k, v, mask, factor in zip(nested_keys, nested_values, masks, factors, strict=True)
    ]
    got = nested_attention_subjects(query, key, value, subjects)
    want = naive_nested_attention(query, key, value, nested_keys, nested_values, masks, factors)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value_norm_factor", [None, 2.0])
def test_a_memo_serves_layers_of_other_head_dims(value_norm_factor):
    """One bound batch's memo, read by layers with the same heads and other head dims (and the same layer
    again), gives each the result it gets without a memo."""
    generator = torch.Generator().manual_seed(12)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 3] = True
    memo = {}
    for dim in (8, 16, 8):
        query, key, value = (torch.randn(2, 2, n, dim, generator=generator) for n in (6, 9, 9))
        nested_k, nested_v = (torch.randn(2, 2, 4, dim, generator=generator) for _ in range(2))
        subject = NestedSubject(
            mask=mask,
            keys=nested_k,
            values=nested_v,
            value_norm_factor=value_norm_factor,
            present=(True, True),
        )
        got = nested_attention_subjects(query, key, value, [dataclasses.replace(subject, memo=memo)])
        assert torch.equal(got, nested_attention_subjects(query, key, value, [subject]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_is_finite_and_close(dtype):
    generator = torch.Generator().manual_seed(7)
    case = random_case(generator, 2, 2, 16, 9, 8, 2, [1, 2])
    got = nested_attention(
        *[x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in case[:3]],
        [k.to(dtype) for k in case[3]],
        [v.to(dtype) for v in case[4]],
        case[5],
        value_norm_factor=2.0,
    )
    assert got.dtype == dtype and torch.isfinite(got).all()
    want = naive_nested_attention(*case, value_norm_factor=2.0)
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("value_norm_factor", [None, 2.0])
def test_gradients_reach_nested_keys_and_values(value_norm_factor):
    """Every input's gradient is autograd's through the naive reference, in float64."""
    generator = torch.Generator().manual_seed(8)
    query, key, value, nested_keys, nested_values, masks = random_case(generator, 2, 2, 6, 9, 8, 2, [1, 0])
    inputs = [t.double() for t in (query, key, value, *nested_keys, *nested_values)]
    grad_output = torch.randn(query.shape, generator=generator, dtype=torch.float64)
    grads = []
    for attend in (nested_attention, naive_nested_attention):
        leaves = [t.clone().requires_grad_() for t in inputs]
        q, k, v, nk1, nk2, nv1, nv2 = leaves
        out = attend(q, k, v, [nk1, nk2], [nv1, nv2], masks, value_norm_factor=value_norm_factor)
        out.backward(grad_output)
        grads.append([leaf.grad for leaf in leaves])
    names = [
        "query",
        "key",
        "value",
        "nested_keys[0]",
        "nested_keys[1]",
        "nested_values[0]",
        "nested_values[1]",
    ]
    for name, got, want in zip(names, *grads, strict=True):
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def _mixed_subjects(device, batch=4, heads=2, tokens=9, dim=8, generator=None):
    """A nested subject on samples 0, 2, 3 (value norm, token weight, one shared image) and a
    decoupled one on sample 1: every branch of the layer, with their presence known on the host."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    nested_mask = torch.zeros(batch, tokens, dtype=torch.bool)
    nested_mask[[0, 2, 3], 4] = True
    decoupled_mask = torch.zeros(batch, tokens, dtype=torch.bool)
    decoupled_mask[1, 6] = True
    nested = NestedSubject(
        mask=nested_mask.to(device),
        keys=randn(1, heads, 3, dim),
        values=randn(1, heads, 3, dim),
        image_index=torch.zeros(batch, dtype=torch.long, device=device),
        value_norm_factor=2.0,
        token_weight=2.0,
        scale=0.8,
    )
    decoupled = NestedSubject(
        mask=decoupled_mask.to(device),
        keys=randn(batch, heads, 5, dim),
        values=randn(batch, heads, 5, dim),
        mode="decoupled",
        scale=0.5,
    )
    return [nested, decoupled]


def _with_presence(subjects):
    return [dataclasses.replace(s, present=tuple(s.mask.cpu().any(-1).tolist())) for s in subjects]


def test_known_presence_gives_the_same_output_as_reading_the_masks():
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(4, 2, 6 if i == 0 else 9, 8, generator=generator) for i in range(3))
    subjects = _mixed_subjects("cpu", generator=generator)
    read = nested_attention_subjects(query, key, value, subjects)
    known = nested_attention_subjects(query, key, value, _with_presence(subjects))
    assert torch.equal(read, known)
    plain = F.scaled_dot_product_attention(query, key, value)
    assert not torch.allclose(known[[0, 1, 2, 3]], plain, atol=1e-3)  # both subjects act


def test_with_known_presence_no_branch_reads_a_tensor_value():
    """On the meta device every read of a value (bool(), .tolist(), nonzero) raises: the layer's
    path must run there when the subjects' presence is known, and fails there when it is not."""
    meta = torch.device("meta")
    query = torch.empty(4, 2, 6, 8, device=meta)
    key, value = torch.empty(4, 2, 9, 8, device=meta), torch.empty(4, 2, 9, 8, device=meta)
    presence = [s.present for s in _with_presence(_mixed_subjects("cpu"))]
    subjects = [
        dataclasses.replace(s, present=p) for s, p in zip(_mixed_subjects(meta), presence, strict=True)
    ]
    out = nested_attention_subjects(query, key, value, subjects)
    assert out.shape == query.shape and out.is_meta
    with pytest.raises((RuntimeError, NotImplementedError)):
        nested_attention_subjects(query, key, value, _mixed_subjects(meta))


def test_dense_subjects_equal_the_selected_rows_and_leave_unbound_samples_plain():
    """A dense subject computes every sample: the bound ones as when the layer selects them, the others
    (all-False mask rows: nested terms weighted by a zero probability, decoupled ones gated off) as plain
    attention. Nested within rounding, decoupled unbound rows exactly."""
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(4, 2, 6 if i == 0 else 9, 8, generator=generator) for i in range(3))
    subjects = _mixed_subjects("cpu", generator=generator)
    selected = nested_attention_subjects(query, key, value, subjects)
    dense = nested_attention_subjects(
        query, key, value, [dataclasses.replace(s, dense=True) for s in subjects]
    )
    torch.testing.assert_close(dense, selected, rtol=1e-6, atol=1e-6)

    nested, decoupled = subjects
    plain = F.scaled_dot_product_attention(query, key, value)
    alone = nested_attention_subjects(query, key, value, [dataclasses.replace(decoupled, dense=True)])
    assert torch.equal(alone[[0, 2, 3]], plain[[0, 2, 3]])  # the decoupled term is added to sample 1 only
    assert not torch.allclose(alone[1], plain[1], atol=1e-3)
    alone = nested_attention_subjects(query, key, value, [dataclasses.replace(nested, dense=True)])
    torch.testing.assert_close(alone[1], plain[1], rtol=1e-6, atol=1e-6)


def test_a_dense_subject_reads_no_tensor_value_and_ignores_its_presence():
    """Dense subjects take one path whatever their masks hold: it runs on the meta device (where every
    read of a value raises) with no presence given, and a wrong presence changes nothing."""
    meta = torch.device("meta")
    query = torch.empty(4, 2, 6, 8, device=meta)
    key, value = torch.empty(4, 2, 9, 8, device=meta), torch.empty(4, 2, 9, 8, device=meta)
    subjects = [dataclasses.replace(s, dense=True) for s in _mixed_subjects(meta)]
    out = nested_attention_subjects(query, key, value, subjects)
    assert out.shape == query.shape and out.is_meta

    generator = torch.Generator().manual_seed(4)
    query, key, value = (torch.randn(4, 2, 6 if i == 0 else 9, 8, generator=generator) for i in range(3))
    subjects = [dataclasses.replace(s, dense=True) for s in _mixed_subjects("cpu", generator=generator)]
    wrong = [dataclasses.replace(s, present=(False,) * 4) for s in subjects]
    assert torch.equal(
        nested_attention_subjects(query, key, value, subjects),
        nested_attention_subjects(query, key, value, wrong),
    )


@pytest.mark.parametrize(
    "bound", [(True, True), (False, True, False), (True, True, False)], ids=["all", "middle", "first-two"]
)
def test_the_backward_builds_no_zero_tensor_of_a_whole_input_per_part(
    bound, backward_ops, whole_size_builders
):
    """The layer reads the fused call's output columns (attention, one column per subject, padding) and, when a
    run of samples binds the subjects, the batch's parts with one split each: their backward concatenates the
    parts' gradients once. A slice per part would build a zero tensor of the whole tensor for each."""
    generator = torch.Generator().manual_seed(3)
    batch = len(bound)
    query, key, value, nested_keys, nested_values, masks = random_case(generator, batch, 2, 6, 9, 8, 2, [1])
    for tensor in (query, key, value):
        tensor.requires_grad_()
    rows = torch.tensor(bound)[:, None]
    subjects = [
        NestedSubject(mask=mask & rows, keys=k, values=v, value_norm_factor=2.0)
        for k, v, mask in zip(nested_keys, nested_values, masks, strict=True)
    ]
    out = nested_attention_subjects(query, key, value, subjects)
    ops = backward_ops(out.square().sum())
    assert whole_size_builders(ops, min(query.numel(), key.numel())) == []
    assert "aten.cat.default" in [op for op, _ in ops]  # the splits' backward
    for tensor in (query, key, value):
        assert tensor.grad.abs().sum() > 0

"""Nested attention on tiny random SD3 and FLUX transformers, built from config in-process."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb

from nested.adapter import NestedAdapter, SubjectBinding, cross_attention_layers
from nested.attention import NestedSubject
from nested.dit import NestedJointAttnProcessor, joint_layout
from nested.encoder import EncoderSpec
from nested.errors import AdapterError
from nested.testing import write_tiny_vision_model

TEXT = 7  # text tokens per prompt
BATCH = 2


def tiny_flux(double_blocks: int = 1, single_blocks: int = 1) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )
    return model.eval()


def tiny_sd3(
    blocks: int = 2, dual_attention_blocks: tuple[int, ...] = (0,), qk_norm: str | None = "rms_norm"
) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=blocks,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=dual_attention_blocks,  # SD3.5's extra image self-attention (by default in the first)
        qk_norm=qk_norm,  # SD3.5's; SD3 has none
    )
    return model.eval()


def image_ids(height: int = 4, width: int = 4) -> torch.Tensor:
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None]
    return ids.reshape(-1, 3)


def model_inputs(model, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(BATCH, TEXT, 32, generator=generator)
    pooled = torch.randn(BATCH, 32, generator=generator)
    if isinstance(model, FluxTransformer2DModel):
        return dict(
            hidden_states=torch.randn(BATCH, 16, 4, generator=generator),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=torch.full((BATCH,), 0.5),
            img_ids=image_ids(),
            txt_ids=torch.zeros(TEXT, 3),
        )
    return dict(
        hidden_states=torch.randn(BATCH, 4, 8, 8, generator=generator),
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=torch.full((BATCH,), 500.0),
    )


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


@pytest.fixture(scope="module")
def vision_path(tmp_path_factory):
    return write_tiny_vision_model(tmp_path_factory.mktemp("vision") / "clip", "clip")


def make_adapter(model, vision_path, token="person", seed=0) -> NestedAdapter:
    torch.manual_seed(seed)
    spec = EncoderSpec(backbone=str(vision_path), num_tokens=6, width=32, depth=1, heads=2)
    adapter = NestedAdapter.for_unet(model, token=token, encoder=spec)
    for layer in adapter.layers.values():  # visible effects at random init
        torch.nn.init.normal_(layer.to_k.weight, std=0.5)
        torch.nn.init.normal_(layer.to_v.weight, std=0.5)
    return adapter.eval()


def text_masks(*positions: int | None) -> torch.Tensor:
    """(BATCH, TEXT) bool: sample b marks ``positions[b]`` (None: the token is absent)."""
    masks = torch.zeros(BATCH, TEXT, dtype=torch.bool)
    for row, position in enumerate(positions):
        if position is not None:
            masks[row, position] = True
    return masks


def bind(adapter, masks, seed=3) -> None:
    tokens = torch.randn(BATCH, 6, 32, generator=torch.Generator().manual_seed(seed))
    adapter.set_subjects([SubjectBinding(tokens=tokens, masks=masks)])


# ---------------------------------------------------------------------------- against a reference
class FixedSubjects:
    """A binding that hands every layer the same subjects (the protocol the processors call)."""

    def __init__(self, subjects):
        self.fixed = subjects

    def subjects(self, attn, batch_size, dtype):
        return self.fixed


def reference_joint_attention(attn, layout, hidden, text, rotary, subjects, attn_mask=None) -> torch.Tensor:
    """The layer's output by definition, in float64: each image query attends over the joint sequence with
    every subject position's value replaced by that query's own nested value, an explicit
    (B, H, N, T, D) per-query value tensor; the text queries attend plainly. ``attn_mask``: bool, True
    where a query may attend to a key, broadcast to (B, H, S, S). Returns (B, S, inner) before the output
    projections, in the order of the joint sequence."""

    def split(x):
        return x.unflatten(-1, (attn.heads, -1))

    q, k, v = split(attn.to_q(hidden)), split(attn.to_k(hidden)), split(attn.to_v(hidden))
    q, k = attn.norm_q(q), attn.norm_k(k)
    start = 0
    if layout != "single":
        tq, tk, tv = split(attn.add_q_proj(text)), split(attn.add_k_proj(text)), split(attn.add_v_proj(text))
        tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        if layout == "image_first":
            start = hidden.shape[1]
            q, k, v = torch.cat([q, tq], 1), torch.cat([k, tk], 1), torch.cat([v, tv], 1)
        else:
            q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
    if rotary is not None:
        q = apply_rotary_emb(q, rotary, sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D)
    batch, heads, length, dim = q.shape
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)  # (B, H, S, S)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    values = v[:, :, None].expand(batch, heads, length, length, dim).clone()  # per query n, per key t
    for subject in subjects:
        v_star = torch.softmax(q @ subject.keys.transpose(-1, -2) / math.sqrt(dim), -1) @ subject.values
        for b, t in subject.mask.nonzero().tolist():
            for n in range(length):
                if not start <= n < start + TEXT:  # image queries only
                    values[b, :, n, start + t] = v_star[b, :, n]
    out = torch.einsum("bhnt,bhntd->bhnd", probs, values)
    return out.transpose(1, 2).flatten(2)


def project_out(attn, layout, out, image_length):
    """The output projections of a joint attention output, as the blocks apply them."""
    if layout == "single":
        return out
    if layout == "image_first":
        image, text = out[:, :image_length], out[:, image_length:]
    else:
        text, image = out[:, :TEXT], out[:, TEXT:]
    text = text if getattr(attn, "context_pre_only", False) else attn.to_add_out(text)
    return attn.to_out[0](image), text


def block_case(kind: str):
    """(attention module in float64, its layout, hidden states, text states, rotary embedding)."""
    generator = torch.Generator().manual_seed(5)
    text = None
    if kind == "sd3":
        attn = tiny_sd3().transformer_blocks[0].attn
        hidden, rotary = torch.randn(BATCH, 16, 32, generator=generator), None
    else:
        model = tiny_flux()
        attn = (
            model.transformer_blocks[0].attn
            if kind == "flux-double"
            else model.single_transformer_blocks[0].attn
        )
        ids = torch.cat([torch.zeros(TEXT, 3), image_ids()])
        rotary = tuple(x.double() for x in model.pos_embed(ids))
        hidden = torch.randn(BATCH, 16 + (TEXT if kind == "flux-single" else 0), 32, generator=generator)
    if kind != "flux-single":
        text = torch.randn(BATCH, TEXT, 32, generator=generator)
    attn = attn.double()
    return attn, joint_layout(attn), hidden.double(), None if text is None else text.double(), rotary


def random_subject(mask, seed, scale_keys=3.0):
    generator = torch.Generator().manual_seed(seed)
    keys = scale_keys * torch.randn(BATCH, 2, 5, 16, generator=generator, dtype=torch.float64)
    values = 4 * torch.randn(BATCH, 2, 5, 16, generator=generator, dtype=torch.float64)
    return NestedSubject(mask=mask, keys=keys, values=values)


@pytest.mark.parametrize("mask_shape", [None, "S S", "B 1 1 S", "B 1 S S"])
@pytest.mark.parametrize("kind", ["sd3", "flux-double", "flux-single"])
def test_nested_joint_attention_equals_per_query_value_reference(kind, mask_shape):
    """Two subjects (one per sample absent) on SD3 joint, FLUX double- and single-stream blocks: the processor
    equals attention with each subject column's value replaced per image query by its nested value, also under
    an attention mask of each shape SDPA takes (one for all queries, a key padding mask, one per query), which
    FLUX's blocks apply and SD3's ignore."""
    attn, layout, hidden, text, rotary = block_case(kind)
    subjects = [
        random_subject(text_masks(2, None), seed=11),
        random_subject(text_masks(4, 5), seed=12),
    ]
    length = hidden.shape[1] + (0 if text is None else TEXT)
    mask = None
    if mask_shape is not None:
        sizes = {"B": BATCH, "S": length, "1": 1}
        mask = torch.rand(*(sizes[n] for n in mask_shape.split()), generator=torch.Generator().manual_seed(7))
        mask = (mask > 0.3).index_fill(-1, torch.tensor([0]), True)  # no query without a key
    processor = NestedJointAttnProcessor("layer", attn.processor, layout)
    processor.bindings.append(FixedSubjects(subjects))
    processor.text_length = TEXT if layout == "single" else None
    with torch.no_grad():
        got = processor(attn, hidden, text, attention_mask=mask, image_rotary_emb=rotary)
        # SD3's own processor ignores a mask, and so does its nested one (the same model when unbound).
        applied = None if layout == "image_first" else mask
        reference = reference_joint_attention(attn, layout, hidden, text, rotary, subjects, applied)
        want = project_out(attn, layout, reference, hidden.shape[1])
        plain = attn.processor(attn, hidden, text, attention_mask=mask, image_rotary_emb=rotary)
    got, want, plain = (x if isinstance(x, tuple) else (x,) for x in (got, want, plain))
    for mine, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-10)
    # The subjects change the image queries' outputs (the test is not vacuous) and leave the text stream alone.
    image = got[0][:, TEXT:] if layout == "single" else got[0]
    plain_image = plain[0][:, TEXT:] if layout == "single" else plain[0]
    assert (image - plain_image).abs().max() > 1e-2
    if layout == "single":
        torch.testing.assert_close(got[0][:, :TEXT], plain[0][:, :TEXT], rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(got[1], plain[1], rtol=1e-12, atol=1e-12)


def test_single_stream_block_must_be_told_the_text_length():
    attn, layout, hidden, _, rotary = block_case("flux-single")
    processor = NestedJointAttnProcessor("single_transformer_blocks.0.attn", attn.processor, layout)
    processor.bindings.append(FixedSubjects([random_subject(text_masks(2, 3), seed=1)]))
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.0\.attn.*text_length"):
        processor(attn, hidden, image_rotary_emb=rotary)
    processor.text_length = TEXT + 1
    with pytest.raises(ValueError, match=r"masks cover 7 text tokens, but this call has 8"):
        processor(attn, hidden, image_rotary_emb=rotary)


# ------------------------------------------------------------------------------- on whole models
@pytest.fixture(params=["flux", "sd3"])
def model(request):
    return tiny_flux() if request.param == "flux" else tiny_sd3()


def test_adapter_layers_are_the_joint_attention_modules(model):
    layers = cross_attention_layers(model)
    if isinstance(model, FluxTransformer2DModel):
        assert list(layers) == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    else:  # the dual-attention block's image-only attn2 is not one of them
        assert list(layers) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]


def test_without_a_subject_the_output_is_bit_identical(model, vision_path):
    inputs = model_inputs(model)
    before = run(model, inputs)
    adapter = make_adapter(model, vision_path)
    adapter.attach(model)
    assert all(
        isinstance(a.processor, NestedJointAttnProcessor) for a in cross_attention_layers(model).values()
    )
    assert torch.equal(run(model, inputs), before)  # attached, nothing bound
    bind(adapter, text_masks(None, None))
    assert torch.equal(run(model, inputs), before)  # bound, the token absent from every prompt
    bind(adapter, text_masks(3, None))
    changed = run(model, inputs)
    assert not torch.equal(changed[0], before[0])
    # The sample without the token is computed on the nested path's kernels: equal up to rounding.
    torch.testing.assert_close(changed[1], before[1], rtol=1e-5, atol=1e-6)


def test_attach_then_detach_restores_the_processors_and_the_output(model, vision_path):
    inputs = model_inputs(model)
    originals = {name: attn.processor for name, attn in cross_attention_layers(model).items()}
    others = {name: p for name, p in model.attn_processors.items()}
    before = run(model, inputs)
    adapter = make_adapter(model, vision_path)
    adapter.attach(model)
    bind(adapter, text_masks(1, 2))
    assert not torch.equal(run(model, inputs), before)
    adapter.detach(model)
    assert all(cross_attention_layers(model)[name].processor is p for name, p in originals.items())
    assert all(model.attn_processors[name] is p for name, p in others.items())
    assert torch.equal(run(model, inputs), before)


def test_nested_keys_and_values_are_computed_once_per_binding(model, vision_path, monkeypatch):
    calls = []
    project = NestedAdapter._project

    def counted(self, tokens):
        calls.append(tokens.shape[0])
        return project(self, tokens)

    monkeypatch.setattr(NestedAdapter, "_project", counted)
    seen = []
    nested_call = NestedJointAttnProcessor._subjects

    def recorded(self, attn, query, text):
        subjects = nested_call(self, attn, query, text)
        seen.extend(s.keys.data_ptr() for s in subjects)
        return subjects

    monkeypatch.setattr(NestedJointAttnProcessor, "_subjects", recorded)
    adapter = make_adapter(model, vision_path)
    adapter.attach(model)
    bind(adapter, text_masks(1, 2))
    inputs = model_inputs(model)
    outputs = [run(model, inputs) for _ in range(3)]  # three denoising steps
    assert calls == [BATCH]
    layers = len(cross_attention_layers(model))
    assert len(seen) == 3 * layers and len(set(seen)) == layers  # each layer reads the same keys every step
    assert torch.equal(outputs[0], outputs[2])


def test_two_adapters_bind_two_subjects(vision_path):
    model = tiny_flux()
    inputs = model_inputs(model)
    first, second = make_adapter(model, vision_path, seed=0), make_adapter(model, vision_path, seed=1)
    first.attach(model)
    bind(first, text_masks(1, 1), seed=3)
    only_first = run(model, inputs)
    second.attach(model)
    bind(second, text_masks(None, None), seed=4)
    assert torch.equal(run(model, inputs), only_first)  # the second subject's token is absent
    bind(second, text_masks(4, 5), seed=4)
    both = run(model, inputs)
    assert not torch.equal(both, only_first)
    first.clear_subjects()
    only_second = run(model, inputs)
    assert not torch.equal(both, only_second)
    second.detach(model)
    first.detach(model)
    assert all(
        type(a.processor).__name__ == "FluxAttnProcessor" for a in cross_attention_layers(model).values()
    )


def test_a_flux_adapter_is_refused_on_sd3_naming_the_layer(vision_path):
    adapter = make_adapter(tiny_flux(), vision_path)
    with pytest.raises(AdapterError, match=r"'single_transformer_blocks\.0\.attn'"):
        adapter.attach(tiny_sd3())


def test_an_sd35_adapter_is_refused_on_sd3_of_the_same_widths_naming_the_query_norm(vision_path):
    """SD3-Medium and SD3.5-Medium have the same layers and widths; only SD3.5 norms its queries."""
    adapter = make_adapter(tiny_sd3(dual_attention_blocks=()), vision_path)
    assert {dims["qk_norm"] for dims in adapter.config.layers.values()} == {"RMSNorm"}
    sd3 = tiny_sd3(dual_attention_blocks=(), qk_norm=None)
    with pytest.raises(
        AdapterError, match=r"'transformer_blocks\.0\.attn' does not fit: .*'qk_norm': 'none'"
    ):
        adapter.attach(sd3)
    assert all(
        not isinstance(a.processor, NestedJointAttnProcessor) for a in cross_attention_layers(sd3).values()
    )
    adapter.attach(tiny_sd3(dual_attention_blocks=(0,)))  # SD3.5's extra image attention changes nothing here


def test_an_adapter_saved_without_query_norms_still_fits_its_base(tmp_path, vision_path):
    """Adapters saved before the fingerprint held ``qk_norm`` are checked on their widths alone."""
    model = tiny_sd3()
    folder = make_adapter(model, vision_path).save_pretrained(tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    for dims in config["layers"].values():
        del dims["qk_norm"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    NestedAdapter.from_pretrained(folder).attach(model)
    assert all(
        isinstance(a.processor, NestedJointAttnProcessor) for a in cross_attention_layers(model).values()
    )


def test_save_load_gives_the_same_output(tmp_path, vision_path):
    model = tiny_flux()
    inputs = model_inputs(model)
    adapter = make_adapter(model, vision_path)
    adapter.attach(model)
    bind(adapter, text_masks(2, 6))
    before = run(model, inputs)
    adapter.detach(model)
    adapter.save_pretrained(tmp_path / "adapter")
    loaded = NestedAdapter.from_pretrained(tmp_path / "adapter").eval()
    assert set(loaded.config.layers) == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    loaded.attach(model)
    bind(loaded, text_masks(2, 6))
    assert torch.equal(run(model, inputs), before)


def test_set_attention_backend_reaches_the_nested_processors(vision_path):
    model = tiny_flux()
    make_adapter(model, vision_path).attach(model)
    model.set_attention_backend("native")
    assert {a.processor._attention_backend for a in cross_attention_layers(model).values()} == {"native"}


def test_a_context_parallel_config_is_refused_when_a_subject_is_bound():
    """The nested path places the subject in the whole joint sequence: a sequence split across devices would
    put it at the wrong keys, so it is refused, naming the layer; without a subject the config passes through."""
    attn, layout, hidden, text, rotary = block_case("flux-double")
    processor = NestedJointAttnProcessor("transformer_blocks.0.attn", attn.processor, layout)
    processor._parallel_config = object()
    processor.bindings.append(FixedSubjects([random_subject(text_masks(2, 3), seed=1)]))
    with pytest.raises(NotImplementedError, match=r"transformer_blocks\.0\.attn"):
        processor(attn, hidden, text, image_rotary_emb=rotary)


def test_guided_batch_leaves_the_unconditional_half_plain(model, vision_path):
    """A batch of twice the bound prompts is [unconditional; conditional] (SD3 pipelines' guidance): only the
    conditional half gets the subject."""
    inputs = model_inputs(model)
    doubled = {
        key: torch.cat([value, value])
        if key in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
        else value
        for key, value in inputs.items()
    }
    plain = run(model, doubled)
    adapter = make_adapter(model, vision_path)
    adapter.attach(model)
    bind(adapter, text_masks(1, 2))
    single = run(model, inputs)
    guided = run(model, doubled)
    torch.testing.assert_close(guided[:BATCH], plain[:BATCH], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(guided[BATCH:], single, rtol=1e-5, atol=1e-6)
    assert (guided[BATCH:] - plain[BATCH:]).abs().max() > 1e-3


def test_every_layer_of_the_adapter_gets_a_gradient(vision_path):
    """Training reaches the nested projections of the double- and the single-stream layers."""
    model = tiny_flux().requires_grad_(False)
    adapter = make_adapter(model, vision_path).train()
    adapter.attach(model)
    tokens = torch.randn(BATCH, 6, 32, generator=torch.Generator().manual_seed(3))
    adapter.set_subjects([SubjectBinding(tokens=tokens, masks=text_masks(1, 2))])
    model(**model_inputs(model)).sample.square().mean().backward()
    norms = {key: layer.to_v.weight.grad.norm().item() for key, layer in adapter.layers.items()}
    assert set(norms) == {"transformer_blocks__0__attn", "single_transformer_blocks__0__attn"}
    assert all(norm > 0 for norm in norms.values()), norms


def test_projections_started_from_the_base_are_the_blocks_text_projections(model, vision_path):
    """Joint blocks start from their added text projections, FLUX's single-stream blocks from their shared
    ones: the nested keys and values of tokens e are the block's text keys and values of e (no bias)."""
    adapter = make_adapter(model, vision_path)
    adapter.init_projections_from(model)
    tokens = torch.randn(1, 6, 32)
    layouts = set()
    for name, (keys, values) in adapter.project(tokens).items():
        attn = cross_attention_layers(model)[name]
        layout = joint_layout(attn)
        layouts.add(layout)
        key_projection, value_projection = (
            (attn.to_k, attn.to_v) if layout == "single" else (attn.add_k_proj, attn.add_v_proj)
        )
        heads = attn.heads
        for got, projection in ((keys, key_projection), (values, value_projection)):
            want = torch.nn.functional.linear(tokens, projection.weight).view(1, 6, heads, -1).transpose(1, 2)
            torch.testing.assert_close(got, want)
    assert layouts == (
        {"text_first", "single"} if isinstance(model, FluxTransformer2DModel) else {"image_first"}
    )


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_compile_blocks_compiles_one_graph_per_kind_of_block(kind, vision_path):
    """compile_blocks compiles every block holding a nested layer on its own (regional compilation; SD3's
    transformer declares no repeated blocks for diffusers' compile_repeated_blocks). With an adapter attached,
    blocks alike share a graph (keyed by layer name, each compiled its own): FLUX's three double-stream
    blocks one, its three single-stream blocks two (the first gets a contiguous input, the others a strided
    view), SD3's three joint blocks one and its last (text-free) one another; outputs are eager's."""
    from torch._dynamo.utils import counters

    from nested.adapter import compile_blocks

    model = tiny_flux(3, 3) if kind == "flux" else tiny_sd3(4, dual_attention_blocks=())
    adapter = make_adapter(model, vision_path)
    adapter.attach(model)
    inputs = model_inputs(model)
    bind(adapter, text_masks(2, 3))
    eager = run(model, inputs)
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(model, backend="aot_eager", fullgraph=True) == (6 if kind == "flux" else 4)
    torch.testing.assert_close(run(model, inputs), eager)
    assert counters["stats"]["unique_graphs"] == (3 if kind == "flux" else 2)


@pytest.mark.parametrize("kind", ["sd3", "flux-double", "flux-single"])
@pytest.mark.parametrize("second_sample", [3, None], ids=["both-bound", "one-bound"])
def test_a_blocks_backward_builds_no_zero_tensor_of_a_whole_sequence_per_part(
    kind, second_sample, backward_ops, whole_size_builders
):
    """A joint block splits its query into image and text parts, its output into the two streams and, when
    only some samples bind the subject, its queries, keys and values into the batch's parts, each with one
    split: their backward concatenates the parts' gradients once. A slice per part would build a zero tensor
    of the whole sequence for each, at every block."""
    attn, layout, hidden, text, rotary = block_case(kind)
    processor = NestedJointAttnProcessor("layer", attn.processor, layout)
    processor.bindings.append(FixedSubjects([random_subject(text_masks(2, second_sample), seed=4)]))
    processor.text_length = TEXT if layout == "single" else None
    inputs = [x for x in (hidden, text) if x is not None]
    for tensor in inputs:
        tensor.requires_grad_()
    out = processor(attn, hidden, text, image_rotary_emb=rotary)
    ops = backward_ops(sum(x.square().sum() for x in (out if isinstance(out, tuple) else (out,))))
    whole = BATCH * 16 * attn.inner_dim  # the image part of a query, key or value
    assert whole_size_builders(ops, whole) == []
    for tensor in inputs:
        assert tensor.grad.abs().sum() > 0

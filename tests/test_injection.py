"""The injection-mode option: nested (the method) vs decoupled (IP-Adapter-style), same parameters.

The decoupled kernel is checked against a naive per-head reference; the mode is then followed
through the adapter config on disk, the UNet, the pipeline, the model card and one training step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from test_adapter import bind, make_adapter, run_unet, unet_inputs
from test_attention import naive_nested_attention, random_case
from test_module import DEMO_FACES, make_data, make_module
from test_pipeline import generate, images, tiny_pipeline, write_adapter

from nested.adapter import AdapterConfig, NestedAdapter, SubjectBinding, cross_attention_layers
from nested.attention import NestedSubject, nested_attention_subjects
from nested.backbone import DiffusionBackbone
from nested.cli.main import main
from nested.errors import ConfigError
from nested.hub.model_card import model_card
from nested.inference.pipeline import NestedPipeline

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- the kernel
def naive_attention(query, key, value, allowed=None):
    """softmax(q k^T / sqrt(d)) v for one (H, N, D) sample; ``allowed`` (T,) bool masks keys out."""
    logits = (query @ key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.softmax(-1) @ value


def naive_decoupled(query, key, value, subjects, text_allowed=None):
    """Plain text attention + sum over the subjects bound in each sample of scale * image attention.

    ``subjects``: (keys (B, H, M, D), values (B, H, M, D), mask (B, T), scale) per subject.
    """
    out = []
    for b in range(query.shape[0]):
        row = naive_attention(query[b], key[b], value[b], None if text_allowed is None else text_allowed[b])
        for keys, values, mask, scale in subjects:
            if mask[b].any():  # every query of a bound sample, whichever position the token has
                row = row + scale * naive_attention(query[b], keys[b], values[b])
        out.append(row)
    return torch.stack(out)


def decoupled(mask, keys, values, scale=1.0, **kwargs):
    return NestedSubject(mask=mask, keys=keys, values=values, scale=scale, mode="decoupled", **kwargs)


def test_one_decoupled_subject_matches_the_naive_reference():
    generator = torch.Generator().manual_seed(0)
    for trial, positions in enumerate(([1], [2], [1, 2])):  # one or two token positions per sample
        query, key, value, keys, values, masks = random_case(generator, 2, 3, 7, 9, 8, 1, positions)
        scale = 0.7 + 0.2 * trial
        got = nested_attention_subjects(query, key, value, [decoupled(masks[0], keys[0], values[0], scale)])
        want = naive_decoupled(query, key, value, [(keys[0], values[0], masks[0], scale)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The text padding mask applies to the text attention only (IP-Adapter: the M image tokens are all real).
    text_allowed = torch.ones(2, 9, dtype=torch.bool)
    text_allowed[:, -2:] = False
    masks[0][:, -2:] = False
    got = nested_attention_subjects(
        query, key, value, [decoupled(masks[0], keys[0], values[0])], attn_mask=text_allowed[:, None, None, :]
    )
    want = naive_decoupled(query, key, value, [(keys[0], values[0], masks[0], 1.0)], text_allowed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_two_decoupled_subjects_in_one_sample_add_up():
    generator = torch.Generator().manual_seed(1)
    query, key, value, keys, values, masks = random_case(generator, 3, 2, 6, 9, 8, 2, [1])
    masks[1][2] = False  # sample 2 binds only the first subject
    subjects = [decoupled(masks[0], keys[0], values[0], 1.0), decoupled(masks[1], keys[1], values[1], 0.5)]
    got = nested_attention_subjects(query, key, value, subjects)
    want = naive_decoupled(
        query, key, value, [(keys[0], values[0], masks[0], 1.0), (keys[1], values[1], masks[1], 0.5)]
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_sample_without_subject_is_exactly_plain_attention():
    """A CFG-like batch: the unbound row is bit-identical to SDPA, one shared image serves the rest."""
    generator = torch.Generator().manual_seed(2)
    query, key, value, keys, values, masks = random_case(generator, 3, 2, 6, 9, 8, 1, [1])
    masks[0][0] = False
    shared = decoupled(masks[0], keys[0][:1], values[0][:1], image_index=torch.zeros(3, dtype=torch.long))
    got = nested_attention_subjects(query, key, value, [shared])
    plain = F.scaled_dot_product_attention(query, key, value)
    assert torch.equal(got[0], plain[0])
    want = naive_decoupled(
        query,
        key,
        value,
        [(keys[0][:1].expand(3, -1, -1, -1), values[0][:1].expand(3, -1, -1, -1), masks[0], 1.0)],
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[1:] - plain[1:]).abs().max() > 1e-3


def test_scale_zero_is_plain_attention_and_the_scale_is_linear():
    generator = torch.Generator().manual_seed(3)
    query, key, value, keys, values, masks = random_case(generator, 2, 2, 6, 9, 8, 1, [1])
    plain = F.scaled_dot_product_attention(query, key, value)

    def run(scale):
        return nested_attention_subjects(query, key, value, [decoupled(masks[0], keys[0], values[0], scale)])

    assert torch.equal(run(0.0), plain)
    torch.testing.assert_close(run(0.25) - plain, 0.25 * (run(1.0) - plain), rtol=1e-5, atol=1e-5)


def test_nested_mode_is_unchanged_and_combines_with_a_decoupled_subject():
    generator = torch.Generator().manual_seed(4)
    query, key, value, keys, values, masks = random_case(generator, 2, 2, 6, 9, 8, 2, [1, 2])
    nested = NestedSubject(masks[0], keys[0], values[0], value_norm_factor=2.0, mode="nested")
    default = NestedSubject(masks[0], keys[0], values[0], value_norm_factor=2.0)
    alone = nested_attention_subjects(query, key, value, [nested])
    assert torch.equal(alone, nested_attention_subjects(query, key, value, [default]))
    reference = naive_nested_attention(
        query, key, value, keys[:1], values[:1], masks[:1], value_norm_factor=2.0
    )
    torch.testing.assert_close(alone, reference, rtol=1e-5, atol=1e-5)

    # A nested subject shapes the text attention, a decoupled one adds its image attention on top.
    both = nested_attention_subjects(
        query, key, value, [nested, decoupled(masks[1], keys[1], values[1], 0.5)]
    )
    extra = naive_decoupled(query, key, value, [(keys[1], values[1], masks[1], 0.5)]) - naive_decoupled(
        query, key, value, []
    )
    torch.testing.assert_close(both, reference + extra, rtol=1e-5, atol=1e-5)


def test_decoupled_gradients_reach_the_subject_keys_and_values_and_low_precision_is_finite():
    generator = torch.Generator().manual_seed(5)
    query, key, value, keys, values, masks = random_case(generator, 2, 2, 6, 9, 8, 1, [1])
    k, v = keys[0].clone().requires_grad_(), values[0].clone().requires_grad_()
    nested_attention_subjects(query, key, value, [decoupled(masks[0], k, v)]).square().sum().backward()
    assert k.grad.abs().sum() > 0 and v.grad.abs().sum() > 0

    half = [x.bfloat16() for x in (query, key, value, keys[0], values[0])]
    got = nested_attention_subjects(*half[:3], [decoupled(masks[0], half[3], half[4])])
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    want = naive_decoupled(query, key, value, [(keys[0], values[0], masks[0], 1.0)])
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_unknown_mode_and_nested_only_options_fail_clearly():
    generator = torch.Generator().manual_seed(6)
    query, key, value, keys, values, masks = random_case(generator, 2, 2, 6, 9, 8, 1, [1])
    with pytest.raises(ValueError, match=r"mode must be one of 'nested', 'decoupled'; got 'ip'"):
        nested_attention_subjects(query, key, value, [NestedSubject(masks[0], keys[0], values[0], mode="ip")])
    for option in ({"value_norm_factor": 2.0}, {"token_weight": 2.0}):
        with pytest.raises(ValueError, match="decoupled injection leaves plain"):
            nested_attention_subjects(query, key, value, [decoupled(masks[0], keys[0], values[0], **option)])


# ---------------------------------------------------------------------- adapter and UNet
@pytest.fixture(scope="module")
def sd_backbone(tiny_sd_path):
    return DiffusionBackbone.from_pretrained(tiny_sd_path)


def test_decoupled_adapter_round_trips_through_its_config_and_acts_on_bound_prompts_only(
    sd_backbone, tiny_sd_path, tmp_path
):
    backbone, prompts = sd_backbone, ["a photo of a person on the beach", "a photo of a dog in the snow"]
    adapter = make_adapter(backbone, tiny_sd_path / "image_encoder", injection="decoupled")
    inputs = unet_inputs(backbone, prompts)
    subject_images = torch.rand(2, 3, 32, 32)
    plain = run_unet(backbone, inputs)
    adapter.attach(backbone.unet)
    try:
        bind(adapter, backbone, prompts, subject_images)
        before = run_unet(backbone, inputs)
        assert torch.equal(before[1], plain[1]), "a prompt without the subject token gets plain attention"
        assert (before[0] - plain[0]).abs().max() > 1e-3
        adapter.config.injection = "nested"  # same weights, the other mode: a different output
        bind(adapter, backbone, prompts, subject_images)
        assert (run_unet(backbone, inputs)[0] - before[0]).abs().max() > 1e-3
        adapter.config.injection = "decoupled"
    finally:
        adapter.detach(backbone.unet)

    folder = adapter.save_pretrained(tmp_path / "decoupled")
    raw = json.loads((folder / "adapter_config.json").read_text())
    assert raw["injection"] == "decoupled"
    loaded = NestedAdapter.from_pretrained(folder).eval()
    assert loaded.config.injection == "decoupled"
    loaded.attach(backbone.unet)
    try:
        bind(loaded, backbone, prompts, subject_images)
        assert torch.equal(run_unet(backbone, inputs), before)
    finally:
        loaded.detach(backbone.unet)

    raw.pop("injection")  # a config without the key
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    assert NestedAdapter.from_pretrained(folder).config.injection == "nested"
    raw["injection"] = "ip-adapter"
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(
        ValueError, match=r"adapter_config.json: injection must be one of 'nested', 'decoupled'"
    ):
        NestedAdapter.from_pretrained(folder)


def test_nested_only_options_are_refused_for_a_decoupled_adapter(sd_backbone, tiny_sd_path):
    config = make_adapter(sd_backbone, tiny_sd_path / "image_encoder", injection="decoupled").config
    with pytest.raises(ValueError, match="value_norm_factor=2.0"):
        AdapterConfig(**{**config.__dict__, "value_norm_factor": 2.0})
    with pytest.raises(ValueError, match="injection must be one of 'nested', 'decoupled'; got 'IP'"):
        AdapterConfig(**{**config.__dict__, "injection": "IP"})
    adapter = make_adapter(sd_backbone, tiny_sd_path / "image_encoder", injection="decoupled")
    masks = torch.ones(1, 77, dtype=torch.bool)
    tokens = torch.zeros(1, 6, config.encoder.token_dim)
    with pytest.raises(ValueError, match="token_weight=3.0"):
        adapter.set_subjects([SubjectBinding(tokens=tokens, masks=masks, token_weight=3.0)])
    adapter.set_subjects([SubjectBinding(tokens=tokens, masks=masks, value_norm_factor=0.0)])  # 0 means off


def test_model_card_names_the_injection_mode(sd_backbone, tiny_sd_path, tmp_path):
    for injection in ("nested", "decoupled"):
        adapter = make_adapter(sd_backbone, tiny_sd_path / "image_encoder", injection=injection)
        text = model_card(adapter.save_pretrained(tmp_path / injection))
        assert ModelCard(text).data.to_dict()["injection"] == injection
        assert f"| injection | {injection} |" in text
    assert "**decoupled** injection" in text


# ------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def mixed_adapters(tiny_sd_path, tmp_path_factory):
    """A nested faces adapter and a decoupled pets adapter for the tiny SD pipeline."""
    root = tmp_path_factory.mktemp("mixed-adapters")
    unet = tiny_pipeline(tiny_sd_path).unet
    encoder = tiny_sd_path / "image_encoder"
    return {
        "<person>": write_adapter(unet, root / "faces", encoder, "<person>", "person", 1),
        "<dog>": write_adapter(unet, root / "pets", encoder, "<dog>", "dog", 2, injection="decoupled"),
    }


@pytest.mark.filterwarnings("ignore:'<dog>' is not in the prompts")
def test_strengths_scale_decoupled_injection_and_it_combines_with_a_nested_adapter(
    tiny_sd_path, mixed_adapters
):
    prompts = ["a <person> walking a <dog>", "a <person> on the beach"]
    person, dog = images(1), images(2)
    pipe = tiny_pipeline(tiny_sd_path)
    with NestedPipeline(pipe, mixed_adapters) as nested:
        assert nested.describe()["<dog>"]["injection"] == "decoupled"
        layer = next(iter(cross_attention_layers(pipe.unet).values()))
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(2, 64, layer.to_q.in_features, generator=generator)
        context = torch.randn(2, 77, layer.to_k.in_features, generator=generator)

        def out(subjects, **kwargs):
            with nested.bind(prompts, subjects, **kwargs), torch.no_grad():
                return layer(hidden, encoder_hidden_states=context)

        with torch.no_grad():
            plain = layer(hidden, encoder_hidden_states=context)
        full = out({"<dog>": dog})
        assert torch.equal(out({"<dog>": dog}, strengths={"<dog>": 0.0}), plain)
        assert torch.equal(full[1], plain[1])  # the prompt without <dog>
        torch.testing.assert_close(
            out({"<dog>": dog}, strengths={"<dog>": 0.3}) - plain, 0.3 * (full - plain), atol=1e-5, rtol=0
        )
        # The decoupled dog's term adds on top of the nested person's, unchanged by it.
        person_alone = out({"<person>": person})
        both = out({"<person>": person, "<dog>": dog})
        torch.testing.assert_close(both - person_alone, full - plain, atol=1e-5, rtol=0)

        with pytest.raises(ValueError, match="token_weight=2.0"):
            out({"<dog>": dog}, token_weights={"<dog>": 2.0})

        # Whole guided generations: the unconditional half never gets the image attention.
        unet_outputs = []
        pipe.unet.register_forward_hook(lambda module, args, output: unet_outputs.append(output[0]))
        prompt = "a <person> walking a <dog>"
        no_subject = generate(nested, prompt)
        plain_first_step = unet_outputs[0]
        unet_outputs.clear()
        with_both = generate(nested, prompt, subjects={"<person>": person, "<dog>": dog})
        assert torch.equal(unet_outputs[0][0], plain_first_step[0])
        dog_only = generate(nested, prompt, subjects={"<dog>": dog})
    for a, b in ((with_both, no_subject), (with_both, dog_only), (dog_only, no_subject)):
        assert (a - b).abs().max() > 1e-3


# ------------------------------------------------------------------------------- training
def test_one_decoupled_training_step_gives_every_adapter_weight_a_gradient(tiny_sd_path):
    module = make_module(tiny_sd_path, injection="decoupled")
    module.configure_model()
    assert module.adapter.config.injection == "decoupled" and module.hparams["injection"] == "decoupled"
    data = make_data(str(DEMO_FACES / "shards.json"))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    out = module.diffusion_loss(batch, torch.Generator().manual_seed(0), apply_dropout=False)
    assert out["subject_fraction"] == 1
    out["loss"].backward()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable
    no_gradient = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_gradient, f"adapter weights without a gradient: {no_gradient[:3]}"

    # The two modes share every tensor: only the recorded mode stops a resume from switching silently.
    with pytest.raises(ValueError, match="trained with injection='nested'"):
        module.on_load_checkpoint({"hyper_parameters": {}, "state_dict": module.state_dict()})
    module.on_load_checkpoint({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()})


def test_the_module_checks_the_mode_at_construction(tiny_sd_path):
    with pytest.raises(ConfigError, match="model.injection must be one of 'nested', 'decoupled'"):
        make_module(tiny_sd_path, injection="ip")
    with pytest.raises(ValueError, match=r"value_norm_factor=2.0 \(use null"):
        make_module(tiny_sd_path, injection="decoupled", value_norm_factor=2.0)


def test_the_cli_config_takes_model_injection(monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["nested"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/smoke.yaml", "--model.injection=decoupled", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["injection"] == "decoupled"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/smoke.yaml", "--model.injection=ip", "--print_config"])
    assert exit_info.value.code != 0 and "injection" in capsys.readouterr().err

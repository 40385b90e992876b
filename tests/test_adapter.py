"""NestedAdapter on real (tiny) diffusers UNets loaded from disk: attach/detach, save/load, caching."""

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import Tensor
from transformers import Dinov2Model

from nested.adapter import NestedAdapter, SubjectBinding, compile_blocks, cross_attention_layers
from nested.backbone import DiffusionBackbone
from nested.encoder import EncoderSpec
from nested.errors import ConfigError
from nested.tokens import subject_masks_for_tokenizers

PROMPTS = ["a photo of a person on the beach", "a photo of a dog in the snow"]


def make_adapter(backbone, image_encoder, token="person", class_word="person", seed=0, **kwargs):
    torch.manual_seed(seed)
    spec = EncoderSpec(backbone=str(image_encoder), num_tokens=6, width=32, depth=1, heads=2)
    adapter = NestedAdapter.for_unet(
        backbone.unet, token=token, class_word=class_word, encoder=spec, **kwargs
    )
    for layer in adapter.layers.values():  # visible effects at random init
        torch.nn.init.normal_(layer.to_k.weight, std=0.5)
        torch.nn.init.normal_(layer.to_v.weight, std=0.5)
    return adapter.eval()


def unet_inputs(backbone, prompts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch = len(prompts)
    latents = torch.randn(batch, 4, 16, 16, generator=generator)
    timesteps = torch.tensor([500] * batch)
    cond = backbone.encode_prompts(prompts)
    added = None
    if backbone.kind == "sdxl":
        sizes = torch.tensor([[64, 64]] * batch)
        time_ids = backbone.time_ids(sizes, torch.zeros(batch, 2, dtype=torch.long), (64, 64))
        added = backbone.unet_added_cond_kwargs(cond, time_ids)
    return latents, timesteps, cond.prompt_embeds, added


def run_unet(backbone, inputs):
    latents, timesteps, embeds, added = inputs
    with torch.no_grad():
        return backbone.unet(latents, timesteps, embeds, added_cond_kwargs=added).sample


def bind(adapter, backbone, prompts, images, token="person"):
    masks = subject_masks_for_tokenizers(backbone.tokenizers, prompts, token)
    with torch.no_grad():
        tokens = adapter.encode(images)
    adapter.set_subjects([SubjectBinding(tokens=tokens, masks=masks)])
    return masks


@pytest.fixture(params=["sd", "sdxl"])
def pipeline_path(request, tiny_sd_path, tiny_sdxl_path):
    return {"sd": tiny_sd_path, "sdxl": tiny_sdxl_path}[request.param]


@pytest.fixture
def backbone(pipeline_path):
    return DiffusionBackbone.from_pretrained(pipeline_path)


def test_plain_prompts_are_bit_identical_and_subject_prompts_differ(backbone, pipeline_path):
    adapter = make_adapter(backbone, pipeline_path / "image_encoder")
    inputs = unet_inputs(backbone, PROMPTS)
    plain = run_unet(backbone, inputs)

    adapter.attach(backbone.unet)
    assert torch.equal(run_unet(backbone, inputs), plain)  # attached, nothing bound

    masks = bind(adapter, backbone, PROMPTS, torch.rand(2, 3, 40, 40))
    assert masks[0].sum() == 1 and not masks[1].any()  # "person" in prompt 0 only
    out = run_unet(backbone, inputs)
    assert torch.equal(out[1], plain[1]), "a prompt without the subject must be untouched"
    assert not torch.allclose(out[0], plain[0]), "the subject's prompt must change"

    adapter.detach(backbone.unet)
    assert torch.equal(run_unet(backbone, inputs), plain)
    assert all(
        type(attn.processor) is AttnProcessor2_0 for attn in cross_attention_layers(backbone.unet).values()
    )


def test_save_load_round_trip_gives_identical_outputs(backbone, pipeline_path, tmp_path):
    adapter = make_adapter(backbone, pipeline_path / "image_encoder", token="<person>", domain="faces")
    adapter.add_tokens(backbone.tokenizers, backbone.text_encoders)
    prompts = ["a photo of <person> on the beach", "a dog"]
    images = torch.rand(2, 3, 32, 32)
    inputs = unet_inputs(backbone, prompts)
    adapter.attach(backbone.unet)
    bind(adapter, backbone, prompts, images, token="<person>")
    before = run_unet(backbone, inputs)
    adapter.detach(backbone.unet)

    adapter.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter.safetensors", "adapter_config.json"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["token"] == "<person>" and config["class_word"] == "person" and config["domain"] == "faces"
    assert config["encoder"]["num_tokens"] == 6 and config["format_version"] == 1
    assert config["injection"] == "nested"  # the default mode is written out, not implied
    assert set(config["layers"]) == set(cross_attention_layers(backbone.unet))
    # The same weights give the same bytes, so re-exporting an unchanged adapter changes no file.
    for copy in range(8):
        again = adapter.save_pretrained(tmp_path / f"again-{copy}")
        for name in files:
            assert (again / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes(), (copy, name)

    fresh = DiffusionBackbone.from_pretrained(pipeline_path)  # tokenizers without <person>
    loaded = NestedAdapter.from_pretrained(tmp_path / "adapter").eval()
    loaded.add_tokens(fresh.tokenizers, fresh.text_encoders)
    loaded.attach(fresh.unet)
    bind(loaded, fresh, prompts, images, token="<person>")
    assert torch.equal(run_unet(fresh, unet_inputs(fresh, prompts)), before)


def test_state_dict_keys_are_layer_names(backbone, pipeline_path):
    adapter = make_adapter(backbone, pipeline_path / "image_encoder")
    keys = adapter.adapter_state_dict().keys()
    layer = next(iter(cross_attention_layers(backbone.unet)))
    assert f"layers.{layer}.to_k.weight" in keys and f"layers.{layer}.to_v.weight" in keys
    assert all(k.startswith(("resampler.", "layers.", "token_embeddings.")) for k in keys)
    assert not any("backbone" in k for k in adapter.state_dict())  # the frozen backbone is not saved


def test_mismatched_base_is_refused_with_the_layer_and_dims(tiny_sd_path, tiny_sdxl_path, tmp_path):
    sd, sdxl = (
        DiffusionBackbone.from_pretrained(tiny_sd_path),
        DiffusionBackbone.from_pretrained(tiny_sdxl_path),
    )
    adapter = make_adapter(sd, tiny_sd_path / "image_encoder")
    adapter.save_pretrained(tmp_path / "sd-adapter")
    loaded = NestedAdapter.from_pretrained(tmp_path / "sd-adapter")
    with pytest.raises(ValueError, match=r"layer '.*attn2'"):
        loaded.attach(sdxl.unet)
    # Same layer names, different dims: the error names the layer and both dims.
    config = json.loads((tmp_path / "sd-adapter" / "adapter_config.json").read_text())
    name = next(iter(config["layers"]))
    layers = {k: dict(v) for k, v in config["layers"].items()}
    layers[name]["inner_dim"] *= 2
    adapter.config.layers = layers
    with pytest.raises(
        ValueError, match=rf"layer '{name}' does not fit: .*'inner_dim': {layers[name]['inner_dim']}"
    ):
        adapter.attach(sd.unet)


def test_pickles_unknown_tensors_and_corrupt_files_are_refused(backbone, pipeline_path, tmp_path):
    adapter = make_adapter(backbone, pipeline_path / "image_encoder")
    folder = adapter.save_pretrained(tmp_path / "adapter")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    torch.save(adapter.adapter_state_dict(), pickled / "adapter.bin")
    with pytest.raises(ValueError, match="never unpickles"):
        NestedAdapter.from_pretrained(pickled)

    # A pickle renamed to .safetensors is not loaded either.
    disguised = tmp_path / "disguised"
    disguised.mkdir()
    (disguised / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    torch.save(adapter.adapter_state_dict(), disguised / "adapter.safetensors")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        NestedAdapter.from_pretrained(disguised)

    from safetensors.torch import save_file

    extra = dict(adapter.adapter_state_dict(), **{"evil.weight": torch.zeros(1)})
    save_file(extra, folder / "adapter.safetensors")
    with pytest.raises(ValueError, match="unknown tensors"):
        NestedAdapter.from_pretrained(folder)

    config = json.loads((folder / "adapter_config.json").read_text())
    config["tokne"] = "typo"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown keys \['tokne'\]"):
        NestedAdapter.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NestedAdapter.from_pretrained(tmp_path / "missing")


def _edit_config(folder: Path, edit) -> Path:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return path


FIRST_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


@pytest.mark.parametrize(
    ("edit", "field", "tensor"),
    [
        (
            lambda c: c["layers"][FIRST_LAYER].update(inner_dim=2 * c["layers"][FIRST_LAYER]["inner_dim"]),
            f"layers['{FIRST_LAYER}'].inner_dim",
            f"layers.{FIRST_LAYER}.to_k.weight",
        ),
        (lambda c: c["encoder"].update(num_tokens=8), "encoder.num_tokens is 8", "resampler.latents"),
        (lambda c: c["encoder"].update(width=64), "encoder.width is 64", "resampler.latents"),
        (lambda c: c["encoder"].update(output_dim=16), "encoder.output_dim is 16", "resampler.norm_out"),
        (lambda c: c["encoder"].update(depth=2), "encoder.depth = 2", "resampler.blocks"),
        (lambda c: c["layers"].pop(FIRST_LAYER), "disagree on the cross-attention layers", FIRST_LAYER),
        (
            lambda c: c.update(token_encoders=["text_encoder"]),
            "token_encoders",
            "token_embeddings.text_encoder",
        ),
    ],
    ids=["inner_dim", "num_tokens", "width", "output_dim", "depth", "layer", "token_encoders"],
)
def test_a_config_edited_against_its_weights_names_the_tensor_and_the_field(
    tiny_sd_path, tmp_path, edit, field, tensor
):
    from nested.adapter import check_adapter_files
    from nested.errors import AdapterError

    sd = DiffusionBackbone.from_pretrained(tiny_sd_path)
    adapter = make_adapter(sd, tiny_sd_path / "image_encoder", token="<person>")
    folder = adapter.save_pretrained(tmp_path / "adapter")
    assert FIRST_LAYER in json.loads((folder / "adapter_config.json").read_text())["layers"]
    config_path = _edit_config(folder, edit)
    for load in (NestedAdapter.from_pretrained, check_adapter_files):
        with pytest.raises(AdapterError) as caught:
            load(folder)
        message = str(caught.value)
        assert field in message and tensor in message and str(config_path) in message, message
        assert "Restore the adapter_config.json saved with these weights" in message and "\n" not in message


def test_a_truncated_weights_file_or_another_vision_backbone_is_named(tiny_sd_path, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from nested.errors import AdapterError

    sd = DiffusionBackbone.from_pretrained(tiny_sd_path)
    folder = make_adapter(sd, tiny_sd_path / "image_encoder").save_pretrained(tmp_path / "adapter")
    weights = folder / "adapter.safetensors"
    data = weights.read_bytes()

    # A backbone whose features are 48 wide, not the 32 the resampler was trained on.
    wider = Dinov2Model(
        Dinov2Config(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    )
    with pytest.raises(
        AdapterError, match=r"gives 48-wide features, but the adapter's resampler\.proj_in\.weight"
    ):
        NestedAdapter.from_pretrained(folder, image_encoder=(wider, 28, (0.5,) * 3, (0.5,) * 3))

    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(AdapterError, match=rf"{weights} is not a valid safetensors file \(.*incomplete"):
        NestedAdapter.from_pretrained(folder)


def test_nested_kv_computed_once_per_image_over_a_guided_denoising_loop(tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    backbone = DiffusionBackbone.from_pretrained(tiny_sd_path)
    adapter = make_adapter(backbone, tiny_sd_path / "image_encoder")
    calls = []
    project = adapter._project
    adapter._project = lambda tokens: calls.append(tokens.shape[0]) or project(tokens)
    unet_calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: unet_calls.append(args[0].shape[0]))

    def generate():
        return pipe(
            "a photo of a person",
            num_inference_steps=3,
            guidance_scale=5.0,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    plain = generate()
    adapter.attach(pipe.unet)
    masks = subject_masks_for_tokenizers([pipe.tokenizer], ["a photo of a person"], "person")
    with torch.no_grad():
        adapter.set_subjects([SubjectBinding(tokens=adapter.encode(torch.rand(1, 3, 32, 32)), masks=masks)])
    personalised = generate()
    assert unet_calls == [2] * 6  # 3 steps x (plain + personalised), CFG batch of 2
    assert calls == [1]  # every layer's keys and values once, for one image
    assert not torch.allclose(plain, personalised)
    adapter.detach(pipe.unet)
    assert torch.equal(generate(), plain)


def test_bindings_that_share_their_tokens_share_one_projection(tiny_sd_path):
    """Training binds each of an adapter's tokens to the same encoded images: one projection serves them all,
    with the same output as a projection per binding."""
    backbone = DiffusionBackbone.from_pretrained(tiny_sd_path)
    adapter = make_adapter(backbone, tiny_sd_path / "image_encoder")
    adapter.attach(backbone.unet)
    calls = []
    project = adapter._project
    adapter._project = lambda tokens: calls.append(tokens.shape[0]) or project(tokens)
    inputs = unet_inputs(backbone, PROMPTS)
    with torch.no_grad():
        tokens = adapter.encode(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))

    def bind(first: Tensor, second: Tensor) -> Tensor:
        masks = [
            subject_masks_for_tokenizers(backbone.tokenizers, PROMPTS, word) for word in ("person", "dog")
        ]
        adapter.set_subjects(
            [SubjectBinding(tokens=first, masks=masks[0]), SubjectBinding(tokens=second, masks=masks[1])]
        )
        return run_unet(backbone, inputs)

    shared = bind(tokens, tokens)
    assert calls == [2]
    separate = bind(tokens, tokens.clone())
    assert calls == [2, 2, 2]
    assert torch.equal(shared, separate)
    adapter.clear_subjects()
    assert not torch.allclose(run_unet(backbone, inputs), shared)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_runs_without_nan(backbone, pipeline_path, dtype):
    """In low precision the subject changes the UNet as it does in float32, up to rounding."""
    adapter = make_adapter(backbone, pipeline_path / "image_encoder", value_norm_factor=2.0)
    adapter.attach(backbone.unet)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    latents, timesteps, embeds, added = unet_inputs(backbone, PROMPTS)
    # The output of the first cross-attention layer the UNet runs: there the subject's effect stands well
    # above bfloat16's rounding, which in this random UNet's final output is as large as the effect.
    outputs = []
    for attention in cross_attention_layers(backbone.unet).values():
        attention.register_forward_hook(lambda module, args, out: outputs.append(out.float()))

    def run(dtype: torch.dtype, personalised: bool) -> tuple[Tensor, Tensor]:
        backbone.unet.to(dtype)
        adapter.to(dtype)
        adapter.clear_subjects()
        if personalised:
            bind(adapter, backbone, PROMPTS, images.to(dtype))
        cond = None if added is None else {k: v.to(dtype) for k, v in added.items()}
        outputs.clear()
        with torch.no_grad():
            out = backbone.unet(latents.to(dtype), timesteps, embeds.to(dtype), added_cond_kwargs=cond).sample
        return out, outputs[0]

    # float32 first: casting to bfloat16 and back would round the weights.
    (reference, personalised), (_, plain) = run(torch.float32, True), run(torch.float32, False)
    effect = personalised - plain
    (_, plain), (out, personalised) = run(dtype, False), run(dtype, True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)  # 0.02 at most in bfloat16
    assert effect.abs().max() > 5e-3
    # The subject's effect on the layer: 12 % off in bfloat16; without it, 100 % off.
    error = ((personalised - plain) - effect).norm() / effect.norm()
    assert error < (1e-6 if dtype == torch.float32 else 0.3), error


def test_replaced_processors_are_detected_and_reattached(backbone, pipeline_path):
    adapter = make_adapter(backbone, pipeline_path / "image_encoder")
    inputs = unet_inputs(backbone, PROMPTS)
    backbone.unet.set_attn_processor(AttnProcessor())  # a user's processor before attaching
    plain = run_unet(backbone, inputs)
    adapter.attach(backbone.unet)
    bind(adapter, backbone, PROMPTS, torch.rand(2, 3, 32, 32))
    personalised = run_unet(backbone, inputs)

    backbone.unet.set_attn_processor(AttnProcessor2_0())  # e.g. a later enable_xformers...
    with pytest.warns(UserWarning, match="re-attaching"):
        again = run_unet(backbone, inputs)
    torch.testing.assert_close(again, personalised)  # trained weights not silently lost
    adapter.detach(backbone.unet)
    layers = cross_attention_layers(backbone.unet)
    assert all(type(attn.processor) is AttnProcessor2_0 for attn in layers.values())  # the newest user choice
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(run_unet(backbone, inputs), plain, rtol=1e-5, atol=1e-5)


def test_two_adapters_on_one_unet_each_act_on_their_token(backbone, pipeline_path):
    person = make_adapter(backbone, pipeline_path / "image_encoder", token="person", seed=1)
    dog = make_adapter(backbone, pipeline_path / "image_encoder", token="dog", class_word="dog", seed=2)
    prompts = ["a person walking a dog on the beach"]
    inputs = unet_inputs(backbone, prompts)
    plain = run_unet(backbone, inputs)
    person.attach(backbone.unet)
    dog.attach(backbone.unet)
    bind(person, backbone, prompts, torch.rand(1, 3, 32, 32), token="person")
    bind(dog, backbone, prompts, torch.rand(1, 3, 32, 32), token="dog")
    both = run_unet(backbone, inputs)
    dog.detach(backbone.unet)
    person_only = run_unet(backbone, inputs)
    assert not torch.allclose(both, person_only) and not torch.allclose(person_only, plain)
    person.detach(backbone.unet)
    assert torch.equal(run_unet(backbone, inputs), plain)


def test_the_feature_layer_is_checked_against_the_image_backbone_when_it_loads(pipeline_path):
    from transformers import AutoConfig

    from nested.encoder import SubjectEncoder

    image_encoder = pipeline_path / "image_encoder"
    layers = AutoConfig.from_pretrained(image_encoder).num_hidden_layers
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for layer in (-(layers + 1), 0, layers):  # the embeddings' output, then each layer's
        spec = EncoderSpec(
            backbone=str(image_encoder), num_tokens=2, width=32, depth=1, heads=2, feature_layer=layer
        )
        assert SubjectEncoder.from_spec(spec)(images).shape == (1, 2, 32)
    for layer in (layers + 1, -(layers + 2)):
        spec = EncoderSpec(
            backbone=str(image_encoder), num_tokens=2, width=32, depth=1, heads=2, feature_layer=layer
        )
        with pytest.raises(ConfigError) as refused:
            SubjectEncoder.from_spec(spec)
        assert str(refused.value) == (
            f"encoder.feature_layer {layer} is not one of the {layers + 1} hidden states of the image encoder's "
            f"backbone ({layers} layers and the embeddings): use -{layers + 1} to {layers} (-1: the last)."
        )


def test_a_wide_photo_is_encoded_from_its_centre_square_as_in_training(backbone, pipeline_path):
    """A photo given at inference (``nested generate``, ``NestedPipeline``) as it is: the encoder sees its centre
    square, as the training data's reference transform makes it, not the whole photo squeezed into a square."""
    from PIL import Image
    from skimage.data import astronaut

    from nested.data.transforms import reference_transform

    adapter = make_adapter(backbone, pipeline_path / "image_encoder")
    size = adapter.encoder.image_size
    photo = Image.fromarray(astronaut()).resize((4 * size, 2 * size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        as_trained = adapter.encode(reference_transform(photo, size=size)[None])
        given = adapter.encode(pixels)
        squeezed = adapter.encode(torch.nn.functional.interpolate(pixels, size=(size, size), mode="area"))
    # Two resamplings of one square (PIL's and torch's) differ a little; the squeezed photo is another image.
    assert (given - as_trained).abs().max() < 0.1 * (squeezed - as_trained).abs().max()


def test_any_hf_vision_backbone_works(backbone, pipeline_path, tmp_path):
    from nested.testing import write_tiny_vision_model

    dino = write_tiny_vision_model(tmp_path / "dino", kind="dinov2")
    adapter = make_adapter(backbone, Path(dino))
    images = torch.rand(2, 3, 50, 30, generator=torch.Generator().manual_seed(0))
    tokens = adapter.encode(images)
    assert tokens.shape == (2, 6, 32) and torch.isfinite(tokens).all()
    assert not torch.allclose(tokens[0], tokens[1])  # two images, two subjects
    # The features are the model's last hidden states of the preprocessed images, as it computes them
    # loaded on its own.
    encoder = adapter.encoder
    pixels = encoder.preprocess(images)
    assert pixels.shape == (2, 3, 28, 28)
    with torch.no_grad():
        expected = Dinov2Model.from_pretrained(dino)(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(encoder.features(images), expected.hidden_states[-1])
    with torch.no_grad():
        torch.testing.assert_close(tokens, encoder.resampler(expected.hidden_states[-1]))


def test_resampler_is_safe_in_half_precision(backbone, pipeline_path):
    adapter = make_adapter(backbone, pipeline_path / "image_encoder")
    resampler = adapter.encoder.resampler
    features = torch.randn(2, 17, resampler.proj_in.in_features) * 4000  # activations that overflow fp16 math
    reference = resampler(features)
    half = resampler.half()(features.half())
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, rtol=0.02, atol=0.02)


def test_a_bound_layer_compiles_to_one_graph_and_reads_no_tensor_value(tiny_sdxl_path):
    """The per-layer path of a guided batch (unconditional half unbound) has no graph break under
    torch.compile(fullgraph=True): no branch depends on a tensor's value, so on a GPU nothing waits."""
    backbone = DiffusionBackbone.from_pretrained(tiny_sdxl_path)
    adapter = make_adapter(backbone, tiny_sdxl_path / "image_encoder", value_norm_factor=2.0)
    adapter.attach(backbone.unet)
    bind(adapter, backbone, ["a photo of a person"], torch.rand(1, 3, 32, 32))
    attn = next(iter(cross_attention_layers(backbone.unet).values()))
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=generator)  # CFG: 2 x 1 prompt
    text = torch.randn(2, 77, attn.to_k.in_features, generator=generator)
    torch._dynamo.reset()
    compiled = torch.compile(attn, fullgraph=True, backend="eager")
    with torch.no_grad():
        eager = attn(hidden, encoder_hidden_states=text)
        traced = compiled(hidden, encoder_hidden_states=text)
    torch.testing.assert_close(traced, eager)
    adapter.clear_subjects()
    with torch.no_grad():  # unbound: the unconditional row was exactly the plain attention
        assert torch.equal(attn(hidden, encoder_hidden_states=text)[0], eager[0])


def test_the_batched_projection_equals_each_layers_own(backbone, pipeline_path):
    """One matrix product per head dim (SD 1.x has three, SDXL one) gives what every NestedLayer gives."""
    adapter = make_adapter(backbone, pipeline_path / "image_encoder")
    tokens = torch.randn(2, 6, adapter.config.encoder.token_dim)
    projected = adapter.project(tokens)
    assert list(projected) == list(cross_attention_layers(backbone.unet))
    for key, layer in adapter.layers.items():
        keys, values = projected[key.replace("__", ".")]
        want_keys, want_values = layer(tokens)
        torch.testing.assert_close(keys, want_keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-6)
        assert keys.shape == (2, layer.heads, 6, layer.to_k.out_features // layer.heads)


def test_projections_started_from_the_base_give_a_text_feature_its_own_value(backbone, pipeline_path):
    """With the nested projections copied from the layer's text projections, a subject whose one token IS
    the class word's text feature gives v* = V_s in every layer: the UNet's output is the plain one."""
    prompts = ["a photo of a person on the beach", "a person in the snow"]
    width = backbone.unet.config.cross_attention_dim
    spec = EncoderSpec(
        backbone=str(pipeline_path / "image_encoder"), num_tokens=1, width=16, depth=1, heads=2
    )
    assert width != 16
    inputs = unet_inputs(backbone, prompts)
    plain = run_unet(backbone, inputs)
    masks = subject_masks_for_tokenizers(backbone.tokenizers, prompts, "person")
    class_word_features = inputs[2][masks].view(len(prompts), 1, width)

    def output_with(adapter):
        adapter.attach(backbone.unet)
        adapter.set_subjects([SubjectBinding(tokens=class_word_features, masks=masks)])
        try:
            return run_unet(backbone, inputs)
        finally:
            adapter.detach(backbone.unet)

    started = NestedAdapter.for_unet(
        backbone.unet, token="person", encoder=dataclasses.replace(spec, output_dim=width)
    )
    random_output = output_with(started)
    started.init_projections_from(backbone.unet)
    torch.testing.assert_close(output_with(started), plain, rtol=1e-4, atol=1e-5)
    assert (random_output - plain).abs().max() > 1e-3  # the same tokens through random projections differ
    layers = cross_attention_layers(backbone.unet)
    for name, (keys, values) in started.project(class_word_features).items():  # keys too, not only values
        attn = layers[name]
        for got, projection in ((keys, attn.to_k), (values, attn.to_v)):
            want = projection(class_word_features).view(len(prompts), 1, attn.heads, -1).transpose(1, 2)
            torch.testing.assert_close(got, want)

    too_narrow = NestedAdapter.for_unet(backbone.unet, token="person", encoder=spec)
    with pytest.raises(
        ConfigError, match=rf"projects {width}-wide text, the encoder makes 16-wide.*output_dim: {width}"
    ):
        too_narrow.init_projections_from(backbone.unet)


@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="inductor's CPU code needs a C++ compiler"
)
@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_inductor_compiles_nested_layers_in_checkpointed_blocks_to_the_eager_output(regional, tiny_sdxl_path):
    """A UNet with gradient checkpointing and every cross-attention layer nested, compiled by inductor as
    model.compile does it (whole, or block by block), computes what eager computes (torch 2.13's inductor got
    the whole UNet wrong when the fused call's value was built by concatenation: up to 45 % off with two or
    more nested layers)."""
    backbone = DiffusionBackbone.from_pretrained(tiny_sdxl_path)
    adapter = make_adapter(backbone, tiny_sdxl_path / "image_encoder", value_norm_factor=2.0).train()
    unet = backbone.unet
    unet.enable_gradient_checkpointing()
    adapter.attach(unet)
    prompts = ["a photo of a person", "a person on the beach"]
    latents, timesteps, embeds, added = unet_inputs(backbone, prompts)
    bind(adapter, backbone, prompts, torch.rand(2, 3, 32, 32))
    latents.requires_grad_(True)  # checkpointing acts only when a gradient is wanted
    eager = unet(latents, timesteps, embeds, added_cond_kwargs=added).sample
    torch._dynamo.reset()
    if regional:
        assert compile_blocks(unet, backend="inductor") == 8
    else:
        unet.compile(backend="inductor")
    compiled = unet(latents, timesteps, embeds, added_cond_kwargs=added).sample
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_regional_compilation_compiles_one_graph_for_all_nested_blocks_of_a_shape(tiny_sdxl_path):
    """diffusers' compile_repeated_blocks (regional compilation) compiles each transformer block on its own.
    The nested layers reach their keys and values through attributes, not by the layer's name, so the tiny
    SDXL's eight blocks (one shape) share one graph (keyed by layer, they compiled eight, and past torch's
    recompile limit fell back to eager); binding another subject does not recompile; outputs are eager's."""
    from torch._dynamo.utils import counters

    backbone = DiffusionBackbone.from_pretrained(tiny_sdxl_path)
    adapter = make_adapter(backbone, tiny_sdxl_path / "image_encoder", value_norm_factor=2.0)
    unet = backbone.unet
    adapter.attach(unet)
    prompts = ["a photo of a person", "a person on the beach"]
    inputs = unet_inputs(backbone, prompts)
    images = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    eager = []
    for subject in images:
        bind(adapter, backbone, prompts, subject)
        eager.append(run_unet(backbone, inputs))
    assert not torch.allclose(eager[0], eager[1])

    torch._dynamo.reset()
    counters.clear()
    unet.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    for subject, expected in zip(images, eager, strict=True):
        bind(adapter, backbone, prompts, subject)
        torch.testing.assert_close(run_unet(backbone, inputs), expected)
        assert counters["stats"]["unique_graphs"] == 1
    assert len([m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]) == 8


def test_an_adapter_on_two_unets_serves_the_one_left_after_detaching_the_other(tiny_sd_path):
    """Each attach gives every layer of that model its own LayerBinding; detach removes only that model's.
    The adapter bound on the UNet left gives what it gives when attached to it alone, and the detached
    UNet is plain again."""
    first, second = (DiffusionBackbone.from_pretrained(tiny_sd_path) for _ in range(2))
    adapter = make_adapter(first, tiny_sd_path / "image_encoder")
    prompts = ["a photo of a person", "a person on the beach"]
    inputs = unet_inputs(first, prompts)
    plain = run_unet(first, inputs)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    adapter.attach(first.unet)
    adapter.attach(second.unet)
    assert len(adapter._layer_bindings) == 2 * len(adapter.layers)
    adapter.detach(first.unet)
    assert len(adapter._layer_bindings) == len(adapter.layers)
    bind(adapter, second, prompts, images)
    on_second = run_unet(second, inputs)
    assert torch.equal(run_unet(first, inputs), plain) and not torch.allclose(on_second, plain)

    adapter.detach(second.unet)
    adapter.attach(first.unet)
    bind(adapter, first, prompts, images)
    assert torch.equal(run_unet(first, inputs), on_second)


def test_the_projections_backward_builds_each_stacks_gradient_once_not_once_per_layer(
    backbone, pipeline_path, backward_ops
):
    """Every layer's keys and values are pieces of one product per head dim. Their gradients join in one
    concatenation, and equal those of each layer's own projection, also when some layers get none; a slice
    per layer would build a zero tensor the size of the whole product for each of the 2L pieces (for SDXL,
    140 fills and sums of a tensor that holds all 70 layers' keys and values)."""
    adapter = make_adapter(backbone, pipeline_path / "image_encoder")
    tokens = torch.randn(2, 6, adapter.config.encoder.token_dim)
    projected, stacks = adapter._project(tokens)
    with_values = list(projected)[::2]  # every layer's keys, every other layer's values: the rest get none

    def loss_of(pieces) -> Tensor:
        keys = sum(keys.square().sum() for keys, _ in pieces.values())
        return keys + sum(pieces[name][1].sum() for name in with_values)

    ops = backward_ops(loss_of(projected))
    for stack in stacks:
        stack_sized = [op for op, numel in ops if numel == stack.numel()]
        assert "aten.slice_backward.default" not in stack_sized
        assert stack_sized.count("aten.cat.default") == 1, stack_sized
        # The concatenation and the views and copy that take it back through the product: none per layer.
        assert len(stack_sized) < 2 * len(projected), stack_sized
    batched = {name: parameter.grad.clone() for name, parameter in adapter.layers.named_parameters()}
    adapter.layers.zero_grad()
    loss_of({key.replace("__", "."): layer(tokens) for key, layer in adapter.layers.items()}).backward()
    without = 0
    for name, parameter in adapter.layers.named_parameters():
        if parameter.grad is None:  # a value projection the loss does not use
            without += 1
            assert not batched[name].any(), name
        else:
            torch.testing.assert_close(batched[name], parameter.grad, rtol=1e-5, atol=1e-5)
    assert without == len(projected) - len(with_values)


def test_split_revision_takes_a_hub_revision_but_never_cuts_a_local_path(tmp_path):
    from nested.adapter import split_revision

    assert split_revision("me/faces@v1") == ("me/faces", "v1")
    assert split_revision("me/faces") == ("me/faces", None)
    local = tmp_path / "run@2"
    local.mkdir()
    assert split_revision(local) == (local, None)

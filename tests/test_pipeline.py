"""NestedPipeline on tiny SD / SDXL pipelines: multi-domain and multi-token subjects, guidance, caching, unload."""

from __future__ import annotations

import copy
import io
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from skimage import data as skimage_data

from nested import attention
from nested.adapter import AdapterConfig, NestedAdapter, cross_attention_layers
from nested.encoder import EncoderSpec
from nested.errors import ConfigError, DataError
from nested.image_files import ImageFileError, open_image
from nested.inference.pipeline import NestedPipeline
from nested.inference.subjects import Subject, load_image

PROMPT = "a <person> walking a <dog> on the beach"


def tiny_pipeline(path: Path):
    """A fresh tiny pipeline (SD or SDXL, from model_index.json), progress bar off."""
    cls = StableDiffusionXLPipeline if (Path(path) / "text_encoder_2").is_dir() else StableDiffusionPipeline
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt, seed=0, **kwargs):
    """3 guided steps at 64 x 64 px, as a (B, 3, 64, 64) tensor."""
    kwargs = {"num_inference_steps": 3, "guidance_scale": 5.0, "height": 64, "width": 64, **kwargs}
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=generator, output_type="pt", **kwargs).images


def write_bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A 200-byte PNG whose header claims ``width`` x ``height`` grey pixels: a decompression bomb (PIL refuses
    beyond 2 x MAX_IMAGE_PIXELS, about 179 M pixels, and only warns between MAX_IMAGE_PIXELS and that)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """The first half of a JPEG of scikit-image's astronaut: PIL says "image file is truncated"."""
    buffer = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def write_adapter(
    unet, path: Path, image_encoder: Path, token: str, class_word: str, seed: int, **kwargs
) -> Path:
    """A tiny adapter with visible effects at random init, and a learned placeholder embedding."""
    torch.manual_seed(seed)
    spec = EncoderSpec(backbone=str(image_encoder), num_tokens=6, width=32, depth=1, heads=2)
    adapter = NestedAdapter.for_unet(unet, token=token, class_word=class_word, encoder=spec, **kwargs)
    for layer in adapter.layers.values():
        torch.nn.init.normal_(layer.to_k.weight, std=0.5)
        torch.nn.init.normal_(layer.to_v.weight, std=0.5)
    names = ["text_encoder", "text_encoder_2"] if unet.config.cross_attention_dim == 64 else ["text_encoder"]
    for name in names:
        adapter.token_embeddings[f"{name}:{token}"] = torch.nn.Parameter(torch.randn(32), requires_grad=False)
    adapter.config.token_encoders = names
    return adapter.save_pretrained(path)


@pytest.fixture(scope="module")
def sd_adapters(tiny_sd_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-adapters")
    unet = tiny_pipeline(tiny_sd_path).unet
    encoder = tiny_sd_path / "image_encoder"
    return {
        "faces": write_adapter(unet, root / "faces", encoder, "<person>", "person", 1, domain="faces"),
        "pets": write_adapter(unet, root / "pets", encoder, "<dog>", "dog", 2, domain="pets"),
    }


@pytest.fixture(scope="module")
def sdxl_faces(tiny_sdxl_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-adapters")
    unet = tiny_pipeline(tiny_sdxl_path).unet
    return write_adapter(unet, root / "faces", tiny_sdxl_path / "image_encoder", "<person>", "person", 3)


@pytest.fixture
def sd_pipe(tiny_sd_path):
    return tiny_pipeline(tiny_sd_path)


def images(seed: int, count: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, 40, 40, generator=torch.Generator().manual_seed(seed))


def test_two_domain_adapters_combine_each_on_its_own_token(sd_pipe, sd_adapters):
    person, dog = images(1), images(2)
    with NestedPipeline(sd_pipe, {"<person>": sd_adapters["faces"], "<dog>": sd_adapters["pets"]}) as nested:
        assert nested.adapter("<person>") is not nested.adapter("<dog>")
        assert (
            nested.adapter("<person>").encoder.backbone is nested.adapter("<dog>").encoder.backbone
        )  # shared
        with pytest.warns(UserWarning, match="is in the prompt but has no subject") as warned:
            plain = generate(nested, PROMPT)  # placeholders, no subject bound
        assert sorted(str(w.message).split()[0] for w in warned) == ["'<dog>'", "'<person>'"]
        both = generate(nested, PROMPT, subjects={"<person>": person, "<dog>": dog})
        with pytest.warns(UserWarning, match="'<dog>' is in the prompt but has no subject"):
            person_only = generate(nested, PROMPT, subjects={"<person>": person})
        with pytest.warns(UserWarning, match="'<person>' is in the prompt but has no subject"):
            dog_only = generate(nested, PROMPT, subjects={"<dog>": dog})
    outputs = {"plain": plain, "both": both, "person": person_only, "dog": dog_only}
    for a in outputs:
        for b in outputs:
            if a < b:
                assert (outputs[a] - outputs[b]).abs().max() > 1e-3, f"{a} and {b} should differ"


def _attn_out(nested, layer, prompts, subjects, hidden, context):
    with nested.bind(prompts, subjects), torch.no_grad():
        return layer(hidden, encoder_hidden_states=context)


@pytest.mark.filterwarnings("ignore:'<dog>' is not in the prompts")
def test_swapping_the_dogs_image_leaves_the_persons_contribution_unchanged(sd_pipe, sd_adapters):
    """At one cross-attention layer: each subject adds its own term; the dog's image never enters the person's."""
    prompts = ["a <person> walking a <dog>", "a <person> on the beach"]
    person, dog_a, dog_b = images(1), images(2), images(3)
    with NestedPipeline(sd_pipe, {"<person>": sd_adapters["faces"], "<dog>": sd_adapters["pets"]}) as nested:
        name, layer = next(iter(cross_attention_layers(sd_pipe.unet).items()))
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(2, 64, layer.to_q.in_features, generator=generator)
        context = torch.randn(2, 77, layer.to_k.in_features, generator=generator)

        def out(subjects):
            return _attn_out(nested, layer, prompts, subjects, hidden, context)

        with torch.no_grad():
            plain = layer(hidden, encoder_hidden_states=context)
        person_a = out({"<person>": person, "<dog>": dog_a})
        person_b = out({"<person>": person, "<dog>": dog_b})
        no_person_a, no_person_b = out({"<dog>": dog_a}), out({"<dog>": dog_b})
        person_alone = out({"<person>": person})

    # The prompt without <dog>: bit-identical whichever dog is bound.
    assert torch.equal(person_a[1], person_b[1])
    # The prompt with both: the dog's image changes the output...
    assert (person_a[0] - person_b[0]).abs().max() > 1e-3
    # ...but the person's contribution (output with - without the person) is the same for both dogs,
    # and the same as with no dog at all: the difference is exactly the dog's own term.
    person_term = person_alone[0] - plain[0]
    assert person_term.abs().max() > 1e-3
    torch.testing.assert_close(person_a[0] - no_person_a[0], person_term, atol=1e-5, rtol=0)
    torch.testing.assert_close(person_b[0] - no_person_b[0], person_term, atol=1e-5, rtol=0)
    torch.testing.assert_close(person_a[0] - person_b[0], no_person_a[0] - no_person_b[0], atol=1e-5, rtol=0)


def test_one_adapter_serves_two_tokens_with_two_images(sd_pipe, sd_adapters):
    alice, bob = images(4), images(5)
    prompt = "a <person1> and a <person2> on the beach"
    faces = sd_adapters["faces"]
    with NestedPipeline(sd_pipe, {"<person1>": faces, "<person2>": faces}) as nested:
        assert nested.adapter("<person1>") is nested.adapter("<person2>")  # loaded once
        tokenizer, text_encoder = sd_pipe.tokenizer, sd_pipe.text_encoder
        learned = nested.adapter("<person1>").token_embeddings["text_encoder:<person>"]
        for token in ("<person1>", "<person2>"):
            (token_id,) = tokenizer(token, add_special_tokens=False).input_ids
            assert torch.equal(text_encoder.get_input_embeddings().weight[token_id], learned)
        ab = generate(nested, prompt, subjects={"<person1>": alice, "<person2>": bob})
        ba = generate(nested, prompt, subjects={"<person1>": bob, "<person2>": alice})
        aa = generate(nested, prompt, subjects={"<person1>": alice, "<person2>": alice})
    assert (ab - ba).abs().max() > 1e-3 and (ab - aa).abs().max() > 1e-3


def test_same_seed_is_identical_and_unload_restores_the_pipeline_exactly(tiny_sdxl_path, sdxl_faces):
    pipe = tiny_pipeline(tiny_sdxl_path)
    untouched = tiny_pipeline(tiny_sdxl_path)
    prompt = "a photo of a <person> in the snow"
    before = generate(pipe, prompt)
    processors = {name: attn.processor for name, attn in cross_attention_layers(pipe.unet).items()}

    nested = NestedPipeline.from_pretrained(
        tiny_sdxl_path, {"<person>": sdxl_faces}
    )  # the hub/path entry point
    assert type(nested.pipe) is StableDiffusionXLPipeline
    nested = NestedPipeline(pipe, {"<person>": sdxl_faces})
    assert (
        len(pipe.tokenizer) == len(untouched.tokenizer) + 1
        and len(pipe.tokenizer_2) == len(untouched.tokenizer_2) + 1
    )
    first = generate(nested, prompt, subjects={"<person>": images(6)})
    second = generate(nested, prompt, subjects={"<person>": images(6)})
    assert torch.equal(first, second)
    assert (first - before).abs().max() > 1e-3

    nested.unload()
    assert torch.equal(generate(pipe, prompt), before)
    assert torch.equal(generate(pipe, prompt), generate(untouched, prompt))
    assert {name: attn.processor for name, attn in cross_attention_layers(pipe.unet).items()} == processors
    assert not pipe.unet._forward_pre_hooks
    for attr in ("tokenizer", "tokenizer_2"):
        assert getattr(pipe, attr).get_vocab() == getattr(untouched, attr).get_vocab()
    for attr in ("text_encoder", "text_encoder_2"):
        mine, theirs = getattr(pipe, attr), getattr(untouched, attr)
        assert mine.config.to_dict() == theirs.config.to_dict()
        assert mine.state_dict().keys() == theirs.state_dict().keys()
        assert all(torch.equal(mine.state_dict()[k], v) for k, v in theirs.state_dict().items())


def test_guidance_keeps_the_unconditional_half_plain(sd_pipe, sd_adapters):
    outputs = []
    sd_pipe.unet.register_forward_hook(lambda module, args, kwargs_out: outputs.append(kwargs_out[0]))
    prompt = "a <person> on the beach"
    with NestedPipeline(sd_pipe, {"<person>": sd_adapters["faces"]}) as nested:
        with pytest.warns(UserWarning, match="has no subject"):
            generate(nested, prompt, negative_prompt="lowres, bad anatomy")
        plain_first_step = outputs[0]
        outputs.clear()
        generate(nested, prompt, subjects={"<person>": images(7)}, negative_prompt="lowres, bad anatomy")
    nested_first_step = outputs[0]
    assert nested_first_step.shape[0] == 2  # cat([unconditional, conditional])
    assert torch.equal(nested_first_step[0], plain_first_step[0])  # no nested work on the negative prompt
    assert (nested_first_step[1] - plain_first_step[1]).abs().max() > 1e-4


def test_num_images_per_prompt_and_one_image_per_prompt(sd_pipe, sd_adapters):
    prompts = ["a <person> on the beach", "a <person> in the snow"]
    alice, bob = images(8), images(9)
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with NestedPipeline(sd_pipe, {"<person>": sd_adapters["faces"]}) as nested:
        batch = generate(
            nested, prompts, subjects={"<person>": [alice, bob]}, num_images_per_prompt=2, latents=latents
        )
        first = generate(
            nested, prompts[0], subjects={"<person>": alice}, num_images_per_prompt=2, latents=latents[:2]
        )
        second = generate(
            nested, prompts[1], subjects={"<person>": bob}, num_images_per_prompt=2, latents=latents[2:]
        )
    assert batch.shape[0] == 4
    torch.testing.assert_close(batch[:2], first, atol=1e-4, rtol=0)
    torch.testing.assert_close(batch[2:], second, atol=1e-4, rtol=0)


def test_encoder_and_nested_kv_are_computed_once_per_call(sd_pipe, sd_adapters):
    with NestedPipeline(sd_pipe, {"<person>": sd_adapters["faces"], "<dog>": sd_adapters["pets"]}) as nested:
        encoder_calls, layer_calls, unet_calls = [], [], []
        for token in ("<person>", "<dog>"):
            adapter = nested.adapter(token)
            adapter.encoder.register_forward_hook(lambda m, args, out: encoder_calls.append(args[0].shape[0]))
            project = adapter._project
            adapter._project = lambda tokens, project=project: layer_calls.append(1) or project(tokens)
        sd_pipe.unet.register_forward_pre_hook(lambda m, args: unet_calls.append(1))
        generate(nested, PROMPT, subjects={"<person>": images(1), "<dog>": images(2)}, num_inference_steps=4)
    assert len(unet_calls) == 4
    assert encoder_calls == [1, 1]  # one image per subject, once per call
    assert len(layer_calls) == 2  # every layer's keys and values once per subject


def test_strength_token_weight_and_value_norm_factor(sd_pipe, sd_adapters, monkeypatch):
    # What every bound cross-attention layer computes with: (scale, token_weight, value_norm_factor).
    used = set()
    compute = attention.nested_attention_subjects

    def record(query, key, value, subjects, *args, **kwargs):
        used.update((s.scale, s.token_weight, s.value_norm_factor) for s in subjects)
        return compute(query, key, value, subjects, *args, **kwargs)

    monkeypatch.setattr(attention, "nested_attention_subjects", record)
    prompt, person = "a <person> on the beach", images(10)
    results = {}
    with NestedPipeline(sd_pipe, {"<person>": sd_adapters["faces"]}) as nested:
        assert nested.adapter("<person>").config.value_norm_factor is None  # the adapter's default

        def run(name, **kwargs):
            used.clear()
            results[name] = (generate(nested, prompt, **kwargs), set(used))

        with pytest.warns(UserWarning, match="has no subject"):
            run("plain")
        for option in ("strengths", "token_weights", "value_norm_factors"):  # no subject to apply it to
            with pytest.raises(
                ConfigError, match=f"{option} has an entry for '<person>', which has no subject"
            ):
                generate(nested, prompt, **{option: {"<person>": 2.0}})
        run("full", subjects={"<person>": person})
        run("off", subjects={"<person>": person}, strengths={"<person>": 0.0})
        run("half", subjects={"<person>": Subject(person, scale=0.5)})
        run("weighted", subjects={"<person>": person}, token_weights={"<person>": 3.0})
        run("normed", subjects={"<person>": person}, value_norm_factors={"<person>": 2.0})
        # Each option given per call acts as the same setting on the Subject.
        run("weighted_subject", subjects={"<person>": Subject(person, token_weight=3.0)})
        run("normed_subject", subjects={"<person>": Subject(person, value_norm_factor=2.0)})
    assert {name: settings for name, (_, settings) in results.items()} == {
        "plain": set(),
        "full": {(1.0, 1.0, None)},
        "off": {(0.0, 1.0, None)},
        "half": {(0.5, 1.0, None)},
        "weighted": {(1.0, 3.0, None)},
        "normed": {(1.0, 1.0, 2.0)},
        "weighted_subject": {(1.0, 3.0, None)},
        "normed_subject": {(1.0, 1.0, 2.0)},
    }
    out = {name: image for name, (image, _) in results.items()}
    torch.testing.assert_close(out["off"], out["plain"], atol=1e-5, rtol=0)
    for name in ("half", "weighted", "normed"):
        assert (out[name] - out["full"]).abs().max() > 1e-4, name
    assert (out["half"] - out["plain"]).abs().max() > 1e-4
    assert (out["weighted"] - out["normed"]).abs().max() > 1e-4
    assert torch.equal(out["weighted"], out["weighted_subject"])
    assert torch.equal(out["normed"], out["normed_subject"])


def test_default_size_is_the_side_the_pipeline_draws_without_one(sd_pipe, sd_adapters):
    with NestedPipeline(sd_pipe, {"<person>": sd_adapters["faces"]}) as nested:
        image = nested("a photo of a dog", num_inference_steps=1, output_type="pt").images
    assert image.shape[-2:] == (nested.default_size, nested.default_size)
    assert nested.default_size == sd_pipe.unet.config.sample_size * sd_pipe.vae_scale_factor


def test_an_adapter_trained_with_a_token_weight_uses_it_unless_a_call_sets_one(
    sd_pipe, sd_adapters, tmp_path
):
    import json
    import shutil

    prompt, person = "a <person> on the beach", images(10)
    trained_at_3 = shutil.copytree(sd_adapters["faces"], tmp_path / "faces-tw3")
    config = json.loads((trained_at_3 / "adapter_config.json").read_text())
    assert config["token_weight"] == 1.0  # the default, recorded
    legacy = {
        key: value for key, value in config.items() if key != "token_weight"
    }  # a config without the key
    assert AdapterConfig.from_dict(legacy).token_weight == 1.0
    (trained_at_3 / "adapter_config.json").write_text(json.dumps({**config, "token_weight": 3.0}))
    subjects = {"<person>": person}
    with NestedPipeline(sd_pipe, {"<person>": sd_adapters["faces"]}) as nested:
        weight_1 = generate(nested, prompt, subjects=subjects)
        weight_3 = generate(nested, prompt, subjects=subjects, token_weights={"<person>": 3.0})
    with NestedPipeline(sd_pipe, {"<person>": trained_at_3}) as nested:
        assert nested.adapter("<person>").config.token_weight == 3.0
        torch.testing.assert_close(generate(nested, prompt, subjects=subjects), weight_3)
        overridden = generate(nested, prompt, subjects={"<person>": Subject(person, token_weight=1.0)})
        torch.testing.assert_close(overridden, weight_1)
    assert (weight_3 - weight_1).abs().max() > 1e-4


def test_images_from_paths_pil_and_tensors(tmp_path):
    from PIL import Image

    array = (torch.rand(20, 30, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(array).save(tmp_path / "subject.png")
    from_path = load_image(tmp_path / "subject.png")
    from_pil = load_image(Image.open(tmp_path / "subject.png"))
    from_uint8 = load_image(torch.from_numpy(array).permute(2, 0, 1))
    assert (
        from_path.shape == (1, 3, 20, 30)
        and torch.equal(from_path, from_pil)
        and torch.equal(from_path, from_uint8)
    )
    assert from_path.min() >= 0 and from_path.max() <= 1
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        load_image(torch.randn(3, 8, 8) * 5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.jpg", "<dog>")

    # A photo given as a PIL image is read as its file is: upright by its EXIF tag, transparency on white.
    rgba = torch.cat([torch.from_numpy(array), torch.zeros(20, 30, 1, dtype=torch.uint8)], -1)
    rgba[:10, :, 3] = 255  # the bottom half is transparent
    Image.fromarray(rgba.numpy(), "RGBA").save(tmp_path / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to view
    Image.fromarray(array).save(tmp_path / "camera.png", exif=exif)
    for name in ("rgba.png", "camera.png"):
        from_path = load_image(tmp_path / name)
        assert torch.equal(load_image(Image.open(tmp_path / name)), from_path), name
    assert from_path.shape == (1, 3, 30, 20)  # the camera's photo, upright
    assert (load_image(tmp_path / "rgba.png")[0, :, 10:] == 1).all()  # white


def test_clear_errors(sd_pipe, sd_adapters, sdxl_faces, tmp_path):
    with NestedPipeline(sd_pipe, {"<person>": sd_adapters["faces"]}) as nested:
        with pytest.raises(ValueError, match=r"'<person>' is not in the prompt 'a dog on the beach'"):
            generate(nested, "a dog on the beach", subjects={"<person>": images(1)})
        with pytest.raises(ValueError, match=r"no adapter is loaded for token '<dog>' \(loaded: <person>\)"):
            generate(nested, PROMPT, subjects={"<dog>": images(1)})
        with pytest.raises(FileNotFoundError, match="the image for <person> does not exist"):
            generate(nested, PROMPT, subjects={"<person>": tmp_path / "nope.jpg"})
        with pytest.raises(ValueError, match="strengths has an entry for '<dog>'"):
            generate(nested, PROMPT, subjects={"<person>": images(1)}, strengths={"<dog>": 0.5})
        with pytest.raises(ValueError, match="already has an adapter"):
            nested.load_adapter("<person>", sd_adapters["pets"])
        vocab = len(sd_pipe.tokenizer)
        with pytest.raises(ValueError, match=r"'<kid>' .* does not fit this base model: .*layer"):
            nested.load_adapter("<kid>", sdxl_faces)  # made for the SDXL UNet
        assert len(sd_pipe.tokenizer) == vocab and nested.tokens == ["<person>"]  # nothing half-loaded


def test_a_later_set_attn_processor_does_not_drop_the_adapters(sd_pipe, sd_adapters):
    prompt, person = "a <person> on the beach", images(11)
    with NestedPipeline(sd_pipe, {"<person>": sd_adapters["faces"]}) as nested:
        expected = generate(nested, prompt, subjects={"<person>": person})
        sd_pipe.unet.set_attn_processor(AttnProcessor2_0())  # e.g. a user enabling another attention backend
        with pytest.warns(UserWarning, match="re-attaching"):
            again = generate(nested, prompt, subjects={"<person>": person})
    torch.testing.assert_close(again, expected, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(sd_pipe, prompt)  # unloaded: no more re-attaching


def test_describe_lists_sources(sd_pipe, sd_adapters):
    with NestedPipeline(sd_pipe) as nested:
        nested.load_adapter("<person>", sd_adapters["faces"])
        nested.load_adapter("man", copy.deepcopy(NestedAdapter.from_pretrained(sd_adapters["faces"])))
        info = nested.describe()
    assert info["<person>"]["domain"] == "faces" and info["<person>"]["placeholder_added"]
    assert info["man"]["source"] == "<object>" and not info["man"]["placeholder_added"]  # a vocabulary word


def test_unload_restores_a_token_the_pipeline_already_had(sd_pipe, sd_adapters):
    from nested.tokens import add_placeholder_token

    token_id = add_placeholder_token(
        sd_pipe.tokenizer, sd_pipe.text_encoder, "<person>", "man"
    )  # e.g. a user's TI
    embeddings = sd_pipe.text_encoder.get_input_embeddings()
    users_row, vocab = embeddings.weight[token_id].clone(), len(sd_pipe.tokenizer)
    with NestedPipeline(sd_pipe, {"<person>": sd_adapters["faces"]}) as nested:
        learned = nested.adapter("<person>").token_embeddings["text_encoder:<person>"]
        assert torch.equal(sd_pipe.text_encoder.get_input_embeddings().weight[token_id], learned)
    assert torch.equal(sd_pipe.text_encoder.get_input_embeddings().weight[token_id], users_row)
    assert len(sd_pipe.tokenizer) == vocab


def test_non_finite_numbers_are_refused_and_a_strength_outside_its_range_warns(sd_pipe, sd_adapters):
    prompt, person = "a <person> on the beach", images(12)
    with NestedPipeline(sd_pipe, {"<person>": sd_adapters["faces"]}) as nested:
        for option, value in [
            ("strengths", float("nan")),
            ("strengths", float("inf")),
            ("token_weights", float("inf")),
            ("value_norm_factors", float("-inf")),
        ]:
            message = rf"{option}\['<person>'\] must be a finite number, got {value}"
            with pytest.raises(ConfigError, match=message):  # before NaN turns the image black
                generate(nested, prompt, subjects={"<person>": person}, **{option: {"<person>": value}})
        for field in ("scale", "token_weight", "value_norm_factor"):
            with pytest.raises(ConfigError, match=f"{field} must be a finite number, got nan"):
                Subject(person, **{field: float("nan")})

        with pytest.warns(UserWarning, match=r"the strength of '<person>' \(2.5\) is outside \[0, 2\]"):
            generate(
                nested,
                prompt,
                subjects={"<person>": person},
                strengths={"<person>": 2.5},
                num_inference_steps=1,
            )
        with pytest.warns(UserWarning, match=r"the strength of '<person>' \(-0.5\) is outside"):
            generate(
                nested, prompt, subjects={"<person>": Subject(person, scale=-0.5)}, num_inference_steps=1
            )
        with pytest.warns(UserWarning, match=r"'<person>' is in the prompt but has no subject"):
            generate(nested, prompt, num_inference_steps=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            generate(
                nested,
                prompt,
                subjects={"<person>": person},
                strengths={"<person>": 1.5},
                num_inference_steps=1,
            )
            generate(nested, "a person on the beach", num_inference_steps=1)  # the base model's prompt


def test_image_files_are_decoded_and_checked_and_a_bad_one_is_named(tmp_path):
    cat = skimage_data.chelsea()  # 300 x 451 RGB
    Image.fromarray(cat).save(tmp_path / "cat.png")
    loaded = load_image(tmp_path / "cat.png")
    assert torch.equal(loaded, torch.from_numpy(cat).permute(2, 0, 1)[None].float() / 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(cat).save(tmp_path / "turned.jpg", exif=exif)
    opened = open_image(tmp_path / "turned.jpg")
    assert opened.bytes_differ and opened.format == "JPEG" and opened.rgb.size == (300, 451)

    write_bomb_png(tmp_path / "bomb.png")
    write_bomb_png(tmp_path / "big.png", 10000, 10000)  # PIL only warns here, then would decode 100 M pixels
    write_truncated_jpeg(tmp_path / "truncated.jpg")
    (tmp_path / "text.png").write_text("not an image")
    for name, reason in [
        ("bomb.png", "Image size (400000000 pixels) exceeds limit of 178956970 pixels"),
        ("big.png", "decompression bomb: 10000x10000 is more than PIL's Image.MAX_IMAGE_PIXELS (89478485)"),
        ("truncated.jpg", "unreadable image: the file is damaged (image file is truncated"),
        ("text.png", "unreadable image: not an image file PIL can read"),
    ]:
        with pytest.raises(ImageFileError) as caught:
            load_image(tmp_path / name, "<person>")
        assert isinstance(caught.value, DataError) and caught.value.path == tmp_path / name
        assert str(caught.value).startswith(f"cannot use the image '{tmp_path / name}': ") and reason in str(
            caught.value
        )
    with pytest.raises(ImageFileError, match=r"too many pixels: 451x300 > 1000"):
        open_image(tmp_path / "cat.png", max_pixels=1000)


def test_unload_after_the_pipeline_moved_to_another_dtype_gives_that_dtypes_plain_pipeline(
    tiny_sd_path, sd_adapters
):
    pipe = tiny_pipeline(tiny_sd_path)
    nested = NestedPipeline(pipe, {"<person>": sd_adapters["faces"]})
    pipe.to(torch.bfloat16)
    assert generate(nested, "a <person> on a beach", subjects={"<person>": images(1)}).shape == (1, 3, 64, 64)
    nested.unload()
    assert pipe.text_encoder.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.equal(
        generate(pipe, PROMPT), generate(tiny_pipeline(tiny_sd_path).to(torch.bfloat16), PROMPT)
    )


def write_ip_adapter(unet, folder: Path, image_embedding_width: int = 16) -> Path:
    """A tiny random IP-Adapter file in diffusers' layout (image projection + per-layer to_k_ip / to_v_ip)."""
    from safetensors.torch import save_file

    width = unet.config.cross_attention_dim
    state = {
        "image_proj.proj.weight": torch.randn(4 * width, image_embedding_width) * 0.1,
        "image_proj.proj.bias": torch.zeros(4 * width),
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    for index, attn in enumerate(cross_attention_layers(unet).values()):
        for name in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * index + 1}.{name}.weight"] = (
                torch.randn(attn.to_k.out_features, width) * 0.1
            )
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "ip-adapter.safetensors")
    return folder


def test_a_diffusers_ip_adapter_and_nested_adapters_are_refused_together(tiny_sd_path, sd_adapters, tmp_path):
    pipe = tiny_pipeline(tiny_sd_path)
    ip_adapter = write_ip_adapter(pipe.unet, tmp_path / "ip")

    def load_ip_adapter():
        pipe.load_ip_adapter(
            str(ip_adapter), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None
        )

    message = r"runs diffusers' IPAdapterAttnProcessor2_0: an IP-Adapter .* call unload_ip_adapter\(\) on the pipeline"
    load_ip_adapter()
    with pytest.raises(ConfigError, match=message):
        NestedPipeline(pipe, {"<person>": sd_adapters["faces"]})
    pipe.unload_ip_adapter()
    nested = NestedPipeline(pipe, {"<person>": sd_adapters["faces"]})
    load_ip_adapter()  # after the nested adapters: refused at the next call
    embeds = [torch.randn(2, 1, 16)]
    with pytest.raises(ConfigError, match=message):
        generate(nested, "a <person>", subjects={"<person>": images(1)}, ip_adapter_image_embeds=embeds)
    pipe.unload_ip_adapter()
    with pytest.warns(UserWarning, match="re-attaching them"):
        generate(nested, "a <person>", subjects={"<person>": images(1)})


def test_pipelines_with_extra_guidance_batches_are_refused(sd_pipe, sd_adapters):
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPAGPipeline

    perturbed = StableDiffusionPAGPipeline(**sd_pipe.components, pag_applied_layers=["mid"])
    instruct = StableDiffusionInstructPix2PixPipeline(**sd_pipe.components)
    for pipe in (perturbed, instruct):
        with pytest.raises(
            ConfigError, match=f"^{type(pipe).__name__} runs its denoiser on extra guidance batches"
        ):
            NestedPipeline(pipe, {"<person>": sd_adapters["faces"]})


def test_img2img_and_inpainting_pipelines_bind_subjects_like_text_to_image(sd_pipe, sd_adapters):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    start = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    calls = {
        StableDiffusionImg2ImgPipeline: {"image": start, "strength": 0.75},
        StableDiffusionInpaintPipeline: {"image": start, "mask_image": mask, "strength": 0.75},
    }
    prompt, plain_prompt = "a <person> on the beach", "a person on the beach"
    for cls, inputs in calls.items():
        pipe = cls(**sd_pipe.components)
        pipe.set_progress_bar_config(disable=True)
        plain = generate(pipe, plain_prompt, **inputs)
        with NestedPipeline(pipe, {"<person>": sd_adapters["faces"]}) as nested:
            assert torch.equal(generate(nested, plain_prompt, **inputs), plain)
            with pytest.warns(UserWarning, match="is in the prompt but has no subject"):
                without = generate(nested, prompt, **inputs)
            personalised = generate(nested, prompt, subjects={"<person>": images(1)}, **inputs)
        assert (personalised - without).abs().max() > 1e-3, cls.__name__
        assert torch.equal(generate(pipe, plain_prompt, **inputs), plain)  # unloaded


def test_a_lora_on_the_unets_attention_works_beside_the_adapters(tiny_sd_path, sd_adapters):
    """A LoRA as diffusers' load_lora_weights adds it (peft layers on to_q / to_k / to_v / to_out): the nested
    layers call the wrapped projections, and the call's LoRA scale still reaches them."""
    peft = pytest.importorskip("peft", reason="peft (the dev extra) loads LoRAs into diffusers models")
    pipe = tiny_pipeline(tiny_sd_path)
    plain = generate(pipe, "a person on the beach")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    pipe.unet.add_adapter(config, adapter_name="style")
    styled = generate(pipe, "a person on the beach")
    assert (styled - plain).abs().max() > 1e-3
    with NestedPipeline(pipe, {"<person>": sd_adapters["faces"]}) as nested:
        assert torch.equal(generate(nested, "a person on the beach"), styled)
        subject = {"<person>": images(1)}
        with_lora = generate(nested, "a <person> on the beach", subjects=subject)
        without_lora = generate(
            nested, "a <person> on the beach", subjects=subject, cross_attention_kwargs={"scale": 0.0}
        )
        assert (with_lora - without_lora).abs().max() > 1e-3
    pipe.unet.disable_adapters()
    assert torch.equal(generate(pipe, "a person on the beach"), plain)

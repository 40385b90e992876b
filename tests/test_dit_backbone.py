"""Tiny SD3.5-like and FLUX-like diffusers folders, and the transformer backbones loaded from them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from skimage.data import astronaut
from transformers import T5TokenizerFast

from nested.adapter import NestedAdapter, SubjectBinding
from nested.backbone import DiffusionBackbone, TransformerBackbone, load_backbone
from nested.data.transforms import contains_subject
from nested.encoder import EncoderSpec
from nested.errors import ConfigError, MissingFileError
from nested.testing import build_tiny_t5_vocab, write_hub_cache, write_tiny_t5_tokenizer
from nested.tokens import add_placeholder_token, subject_masks

PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}


@pytest.fixture
def tiny_dit_path(request, tiny_sd3_path, tiny_flux_path):
    return {"sd3": tiny_sd3_path, "flux": tiny_flux_path}[request.param]


# ---------------------------------------------------------------------------- the tiny folders
def test_t5_tokenizer_reloads_with_its_vocabulary_and_splits_a_placeholder(tmp_path):
    write_tiny_t5_tokenizer(tmp_path / "t5")
    tokenizer = T5TokenizerFast.from_pretrained(tmp_path / "t5")
    assert len(tokenizer) == len(build_tiny_t5_vocab()) > 400
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.tokenize("a photo of <person>") == ["▁a", "▁photo", "▁of", "▁", "<", "person", ">"]
    ids = tokenizer("a dog").input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    # Missing files offline give transformers' tiny fallback tokenizer, not an error: what the size check is for.
    (tmp_path / "t5" / "tokenizer.json").unlink()
    assert len(T5TokenizerFast.from_pretrained(tmp_path / "t5")) < 10


@pytest.mark.parametrize("tiny_dit_path", ["sd3", "flux"], indirect=True)
def test_tiny_folder_generates_with_the_diffusers_pipeline(tiny_dit_path):
    kind = tiny_dit_path.name.removeprefix("tiny-")
    pipeline = PIPELINES[kind].from_pretrained(tiny_dit_path)
    assert pipeline.vae.config.latent_channels == 16
    t5 = pipeline.tokenizer_3 if kind == "sd3" else pipeline.tokenizer_2
    assert isinstance(t5, T5TokenizerFast) and len(t5) == len(build_tiny_t5_vocab())
    if kind == "flux":
        assert pipeline.transformer.config.guidance_embeds

    def generate(prompt: str) -> np.ndarray:
        return pipeline(
            prompt,
            height=32,
            width=32,
            num_inference_steps=2,
            max_sequence_length=32,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]

    image = generate("a photo of a dog")
    assert image.shape == (32, 32, 3) and np.isfinite(image).all() and image.std() > 0.01
    assert not np.array_equal(image, generate("a red car at night"))  # the text reaches the image


# ---------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def sd3(tiny_sd3_path) -> TransformerBackbone:
    return TransformerBackbone.from_pretrained(tiny_sd3_path)


@pytest.fixture(scope="module")
def flux(tiny_flux_path) -> TransformerBackbone:
    return TransformerBackbone.from_pretrained(tiny_flux_path)


def test_components_and_kinds(sd3, flux, tiny_sd_path, tiny_sd3_path):
    assert (sd3.kind, flux.kind) == ("sd3", "flux")
    assert [type(t).__name__ for t in sd3.text_encoders] == [
        "CLIPTextModelWithProjection",
        "CLIPTextModelWithProjection",
        "T5EncoderModel",
    ]
    assert [type(t).__name__ for t in flux.text_encoders] == ["CLIPTextModel", "T5EncoderModel"]
    assert isinstance(sd3.noise_scheduler, FlowMatchEulerDiscreteScheduler)
    assert flux.noise_scheduler.config.use_dynamic_shifting
    assert (sd3.max_sequence_length, flux.max_sequence_length) == (256, 512)  # the pipelines' defaults
    assert (sd3.text_length, flux.text_length) == (77 + 256, 512)
    assert not any(p.requires_grad for p in sd3.transformer.parameters())
    assert isinstance(load_backbone(tiny_sd3_path), TransformerBackbone)
    assert isinstance(load_backbone(tiny_sd_path), DiffusionBackbone)


def test_guidance_only_for_a_guidance_distilled_transformer(sd3, flux):
    assert sd3.guidance(2, 3.5) is None
    guidance = flux.guidance(2, 3.5)
    assert guidance.dtype == torch.float32 and guidance.tolist() == [3.5, 3.5]


def test_latents_have_16_channels_and_the_vae_shift(flux):
    image = torch.from_numpy(astronaut()[::16, ::16].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    latents = flux.encode_images(image, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (1, 16, 8, 8)
    config = flux.vae.config
    assert config.shift_factor == 0.1159
    zero = flux.latent_scaling(torch.zeros(1))
    assert zero.item() == pytest.approx(-config.shift_factor * config.scaling_factor)
    torch.testing.assert_close(flux.latent_unscaling(flux.latent_scaling(latents)), latents)


def test_a_unet_loader_on_a_transformer_folder_names_the_right_loader(tiny_sd3_path):
    with pytest.raises(ConfigError, match="SD3Transformer2DModel.*TransformerBackbone.from_pretrained"):
        DiffusionBackbone.from_pretrained(tiny_sd3_path)


def test_missing_t5_tokenizer_files_are_refused_naming_the_folder(tiny_flux_path, tmp_path):
    path = shutil.copytree(tiny_flux_path, tmp_path / "flux")
    (path / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=f"tokenizer at {path}/tokenizer_2 has .* tokens.*are missing"):
        TransformerBackbone.from_pretrained(path)


def test_missing_transformer_weights_are_refused_naming_the_subfolder(tiny_sd3_path, tmp_path):
    path = shutil.copytree(tiny_sd3_path, tmp_path / "sd3")
    (path / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingFileError, match=f"^{path} has no weights in transformer/"):
        TransformerBackbone.from_pretrained(path)


def test_a_t5_length_beyond_the_tokenizer_is_refused(tiny_sd3_path):
    with pytest.raises(ConfigError, match="max_sequence_length 600 exceeds .* 512 .*tokenizer_3"):
        TransformerBackbone.from_pretrained(tiny_sd3_path, max_sequence_length=600)


# ---------------------------------------------------------------------------- text conditioning
PROMPTS = ["a photo of <person> at the beach", "a sketch of a dog, smiling"]


@pytest.mark.parametrize("length", [None, 40])
def test_sd3_prompt_encoding_equals_the_pipelines(tiny_sd3_path, length):
    backbone = TransformerBackbone.from_pretrained(tiny_sd3_path, max_sequence_length=length)
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS)
        embeds, _, pooled, _ = pipeline.encode_prompt(
            PROMPTS,
            None,
            None,
            do_classifier_free_guidance=False,
            max_sequence_length=backbone.max_sequence_length,
        )
    # CLIP-L (16) + CLIP-G (32) zero-padded to T5's width 64, then T5's tokens
    assert cond.prompt_embeds.shape == (2, backbone.text_length, 64)
    assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.pooled_prompt_embeds, pooled)
    assert cond.pooled_prompt_embeds.shape == (2, 16 + 32)
    assert not cond.prompt_embeds[:, :77, 48:].any()


@pytest.mark.parametrize("length", [None, 40])
def test_flux_prompt_encoding_equals_the_pipelines(tiny_flux_path, length):
    backbone = TransformerBackbone.from_pretrained(tiny_flux_path, max_sequence_length=length)
    pipeline = FluxPipeline.from_pretrained(tiny_flux_path)
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS)
        embeds, pooled, text_ids = pipeline.encode_prompt(
            PROMPTS, None, max_sequence_length=backbone.max_sequence_length
        )
    assert cond.prompt_embeds.shape == (2, backbone.text_length, 32)
    assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.pooled_prompt_embeds, pooled)
    assert torch.equal(cond.text_ids, text_ids)


def marked_pieces(backbone, prompts, token) -> list[list[list[str]]]:
    """Per prompt: the pieces marked in each part of the joint text sequence (SD3: CLIP, T5; FLUX: T5)."""
    masks = backbone.subject_masks(prompts, token)
    assert masks.shape == (len(prompts), backbone.text_length)
    parts = [(backbone.tokenizers[-1], backbone.tokenize(prompts)[-1])]
    if backbone.kind == "sd3":
        parts.insert(0, (backbone.tokenizers[0], backbone.tokenize(prompts)[0]))
    result = []
    for row in range(len(prompts)):
        start, pieces = 0, []
        for tokenizer, ids in parts:
            part = masks[row, start : start + ids.shape[1]]
            pieces.append(tokenizer.convert_ids_to_tokens(ids[row][part].tolist()))
            start += ids.shape[1]
        result.append(pieces)
    return result


def test_sd3_subject_mask_marks_every_t5_piece_of_a_placeholder(sd3):
    prompts = ["a photo of <person> at the beach", "a dog", "<person> and <person>"]
    t5_pieces = ["▁", "<", "person", ">"]
    assert marked_pieces(sd3, prompts, "<person>") == [
        [["<</w>", "person</w>", "></w>"], t5_pieces],
        [[], []],
        [["<</w>", "person</w>", "></w>"] * 2, t5_pieces * 2],
    ]


def test_subject_mask_with_a_one_token_clip_placeholder(tiny_sd3_path):
    backbone = TransformerBackbone.from_pretrained(tiny_sd3_path, max_sequence_length=32)
    for tokenizer, text_encoder in zip(backbone.tokenizers[:2], backbone.text_encoders[:2], strict=True):
        add_placeholder_token(tokenizer, text_encoder, "<person>", "person")
    masks = backbone.subject_masks(["a photo of <person>, smiling"], "<person>")
    assert masks[0, :77].nonzero().flatten().tolist() == [4]  # BOS a photo of <person>
    assert masks[0, 77:].nonzero().flatten().tolist() == [3, 4, 5, 6]  # ▁a ▁photo ▁of ▁ < person > ,


def test_t5_and_clip_masks_and_the_caption_rule_agree_on_what_a_whole_word_is(tiny_sd3_path):
    """CLIP's tokenizer cuts runs of letters and single digits: ``person2`` holds the word ``person``, so T5's
    mask and the data's caption rule must find it there too, and none of them in ``persons`` or in
    ``superperson`` (which CLIP's BPE ends with the piece ``person</w>``)."""
    backbone = TransformerBackbone.from_pretrained(tiny_sd3_path, max_sequence_length=32)
    prompts = [
        "person2 smiles",
        "a 2person",
        "x3person4",
        "persons",
        "personé",
        "(person)",
        "person_x",
        "superperson",
    ]
    masks = backbone.subject_masks(prompts, "person")
    clip_found, t5_found = masks[:, :77].any(1).tolist(), masks[:, 77:].any(1).tolist()
    assert clip_found == [True, True, True, False, False, True, True, False]
    assert t5_found == clip_found
    assert [contains_subject(prompt, "person") for prompt in prompts] == clip_found
    # CLIP cuts the contractions 's 't 're 've 'm 'll 'd off first: "'dog'" is "'d og '", without the word.
    prompts = ["a 'dog' here", "the dog's bone", "a 'person' here"]
    for token, found in (("dog", [False, True, False]), ("person", [False, False, True])):
        masks = backbone.subject_masks(prompts, token)
        assert masks[:, :77].any(1).tolist() == masks[:, 77:].any(1).tolist() == found, token
        assert [contains_subject(prompt, token) for prompt in prompts] == found, token


def test_flux_subject_mask_is_the_t5_sequence_and_whole_words_only(flux):
    prompts = ["a person, smiling", "two persons", "a person and a person."]
    assert marked_pieces(flux, prompts, "person") == [[["▁person"]], [[]], [["▁person", "▁person"]]]


# ---------------------------------------------------------------------------- nested attention on top
def make_adapter(backbone: TransformerBackbone, folder) -> NestedAdapter:
    torch.manual_seed(0)
    spec = EncoderSpec(backbone=str(folder / "image_encoder"), num_tokens=6, width=32, depth=1, heads=2)
    adapter = NestedAdapter.for_unet(backbone.transformer, token="<person>", encoder=spec)
    for layer in adapter.layers.values():  # visible effects at random init
        torch.nn.init.normal_(layer.to_k.weight, std=0.5)
        torch.nn.init.normal_(layer.to_v.weight, std=0.5)
    return adapter.eval()


def denoise(backbone: TransformerBackbone, prompts: list[str]) -> torch.Tensor:
    """One transformer call on fixed noise for 32 x 32 px images, conditioned on ``prompts``."""
    batch = len(prompts)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cond = backbone.encode_prompts(prompts)
        if backbone.kind == "sd3":
            return backbone.transformer(
                hidden_states=torch.randn(batch, 16, 8, 8, generator=generator),
                encoder_hidden_states=cond.prompt_embeds,
                pooled_projections=cond.pooled_prompt_embeds,
                timestep=torch.full((batch,), 500.0),
            ).sample
        ids = torch.zeros(4, 4, 3)
        ids[..., 1], ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None]
        return backbone.transformer(
            hidden_states=torch.randn(batch, 16, 64, generator=generator),  # 8 x 8 latents packed 2 x 2
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            timestep=torch.full((batch,), 0.5),
            img_ids=ids.reshape(-1, 3),
            txt_ids=cond.text_ids,
            guidance=backbone.guidance(batch, 3.5),
        ).sample


@pytest.mark.parametrize("tiny_dit_path", ["sd3", "flux"], indirect=True)
def test_a_bound_subject_changes_only_the_image_whose_prompt_holds_the_token(tiny_dit_path):
    backbone = TransformerBackbone.from_pretrained(tiny_dit_path, max_sequence_length=32)
    prompts = ["a photo of <person> at the beach", "a photo of a dog at the beach"]
    before = denoise(backbone, prompts)
    adapter = make_adapter(backbone, tiny_dit_path)
    adapter.attach(backbone.transformer)
    masks = backbone.subject_masks(prompts, "<person>")
    tokens = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    adapter.set_subjects([SubjectBinding(tokens=tokens, masks=masks)])
    after = denoise(backbone, prompts)
    assert not torch.allclose(after[0], before[0], atol=1e-3)
    # The other sample runs on the nested path's kernels: equal up to rounding.
    torch.testing.assert_close(after[1], before[1], rtol=1e-5, atol=1e-6)
    # Only the T5 part marks the subject (FLUX has no other; SD3's CLIP part unmarked): still an effect.
    if backbone.kind == "sd3":
        t5_only = masks.clone()
        t5_only[:, :77] = False
        adapter.set_subjects([SubjectBinding(tokens=tokens, masks=t5_only)])
        assert not torch.allclose(denoise(backbone, prompts)[0], before[0], atol=1e-3)
    adapter.detach(backbone.transformer)
    assert torch.equal(denoise(backbone, prompts), before)


def test_t5_subject_mask_inside_punctuation_and_under_truncation(flux):
    t5 = flux.tokenizers[-1]
    prompts = ["(<person>) and a<person>", "A <PERSON>!"]
    masks = subject_masks(t5, prompts, "<person>", max_length=16)
    pieces = t5.convert_ids_to_tokens(t5(prompts[0]).input_ids)  # ▁ ( < person > ) ▁and ▁a < person > </s>
    assert [pieces[i] for i in masks[0].nonzero().flatten()] == ["<", "person", ">"] * 2
    # Case-insensitive, as CLIP's lower-casing tokenizers: ▁ < P E R S O N > (capitals are single pieces here)
    assert masks[1].sum() == 9
    # "a red dog on <person>" is ▁a ▁red ▁dog ▁on ▁ < person > </s>: 9 tokens keep it, 6 cut it (not marked).
    kept = subject_masks(t5, ["a red dog on <person>"], "<person>", max_length=9)
    assert kept[0].nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert not subject_masks(t5, ["a red dog on <person>"], "<person>", max_length=6).any()


def test_loads_from_a_hub_id_through_the_cache(tiny_flux_path, tmp_path):
    # The Hub cache layout, read offline in a fresh process.
    write_hub_cache(tiny_flux_path, tmp_path / "hub", "nested-tests/tiny-flux")
    code = (
        "from nested.backbone import load_backbone\n"
        "backbone = load_backbone('nested-tests/tiny-flux', local_files_only=True)\n"
        "print(type(backbone).__name__, backbone.kind, len(backbone.tokenizers[-1]))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["TransformerBackbone", "flux", str(len(build_tiny_t5_vocab()))]


def test_in_the_flux_pipeline_a_bound_subject_changes_only_the_image_with_the_token(tiny_flux_path):
    backbone = TransformerBackbone.from_pretrained(tiny_flux_path, max_sequence_length=32)
    pipeline = FluxPipeline.from_pretrained(tiny_flux_path, transformer=backbone.transformer)
    prompts = ["a photo of <person> at the beach", "a photo of a dog at the beach"]

    def generate() -> np.ndarray:
        return pipeline(
            prompts,
            height=32,
            width=32,
            num_inference_steps=2,
            max_sequence_length=backbone.max_sequence_length,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    before = generate()
    adapter = make_adapter(backbone, tiny_flux_path)
    adapter.attach(backbone.transformer)
    tokens = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    adapter.set_subjects([SubjectBinding(tokens=tokens, masks=backbone.subject_masks(prompts, "<person>"))])
    after = generate()
    assert np.abs(after[0] - before[0]).max() > 1e-3
    np.testing.assert_allclose(after[1], before[1], atol=1e-5)

"""Tiny SD3.5-like and FLUX-like diffusers folders, and the transformer backbones loaded from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from transformers import T5TokenizerFast

from nested.testing import build_tiny_t5_vocab, write_tiny_t5_tokenizer

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

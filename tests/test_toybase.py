"""The toy world's base model: the committed folder loads through from_pretrained and draws what the
captions ask for; the training helpers are deterministic and learn."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from nested import toybase
from nested.toyworld import SCENES, Context, caption

REPO = Path(__file__).resolve().parents[1]
TOY_SD = REPO / "data" / "models" / "toy-sd"


def test_committed_toy_model_loads_through_from_pretrained_and_generates_64px():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_SD, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.dtype == torch.float32  # stored in float16, loaded back as float32
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the trained latents, not SD's
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [caption("faces", Context("red")), caption("pets", Context("snow", "sketch"))],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 64, 64)
    assert torch.isfinite(images).all()


def test_committed_image_encoder_loads_with_its_processor():
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(TOY_SD / "image_encoder")
    processor = CLIPImageProcessor.from_pretrained(TOY_SD / "image_encoder")
    pixels = processor(images=[torch.rand(3, 64, 64)], do_rescale=False, return_tensors="pt").pixel_values
    hidden = encoder(pixels, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape == (1, 65, 128)  # 8 x 8 patches + CLS


def test_committed_base_model_draws_the_captioned_scene():
    """Trained, not random: the base model's images of each scene are told apart by the committed context
    judge far above chance (1/8)."""
    from diffusers import StableDiffusionPipeline

    from nested.judges import ToyJudges

    judges = ToyJudges.from_pretrained(REPO / "data" / "toyworld" / "judges")
    pipe = StableDiffusionPipeline.from_pretrained(TOY_SD, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    scenes = list(SCENES)
    images = pipe(
        [caption("faces" if i % 2 else "pets", Context(scene)) for i, scene in enumerate(scenes)],
        num_inference_steps=15,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    predicted = [p["scene"] for p in judges.context(images)]
    correct = sum(p == s for p, s in zip(predicted, scenes, strict=True))
    assert correct >= 5, f"scenes {scenes} judged as {predicted}"


def test_render_pool_is_deterministic_and_uses_train_identities_only():
    first, second = toybase.render_pool(12, seed=3), toybase.render_pool(12, seed=3)
    assert torch.equal(first.images, second.images) and first.captions == second.captions
    assert first.images.shape == (12, 3, 64, 64) and first.images.dtype == torch.uint8
    assert not torch.equal(first.images, toybase.render_pool(12, seed=4).images)
    # Captions carry class and context, never identity attributes.
    assert all(text.startswith(("a photo of", "a sketch of", "a painting of")) for text in first.captions)
    assert not any(word in " ".join(first.captions) for word in ("ginger", "blonde", "azure", "spiky"))


def test_vae_and_unet_training_reduce_their_losses(tmp_path):
    torch.manual_seed(0)
    pool = toybase.render_pool(32, seed=0)
    vae = toybase.build_vae()
    before = toybase.reconstruction_error(vae, pool.images[:8])
    losses: list[float] = []
    toybase.train_vae(
        vae, pool, steps=30, batch_size=4, lr=2e-3, progress=lambda s, logs: losses.append(logs["loss"])
    )
    assert toybase.reconstruction_error(vae, pool.images[:8]) < before
    assert vae.config.scaling_factor == pytest.approx(
        1.0 / toybase.encode_latents(vae, pool.images[:32], scale=1.0).std().item(), rel=0.2
    )

    from nested.testing import write_tiny_tokenizer

    tokenizer = write_tiny_tokenizer(tmp_path / "tokenizer")
    text_encoder = toybase.build_text_encoder(tokenizer, seed=0)
    latents = toybase.encode_latents(vae, pool.images)
    unet_losses: list[float] = []
    torch.manual_seed(0)
    toybase.train_unet(
        toybase.build_unet(text_encoder.config.hidden_size), latents, pool.captions, tokenizer, text_encoder,
        steps=30, batch_size=8, lr=2e-3, progress=lambda s, logs: unet_losses.append(logs["loss"]),
    )  # fmt: skip
    assert sum(unet_losses[-10:]) < sum(unet_losses[:10])


def test_results_interpolates_context_at_equal_identity():
    spec = importlib.util.spec_from_file_location("toy_results", REPO / "scripts" / "toyworld" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    curve = [{"identity_exact": 0.1, "context": 0.9}, {"identity_exact": 0.5, "context": 0.5}]
    assert results.context_at_identity(curve, 0.3) == pytest.approx(0.7)
    assert results.context_at_identity(curve, 0.1) == pytest.approx(0.9)
    assert results.context_at_identity(curve, 0.6) is None  # outside the sweep: no claim

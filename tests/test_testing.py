"""The tiny checkpoints load through the real diffusers / transformers paths and behave like real ones."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, CLIPTokenizer, CLIPVisionModelWithProjection

from nested.testing import TINY_WORDS, write_tiny_pipeline, write_tiny_vision_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_models.py"


def _folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_pipeline_loads_and_generates(kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(f"tiny_{kind}_path")
    pipeline_class = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipeline = pipeline_class.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.image_encoder is None  # image_encoder/ exists but is not registered
    assert pipeline.vae_scale_factor == 4
    images = pipeline(
        ["a photo of a dog", "a cat"],
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 3, 64, 64)
    assert torch.isfinite(images).all()
    assert _folder_bytes(path) < 3_000_000


def test_sdxl_config_is_sdxl_like(tiny_sdxl_path: Path) -> None:
    index = json.loads((tiny_sdxl_path / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["image_encoder"] == [None, None]
    unet = json.loads((tiny_sdxl_path / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["cross_attention_dim"] == 64
    vae = json.loads((tiny_sdxl_path / "vae" / "config.json").read_text())
    assert vae["force_upcast"] and vae["scaling_factor"] == pytest.approx(0.13025)


def test_same_seed_same_weights(tmp_path: Path) -> None:
    first = write_tiny_pipeline(tmp_path / "a", "sd", seed=3, with_image_encoder=False)
    second = write_tiny_pipeline(tmp_path / "b", "sd", seed=3, with_image_encoder=False)
    other = write_tiny_pipeline(tmp_path / "c", "sd", seed=4, with_image_encoder=False)
    files = sorted(file.relative_to(first) for file in first.rglob("*") if file.is_file())
    assert files == sorted(file.relative_to(second) for file in second.rglob("*") if file.is_file())
    for file in files:
        assert (first / file).read_bytes() == (second / file).read_bytes(), file
    unet = Path("unet") / "diffusion_pytorch_model.safetensors"
    weights, other_weights = load_file(first / unet), load_file(other / unet)
    assert not torch.equal(weights["conv_in.weight"], other_weights["conv_in.weight"])


@pytest.mark.parametrize(("folder", "pad"), [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")])
def test_tokenizer_is_real_clip_bpe(tiny_sdxl_path: Path, folder: str, pad: str) -> None:
    files = {file.name for file in (tiny_sdxl_path / folder).iterdir()}
    assert {"vocab.json", "merges.txt"} <= files and "tokenizer.json" not in files  # like the real repos
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl_path / folder)
    assert 500 < len(tokenizer) <= 1000
    assert tokenizer.pad_token == pad and tokenizer.model_max_length == 77
    assert tokenizer.eos_token_id == len(tokenizer) - 1  # EOS has the largest id, as in real CLIP

    ids = tokenizer("A Photo of a PERSON").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "person</w>",
        "<|endoftext|>",
    ]
    assert all(len(tokenizer(word, add_special_tokens=False).input_ids) == 1 for word in TINY_WORDS)

    # Unknown words fall back to sub-words / bytes, never to the unknown token, and decode back.
    text = "a zebra wearing sunglasses, 2024 émoji"
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert len(ids) > len(text.split()) + 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a zebra wearing sunglasses , 2 0 2 4 émoji"


def test_text_encoders_match_tokenizers(tiny_sdxl_path: Path) -> None:
    for suffix in ("", "_2"):
        tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl_path / f"tokenizer{suffix}")
        config = json.loads((tiny_sdxl_path / f"text_encoder{suffix}" / "config.json").read_text())
        assert config["vocab_size"] == len(tokenizer)
        assert config["eos_token_id"] == tokenizer.eos_token_id
        assert config["bos_token_id"] == tokenizer.bos_token_id


def test_image_encoder_folder(tiny_sd_path: Path) -> None:
    processor = AutoImageProcessor.from_pretrained(tiny_sd_path / "image_encoder")
    model = CLIPVisionModelWithProjection.from_pretrained(tiny_sd_path / "image_encoder")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        output = model(pixel_values=pixels, output_hidden_states=True)
    assert output.image_embeds.shape == (1, 32)
    assert output.hidden_states[-2].shape == (1, 17, 32)  # (32 / 8)^2 patches + CLS


@pytest.mark.parametrize(("kind", "tokens"), [("clip", 17), ("dinov2", 5)])
def test_tiny_vision_model(tmp_path: Path, kind: str, tokens: int) -> None:
    path = write_tiny_vision_model(tmp_path / kind, kind)
    processor = AutoImageProcessor.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    image = Image.fromarray(np.full((64, 48, 3), 128, dtype=np.uint8))
    with torch.no_grad():
        hidden = model(
            pixel_values=processor(images=image, return_tensors="pt").pixel_values
        ).last_hidden_state
    assert hidden.shape == (1, tokens, 32)


def test_make_tiny_models_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = runpy.run_path(str(SCRIPT), run_name="make_tiny_models")["main"]
    main(["--out", str(tmp_path)])
    for kind in ("sd", "sdxl"):
        assert (tmp_path / f"tiny-{kind}" / "model_index.json").is_file()
        assert (tmp_path / f"tiny-{kind}" / "image_encoder" / "preprocessor_config.json").is_file()
    main(["--out", str(tmp_path)])  # rewrites its own folders
    (tmp_path / "foreign" / "tiny-sd").mkdir(parents=True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # but never deletes a folder that is not a pipeline
        main(["--out", str(tmp_path / "foreign")])
    assert exit_info.value.code == 2
    assert (
        f"{tmp_path / 'foreign' / 'tiny-sd'} exists and is not a diffusers pipeline folder"
        in capsys.readouterr().err
    )
    assert (tmp_path / "foreign" / "tiny-sd").is_dir()

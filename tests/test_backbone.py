"""DiffusionBackbone loads only the frozen parts and conditions exactly like the diffusers pipelines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from nested.backbone import DiffusionBackbone, check_tokenizer
from nested.errors import MissingFileError

PROMPTS = [
    "a photo of a person on the beach",
    "a red dog sitting in the snow at night, " * 8,  # > 77 tokens: truncated
]


@pytest.fixture(scope="module")
def sd(tiny_sd_path: Path) -> DiffusionBackbone:
    return DiffusionBackbone.from_pretrained(tiny_sd_path)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_path: Path) -> DiffusionBackbone:
    return DiffusionBackbone.from_pretrained(tiny_sdxl_path)


def test_loads_frozen_components(
    sd: DiffusionBackbone, sdxl: DiffusionBackbone, tiny_sdxl_path: Path
) -> None:
    assert (sd.kind, len(sd.tokenizers), len(sd.text_encoders)) == ("sd", 1, 1)
    assert (sdxl.kind, len(sdxl.tokenizers), len(sdxl.text_encoders)) == ("sdxl", 2, 2)
    assert sdxl.source == str(tiny_sdxl_path)
    for backbone in (sd, sdxl):
        modules = [backbone.unet, backbone.vae, *backbone.text_encoders]
        assert all(not module.training for module in modules)
        assert not any(p.requires_grad for module in modules for p in module.parameters())
        assert isinstance(backbone.noise_scheduler, DDPMScheduler)
        assert backbone.noise_scheduler.config.prediction_type == "epsilon"
        assert backbone.noise_scheduler.config.beta_schedule == "scaled_linear"
        assert backbone.vae_scale_factor == 4
    assert sd.scheduler_config["_class_name"] == "DDIMScheduler"
    assert sdxl.scheduler_config["_class_name"] == "EulerDiscreteScheduler"


def test_v_prediction_carries_over(tiny_sd_path: Path, tmp_path: Path) -> None:
    path = shutil.copytree(tiny_sd_path, tmp_path / "sd2")
    config_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"prediction_type": "v_prediction"}))
    backbone = DiffusionBackbone.from_pretrained(path)
    assert backbone.noise_scheduler.config.prediction_type == "v_prediction"


def test_fp16_keeps_upcast_vae_in_fp32(tiny_sd_path: Path, tiny_sdxl_path: Path) -> None:
    sdxl = DiffusionBackbone.from_pretrained(tiny_sdxl_path, dtype=torch.float16)
    assert sdxl.unet.dtype == torch.float16 and sdxl.text_encoders[1].dtype == torch.float16
    assert sdxl.vae.dtype == torch.float32  # force_upcast: the SDXL VAE overflows in fp16
    # A replacement VAE (here the SD one, not flagged force_upcast) follows dtype.
    mixed = DiffusionBackbone.from_pretrained(
        tiny_sdxl_path, dtype=torch.float16, vae_name_or_path=tiny_sd_path
    )
    assert mixed.vae.config.scaling_factor == pytest.approx(0.18215)
    assert mixed.vae.dtype == torch.float16


def test_the_upcast_vae_runs_in_float32_under_fp16_autocast(tiny_sdxl_path: Path) -> None:
    """`16-mixed` trains under fp16 autocast, which would run the float32-kept SDXL VAE's convolutions in fp16
    (where the real one overflows): encoding and decoding run outside it, as `nested shards` caches latents."""
    sdxl = DiffusionBackbone.from_pretrained(tiny_sdxl_path, dtype=torch.float16)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen: list[torch.dtype] = []
    hooks = [
        module.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
        for module in sdxl.vae.modules()
        if isinstance(module, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        plain = sdxl.encode_images(images, generator=torch.Generator().manual_seed(1))
        plain_images = sdxl.decode_latents(plain)
        with torch.autocast("cpu", dtype=torch.float16):
            latents = sdxl.encode_images(images, generator=torch.Generator().manual_seed(1))
            decoded = sdxl.decode_latents(latents)
    for hook in hooks:
        hook.remove()
    assert len(seen) > 10 and set(seen) == {torch.float32}
    assert torch.equal(latents, plain) and torch.equal(decoded, plain_images)
    assert decoded.dtype == torch.float32 and decoded.shape == images.shape
    assert decoded.min() >= 0 and decoded.max() <= 1


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_encode_prompts_matches_pipeline(kind: str, request: pytest.FixtureRequest) -> None:
    backbone: DiffusionBackbone = request.getfixturevalue(kind)
    pipeline_class = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipeline = pipeline_class.from_pretrained(backbone.source)
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS)
        expected = pipeline.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    width = 64 if kind == "sdxl" else 32
    assert cond.prompt_embeds.shape == (2, 77, width)
    torch.testing.assert_close(cond.prompt_embeds, expected[0], atol=1e-6, rtol=0)
    assert len(cond.input_ids) == len(backbone.tokenizers)
    assert all(ids.shape == (2, 77) for ids in cond.input_ids)
    if kind == "sdxl":
        assert cond.pooled_prompt_embeds is not None and cond.pooled_prompt_embeds.shape == (2, 32)
        torch.testing.assert_close(cond.pooled_prompt_embeds, expected[2], atol=1e-6, rtol=0)
        # The two tokenizers pad differently (EOS vs "!") but agree on every real token.
        ids, ids_2 = cond.input_ids
        assert ids[0, -1] == backbone.tokenizers[0].eos_token_id and ids_2[0, -1] == 0
    else:
        assert cond.pooled_prompt_embeds is None


def test_time_ids_order(sdxl: DiffusionBackbone, tiny_sdxl_path: Path) -> None:
    time_ids = sdxl.time_ids(
        torch.tensor([[1024, 768], [500, 400]]), torch.tensor([[10, 20], [0, 0]]), (512, 256)
    )
    assert time_ids.dtype == torch.float32
    assert time_ids.tolist() == [[1024, 768, 10, 20, 512, 256], [500, 400, 0, 0, 512, 256]]
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    expected = pipeline._get_add_time_ids((1024, 768), (10, 20), (512, 256), torch.float32, 32)
    torch.testing.assert_close(time_ids[:1], expected)


def test_unet_step_with_added_conditioning(sd: DiffusionBackbone, sdxl: DiffusionBackbone) -> None:
    for backbone in (sd, sdxl):
        cond = backbone.encode_prompts(PROMPTS)
        time_ids = backbone.time_ids(torch.tensor([[64, 64]] * 2), torch.zeros(2, 2), (64, 64))
        added = backbone.unet_added_cond_kwargs(cond, time_ids)
        if backbone.kind == "sd":
            assert added is None
        else:
            assert added is not None and set(added) == {"text_embeds", "time_ids"}
            # The pooled embedding of each prompt, and (original size, crop top-left, target size).
            assert not torch.allclose(cond.pooled_prompt_embeds[0], cond.pooled_prompt_embeds[1])
            assert torch.equal(added["text_embeds"], cond.pooled_prompt_embeds)
            assert torch.equal(added["time_ids"], torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
        latents = backbone.encode_images(torch.rand(2, 3, 32, 32) * 2 - 1, torch.Generator().manual_seed(0))
        assert latents.shape == (2, 4, 8, 8)
        with torch.no_grad():
            noise_pred = backbone.unet(latents, 10, cond.prompt_embeds, added_cond_kwargs=added).sample
        assert noise_pred.shape == latents.shape
    with pytest.raises(ValueError, match="time_ids"):
        sdxl.unet_added_cond_kwargs(sdxl.encode_prompts(["a dog"]), None)


def test_latent_scaling_round_trip(sdxl: DiffusionBackbone) -> None:
    latents = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(sdxl.latent_scaling(latents), latents * 0.13025)
    torch.testing.assert_close(sdxl.latent_unscaling(sdxl.latent_scaling(latents)), latents)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_missing_folder_error(tmp_path: Path) -> None:
    missing = tmp_path / "not-downloaded"
    with pytest.raises(FileNotFoundError, match="no model folder at .*not-downloaded.*model_index.json"):
        DiffusionBackbone.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no model_index.json.*unet/, vae/"):
        DiffusionBackbone.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="cannot load model_index.json of 'nobody/no-such-model'"):
        DiffusionBackbone.from_pretrained("nobody/no-such-model", local_files_only=True)


def test_missing_component_error(tiny_sd_path: Path, tmp_path: Path) -> None:
    path = shutil.copytree(tiny_sd_path, tmp_path / "broken")
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps(index | {"text_encoder": [None, None]}))
    with pytest.raises(ValueError, match="no \\['text_encoder'\\]"):
        DiffusionBackbone.from_pretrained(path)


@pytest.mark.parametrize(
    ("remove", "problem"),
    [
        ("unet", "has no unet/ folder"),
        ("scheduler/scheduler_config.json", "has no scheduler/scheduler_config.json"),
        (
            "vae/diffusion_pytorch_model.safetensors",
            "has no weights in vae/ (diffusion_pytorch_model*.safetensors",
        ),
        ("text_encoder/model.safetensors", "has no weights in text_encoder/ (model*.safetensors"),
    ],
)
def test_an_incomplete_model_folder_names_the_missing_part(tiny_sd_path, tmp_path, remove, problem) -> None:
    """diffusers would say "no file named config.json found in directory <the root folder>"."""
    path = shutil.copytree(tiny_sd_path, tmp_path / "partial")
    target = path / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(MissingFileError) as error:
        DiffusionBackbone.from_pretrained(path)
    message = str(error.value)
    assert message.startswith(f"{path} {problem}") and "subfolders unet/, vae/, scheduler/" in message


def test_two_token_tokenizer_trap_detected(tiny_sd_path: Path, tmp_path: Path) -> None:
    # Offline, CLIPTokenizer silently builds a 2-token vocabulary when its files are missing.
    (tmp_path / "no-files").mkdir()
    empty = CLIPTokenizer.from_pretrained(tmp_path / "no-files")
    assert len(empty) == 2
    path = shutil.copytree(tiny_sd_path, tmp_path / "sd")
    for name in ("vocab.json", "merges.txt"):
        (path / "tokenizer" / name).unlink()
    with pytest.raises(ValueError, match="has 2 tokens.*files .* are missing; is the model downloaded"):
        DiffusionBackbone.from_pretrained(path)


def test_check_tokenizer_accepts_real_vocabularies(sd: DiffusionBackbone) -> None:
    tokenizer, text_encoder = sd.tokenizers[0], sd.text_encoders[0]
    check_tokenizer(tokenizer, text_encoder, "tiny")  # small but exactly the encoder's vocabulary

    class Big:  # a real CLIP vocabulary whose encoder has spare rows is fine too
        def __len__(self) -> int:
            return 49408

    text_encoder.config.vocab_size, original = 49410, text_encoder.config.vocab_size
    try:
        check_tokenizer(Big(), text_encoder, "big")
        text_encoder.config.vocab_size = 100
        with pytest.raises(ValueError, match="only 100 embeddings"):
            check_tokenizer(tokenizer, text_encoder, "mismatch")
    finally:
        text_encoder.config.vocab_size = original

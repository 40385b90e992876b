"""Training adapters on diffusion transformers (SD3 / FLUX): the flow-matching loss, a fixed batch, `nested fit`."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from skimage.data import astronaut

from nested.adapter import NestedAdapter, SubjectBinding
from nested.backbone import TransformerBackbone, latent_space
from nested.cli.main import main
from nested.data.shards import encode_latents
from nested.data.transforms import target_transform
from nested.dit import joint_attention_layers
from nested.encoder import EncoderSpec
from nested.errors import ConfigError, DataError
from nested.inference.sampler import check_sampling
from nested.training.module import ConditioningDropout, NestedAttentionModule

REPO = Path(__file__).resolve().parents[1]
NO_DROPOUT = ConditioningDropout(text=0.0, image=0.0, both=0.0)


@pytest.fixture
def tiny_dit_path(request, tiny_sd3_path, tiny_flux_path):
    return {"sd3": tiny_sd3_path, "flux": tiny_flux_path}[request.param]


def make_module(path: Path, **kwargs) -> NestedAttentionModule:
    spec = EncoderSpec(backbone=str(path / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2)
    kwargs.setdefault("dropout", NO_DROPOUT)
    torch.manual_seed(0)
    module = NestedAttentionModule(str(path), spec, max_sequence_length=32, **kwargs)
    module.configure_model()
    return module


def fixed_batch(module: NestedAttentionModule, demo_faces_data) -> dict:
    """Two demo samples at 32 px with their latents (so the loss draws only noise and t)."""
    data = demo_faces_data(2)
    data.setup("fit")
    batch = data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)
    with torch.no_grad():
        latents = module.backbone.encode_images(batch["pixel_values"], torch.Generator().manual_seed(0))
    return {**batch, "latents": latents.float()}


def frozen_state(module: NestedAttentionModule) -> dict[str, torch.Tensor]:
    backbone = module.backbone
    parts = {
        "transformer": backbone.transformer,
        "vae": backbone.vae,
        "image": module.adapter.encoder.backbone,
    }
    parts.update({f"text{i}": encoder for i, encoder in enumerate(backbone.text_encoders)})
    return {f"{name}.{k}": v.clone() for name, part in parts.items() for k, v in part.state_dict().items()}


# ------------------------------------------------------------------------------- the objective
def naive_sigmas(kind: str, normal: torch.Tensor, latent_size: int) -> torch.Tensor:
    """Logit-normal t (the SD3 paper's t = sigmoid(normal), rounded up to the scheduler's grid of 1/1000)
    through the tiny schedulers' shift, written out: SD3's fixed shift 3, FLUX's exponential shift with mu
    linear in the packed sequence length (0.5 at 256 tokens, 1.15 at 4096)."""
    t = torch.ceil(torch.sigmoid(normal) * 1000) / 1000
    if kind == "sd3":
        return 3 * t / (1 + 2 * t)
    tokens = (latent_size // 2) ** 2
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def naive_flux_call(transformer, noisy, t, cond, guidance):
    """FLUX's forward on 2x2-packed latents with (row, column) image ids, unpacked back, written out."""
    b, c, h, w = noisy.shape
    packed = noisy.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    out = transformer(
        hidden_states=packed,
        timestep=t,
        guidance=torch.full((b,), guidance),
        pooled_projections=cond.pooled_prompt_embeds,
        encoder_hidden_states=cond.prompt_embeds,
        txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3),
        img_ids=ids,
    ).sample
    return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@pytest.mark.parametrize("tiny_dit_path", ["sd3", "flux"], indirect=True)
def test_loss_is_the_velocity_error_at_the_shifted_logit_normal_time(tiny_dit_path, demo_faces_data):
    flux = tiny_dit_path.name == "tiny-flux"
    module = make_module(
        tiny_dit_path, **({"guidance_scale": 2.5} if flux else {})
    )  # SD3 has no guidance input
    kind, backbone, adapter = module.backbone.kind, module.backbone, module.adapter
    batch = fixed_batch(module, demo_faces_data)
    with torch.no_grad():
        loss = module.diffusion_loss(batch, torch.Generator().manual_seed(7), apply_dropout=False)["loss"]

        generator = torch.Generator().manual_seed(7)
        x0 = batch["latents"]
        noise = torch.randn(x0.shape, generator=generator)
        normal = torch.normal(0.0, 1.0, (2,), generator=generator)
        t = naive_sigmas(kind, normal, x0.shape[-1])
        noisy = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        cond = backbone.encode_prompts(batch["captions"])
        tokens = adapter.encode(batch["reference"])
        masks = backbone.subject_masks(batch["captions"], "<person>")
        assert masks.any(-1).all()  # the subject takes part
        adapter.set_subjects([SubjectBinding(tokens=tokens, masks=masks)])
        if kind == "sd3":
            prediction = backbone.transformer(
                hidden_states=noisy,
                timestep=t * 1000,
                encoder_hidden_states=cond.prompt_embeds,
                pooled_projections=cond.pooled_prompt_embeds,
            ).sample
        else:
            prediction = naive_flux_call(backbone.transformer, noisy, t, cond, guidance=2.5)
        adapter.clear_subjects()
        expected = ((prediction - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert t.min() > 0 and t.max() < 1


@pytest.mark.parametrize("logit_mean", [0.0, 1.5, -1.0])
def test_logit_normal_times_follow_the_sd3_paper(tiny_sd3_path, logit_mean):
    module = make_module(tiny_sd3_path, logit_mean=logit_mean)
    times = module.flow_sigmas(torch.Size([4096, 16, 4, 4]), torch.Generator().manual_seed(3))
    normal = torch.normal(logit_mean, 1.0, (4096,), generator=torch.Generator().manual_seed(3))
    # Within one step of the grid (the shift's slope is at most 3): float rounding may pick the neighbour.
    torch.testing.assert_close(times, naive_sigmas("sd3", normal, 4), rtol=0, atol=3e-3)
    unshifted = times / (3 - 2 * times)  # SD3's shift 3 inverted
    expected_mean = torch.sigmoid(
        torch.randn(200_000, generator=torch.Generator().manual_seed(0)) + logit_mean
    )
    assert abs(unshifted.mean() - expected_mean.mean()) < 0.01  # a positive mean draws noisier times


def test_flux_times_shift_toward_noise_at_higher_resolution(tiny_flux_path):
    module = make_module(tiny_flux_path)
    small, large = (
        module.flow_sigmas(torch.Size([512, 16, s, s]), torch.Generator().manual_seed(0)) for s in (32, 128)
    )
    assert (large >= small).all() and large.mean() > small.mean() + 0.05


def test_options_of_the_other_model_family_are_refused(tiny_sd3_path, tiny_sd_path):
    with pytest.raises(ConfigError, match="model.min_snr_gamma"):
        make_module(tiny_sd3_path, min_snr_gamma=5.0)
    with pytest.raises(ConfigError, match="model.weighting_scheme"):
        make_module(tiny_sd3_path, weighting_scheme="logitnormal")
    with pytest.raises(
        ConfigError, match=r"model.guidance_scale=5 is the guidance input of a guidance-distilled"
    ):
        make_module(tiny_sd3_path, guidance_scale=5.0)  # SD3 has no guidance embedding
    with pytest.raises(ConfigError, match="max_sequence_length .*UNet model"):
        make_module(tiny_sd_path)  # make_module sets max_sequence_length
    spec = EncoderSpec(backbone=str(tiny_sd_path / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2)
    for options in ({"weighting_scheme": "mode"}, {"logit_std": 2.0, "guidance_scale": 1.0}):
        module = NestedAttentionModule(str(tiny_sd_path), spec, **options)
        with pytest.raises(ConfigError, match=f"model.{', model.'.join(options)}: flow-matching options"):
            module.configure_model()
    NestedAttentionModule(
        str(tiny_sd_path), spec, weighting_scheme="logit_normal"
    ).configure_model()  # defaults


def test_out_of_range_loss_and_value_options_are_refused(tiny_sd_path):
    spec = EncoderSpec(backbone=str(tiny_sd_path / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2)
    with pytest.raises(ConfigError, match="model.logit_std must be > 0"):
        NestedAttentionModule(str(tiny_sd_path), spec, logit_std=-1.0)
    with pytest.raises(ConfigError, match="model.min_snr_gamma must be > 0"):
        NestedAttentionModule(str(tiny_sd_path), spec, min_snr_gamma=0.0)
    with pytest.raises(ConfigError, match=r"model.value_norm_factor must be > 0, or null for no rescaling"):
        NestedAttentionModule(str(tiny_sd_path), spec, value_norm_factor=-2.0)
    # At inference a binding's 0 turns the adapter's rescaling off; below 0 has no meaning.
    tokens, masks = torch.zeros(1, 4, 32), torch.zeros(1, 77, dtype=torch.bool)
    assert SubjectBinding(tokens=tokens, masks=masks, value_norm_factor=0.0).value_norm_factor == 0.0
    with pytest.raises(
        ConfigError, match=r"SubjectBinding.value_norm_factor must be >= 0 \(0: no rescaling\)"
    ):
        SubjectBinding(tokens=tokens, masks=masks, value_norm_factor=-1.0)


@pytest.mark.parametrize("tiny_dit_path", ["sd3", "flux"], indirect=True)
def test_latents_the_patches_cannot_cut_and_a_t5_length_below_one_are_refused(tiny_dit_path):
    """SD3 cuts latents into patch_size patches and FLUX packs 2 x 2: a data.resolution that leaves an odd
    latent side is a one-line error naming the multiple, for both (the real models' is 16)."""
    module = make_module(tiny_dit_path)
    backbone = module.backbone
    conditioning = backbone.encode_prompts(["a photo of <person>"])
    channels = backbone.transformer.config.in_channels // (4 if backbone.kind == "flux" else 1)
    with pytest.raises(
        ConfigError, match=r"in 2x2 patches, but these are 9x8: make data.resolution a multiple of 8"
    ):
        module.transformer_prediction(torch.zeros(1, channels, 9, 8), torch.full((1,), 0.5), conditioning)
    assert module.transformer_prediction(
        torch.zeros(1, channels, 8, 8), torch.full((1,), 0.5), conditioning
    ).shape == (1, channels, 8, 8)
    # SD3's position embedding is a table of pos_embed_max_size patches per side (the tiny one's 16, of 2x2 latents
    # of 4x4 pixels: 128 px); FLUX's rotary one has no limit.
    too_large = torch.zeros(1, channels, 34, 8)
    if backbone.kind == "sd3":
        with pytest.raises(
            ConfigError,
            match=r"^data.resolution 136 is more than the 128 pixels per side that this SD3 transformer's position "
            r"embedding covers \(pos_embed_max_size 16\): use at most 128\.$",
        ):
            module.transformer_prediction(too_large, torch.full((1,), 0.5), conditioning)
        with pytest.raises(ConfigError, match=r"^height 136 is more than the 128 pixels per side"):
            check_sampling(backbone, steps=2, height=136, width=128)  # SampleGrid's and nested eval's check
        check_sampling(backbone, steps=2, height=128, width=128)
    else:
        assert module.transformer_prediction(too_large, torch.full((1,), 0.5), conditioning).shape[2] == 34
    for length in (0, -4):
        with pytest.raises(
            ConfigError, match=f"max_sequence_length must be a positive number of T5 tokens, got {length}"
        ):
            TransformerBackbone.from_pretrained(tiny_dit_path, max_sequence_length=length)


# ------------------------------------------------------------------------- training a fixed batch
def overfit(module: NestedAttentionModule, batch: dict, steps: int = 30) -> list[float]:
    """The losses of ``steps`` Adam steps of the adapter on ``batch`` with the same noise and t each time;
    after the first backward, every adapter weight (and nothing else of the module) has a gradient."""
    trainable = module.adapter.trainable_parameters()
    optimizer = torch.optim.Adam(trainable, lr=3e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = module.diffusion_loss(batch, torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        if not losses:
            with_grad = {id(p) for p in module.parameters() if p.grad is not None}
            assert with_grad == {id(p) for p in trainable}
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tiny_dit_path", ["sd3", "flux"], indirect=True)
def test_adapter_overfits_a_fixed_batch_and_only_the_adapter_changes(tiny_dit_path, demo_faces_data):
    module = make_module(tiny_dit_path)
    batch = fixed_batch(module, demo_faces_data)
    before = frozen_state(module)
    losses = overfit(module, batch)
    frozen = [module.backbone.transformer, *module.backbone.text_encoders, module.backbone.vae]
    assert all(p.grad is None and not p.requires_grad for part in frozen for p in part.parameters())
    # A random tiny transformer lets the subject token steer only part of the output: the loss falls
    # steadily (3 % on SD3, 12 % on FLUX in 30 steps), not to zero.
    assert losses[-1] < losses[15] < losses[0] and losses[-1] < 0.98 * losses[0], losses
    after = frozen_state(module)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("tiny_dit_path", ["sd3", "flux"], indirect=True)
def test_gradient_checkpointing_of_the_transformer_gives_the_same_gradients(tiny_dit_path, demo_faces_data):
    module = make_module(tiny_dit_path)
    batch = fixed_batch(module, demo_faces_data)
    transformer, grads = module.backbone.transformer, []
    for enabled in (False, True):
        if enabled:
            transformer.enable_gradient_checkpointing()
        module.zero_grad(set_to_none=True)
        module.diffusion_loss(batch, torch.Generator().manual_seed(0))["loss"].backward()
        module.on_after_backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert transformer.is_gradient_checkpointing
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad)


# ------------------------------------------------------------------------------------ nested fit
def fit_smoke(kind: str, root: Path, steps: int, *options: str) -> list[float]:
    """``nested fit --config configs/smoke-<kind>.yaml`` for ``steps`` steps into ``root`` (validating
    halfway), with more ``options``; the training losses it logged. Run from the repository's root."""
    main(
        [
            "fit",
            "--config",
            f"configs/smoke-{kind}.yaml",
            f"--trainer.default_root_dir={root}",
            f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps // 2}",
            "--trainer.logger=CSVLogger",
            f"--trainer.logger.save_dir={root}",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            *options,
        ]
    )
    with open(next(root.rglob("metrics.csv"))) as handle:
        return [float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_smoke_config_fits_from_the_cli_and_exports_an_adapter_that_attaches(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["nested"])
    root = tmp_path / kind
    losses = fit_smoke(kind, root, 6)
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    adapter = NestedAdapter.from_pretrained(root / "adapters" / "last")
    assert adapter.config.base_model == f"data/models/tiny-{kind}"
    backbone = TransformerBackbone.from_pretrained(REPO / "data" / "models" / f"tiny-{kind}")
    assert set(adapter.config.layers) == set(joint_attention_layers(backbone.transformer))
    adapter.attach(backbone.transformer)
    processors = {
        type(attn.processor).__name__ for attn in joint_attention_layers(backbone.transformer).values()
    }
    assert processors == {"NestedJointAttnProcessor"}


# ------------------------------------------------------------------------------- cached latents
def test_cached_latents_carry_the_vae_shift_like_the_training_path(tiny_flux_path):
    vae = AutoencoderKL.from_pretrained(tiny_flux_path, subfolder="vae")
    image = Image.fromarray(astronaut())
    cached = torch.from_numpy(encode_latents(vae, image, 32)).float()
    pixels = target_transform(image, resolution=32, center_crop=True, random_flip=False).pixel_values
    with torch.no_grad():
        mean = vae.encode(pixels[None]).latent_dist.mean[0]
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.1159, 0.3611)
    torch.testing.assert_close(cached, ((mean - 0.1159) * 0.3611).half().float())


def test_cached_latents_of_another_vae_are_refused_naming_what_differs(tiny_flux_path, demo_faces_data):
    module = make_module(tiny_flux_path)
    batch = fixed_batch(module, demo_faces_data)
    ours = latent_space(module.backbone.vae)
    batch["latents"] = torch.zeros(2, 4, 8, 8)  # an SD VAE's, from shards that recorded no VAE
    with pytest.raises(DataError, match="another VAE .*latent_channels 4 there, 16 here.*--cache-latents"):
        module.diffusion_loss(batch, torch.Generator().manual_seed(0))
    # The same shape from a VAE of another scaling (SD 1.x's latents read by another SD model): refused too.
    batch["latents"] = torch.zeros(2, 16, 8, 8)
    batch["latents_space"] = [ours, {**ours, "scaling_factor": 0.18215}]
    with pytest.raises(DataError, match=r"another VAE .*\(scaling_factor 0.18215 there, 0.3611 here\)"):
        module.diffusion_loss(batch, torch.Generator().manual_seed(0))
    batch["latents_space"] = [ours, None]  # recorded and matching, or not recorded
    module.diffusion_loss(batch, torch.Generator().manual_seed(0))

"""Sampling from the training modules: parity with diffusers, references, the SampleGrid callback."""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from test_module import adamw, make_module

from nested.adapter import NestedAdapter
from nested.backbone import DiffusionBackbone
from nested.callbacks import SampleGrid
from nested.encoder import EncoderSpec
from nested.errors import ConfigError
from nested.evaluation.images import load_references, make_grid
from nested.evaluation.metrics import IdentitySimilarity, PromptAlignment, VisionEmbedder
from nested.inference.pipeline import NestedPipeline
from nested.inference.sampler import build_scheduler, sample_images
from nested.signals import clear_signals, install_signal_flags, received_signals, restore_signal_handlers
from nested.testing import write_tiny_clip
from nested.training.module import NestedAttentionModule

DEMO_FACES = Path(__file__).resolve().parents[1] / "data" / "demo" / "faces"


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _encoder_spec(path: Path) -> EncoderSpec:
    return EncoderSpec(backbone=str(path / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2)


def _pipeline_of(backbone: DiffusionBackbone):
    """A diffusers pipeline REFERENCING the backbone's modules (only to compare against)."""
    common = dict(
        vae=backbone.vae,
        text_encoder=backbone.text_encoders[0],
        tokenizer=backbone.tokenizers[0],
        unet=backbone.unet,
        scheduler=build_scheduler(backbone),
    )
    if backbone.kind == "sd":
        pipe = StableDiffusionPipeline(
            **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    else:
        pipe = StableDiffusionXLPipeline(
            **common,
            text_encoder_2=backbone.text_encoders[1],
            tokenizer_2=backbone.tokenizers[1],
            force_zeros_for_empty_prompt=backbone.force_zeros_for_empty_prompt,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_without_zeros(tiny_sdxl_path: Path, folder: Path) -> Path:
    """The tiny SDXL whose model_index.json sets force_zeros_for_empty_prompt false (its parts linked)."""
    folder.mkdir()
    for part in tiny_sdxl_path.iterdir():
        if part.name != "model_index.json":
            (folder / part.name).symlink_to(part)
    index = json.loads((tiny_sdxl_path / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    return folder


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sdxl-without-zeros"])
def test_sample_images_matches_the_diffusers_pipeline(kind, tiny_sd_path, tiny_sdxl_path, tmp_path):
    if kind == "sdxl-without-zeros":  # the empty negative prompt is encoded, not zeros
        path = _sdxl_without_zeros(tiny_sdxl_path, tmp_path / "sdxl")
    else:
        path = {"sd": tiny_sd_path, "sdxl": tiny_sdxl_path}[kind]
    backbone = DiffusionBackbone.from_pretrained(path)
    assert backbone.force_zeros_for_empty_prompt == (kind != "sdxl-without-zeros")
    prompts, seeds = ["a photo of a dog", "a cat on the beach"], [3, 4]
    ours = sample_images(backbone, None, prompts, seeds=seeds, steps=3, guidance=5.0, height=32, width=32)
    theirs = _pipeline_of(backbone)(
        prompts,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=3,
        guidance_scale=5.0,
        height=32,
        width=32,
        output_type="pt",
    ).images
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # Batching never changes an image: image i depends only on its own seed.
    alone = sample_images(backbone, None, prompts[1:], seeds=seeds[1:], steps=3, height=32, width=32)
    torch.testing.assert_close(alone[0], ours[1], atol=1e-5, rtol=0)


def test_sample_images_with_an_adapter_matches_nested_pipeline(tiny_sd_path):
    backbone = DiffusionBackbone.from_pretrained(tiny_sd_path)
    torch.manual_seed(0)
    adapter = NestedAdapter.for_unet(
        backbone.unet, token="<person>", class_word="person", encoder=_encoder_spec(tiny_sd_path)
    )
    adapter.eval()
    adapter.config.token_weight = 3.0  # trained with a weight: both paths use it
    pipe = NestedPipeline(_pipeline_of(backbone), {"<person>": adapter})  # adds <person>, attaches
    reference = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts, seeds = ["a photo of <person>", "<person> on the beach"], [0, 1]
    settings = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32)
    theirs = pipe(
        prompts,
        subjects={"<person>": reference},
        strengths={"<person>": 0.8},
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pt",
        **settings,
    ).images
    view = dataclasses.replace(backbone, tokenizers=[pipe.pipe.tokenizer])  # the tokenizer with <person>
    ours = sample_images(
        view,
        adapter,
        prompts,
        reference[None],
        seeds=seeds,
        steps=3,
        guidance=5.0,
        height=32,
        width=32,
        scale=0.8,
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    without_subject = sample_images(
        view, adapter, prompts, reference[None], seeds=seeds, steps=3, height=32, width=32, scale=0.0
    )
    assert (ours - without_subject).abs().max() > 1e-3  # the subject is really bound
    assert adapter._bindings == []  # and unbound afterwards
    pipe.unload()


def test_load_references_from_a_folder_and_from_shards(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("b", "a", "c"):
        Image.fromarray((rng.random((40, 60, 3)) * 255).astype("uint8")).save(tmp_path / f"{name}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = load_references(tmp_path, count=2, size=24)
    assert [r.name for r in folder] == ["a", "b"]
    assert all(r.image.shape == (3, 24, 24) and r.image.min() >= 0 and r.image.max() <= 1 for r in folder)
    shards = load_references(str(DEMO_FACES / "val" / "shards.json"), count=3, size=32, token="<person>")
    assert len(shards) == 3 and all(r.image.shape == (3, 32, 32) for r in shards)
    with pytest.raises(FileNotFoundError, match="no reference images"):
        load_references(tmp_path / "missing")


def test_make_grid_size():
    rows = [[torch.zeros(3, 8, 10)] * 3, [torch.ones(3, 8, 10)] * 2]
    grid = make_grid(rows, padding=2)
    assert grid.shape == (3, 2 * 8 + 3 * 2, 3 * 10 + 4 * 2)
    # Each image at its offset, the rest padding (white by default), a short row's end included.
    generator = torch.Generator().manual_seed(0)
    tiles = [[torch.rand(3, 8, 10, generator=generator) for _ in range(count)] for count in (3, 2)]
    grid = make_grid(tiles, padding=2, pad_value=0.25)
    filled = torch.zeros(grid.shape, dtype=torch.bool)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            top, left = 2 + r * (8 + 2), 2 + c * (10 + 2)
            assert torch.equal(grid[:, top : top + 8, left : left + 10], tile), (r, c)
            filled[:, top : top + 8, left : left + 10] = True
    assert (grid[~filled] == 0.25).all() and (~filled).sum() == 3 * (22 * 38 - 5 * 8 * 10)
    assert (make_grid(rows, padding=2)[:, :2] == 1.0).all()


def test_only_global_rank_zero_samples(monkeypatch):
    callback = SampleGrid(every_n_steps=1)
    monkeypatch.setattr(callback, "generate", lambda *a: pytest.fail("rank 1 must not sample"))
    callback.log_samples(SimpleNamespace(is_global_zero=False, global_step=3), None)


def test_a_pending_stop_signal_skips_the_grid(monkeypatch):
    """The stop's checkpoint comes right after this callback: it must not wait for a grid."""
    callback = SampleGrid(every_n_steps=2, sample_at_start=True)
    sampled = []
    monkeypatch.setattr(callback, "log_samples", lambda trainer, module: sampled.append(trainer.global_step))
    previous = install_signal_flags(("SIGUSR1",))
    try:
        callback.on_train_batch_end(SimpleNamespace(global_step=2), None)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert received_signals() == {signal.SIGUSR1}
        callback.on_train_batch_end(SimpleNamespace(global_step=4), None)
        callback.on_train_start(SimpleNamespace(global_step=0), None)
    finally:
        clear_signals()
        restore_signal_handlers(previous)
    assert sampled == [2]


def _count_unets() -> int:
    gc.collect()
    return sum(issubclass(type(obj), UNet2DConditionModel) for obj in gc.get_objects())


class _UnetCounter(L.Callback):
    """Counts UNet2DConditionModel objects at the start and during the first sampling UNet call."""

    def __init__(self):
        self.at_start = self.while_sampling = None

    def on_train_start(self, trainer, pl_module):
        self.at_start = _count_unets()

        def hook(module, args):
            if not torch.is_grad_enabled() and self.while_sampling is None:  # sampling runs without grad
                self.while_sampling = _count_unets()

        pl_module.backbone.unet.register_forward_pre_hook(hook)


class _RngProbe(L.Callback):
    """Draws from the global RNG after every batch (after SampleGrid): sampling must not shift it."""

    def __init__(self):
        self.draws = []

    def on_train_batch_end(self, *args):
        self.draws.append(torch.rand(1).item())


def grid_tile(grid: torch.Tensor, row: int, column: int, size: int, padding: int = 2) -> torch.Tensor:
    """The (3, size, size) image at (row, column) of a make_grid grid."""
    top, left = padding + row * (size + padding), padding + column * (size + padding)
    return grid[:, top : top + size, left : left + size]


def identity_of(module, images: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine similarity of the images and their references, embedded by the module's image encoder as
    SampleGrid's identity metric does without identity_model."""
    encoder = module.adapter.encoder
    embedder = VisionEmbedder(
        encoder.backbone,
        crop=(encoder.image_size, encoder.image_size),
        mean=encoder.image_mean.flatten().tolist(),
        std=encoder.image_std.flatten().tolist(),
    )
    return IdentitySimilarity(embedder).score_batch(images, references).mean().item()


def _fit(model_path: Path, root: Path, callbacks: list, loggers, demo_faces_data) -> NestedAttentionModule:
    torch.manual_seed(0)
    module = NestedAttentionModule(
        str(model_path), _encoder_spec(model_path), subjects={"<person>": "person"}, optimizer=adamw(1e-2)
    )
    data = demo_faces_data(6, shuffle_buffer=8, validation=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        default_root_dir=str(root),
        logger=loggers,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data)
    return module


def test_sample_grid_logs_the_grid_and_metrics_without_copying_the_unet_or_changing_training(
    tiny_sd_path, tiny_clip_path, tmp_path, demo_faces_data
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grid = SampleGrid(
        every_n_steps=2,
        prompts=["a photo of {token}", "{token} on the beach"],
        num_references=2,
        seeds=[0, 1],
        steps=2,
        height=32,
        width=32,
        batch_size=8,
        reference_size=32,
        clip_model=str(tiny_clip_path),
        sample_at_start=True,
    )
    counter, probe, plain_probe = _UnetCounter(), _RngProbe(), _RngProbe()
    tensorboard = TensorBoardLogger(str(tmp_path / "with"), name="tb")
    csv_logger = CSVLogger(str(tmp_path / "with"), name="csv")
    sampled = _fit(
        tiny_sd_path, tmp_path / "with", [counter, grid, probe], [tensorboard, csv_logger], demo_faces_data
    )
    plain = _fit(
        tiny_sd_path,
        tmp_path / "without",
        [plain_probe],
        [CSVLogger(str(tmp_path / "without"))],
        demo_faces_data,
    )

    # The grid: 2 reference rows x (reference + 2 prompts x 2 seeds) columns of 32 px, 2 px padding.
    expected = (3, 2 * 32 + 3 * 2, 5 * 32 + 6 * 2)
    assert grid.last_grid.shape == expected
    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0})
    events.Reload()
    images = events.Images("samples/grid")
    assert [event.step for event in images] == [0, 2]
    assert all((event.height, event.width) == expected[1:] for event in images)
    with open(Path(csv_logger.log_dir) / "metrics.csv") as file:
        logged = [row for row in csv.DictReader(file) if row.get("samples/identity_similarity")]
    assert [int(row["step"]) for row in logged] == [0, 2]
    for row in logged:
        assert -1.0 <= float(row["samples/identity_similarity"]) <= 1.0
        assert np.isfinite(float(row["samples/prompt_alignment"]))
    # The metrics logged at step 2 are those of its grid, recomputed from the grid's tiles: each image
    # against its row's reference (the adapter's image encoder embeds both), and against its prompt with
    # the token replaced by the class word.
    tiles = [[grid_tile(grid.last_grid, r, c, 32) for c in range(5)] for r in range(2)]
    images = torch.stack([image for row in tiles for image in row[1:]])
    references = torch.stack([row[0] for row in tiles for _ in row[1:]])
    texts = ["a photo of person"] * 2 + ["person on the beach"] * 2
    alignment = PromptAlignment(str(tiny_clip_path)).score_batch(images, texts * 2)
    expected = {
        "samples/identity_similarity": identity_of(sampled, images, references),
        "samples/prompt_alignment": max(alignment.mean().item(), 0.0),  # CLIPScore clamps the mean at 0
    }
    assert grid.last_metrics == pytest.approx(expected, abs=1e-5)
    torch.testing.assert_close(grid.alignment.per_sample(), alignment, atol=1e-4, rtol=0)  # before the clamp
    assert {key: float(logged[-1][key]) for key in expected} == pytest.approx(expected, abs=1e-5)
    assert expected["samples/identity_similarity"] < 0.999  # an image against itself would score 1

    # No second UNet, even in the middle of sampling.
    assert counter.while_sampling is not None
    assert counter.while_sampling == counter.at_start

    # Sampling left the training trajectory untouched.
    assert probe.draws == plain_probe.draws and len(probe.draws) == 3
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(sampled.state_dict()[key], value, atol=0, rtol=0, msg=key)
    assert [m.training for m in sampled.modules()] == [m.training for m in plain.modules()]


def test_sample_grid_under_ddp_samples_on_rank_zero_without_hanging(
    tiny_sd_path, tiny_clip_path, tmp_path, demo_faces_data
):
    """Two CPU ranks (gloo): rank 0 samples while rank 1 waits at the next gradient sync."""
    module = NestedAttentionModule(
        str(tiny_sd_path), _encoder_spec(tiny_sd_path), subjects={"<person>": "person"}, optimizer=adamw(1e-2)
    )
    data = demo_faces_data(8)
    grid = SampleGrid(
        every_n_steps=1,
        prompts=["a photo of {token}"],
        references=str(DEMO_FACES / "val" / "shards.json"),
        steps=2,
        height=32,
        width=32,
        reference_size=32,
        clip_model=str(tiny_clip_path),
        sample_at_start=True,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        default_root_dir=str(tmp_path),
        logger=CSVLogger(str(tmp_path), name="csv"),  # no image support: grids are written as PNG files
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[grid],
    )
    trainer.fit(module, datamodule=data)
    log_dir = tmp_path / "csv" / "version_0"
    assert sorted(p.name for p in (log_dir / "samples").iterdir()) == [f"step={s:06d}.png" for s in range(3)]
    with open(log_dir / "metrics.csv") as file:
        steps = [int(row["step"]) for row in csv.DictReader(file) if row.get("samples/identity_similarity")]
    assert steps == [0, 1, 2]  # logged once per step: by rank 0 only


def test_sample_grid_refuses_at_fit_start_what_its_first_grid_could_not_draw(tiny_sd_path):
    module = make_module(tiny_sd_path)
    module.configure_model()
    with pytest.raises(ConfigError, match=rf"steps 1001 is more than the 1000 timesteps of {tiny_sd_path}'s"):
        SampleGrid(steps=1001).on_fit_start(None, module)
    SampleGrid(steps=1000).on_fit_start(None, module)


def test_the_samples_preset_builds_the_callback():
    import yaml

    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "callbacks" / "samples.yaml").read_text())
    (entry,) = preset["trainer"]["callbacks+"]
    assert entry["class_path"] == "nested.callbacks.SampleGrid"
    callback = SampleGrid(**entry["init_args"])  # every key is a real argument, with a valid value
    assert callback.every_n_steps == 500 and callback.clip_model


class _AdapterStates(L.Callback):
    """The module's adapter weights, and the EMA's, after every batch (placed around SampleGrid)."""

    def __init__(self, ema):
        self.ema, self.trained, self.averaged = ema, [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.trained.append({k: v.clone() for k, v in pl_module.adapter.state_dict().items()})
        self.averaged.append({k: v.clone() for k, v in self.ema.averaged_adapter().state_dict().items()})


def test_with_ema_the_sample_grid_draws_the_averaged_adapter_and_training_goes_on_from_its_own(
    tiny_sd_path, tmp_path, demo_faces_data, monkeypatch
):
    """The grid shows what is exported (the EMA average), and the weights training goes on from come back exactly."""
    from nested.callbacks import AdapterEMA
    from nested.callbacks import sample_grid as sample_grid_module

    drawn = []

    def recording_sample_images(backbone, adapter, *args, **kwargs):
        drawn.append({k: v.clone() for k, v in adapter.state_dict().items()})
        return sample_images(backbone, adapter, *args, **kwargs)

    monkeypatch.setattr(sample_grid_module, "sample_images", recording_sample_images)
    ema = AdapterEMA(decay=0.5)
    grid = SampleGrid(
        every_n_steps=2, prompts=["a photo of {token}"], num_references=1, seeds=[0], steps=1, height=32,
        width=32, reference_size=32, clip_model=None,
    )  # fmt: skip
    before, after = _AdapterStates(ema), _AdapterStates(ema)
    _fit(tiny_sd_path, tmp_path / "run", [ema, before, grid, after], False, demo_faces_data)

    assert len(drawn) == 1 and len(before.trained) == 3  # a grid at step 2 of 3
    for key, value in drawn[0].items():
        torch.testing.assert_close(value, before.averaged[1][key], atol=0, rtol=0, msg=key)
    assert any(not torch.equal(drawn[0][k], before.trained[1][k]) for k in drawn[0])  # the average, not these
    # After the grid, the module holds its trained weights again and the EMA its average, exactly.
    for key, value in before.trained[1].items():
        assert torch.equal(after.trained[1][key], value), key
    for key, value in before.averaged[1].items():
        assert torch.equal(after.averaged[1][key], value), key


def test_the_ema_decay_warms_up_as_diffusers_emamodel_does(tiny_sd_path, tmp_path, demo_faces_data):
    """After n updates the average moves toward the weights by 1 - min(decay, (1 + n) / (10 + n)); the first update
    copies them. A fixed decay would keep most of the initial adapter for ~1 / (1 - decay) steps."""
    from nested.callbacks import AdapterEMA

    ema = AdapterEMA(decay=0.2)  # reached at the second update: (1 + 1) / (10 + 1) = 0.18 < 0.2 < 3 / 12
    states = _AdapterStates(ema)
    _fit(tiny_sd_path, tmp_path / "run", [ema, states], False, demo_faces_data)

    assert len(states.trained) == 3
    expected = {k: v.double() for k, v in states.trained[0].items()}  # the first update copies
    for n, (trained, averaged) in enumerate(zip(states.trained, states.averaged, strict=True)):
        if n:
            decay = min(0.2, (1 + n) / (10 + n))
            expected = {k: decay * v + (1 - decay) * trained[k].double() for k, v in expected.items()}
        for key, value in expected.items():
            torch.testing.assert_close(
                averaged[key].double(), value, atol=1e-6, rtol=0, msg=f"update {n}: {key}"
            )
    assert any(not torch.equal(states.averaged[2][k], states.trained[2][k]) for k in expected)

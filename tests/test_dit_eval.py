"""``nested eval`` and the SampleGrid callback on tiny SD3.5-like and FLUX-like bases."""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import math
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from PIL import Image
from safetensors.torch import load_file
from skimage.data import astronaut, chelsea
from test_dit_pipeline import KINDS, PIPELINES, loaded_pipelines, make_adapter, tiny_pipeline
from test_module import adamw
from test_sampling import grid_tile, identity_of

from nested.adapter import WEIGHTS_NAME as ADAPTER_WEIGHTS
from nested.backbone import TransformerBackbone
from nested.callbacks import SampleGrid
from nested.cli.eval import main_eval
from nested.cli.main import main
from nested.encoder import EncoderSpec
from nested.errors import ConfigError
from nested.evaluation.metrics import PromptAlignment
from nested.inference.pipeline import NestedPipeline
from nested.inference.sampler import default_size, sample_images
from nested.testing import write_tiny_clip
from nested.training.module import NestedAttentionModule

REPO = Path(__file__).resolve().parents[1]
DEMO_FACES = REPO / "data" / "demo" / "faces"
DEFAULT = {"sd3": 7.0, "flux": 3.5}  # the guidance of StableDiffusion3Pipeline / FluxPipeline


@pytest.fixture(scope="module")
def bases(tiny_sd3_path: Path, tiny_flux_path: Path) -> dict[str, Path]:
    return {"sd3": tiny_sd3_path, "flux": tiny_flux_path}


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def subjects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("subjects")
    for name, pixels in (("me", astronaut()), ("rex", chelsea())):
        Image.fromarray(pixels).resize((48, 48)).save(folder / f"{name}.png")
    return folder


def eval_argv(base: Path, adapter: Path, prompts: Path, subjects: Path, clip: Path, out: Path) -> list[str]:
    return [
        "--base", str(base),
        "--adapter", f"<person>={adapter}",
        "--prompts", str(prompts),
        "--subjects", str(subjects),
        "--strengths", "0,1.0",
        "--seeds", "0",
        "--clip", str(clip),
        "--steps", "2",
        "--height", "32",
        "--width", "32",
        "--reference-size", "48",
        "--out", str(out),
        "--no-progress",
    ]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_eval_runs_end_to_end_on_a_transformer_base(kind, bases, subjects, tiny_clip_path, tmp_path):
    base = bases[kind]
    adapter = make_adapter(tiny_pipeline(base), base, "<person>", "person", 1).save_pretrained(
        tmp_path / "adapter"
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token} at the beach\n")
    out = tmp_path / "eval"
    assert main_eval(eval_argv(base, adapter, prompts, subjects, tiny_clip_path, out)) == 0

    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    base_rows = [r for r in rows if r["variant"] == "base"]
    adapter_rows = [r for r in rows if r["variant"] == "adapter"]
    assert len(base_rows) == 2 and len(adapter_rows) == 2 * 2  # subjects; subjects x strengths
    assert {r["clip_text"] for r in rows} == {"a photo of person at the beach"}
    images = {(r["subject"], r["strength"]): (out / r["image"]).read_bytes() for r in adapter_rows}
    # The subject reaches the transformer: strength 1 differs from strength 0 for every subject.
    for name in ("me", "rex"):
        assert images[name, "0.0"] != images[name, "1.0"]
    summary = json.loads((out / "summary.json").read_text())
    assert [p["label"] for p in summary["points"]] == ["base", "s=0", "s=1"]
    assert summary["guidance"] == {"sd3": 7.0, "flux": 3.5}[kind]  # the pipeline's own default
    with Image.open(out / "grid.png") as grid:
        # 2 rows x (reference, base, 2 strengths) of 32 px shown at 128 px, a header and a prompt line per row
        assert grid.size == (4 * 128 + 5 * 4, 20 + 2 * (20 + 128 + 4) + 4)


def test_eval_image_encoder_overrides_the_adapters_vision_backbone(
    bases, subjects, tiny_clip_path, tmp_path, capsys
):
    base = bases["sd3"]
    moved = shutil.copytree(base / "image_encoder", tmp_path / "moved" / "image_encoder")
    adapter = make_adapter(tiny_pipeline(base), moved.parent, "<person>", "person", 1).save_pretrained(
        tmp_path / "adapter"
    )
    shutil.rmtree(moved)  # the folder the adapter names is gone
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\n")
    argv = eval_argv(base, adapter, prompts, subjects, tiny_clip_path, tmp_path / "eval")
    capsys.readouterr()
    assert main_eval(argv) == 2
    assert str(moved) in capsys.readouterr().err.strip().splitlines()[-1]
    assert main_eval([*argv, "--image-encoder", str(base / "image_encoder")]) == 0
    assert (tmp_path / "eval" / "results.csv").is_file()


def test_eval_quantizes_the_named_base_components_and_records_it(
    bases, subjects, tiny_clip_path, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("torchao", reason="the quantize extra (torchao) is not installed")
    loaded = loaded_pipelines(monkeypatch)  # to look at the weights nested eval computed with
    base = bases["flux"]
    adapter = make_adapter(tiny_pipeline(base), base, "<person>", "person", 1).save_pretrained(
        tmp_path / "adapter"
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\n")
    argv = eval_argv(base, adapter, prompts, subjects, tiny_clip_path, tmp_path / "eval")
    quantize = ["--dtype", "bfloat16", "--quantize", "transformer=int8", "--quantize", "text_encoder_2=int8"]
    assert main_eval([*argv, *quantize]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["quantize"] == {"transformer": "int8", "text_encoder_2": "int8"}
    (pipe,) = (nested.pipe for nested in loaded)
    for name in ("transformer", "text_encoder_2"):
        weights = [m.weight for m in getattr(pipe, name).modules() if isinstance(m, torch.nn.Linear)]
        assert weights and all(w.qdata.dtype == torch.int8 for w in weights), name  # stored in 8 bits
    assert all(type(p) is torch.nn.Parameter for p in pipe.text_encoder.parameters())  # not named
    with open(tmp_path / "eval" / "results.csv") as file:
        assert len(list(csv.DictReader(file))) == 2 + 2 * 2  # base and adapter rows, as unquantized
    capsys.readouterr()
    argv[argv.index("--out") + 1] = str(tmp_path / "refused")
    assert main_eval([*argv, "--quantize", "vae=int8"]) == 2
    assert capsys.readouterr().err.strip().startswith("nested eval: error: cannot quantize vae: ")
    assert not (tmp_path / "refused").exists()


def test_eval_refuses_a_negative_prompt_for_flux_in_one_line(
    bases, subjects, tiny_clip_path, tmp_path, capsys
):
    base = bases["flux"]
    adapter = make_adapter(tiny_pipeline(base), base, "<person>", "person", 1).save_pretrained(
        tmp_path / "adapter"
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\n")
    out = tmp_path / "eval"
    argv = eval_argv(base, adapter, prompts, subjects, tiny_clip_path, out)
    capsys.readouterr()
    assert main_eval([*argv, "--negative-prompt", "lowres"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the models' loading bars
    assert line.startswith("nested eval: error: --negative-prompt:") and f"{base} is a FLUX model" in line
    assert not out.exists()


# ------------------------------------------------------------------------------------ SampleGrid
def _count_transformers() -> int:
    gc.collect()
    return sum(isinstance(obj, (SD3Transformer2DModel, FluxTransformer2DModel)) for obj in gc.get_objects())


COUNTERS: list[TransformerCounter] = []  # the instances the CLI made


class TransformerCounter(L.Callback):
    """Counts transformer objects at the start and during the first sampling call (which runs without grad)."""

    def __init__(self):
        self.at_start = self.while_sampling = None
        COUNTERS.append(self)

    def on_train_start(self, trainer, pl_module):
        self.at_start = _count_transformers()

        def hook(module, args, kwargs):
            if not torch.is_grad_enabled() and self.while_sampling is None:
                self.while_sampling = _count_transformers()

        pl_module.backbone.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def _fit(kind: str, root: Path, extra_config: Path | None) -> None:
    argv = ["fit", "--config", f"configs/smoke-{kind}.yaml"]
    if extra_config is not None:
        argv += ["--config", str(extra_config)]
    main(
        [
            *argv,
            f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=CSVLogger",
            f"--trainer.logger.save_dir={root}",
            "--trainer.enable_progress_bar=false",
        ]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_sample_grid_writes_grids_during_fit_without_changing_training(
    kind, tiny_clip_path, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["nested"])
    COUNTERS.clear()
    preset = yaml.safe_load((REPO / "callbacks" / "samples.yaml").read_text())
    preset["trainer"]["callbacks+"][0]["init_args"].update(
        every_n_steps=2,
        prompts=["a photo of {token}", "{token} on the beach"],
        steps=2,
        reference_size=32,
        clip_model=str(tiny_clip_path),
        sample_at_start=True,
    )
    preset["trainer"]["callbacks+"].append({"class_path": f"{__name__}.TransformerCounter"})
    samples_config = tmp_path / "samples.yaml"
    samples_config.write_text(yaml.safe_dump(preset))
    # Each grid with the metrics logged for it, and the module sampled from, to recompute them.
    sampled = []
    log_samples = SampleGrid.log_samples

    def keep(grid, trainer, pl_module):
        log_samples(grid, trainer, pl_module)
        per_sample = grid.alignment.per_sample()  # CLIP scores before the mean's clamp at 0
        sampled.append((trainer.global_step, grid.last_grid, grid.last_metrics, per_sample, pl_module))

    monkeypatch.setattr(SampleGrid, "log_samples", keep)
    _fit(kind, tmp_path / "with", samples_config)
    _fit(kind, tmp_path / "without", None)

    # CSVLogger shows no images: every grid is a PNG, 2 references x (reference + 2 prompts) of 32 px.
    (samples,) = (tmp_path / "with").rglob("samples")
    assert sorted(p.name for p in samples.iterdir()) == [f"step={s:06d}.png" for s in (0, 2, 4)]
    for path in samples.iterdir():
        with Image.open(path) as grid:
            assert grid.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)
    with open(next((tmp_path / "with").rglob("metrics.csv"))) as handle:
        logged = [r for r in csv.DictReader(handle) if r.get("samples/identity_similarity")]
    assert [int(r["step"]) for r in logged] == [0, 2, 4]
    assert all(math.isfinite(float(r["samples/prompt_alignment"])) for r in logged)
    # The logged metrics are those of each grid, recomputed from its tiles: each image against its row's
    # reference (embedded by the adapter's image encoder) and against its prompt with the class word.
    alignment = PromptAlignment(str(tiny_clip_path))
    assert [step for step, *_ in sampled] == [0, 2, 4]
    for row, (step, grid, metrics, per_sample, module) in zip(logged, sampled, strict=True):
        tiles = [[grid_tile(grid, r, c, 32) for c in range(3)] for r in range(2)]
        images = torch.stack([image for row_tiles in tiles for image in row_tiles[1:]])
        references = torch.stack([row_tiles[0] for row_tiles in tiles for _ in row_tiles[1:]])
        texts = ["a photo of person", "person on the beach"] * 2
        scores = alignment.score_batch(images, texts)
        expected = {
            "samples/identity_similarity": identity_of(module, images, references),
            "samples/prompt_alignment": max(scores.mean().item(), 0.0),  # CLIPScore clamps the mean at 0
        }
        assert metrics == pytest.approx(expected, abs=1e-5), step
        torch.testing.assert_close(per_sample, scores, atol=1e-4, rtol=0, msg=f"step {step}")
        assert {key: float(row[key]) for key in expected} == pytest.approx(expected, abs=1e-5), step
        assert expected["samples/identity_similarity"] < 0.999  # an image against itself would score 1

    # No second transformer, even in the middle of sampling.
    (counter,) = [c for c in COUNTERS if c.while_sampling is not None]
    assert counter.while_sampling == counter.at_start

    # Sampling left the training trajectory untouched: the exported adapters are the same tensors.
    with_grid = load_file(tmp_path / "with" / "adapters" / "last" / ADAPTER_WEIGHTS)
    without = load_file(tmp_path / "without" / "adapters" / "last" / ADAPTER_WEIGHTS)
    assert with_grid.keys() == without.keys()
    for key, value in without.items():
        torch.testing.assert_close(with_grid[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_images_on_a_transformer_matches_nested_pipeline(kind, bases, subjects):
    backbone = TransformerBackbone.from_pretrained(bases[kind], max_sequence_length=32)
    pipe = _pipeline_of(backbone)
    adapter = make_adapter(pipe, bases[kind], "<person>", "person", 3).eval()
    nested = NestedPipeline(pipe, {"<person>": adapter})  # adds <person> to the text encoders, attaches
    names = ["tokenizer", "tokenizer_2", "tokenizer_3"][: len(backbone.tokenizers)]
    view = dataclasses.replace(backbone, tokenizers=[getattr(pipe, name) for name in names])  # with <person>
    reference = torch.from_numpy(np.asarray(Image.open(subjects / "me.png"))).permute(2, 0, 1) / 255
    prompts, seeds = ["a photo of <person>", "<person> on the beach"], [0, 1]
    guidance = {"sd3": 5.0, "flux": 3.5}[kind]
    theirs = nested(
        prompts,
        subjects={"<person>": reference},
        strengths={"<person>": 0.8},
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=2,
        guidance_scale=guidance,
        height=32,
        width=32,
        max_sequence_length=32,
        output_type="pt",
    ).images
    common = dict(seeds=seeds, steps=2, guidance=guidance, height=32, width=32)
    ours = sample_images(view, adapter, prompts, reference[None], scale=0.8, **common)
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    without_subject = sample_images(view, adapter, prompts, reference[None], scale=0.0, **common)
    assert (ours - without_subject).abs().max() > 1e-3  # the subject is really bound
    assert adapter._bindings == []  # and unbound afterwards
    nested.unload()


@pytest.mark.parametrize("kind", KINDS)
def test_sample_images_takes_the_pipelines_default_size_and_refuses_what_the_patches_cannot_cut(kind, bases):
    backbone = TransformerBackbone.from_pretrained(bases[kind], max_sequence_length=32)
    pipe = _pipeline_of(backbone)
    assert default_size(backbone) == pipe.default_sample_size * pipe.vae_scale_factor  # FLUX's: 128 latents
    assert backbone.side_multiple == backbone.vae_scale_factor * 2 == 8  # 2 x 2 patches of factor-4 latents
    for size in (36, 4):
        with pytest.raises(ConfigError, match=f"height and width must be multiples of 8, got {size}x32"):
            sample_images(backbone, None, ["a photo"], steps=1, height=size, width=32)


def _pipeline_of(backbone: TransformerBackbone):
    """A diffusers pipeline REFERENCING the backbone's modules (only to compare against)."""
    *clips, t5 = zip(backbone.tokenizers, backbone.text_encoders, strict=True)
    text = {}
    for suffix, (tokenizer, encoder) in zip(["", "_2", "_3"], [*clips, t5], strict=False):
        text[f"tokenizer{suffix}"], text[f"text_encoder{suffix}"] = tokenizer, encoder
    pipe = PIPELINES[backbone.kind](
        transformer=backbone.transformer,
        vae=backbone.vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(backbone.scheduler_config),
        **text,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", KINDS)
def test_sample_grid_guidance_defaults_to_the_models_own(kind, bases, tmp_path, demo_faces_data):
    """Three grids in one run: guidance unset, the model's default given, another value given."""
    base = bases[kind]
    spec = EncoderSpec(backbone=str(base / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2)
    torch.manual_seed(0)
    module = NestedAttentionModule(
        str(base), spec, subjects={"<person>": "person"}, max_sequence_length=32, optimizer=adamw(1e-2)
    )
    data = demo_faces_data(2)
    common = dict(
        every_n_steps=100,
        prompts=["a photo of {token}"],
        references=str(DEMO_FACES / "val" / "shards.json"),
        num_references=1,
        steps=2,
        reference_size=32,
        sample_at_start=True,
    )
    grids = [
        SampleGrid(**common),
        SampleGrid(guidance=DEFAULT[kind], **common),
        SampleGrid(guidance=1.5, **common),
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=grids,
    )
    trainer.fit(module, datamodule=data)
    unset, default, other = (grid.last_grid for grid in grids)
    assert torch.equal(unset, default)
    assert (unset - other).abs().max() > 1e-3

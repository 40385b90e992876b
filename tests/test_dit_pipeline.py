"""NestedPipeline and ``nested generate`` on tiny SD3.5-like and FLUX-like pipelines."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from huggingface_hub import ModelCard
from PIL import Image
from skimage.data import astronaut, chelsea
from test_generate import NESTED, strict_json

from nested.adapter import NestedAdapter, cross_attention_layers
from nested.cli.generate import main_generate
from nested.encoder import EncoderSpec
from nested.errors import ConfigError
from nested.hub.model_card import model_card
from nested.inference.pipeline import NestedPipeline
from nested.testing import write_hub_cache

PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
KINDS = ["sd3", "flux"]


def tiny_pipeline(path: Path):
    pipe = PIPELINES[path.name.removeprefix("tiny-")].from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_adapter(pipe, folder: Path, token: str, class_word: str, seed: int) -> NestedAdapter:
    """A tiny adapter with visible effects at random init, and learned placeholder embeddings for the CLIPs."""
    torch.manual_seed(seed)
    spec = EncoderSpec(backbone=str(folder / "image_encoder"), num_tokens=6, width=32, depth=1, heads=2)
    adapter = NestedAdapter.for_unet(pipe.transformer, token=token, class_word=class_word, encoder=spec)
    for layer in adapter.layers.values():
        torch.nn.init.normal_(layer.to_k.weight, std=0.5)
        torch.nn.init.normal_(layer.to_v.weight, std=0.5)
    names = (
        ["text_encoder", "text_encoder_2"] if isinstance(pipe, StableDiffusion3Pipeline) else ["text_encoder"]
    )
    for name in names:
        width = getattr(pipe, name).get_input_embeddings().weight.shape[1]
        adapter.token_embeddings[f"{name}:{token}"] = torch.nn.Parameter(
            torch.randn(width), requires_grad=False
        )
    adapter.config.token_encoders = names
    return adapter


@pytest.fixture(scope="module")
def setup(tiny_sd3_path, tiny_flux_path, tmp_path_factory):
    """Per kind: the base folder and two saved adapters (<person>, <dog>); two subject images as files."""
    root = tmp_path_factory.mktemp("dit-adapters")
    result = {}
    for kind, base in (("sd3", tiny_sd3_path), ("flux", tiny_flux_path)):
        pipe = tiny_pipeline(base)
        result[kind] = {
            "base": base,
            "faces": make_adapter(pipe, base, "<person>", "person", 1).save_pretrained(
                root / f"{kind}-faces"
            ),
            "pets": make_adapter(pipe, base, "<dog>", "dog", 2).save_pretrained(root / f"{kind}-pets"),
        }
    result["images"] = {}
    for name, pixels in (("me", astronaut()), ("rex", chelsea())):
        result["images"][name] = root / f"{name}.png"
        Image.fromarray(pixels).resize((48, 48)).save(result["images"][name])
    return result


def generate(pipe, prompt, **kwargs) -> np.ndarray:
    """2 steps at 32 x 32 px, 32 T5 tokens, as a (B, 32, 32, 3) array."""
    kwargs = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 32, **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


PROMPTS = ["a photo of <person> at the beach", "a photo of a dog at the beach"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_subject_changes_only_the_images_whose_prompt_holds_its_token(setup, kind):
    pipe = tiny_pipeline(setup[kind]["base"])
    plain = generate(pipe, ["a photo of a dog at the beach"])
    plain_batch = generate(pipe, PROMPTS)  # the same noise per row as the calls below
    with NestedPipeline(pipe, {"<person>": setup[kind]["faces"]}) as nested:
        assert nested.kind == kind
        # No subject and no token: bit for bit the plain pipeline.
        assert np.array_equal(generate(nested, ["a photo of a dog at the beach"]), plain)
        with pytest.warns(UserWarning, match="is in the prompt but has no subject"):
            without = generate(nested, PROMPTS)
        subject = setup["images"]["me"]
        with_subject = generate(nested, PROMPTS, subjects={"<person>": subject})
        assert np.abs(with_subject[0] - without[0]).max() > 1e-3
        np.testing.assert_allclose(with_subject[1], without[1], atol=1e-5)
        np.testing.assert_allclose(with_subject[1], plain_batch[1], atol=1e-5)
        # Several images per prompt: each prompt's rows follow each other, as in diffusers' batches.
        with pytest.warns(UserWarning, match="is in the prompt but has no subject"):
            without = generate(nested, PROMPTS, num_images_per_prompt=2)
        with_subject = generate(nested, PROMPTS, subjects={"<person>": subject}, num_images_per_prompt=2)
        assert min(np.abs(with_subject[i] - without[i]).max() for i in (0, 1)) > 1e-3
        np.testing.assert_allclose(with_subject[2:], without[2:], atol=1e-5)
        # The token split into pieces by T5 binds in each: the SD3 CLIP part holds one placeholder token.
        masks = nested._masks("<person>", PROMPTS, None, 32)
        assert masks.shape[1] == (77 + 32 if kind == "sd3" else 32)
        assert masks[0].sum() == (1 + 4 if kind == "sd3" else 4) and not masks[1].any()
    assert all(
        type(attn.processor).__module__.startswith("diffusers")
        for attn in cross_attention_layers(pipe.transformer).values()
    )
    assert np.array_equal(generate(pipe, ["a photo of a dog at the beach"]), plain)  # unload is exact


@pytest.mark.parametrize("kind", KINDS)
def test_two_subjects_from_two_adapters_in_one_image(setup, kind):
    pipe = tiny_pipeline(setup[kind]["base"])
    adapters = {"<person>": setup[kind]["faces"], "<dog>": setup[kind]["pets"]}
    prompt = "a <person> walking a <dog> on the beach"
    me, rex = setup["images"]["me"], setup["images"]["rex"]
    with NestedPipeline(pipe, adapters) as nested:
        assert nested.adapter("<person>") is not nested.adapter("<dog>")
        both = generate(nested, prompt, subjects={"<person>": me, "<dog>": rex})[0]
        with pytest.warns(UserWarning, match="'<dog>' is in the prompt but has no subject"):
            person_only = generate(nested, prompt, subjects={"<person>": me})[0]
        with pytest.warns(UserWarning, match="'<person>' is in the prompt but has no subject"):
            dog_only = generate(nested, prompt, subjects={"<dog>": rex})[0]
        swapped = generate(nested, prompt, subjects={"<person>": rex, "<dog>": me})[0]
    for other in (person_only, dog_only, swapped):
        assert np.abs(both - other).max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_gives_identical_images(setup, kind, tmp_path):
    pipe = tiny_pipeline(setup[kind]["base"])
    adapter = make_adapter(pipe, setup[kind]["base"], "<person>", "person", 5)
    subjects = {"<person>": setup["images"]["me"]}
    with NestedPipeline(pipe, {"<person>": adapter}) as nested:
        in_memory = generate(nested, PROMPTS[0], subjects=subjects)
    adapter.save_pretrained(tmp_path / "saved")
    with NestedPipeline(pipe, {"<person>": tmp_path / "saved"}) as nested:
        loaded = generate(nested, PROMPTS[0], subjects=subjects)
    assert np.array_equal(in_memory, loaded)


def test_sd3_loaded_without_t5_binds_the_subject_in_its_clip_part(setup):
    """diffusers runs SD3 without T5 (its part of the text is zeros): the placeholder goes into both CLIPs with
    the adapter's learned embeddings, and the subject binds where it does with T5, in the CLIP part only."""
    base, faces, me = setup["sd3"]["base"], setup["sd3"]["faces"], setup["images"]["me"]
    with NestedPipeline(tiny_pipeline(base), {"<person>": faces}) as with_t5:
        expected = with_t5._masks("<person>", PROMPTS, None, 32)
    pipe = StableDiffusion3Pipeline.from_pretrained(base, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    with NestedPipeline(pipe, {"<person>": faces}) as nested:
        for suffix in ("", "_2"):
            token_id = getattr(pipe, f"tokenizer{suffix}").convert_tokens_to_ids("<person>")
            embedding = getattr(pipe, f"text_encoder{suffix}").get_input_embeddings().weight[token_id]
            learned = nested.adapter("<person>").token_embeddings[f"text_encoder{suffix}:<person>"]
            assert torch.equal(embedding, learned)
        masks = nested._masks("<person>", PROMPTS, None, 32)
        assert masks.shape == expected.shape and torch.equal(masks[:, :77], expected[:, :77])
        assert masks[0, :77].sum() == 1 and not masks[:, 77:].any()
        with pytest.warns(UserWarning, match="is in the prompt but has no subject"):
            without = generate(nested, PROMPTS)
        with_subject = generate(nested, PROMPTS, subjects={"<person>": me})
    assert np.abs(with_subject[0] - without[0]).max() > 1e-3
    np.testing.assert_allclose(with_subject[1], without[1], atol=1e-5)


def test_flux_without_t5_and_sizes_the_pipeline_cannot_draw_are_refused_in_one_line(setup):
    me = setup["images"]["me"]
    pipe = FluxPipeline.from_pretrained(setup["flux"]["base"], text_encoder_2=None, tokenizer_2=None)
    refused = pytest.raises(ConfigError, match=r"no T5 text encoder \(text_encoder_2\), and FLUX reads")
    with NestedPipeline(pipe, {"<person>": setup["flux"]["faces"]}) as nested, refused:
        generate(nested, PROMPTS, subjects={"<person>": me})
    for kind in KINDS:  # the tiny VAEs' factor 4 x the 2 x 2 patches: FluxPipeline would resize, SD3's raise
        with NestedPipeline(tiny_pipeline(setup[kind]["base"]), {"<person>": setup[kind]["faces"]}) as nested:
            assert nested.side_multiple == 8
            name = type(nested.pipe).__name__
            for size in {"height": 36}, {"width": 44}, {"height": 4}:
                ((option, value),) = size.items()
                use = max(8, value - value % 8)
                with pytest.raises(
                    ConfigError,
                    match=rf"{option} {value} is not a positive multiple of 8 pixels, "
                    rf"which this {name} needs: use {use}\.",
                ):
                    generate(nested, PROMPTS, subjects={"<person>": me}, **size)
                with pytest.raises(ConfigError, match=f"{option} {value} is not"):
                    generate(nested, PROMPTS[1], **size)
            # SD3's position embedding covers 16 patches of 2x2 latents of 4x4 pixels per side: 128 px.
            if kind == "sd3":
                with pytest.raises(
                    ConfigError, match=r"^width 136 is more than the 128 pixels per side that this SD3"
                ):
                    generate(nested, PROMPTS, subjects={"<person>": me}, width=136)


def test_a_model_card_tags_the_transformer_family_the_adapter_was_trained_on(setup, tiny_adapter):
    tags = {kind: ModelCard(model_card(setup[kind]["faces"])).data.tags for kind in KINDS}
    assert "flux" in tags["flux"] and "stable-diffusion-3" in tags["sd3"]
    assert not {"stable-diffusion", "stable-diffusion-xl"} & {*tags["flux"], *tags["sd3"]}
    assert "stable-diffusion" in ModelCard(model_card(tiny_adapter)).data.tags


def test_flux_true_cfg_gives_the_negative_prompt_call_no_subject(setup):
    pipe = tiny_pipeline(setup["flux"]["base"])
    subjects = {"<person>": setup["images"]["me"]}
    true_cfg = {"negative_prompt": "lowres", "true_cfg_scale": 2.0}
    with NestedPipeline(pipe, {"<person>": setup["flux"]["faces"]}) as nested:
        adapter = nested.adapter("<person>")
        bound = []  # per transformer call: whether the adapter's subject is bound
        hook = pipe.transformer.register_forward_pre_hook(lambda *_: bound.append(bool(adapter._bindings)))
        with_subject = generate(nested, PROMPTS[0], subjects=subjects, **true_cfg)
        hook.remove()
        assert bound == [True, False, True, False]  # 2 steps: the prompt's call, then the negative prompt's
        with pytest.warns(UserWarning, match="has no subject"):
            without = generate(nested, PROMPTS[0], **true_cfg)
        assert np.abs(with_subject - without).max() > 1e-3
        assert "cache_context" not in vars(pipe.transformer)  # the call's own wrapper is gone
        assert generate(nested, PROMPTS[0], subjects=subjects, **true_cfg).tobytes() == with_subject.tobytes()


def cli(setup, kind, out, *extra) -> list[str]:
    return [
        "--base",
        str(setup[kind]["base"]),
        "--adapter",
        f"<person>={setup[kind]['faces']}",
        "--adapter",
        f"<dog>={setup[kind]['pets']}",
        "--subject",
        f"<person>={setup['images']['me']}",
        "--subject",
        f"<dog>={setup['images']['rex']}",
        "--prompt",
        "a <person> walking a <dog> on the beach",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_generate_end_to_end(setup, kind, tmp_path, capsys):
    extra = ["--negative-prompt", "lowres"] if kind == "sd3" else []
    assert main_generate(cli(setup, kind, tmp_path / "a", *extra)) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "generation.json",
        "image-000.png",
        "image-001.png",
    ]
    first = Image.open(tmp_path / "a" / "image-000.png")
    assert first.size == (32, 32) and np.asarray(first).std() > 1
    settings = strict_json(tmp_path / "a" / "generation.json")
    pipeline = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[kind]
    assert settings["base"]["pipeline"] == pipeline
    assert settings["guidance"] == {"sd3": 7.0, "flux": 3.5}[kind]  # the pipeline's own default
    assert (settings["height"], settings["width"]) == (32, 32)
    assert settings["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler"
    assert set(settings["adapters"]) == {"<person>", "<dog>"}
    assert [i["seed"] for i in settings["images"]] == [0, 1]

    # The recorded command reproduces the images.
    replay = settings["command"][2:]
    replay[replay.index("--out") + 1] = str(tmp_path / "b")
    assert main_generate(replay) == 0
    for name in ("image-000.png", "image-001.png"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()

    # A used --out is refused and left as it was.
    before = (tmp_path / "a" / "generation.json").read_bytes()
    capsys.readouterr()
    assert main_generate(cli(setup, kind, tmp_path / "a", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"nested generate: error: --out '{tmp_path / 'a'}' is not empty") and "\n" not in err
    )
    assert (tmp_path / "a" / "generation.json").read_bytes() == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--guidance", "nan"], "--guidance"),
        (["--negative-prompt", "lowres"], "--negative-prompt: "),  # FLUX has no negative prompt
        (["--strength", "<dog>=inf"], "--strength '<dog>=inf'"),
    ],
)
def test_generate_user_errors_on_flux_are_one_line(setup, tmp_path, capsys, change, message):
    assert main_generate(cli(setup, "flux", tmp_path / "out", *change)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nested generate: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_a_flux_adapter_is_refused_on_sd3_naming_the_layer(setup, tmp_path):
    argv = cli(setup, "sd3", tmp_path / "out")
    argv[argv.index("--adapter") + 1] = f"<person>={setup['flux']['faces']}"
    result = subprocess.run(
        [*NESTED, "generate", *argv], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert err.startswith("nested generate: error: the adapter for '<person>'") and "\n" not in err
    # The FLUX single-stream layer SD3 lacks, named.
    assert "layer 'single_transformer_blocks.0.attn', which this SD3Transformer2DModel does not have" in err
    assert not (tmp_path / "out").exists()


def test_generate_takes_a_hub_id_for_the_base(setup, tmp_path):
    # The Hub cache layout, read offline by the real command.
    write_hub_cache(setup["flux"]["base"], tmp_path / "hub", "nested-tests/tiny-flux")
    argv = cli(setup, "flux", tmp_path / "hub-out")
    argv[argv.index("--base") + 1] = "nested-tests/tiny-flux"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [*NESTED, "generate", *argv], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    settings = strict_json(tmp_path / "hub-out" / "generation.json")
    assert settings["base"] == {
        "name_or_path": "nested-tests/tiny-flux",
        "revision": None,
        "pipeline": "FluxPipeline",
    }
    # The same images as from the folder itself.
    assert main_generate(cli(setup, "flux", tmp_path / "folder-out")) == 0
    for name in ("image-000.png", "image-001.png"):
        assert (tmp_path / "hub-out" / name).read_bytes() == (tmp_path / "folder-out" / name).read_bytes()


def loaded_pipelines(monkeypatch: pytest.MonkeyPatch) -> list[NestedPipeline]:
    """Every pipeline ``NestedPipeline.from_pretrained`` loads from now on, in order (the commands load theirs
    through it)."""
    loaded = []
    load = NestedPipeline.from_pretrained.__func__

    def keep(cls, *args, **kwargs):
        loaded.append(load(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(NestedPipeline, "from_pretrained", classmethod(keep))
    return loaded


def test_from_pretrained_reads_a_hub_id_through_the_hub_options_it_is_given(tiny_sd_path, tmp_path):
    """cache_dir= (token=, local_files_only=...) reach the Hub for model_index.json as for the weights."""
    cache = write_hub_cache(tiny_sd_path, tmp_path / "cache", "nested-tests/tiny-sd")
    pipe = NestedPipeline.from_pretrained("nested-tests/tiny-sd", cache_dir=str(cache), local_files_only=True)
    assert type(pipe.pipe).__name__ == "StableDiffusionPipeline"


def test_generate_quantized_flux_draws_nearly_the_dense_images_and_refuses_bad_settings(
    setup, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("torchao", reason="the quantize extra (torchao) is not installed")
    loaded = loaded_pipelines(monkeypatch)  # to look at the weights nested generate computed with
    assert main_generate(cli(setup, "flux", tmp_path / "dense", "--dtype", "bfloat16")) == 0
    quantized = [
        "--dtype",
        "bfloat16",
        "--quantize",
        "transformer=int8",
        "--quantize",
        "text_encoder_2=int8",
    ]
    assert main_generate(cli(setup, "flux", tmp_path / "int8", *quantized)) == 0
    settings = strict_json(tmp_path / "int8" / "generation.json")
    assert settings["quantize"] == {"transformer": "int8", "text_encoder_2": "int8"}
    dense_pipe, int8_pipe = (pipe.pipe for pipe in loaded)
    for name in ("transformer", "text_encoder_2"):
        weights = [m.weight for m in getattr(int8_pipe, name).modules() if isinstance(m, torch.nn.Linear)]
        assert weights and all(w.qdata.dtype == torch.int8 for w in weights), name  # stored in 8 bits
        assert all(type(p) is torch.nn.Parameter for p in getattr(dense_pipe, name).parameters())
    assert all(type(p) is torch.nn.Parameter for p in int8_pipe.text_encoder.parameters())  # not named
    for name in ("image-000.png", "image-001.png"):
        dense, rounded = (
            np.asarray(Image.open(tmp_path / run / name), dtype=float) for run in ("dense", "int8")
        )
        assert rounded.std() > 1
        # Grey levels; 0.41 and 0.48 here: near the dense images, yet drawn with the rounded weights.
        assert 0.05 < np.abs(dense - rounded).mean() < 2
    capsys.readouterr()
    for change, message in [
        (
            ["--quantize", "transformer=int4"],
            "--quantize: transformer has format 'int4'; the formats are int8",
        ),
        (
            ["--quantize", "transformer"],
            "--quantize expects COMPONENT=FORMAT (e.g. --quantize transformer=int8)",
        ),
        (["--quantize", "unet=int8"], "cannot quantize unet: "),
    ]:
        assert main_generate(cli(setup, "flux", tmp_path / "refused", *change)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"nested generate: error: {message}") and "\n" not in err, err
        assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_max_sequence_length_none_is_the_pipelines_default(setup, kind):
    pipe = tiny_pipeline(setup[kind]["base"])
    with NestedPipeline(pipe, {"<person>": setup[kind]["faces"]}) as nested:
        subjects = {"<person>": setup["images"]["me"]}
        default = generate(
            nested, PROMPTS[0], subjects=subjects, num_inference_steps=1, max_sequence_length=None
        )
        kwargs = {"num_inference_steps": 1, "height": 32, "width": 32, "output_type": "np"}
        omitted = nested(PROMPTS[0], subjects=subjects, generator=torch.Generator().manual_seed(0), **kwargs)
        assert np.array_equal(default, omitted.images)

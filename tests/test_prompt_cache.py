"""T5's prompt states computed ahead: the cache equals T5, training with it equals training with T5, and
everything it cannot serve is refused before the first step, naming what is missing."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from test_dit_training import fit_smoke
from test_module import make_module, make_trainer

from nested.backbone import TransformerBackbone, load_backbone, load_t5
from nested.callbacks.sample_grid import SampleGrid
from nested.cli.main import main
from nested.data.domains import DomainSpec
from nested.data.prompts import check_prompt_sources, domain_prompts, domain_source
from nested.errors import ConfigError, MissingFileError
from nested.prompt_cache import (
    MANIFEST,
    PromptCache,
    prompt_key,
    read_manifest,
    state_path,
    write_prompt_states,
)

REPO = Path(__file__).resolve().parents[1]
DEMO_FACES = REPO / "data" / "demo" / "faces"
PROMPTS = ["a photo of <person>", "<person> riding a horse on the beach, golden hour", "", "<person>"]


def build_cache(
    model: Path,
    folder: Path,
    prompts: list[str],
    length: int | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> dict:
    tokenizer, text_encoder, component, length = load_t5(model, max_sequence_length=length, dtype=dtype)
    return write_prompt_states(
        folder,
        prompts,
        tokenizer,
        text_encoder,
        max_sequence_length=length,
        base_model=str(model),
        component=component,
        **kwargs,
    )


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_cached_states_encode_prompts_exactly_as_t5_without_loading_it(
    kind, tiny_sd3_path, tiny_flux_path, tmp_path
):
    model = {"sd3": tiny_sd3_path, "flux": tiny_flux_path}[kind]
    stats = build_cache(model, tmp_path / "cache", PROMPTS)
    assert {k: v for k, v in stats.items() if k != "bytes_per_prompt"} == {
        "prompts": 4,
        "written": 4,
        "cached": 0,
        "total": 4,
    }
    live = TransformerBackbone.from_pretrained(model)
    cached = TransformerBackbone.from_pretrained(model, prompt_cache=tmp_path / "cache")

    assert type(live.text_encoders[-1]).__name__ == "T5EncoderModel"
    assert isinstance(cached.text_encoders[-1], PromptCache)
    assert not list(cached.text_encoders[-1].parameters())  # no T5 weights held
    assert [type(t) for t in cached.text_encoders[:-1]] == [type(t) for t in live.text_encoders[:-1]]
    # Under a training step's autocast too: T5 runs without it, as the cache was computed.
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            want, got = live.encode_prompts(PROMPTS[::-1]), cached.encode_prompts(PROMPTS[::-1])
        assert torch.equal(got.prompt_embeds, want.prompt_embeds)
        assert torch.equal(got.pooled_prompt_embeds, want.pooled_prompt_embeds)
    manifest = json.loads((tmp_path / "cache" / MANIFEST).read_text())
    t5_width = live.text_encoders[-1].config.d_model
    assert manifest["component"] == ("text_encoder_3" if kind == "sd3" else "text_encoder_2")
    assert manifest["max_sequence_length"] == live.max_sequence_length
    assert manifest["bytes_per_prompt"] == live.max_sequence_length * t5_width * 4
    assert (
        cached.text_encoders[-1].to(torch.bfloat16)(live.tokenize(["<person>"])[-1])[0].dtype
        == torch.bfloat16
    )


def test_a_build_keys_prompts_by_their_ids_and_resumes(tiny_flux_path, tmp_path):
    folder = tmp_path / "cache"
    # " a photo of <person>" tokenizes as "a photo of <person>": one prompt, stored once.
    first = build_cache(tiny_flux_path, folder, PROMPTS[:2] + [" a photo of <person>"], length=32)
    assert first == {"prompts": 2, "written": 2, "cached": 0, "total": 2, "bytes_per_prompt": 32 * 32 * 4}
    tokenizer = load_t5(tiny_flux_path)[0]
    ids = tokenizer(
        ["a photo of <person>"], padding="max_length", max_length=32, return_tensors="pt"
    ).input_ids
    assert state_path(folder, prompt_key(ids[0])).is_file()
    second = build_cache(tiny_flux_path, folder, PROMPTS, length=32, sources=[{"a": 1}])
    assert (second["prompts"], second["written"], second["cached"], second["total"]) == (4, 2, 2, 4)
    assert len(list(folder.glob("states/*/*.safetensors"))) == 4
    third = build_cache(tiny_flux_path, folder, PROMPTS, length=32, sources=[{"a": 1}, {"b": 2}])
    assert third["written"] == 0
    assert json.loads((folder / MANIFEST).read_text())["sources"] == [{"a": 1}, {"b": 2}]
    with pytest.raises(
        ConfigError, match="built with max_sequence_length=32 .* needs max_sequence_length=16"
    ):
        build_cache(tiny_flux_path, folder, PROMPTS, length=16)


def test_an_interrupted_build_resumed_with_other_settings_is_refused(tiny_flux_path, tmp_path):
    folder = tmp_path / "cache"

    def stop_after_one_batch(batches):
        yield batches[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(tiny_flux_path, folder, PROMPTS, length=32, batch_size=1, progress=stop_after_one_batch)
    assert len(list(folder.glob("states/*/*.safetensors"))) == 1
    with pytest.raises(ConfigError, match="built with dtype='float32' .* needs dtype='bfloat16'"):
        build_cache(tiny_flux_path, folder, PROMPTS, length=32, dtype=torch.bfloat16)
    resumed = build_cache(tiny_flux_path, folder, PROMPTS, length=32)
    assert (resumed["written"], resumed["cached"], resumed["total"]) == (3, 1, 4)


def test_what_a_cache_cannot_serve_is_refused_by_name(tiny_flux_path, tiny_sd_path, tmp_path):
    folder = tmp_path / "cache"
    build_cache(tiny_flux_path, folder, PROMPTS, length=32)
    backbone = TransformerBackbone.from_pretrained(
        tiny_flux_path, max_sequence_length=32, prompt_cache=folder
    )
    cache = backbone.text_encoders[-1]
    assert cache.missing(["a photo of <person>", "a cat"]) == ["a cat"]
    with pytest.raises(
        ConfigError, match=r"1 prompt\(s\) of this batch are not in the prompt cache .*'a cat'"
    ):
        backbone.encode_prompts(["a photo of <person>", "a cat"])
    with pytest.raises(
        ConfigError, match="built with max_sequence_length=32 .* needs max_sequence_length=16"
    ):
        TransformerBackbone.from_pretrained(tiny_flux_path, max_sequence_length=16, prompt_cache=folder)
    with pytest.raises(ConfigError, match="built with dtype='float32' .* needs dtype='bfloat16'"):
        TransformerBackbone.from_pretrained(
            tiny_flux_path, max_sequence_length=32, prompt_cache=folder, dtype=torch.bfloat16
        )
    with pytest.raises(ValueError, match="holds T5's last hidden states only"):
        cache(torch.zeros(1, 32, dtype=torch.long), output_hidden_states=True)
    with pytest.raises(
        ConfigError, match="quantize names text_encoder_2 \\(T5\\), which a prompt cache replaces"
    ):
        TransformerBackbone.from_pretrained(
            tiny_flux_path, max_sequence_length=32, prompt_cache=folder, quantize={"text_encoder_2": "int8"}
        )
    with pytest.raises(MissingFileError, match="is not a prompt cache"):
        TransformerBackbone.from_pretrained(tiny_flux_path, prompt_cache=tmp_path)
    with pytest.raises(ConfigError, match="is a UNet model, whose prompts go through CLIP alone"):
        load_backbone(tiny_sd_path, prompt_cache=folder)
    with pytest.raises(ConfigError, match="is a UNet model, whose prompts go through CLIP alone"):
        load_t5(tiny_sd_path)


def test_a_cache_of_another_base_models_t5_is_used_with_a_warning_naming_both(tiny_flux_path, tmp_path):
    """T5's weights are not loaded to compare: a cache built from another base model serves (FLUX.1 and SD3.5
    share T5-XXL), with a warning; the same local folder named another way is the same base model."""
    folder = tmp_path / "cache"
    build_cache(tiny_flux_path, folder, PROMPTS, length=32)
    assert read_manifest(folder)["base_model"] == str(tiny_flux_path.resolve())
    other = tmp_path / "other-flux"
    shutil.copytree(tiny_flux_path, other)
    with pytest.warns(
        UserWarning, match=rf"holds the T5 states of {tiny_flux_path.resolve()}, .* is {other}"
    ):
        TransformerBackbone.from_pretrained(other, max_sequence_length=32, prompt_cache=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relative = os.path.relpath(tiny_flux_path)
        TransformerBackbone.from_pretrained(relative, max_sequence_length=32, prompt_cache=folder)


def test_a_domains_prompts_are_the_captions_training_sees(demo_faces_data):
    spec = DomainSpec("faces", str(DEMO_FACES / "val" / "shards.json"), "<person>")
    prompts, counts = domain_prompts(spec)
    data = demo_faces_data(8, validation=True)
    data.setup("validate")
    captions = {c for batch in data.val_dataloader() for c in batch["captions"]}
    assert counts == {"samples": 8, "dropped": 0, "unreadable": 0}
    assert set(prompts) == captions | {"<person>"}
    dropping = DomainSpec("faces", spec.urls, "<cat>", caption_rule="drop")
    assert domain_prompts(dropping) == (["<cat>"], {"samples": 8, "dropped": 8, "unreadable": 0})
    inserting = DomainSpec("faces", spec.urls, "<cat>")
    subject, *inserted = domain_prompts(inserting)[0]
    assert subject == "<cat>" and inserted and all(p.startswith("a photo of <cat>, ") for p in inserted)


def test_training_starts_only_with_a_cache_built_for_its_domains(tmp_path, monkeypatch):
    spec = DomainSpec("faces", str(DEMO_FACES / "val" / "shards.json"), "<person>")
    folder = tmp_path / "cache"
    build_cache(
        REPO / "data" / "models" / "tiny-flux", folder, [""], length=32, sources=[domain_source(spec)]
    )
    check_prompt_sources(str(folder), [spec])
    monkeypatch.chdir(DEMO_FACES)  # the same shards, named from another folder
    check_prompt_sources(str(folder), [DomainSpec("faces", os.path.join("val", "shards.json"), "<person>")])
    for changed in (
        DomainSpec("faces", spec.urls, "<cat>"),
        DomainSpec("faces", spec.urls, "<person>", caption_rule="drop"),
        DomainSpec("faces", str(DEMO_FACES / "shards.json"), "<person>"),
    ):
        with pytest.raises(ConfigError, match="was not built for domain 'faces' as configured"):
            check_prompt_sources(str(folder), [changed])


def test_a_sample_grid_prompt_missing_from_the_cache_stops_training_at_its_start(tiny_flux_path, tmp_path):
    folder = tmp_path / "cache"
    build_cache(tiny_flux_path, folder, ["a photo of <person>", ""], length=32)
    module = make_module(tiny_flux_path, max_sequence_length=32, prompt_cache=str(folder))
    module.configure_model()
    SampleGrid(prompts=["a photo of {token}"], clip_model=None).on_fit_start(None, module)
    with pytest.raises(
        ConfigError, match=r"of SampleGrid are not in the prompt cache .*'<person> on the moon'"
    ):
        SampleGrid(prompts=["a photo of {token}", "{token} on the moon"], clip_model=None).on_fit_start(
            None, module
        )


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_sample_grid_draws_the_same_images_from_the_cache_as_with_t5(
    kind, tiny_sd3_path, tiny_flux_path, tmp_path, demo_faces_data
):
    """A grid during bf16-mixed training (SD3 with classifier-free guidance: the negative prompt too)."""
    model = {"sd3": tiny_sd3_path, "flux": tiny_flux_path}[kind]
    spec = DomainSpec("faces", str(DEMO_FACES / "shards.json"), "<person>")
    folder = tmp_path / "cache"
    captions = domain_prompts(spec)[0]
    build_cache(
        model,
        folder,
        [*captions, "", "a photo of <person>"],
        length=32,
        sources=[domain_source(spec)],
    )
    grids = []
    for prompt_cache in (None, str(folder)):
        torch.manual_seed(0)
        module = make_module(model, max_sequence_length=32, prompt_cache=prompt_cache)
        grid = SampleGrid(
            every_n_steps=100,
            prompts=["a photo of {token}"],
            references=str(DEMO_FACES / "val" / "shards.json"),
            num_references=1,
            steps=2,
            guidance=2.0 if kind == "sd3" else None,
            reference_size=32,
            clip_model=None,
            sample_at_start=True,
        )
        trainer = make_trainer(
            tmp_path / str(prompt_cache is None),
            max_steps=1,
            precision="bf16-mixed",
            logger=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            callbacks=[grid],
        )
        trainer.fit(module, datamodule=demo_faces_data(2))
        grids.append(grid.last_grid)
    assert torch.equal(grids[0], grids[1])


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_sample_grids_negative_prompt_is_cached_where_the_model_draws_with_it(kind, tmp_path, monkeypatch):
    """SD3's grids draw their unconditional half from the negative prompt; FLUX's draw without one."""
    monkeypatch.chdir(REPO)
    grids = yaml.safe_load((REPO / "callbacks" / "samples.yaml").read_text())
    grids["trainer"]["callbacks+"][0]["init_args"]["negative_prompt"] = "lowres, blurry"
    (tmp_path / "grids.yaml").write_text(yaml.safe_dump(grids))
    folder = tmp_path / "cache"
    command = ["prompts", "--config", f"configs/smoke-{kind}.yaml", "--config", str(tmp_path / "grids.yaml")]
    assert main([*command, f"--model.prompt_cache={folder}", "--no-progress"]) == 0
    model = {"sd3": "data/models/tiny-sd3", "flux": "data/models/tiny-flux"}[kind]
    cache = TransformerBackbone.from_pretrained(
        model, max_sequence_length=32, prompt_cache=folder
    ).text_encoders[-1]
    assert cache.missing(["lowres, blurry", "a photo of <person>"]) == (
        ["lowres, blurry"] if kind == "flux" else []
    )


def test_nested_prompts_then_fit_trains_exactly_as_with_t5(tmp_path, monkeypatch, capsys):
    """The smoke FLUX config: `nested prompts` caches every prompt of the run (SampleGrid's included); `nested
    fit` with the cache logs the losses of a run with T5; a second `nested prompts` encodes nothing."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["nested"])
    folder = tmp_path / "cache"
    extra = tmp_path / "extra.txt"
    extra.write_text("\ufeffan extra prompt\n\n  <person> at night  \n", encoding="utf-8")
    command = ["prompts", "--config", "configs/smoke-flux.yaml", "--config", "callbacks/samples.yaml"]
    options = [f"--model.prompt_cache={folder}", "--prompts", str(extra), "--no-progress"]
    assert main([*command, *options]) == 0
    report = capsys.readouterr().err
    assert "domain faces: 48 samples" in report and "domain faces: 8 samples" in report
    backbone = TransformerBackbone.from_pretrained(
        "data/models/tiny-flux", max_sequence_length=32, prompt_cache=folder
    )
    grid = SampleGrid()  # callbacks/samples.yaml's prompts are the defaults
    wanted = ["an extra prompt", "<person> at night", "", "<person>", *grid.prompts_for("<person>", "flux")]
    assert backbone.text_encoders[-1].missing(wanted) == []

    # nested fit's checkpoint options are accepted (the same command line serves both) and ignored.
    assert main([*command, *options, "--ckpt_path=last", "--auto_resume=false"]) == 0
    assert ", 0 encoded, " in capsys.readouterr().err

    with_cache = fit_smoke("flux", tmp_path / "cached", 4, f"--model.prompt_cache={folder}")
    with_t5 = fit_smoke("flux", tmp_path / "t5", 4)
    assert with_cache == with_t5 and len(with_cache) == 4

    # The README's 24 GB FLUX run: the cache, the transformer in int8 and 8-bit optimizer states together.
    pytest.importorskip("torchao", reason="the quantize extra (torchao) is not installed")
    small = fit_smoke(
        "flux",
        tmp_path / "small",
        4,
        f"--model.prompt_cache={folder}",
        "--model.quantize={transformer: int8}",
        "--optimizer=torchao.optim.AdamW8bit",
    )
    assert len(small) == 4 and all(math.isfinite(loss) for loss in small) and small != with_t5
    assert (tmp_path / "small" / "adapters" / "last" / "adapter_config.json").is_file()


def test_fit_refuses_a_cache_built_without_its_domains(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["nested"])
    folder = tmp_path / "cache"
    build_cache(REPO / "data" / "models" / "tiny-flux", folder, [""], length=32)
    with pytest.raises(SystemExit) as exit_info:
        fit_smoke("flux", tmp_path / "run", 2, f"--model.prompt_cache={folder}")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"nested fit: error: the prompt cache {folder} was not built for domain 'faces'")


def test_nested_prompts_usage_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["nested"])
    with pytest.raises(SystemExit) as exit_info:
        main(["prompts", "--help"])
    assert exit_info.value.code == 0
    assert "usage: nested prompts --config FILE" in capsys.readouterr().out
    cases = [
        ([], "give the run's configuration as to nested fit"),
        (["--config", "configs/smoke-flux.yaml"], "set --model.prompt_cache DIR"),
        (
            ["--config", "configs/smoke.yaml", f"--model.prompt_cache={tmp_path}"],
            "is a UNet model, whose prompts go through CLIP alone",
        ),
        (["--config", "configs/smoke-flux.yaml", "--prompts", str(tmp_path / "none.txt")], "no such file"),
        (
            ["--config", "configs/smoke-flux.yaml", "--prompts", str(tmp_path)],
            f"--prompts {tmp_path} is a folder",
        ),
        (
            ["--config", "configs/smoke-flux.yaml", "--device", "foo"],
            "--device foo: not a device torch knows",
        ),
        (
            ["--config", "configs/smoke-flux.yaml", "--model.bogus=1"],
            "nested prompts: error: unrecognized arguments: --model.bogus=1 (nested fit --help lists the options)",
        ),
    ]
    if not torch.cuda.is_available():
        cases.append(
            (["--config", "configs/smoke-flux.yaml", "--device", "cuda"], "this machine has no CUDA device")
        )
    for arguments, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["prompts", *arguments])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err

"""``nested generate`` on tiny pipelines: PNGs + generation.json, reproducibility, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_pipeline import tiny_pipeline, write_adapter

from nested.cli.generate import main_generate


@pytest.fixture(scope="module")
def setup(tiny_sd_path, tiny_sdxl_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    unet = tiny_pipeline(tiny_sd_path).unet
    encoder = tiny_sd_path / "image_encoder"
    faces = write_adapter(unet, root / "faces", encoder, "<person>", "person", 1, domain="faces")
    pets = write_adapter(unet, root / "pets", encoder, "<dog>", "dog", 2, domain="pets")
    sdxl_unet = tiny_pipeline(tiny_sdxl_path).unet
    sdxl = write_adapter(sdxl_unet, root / "sdxl", tiny_sdxl_path / "image_encoder", "<person>", "person", 3)
    images = {}
    for name, seed in (("me", 1), ("rex", 2)):
        generator = torch.Generator().manual_seed(seed)
        pixels = (torch.rand(48, 40, 3, generator=generator) * 255).to(torch.uint8).numpy()
        images[name] = root / f"{name}.png"
        Image.fromarray(pixels).save(images[name])
    return {"base": tiny_sd_path, "faces": faces, "pets": pets, "sdxl": sdxl, "images": images}


def command(setup, out, *extra):
    return [
        "--base",
        str(setup["base"]),
        "--adapter",
        f"<person>={setup['faces']}",
        "--adapter",
        f"<dog>={setup['pets']}",
        "--subject",
        f"<person>={setup['images']['me']}",
        "--subject",
        f"<dog>={setup['images']['rex']}",
        "--prompt",
        "a <person> walking a <dog> on the beach",
        "--negative-prompt",
        "lowres, bad anatomy",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--seed",
        "7",
        "--strength",
        "<dog>=0.8",
        "--out",
        str(out),
        *extra,
    ]


def test_generate_records_the_token_weight_an_adapter_was_trained_with(setup, tmp_path):
    import shutil

    faces = shutil.copytree(setup["faces"], tmp_path / "faces-tw3")
    config = json.loads((faces / "adapter_config.json").read_text())
    (faces / "adapter_config.json").write_text(json.dumps({**config, "token_weight": 3.0}))
    argv = command({**setup, "faces": faces}, tmp_path / "out", "--no-progress", "--token-weight", "<dog>=2")
    assert main_generate(argv) == 0
    settings = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert settings["adapters"]["<person>"]["token_weight"] == 3.0
    assert settings["subjects"]["<person>"]["token_weight"] == 3.0  # the adapter's, no --token-weight
    assert settings["subjects"]["<dog>"]["token_weight"] == 2.0  # the command line's


def test_generate_writes_images_and_settings_and_is_reproducible(setup, tmp_path, capsys):
    assert main_generate(command(setup, tmp_path / "a")) == 0
    err = capsys.readouterr().err
    assert "nested generate" in err and "4/4" in err  # the progress bar: 2 images x 2 steps
    assert main_generate(command(setup, tmp_path / "b", "--no-progress")) == 0

    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["generation.json", "image-000.png", "image-001.png"]
    for name in ("image-000.png", "image-001.png"):
        first, second = Image.open(tmp_path / "a" / name), Image.open(tmp_path / "b" / name)
        assert first.size == (64, 64) and first.tobytes() == second.tobytes()
    assert (
        Image.open(tmp_path / "a" / "image-000.png").tobytes()
        != Image.open(tmp_path / "a" / "image-001.png").tobytes()
    )

    settings = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert settings["seed"] == 7 and [i["seed"] for i in settings["images"]] == [7, 8]
    assert settings["steps"] == 2 and settings["guidance"] == 5.0 and settings["height"] == 64
    assert settings["negative_prompt"] == "lowres, bad anatomy"
    assert settings["adapters"]["<person>"]["source"] == str(setup["faces"])
    assert settings["adapters"]["<dog>"]["domain"] == "pets"
    assert (
        settings["subjects"]["<dog>"]["strength"] == 0.8
        and settings["subjects"]["<person>"]["strength"] == 1.0
    )
    assert len(settings["subjects"]["<person>"]["sha256"]) == 64
    assert settings["scheduler"]["class"] == "DDIMScheduler" and settings["command"][:2] == [
        "nested",
        "generate",
    ]

    # Replaying the recorded command reproduces the images.
    replay = settings["command"][2:]
    replay[replay.index("--out") + 1] = str(tmp_path / "c")
    assert main_generate([*replay, "--no-progress"]) == 0
    assert (tmp_path / "c" / "image-001.png").read_bytes() == (tmp_path / "a" / "image-001.png").read_bytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--prompt": "a dog on the beach"}, "is not in the prompt"),
        (
            {"--prompt": "a " * 80 + "<person> and <dog>"},
            "cut by the 77-token limit",
        ),  # found by the tokenizer
        ({"subject": "missing.jpg"}, "the image for <person> does not exist"),
        ({"adapter": "sdxl"}, "does not fit this base model"),
        ({"--strength": "<cat>=0.5"}, "'<cat>' has no --subject"),
        ({"--strength": "<dog>=strong"}, "is not a number"),
    ],
)
def test_user_errors_exit_2_with_one_line(setup, tmp_path, capsys, change, message):
    argv = command(setup, tmp_path / "out", "--no-progress")
    for option, value in change.items():
        if option == "subject":
            argv[argv.index(f"<person>={setup['images']['me']}")] = f"<person>={tmp_path / value}"
        elif option == "adapter":
            argv[argv.index(f"<person>={setup['faces']}")] = f"<person>={setup['sdxl']}"
        else:
            argv[argv.index(option) + 1] = value
    assert main_generate(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nested generate: error:") and message in err
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out" / "generation.json").exists()

"""``nested generate`` on tiny pipelines: PNGs + generation.json, reproducibility, one-line errors, an
output folder never shared by two runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_pipeline import tiny_pipeline, write_adapter, write_bomb_png, write_truncated_jpeg

from nested.cli.generate import main_generate

REPO = Path(__file__).resolve().parents[1]
# The installed console script beside this interpreter, else the same entry point through -c.
SCRIPT = Path(sys.executable).with_name("nested")
NESTED = (
    [str(SCRIPT)]
    if SCRIPT.is_file()
    else [sys.executable, "-c", "import sys; from nested.cli.main import main; sys.exit(main())"]
)


def strict_json(path: Path):
    """``path`` read as standard JSON: a bare NaN or Infinity (Python's extension) fails the test."""

    def refuse(constant: str):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


IMAGE_FAULTS = {"bomb.png": write_bomb_png, "truncated.jpg": write_truncated_jpeg}


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

    settings = strict_json(tmp_path / "a" / "generation.json")
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
        ({"subject": "."}, "the image for <person> is a folder, not an image file"),
        ({"adapter": "sdxl"}, "does not fit this base model"),
        ({"--strength": "<cat>=0.5"}, "'<cat>' has no --subject"),
        ({"--strength": "<dog>=strong"}, "is not a number"),
        # NaN and infinity would give black images with exit 0.
        ({"--strength": "<dog>=nan"}, "--strength '<dog>=nan': nan is not a finite number"),
        ({"--token-weight": "<dog>=inf"}, "--token-weight '<dog>=inf': inf is not a finite number"),
        ({"--value-norm-factor": "<dog>=-inf"}, "--value-norm-factor '<dog>=-inf': -inf is not a finite"),
        ({"--guidance": "nan"}, "--guidance: nan is not a finite number"),
        ({"--token-weight": "<dog>=-1"}, "--token-weight <dog>=-1.0: the weight must be > 0"),
        ({"--value-norm-factor": "<dog>=-3"}, "value_norm_factors['<dog>'] must be >= 0 (0: no rescaling)"),
        (
            {"--seed": str(2**64 - 1)},  # image 1 would take seed 2**64
            f"--seed {2**64 - 1} with --num-images 2: the seeds {2**64 - 1}..{2**64} must lie in torch's range",
        ),
        (
            {"--base": "/no/such/base"},
            "no model folder at /no/such/base: expected a diffusers pipeline folder",
        ),
        ({"--base": "not a repo!"}, "'not a repo!' is neither a model folder nor a Hub id"),
        ({"adapter": "@v1"}, "with revision 'v1': only a Hub repo id (user/name) has revisions, not a local"),
        ({"--device": "cuda:99"}, "--device cuda:99: this machine has "),  # no CUDA device, or fewer
        ({"--device": "bogus"}, "--device bogus: not a device torch knows"),
        (
            {"--steps": "1001"},
            "num_inference_steps (--steps) 1001 is more than the 1000 timesteps this DDIMScheduler has",
        ),
        ({"no subject": "<dog>"}, "--adapter '<dog>' has no --subject: add --subject '<dog>=IMAGE'"),
        (
            {"subject": "bomb.png"},
            "bomb.png': decompression bomb: Image size (400000000 pixels) exceeds limit",
        ),
        (
            {"subject": "truncated.jpg"},
            "truncated.jpg': unreadable image: the file is damaged (image file is truncated",
        ),
    ],
)
def test_user_errors_exit_2_with_one_line(setup, tmp_path, capsys, change, message):
    argv = command(setup, tmp_path / "out", "--no-progress")
    for option, value in change.items():
        if option == "subject":
            if value in IMAGE_FAULTS:
                IMAGE_FAULTS[value](tmp_path / value)
            argv[argv.index(f"<person>={setup['images']['me']}")] = f"<person>={tmp_path / value}"
        elif option == "adapter":
            adapter = f"{setup['faces']}{value}" if value.startswith("@") else setup[value]
            argv[argv.index(f"<person>={setup['faces']}")] = f"<person>={adapter}"
        elif option == "no subject":
            at = argv.index(f"{value}={setup['images']['rex']}")
            del argv[at - 1 : at + 1]
            del argv[argv.index("--strength") : argv.index("--strength") + 2]
        elif option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
    assert main_generate(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nested generate: error:") and message in err
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_config_that_is_not_json_is_one_line_naming_it(setup, tmp_path, capsys):
    adapter = shutil.copytree(setup["faces"], tmp_path / "adapter")
    (adapter / "adapter_config.json").write_text('{"token": "<person>",')
    argv = command(setup, tmp_path / "out", "--no-progress")
    argv[argv.index(f"<person>={setup['faces']}")] = f"<person>={adapter}"
    assert main_generate(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nested generate: error: {adapter / 'adapter_config.json'} is not valid JSON (")
    assert "\n" not in err and not (tmp_path / "out").exists()


def test_a_decompression_bomb_is_one_line_from_the_real_command_before_any_model_loads(tmp_path):
    """The installed ``nested`` command, as a user runs it: the base model does not even exist, so the
    image is refused before anything loads (PIL's warning-only range: test_pipeline.py)."""
    image = write_bomb_png(tmp_path / "bomb.png")
    result = subprocess.run(
        [*NESTED, "generate", "--base", str(tmp_path / "no-model"), "--adapter", "<person>=me/faces",
         "--subject", f"<person>={image}", "--prompt", "a <person>", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"nested generate: error: cannot use the image '{image}': decompression bomb: Image size (400000000 "
        "pixels) exceeds limit of 178956970 pixels, could be decompression bomb DOS attack."
    ]
    assert not (tmp_path / "out").exists()


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_used_out_folder_is_refused_and_overwrite_replaces_the_earlier_run_whole(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert main_generate(command(setup, out, "--no-progress")) == 0  # 2 images
    first = _tree(out)
    assert sorted(first) == ["generation.json", "image-000.png", "image-001.png"]

    one_image = command(setup, out, "--no-progress", "--seed", "3")
    one_image[one_image.index("--num-images") + 1] = "1"
    assert main_generate(one_image) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"nested generate: error: --out '{out}' is not empty (it holds 'generation.json' and 2 more files) and "
        "nested generate does not mix two runs in one folder: choose another --out, or pass --overwrite to replace "
        "an earlier nested generate run."
    )
    assert _tree(out) == first  # untouched

    assert main_generate([*one_image, "--overwrite"]) == 0
    second = _tree(out)
    assert sorted(second) == ["generation.json", "image-000.png"]  # no image-001.png of the other run
    assert second["image-000.png"] != first["image-000.png"]
    settings = json.loads(second["generation.json"])
    assert settings["num_images"] == 1 and [i["file"] for i in settings["images"]] == ["image-000.png"]
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # no staging folder left beside it

    (out / "notes.txt").write_text(
        "mine"
    )  # a file nested generate did not write: --overwrite would delete it
    assert main_generate([*one_image, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out '{out}' holds 'notes.txt', which nested generate did not write" in err and "\n" not in err
    assert _tree(out) == {**second, "notes.txt": b"mine"}


def test_sigterm_while_generating_removes_the_staged_images_and_keeps_the_earlier_out(setup, tmp_path):
    out = tmp_path / "out"
    assert main_generate(command(setup, out)) == 0
    earlier = sorted(p.name for p in out.iterdir())
    argv = command(setup, out, "--overwrite", "--no-progress")
    argv[argv.index("--steps") + 1], argv[argv.index("--num-images") + 1] = "500", "50"  # minutes of work
    process = subprocess.Popen([*NESTED, "generate", *argv], stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]:  # generating now
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.1)
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert (
        stderr.strip().splitlines()[-1]
        == "nested generate: interrupted (SIGTERM); what it was writing replaced nothing"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left
    assert sorted(p.name for p in out.iterdir()) == earlier


def test_a_hangup_that_nohup_ignores_stays_ignored_while_a_command_runs(capsys):
    from nested.cli.common import run_user_command

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:

        def hang_up():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)  # time for the signal to arrive
            return "done"

        assert run_user_command("nested generate", False, hang_up) == "done"
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert "interrupted" not in capsys.readouterr().err


def test_a_strength_outside_the_range_warns_once_in_one_line(setup, tmp_path, capsys):
    argv = command(setup, tmp_path / "out", "--no-progress")
    argv[argv.index("--strength") + 1] = "<dog>=3"
    assert main_generate(argv) == 0  # 2 images, each a pipeline call with the strength
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "nested generate: warning: the strength of '<dog>' (3) is outside [0, 2], the range adapters are made "
        "for (0: the plain prompt, 1: the subject); images may break down."
    ]
    settings = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert settings["subjects"]["<dog>"]["strength"] == 3.0


def test_an_out_through_a_missing_folder_and_up_is_the_folder_it_names(setup, tmp_path, capsys):
    """``missing/../kept`` is ``kept`` once ``missing`` exists: a used ``kept`` is refused as such, and nothing
    is created on the way."""
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    assert main_generate(command(setup, tmp_path / "missing" / ".." / "kept", "--no-progress")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"nested generate: error: --out '{tmp_path}/missing/../kept' is not empty (it holds"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and _tree(tmp_path / "kept") == {
        "notes.txt": b"mine"
    }


def test_out_is_never_the_current_directory_or_above_it(setup, tmp_path, monkeypatch, capsys):
    """--overwrite replaces --out as a whole: the folder the user stands in (empty here) is refused."""
    monkeypatch.chdir(tmp_path)
    for out in (".", ".."):
        assert main_generate(command(setup, Path(out), "--no-progress", "--overwrite")) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"nested generate: error: --out '{out}' holds the current directory; choose a folder of its own, "
            "e.g. --out outputs/run1."
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="inductor's CPU code needs a C++ compiler"
)
def test_generate_compile_compiles_the_blocks_once_for_every_image_and_subject(setup, tmp_path):
    """--compile: the UNet's blocks compile with two adapters attached, one graph per block shape (the tiny
    SD's: its first level's and its middle block's), reused across images, steps and both subjects' layers;
    the images are the eager ones, to a level of rounding."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    assert main_generate(command(setup, tmp_path / "compiled", "--no-progress", "--compile")) == 0
    assert counters["stats"]["unique_graphs"] == 2
    assert main_generate(command(setup, tmp_path / "eager", "--no-progress")) == 0
    for name in ("image-000.png", "image-001.png"):
        compiled, eager = (
            torch.tensor(list(Image.open(tmp_path / run / name).tobytes()), dtype=torch.int16)
            for run in ("compiled", "eager")
        )
        assert (compiled - eager).abs().max() <= 2
    assert strict_json(tmp_path / "compiled" / "generation.json")["compile"] is True
    assert strict_json(tmp_path / "eager" / "generation.json")["compile"] is False

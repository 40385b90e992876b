"""The `nested` command: subcommand listing, config composition, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nested.cli.main import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["nested"])


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "shards", "generate", "push", "eval"):
        assert name in SUBCOMMANDS and f"  {name}" in out


def test_unknown_command_fails(capsys):
    assert main(["fitt"]) == 2
    assert "unknown command 'fitt'" in capsys.readouterr().err


def test_configs_compose_and_print(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/smoke.yaml", "--config", "callbacks/ema.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["base_model"] == "data/models/tiny-sd"
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    # The preset appends to the demo's callbacks instead of replacing them.
    assert callbacks[0].endswith("ModelCheckpoint") and "nested.callbacks.AdapterEMA" in callbacks


@pytest.mark.parametrize(
    "override, key",
    [("--model.learning_rat=0.1", "learning_rat"), ("--data.batch_size=four", "batch_size")],
)
def test_unknown_key_or_wrong_type_fails_naming_the_key(override, key, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/smoke.yaml", override])
    assert exit_info.value.code != 0
    assert key in capsys.readouterr().err


def test_every_shipped_config_parses(capsys):
    """Real-model configs must at least be valid for the CLI (nothing is loaded by --print_config)."""
    for config in sorted((REPO / "configs").glob("*.yaml")):
        args = ["fit", "--config", str(config), "--print_config"]
        if config.name == "multidomain-sdxl.yaml":
            args = ["fit", "--config", "configs/faces-sdxl.yaml", "--config", str(config), "--print_config"]
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code in (0, None), config.name
        capsys.readouterr()


def test_a_typo_in_a_config_file_fails_naming_the_key(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  learnin_rate: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/smoke.yaml", "--config", str(typo), "--print_config"])
    assert exit_info.value.code != 0
    assert "learnin_rate" in capsys.readouterr().err


def test_a_user_mistake_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["push", str(tmp_path / "no-such-adapter"), "me/adapter"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("nested push: error: adapter folder") and "does not exist" in error
    assert "\n" not in error and "Traceback" not in error


def test_a_bug_inside_the_library_keeps_its_traceback(monkeypatch, tmp_path):
    """A ValueError from deep inside (here a shape bug planted in the pipeline) is not the user's: it is
    raised, not printed as a one-line user error."""
    import nested.inference.pipeline

    def broken(*args, **kwargs):
        raise ValueError("shape mismatch: (2, 77) vs (1, 77)")

    monkeypatch.setattr(nested.inference.pipeline.NestedPipeline, "from_pretrained", broken)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    from PIL import Image
    from skimage import data

    image = tmp_path / "me.png"
    Image.fromarray(data.camera()).save(image)  # subject images are checked before the model loads
    with pytest.raises(ValueError, match="shape mismatch"):
        main(["generate", "--base", "unused", "--adapter", f"<person>={adapter}", "--subject", f"<person>={image}",
              "--prompt", "a photo of <person>", "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip


def test_fit_reports_a_configuration_mistake_in_one_line(capsys):
    """A value the module refuses (a user error raised while LightningCLI builds the model) is one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", "--config", "configs/smoke.yaml", "--model.frozen_dtype=float64", "--trainer.max_steps=1"]
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("nested fit: error: frozen_dtype must be one of")

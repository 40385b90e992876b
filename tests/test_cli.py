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

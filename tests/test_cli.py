"""The `nested` command: subcommand listing, config composition, and errors that name the bad key."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from nested.cli.common import one_line
from nested.cli.fit import KILLED_WRITE_AGE, _start_over, config_error_line, configured_run
from nested.cli.main import SUBCOMMANDS, main
from nested.errors import DataError
from nested.training.loggers import continued_logger
from nested.training.resume import checkpoint_step, find_resume_checkpoint, partial_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["nested"])


def _refusal(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one line ``nested ARGV`` ends with, refusing what it was given (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "shards", "generate", "push", "eval"):
        assert name in SUBCOMMANDS and f"  {name}" in out


def test_unknown_command_fails(capsys):
    assert main(["fitt"]) == 2
    assert capsys.readouterr().err == (
        "nested: error: unknown command 'fitt'; did you mean fit? commands: fit, validate, shards, prompts, "
        "generate, push, eval\n"
    )
    assert main(["train"]) == 2
    assert capsys.readouterr().err.startswith(
        "nested: error: unknown command 'train'; commands: fit, validate"
    )
    for typed, meant in (("gen", "generate"), ("FIT", "fit"), ("Shard", "shards")):
        assert main([typed]) == 2
        assert capsys.readouterr().err.startswith(
            f"nested: error: unknown command {typed!r}; did you mean {meant}?"
        )


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["shards", "src", "out", "--domain", "faces"], "the following arguments are required: --subject"),
        (
            ["generate", "--base", "b", "--prompt", "p", "--steps", "x"],
            "argument --steps: invalid int value: 'x'",
        ),
        (["push", "adapter", "me/x", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_a_command_line_mistake_is_one_line_naming_the_help(argv, error, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err
        == f"nested {argv[0]}: error: {error} (nested {argv[0]} --help lists the options)\n"
    )


def printed_config(capsys, *presets: str) -> dict:
    """The configuration `nested fit --print_config` composes from the smoke config and ``presets``."""
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                "configs/smoke.yaml",
                *(a for p in presets for a in ("--config", p)),
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_configs_compose_and_print(capsys):
    config = printed_config(capsys, "callbacks/ema.yaml")
    assert config["model"]["base_model"] == "data/models/tiny-sd"
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    # The preset appends to the demo's callbacks instead of replacing them.
    assert callbacks[0].endswith("ModelCheckpoint") and "nested.callbacks.AdapterEMA" in callbacks
    assert config["export"]["keep"] is None  # every export kept unless a preset or the config says otherwise
    config = printed_config(capsys, "callbacks/checkpoint-frequent.yaml")
    assert (
        config["export"]["keep"] == 5 and config["trainer"]["callbacks"][-1]["init_args"]["save_top_k"] == 5
    )


@pytest.mark.parametrize(
    "override, key",
    [
        ("--model.learning_rat=0.1", "learning_rat"),
        ("--data.batch_size=four", "batch_size"),
        ("--optimizer=NoSuchOptimizer", "NoSuchOptimizer"),  # a many-line jsonargparse message
    ],
)
def test_unknown_key_or_wrong_type_fails_naming_the_key(override, key, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/smoke.yaml", override])
    assert exit_info.value.code == 2
    # One line, without the usage of every option that jsonargparse prints first.
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nested fit: error: "), err
    assert key in err and err.endswith("(nested fit --help lists the options)\n")


def test_a_missing_required_option_names_the_command_and_its_help(capsys):
    for command in ("fit", "validate"):
        with pytest.raises(SystemExit) as exit_info:
            main([command])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(
            f"nested {command}: error: the following arguments are required: {command}.model"
        )
        assert err.endswith(f"(nested {command} --help lists the options)\n") and err.count("\n") == 1


def test_config_error_line_keeps_every_alternative():
    message = (
        'Parser key "optimizer":\n\n  - Expected a path\n  Errors:\n    - Expected a dot import path: Foo\n'
    )
    assert (
        config_error_line(message)
        == 'Parser key "optimizer": Expected a path; Errors: Expected a dot import path: Foo'
    )


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
    assert exit_info.value.code == 2
    assert "learnin_rate" in capsys.readouterr().err


def test_a_config_file_that_is_not_yaml_is_named(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_steps: [1,\n")
    binary = tmp_path / "photo.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n")
    for path, problem in (
        (
            broken,
            "is not valid YAML: expected the node content, but found '<stream end>' at line 3, column 1",
        ),
        (binary, "is not UTF-8 text (invalid start byte); give a YAML file"),
    ):
        error = _refusal(capsys, ["validate", "--config", "configs/smoke.yaml", f"--config={path}"])
        assert error == f"nested validate: error: --config {path} {problem}"
    # What jsonargparse reads and PyYAML's safe loader would not: a date that does not exist (jsonargparse reads
    # it as text), and YAML text itself given as --config, longer than a file name may be.
    dated = tmp_path / "dated.yaml"
    dated.write_text("trainer:\n  default_root_dir: 2024-02-30\n")
    text = "{trainer: {max_steps: 3, default_root_dir: runs/" + "x" * 300 + "}}"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "configs/smoke.yaml", "-c", str(dated), "--config", text, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert printed["max_steps"] == 3 and printed["default_root_dir"] == "runs/" + "x" * 300
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "configs/smoke.yaml", "-c", str(dated), "--print_config"])
    assert exit_info.value.code == 0 and "default_root_dir: '2024-02-30'" in capsys.readouterr().out
    error = _refusal(capsys, ["fit", "-c", "configs/smoke.yaml", "-c", str(broken)])  # the short form too
    assert error.startswith(f"nested fit: error: --config {broken} is not")


def test_a_domain_the_model_cannot_learn_is_refused_before_the_models_load(monkeypatch, tmp_path, capsys):
    def load_backbone(*args, **kwargs):
        raise AssertionError("the models were loaded before the subjects were checked")

    monkeypatch.setattr("nested.training.module.load_backbone", load_backbone)
    args = ["fit", "--config", "configs/smoke.yaml", f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, '--model.subjects={"<dog>": "dog"}'])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(
        "nested fit: error: data domain 'faces' binds its subjects to '<person>', but the "
    )
    assert "model learns only <dog>" in error


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


def _joined_lines(text: str, comment: str = "") -> list[str]:
    """The lines of ``text`` with shell continuations (``\\`` at the end) joined; ``comment``: a prefix to strip
    first (``#`` for usage lines inside a script's comments)."""
    lines = [
        line.strip().removeprefix(comment).strip() if comment else line.strip() for line in text.splitlines()
    ]
    return re.sub(r"\s*\\\n\s*", " ", "\n".join(lines)).splitlines()


def readme_fit_commands() -> list[str]:
    """Every `nested fit ...` command line README.md shows (code-block lines and inline code spans), up to a
    comment or the next command (`&&`, `;`, `|`), without standalone `...` placeholders. Fragments without a
    `--config` (`nested fit --help`, `nested fit ... && ...` in prose) are left out."""
    text = (REPO / "README.md").read_text()
    commands = [m.group(1) for m in re.finditer(r"`(nested fit [^`]*)`", text)]
    commands += [line for line in _joined_lines(text) if line.startswith("nested fit ")]
    commands = [re.split(r"\s#|&&|;|\|", command)[0] for command in commands]
    commands = [" ".join(token for token in command.split() if token != "...") for command in commands]
    return [command for command in commands if "--config" in command]


def test_ci_runs_the_test_command_the_readme_starts_with():
    """The README's second command (setup, then the tests) is the one .ci/run runs, flags included."""
    first_block = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    setup, tests = [line for line in first_block.splitlines() if "pytest" in line][0].split(" && ")
    ci = [
        line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")
    ]
    assert setup == "bash scripts/setup.sh" and setup in ci
    assert ci[-1] == tests and ci.index(setup) < len(ci) - 1


# What a SLURM job's environment gives fit.sbatch's `nested fit` line, for --print_config.
SLURM_VALUES = {
    "SLURM_NNODES": "1",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_JOB_NAME": "job",
    "RUN_DIR": "runs/job",
    "ACCELERATOR": "cpu",
}


def sbatch_fit_commands() -> list[str]:
    """The `nested fit` line of scripts/slurm/fit.sbatch, once per `sbatch ... fit.sbatch CONFIG ARGS` usage that
    README.md and the script's comments show, with the SLURM variables filled in."""
    script = (REPO / "scripts/slurm/fit.sbatch").read_text()
    (fit_line,) = [
        line for line in _joined_lines(script) if "nested fit --" in line and not line.startswith("#")
    ]
    fit_args = fit_line.split("nested fit ", 1)[1]
    usages = _joined_lines((REPO / "README.md").read_text()) + _joined_lines(script, comment="#")
    commands = []
    for line in usages:
        match = re.search(r"scripts/slurm/fit\.sbatch (configs/\S+\.yaml)(.*)", line)
        if not match:
            continue
        extra = (
            re.sub(r"\[[^\]]*\]", "", match.group(2)).split(" #")[0].strip()
        )  # drop "[more ...]" placeholders
        values = {**SLURM_VALUES, "CONFIG": match.group(1)}
        command = re.sub(
            r"\$\{?(\w+)\}?",
            lambda m, values=values: values.get(m.group(1), m.group(0)),
            fit_args.replace('"$@"', extra),
        )
        commands.append(f"nested fit {command}")
    return commands


def test_every_fit_command_line_the_docs_show_parses(capsys):
    """Each `nested fit` line of README.md and of the SLURM usage (README, fit.sbatch's comments) runs with
    --print_config: the options it names exist, its config files compose."""
    commands = readme_fit_commands() + sbatch_fit_commands()
    assert len(commands) >= 10 and any("sbatch" not in c and "--data.domains" in c for c in commands)
    for command in commands:
        argv = shlex.split(command)
        assert argv[:2] == ["nested", "fit"] and "$" not in command, command
        with pytest.raises(SystemExit) as exit_info:
            main([*argv[1:], "--print_config"])
        assert exit_info.value.code in (0, None), f"{command}:\n{capsys.readouterr().err[-2000:]}"
        capsys.readouterr()


def test_a_list_element_chosen_by_index_is_one_line_naming_what_works(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/faces-sdxl.yaml", "--data.domains.0.urls=/data/faces/shards.json"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("nested fit: error: --data.domains.0.urls:")
    assert "--data.domains.urls=... sets urls in the LAST element of data.domains" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_a_gpu_recipe_on_a_machine_without_one_and_an_uninstalled_strategy_are_one_line_errors(
    tmp_path, capsys
):
    argv = ["fit", "--config", "configs/faces-sdxl.yaml", f"--trainer.default_root_dir={tmp_path}"]
    assert _refusal(capsys, argv) == (
        f"nested fit: error: --trainer.accelerator=gpu, but torch sees no GPU here (torch {torch.__version__}, "
        "torch.cuda.is_available() is false); run on a GPU node, or pass --trainer.accelerator=cpu (slow; with "
        "--trainer.precision=32-true or bf16-mixed)"
    )
    assert _refusal(capsys, [*argv, "--trainer.accelerator=cpu", "--trainer.strategy=deepspeed"]) == (
        "nested fit: error: Lightning refuses the trainer settings: To use the `DeepSpeedStrategy`, you must have "
        "DeepSpeed installed. Install it by running `pip install -U deepspeed`."
    )


def test_the_hub_presets_placeholder_repo_is_refused_before_a_run_whose_every_upload_it_would_fail(
    tmp_path, capsys
):
    argv = ["fit", "--config", "configs/smoke.yaml", "--config", "callbacks/hub.yaml", f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    assert _refusal(capsys, argv) == (
        "nested fit: error: HubUpload repo_id 'your-name/nested-faces-sdxl' is callbacks/hub.yaml's placeholder: "
        "set it to your user/name (in a copy of that file)."
    )
    assert not any(tmp_path.iterdir())


def test_python_dash_m_nested_is_the_nested_command(tmp_path):
    """Where the console script is not on PATH (a venv used through its python alone)."""
    usage = subprocess.run(
        [sys.executable, "-m", "nested", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert usage.returncode == 0 and usage.stdout.startswith("usage: nested <command> [options]")
    refused = subprocess.run(
        [sys.executable, "-m", "nested", "generate", "--steps", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(
        "nested generate: error:"
    )


def _fit_args(root: Path, *extra: str) -> list[str]:
    """`nested fit` on the smoke config, one step, no validation, no worker, into ``root``."""
    return ["fit", "--config", "configs/smoke.yaml", "--trainer.max_steps=1", f"--trainer.default_root_dir={root}",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--data.num_workers=0", *extra]  # fmt: skip


def test_damaged_weights_of_the_base_or_the_image_encoder_are_one_line(tiny_sd_path, tmp_path, capsys):
    base = shutil.copytree(tiny_sd_path, tmp_path / "base")
    with open(base / "unet" / "diffusion_pytorch_model.safetensors", "r+b") as weights:
        weights.truncate(1000)  # a download cut short
    refusal = _refusal(capsys, _fit_args(tmp_path / "run", f"--model.base_model={base}"))
    assert refusal.startswith(
        f"nested fit: error: could not load the base model '{base}': Unable to load weights"
    )
    assert refusal.endswith("Pass a diffusers folder or a hub id (cached when offline).")
    encoder = shutil.copytree(tiny_sd_path / "image_encoder", tmp_path / "encoder")
    with open(encoder / "model.safetensors", "r+b") as weights:
        weights.truncate(4)
    refusal = _refusal(capsys, _fit_args(tmp_path / "run", f"--model.encoder.backbone={encoder}"))
    assert refusal.startswith(
        f"nested fit: error: could not load the image encoder '{encoder}' (subfolder None): "
    )


def test_a_run_ending_between_checkpoint_saves_checkpoints_its_last_step(tmp_path, caplog):
    """max_steps 3, a checkpoint every 2 steps: the run's last.ckpt is at step 3, as its export, so the same
    command again trains nothing."""
    callbacks = tmp_path / "every-2.yaml"
    callbacks.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {every_n_train_steps: 2, save_last: true, save_top_k: -1}\n"
    )
    root = tmp_path / "run"
    argv = ["fit", "--config", "configs/smoke.yaml", "--config", str(callbacks), "--trainer.max_steps=3",
            "--trainer.val_check_interval=2", f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false", "--data.num_workers=0"]  # fmt: skip
    assert main(argv) == 0
    steps = {path.name: checkpoint_step(path) for path in (root / "checkpoints").glob("*.ckpt")}
    assert steps == {"epoch=0-step=2.ckpt": 2, "last.ckpt": 3}
    export = root / "adapters" / "last" / "adapter_config.json"
    written = export.stat().st_mtime_ns
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert any(
        "nothing to train: the run already reached its end, at step 3" in r.getMessage()
        for r in caplog.records
    )
    assert export.stat().st_mtime_ns == written


def test_an_optimizer_or_schedule_argument_its_class_refuses_is_one_line(tmp_path, capsys):
    assert _refusal(capsys, _fit_args(tmp_path / "lr", "--optimizer.init_args.lr=-1")) == (
        "nested fit: error: optimizer (torch.optim.AdamW): Invalid learning rate: -1.0; fix optimizer.init_args."
    )
    schedule = "--lr_scheduler={class_path: torch.optim.lr_scheduler.LinearLR, init_args: {start_factor: 0}}"
    assert _refusal(capsys, _fit_args(tmp_path / "schedule", schedule)).startswith(
        "nested fit: error: lr_scheduler (torch.optim.lr_scheduler.LinearLR): Starting multiplicative factor"
    )


def test_a_checkpoint_preset_replaces_the_configs_own_checkpoint_callback(tmp_path, caplog):
    """callbacks/checkpoint-frequent.yaml appends a ModelCheckpoint to a config that has one: the later one
    is kept, so one last.ckpt is written and the preset's save_top_k holds."""
    root = tmp_path / "run"
    with caplog.at_level("INFO"):
        assert main(_fit_args(root, "--config", "callbacks/checkpoint-frequent.yaml")) == 0
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]
    assert (
        f"nested: a ModelCheckpoint configured later for {root / 'checkpoints'} replaces the earlier one "
        "(save_top_k -1): one callback writes that folder's last.ckpt" in caplog.text
    )
    trainer = configured_run(
        ["--config", "configs/smoke.yaml", "--config", "callbacks/checkpoint-frequent.yaml"]
    ).trainer
    (checkpoint,) = trainer.checkpoint_callbacks
    assert (checkpoint.save_top_k, checkpoint.monitor) == (5, "step")


def test_a_finished_run_extended_trains_on_and_changed_training_settings_are_refused(
    tmp_path, capsys, caplog
):
    root = tmp_path / "run"
    assert main(_fit_args(root)) == 0  # max_epochs: 1 in the smoke config, as in the demo's
    config = root / "adapters" / "last" / "adapter_config.json"
    written = config.stat().st_mtime_ns
    # The same command again: nothing to train, and the run's export stays as it was.
    with caplog.at_level("INFO"):
        assert main(_fit_args(root)) == 0
    assert any(
        "nested: nothing to train: the run already reached its end, at step 1" in r.getMessage()
        for r in caplog.records
    )
    assert config.stat().st_mtime_ns == written
    newest = root / "checkpoints" / "last.ckpt"
    assert _refusal(capsys, _fit_args(root, "--trainer.max_steps=2")) == (
        f"nested fit: error: the checkpoint {newest} ends epoch 1 at step 1, and trainer.max_epochs=1 ends the run "
        "there, before trainer.max_steps=2: pass --trainer.max_epochs=-1 to train on to max_steps."
    )
    changes = {
        "--optimizer.init_args.lr=0.001": "these settings differ from it: optimizer.init_args.lr: 0.01 -> 0.001",
        "--model.token_weight=2.0": "it was trained with token_weight=1.0, this model is configured with "
        "token_weight=2.0 (set model.token_weight: 1.0 to resume it)",
        "--model.value_norm_factor=2.0": "it was trained with value_norm_factor=None, this model is configured with "
        "value_norm_factor=2.0 (set model.value_norm_factor: null to resume it)",
        "--lr_scheduler=torch.optim.lr_scheduler.LinearLR": "these settings differ from it: "
        "lr_scheduler.class_path: None -> 'torch.optim.lr_scheduler.LinearLR'",
    }
    configs = {path: path.read_bytes() for path in root.rglob("config.yaml")}
    assert configs and all(b"lr: 0.01" in text for text in configs.values())
    for change, why in changes.items():
        refusal = _refusal(
            capsys, _fit_args(root, "--trainer.max_steps=2", "--trainer.max_epochs=-1", change)
        )
        assert refusal.startswith(f"nested fit: error: cannot resume from the checkpoint {newest}: ")
        assert why in refusal, refusal
    # A refused resume leaves the configuration the run was trained with on record.
    assert {path: path.read_bytes() for path in root.rglob("config.yaml")} == configs
    assert "start a new run with --model.init_adapter set to this run's adapters/last" in refusal
    # That way out: a new run starts from the run's exported weights, with its own optimizer settings.
    onward = tmp_path / "onward"
    start = shutil.copytree(root / "adapters" / "last", tmp_path / "start")
    init = f"--model.init_adapter={start}"
    assert main(_fit_args(onward, "--optimizer.init_args.lr=0.001", init)) == 0
    recorded = torch.load(onward / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]
    assert recorded["init_adapter"] == str(start) and recorded["optimizer"]["init_args"]["lr"] == 0.001
    # Its resume takes the weights from its checkpoint: the adapter it started from is not read again.
    shutil.rmtree(start)
    assert (
        main(
            _fit_args(
                onward,
                "--optimizer.init_args.lr=0.001",
                init,
                "--trainer.max_steps=2",
                "--trainer.max_epochs=-1",
            )
        )
        == 0
    )
    assert checkpoint_step(find_resume_checkpoint(onward, [onward / "checkpoints"])) == 2
    # Nor by a validation of its checkpoint.
    assert (
        main(
            [
                "validate",
                *_fit_args(onward, "--optimizer.init_args.lr=0.001", init, "--trainer.limit_val_batches=1")[
                    1:
                ],
            ]
        )
        == 0
    )
    # A checkpoint of another torch version records arguments this one's classes lack (LinearLR's `verbose`).
    state = torch.load(newest, weights_only=False)
    state["hyper_parameters"]["optimizer"]["init_args"]["an_older_torchs_argument"] = "deprecated"
    torch.save(state, newest)
    assert main(_fit_args(root, "--trainer.max_steps=2", "--trainer.max_epochs=-1")) == 0
    assert checkpoint_step(find_resume_checkpoint(root, [root / "checkpoints"])) == 2
    assert json.loads(config.read_text())["training"] == {"step": 2, "complete": True}
    # A run that its epochs end (2 steps), before or without max_steps: the same command again has nothing to train.
    for max_steps in (-1, 5):
        bounded = _fit_args(
            tmp_path / f"epochs{max_steps}", f"--trainer.max_steps={max_steps}", "--data.epoch_samples=8"
        )
        assert main(bounded) == 0 and main(bounded) == 0
        assert (
            checkpoint_step(
                find_resume_checkpoint(
                    tmp_path / f"epochs{max_steps}", [tmp_path / f"epochs{max_steps}" / "checkpoints"]
                )
            )
            == 2
        )


def test_fast_dev_run_and_barebones_write_no_logs(tmp_path):
    """Lightning gives them no logger (or a stand-in): nested fit's own kind of the default one is not added."""
    assert main(_fit_args(tmp_path / "dev", "--trainer.fast_dev_run=1")) == 0
    assert not (tmp_path / "dev" / "lightning_logs").exists()
    barebones = ["--trainer.barebones=true", "--trainer.callbacks=null", "--trainer.log_every_n_steps=null"]
    assert main(_fit_args(tmp_path / "bare", *barebones)) == 0
    assert sorted(path.name for path in (tmp_path / "bare").iterdir()) == ["adapters", "config.yaml"]


def test_a_validation_interval_in_time_is_left_to_lightning(tmp_path):
    assert (
        main(
            _fit_args(
                tmp_path / "run", "--trainer.val_check_interval=00:00:00:30", "--trainer.limit_val_batches=1"
            )
        )
        == 0
    )


def test_a_validation_interval_longer_than_an_epoch_is_one_line(tmp_path, capsys):
    argv = _fit_args(tmp_path / "run", "--trainer.val_check_interval=50", "--data.epoch_samples=16")
    argv.append("--trainer.limit_val_batches=2")
    assert _refusal(capsys, argv) == (
        "nested fit: error: --trainer.val_check_interval=50 is more than the 4 batches of an epoch "
        "(data.epoch_samples=16 over 1 rank(s), batches of 4): lower it, raise data.epoch_samples, or pass "
        "--trainer.check_val_every_n_epoch=null to count it over the whole run (without validation: "
        "--trainer.limit_val_batches=0)"
    )
    assert main([*argv, "--trainer.check_val_every_n_epoch=null", "--data.val_domains=[]"]) == 0


def test_a_checkpoint_with_a_damaged_tensor_is_refused(tmp_path, capsys):
    root = tmp_path / "run"
    assert main(_fit_args(root)) == 0
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    name = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][name].view(-1)[0] = float("nan")
    damaged = tmp_path / "damaged.ckpt"
    torch.save(checkpoint, damaged)
    refusal = _refusal(
        capsys, _fit_args(tmp_path / "other", "--trainer.max_epochs=-1", f"--ckpt_path={damaged}")
    )
    assert refusal == (
        f"nested fit: error: cannot resume from the checkpoint {damaged}: its tensor {name} holds NaN or infinite "
        "values (a damaged file?); resume from an earlier checkpoint with --ckpt_path."
    )


def test_a_requeued_slurm_job_resumes_from_its_newest_checkpoint_not_its_ckpt_path(
    tmp_path, monkeypatch, caplog, capsys
):
    """A requeued job runs its first run's command line again: its --ckpt_path (and --auto_resume=false) chose
    where that first run started; the job goes on from the newest checkpoint under its root."""
    root = tmp_path / "run"
    # More epochs than needed: a run that reaches max_steps ends its epoch, which a longer run would find done.
    assert main(_fit_args(root, "--trainer.max_epochs=5")) == 0
    first = shutil.copy(root / "checkpoints" / "last.ckpt", tmp_path / "step-1.ckpt")
    assert main(_fit_args(root, "--trainer.max_epochs=5", "--trainer.max_steps=2")) == 0  # resumes step 1
    newest = find_resume_checkpoint(root, [root / "checkpoints"])
    assert checkpoint_step(first) == 1 and checkpoint_step(newest) == 2
    slurm = dict(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_NODEID="0", SLURM_PROCID="0",
                 SLURM_LOCALID="0", SLURM_JOB_ID="7", SLURM_JOB_NAME="job", SLURM_NODELIST="127.0.0.1")  # fmt: skip
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    argv = _fit_args(root, "--trainer.max_epochs=5", "--trainer.max_steps=3", f"--ckpt_path={first}")
    # A fresh job: going back to step 1 in a root that holds step 2 is refused (its checkpoints would mix).
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--auto_resume=false"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"nested fit: error: --ckpt_path {first} (step 1) is older than {newest} (step 2) of this run's folders; "
        "to go on from it, pass another --trainer.default_root_dir (the checkpoint can stay where it is)"
    )
    # Requeued, the job's own newer checkpoints are what it goes on from.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level("INFO"):
        assert main([*argv, "--auto_resume=false"]) == 0
    restored = [
        r.getMessage() for r in caplog.records if "Restoring states from the checkpoint" in r.getMessage()
    ]
    assert restored and restored[0].endswith(str(newest)), restored
    assert f"requeued job (SLURM_RESTART_COUNT=1): resuming from {newest}" in caplog.text
    assert f"not --ckpt_path {first}" in caplog.text
    # The checkpoint the first run started from, rotated away since: the job still goes on from its newest.
    Path(first).unlink()
    caplog.clear()
    resumed_from = find_resume_checkpoint(root, [root / "checkpoints"])
    assert checkpoint_step(resumed_from) == 3
    with caplog.at_level("INFO"):
        assert main([*argv[:-1], "--trainer.max_steps=4", argv[-1]]) == 0
    assert f"requeued job (SLURM_RESTART_COUNT=1): resuming from {resumed_from}" in caplog.text
    assert checkpoint_step(find_resume_checkpoint(root, [root / "checkpoints"])) == 4
    # With nothing under its root to go on from, the missing --ckpt_path is the error it always was.
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(tmp_path / "empty", f"--ckpt_path={first}"))
    assert exit_info.value.code == 2
    # nested validate checks the one it is given, requeued or not.
    error = _refusal(capsys, ["validate", *_fit_args(root, f"--ckpt_path={first}")[1:]])
    assert error.startswith(f"nested validate: error: --ckpt_path {first}: no such file;")


def _logged(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every ``tag`` scalar in ``log_dir``'s event files, in the order they were written."""
    points = []
    for events in sorted(log_dir.glob("events.out.tfevents.*")):  # named by their start time
        for event in EventFileLoader(str(events)).Load():
            points += [(event.step, value.simple_value) for value in event.summary.value if value.tag == tag]
    return points


def test_a_resumed_run_logs_on_to_its_tensorboard_folder(tmp_path, caplog):
    """Each start of a run from a checkpoint of its own folders (found, or named by Lightning's keywords) logs to
    the folder of the run that checkpoint comes from: one TensorBoard run across a stop and a crash. The steps
    logged after the checkpoint are logged again, with the same values. A checkpoint from elsewhere starts a
    folder of its own."""
    root = tmp_path / "run"
    argv = _fit_args(root, "--trainer.max_epochs=5", "--trainer.log_every_n_steps=1", "--trainer.max_steps=6")
    stopper = '--trainer.callbacks+={"class_path": "test_resume.SigtermAt", "init_args": {"step": 3}}'
    assert main([*argv, stopper]) == 75
    step_3 = shutil.copy(root / "hpc_ckpt_1.ckpt", tmp_path / "step-3.ckpt")
    with caplog.at_level("INFO"):
        assert main([*argv, "--ckpt_path=hpc"]) == 0  # resumes step 3, logs steps 3 to 5
    log_dir = root / "lightning_logs" / "version_0"
    assert f"nested: logging to {log_dir}, as the run this checkpoint comes from did" in caplog.text
    # A crash after step 6 that lost every checkpoint since step 3: the next start goes on from step 3 again.
    for path in [*root.glob("hpc_ckpt_*.ckpt"), *(root / "checkpoints").glob("*.ckpt")]:
        path.unlink()
    shutil.copy(step_3, root / "hpc_ckpt_1.ckpt")
    assert main(argv) == 0
    assert [path.name for path in (root / "lightning_logs").iterdir()] == ["version_0"]
    losses = _logged(log_dir, "train/loss")
    assert [step for step, _ in losses] == [0, 1, 2, 3, 4, 5, 3, 4, 5]  # one event file per start
    assert losses[3:6] == losses[6:]
    assert _logged(log_dir, "hp_metric") == []  # Lightning's placeholder (-1 at step 0, at every start)
    # A run in another root that starts from that checkpoint logs to a folder of its own there.
    other = tmp_path / "other"
    (other / "lightning_logs" / "version_0").mkdir(parents=True)  # an unrelated run's
    other_argv = _fit_args(
        other, "--trainer.max_epochs=5", "--trainer.log_every_n_steps=1", "--trainer.max_steps=4"
    )
    assert main([*other_argv, f"--ckpt_path={step_3}"]) == 0
    assert not any((other / "lightning_logs" / "version_0").iterdir())
    assert [step for step, _ in _logged(other / "lightning_logs" / "version_1", "train/loss")] == [3]


def test_a_logger_continues_only_a_run_folder_that_exists(tmp_path):
    recorded = {"name": "lightning_logs", "version": 7}  # a SLURM job's (its id) or a default's version_7
    assert continued_logger(tmp_path, recorded) is None
    assert continued_logger(tmp_path, None) is None  # a checkpoint of a run with other loggers
    (tmp_path / "lightning_logs" / "version_7").mkdir(parents=True)
    assert Path(continued_logger(tmp_path, recorded).log_dir) == tmp_path / "lightning_logs" / "version_7"


def test_a_fit_removes_the_remains_of_killed_checkpoint_writes_but_not_a_write_in_progress(tmp_path, caplog):
    """A write killed mid-way leaves its temporary file (test_resume.py kills one); one for a step-named
    checkpoint is never overwritten, as large as a checkpoint. The next fit removes those last written well
    before it started."""
    root = tmp_path / "run"
    checkpoints = root / "checkpoints"
    killed = [partial_path(checkpoints / "epoch=0-step=500.ckpt"), partial_path(root / "hpc_ckpt_3.ckpt")]
    in_progress = partial_path(checkpoints / "epoch=0-step=600.ckpt")  # another process's, being written
    recent = partial_path(checkpoints / "epoch=0-step=700.ckpt")  # a shared file system's cached time may lag
    unrelated = checkpoints / ".notes.tmp"
    for path in [*killed, in_progress, recent, unrelated]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PK\x03\x04 half a checkpoint")
    now = time.time()
    for path, age in [
        *((path, KILLED_WRITE_AGE + 60) for path in killed),
        (in_progress, -3600),
        (recent, 120),
    ]:
        os.utime(path, (now - age, now - age))
    with caplog.at_level("INFO"):
        assert main(_fit_args(root)) == 0
    assert not any(path.exists() for path in killed)
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
        [in_progress.name, recent.name, unrelated.name, "last.ckpt"]
    )
    for path in killed:
        assert f"removed {path}, the remains of a checkpoint write that was killed" in caplog.text


def test_validate_takes_the_newest_checkpoint_of_the_run_and_refuses_a_root_without_one(
    tmp_path, capsys, caplog
):
    root = tmp_path / "run"
    assert main(_fit_args(root, "--trainer.max_steps=2")) == 0
    newest = find_resume_checkpoint(root, [root / "checkpoints"])
    validate = ["validate", *_fit_args(root, "--trainer.limit_val_batches=1")[1:]]
    capsys.readouterr()

    def validation_loss(argv: list[str]) -> float:
        assert main(argv) == 0
        (row,) = [line for line in capsys.readouterr().out.splitlines() if "val/loss" in line]
        return float(re.findall(r"\d+\.\d+", row)[-1])

    with caplog.at_level("INFO"):
        newest_loss = validation_loss(validate)
    assert f"nested: validating {newest}, the newest checkpoint of this run's folders" in caplog.text
    assert newest_loss == validation_loss([*validate, f"--ckpt_path={newest}"])
    assert newest_loss == validation_loss([*validate, "--ckpt_path=last"])
    empty_root = tmp_path / "empty"
    empty = ["validate", *_fit_args(empty_root, "--trainer.limit_val_batches=1")[1:]]
    assert newest_loss != validation_loss([*empty, "--auto_resume=false"])  # the untrained adapter

    searched = f"{root} (hpc_ckpt_*.ckpt), {root / 'checkpoints'} (*.ckpt)"
    assert _refusal(capsys, [*validate, "--auto_resume=false"]) == (
        f"nested validate: error: --auto_resume=false validates the untrained adapter, but {searched} hold "
        f"checkpoints, {newest} the newest: pass another --trainer.default_root_dir"
    )
    assert _refusal(capsys, [*validate, "--ckpt_path=hpc"]) == (
        f"nested validate: error: --ckpt_path=hpc: no hpc_ckpt_*.ckpt in {root}; pass a checkpoint's path, or leave "
        "--ckpt_path out to validate the newest checkpoint of the run's folders"
    )
    assert _refusal(capsys, [*empty, "--ckpt_path=last"]).startswith(
        f"nested validate: error: --ckpt_path=last: no last*.ckpt in {empty_root / 'checkpoints'}; "
    )
    assert _refusal(capsys, empty) == (
        f"nested validate: error: no checkpoint to validate in {empty_root} (hpc_ckpt_*.ckpt), "
        f"{empty_root / 'checkpoints'} (*.ckpt): pass --ckpt_path=CHECKPOINT or the run's "
        "--trainer.default_root_dir; --auto_resume=false validates the untrained adapter"
    )


def test_a_run_stopped_from_a_chosen_checkpoint_says_to_resume_without_choosing_it(tmp_path, capsys):
    """Run again as it was, it would start from its --ckpt_path again (or refuse its own root)."""
    root = tmp_path / "run"
    assert main(_fit_args(root, "--trainer.max_epochs=5")) == 0
    first = shutil.copy(root / "checkpoints" / "last.ckpt", tmp_path / "step-1.ckpt")
    capsys.readouterr()
    argv = _fit_args(root, "--trainer.max_epochs=5", "--trainer.max_steps=4", f"--ckpt_path={first}")
    # tests/ is on sys.path under pytest: the callback that test_resume.py uses.
    stopper = '--trainer.callbacks+={"class_path": "test_resume.SigtermAt", "init_args": {"step": 2}}'
    assert main([*argv, stopper]) == 75
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "nested fit: stopped at step 2, before the end of training; exit status 75. Run the command again "
        "without --ckpt_path to resume."
    )
    assert checkpoint_step(find_resume_checkpoint(root, [root / "checkpoints"])) == 2


def test_the_way_to_start_over_names_a_checkpoint_folder_outside_the_root(tmp_path):
    root = tmp_path / "run"
    assert (
        _start_over(root / "checkpoints" / "last.ckpt", str(root))
        == "pass another --trainer.default_root_dir"
    )
    assert _start_over(tmp_path / "shared" / "last.ckpt", str(root)) == (
        f"pass another --trainer.default_root_dir and another ModelCheckpoint dirpath than {tmp_path / 'shared'}"
    )


def test_fit_sbatch_runs_in_run_dir_and_refuses_a_root_of_its_own(tmp_path):
    """The script's --trainer.default_root_dir comes last: one given after the config would lose without a
    word, so it is refused; RUN_DIR names the folder. srun and scontrol are stubs that print what they got."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (stubs / "scontrol").write_text("#!/bin/sh\necho node1\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", **SLURM_VALUES, "SLURM_JOB_ID": "9",
           "SLURM_JOB_NODELIST": "node1", "SLURM_GPUS_ON_NODE": "0"}  # fmt: skip
    script = str(REPO / "scripts" / "slurm" / "fit.sbatch")

    def sbatch(*arguments: str, **variables: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", script, "configs/smoke.yaml", *arguments], env={**env, **variables}, cwd=tmp_path,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    refused = sbatch("--trainer.max_steps=2", "--trainer.default_root_dir=runs/mine")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == (
        "fit.sbatch: error: the run folder is runs/<job name> (sbatch --job-name=NAME) or $RUN_DIR (RUN_DIR=DIR "
        "sbatch ...); drop --trainer.default_root_dir=runs/mine\n"
    )
    ran = sbatch("--trainer.max_steps=2", RUN_DIR="runs/mine")
    assert ran.returncode == 0, ran.stderr
    assert (
        ran.stdout.splitlines()[-1] == "--trainer.default_root_dir=runs/mine"
        and (tmp_path / "runs/mine").is_dir()
    )


def test_a_base_model_folder_without_its_unet_is_one_line_naming_it(tmp_path, capsys):
    model = shutil.copytree(REPO / "data/models/tiny-sd", tmp_path / "tiny-sd")
    shutil.rmtree(model / "unet")
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(tmp_path / "run", f"--model.base_model={model}"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"nested fit: error: {model} has no unet/ folder: it is not a complete diffusers")
    assert "model_index.json and the subfolders unet/, vae/, scheduler/" in error


def _torch_reads(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return False
    return True


def test_resuming_a_checkpoint_of_another_architecture_names_it_and_how_to_start_over(tmp_path, capsys):
    """The run's checkpoint has 16 subject tokens; the same command with num_tokens=8 auto-resumes it and is
    refused in one line: which checkpoint, which tensor and setting differ, how to start over."""
    root = tmp_path / "run"
    assert main(_fit_args(root)) == 0
    checkpoint = root / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(root, "--trainer.max_steps=2", "--model.encoder.num_tokens=8"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"nested fit: error: cannot resume from the checkpoint {checkpoint}:")
    assert "adapter.encoder.resampler.latents is [1, 16, 64] there, [1, 8, 64] here" in error
    assert "encoder.num_tokens: 16 -> 8" in error
    assert error.endswith(
        "or start a new run in another --trainer.default_root_dir (nested fit resumes from the "
        "newest checkpoint under it)."
    )
    # Given as --ckpt_path to a new run, the same checkpoint is refused the same way: its settings are not
    # taken over the configured ones.
    with pytest.raises(SystemExit) as exit_info:
        main(
            _fit_args(
                tmp_path / "new",
                "--trainer.max_steps=2",
                "--model.encoder.num_tokens=8",
                f"--ckpt_path={checkpoint}",
            )
        )
    assert exit_info.value.code == 2
    assert "encoder.num_tokens: 16 -> 8" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "validate",
                *_fit_args(tmp_path / "new", "--model.encoder.num_tokens=8", f"--ckpt_path={checkpoint}")[1:],
            ]
        )
    assert exit_info.value.code == 2
    assert "encoder.num_tokens: 16 -> 8" in capsys.readouterr().err.strip().splitlines()[-1]
    # Starting over in the same root is refused: the new run's checkpoints would mix with these.
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(root, "--trainer.max_steps=2", "--auto_resume=false"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        f"nested fit: error: --auto_resume=false: {checkpoint} (step {checkpoint_step(checkpoint)}) is a "
        "checkpoint of an earlier run; to start over, pass another --trainer.default_root_dir (or move it away); "
        "to resume, leave --auto_resume=false out"
    )
    # A --ckpt_path that is missing, cut short or not a Lightning checkpoint: one line, before any training.
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(checkpoint.read_bytes()[:-4096])
    for path, problem in (
        (tmp_path / "missing.ckpt", ": no such file;"),
        (
            cut,
            " is not a readable checkpoint (not the zip archive torch.save writes: another kind of file, or ",
        ),
        (
            REPO / "data/models/tiny-sd/unet/config.json",
            " is not a readable checkpoint (not the zip archive ",
        ),
        (  # torch.load reads a safetensors file from torch 2.13 (it holds no global_step); earlier ones refuse it
            REPO / "data/models/tiny-sd/unet/diffusion_pytorch_model.safetensors",
            " is not a Lightning checkpoint"
            if _torch_reads(REPO / "data/models/tiny-sd/unet/diffusion_pytorch_model.safetensors")
            else " is not a readable checkpoint (not the zip archive ",
        ),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(_fit_args(tmp_path / "other", f"--ckpt_path={path}"))
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"nested fit: error: --ckpt_path {path}{problem}"), error
        assert error.endswith("resume from the newest readable one under trainer.default_root_dir")
    assert not (tmp_path / "other" / "checkpoints").exists()


class _UnreadableShards(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        try:
            raise DataError("tarfile: truncated header")
        except DataError as error:  # a chained error of the same class: the outer message is the one shown
            raise DataError("shard /data/0.tar is not a tar file;\nrebuild it with nested shards") from error


def test_a_user_error_raised_in_a_loader_worker_is_its_own_message_on_one_line():
    """torch re-raises a worker's exception with the worker's traceback in its message: the one line a command
    prints is the worker's message and where it was raised, not the traceback."""
    with pytest.raises(DataError) as raised:
        next(iter(torch.utils.data.DataLoader(_UnreadableShards(), num_workers=1)))
    assert "Original Traceback" in str(raised.value)
    assert one_line(raised.value) == (
        "shard /data/0.tar is not a tar file; rebuild it with nested shards (in DataLoader worker process 0)"
    )
    assert one_line(DataError("a\n  b")) == "a b"


def test_an_output_folder_below_a_file_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    expected = f"{str(out)!r} cannot be created: {blocker} is a file, not a folder."
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(out))
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"nested fit: error: --trainer.default_root_dir {expected}"
    )
    assert (
        main(
            ["shards", str(REPO / "data/demo/faces"), str(out), "--domain", "faces", "--subject", "<person>"]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == f"nested shards: error: OUT {expected}"
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(tmp_path / "run", f"--export.dirpath={out}"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"nested fit: error: the AdapterExport dirpath {expected}"
    with pytest.raises(SystemExit) as exit_info:  # before T5 loads
        main(["prompts", "--config", "configs/smoke-flux.yaml", f"--model.prompt_cache={out}"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"nested prompts: error: --model.prompt_cache {expected}"
    # Another command reading a run's configuration does not write to its folders: they are not checked.
    configured_run(["--config", "configs/smoke.yaml", f"--trainer.default_root_dir={out}"])
    assert blocker.read_text() == "not a folder"

"""``nested push``: upload an adapter folder to the Hugging Face Hub, with a model card (no Lightning needed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from nested.cli.common import CommandParser, one_line, read_text_option
from nested.errors import NestedUserError, UsageError

__all__ = ["main_push", "push_parser"]


def push_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="nested push",
        description="Upload an adapter folder to a Hugging Face Hub model repo, with a model card. The token comes "
        "from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects the Hub.",
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="e.g. runs/demo/adapters/last")
    parser.add_argument("repo_id", metavar="REPO_ID", help="user/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument(
        "--commit-message",
        default=None,
        help="the Hub commit's message (default: Upload nested adapter for TOKEN)",
    )
    parser.add_argument("--license", default="other", help="license in the model card (default: other)")
    parser.add_argument(
        "--base-model", default=None, help="hub id of the base model, for the card's metadata"
    )
    parser.add_argument(
        "--training-config", default=None, help="LightningCLI config.yaml to summarise in the card"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=3600.0,
        help="stop the push if it has not finished after this many seconds (default 3600; 0: no limit). "
        "huggingface_hub sets no timeout on its requests, so a Hub that stops answering would otherwise "
        "hold the command, and a job script that runs it, forever",
    )
    return parser


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _check_training_config(path: Path) -> None:
    """Refuse a ``--training-config`` that is not a readable YAML mapping (a run's config.yaml), before the
    push starts."""
    try:
        config = yaml.safe_load(read_text_option(path, "--training-config", "the run's config.yaml"))
    except yaml.YAMLError as error:
        raise UsageError(
            f"--training-config {path} is not readable YAML ({error}); pass the run's config.yaml."
        ) from error
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UsageError(
            f"--training-config {path} holds no run configuration (a mapping with a model: section); pass "
            "the run's config.yaml."
        )


def main_push(argv: list[str] | None = None) -> int:
    """``nested push``: returns the exit code (0 ok, 2 for an error, shown in one line; 1 for a bug in the
    push, with its traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = push_parser().parse_args(argv)
    # Imported after parsing: `nested push --help` answers without loading torch.
    from nested.hub.background import PushProcess, PushRequest
    from nested.hub.model_card import REPO_ID_PATTERN
    from nested.hub_access import redact

    try:
        if not REPO_ID_PATTERN.match(args.repo_id):
            raise UsageError(
                f"the repo id {args.repo_id!r} must look like 'user/name' (letters, digits, - _ .)."
            )
        if args.training_config:
            _check_training_config(Path(args.training_config))
        if _is_partial(args.adapter_dir):
            # Snapshots during training are pushed on purpose (HubUpload does); say what this one is.
            print(
                f"nested push: warning: {args.adapter_dir} is the export of a run that had not finished "
                "(adapter_config.json: training.complete is false); pushing it as it is",
                file=sys.stderr,
            )
    except NestedUserError as error:
        print(f"nested push: error: {redact(one_line(error))}", file=sys.stderr)
        return 2
    # The push runs in a child process: one stuck in an HTTP request can be stopped at the timeout.
    request = PushRequest(
        adapter_dir=args.adapter_dir,
        repo_id=args.repo_id,
        private=args.private,
        revision=args.revision,
        license=args.license,
        base_model=args.base_model,
        training_config=args.training_config,
        commit_message=args.commit_message,
    )
    outcome = PushProcess(request).wait(args.timeout or None, timeout_name="--timeout")
    if outcome.status != "uploaded":
        if outcome.crashed:  # a bug: its traceback, not a user error
            print(f"nested push: {outcome.message}", file=sys.stderr)
            return 1
        print(f"nested push: error: {outcome.message}", file=sys.stderr)
        return 2
    print(f"Pushed {args.adapter_dir} to {args.repo_id}: {outcome.message}")
    return 0


def _is_partial(adapter_dir: str) -> bool:
    """Whether the folder holds the export of an unfinished run (False when its config is missing or
    malformed: the load check of the push names that)."""
    from nested.adapter import training_is_complete  # here: `nested push --help` loads no torch

    try:
        return not training_is_complete(adapter_dir)
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main_push())

"""Sharing adapters on the Hugging Face Hub: ``push_adapter`` (no Lightning needed).

The model card written on every push comes from :mod:`nested.hub.model_card`; the training callback that
pushes every export is :class:`nested.callbacks.HubUpload`, which runs each push in a child process
(:mod:`nested.hub.background`).

The Hub token is never an argument of anything that is configured or logged: it comes from the
environment (``HF_TOKEN``) or the huggingface_hub login, and is scrubbed from every message and card we
write. Loading goes through ``NestedAdapter.from_pretrained("user/repo", revision=...)`` (huggingface_hub's
cache; ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are honoured).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from nested.adapter import CONFIG_NAME, WEIGHTS_NAME, check_adapter_files
from nested.errors import HubError
from nested.files import write_text_atomic
from nested.hub.model_card import CARD_MARKER, CARD_NAME, IMAGE_SUFFIXES, model_card, scrub_config
from nested.hub_access import hub_endpoint, network_error, redact

__all__ = [
    "TRAINING_CONFIG_NAME",
    "UPLOAD_PATTERNS",
    "is_permanent_error",
    "push_adapter",
    "stage_export",
    "write_model_card",
]

log = logging.getLogger("nested.hub")

TRAINING_CONFIG_NAME = "training_config.yaml"
UPLOAD_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, TRAINING_CONFIG_NAME, "samples/*"] + [
    f"*{suffix}" for suffix in IMAGE_SUFFIXES
]


def write_model_card(adapter_dir: str | os.PathLike, **card_kwargs: Any) -> Path:
    """Write ``README.md`` into ``adapter_dir`` unless it holds a card the user edited (no marker line)."""
    path = Path(adapter_dir) / CARD_NAME
    if path.is_file() and CARD_MARKER not in path.read_text(encoding="utf8"):
        log.info("keeping the hand-written %s", path)
        return path
    return write_text_atomic(path, model_card(adapter_dir, **card_kwargs))


def write_training_config(adapter_dir: Path, training_config: str | os.PathLike | Mapping) -> Path:
    """``training_config.yaml`` in ``adapter_dir``: the run's config without secret-looking entries."""
    if not isinstance(training_config, Mapping):
        training_config = yaml.safe_load(Path(training_config).read_text(encoding="utf-8")) or {}
    text = yaml.safe_dump(scrub_config(training_config), sort_keys=False, default_flow_style=False)
    return write_text_atomic(adapter_dir / TRAINING_CONFIG_NAME, redact(text))


def push_adapter(
    adapter_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    *,
    license: str = "other",
    base_model: str | None = None,
    training_config: str | os.PathLike | Mapping | None = None,
    endpoint: str | None = None,
):
    """Upload an adapter folder to a Hub model repo (created if needed); returns the ``CommitInfo``.

    First checks the folder as loading it would (:func:`~nested.adapter.check_adapter_files`): an adapter
    that cannot be loaded is refused before any byte is sent. Then writes the model card (README.md) and,
    when ``training_config`` is given, ``training_config.yaml`` (secrets scrubbed) into the folder, and
    uploads the adapter files, those two and sample images. ``token`` defaults to ``HF_TOKEN`` / the
    saved login; ``revision`` is a branch, created from main if missing.
    """

    folder = Path(adapter_dir)
    config = check_adapter_files(folder)
    if training_config is not None:
        write_training_config(folder, training_config)
    write_model_card(
        folder, repo_id=repo_id, license=license, base_model=base_model, training_config=training_config
    )
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"Upload nested adapter for {config.token}"
    try:
        return _upload(api, folder, repo_id, private, revision, message)
    except Exception as error:
        cause = network_error(error)
        if cause is None:
            raise
        where = hub_endpoint(api, endpoint)
        detail = redact(" ".join(f"{type(cause).__name__}: {cause}".split())).rstrip(".")
        if isinstance(cause, HfHubHTTPError):
            status = cause.response.status_code if cause.response is not None else 0
            advice = (
                "The Hub is failing or busy: push again later."
                if status >= 500 or status == 429
                else "Check the repo id (and --revision), your token (HF_TOKEN or `hf auth login`) and that it "
                "may write to that repo."
            )
            raise HubError(f"the Hub at {where} refused the push to {repo_id}: {detail}. {advice}") from error
        raise HubError(
            f"could not reach the Hub at {where} to push to {repo_id}: {detail}. Check the network, or "
            "HF_ENDPOINT (unset it for huggingface.co)."
        ) from error


def _upload(api: HfApi, folder: Path, repo_id: str, private: bool, revision: str | None, message: str):
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=revision,
        commit_message=message,
        allow_patterns=UPLOAD_PATTERNS,
        ignore_patterns=[".*", "**/.*"],
    )


def is_permanent_error(error: BaseException) -> bool:
    """Errors that retrying cannot fix: a bad adapter, authentication, permissions, bad requests, offline mode.

    A :class:`~nested.errors.HubError` is judged by the error it wraps.
    """

    if isinstance(error, HubError) and error.__cause__ is not None:
        cause = network_error(error.__cause__)
        return is_permanent_error(cause if cause is not None else error.__cause__)
    if isinstance(error, (OfflineModeIsEnabled, ValueError, FileNotFoundError)):
        return True
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        return 400 <= status < 500 and status not in (408, 409, 423, 429)
    return False


def stage_export(folder: Path, dir: str | os.PathLike | None = None) -> Path:
    """A private snapshot of an export, safe from the folder being replaced while it is uploaded.

    Hard links where possible (``dir`` on the export's file system: no copy); hidden files are left out.
    """
    staging = Path(tempfile.mkdtemp(prefix=".nested-hub-", dir=dir))
    try:
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                target = staging / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, target)
                except OSError:
                    shutil.copy2(path, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging

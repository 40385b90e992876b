"""Sharing adapters on the Hugging Face Hub: ``push_adapter`` (no Lightning needed).

The model card written on every push comes from :mod:`nested.hub.model_card`; the training callback that
pushes every export is :class:`nested.callbacks.HubUpload`.

The Hub token is never an argument of anything that is configured or logged: it comes from the
environment (``HF_TOKEN``) or the huggingface_hub login, and is scrubbed from every message and card we
write. Loading goes through ``NestedAdapter.from_pretrained("user/repo", revision=...)`` (huggingface_hub's
cache; ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are honoured).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from nested.adapter import CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME
from nested.errors import AdapterError, HubError, MissingFileError
from nested.hub.model_card import (
    CARD_MARKER,
    CARD_NAME,
    IMAGE_SUFFIXES,
    model_card,
    redact,
)

__all__ = ["UPLOAD_PATTERNS", "is_permanent_error", "push_adapter", "stage_export", "write_model_card"]

log = logging.getLogger("nested.hub")

UPLOAD_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, "training_config.yaml", "samples/*"] + [
    f"*{suffix}" for suffix in IMAGE_SUFFIXES
]


def _check_adapter_dir(adapter_dir: Path) -> None:
    if not adapter_dir.is_dir():
        raise MissingFileError(f"adapter folder {str(adapter_dir)!r} does not exist.")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (adapter_dir / name).is_file()]
    if missing:
        raise MissingFileError(
            f"{adapter_dir} is not a nested adapter folder: missing {missing} (export one with nested fit, "
            "or NestedAdapter.save_pretrained)."
        )
    pickles = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(f"{adapter_dir} contains pickle files {pickles}; nested shares safetensors only.")


def _is_network_error(error: BaseException) -> bool:
    """An HTTP error answer, or no answer at all (huggingface_hub talks through httpx or requests)."""

    module = type(error).__module__.split(".")[0]
    return isinstance(error, (HfHubHTTPError, ConnectionError, TimeoutError)) or module in (
        "httpx",
        "requests",
    )


def write_model_card(adapter_dir: str | os.PathLike, **card_kwargs: Any) -> Path:
    """Write ``README.md`` into ``adapter_dir`` unless it holds a card the user edited (no marker line)."""
    path = Path(adapter_dir) / CARD_NAME
    if path.is_file() and CARD_MARKER not in path.read_text(encoding="utf8"):
        log.info("keeping the hand-written %s", path)
        return path
    path.write_text(model_card(adapter_dir, **card_kwargs), encoding="utf8")
    return path


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

    Writes the model card (README.md) into the folder first, then uploads the adapter files, the card,
    ``training_config.yaml`` and sample images. ``token`` defaults to ``HF_TOKEN`` / the saved login;
    ``revision`` is a branch, created from main if missing.
    """

    folder = Path(adapter_dir)
    _check_adapter_dir(folder)
    write_model_card(
        folder, repo_id=repo_id, license=license, base_model=base_model, training_config=training_config
    )
    api = HfApi(endpoint=endpoint, token=token)
    config = json.loads((folder / CONFIG_NAME).read_text())
    try:
        return _upload(api, folder, repo_id, private, revision, commit_message, config)
    except Exception as error:
        if not _is_network_error(error):
            raise
        where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        raise HubError(
            f"the Hub at {where} refused or could not be reached while pushing to {repo_id}: "
            f"{redact(str(error))}. Check the network, HF_ENDPOINT and your token (hf auth login)."
        ) from error


def _upload(
    api, folder: Path, repo_id: str, private: bool, revision: str | None, commit_message, config: dict
):
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=revision,
        commit_message=commit_message or f"Upload nested adapter for {config.get('token', 'a subject')}",
        allow_patterns=UPLOAD_PATTERNS,
        ignore_patterns=[".*", "**/.*"],
    )


def is_permanent_error(error: BaseException) -> bool:
    """Errors that retrying cannot fix: authentication, permissions, bad requests, offline mode.

    A :class:`~nested.errors.HubError` is judged by the error it wraps.
    """

    if isinstance(error, HubError) and error.__cause__ is not None:
        return is_permanent_error(error.__cause__)
    if isinstance(error, (OfflineModeIsEnabled, ValueError, FileNotFoundError)):
        return True
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        return 400 <= status < 500 and status not in (408, 409, 423, 429)
    return False


def stage_export(folder: Path) -> Path:
    """A private snapshot of an export (hard links when possible), safe from the folder being replaced."""
    staging = Path(tempfile.mkdtemp(prefix="nested-hub-"))
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            target = staging / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
    return staging

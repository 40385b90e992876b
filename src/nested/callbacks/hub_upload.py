"""``HubUpload``: upload every adapter export of a run to a Hub repo, in a background thread."""

from __future__ import annotations

import logging
import queue
import re
import shutil
import threading
import time
from pathlib import Path

import lightning as L
import yaml
from huggingface_hub import get_token
from lightning.pytorch.utilities import rank_zero_info

from nested.adapter import CONFIG_NAME, WEIGHTS_NAME
from nested.callbacks.export import AdapterExport
from nested.errors import ConfigError
from nested.hub.model_card import REPO_ID_PATTERN, scrub_config
from nested.hub.push import is_permanent_error, push_adapter, redact, stage_export

__all__ = ["HubUpload"]

log = logging.getLogger("nested.hub")


class HubUpload(L.Callback):
    """Upload every adapter export of a run to a Hub repo, in a background thread.

    It watches the export folder (``<default_root_dir>/adapters`` or ``AdapterExport``'s ``dirpath``)
    and uploads each new ``step=N/`` and ``last/`` folder as a commit to ``repo_id`` (the newest export
    is always at the repo root; older ones stay in the commit history). Training never waits for the
    Hub: failures are retried with exponential backoff, then reported as a warning. At the end of fit
    it waits up to ``final_timeout`` seconds for pending uploads. Runs on global rank 0 only.

    The Hub token comes from ``HF_TOKEN`` or ``hf auth login``; it is not a parameter, so it never
    lands in a saved config.

    Args:
        repo_id: the model repo, ``user/name`` (created if missing).
        private: create the repo private.
        revision: branch to push to (default: main).
        license: license in the model card.
        max_retries: retries per export after the first attempt.
        backoff: first retry delay in seconds; doubles each retry, capped at ``max_backoff``.
        max_backoff: longest delay between retries.
        final_timeout: seconds to wait for pending uploads at the end of fit.
        poll_interval: seconds between scans of the export folder from the upload thread.
        dirpath: the export folder to watch (default: the one ``AdapterExport`` writes to).
    """

    def __init__(
        self,
        repo_id: str,
        private: bool = True,
        revision: str | None = None,
        license: str = "other",
        max_retries: int = 5,
        backoff: float = 5.0,
        max_backoff: float = 300.0,
        final_timeout: float = 600.0,
        poll_interval: float = 30.0,
        dirpath: str | None = None,
    ):
        if not REPO_ID_PATTERN.match(repo_id):
            raise ConfigError(f"repo_id must look like 'user/name', got {repo_id!r}.")
        if max_retries < 0 or backoff < 0 or final_timeout < 0 or poll_interval <= 0:
            raise ConfigError("max_retries, backoff and final_timeout must be >= 0 and poll_interval > 0.")
        self.repo_id = repo_id
        self.private = private
        self.revision = revision
        self.license = license
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.final_timeout = final_timeout
        self.poll_interval = poll_interval
        self.dirpath = dirpath
        self.uploaded: list[str] = []  # export names, in upload order
        self.failed: list[str] = []
        self._root: Path | None = None
        self._config_dirs: list[Path] = []
        self._seen: dict[str, tuple[int, int]] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interrupted = False

    # ------------------------------------------------------------------------------ lightning
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self._thread is not None:
            return

        self._root = self._export_root(trainer)
        # LightningCLI saves config.yaml during setup too: it is looked up at upload time.
        self._config_dirs = [Path(d) for d in (trainer.log_dir, trainer.default_root_dir) if d]
        self._seen = self._signatures()  # exports of an earlier run are not re-uploaded
        if get_token() is None:
            log.warning(
                "HubUpload: no Hugging Face token found (set HF_TOKEN or run `hf auth login`); uploads to %s "
                "will probably fail. Training is not affected.",
                self.repo_id,
            )
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="nested-hub-upload", daemon=True)
        self._thread.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._scan()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._scan()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._interrupted = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Runs after every callback's on_fit_end, so AdapterExport's last/ folder exists by now.
        if stage != "fit" or self._thread is None:
            return
        self._scan()
        self.wait(0.0 if self._interrupted else self.final_timeout)

    # ------------------------------------------------------------------------------ machinery
    def wait(self, timeout: float) -> bool:
        """Stop after the pending uploads, waiting at most ``timeout`` s; True if all finished."""
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        self._queue.put(None)
        thread.join(timeout)
        if thread.is_alive():
            self._stop.set()  # no further retries; a running request ends on its own
            pending = self._queue.qsize()
            log.warning(
                "HubUpload: uploads to %s still pending after %.0f s (%d queued); giving up on them. Push an "
                "export by hand with: nested push %s %s",
                self.repo_id,
                timeout,
                pending,
                self._root / "last" if self._root else "ADAPTER_DIR",
                self.repo_id,
            )
            return False
        return True

    def _export_root(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        for callback in trainer.callbacks:
            if isinstance(callback, AdapterExport):
                return callback.export_root(trainer)
        return Path(trainer.default_root_dir) / "adapters"

    def _signatures(self) -> dict[str, tuple[int, int]]:
        if self._root is None or not self._root.is_dir():
            return {}
        signatures = {}
        for folder in self._root.iterdir():
            weights = folder / WEIGHTS_NAME
            if folder.name.startswith(".") or not (folder / CONFIG_NAME).is_file() or not weights.is_file():
                continue
            try:
                stat = weights.stat()
            except OSError:  # replaced while we looked
                continue
            signatures[folder.name] = (stat.st_mtime_ns, stat.st_size)
        return signatures

    def _scan(self) -> None:
        """Queue every export that is new or changed since the last scan (cheap: one directory listing)."""
        if self._root is None:  # not set up, or not global rank 0
            return
        with self._lock:
            current = self._signatures()
            fresh = sorted(
                (name for name, sig in current.items() if self._seen.get(name) != sig),
                key=lambda name: (name == "last", _step_of(name)),
            )
            self._seen.update({name: current[name] for name in fresh})
        for name in fresh:
            self._queue.put(name)

    def _work(self) -> None:
        while True:
            try:
                name = self._queue.get(timeout=self.poll_interval)
            except queue.Empty:
                self._scan()
                continue
            if name is None:
                return
            self._upload_with_retries(name)

    def _upload_with_retries(self, name: str) -> None:
        assert self._root is not None
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                return
            try:
                started = time.monotonic()
                info = self._upload(self._root / name)
                rank_zero_info(
                    f"HubUpload: {name} uploaded to {self.repo_id} in {time.monotonic() - started:.1f} s "
                    f"({getattr(info, 'commit_url', '')})"
                )
                self.uploaded.append(name)
                return
            except Exception as error:  # noqa: BLE001 - the Hub must never stop training
                message = redact(f"{type(error).__name__}: {error}".splitlines()[0])
                if is_permanent_error(error) or attempt == self.max_retries:
                    log.warning(
                        "HubUpload: could not upload %s to %s (%s); training continues. Push it later with: "
                        "nested push %s %s",
                        name,
                        self.repo_id,
                        message,
                        self._root / name,
                        self.repo_id,
                    )
                    self.failed.append(name)
                    return
                delay = min(self.backoff * 2**attempt, self.max_backoff)
                log.warning(
                    "HubUpload: upload of %s to %s failed (%s); retry %d/%d in %.1f s.",
                    name,
                    self.repo_id,
                    message,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                if self._stop.wait(delay):
                    return

    def _upload(self, folder: Path):
        staging = stage_export(folder)
        try:
            configs = [d / "config.yaml" for d in self._config_dirs if (d / "config.yaml").is_file()]
            if configs and not (staging / "training_config.yaml").exists():
                config = scrub_config(yaml.safe_load(configs[0].read_text()) or {})
                text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
                (staging / "training_config.yaml").write_text(redact(text))
            step = _step_of(folder.name)
            what = f"step {step}" if step >= 0 else folder.name
            return push_adapter(
                staging,
                self.repo_id,
                private=self.private,
                revision=self.revision,
                commit_message=f"nested: adapter export ({what})",
                license=self.license,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _step_of(name: str) -> int:
    match = re.fullmatch(r"step=(\d+)", name)
    return int(match.group(1)) if match else -1

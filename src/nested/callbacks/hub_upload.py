"""``HubUpload``: upload the newest adapter export of a run to a Hub repo, in the background."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import lightning as L
from huggingface_hub import get_token
from lightning.pytorch.utilities import rank_zero_info

from nested.adapter import CONFIG_NAME, WEIGHTS_NAME, check_adapter_files
from nested.callbacks.export import AdapterExport
from nested.errors import ConfigError, NestedUserError
from nested.hub.background import PushOutcome, PushProcess, PushRequest
from nested.hub.model_card import REPO_ID_PATTERN
from nested.hub.push import stage_export
from nested.hub_access import redact

__all__ = ["HubUpload"]

log = logging.getLogger("nested.hub")
_SUPERSEDED = "superseded by the newer export"
# The user of callbacks/hub.yaml's repo_id, there to be replaced.
PLACEHOLDER_USER = "your-name"


class HubUpload(L.Callback):
    """Upload each new adapter export of a run to a Hub repo, in the background; training never waits.

    It watches the export folder (``<default_root_dir>/adapters`` or ``AdapterExport``'s ``dirpath``) and
    pushes each new export (``step=N/``, ``last/``) as a commit to ``repo_id``: the newest export is at the
    repo root, older ones stay in the commit history. Each push runs ``nested push`` in a child process
    that the run can stop at any moment (:mod:`nested.hub.background`), and checks the export as loading it
    would: an export that cannot be loaded is reported, not uploaded.

    Only the newest export matters: an export that is still waiting (a retry's backoff, or behind a push in
    progress) when a newer one appears is dropped. A failed push is retried with exponential backoff; a
    refusal that no retry can fix (a bad token, a bad adapter) is not retried.

    At the end of fit the run waits for the pending push at most ``final_timeout`` seconds, or
    ``grace_seconds`` when training stopped early (a stop signal such as SLURM's ``--signal=USR1@90``, an
    exception, early stopping). Then the push is stopped, and every export that was not uploaded is listed
    with the ``nested push`` command that uploads it. The waits can be interrupted by signals: a second stop
    signal ends the run at once. Runs on global rank 0 only.

    The Hub token comes from ``HF_TOKEN`` or ``hf auth login`` (and the Hub from ``HF_ENDPOINT``); it is not
    a parameter, so it never lands in a saved config.

    Args:
        repo_id: the model repo, ``user/name`` (created if missing).
        private: create the repo private.
        revision: branch to push to (default: main).
        license: license in the model card.
        max_retries: retries per export after the first attempt.
        backoff: first retry delay in seconds; doubles each retry, capped at ``max_backoff``.
        max_backoff: longest delay between retries.
        final_timeout: seconds to wait for the pending push when fit ends normally.
        grace_seconds: seconds to wait for it when training stopped early. Under SLURM, keep the checkpoint
            time plus this under the warning time of ``--signal=USR1@<seconds>``.
        attempt_timeout: seconds one push may take before it is stopped and retried.
        poll_interval: seconds between scans of the export folder from the background thread.
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
        max_backoff: float = 60.0,
        final_timeout: float = 120.0,
        grace_seconds: float = 30.0,
        attempt_timeout: float = 900.0,
        poll_interval: float = 30.0,
        dirpath: str | None = None,
    ):
        if not REPO_ID_PATTERN.match(repo_id):
            raise ConfigError(f"repo_id must look like 'user/name', got {repo_id!r}.")
        if repo_id.split("/")[0] == PLACEHOLDER_USER:  # else every upload of the run would be refused
            raise ConfigError(
                f"HubUpload repo_id {repo_id!r} is callbacks/hub.yaml's placeholder: set it to your user/name (in "
                "a copy of that file)."
            )
        at_least_0 = {"max_retries": max_retries, "backoff": backoff, "max_backoff": max_backoff}
        at_least_0 |= {"final_timeout": final_timeout, "grace_seconds": grace_seconds}
        above_0 = {"attempt_timeout": attempt_timeout, "poll_interval": poll_interval}
        wrong = [f"{k}={v}" for k, v in at_least_0.items() if v < 0]
        wrong += [f"{k}={v}" for k, v in above_0.items() if v <= 0]
        if wrong:
            raise ConfigError(
                f"HubUpload: {', '.join(wrong)}: {', '.join(at_least_0)} must be >= 0, {', '.join(above_0)} > 0."
            )
        self.repo_id = repo_id
        self.private = private
        self.revision = revision
        self.license = license
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.final_timeout = final_timeout
        self.grace_seconds = grace_seconds
        self.attempt_timeout = attempt_timeout
        self.poll_interval = poll_interval
        self.dirpath = dirpath
        self.uploaded: list[str] = []  # export names, in upload order
        self.not_uploaded: dict[str, str] = {}  # export name -> why
        self._root: Path | None = None
        self._config_dirs: list[Path] = []
        self._seen: dict[str, tuple[int, int]] = {}
        self._pending: str | None = None  # the newest export not started yet
        self._current: str | None = None  # the export being pushed
        self._process: PushProcess | None = None
        self._closing = False  # fit ended: finish the pending push, then stop
        self._deadline: float | None = None  # when the wait at the end of fit ends (time.monotonic)
        self._cancelled = False  # stop now
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._interrupted = False
        self._saved = False  # a checkpoint was saved since the last scan

    # ------------------------------------------------------------------------------ lightning
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self._thread is not None:
            return

        self._root = self._export_root(trainer)
        # nested fit saves config.yaml once training starts (SaveConfigAfterRestore): it is looked up at upload time.
        self._config_dirs = [Path(d) for d in (trainer.log_dir, trainer.default_root_dir) if d]
        self._seen = self._signatures()  # exports of an earlier run are not re-uploaded
        if get_token() is None:
            log.warning(
                "HubUpload: no Hugging Face token found (set HF_TOKEN or run `hf auth login`); uploads to %s "
                "will probably fail. Training is not affected.",
                self.repo_id,
            )
        for leftover in self._root.glob(".nested-hub-*"):  # snapshots of a run that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        self._closing = self._cancelled = False
        self._deadline = None
        self._thread = threading.Thread(target=self._work, name="nested-hub-upload", daemon=True)
        self._thread.start()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._saved = True  # AdapterExport writes its export beside each checkpoint

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Scanning lists every export: after a checkpoint save only, not at every step of a long run (the
        # background thread also scans every poll_interval).
        if self._saved:
            self._saved = False
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
        stopped_early = self._interrupted or trainer.should_stop
        self.finish(self.grace_seconds if stopped_early else self.final_timeout)

    # ------------------------------------------------------------------------------ the end
    def finish(self, timeout: float) -> bool:
        """Finish the pending push, waiting at most ``timeout`` s; then stop and list what was not uploaded.

        Returns True if nothing is left. The wait is interruptible: a signal handler that raises ends it,
        and the push process is stopped all the same.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing, self._deadline = True, deadline
            busy = self._pending or self._current
            if self._pending and self._current and self._process is not None:
                self._process.kill()  # only the newest export matters now
            self._cond.notify_all()
        try:
            if busy:
                rank_zero_info(
                    f"HubUpload: waiting up to {timeout:.0f} s for the upload of {busy} to {self.repo_id}."
                )
            while thread.is_alive() and time.monotonic() < deadline:
                thread.join(min(0.5, max(0.0, deadline - time.monotonic())))
        finally:
            self._cancel()
            self._report()
            thread.join(10)  # the push process is killed: the thread only removes its snapshot
        return not self.not_uploaded

    def _cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            if self._process is not None:
                self._process.kill()
            for name in filter(None, (self._current, self._pending)):
                self.not_uploaded.setdefault(name, "still uploading when the run ended")
            self._cond.notify_all()

    def _report(self) -> None:
        """List every export not uploaded with its command: a warning, unless each was only superseded."""
        missing = {name: why for name, why in self.not_uploaded.items() if (self._root / name).is_dir()}
        if self.uploaded:  # pushed now, an export older than the repo root's would replace it
            root = self.uploaded[-1]
            older = sorted(
                name for name in missing if self._seen.get(name, (0, 0)) < self._seen.get(root, (0, 0))
            )
            for name in older:
                del missing[name]
            if older:
                rank_zero_info(
                    f"HubUpload: {len(older)} older export(s) not uploaded to {self.repo_id} ({', '.join(older)}): "
                    f"its root holds the newer {root}. To keep one there as well, push it with --revision."
                )
        if not missing:
            return
        order = sorted(missing, key=lambda name: self._seen.get(name, (0, 0)))
        lines = [
            f"  {self._request(self._root / name).command()}\n      # {redact(missing[name])}"
            for name in order
        ]
        text = (
            f"HubUpload: {len(order)} export(s) not uploaded to {self.repo_id}. Push them with (oldest first: the "
            "last one ends at the repo root):\n" + "\n".join(lines)
        )
        if all(why.startswith(_SUPERSEDED) for why in missing.values()):
            rank_zero_info(text)
        else:
            log.warning(text)

    # ------------------------------------------------------------------------------ watching
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
        """Make the newest new or changed export the pending one (cheap: one directory listing)."""
        if self._root is None:  # not set up, or not global rank 0
            return
        with self._cond:
            current = self._signatures()
            fresh = sorted(
                (n for n, sig in current.items() if self._seen.get(n) != sig), key=lambda n: current[n]
            )
            self._seen.update({name: current[name] for name in fresh})
            if not fresh or self._cancelled:
                return
            for older in filter(None, [self._pending, *fresh[:-1]]):
                self.not_uploaded[older] = f"{_SUPERSEDED} {fresh[-1]}"
            self._pending = fresh[-1]
            self.not_uploaded.pop(self._pending, None)
            self._cond.notify_all()

    # ------------------------------------------------------------------------------ uploading
    def _work(self) -> None:
        while True:
            with self._cond:
                if self._pending is None and not (self._closing or self._cancelled):
                    self._cond.wait(self.poll_interval)
                if self._cancelled or (self._closing and self._pending is None):
                    return
                name, self._pending = self._pending, None
                self._current = name
            if name is None:
                self._scan()
                continue
            try:
                self._upload_with_retries(name)
            finally:
                with self._cond:
                    self._current = None

    def _upload_with_retries(self, name: str) -> None:
        for attempt in range(self.max_retries + 1):
            started = time.monotonic()
            outcome = self._attempt(name)
            if outcome.status == "uploaded":
                rank_zero_info(
                    f"HubUpload: {name} uploaded to {self.repo_id} in {time.monotonic() - started:.1f} s "
                    f"({outcome.message})"
                )
                self.uploaded.append(name)
                self.not_uploaded.pop(name, None)
                return
            if outcome.status == "failed":
                self._give_up(name, outcome.message)
                return
            with self._cond:
                if self._pending is not None:
                    self.not_uploaded[name] = f"{_SUPERSEDED} {self._pending}"
                    return
                if outcome.status == "stopped" or self._cancelled:
                    self.not_uploaded.setdefault(name, "still uploading when the run ended")
                    return
            if attempt == self.max_retries:
                self._give_up(name, outcome.message)
                return
            delay = min(self.backoff * 2**attempt, self.max_backoff)
            log.warning(
                "HubUpload: upload of %s to %s failed (%s); retry %d/%d in %.3g s.",
                name,
                self.repo_id,
                outcome.message,
                attempt + 1,
                self.max_retries,
                delay,
            )
            self.not_uploaded[name] = outcome.message
            if not self._sleep_before_retry(name, delay):
                return

    def _give_up(self, name: str, reason: str) -> None:
        self.not_uploaded[name] = reason
        log.warning("HubUpload: %s was not uploaded to %s: %s", name, self.repo_id, reason)

    def _sleep_before_retry(self, name: str, delay: float) -> bool:
        """Wait ``delay`` s; False (and why, in ``not_uploaded``) when a newer export or the end comes first."""
        retry_at = time.monotonic() + delay
        with self._cond:
            while True:
                if self._pending is not None:
                    self.not_uploaded[name] = f"{_SUPERSEDED} {self._pending}"
                    return False
                if self._cancelled or (self._deadline is not None and retry_at > self._deadline):
                    return False  # the last failure is the reason
                now = time.monotonic()
                if now >= retry_at:
                    return True
                self._cond.wait(retry_at - now)

    def _attempt(self, name: str) -> PushOutcome:
        """One push of export ``name`` from a snapshot of it, in a child process."""
        folder = self._root / name
        try:
            check_adapter_files(folder)  # here too, so that a refusal names the export, not its snapshot
        except NestedUserError as error:
            return PushOutcome("failed", " ".join(str(error).split()))
        try:
            staging = stage_export(folder, dir=self._root)
        except OSError as error:  # the export was being replaced: a retry sees the new one
            return PushOutcome("retry", f"could not snapshot {folder}: {error}")
        try:
            step = name.partition("=")[2]
            request = self._request(staging, f"nested: adapter export ({f'step {step}' if step else name})")
            with self._cond:
                if self._cancelled:
                    return PushOutcome("stopped")
                process = self._process = PushProcess(request)
            return process.wait(self.attempt_timeout)
        finally:
            with self._cond:
                self._process = None
            shutil.rmtree(staging, ignore_errors=True)

    def _request(self, folder: Path, commit_message: str | None = None) -> PushRequest:
        configs = [d / "config.yaml" for d in self._config_dirs if (d / "config.yaml").is_file()]
        return PushRequest(
            adapter_dir=str(folder.resolve()),
            repo_id=self.repo_id,
            private=self.private,
            revision=self.revision,
            license=self.license,
            training_config=str(configs[0].resolve()) if configs else None,
            commit_message=commit_message,
        )

"""One push in a child process, so that a training process can stop it at any moment.

A Python thread stuck in an HTTP request cannot be stopped (huggingface_hub sets no timeout, and its
upload threads keep an exiting interpreter waiting); a child process can be killed. :class:`PushProcess`
runs :func:`~nested.hub.push.push_adapter` with the arguments of a :class:`PushRequest` in
``python -m nested.hub.background``, which is ``nested push`` with an exit status that says whether a
retry may help.

The child ignores SIGINT, SIGTERM and SIGUSR1: a job scheduler or a terminal signals the whole process
group, and it is the training process that decides how much of its grace period an upload gets. The
child ends when its parent does (it watches its parent's pid), so an upload never outlives the run.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["EXIT_RETRY", "PushOutcome", "PushProcess", "PushRequest"]

# sysexits' EX_TEMPFAIL: the Hub could not be reached or answered "try later"; a retry may succeed.
EXIT_RETRY = 75
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class PushRequest:
    """The arguments of one ``nested push``."""

    adapter_dir: str
    repo_id: str
    private: bool = False
    revision: str | None = None
    license: str = "other"
    base_model: str | None = None
    training_config: str | None = None
    commit_message: str | None = None

    def command(self) -> str:
        """The ``nested push`` command line that does the same push (shell-quoted)."""
        words = ["nested", "push", self.adapter_dir, self.repo_id]
        words += ["--private"] if self.private else []
        words += ["--revision", self.revision] if self.revision else []
        words += ["--license", self.license] if self.license != "other" else []
        words += ["--base-model", self.base_model] if self.base_model else []
        words += ["--training-config", self.training_config] if self.training_config else []
        return shlex.join(words)


@dataclass(frozen=True)
class PushOutcome:
    """How an attempt ended: ``uploaded``, ``retry`` (a retry may help), ``failed`` or ``stopped`` (killed).
    ``crashed`` marks a failure that is a bug in the push (its message is the traceback), not a user error."""

    status: str
    message: str = ""
    crashed: bool = False


class PushProcess:
    """A :class:`PushRequest` running in a child process."""

    def __init__(self, request: PushRequest):
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 (closed in wait)
        env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1")
        # The child imports the same nested as this process, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self._killed = False
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nested.hub.background", json.dumps(asdict(request))],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def kill(self) -> None:
        """Stop the push now (SIGKILL: the child ignores the polite signals)."""
        self._killed = True
        if self.process.poll() is None:
            self.process.kill()

    def wait(self, timeout: float | None, timeout_name: str = "attempt_timeout") -> PushOutcome:
        """Wait for the child at most ``timeout`` s (then kill it: a retry may help). ``timeout_name`` is the
        setting the message names, so that the user knows what to raise. Interrupted (KeyboardInterrupt or
        a signal handler that raises), the child is killed before the exception goes on."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait()
            return PushOutcome("retry", f"no result within {timeout:.0f} s ({timeout_name}); stopped")
        except BaseException:
            self.kill()
            self.process.wait()
            raise
        finally:
            self._output.seek(0)
            lines = self._output.read().decode("utf-8", "replace").strip().splitlines()
            self._output.close()
        last = lines[-1] if lines else ""
        if code == 0:
            return PushOutcome("uploaded", last)
        if self._killed:
            return PushOutcome("stopped", "stopped before it finished")
        if code == EXIT_RETRY:
            return PushOutcome("retry", last)
        if code == 2:
            return PushOutcome("failed", last)
        # A bug in the child: its whole traceback (chained ones included) is the message.
        start = next(
            (i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call")), None
        )
        shown = lines[start:] if start is not None else lines[-20:]
        return PushOutcome("failed", f"the push process exited {code}:\n" + "\n".join(shown), crashed=True)


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(EXIT_RETRY)


def main(argv: list[str]) -> int:
    """The child: push, print the commit URL (0), or one line with the reason (2, or EXIT_RETRY)."""
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()

    # Imported only now: torch takes seconds to import, and a stop signal in that time must not kill the push.
    from nested.errors import NestedUserError
    from nested.hub.push import is_permanent_error, push_adapter
    from nested.hub_access import redact

    request = PushRequest(**json.loads(argv[0]))
    try:
        info = push_adapter(
            request.adapter_dir,
            request.repo_id,
            private=request.private,
            revision=request.revision,
            commit_message=request.commit_message,
            license=request.license,
            base_model=request.base_model,
            training_config=request.training_config,
        )
    except NestedUserError as error:
        print(redact(" ".join(str(error).split())), flush=True)
        return 2 if is_permanent_error(error) else EXIT_RETRY
    print(getattr(info, "commit_url", "") or "uploaded", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""scripts/slurm/fit.sbatch on a real SLURM cluster: USR1 -> checkpoint + requeue -> exact resume.

`sudo bash scripts/ci/slurm.sh` starts a single-node cluster on localhost (.ci/run does); where no
cluster answers the test is skipped, with the reason. The job is 2 tasks on CPU training the tiny
model; `scancel --signal=USR1` delivers SIGUSR1 to the job's steps as `#SBATCH --signal=USR1@90`
does. An uninterrupted run of the same config (the 2 tasks started directly, as in
tests/test_slurm.py) runs beside it as the reference.

What the test leaves to the implementation: how the interrupted step exits, and where (if anywhere)
it exports its partial adapter. It asserts the hpc checkpoint, the requeue, the steps each run
trained, the COMPLETED job, and its `adapters/last` against the reference, bit for bit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_slurm import PACER, STEPS, _adapter, _config, _kill, _launch, _wait

from nested.training.resume import checkpoint_step

REPO = Path(__file__).resolve().parents[1]
FIT_SBATCH = REPO / "scripts" / "slurm" / "fit.sbatch"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    if shutil.which("sbatch") is None:
        pytest.skip(
            "no SLURM here (no sbatch on PATH); `sudo bash scripts/ci/slurm.sh` starts a local cluster"
        )
    try:
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.skip(
            "no SLURM cluster answers (sinfo timed out after 15 s); `sudo bash scripts/ci/slurm.sh` starts one"
        )
    if sinfo.returncode != 0:
        reason = sinfo.stderr.strip().splitlines()[-1:] or [f"exit {sinfo.returncode}"]
        pytest.skip(
            f"no SLURM cluster answers (sinfo: {reason[0]}); `sudo bash scripts/ci/slurm.sh` starts one"
        )


def _run(*command: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}"
    return result.stdout


def _job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict: JobState, Reason, Restarts, ExitCode, ..."""
    fields = _run("scontrol", "show", "job", "--oneliner", job_id).split()
    return dict(field.split("=", 1) for field in fields if "=" in field)


def _wait_for(what: str, done: Callable[[dict[str, str]], bool], job_id: str, log: Path, timeout: float):
    deadline = time.monotonic() + timeout
    while not done(job := _job(job_id)):
        if time.monotonic() > deadline or job["JobState"] in ENDED:
            output = log.read_text()[-4000:] if log.exists() else "(no job output yet)"
            raise AssertionError(
                f"waiting for {what}: job {job_id} is {job['JobState']} ({job['Reason']}, "
                f"restarts {job['Restarts']}, exit {job['ExitCode']})\n{output}"
            )
        time.sleep(0.5)
    return job


def _job_environment(tmp_path: Path) -> dict[str, str]:
    """The job runs this venv's `nested` on this checkout's source (sbatch exports the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    paths = [str(tmp_path), str(REPO / "src"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def test_fit_sbatch_checkpoints_requeues_and_resumes_exactly_on_a_real_cluster(
    slurm_cluster, tiny_sd_path, tmp_path
):
    (tmp_path / "pacer.py").write_text(PACER)
    (tmp_path / "logs").mkdir()  # the template's --output=logs/%x-%j.out
    job_root, full_root = tmp_path / "runs" / "train", tmp_path / "runs" / "full"
    full = _launch(tmp_path, _config(tmp_path, tiny_sd_path, "full"), full_root, "1111", "full")
    job_id = None
    try:
        # accelerator: gpu, as in configs/faces-*.yaml: on a CPU-only allocation the template picks cpu.
        config = _config(tmp_path, tiny_sd_path, "job", pace=1.0, accelerator="gpu")  # pace: >= 6 s to stop
        submit = ["sbatch", "--parsable", "--job-name=train", f"--chdir={tmp_path}", "--time=30"]
        submit += [
            "--gpus-per-node=0",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            str(FIT_SBATCH),
            str(config),
        ]
        job_id = _run(*submit, env=_job_environment(tmp_path)).strip().split(";")[0]
        log = tmp_path / "logs" / f"train-{job_id}.out"
        marker = tmp_path / "job.step"

        def trained_two_steps(job: dict[str, str]) -> bool:
            return job["JobState"] == "RUNNING" and marker.exists() and int(marker.read_text() or 0) >= 2

        _wait_for("2 training steps", trained_two_steps, job_id, log, timeout=300)
        _run("scancel", "--signal=USR1", job_id)  # the steps, not the batch shell: as --signal=USR1@90

        # `nested fit` requeues after its checkpoint is written: the checkpoint and the step are final.
        def requeued(job: dict[str, str]) -> bool:
            return job["Restarts"] == "1" and job["JobState"] in ("PENDING", "RUNNING")  # not REQUEUED yet

        job = _wait_for("the requeue", requeued, job_id, log, timeout=180)
        stopped_at = int(marker.read_text())
        assert 2 <= stopped_at < STEPS, stopped_at
        checkpoints = sorted(job_root.glob("hpc_ckpt_*.ckpt"))
        assert [p.name for p in checkpoints] == ["hpc_ckpt_1.ckpt"], checkpoints
        assert checkpoint_step(checkpoints[0]) == stopped_at

        # SLURM holds a requeued job back for 2 minutes (its BeginTime): let it start now.
        if job["JobState"] == "PENDING":
            _run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        job = _wait_for("the requeued job to end", lambda job: job["JobState"] in ENDED, job_id, log, 300)
        output = log.read_text()
        assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), output
        _wait(full, 300, tmp_path, "full")
    finally:
        if job_id is not None:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
        _kill(full)

    assert re.search(r"resuming from \S*/hpc_ckpt_1\.ckpt", output), output
    assert "the training stream resumes exactly" in output, output
    history = (tmp_path / "job.step.history").read_text().split("\n")[:-1]
    first_run = [f"0 {step}" for step in range(1, stopped_at + 1)]
    assert history == first_run + [f"1 {step}" for step in range(stopped_at + 1, STEPS + 1)], output
    resumed, reference = _adapter(job_root), _adapter(full_root)
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs from the uninterrupted run"

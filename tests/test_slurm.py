"""A simulated 2-task SLURM job: SIGUSR1 -> checkpoint + `scontrol requeue`, relaunch -> exact resume.

Two `nested fit` processes get the SLURM_* variables srun would set (one node, two tasks, gloo on
127.0.0.1), and a fake `scontrol` first on PATH records its calls. The command line is what
scripts/slurm/fit.sbatch runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from stacks import dump_stacks, enable_stack_dumps

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
PACER = '''
import os
import time
from pathlib import Path

import lightning as L


class Pacer(L.Callback):
    """Slows each step down (sleeping, not computing) and writes the step reached to ``marker``;
    appends "<SLURM restart count> <step>" to ``<marker>.history`` (which run reached which step)."""

    def __init__(self, marker: str, sleep: float = 0.3) -> None:
        self.marker, self.sleep = Path(marker), sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.sleep)
        if trainer.is_global_zero:
            self.marker.write_text(str(trainer.global_step))
            with open(f"{self.marker}.history", "a") as history:
                history.write(f"{os.environ.get('SLURM_RESTART_COUNT', '0')} {trainer.global_step}\\n")
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(tmp_path: Path, model: Path, name: str, pace: float = 0.3, accelerator: str = "cpu") -> Path:
    """The tiny model on the demo faces, 2 DDP tasks, paced by ``pace`` seconds a step."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            seed_everything: 0
            trainer:
              accelerator: {accelerator}
              strategy: ddp
              max_steps: {STEPS}
              logger: false
              enable_progress_bar: false
              enable_model_summary: false
              num_sanity_val_steps: 0
              callbacks:
                - class_path: nested.callbacks.AdapterEMA
                  init_args: {{decay: 0.9}}
                - class_path: pacer.Pacer
                  init_args: {{marker: {tmp_path / name}.step, sleep: {pace}}}
            model:
              base_model: {model}
              encoder: {{backbone: {model / "image_encoder"}, num_tokens: 4, width: 32, depth: 1, heads: 2}}
              subjects: {{"<person>": person}}
            optimizer:
              class_path: torch.optim.AdamW
              init_args: {{lr: 1.0e-3}}
            data:
              domains:
                - {{name: faces, urls: {REPO / "data/demo/faces/shards.json"}, subject: "<person>"}}
              resolution: 64
              reference_size: 32
              batch_size: 2
              num_workers: 1
              epoch_samples: 16
              shuffle_buffer: 8
              open_shards: 2
            """
        )
    )
    return config


def _launch(tmp_path: Path, config: Path, root: Path, job_id: str, log_name: str) -> list[subprocess.Popen]:
    """Start the 2 tasks of `srun nested fit ...` (each in its own session, like a job step)."""
    nested = Path(sys.executable).with_name("nested")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "LOCAL_RANK", "RANK"))
    }
    env.update(
        PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}",
        PYTHONPATH=f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}",
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_JOB_ID=job_id,
        SLURM_JOB_NAME="train",
        SLURM_NODELIST="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS="1",
    )
    enable_stack_dumps(tmp_path)  # on PYTHONPATH: a hung task's stacks go to its log
    processes = []
    for rank in range(2):
        log = open(tmp_path / f"{log_name}-{rank}.log", "w")  # noqa: SIM115 (closed with the process)
        command = [str(nested), "fit", "--config", str(config)]
        command += ["--trainer.num_nodes=1", "--trainer.devices=2", f"--trainer.default_root_dir={root}"]
        processes.append(
            subprocess.Popen(
                command,
                env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=tmp_path,
            )
        )
        log.close()
    return processes


def _wait(
    processes: list[subprocess.Popen],
    timeout: float,
    tmp_path: Path,
    log_name: str,
    codes: tuple[int, ...] = (0, 0),
) -> None:
    """Wait for the tasks; each must exit with its code in ``codes`` (rank order)."""
    deadline = time.monotonic() + timeout
    for process, expected in zip(processes, codes, strict=True):
        try:
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        if code != expected:
            if code is None:
                dump_stacks([p.pid for p in processes])
            logs = "\n".join((tmp_path / f"{log_name}-{r}.log").read_text()[-12000:] for r in range(2))
            raise AssertionError(f"{log_name}: a task ended with {code} (None: timed out)\n{logs}")


def _kill(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _adapter(root: Path) -> dict[str, torch.Tensor]:
    files = sorted((root / "adapters" / "last").glob("*.safetensors"))
    assert files, f"no exported adapter under {root}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def test_sigusr1_checkpoints_requeues_once_and_the_relaunch_resumes_exactly(tiny_sd_path, tmp_path):
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"
    # As SLURM does, the requeue ends the job's process at once with SIGTERM: here, the one that asked.
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\nkill -TERM $PPID\n')
    scontrol.chmod(0o755)
    (tmp_path / "pacer.py").write_text(PACER)
    running: list[subprocess.Popen] = []
    try:
        # The reference job and the job to preempt run side by side (the result does not depend on timing).
        full_root, job_root = tmp_path / "runs" / "full", tmp_path / "runs" / "train"
        full = _launch(tmp_path, _config(tmp_path, tiny_sd_path, "full"), full_root, "1111", "full")
        job_config = _config(tmp_path, tiny_sd_path, "job")
        job = _launch(tmp_path, job_config, job_root, "4242", "job")
        running = full + job
        marker, deadline = tmp_path / "job.step", time.monotonic() + 150
        while not (marker.exists() and marker.read_text() and int(marker.read_text()) >= 2):
            assert time.monotonic() < deadline and all(p.poll() is None for p in job), "the job did not start"
            time.sleep(0.1)
        for process in job:  # SLURM signals every process of the step, DataLoader workers included
            os.killpg(process.pid, signal.SIGUSR1)
        # Stopped early: rank 0 says "run again" (75), its requeue's SIGTERM coming after all of its work.
        _wait(job, 120, tmp_path, "job", codes=(75, 0))
        stopped_at = int(marker.read_text())
        assert 2 <= stopped_at < STEPS, stopped_at
        assert [p.name for p in job_root.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]
        assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 4242"]

        # The requeued job runs the same command; it finds hpc_ckpt_1.ckpt by itself.
        job = _launch(tmp_path, job_config, job_root, "4242", "requeued")
        running = full + job
        _wait(job, 150, tmp_path, "requeued")
        _wait(full, 150, tmp_path, "full")
    finally:
        _kill(running)
    log = (tmp_path / "requeued-0.log").read_text()
    assert "resuming from" in log and "hpc_ckpt_1.ckpt" in log
    assert "the training stream resumes exactly" in log
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 4242"]  # once, by rank 0
    assert int(marker.read_text()) == STEPS
    resumed, reference = _adapter(job_root), _adapter(full_root)
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs from the uninterrupted run"

"""``import nested`` keeps the libraries' import-time notices out of every command, and ``nested fit`` the notices
Lightning prints in every run; only those."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

# What every command imports (diffusers' pipelines, torchao through transformers and diffusers, torchao's
# 8-bit optimizer, whose step compiles), then a filtered notice, logged here whatever is installed, and one
# message of each filtered logger and warning kind that is not a filtered one.
SCRIPT = """
import logging, warnings, torch
{front_door}
import transformers.quantizers.auto
from diffusers import FluxPipeline, StableDiffusionXLPipeline
{torchao}
fallback = ' requires torchvision (not installed); falling back to the PIL backend'
logging.getLogger('transformers.utils.import_utils').warning('`CLIPImageProcessor`' + fallback)
logging.getLogger('transformers.utils.import_utils').warning('`MyImageProcessor`' + fallback)
logging.getLogger('torchao').warning('Failed to load a kernel the user asked for')
warnings.warn('MyTensor does not implement _stable_hash_for_caching')
"""
TORCHAO = """
import diffusers.quantizers.torchao.torchao_quantizer, torchao, torchao.optim
weight = torch.nn.Parameter(torch.randn(64, 64))
weight.grad = torch.randn(64, 64)
torchao.optim.AdamW8bit([weight]).step()
"""
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
# transformers 5 split each image processor into backends; 4.x has one, and no fallback to announce.
HAS_PIL_BACKENDS = hasattr(importlib.import_module("transformers"), "CLIPImageProcessorPil")


def stderr_lines(front_door: str) -> list[str]:
    script = SCRIPT.format(front_door=front_door, torchao=TORCHAO if HAS_TORCHAO else "")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    # A CUDA build of torch on a machine without a GPU (a cluster's login node) adds torch's own true notice
    # when the optimizer's step compiles; it is not one of the messages under test.
    return [line for line in done.stderr.strip().splitlines() if "No CUDA runtime is found" not in line]


def test_importing_the_libraries_through_nested_prints_only_messages_of_other_kinds():
    lines = stderr_lines("import nested")
    assert lines[0].endswith(
        "`MyImageProcessor` requires torchvision (not installed); falling back to the PIL backend"
    )
    assert lines[1] == "Failed to load a kernel the user asked for"
    assert "UserWarning: MyTensor does not implement _stable_hash_for_caching" in lines[2]
    assert len(lines) == 3, lines


@pytest.mark.skipif(
    HAS_TORCHVISION or not HAS_PIL_BACKENDS,
    reason="transformers prints its PIL fallback notice only from version 5 and without torchvision",
)
def test_without_nested_the_libraries_print_the_image_processor_fallback():
    """The filter's subject is real: the same imports without ``import nested`` print the notice."""
    lines = stderr_lines("")
    assert any("requires torchvision (not installed); falling back to" in line for line in lines), lines


# A Lightning fit of a tiny regression over an IterableDataset with a length, read by one loader worker; its
# argument says whether to install the filters `nested fit` installs first.
FIT = """
import sys
import lightning as L, torch
from torch.utils.data import DataLoader, IterableDataset
if sys.argv[1] == "quiet":
    from nested.library_messages import quiet_training_notices
    quiet_training_notices()

class Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.ones(8, 2))
    def __len__(self):
        return 8

class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def train_dataloader(self):
        return DataLoader(Stream(), batch_size=4, num_workers=1)

L.Trainer(accelerator="cpu", max_steps=2, default_root_dir=sys.argv[2], enable_progress_bar=False).fit(Regression())
"""
TRAINING_NOTICES = ("try installing [litlogger]", "Your `IterableDataset` has `__len__` defined", "LeafSpec")


SRUN_HINT = "The `srun` command is available on your system but is not used"


def _fit_output(mode: str, root, tmp_path, **slurm_variables: str) -> str:
    """The run's output on a machine with an ``srun`` (a stand-in on PATH: Lightning only looks it up)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    env.update(slurm_variables, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    done = subprocess.run(
        [sys.executable, "-c", FIT, mode, str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_nested_fit_drops_lightnings_run_notices_and_only_those(tmp_path):
    loud = _fit_output("loud", tmp_path / "loud", tmp_path)
    quiet = _fit_output("quiet", tmp_path / "quiet", tmp_path)
    assert TRAINING_NOTICES[0] in loud and TRAINING_NOTICES[1] in loud  # the filters' subject is real
    assert SRUN_HINT in loud
    assert not [notice for notice in (*TRAINING_NOTICES, SRUN_HINT) if notice in quiet], quiet
    for output in (loud, quiet):  # Lightning's other messages pass
        assert "`Trainer.fit` stopped: `max_steps=2` reached." in output


def test_inside_a_slurm_job_the_hint_to_launch_through_srun_stays(tmp_path):
    """In a job's allocation without srun's task variables, a multi-process run would wait for its ranks."""
    quiet = _fit_output("quiet", tmp_path / "quiet", tmp_path, SLURM_JOB_ID="4242")
    assert SRUN_HINT in quiet
    assert not [notice for notice in TRAINING_NOTICES if notice in quiet], quiet

"""Logging and warning filters for the messages that the libraries print on import and that say nothing about
this project's use of them. :func:`quiet_library_messages` installs them, once, from ``import nested``; it
imports nothing but the standard library, and every other message of the same loggers passes.

The messages dropped:

- torchao's, which transformers and diffusers import whenever it is installed: on a CPU build of torch its
  CUDA kernels cannot load (nothing here needs them there); torch deprecates how torchao registers its enums
  (a deprecation meant for library authors, whichever library registers an enum); diffusers cannot import the
  tensor classes of older torchao checkpoints (this project loads none: it quantizes as it loads); and torch
  asks torchao's 8-bit optimizer states for a hash method when the optimizer's step compiles
  (``optimizer: torchao.optim.AdamW8bit``).
- transformers' notice that ``CLIPImageProcessor`` or ``SiglipImageProcessor`` falls back to its PIL backend
  without torchvision, printed when diffusers' pipelines import them (other processors' notices pass). The
  PIL backend is the one this project means: it installs no torchvision (PyPI's build does not match the CPU
  torch wheel), and its encoders preprocess subject images themselves.

:func:`quiet_training_notices`, which ``nested fit`` and ``nested validate`` install, drops the notices Lightning
prints in every run of them: its tip to install a cloud logger; its warning that an ``IterableDataset`` with a
length may count wrongly with several loader workers (this project's streams split by rank and worker and
their length is exact: exact resume depends on it); torch's deprecation of ``LeafSpec``, which Lightning's
own code still uses; and, outside a SLURM job, its hint to launch through ``srun``, which it prints on any
machine that has ``srun`` (a cluster's login node, a workstation with SLURM's client). Inside a job the hint
stays: there a multi-process run started without ``srun`` would wait for ranks that never come.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

__all__ = ["quiet_library_messages", "quiet_training_notices"]


def quiet_library_messages() -> None:
    """Install the filters the module docstring lists."""
    warnings.filterwarnings(
        "ignore", message=r"OptimState(8bit|4bit|Fp8) does not implement _stable_hash_for_caching"
    )
    logging.getLogger("torchao").addFilter(_not_a_cuda_kernel_on_a_cpu_build)
    logging.getLogger("torch.utils._pytree").addFilter(_without("register_constant() on Enum subclasses"))
    logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(
        _without("Unable to import `torchao` Tensor objects")
    )
    logging.getLogger("transformers.utils.import_utils").addFilter(_not_a_pipeline_processor_fallback)


def quiet_training_notices() -> None:
    """Install the filters of the Lightning runs' notices the module docstring lists."""
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_the_cloud_logger_tip)
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings(
            "ignore", message=r"The `srun` command is available on your system but is not used"
        )


def _not_the_cloud_logger_tip(record: logging.LogRecord) -> bool:
    return "try installing [litlogger]" not in record.getMessage()


def _not_a_cuda_kernel_on_a_cpu_build(record: logging.LogRecord) -> bool:
    torch = sys.modules.get("torch")
    cpu_build = torch is not None and getattr(torch.version, "cuda", None) is None
    message = record.getMessage()
    return not (cpu_build and message.startswith("Failed to load ") and ".so" in message)


def _not_a_pipeline_processor_fallback(record: logging.LogRecord) -> bool:
    return not re.match(
        r"`(CLIP|Siglip)ImageProcessor` requires torchvision \(not installed\); falling back to",
        record.getMessage(),
    )


def _without(text: str):
    """A logging filter that drops the records whose message contains ``text``."""

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    return keep

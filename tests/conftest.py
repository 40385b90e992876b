"""Shared pytest fixtures: tiny random diffusers checkpoints written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from nested.testing import write_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x-like diffusers folder (with image_encoder/). Treat as read-only: copy it to modify."""
    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", "sd")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL-like diffusers folder (with image_encoder/). Treat as read-only: copy it to modify."""
    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3.5-like diffusers folder (two CLIPs + T5, with image_encoder/). Treat as read-only."""
    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", "sd3")


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1-dev-like diffusers folder (CLIP + T5, guidance, with image_encoder/). Treat as read-only."""
    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux", "flux")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run faster on one thread (thread start-up dominates), far faster on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

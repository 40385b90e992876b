"""Shared pytest fixtures: tiny random diffusers checkpoints written once per test session."""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path

import pytest

from nested.testing import write_tiny_pipeline


def _installed(*names: str) -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in names)
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``faces`` skip, with the reason, where the faces extra is not installed."""
    if _installed("dlib", "face_recognition_models"):
        return
    skip = pytest.mark.skip(reason="dlib and its models are not installed: pip install 'nested[faces]'")
    for item in items:
        if "faces" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def tiny_adapter(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained <person> adapter for the tiny SD pipeline, saved like a trained one."""
    import torch

    from nested.adapter import NestedAdapter
    from nested.backbone import DiffusionBackbone
    from nested.encoder import EncoderSpec

    backbone = DiffusionBackbone.from_pretrained(tiny_sd_path)
    spec = EncoderSpec(backbone=str(tiny_sd_path / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2)
    torch.manual_seed(0)
    adapter = NestedAdapter.for_unet(
        backbone.unet, token="<person>", class_word="person", encoder=spec, base_model=str(tiny_sd_path)
    )
    adapter.add_tokens(backbone.tokenizers, backbone.text_encoders)
    return adapter.save_pretrained(tmp_path_factory.mktemp("adapters") / "person")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run faster on one thread (thread start-up dominates), far faster on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def default_sigint():
    """SIGINT raises KeyboardInterrupt during the test, also where pytest started with SIGINT ignored (a job
    started in the background by a script: Python then leaves it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


DEMO_FACES = Path(__file__).resolve().parents[1] / "data" / "demo" / "faces"


@pytest.fixture
def demo_faces_data():
    """``make(samples, shuffle_buffer=samples, validation=False)``: a 32 px data module over the committed demo
    faces shards (batches of 2, no loader workers), with their validation shards when asked."""
    from nested.data.datamodule import NestedDataModule
    from nested.data.domains import DomainSpec

    def make(samples: int, shuffle_buffer: int | None = None, validation: bool = False) -> NestedDataModule:
        val = (
            [DomainSpec("faces", str(DEMO_FACES / "val" / "shards.json"), "<person>")] if validation else None
        )
        return NestedDataModule(
            [DomainSpec("faces", str(DEMO_FACES / "shards.json"), "<person>")],
            resolution=32,
            reference_size=32,
            batch_size=2,
            num_workers=0,
            epoch_samples=samples,
            shuffle_buffer=samples if shuffle_buffer is None else shuffle_buffer,
            val_domains=val,
        )

    return make


@pytest.fixture
def backward_ops():
    """``record(loss) -> [(op, numel), ...]``: every aten op that ``loss.backward()`` runs, with the element
    count of each tensor it returns. A slice's backward shows as ``aten.slice_backward`` with its input's size:
    it builds a zero tensor of the whole sliced tensor for one slice's gradient."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor):
                    self.ops.append((str(func), tensor.numel()))
            return out

    def record(loss) -> list[tuple[str, int]]:
        with Recorder() as recorder:
            loss.backward()
        return recorder.ops

    return record


@pytest.fixture
def whole_size_builders():
    """``find(ops, whole) -> [op, ...]``: the ops of a ``backward_ops`` record that build or fill a tensor of
    at least ``whole`` elements (zeros, fills, slice backwards, index ops): how reading a tensor in parts by
    slicing or gathering shows, where one split's backward shows only a concatenation."""

    def find(ops: list[tuple[str, int]], whole: int) -> list[str]:
        words = ("zeros", "aten.fill_", "slice_backward", "index")
        return [op for op, numel in ops if numel >= whole and any(word in op for word in words)]

    return find

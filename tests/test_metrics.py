"""Identity similarity and prompt alignment: values, preprocessing, boxes, CLIPScore on transformers 5, DDP sync."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nested.evaluation.metrics import (
    IdentitySimilarity,
    PromptAlignment,
    crop_boxes,
    load_clip,
    vision_embedder,
)
from nested.testing import write_tiny_clip, write_tiny_vision_model


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth, distinct images in [0, 1]: (count, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("kind", ["clip", "dinov2"])
def test_identity_is_one_for_identical_images_and_lower_for_unrelated_ones(kind, tmp_path):
    embedder = vision_embedder(write_tiny_vision_model(tmp_path / kind, kind))
    metric = IdentitySimilarity(embedder)
    images = _images(3)
    metric.update(images, images)
    torch.testing.assert_close(metric.per_sample(), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(metric.compute(), torch.tensor(1.0), atol=1e-5, rtol=0)

    unrelated = IdentitySimilarity(embedder).score_batch(images, _images(3, seed=1))
    assert (unrelated < 1 - 1e-3).all()
    shared_reference = metric.score_batch(images, images[:1])  # one reference for the whole batch
    assert abs(shared_reference[0].item() - 1) < 1e-5 and (shared_reference[1:] < 1 - 1e-3).all()


@pytest.mark.parametrize("kind", ["clip", "dinov2"])
def test_vision_embedder_preprocesses_like_the_image_processor(kind, tmp_path):
    from transformers import AutoImageProcessor

    path = write_tiny_vision_model(tmp_path / kind, kind)
    embedder = vision_embedder(path)
    processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    image = (_images(1)[0] * 255).round().to(torch.uint8)
    expected = processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(embedder.preprocess(image[None]), expected, atol=1e-5, rtol=0)


def test_boxes_crop_the_subject_before_embedding(tmp_path):
    metric = IdentitySimilarity(vision_embedder(write_tiny_vision_model(tmp_path / "clip")), crop_size=32)
    reference = _images(1)
    canvas = torch.zeros(1, 3, 64, 64)
    canvas[..., 8:40, 16:48] = reference  # the subject at (x0, y0, x1, y1) = (16, 8, 48, 40)
    torch.testing.assert_close(crop_boxes(canvas, [(16, 8, 48, 40)], 32), reference)
    boxed = metric.score_batch(canvas, reference, boxes=[(16, 8, 48, 40)])
    whole = metric.score_batch(canvas, reference)
    assert abs(boxed.item() - 1) < 1e-5 and whole.item() < 1 - 1e-3
    with pytest.raises(ValueError, match="empty"):
        metric.score_batch(canvas, reference, boxes=[(30, 8, 20, 40)])


def test_identity_metric_holds_no_embedder_weights_in_its_state_dict(tmp_path):
    metric = IdentitySimilarity(vision_embedder(write_tiny_vision_model(tmp_path / "clip")))
    assert list(metric.state_dict()) == []
    assert list(metric.parameters()) == []


def test_prompt_alignment_runs_a_local_clip_under_transformers_5(tiny_clip_path):
    metric = PromptAlignment(str(tiny_clip_path))
    images = _images(3, size=40)
    prompts = ["a photo of a dog", "a cat on the beach", "an oil painting of a person"]
    metric.update(images[:2], prompts[:2])
    metric.update(images[2:], prompts[2:])
    values = metric.per_sample()
    assert values.shape == (3,) and torch.isfinite(values).all()
    torch.testing.assert_close(metric.compute(), values.mean().clamp(min=0))

    # The same numbers straight from transformers: 100 * cos(image features, text features).
    model, processor = load_clip(tiny_clip_path)
    uint8 = [(image * 255).round().to(torch.uint8) for image in images]
    inputs = processor(text=prompts, images=uint8, return_tensors="pt", padding=True)
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=inputs["pixel_values"])
        text_features = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    expected = 100 * F.cosine_similarity(image_features, text_features, dim=-1)
    torch.testing.assert_close(values, expected, atol=1e-4, rtol=0)


def test_prompt_alignment_reads_a_long_prompt_as_clip_truncates_it(tiny_clip_path):
    """Past the text tower's 77 positions a prompt is cut before its end token, which CLIP pools at."""
    metric = PromptAlignment(str(tiny_clip_path))
    model, processor = load_clip(tiny_clip_path)
    long_prompt = "a photo of a dog " + "in a sunny green park " * 30
    ids = processor.tokenizer(long_prompt)["input_ids"]
    assert len(ids) > 77
    kept = processor.tokenizer.decode(ids[1:76])  # the 75 pieces a 77-token window keeps
    assert len(processor.tokenizer(kept)["input_ids"]) == 77
    images = _images(2, size=40)
    long_scores = metric.score_batch(images, [long_prompt, "a cat"])
    kept_scores = metric.score_batch(images, [kept, "a cat"])
    torch.testing.assert_close(long_scores, kept_scores, atol=1e-4, rtol=0)


def test_load_clip_explains_a_missing_model(tmp_path):
    with pytest.raises(OSError, match="could not load the CLIP model"):
        load_clip(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------- DDP

PROMPTS = ["a photo of a dog", "a red car", "a cat on a sofa", "a snowy forest", "a person at the beach"]
RANK_SLICES = (slice(0, 3), slice(3, 5))  # uneven on purpose


def _projection_embedder(images: torch.Tensor) -> torch.Tensor:
    """A deterministic embedder, identical in every process: pooled pixels through a fixed projection."""
    weight = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    return F.adaptive_avg_pool2d(images, 4).flatten(1) @ weight


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    return _images(5, size=32, seed=2), _images(5, size=32, seed=3)


def _measure(generated, reference, prompts, clip_path) -> dict[str, torch.Tensor]:
    identity = IdentitySimilarity(_projection_embedder)
    identity.update(generated, reference)
    alignment = PromptAlignment(str(clip_path))
    alignment.update(generated, prompts)
    return {
        "identity": identity.compute(),
        "identity_values": identity.per_sample(),
        "alignment": alignment.compute(),
        "alignment_values": alignment.per_sample(),
    }


def _ddp_worker(rank: int, port: int, clip_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        generated, reference = _data()
        part = RANK_SLICES[rank]
        result = _measure(generated[part], reference[part], PROMPTS[part], clip_path)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_sync_equals_one_process_on_the_union(tiny_clip_path, tmp_path):
    import torch.multiprocessing as mp

    # fork: the workers inherit the imported modules (spawn would re-import torch, torchmetrics and
    # transformers in each, ~10 s on 2 busy cores); each worker uses one thread, as DataLoader workers do.
    mp.start_processes(
        _ddp_worker,
        args=(_free_port(), str(tiny_clip_path), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    generated, reference = _data()
    union = _measure(generated, reference, PROMPTS, tiny_clip_path)
    for rank in range(2):
        synced = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in union.items():
            tolerance = 1e-4 if key.startswith("alignment") else 1e-5  # CLIP scores are 100 x cos
            torch.testing.assert_close(
                synced[key], value, atol=tolerance, rtol=0, msg=lambda m, r=rank, k=key: f"rank {r}, {k}: {m}"
            )

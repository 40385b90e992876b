"""Tests of nested.data.shards: validation, rejection reasons, the index, sharding, latents, CLI."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from nested.cli.shards import main_shards
from nested.data.shards import build_shards


def _save_image(path: Path, width: int, height: int, seed: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _read_samples(folder: Path) -> list[dict]:
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode("pil")))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """5 good images with captions, a corrupt jpg, a tiny image and one without a caption."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        path = src / ("sub" if i == 4 else "") / f"good.{i}.jpg"  # a dot in the stem, and a subfolder
        _save_image(path, 96, 80, seed=i)
        path.with_suffix(".txt").write_text(f"a photo of <person> number {i}\n")
    (src / "corrupt.jpg").write_bytes(np.random.default_rng(9).bytes(2000))
    (src / "corrupt.txt").write_text("a photo of <person>")
    _save_image(src / "tiny.png", 40, 100)
    (src / "tiny.txt").write_text("a photo of <person>")
    _save_image(src / "nocap.png", 100, 100)
    return src


def test_good_images_are_written_bad_ones_rejected_with_reasons(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = build_shards(image_folder, out, domain="faces", subject="<person>", maxcount=2, progress=False)

    rejected = {Path(r["path"]).name: r["reason"] for r in map(json.loads, (out / "rejected.jsonl").open())}
    assert set(rejected) == {"corrupt.jpg", "tiny.png", "nocap.png"}
    assert rejected["corrupt.jpg"].startswith("unreadable image")
    assert rejected["tiny.png"].startswith("too small")
    assert rejected["nocap.png"] == "missing caption"

    index = json.loads((out / "shards.json").read_text())
    assert (index["domain"], index["subject"]) == ("faces", "<person>")
    assert index["total_samples"] == report.total_samples == 5
    assert index["rejected"] == report.rejected == 3
    assert [s["samples"] for s in index["shards"]] == [2, 2, 1]  # maxcount splits shards
    for shard in index["shards"]:
        path = out / shard["url"]
        assert shard["bytes"] == path.stat().st_size
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        with tarfile.open(path) as tar:
            assert len(tar.getmembers()) == 2 * shard["samples"]  # jpg + json, no pax headers
    assert sorted(p.name for p in out.iterdir()) == [
        "faces-000000.tar",
        "faces-000001.tar",
        "faces-000002.tar",
        "rejected.jsonl",
        "shards.json",
    ]

    samples = _read_samples(out)
    assert len(samples) == 5
    assert all("." not in s["__key__"] for s in samples)  # dots would split a sample
    captions = sorted(s["json"]["caption"] for s in samples)
    assert captions == [f"a photo of <person> number {i}" for i in range(5)]
    first = next(s for s in samples if s["json"]["source"] == "good.0.jpg")
    assert first["json"]["original_size"] == [80, 96]
    source = Image.open(image_folder / "good.0.jpg").convert("RGB")
    assert np.array_equal(np.asarray(first["jpg"]), np.asarray(source))  # stored bytes untouched


def test_decompression_bomb_guards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _save_image(src / "big.png", 120, 100)
    (src / "big.txt").write_text("x")
    report = build_shards(src, tmp_path / "a", domain="d", subject="x", max_pixels=100 * 100, progress=False)
    reason = json.loads((tmp_path / "a" / "rejected.jsonl").read_text())["reason"]
    assert report.total_samples == 0 and reason.startswith("too many pixels")

    # PIL's own guard (a warning between MAX_IMAGE_PIXELS and twice that) is a rejection too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    report = build_shards(src, tmp_path / "b", domain="d", subject="x", progress=False)
    reason = json.loads((tmp_path / "b" / "rejected.jsonl").read_text())["reason"]
    assert report.total_samples == 0 and reason.startswith("decompression bomb")
    assert json.loads((tmp_path / "b" / "shards.json").read_text())["shards"] == []


def test_manifests_with_ref_bbox_and_resize(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _save_image(src / "wide.png", 200, 100)
    _save_image(src / "face.png", 70, 70, seed=1)
    rows = [
        {"image": "wide.png", "caption": "<cat> outside", "ref": "face.png", "bbox": [20, 10, 120, 90]},
        {"image": "wide.png", "caption": "<cat>", "bbox": [300, 0, 400, 50]},  # outside the image
        {"image": "missing.png", "caption": "<cat>"},
    ]
    manifest = src / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    report = build_shards(
        manifest, tmp_path / "out", domain="pets", subject="<cat>", image_size=64, progress=False
    )
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "rejected.jsonl").open()]
    assert report.total_samples == 1 and len(reasons) == 3
    assert reasons[0].startswith("invalid bbox") and reasons[1].startswith("file not found")
    assert "not a JSON object" in reasons[2]
    (sample,) = _read_samples(tmp_path / "out")
    assert sample["jpg"].size == (128, 64)  # short side downscaled to image_size
    assert sample["json"]["original_size"] == [100, 200]
    assert sample["json"]["bbox"] == [12.8, 6.4, 76.8, 57.6]  # scaled with the image
    assert np.array_equal(
        np.asarray(sample["ref.png"]), np.asarray(Image.open(src / "face.png").convert("RGB"))
    )

    csv_manifest = src / "m.csv"
    csv_manifest.write_text('image,caption,bbox\nwide.png,"a <cat>, outside","20,10,120,90"\n')
    build_shards(csv_manifest, tmp_path / "csv", domain="pets", subject="<cat>", progress=False)
    (sample,) = _read_samples(tmp_path / "csv")
    assert sample["json"]["caption"] == "a <cat>, outside" and sample["json"]["bbox"] == [20, 10, 120, 90]
    assert "png" in sample  # png source bytes stored as png


def test_existing_output_needs_overwrite_and_leaves_no_stale_shards(
    image_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    build_shards(image_folder, out, domain="faces", subject="p", maxcount=1, progress=False)
    assert len(list(out.glob("*.tar"))) == 5
    with pytest.raises(FileExistsError, match="overwrite"):
        build_shards(image_folder, out, domain="faces", subject="p", progress=False)
    build_shards(image_folder, out, domain="faces", subject="p", maxcount=10, overwrite=True, progress=False)
    assert [p.name for p in out.glob("*.tar")] == ["faces-000000.tar"]
    assert json.loads((out / "shards.json").read_text())["total_samples"] == 5


def test_cached_latents_match_the_vae_and_reach_the_batch(image_folder: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    from nested.data import DomainSpec, build_stream, collate_batch, target_transform

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=32,
    ).eval()
    out = tmp_path / "out"
    build_shards(
        image_folder,
        out,
        domain="faces",
        subject="<person>",
        cache_latents=True,
        vae=vae,
        resolution=32,
        progress=False,
    )
    spec = DomainSpec("faces", str(out / "shards.json"), "<person>")
    samples = list(build_stream([spec], train=False, resolution=32, reference_size=16))
    batch = collate_batch(samples)
    assert batch["latents"].shape == (5, 4, 16, 16) and batch["latents"].dtype == torch.float32
    first = samples[0]
    source = Image.open(image_folder / "good.0.jpg").convert("RGB")
    assert first["key"].endswith("good_0")
    pixels = target_transform(source, resolution=32).pixel_values[None]
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean[0] * vae.config.scaling_factor
    torch.testing.assert_close(first["latents"], expected, atol=2e-3, rtol=2e-3)
    # Latents of a center crop are wrong for random crops / flips / other sizes: not attached.
    stream = build_stream(
        [spec], train=True, resolution=32, reference_size=16, epoch_samples=3, center_crop=False
    )
    assert "latents" not in collate_batch(list(stream))


def test_cli(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main_shards(["--help"])
    assert exit_info.value.code == 0
    assert "--domain" in capsys.readouterr().out
    args = [
        str(image_folder),
        str(tmp_path / "out"),
        "--domain",
        "faces",
        "--subject",
        "<person>",
        "--no-progress",
    ]
    assert main_shards(args) == 0
    assert "wrote 5 samples" in capsys.readouterr().out
    assert main_shards(args) == 2  # existing shards, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_shards([*args, "--cache-latents"])  # without --model
    assert "--model" in capsys.readouterr().err


def test_interrupted_run_leaves_no_index_and_no_partial_shard(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nested.data.shards

    out = tmp_path / "out"
    build_shards(image_folder, out, domain="faces", subject="p", progress=False)
    real = nested.data.shards.make_sample
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # corrupt, good.0, good.1 (shard 0 done), good.2 (shard 1 open), then stop
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(nested.data.shards, "make_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_shards(
            image_folder, out, domain="faces", subject="p", maxcount=2, overwrite=True, progress=False
        )
    assert not (out / "shards.json").exists()  # the old index went first; no new one was written
    assert sorted(p.name for p in out.glob("faces-*")) == ["faces-000000.tar"]  # finished shards only


def test_a_bug_while_writing_shards_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the user's mistakes become one line: a ValueError from inside the writer is raised."""
    import nested.data.shards

    def broken(*args, **kwargs):
        raise ValueError("index out of range in the encoder")

    monkeypatch.setattr(nested.data.shards, "make_sample", broken)
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (96, 96), "red").save(src / "a.jpg")
    (src / "a.txt").write_text("a photo of <person>")
    with pytest.raises(ValueError, match="index out of range"):
        main_shards(
            [str(src), str(tmp_path / "out"), "--domain", "faces", "--subject", "<person>", "--no-progress"]
        )

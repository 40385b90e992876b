"""Tests of nested.data.shards: validation, rejection reasons, the index, sharding, latents, CLI."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import nested
import nested.data.shards as shards
from nested.cli.shards import main_shards
from nested.data.shards import _rejection_summary, build_shards
from nested.data.worker_pool import WorkerDied
from nested.errors import DataError
from nested.image_files import ImageFileError, open_image


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
    _save_image(src / "small.png", 96, 80)
    (src / "small.txt").write_text("x")
    report = build_shards(src, tmp_path / "a", domain="d", subject="x", max_pixels=100 * 100, progress=False)
    reason = json.loads((tmp_path / "a" / "rejected.jsonl").read_text())["reason"]
    assert report.total_samples == 1 and reason.startswith("too many pixels")

    # PIL's own guard (a warning between MAX_IMAGE_PIXELS and twice that) is a rejection too, where no limit
    # is given; a limit given replaces it, also above twice PIL's (where Image.open itself would refuse).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert open_image(src / "small.png").rgb.size == (96, 80)  # 7680 pixels: under PIL's limit
    with pytest.raises(ImageFileError, match="decompression bomb: 120x100 is more than PIL's"):
        open_image(src / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    assert open_image(src / "big.png", max_pixels=12_000).rgb.size == (120, 100)  # 2.4 x PIL's limit
    assert Image.MAX_IMAGE_PIXELS == 5_000  # PIL's limit is back
    with pytest.raises(ImageFileError, match="too many pixels: 120x100 > 11999"):
        open_image(src / "big.png", max_pixels=11_999)


def test_manifests_with_ref_bbox_and_resize(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _save_image(src / "wide.png", 200, 100)
    _save_image(src / "face.png", 70, 70, seed=1)
    rows = [
        {"image": "wide.png", "caption": "<cat> outside", "ref": "face.png", "bbox": [20, 10, 120, 90]},
        {"image": "wide.png", "caption": "<cat>", "bbox": [300, 0, 400, 50]},  # outside the image
        {"image": "missing.png", "caption": "<cat>"},
        {"image": "face.png", "caption": 123},  # one bad row is rejected, not the whole build
        {"image": "sub", "caption": "<cat>"},  # a folder
    ]
    (src / "sub").mkdir()
    manifest = src / "m.jsonl"
    manifest.write_text(
        "\n".join(json.dumps(r) for r in rows) + '\nnot json\n{"img": "face.png", "caption": "x"}\n[1]\n'
    )
    report = build_shards(
        manifest, tmp_path / "out", domain="pets", subject="<cat>", image_size=64, progress=False
    )
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "rejected.jsonl").open()]
    assert report.total_samples == 1 and len(reasons) == 7
    assert reasons[0].startswith("invalid bbox") and reasons[1].startswith("file not found")
    assert reasons[2] == "manifest caption is not text: 123"
    assert reasons[3] == f"a folder, not an image file: {src / 'sub'}"
    assert reasons[4] == "manifest line is not JSON: Expecting value (column 1)"
    assert (
        reasons[5]
        == 'manifest row has no image: expected an "image" path and a "caption" (its fields: caption, img)'
    )
    assert reasons[6] == 'manifest row is not a JSON object: expected {"image": PATH, "caption": TEXT}'
    assert _rejection_summary(reasons[2:3] + reasons[4:]) == (
        "1 manifest caption is not text, 1 manifest line is not JSON, 1 manifest row has no image, "
        "1 manifest row is not a JSON object"
    )
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

    from nested.backbone import latent_space
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
    # Each sample records the VAE's latent space, which training checks against its own.
    assert batch["latents_space"] == [latent_space(vae)] * 5
    assert latent_space(vae) == {
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": 0.0,
        "latent_channels": 4,
        "downsampling": 2,
    }
    # Latents of a center crop are wrong for random crops / flips / other sizes: not attached.
    stream = build_stream(
        [spec], train=True, resolution=32, reference_size=16, epoch_samples=3, center_crop=False
    )
    assert "latents" not in collate_batch(list(stream))


def test_cli(
    image_folder: Path, tmp_path: Path, tiny_sd_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
    for subject in ("", " <person>"):  # what training would refuse, refused before any image is prepared
        subject_at = args.index("--subject") + 1
        assert main_shards([*args[:subject_at], subject, *args[subject_at + 1 :]]) == 2
        assert f"subject {subject!r} must be a non-empty token" in capsys.readouterr().err
    args[1] = str(tmp_path / "latents")
    assert main_shards([*args, "--cache-latents", "--model", str(tiny_sd_path), "--device", "cuda:99"]) == 2
    assert "--device cuda:99: this machine has " in capsys.readouterr().err
    assert not (tmp_path / "latents").exists()


def _contents(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` (hidden ones included) -> its bytes (b"<dir>" for a folder)."""
    return {p.name: b"<dir>" if p.is_dir() else p.read_bytes() for p in sorted(folder.iterdir())}


def test_interrupted_overwrite_keeps_the_previous_dataset(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nested.data.shards

    out = tmp_path / "out"
    build_shards(image_folder, out, domain="faces", subject="p", progress=False)
    before = _contents(out)
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
    assert _contents(out) == before  # the old index, shards and rejected.jsonl; no staging left


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
    with pytest.raises(ValueError, match="index out of range"):  # in this process, where the patch is
        main_shards(
            [str(src), str(tmp_path / "out"), "--domain", "faces", "--subject", "<person>", "--no-progress"]
            + ["--workers", "0"]
        )


# ----------------------------------------------------------------------------- nothing lost


def _nested_shards(*args: str) -> subprocess.Popen:
    """``nested shards ARGS`` as a real process, running the ``nested`` this test imports."""
    source = str(Path(nested.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-c", "import sys; from nested.cli.main import main; sys.exit(main())"]
    command += ["shards", *args, "--no-progress"]
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    """A job started in the background by a non-interactive shell inherits SIGINT ignored, and Python then
    keeps it ignored: the child gets the default, so Python turns Ctrl-C into KeyboardInterrupt there."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_overwrite_keeps_the_previous_dataset(
    image_folder: Path, tmp_path: Path, signum: int
) -> None:
    out = tmp_path / "out"
    build_shards(image_folder, out, domain="faces", subject="<person>", maxcount=2, progress=False)
    (out / "notes.txt").write_text("the user's own file")
    before = _contents(out)
    src = tmp_path / "many"
    src.mkdir()
    _save_image(src / "0000.bmp", 192, 192)  # BMP: re-encoded, a few ms per sample
    (src / "0000.txt").write_text("a photo of <person>")
    for i in range(1, 200):
        shutil.copy(src / "0000.bmp", src / f"{i:04d}.bmp")
        shutil.copy(src / "0000.txt", src / f"{i:04d}.txt")
    args = [
        str(src),
        str(out),
        "--domain",
        "faces",
        "--subject",
        "<person>",
        "--maxcount",
        "1",
        "--overwrite",
    ]

    process = _nested_shards(*args)
    deadline = time.monotonic() + 120
    while not list(out.rglob("faces-000004.tar")):  # mid-build: the old dataset has 3 shards, the new 200
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)

    assert process.returncode == 128 + signum, err
    assert f"interrupted ({signal.Signals(signum).name})" in err and "Traceback" not in err
    assert _contents(out) == before  # old index, shards, rejected.jsonl, the user's file; no staging left
    assert len(_read_samples(out)) == 5

    assert main_shards([*args, "--no-progress"]) == 0  # the re-run completes
    assert json.loads((out / "shards.json").read_text())["total_samples"] == 200
    assert len(list(out.glob("faces-*.tar"))) == 200
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_signal_during_the_swap_takes_effect_after_it(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_sigint: None
) -> None:
    out = tmp_path / "out"
    build_shards(image_folder, out, domain="faces", subject="p", maxcount=1, progress=False)
    replace, swapped = os.replace, []

    def replace_then_interrupt(source: Path, target: Path) -> None:
        replace(source, target)
        if Path(target).parent == out:  # a new file moved in
            swapped.append(target)
            if len(swapped) == 1:
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_shards(
            image_folder, out, domain="faces", subject="p", maxcount=2, overwrite=True, progress=False
        )
    assert len(swapped) == 5  # 3 shards, rejected.jsonl, shards.json: all moved in before the interrupt
    assert sorted(p.name for p in out.iterdir()) == [
        "faces-000000.tar",
        "faces-000001.tar",
        "faces-000002.tar",
        "rejected.jsonl",
        "shards.json",
    ]
    assert json.loads((out / "shards.json").read_text())["total_samples"] == len(_read_samples(out)) == 5


def test_overwrite_replaces_only_what_the_previous_build_wrote(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_shards(image_folder, out, domain="face", subject="p", maxcount=2, progress=False)
    (out / "notes.txt").write_text("mine")
    _save_image(out / "cover.png", 8, 8)
    (out / "faces-val-000000.tar").write_bytes(b"another dataset's shard")
    build_shards(image_folder, out, domain="faces", subject="p", overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "cover.png",
        "faces-000000.tar",
        "faces-val-000000.tar",
        "notes.txt",
        "rejected.jsonl",
        "shards.json",
    ]  # the old index's face-00000N.tar are gone with it; the user's files stay


def test_shards_and_index_follow_the_umask(image_folder: Path, tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        build_shards(image_folder, tmp_path / "out", domain="faces", subject="p", maxcount=2, progress=False)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {
        "faces-000000.tar": 0o640,
        "faces-000001.tar": 0o640,
        "faces-000002.tar": 0o640,
        "rejected.jsonl": 0o640,
        "shards.json": 0o640,
    }
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750


# ----------------------------------------------------------------------------- nothing silent


def _fails(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``nested shards ARGS``, check it exits 2 with one line, and return that line."""
    assert main_shards([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nested shards: error: ") and "\n" not in err
    return err


def test_zero_usable_samples_exit_2_with_the_reasons_and_write_nothing(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_captions = tmp_path / "no-captions"
    no_captions.mkdir()
    for i in range(3):
        _save_image(no_captions / f"{i}.png", 96, 96, seed=i)
    (no_captions / "broken.jpg").write_bytes(b"not a jpeg")
    (no_captions / "broken.txt").write_text("a photo of <person>")
    out = tmp_path / "out"
    options = ["--domain", "faces", "--subject", "<person>"]

    err = _fails([str(no_captions), str(out), *options], capsys)
    assert "all 4 items were rejected (3 missing caption, 1 unreadable image;" in err
    assert not out.exists()  # no folder, no index

    (tmp_path / "empty").mkdir()
    assert "holds no images" in _fails([str(tmp_path / "empty"), str(out), *options], capsys)
    assert not out.exists()

    build_shards(image_folder, out, domain="faces", subject="<person>", progress=False)
    before = _contents(out)
    err = _fails([str(no_captions), str(out), *options, "--overwrite"], capsys)
    assert "3 missing caption" in err and f"Nothing in {out} was changed" in err
    assert _contents(out) == before  # the good dataset is not replaced by an empty one


def test_a_caption_or_manifest_line_that_is_not_utf8_is_one_rejected_item(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("latin1", "utf8", "bom"):
        _save_image(src / f"{name}.png", 96, 96)
    (src / "latin1.txt").write_bytes("un caf\u00e9 avec <person>".encode("latin-1"))
    (src / "utf8.txt").write_text("un caf\u00e9 avec <person>", encoding="utf-8")
    (src / "bom.txt").write_text("\ufeffa photo of <person>", encoding="utf-8")
    report = build_shards(src, tmp_path / "out", domain="faces", subject="<person>", progress=False)
    assert report.total_samples == 2
    (rejected,) = map(json.loads, (tmp_path / "out" / "rejected.jsonl").open())
    assert rejected["path"] == str(src / "latin1.png")
    assert rejected["reason"].startswith("caption not UTF-8: byte 0xe9 at offset 6")
    assert str(src / "latin1.txt") in rejected["reason"]
    captions = sorted(s["json"]["caption"] for s in _read_samples(tmp_path / "out"))
    assert captions == ["a photo of <person>", "un caf\u00e9 avec <person>"]  # the BOM is not part of it

    jsonl = src / "m.jsonl"
    lines = [json.dumps({"image": "utf8.png", "caption": f"<person> {i}"}).encode() for i in range(2)]
    jsonl.write_bytes(
        b"\n".join([lines[0], '{"image": "bom.png", "caption": "caf\u00e9"}'.encode("latin-1"), lines[1]])
    )
    csv_manifest = src / "m.csv"
    csv_manifest.write_bytes(
        "image,caption\nutf8.png,<person>\nbom.png,caf\u00e9 <person>\n".encode("cp1252")
    )
    for manifest, samples, line in [(jsonl, 2, 2), (csv_manifest, 1, 3)]:
        out = tmp_path / manifest.suffix[1:]
        report = build_shards(manifest, out, domain="faces", subject="<person>", progress=False)
        assert report.total_samples == samples
        (rejected,) = map(json.loads, (out / "rejected.jsonl").open())
        assert rejected["path"] == f"{manifest}:{line}"
        assert rejected["reason"].startswith("manifest line not UTF-8: byte 0xe9")


def test_a_folder_is_read_through_linked_folders_and_other_image_types_are_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos, src = tmp_path / "photos", tmp_path / "src"
    (photos / "alice").mkdir(parents=True)
    (src / "bob").mkdir(parents=True)
    for index, path in enumerate(
        [photos / "alice" / "1.jpg", photos / "alice" / "2.jfif", src / "bob" / "1.png"]
    ):
        _save_image(path, 96, 80, seed=index)
        path.with_suffix(".txt").write_text("a photo of <person>")
    Image.new("RGB", (96, 80)).save(src / "bob" / "2.ico")
    (src / "bob" / "2.txt").write_text("a photo of <person>")
    (src / "bob" / "notes.json").write_text("{}")  # not an image: not read
    (src / "alice").symlink_to(photos / "alice", target_is_directory=True)
    (src / "bob" / "loop").symlink_to(src, target_is_directory=True)  # a link back up: read once
    (src / "a-link-to-bob").symlink_to(src / "bob", target_is_directory=True)  # bob is read as bob/
    report = build_shards(src, tmp_path / "out", domain="faces", subject="<person>", progress=False)
    sources = sorted(sample["json"]["source"] for sample in _read_samples(tmp_path / "out"))
    assert sources == ["alice/1.jpg", "alice/2.jfif", "bob/1.png"] and report.rejected == 1
    (rejected,) = map(json.loads, (tmp_path / "out" / "rejected.jsonl").open())
    assert rejected["path"] == str(src / "bob" / "2.ico")
    assert rejected["reason"].startswith("a .ico image, not one of .jpg, .jpeg")

    # Identity folders come from a folder's layout: a manifest's rows name theirs in a column.
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "src/bob/1.png", "caption": "<person>"}) + "\n")
    args = [
        str(manifest),
        str(tmp_path / "m"),
        "--domain",
        "faces",
        "--subject",
        "<person>",
        "--identity-folders",
    ]
    assert main_shards(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("nested shards: error: identity folders (--identity-folders) read who each photo")
    assert f"but {manifest} is a manifest: give a folder of identity folders, or a manifest with an" in error
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- image modes


def _composite_over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return rgb.astype(np.float64) * a + 255 * (1 - a)


def test_every_image_mode_becomes_the_right_8bit_rgb(tmp_path: Path) -> None:
    """Each source is stored so that the training reader decodes the pixels it stands for."""
    from skimage import data

    from nested.data.loading import decoder

    rng = np.random.default_rng(0)
    rgb = data.astronaut()[:128, 160:288]
    gray = data.camera()[100:228, 200:328]
    deep = (
        (gray.astype(np.int64) * 257 + rng.integers(-128, 128, gray.shape)).clip(0, 65535).astype(np.uint16)
    )  # 16-bit
    unit = (gray / 255 + rng.uniform(-1e-3, 1e-3, gray.shape)).clip(0, 1).astype(np.float32)  # floats in 0..1
    ramp = np.tile(np.linspace(0, 255, 128).astype(np.uint8), (128, 1))  # alpha: transparent at the left
    palette = Image.fromarray(rgb).quantize(32)
    hole = palette.getpixel((0, 0))  # the palette entry made transparent
    palette_rgb = np.asarray(palette.convert("RGB")).copy()
    palette_rgb[np.asarray(palette) == hole] = 255
    key = (0, 255, 0)  # the colour an RGB png's tRNS chunk makes transparent: a block of it
    keyed = rgb.copy()
    keyed[:32, :32] = key
    keyed_rgb = np.where((keyed == key).all(-1, keepdims=True), 255, keyed)
    deep_keyed = deep.copy()  # a 16-bit gray png's tRNS value (1): a block of it
    deep_keyed[:32, :32] = 1

    def gray_rgb(values: np.ndarray) -> np.ndarray:
        return np.repeat(np.asarray(values, dtype=np.float64)[..., None], 3, -1)

    def over_white(pixels: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        a = alpha[..., None] / 255
        return pixels * a + 255 * (1 - a)

    cases = {  # source file -> (image saved there, the RGB pixels it stands for)
        "i16.png": (Image.fromarray(deep), gray_rgb(deep / 257)),
        "i16-tiff.tif": (Image.fromarray(deep), gray_rgb(deep / 257)),
        "i32.tif": (Image.fromarray(deep.astype(np.int32)), gray_rgb(deep / 257)),
        "f.tif": (Image.fromarray(unit), gray_rgb(unit * 255.0)),
        "la.png": (Image.fromarray(np.stack([gray, ramp], -1), "LA"), over_white(gray_rgb(gray), ramp)),
        "rgba.png": (Image.fromarray(np.dstack([rgb, ramp])), over_white(rgb, ramp)),
        "rgba-webp.webp": (Image.fromarray(np.dstack([rgb, ramp])), over_white(rgb, ramp)),
        "p.png": (palette, palette_rgb),
        "rgb-trns.png": (Image.fromarray(keyed), keyed_rgb),
        "i16-trns.png": (
            Image.fromarray(deep_keyed),
            gray_rgb(np.where(deep_keyed == 1, 255, deep_keyed / 257)),
        ),
        "p.gif": (palette, np.asarray(palette.convert("RGB"))),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), rgb),
        "cmyk-tiff.tif": (Image.fromarray(rgb).convert("CMYK"), rgb),
        "ycbcr.tif": (Image.fromarray(rgb).convert("YCbCr"), rgb),
        "lab.tif": (Image.fromarray(rgb).convert("LAB"), rgb),
        "one.png": (Image.fromarray(gray > 128), gray_rgb(np.where(gray > 128, 255, 0))),
        "l.png": (Image.fromarray(gray), gray_rgb(gray)),
        "opaque.png": (Image.fromarray(np.dstack([rgb, np.full_like(ramp, 255)])), rgb),
    }
    src = tmp_path / "src"
    src.mkdir()
    for name, (image, _) in cases.items():
        options = {
            "p.png": {"transparency": hole},
            "rgb-trns.png": {"transparency": key},
            "i16-trns.png": {"transparency": 1},
        }.get(name, {})
        image.save(src / name, **options, **({"lossless": True} if name.endswith(".webp") else {}))
    Image.fromarray(deep.astype(np.int32) * 4).save(src / "beyond16.tif")  # 32-bit values: no 8-bit meaning
    Image.fromarray(unit * 2).save(src / "hdr.tif")  # floats beyond 1
    for path in src.iterdir():
        path.with_suffix(".txt").write_text("a photo of <person>")
    opened = {
        name: Image.open(src / name).mode for name in ("i16.png", "i32.tif", "f.tif", "la.png", "p.png")
    }
    assert opened == {"i16.png": "I;16", "i32.tif": "I", "f.tif": "F", "la.png": "LA", "p.png": "P"}

    build_shards(src, tmp_path / "out", domain="faces", subject="<person>", progress=False)
    rejected = {
        Path(r["path"]).name: r["reason"]
        for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").open())
    }
    assert set(rejected) == {"beyond16.tif", "hdr.tif"}
    assert "outside the 16-bit range" in rejected["beyond16.tif"] and "outside 0..1" in rejected["hdr.tif"]

    urls = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))
    decode = decoder()  # what training reads
    samples = {
        s["json"]["source"]: s
        for s in map(decode, wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    }
    assert set(samples) == set(cases)
    for name, (_, expected) in cases.items():
        image = next(samples[name][k] for k in ("jpg", "png", "webp") if k in samples[name])
        error = np.abs(np.asarray(image, dtype=np.float64) - expected)
        # JPEG (quality 95) re-encoding costs a few levels; a wrong conversion costs tens to hundreds.
        assert image.mode == "RGB" and error.mean() < 4 and np.percentile(error, 99) < 20, (
            name,
            error.mean(),
        )
    for name in ("l.png", "one.png", "opaque.png"):  # the reader's conversion is already right: stored as is
        assert "png" in samples[name] and "jpg" not in samples[name], name
    assert all("jpg" in samples[name] for name in ("i16.png", "la.png", "p.png", "rgb-trns.png", "p.gif"))


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
def test_a_worker_killed_mid_build_ends_the_build_instead_of_a_wait_forever(
    tmp_path: Path, signum: int
) -> None:
    """The kernel's out-of-memory killer ends a worker with SIGKILL: one line that names the image it held. A
    worker that crashed otherwise (a library's bug) keeps the traceback."""
    psutil = pytest.importorskip("psutil")
    src, out = tmp_path / "many", tmp_path / "out"
    src.mkdir()
    _save_image(src / "0000.bmp", 1024, 1024)  # tens of ms a photo: a kill lands in a job most of the time
    (src / "0000.txt").write_text("a photo of <person>")
    for i in range(1, 300):
        os.link(src / "0000.bmp", src / f"{i:04d}.bmp")
        os.link(src / "0000.txt", src / f"{i:04d}.txt")
    process = _nested_shards(
        str(src), str(out), "--domain", "faces", "--subject", "<person>", "--workers", "2"
    )
    # The pool's workers are the fork server's children. One killed between two jobs, or before it began the
    # job in its pipe, is replaced and the build goes on: they are killed until one dies in a job.
    deadline = time.monotonic() + 120
    while process.poll() is None:
        assert time.monotonic() < deadline
        with contextlib.suppress(psutil.NoSuchProcess):
            for worker in psutil.Process(process.pid).children(recursive=True):
                if worker.ppid() != process.pid:
                    worker.send_signal(signum)
        time.sleep(0.2)
    _, err = process.communicate(timeout=120)
    if signum == signal.SIGSEGV:
        assert process.returncode == 1 and "Traceback" in err, err
        assert "Fatal Python error: Segmentation fault" in err  # the worker's own stack, from faulthandler
        assert re.search(
            r"RuntimeError: a worker process ended \(killed by SIGSEGV\) while preparing .*\.bmp\n", err
        )
        return
    assert process.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"nested shards: error: a worker process ended \(killed by SIGKILL\) while preparing .*/\d{4}\.bmp\. If "
        r"the kernel ended it for lack of memory \(a very large image\), lower --workers or --max-pixels, then "
        r"run the command again\.",
        last,
    ), err
    assert not out.exists()  # this run made it; nothing was written, no staging left


def test_shards_of_nested_shards_read_again_keep_their_original_size(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    _save_image(src / "wide.png", 300, 200)
    (src / "wide.txt").write_text("a photo of <person>")
    first = tmp_path / "first"
    build_shards(src, first, domain="faces", subject="<person>", image_size=64, progress=False)
    tars = tmp_path / "tars"
    tars.mkdir()
    shutil.copy(next(first.glob("*.tar")), tars)
    again = tmp_path / "again"
    build_shards(tars, again, domain="faces", subject="<person>", progress=False)
    for folder in (first, again):
        (sample,) = _read_samples(folder)
        assert sample["json"]["original_size"] == [200, 300], folder.name  # not the stored 64 x 96
        assert sample["jpg"].size == (96, 64)


def test_worker_processes_write_the_same_shards_and_never_fork_the_caller(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork of a process that runs threads (torch's, a progress bar's, pytest's) can wait forever on a
    lock some thread held at the fork; the workers come from a fork server instead."""
    here = build_shards(
        image_folder, tmp_path / "here", domain="d", subject="<person>", maxcount=2, progress=False
    )

    def no_fork() -> int:
        raise AssertionError("the shard workers forked the calling process")

    monkeypatch.setattr(os, "fork", no_fork)
    pool = build_shards(
        image_folder, tmp_path / "pool", domain="d", subject="<person>", maxcount=2, progress=False, workers=2
    )
    assert (pool.total_samples, pool.rejected) == (here.total_samples, here.rejected) == (5, 3)
    for name in sorted(p.name for p in (tmp_path / "here").glob("*.tar")):
        with tarfile.open(tmp_path / "here" / name) as a, tarfile.open(tmp_path / "pool" / name) as b:
            assert [(m.name, a.extractfile(m).read()) for m in a.getmembers()] == [
                (m.name, b.extractfile(m).read()) for m in b.getmembers()
            ]


def _red_photos(folder: Path, names: list[str]) -> None:
    folder.mkdir()
    for name in names:
        Image.new("RGB", (96, 96), "red").save(folder / f"{name}.jpg")
        (folder / f"{name}.txt").write_text("a photo of <person>")


def test_a_dead_worker_is_named_by_the_photo_it_held_not_its_neighbour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The photo named is the one whose job the worker held, not a neighbour (the kill test's photos are links of
    one)."""

    class DiesAtTheThird:
        def __init__(self, *args: object) -> None:
            pass

        def __enter__(self) -> DiesAtTheThird:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def map(self, jobs, stops=()):
            yield "too small"
            yield "too small"
            raise WorkerDied(2, -signal.SIGKILL)

    monkeypatch.setattr(shards, "OrderedWorkerPool", DiesAtTheThird)
    _red_photos(tmp_path / "src", ["a", "b", "c", "d"])
    with pytest.raises(DataError, match=r"while preparing \S*/c\.jpg\. If the kernel"):
        shards.build_shards(
            tmp_path / "src", tmp_path / "out", domain="faces", subject="<person>", progress=False, workers=2
        )


def test_a_recorded_stop_ends_the_pool_build_between_two_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop ends the build before the next result, not once every photo is prepared."""

    @contextlib.contextmanager
    def already_stopped():
        yield [signal.SIGTERM]  # as if SIGTERM came; nothing is delivered on exit here

    monkeypatch.setattr(shards, "stop_signals_deferred", already_stopped)
    _red_photos(tmp_path / "src", [f"{i:02d}" for i in range(8)])
    with pytest.raises(KeyboardInterrupt, match="^stopped by SIGTERM$"):
        shards.build_shards(
            tmp_path / "src", tmp_path / "out", domain="faces", subject="<person>", progress=False, workers=2
        )
    assert not (tmp_path / "out").exists()

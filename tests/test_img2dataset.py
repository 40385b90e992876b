"""img2dataset's output trains as it is, and ``nested shards`` reads it as a SOURCE.

The shards are written here with webdataset's TarWriter in img2dataset's exact layout: ``00000.tar`` next
to ``00000.parquet`` and ``00000_stats.json``, no ``shards.json``; each sample ``{key}.jpg``, ``{key}.txt``
(the caption) and ``{key}.json`` with img2dataset's fields (``width``/``height`` after its resize,
``original_width``/``original_height`` before it). The parquet files are placeholders: nothing reads them.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from skimage import data

from nested.cli.shards import main_shards
from nested.data import DomainSpec, NestedDataModule, build_stream
from nested.data.shards import build_shards
from nested.encoder import EncoderSpec
from nested.training.module import NestedAttentionModule

# key -> (photo, the size img2dataset stored (w, h), the source's size before its resize (w, h), json caption)
PHOTOS = {
    "000000000": ("astronaut", (64, 64), (1024, 1024), "a photo of <person> in a space suit"),
    "000000001": ("chelsea", (96, 64), (1351, 900), None),  # no caption column: only the txt has it
    "000000002": ("coffee", (96, 64), (600, 400), "a photo of <person> with coffee"),
    "000010000": ("camera", (64, 64), (2048, 2048), "a photo of <person> with a camera"),
}


def _photo(name: str, size: tuple[int, int]) -> Image.Image:
    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    return image.resize(size, Image.Resampling.BICUBIC)


def write_img2dataset_output(folder: Path, photos: dict = PHOTOS) -> Path:
    """Two img2dataset shards (keys 0000xxxxx in 00000.tar, 0001xxxxx in 00001.tar), as img2dataset writes them."""
    folder.mkdir(parents=True)
    shards: dict[str, list[str]] = {}
    for key in photos:
        shards.setdefault(f"{int(key[:5]):05d}", []).append(key)
    for shard, keys in shards.items():
        with wds.TarWriter(str(folder / f"{shard}.tar"), encoder=False) as writer:
            for key in keys:
                name, (width, height), (original_width, original_height), caption = photos[key]
                buffer = io.BytesIO()
                _photo(name, (width, height)).save(buffer, format="JPEG", quality=95)
                meta = {
                    "caption": caption,
                    "url": f"https://example.com/{name}.jpg",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": width,
                    "height": height,
                    "original_width": original_width,
                    "original_height": original_height,
                    "exif": "{}",
                    "sha256": "0" * 64,
                }
                writer.write(
                    {
                        "__key__": key,
                        "jpg": buffer.getvalue(),
                        "txt": (caption or f"a photo of <person>, {name}").encode("utf-8"),
                        "json": json.dumps(meta).encode("utf-8"),
                    }
                )
        (folder / f"{shard}.parquet").write_bytes(b"PAR1")
        stats = {"count": len(keys), "successes": len(keys), "failed_to_download": 0}
        (folder / f"{shard}_stats.json").write_text(json.dumps(stats))
    return folder


class SizesSeen(L.Callback):
    """Each training batch's keys and the SDXL time ids its UNet step was given."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[str], list[str], torch.Tensor]] = []
        self.time_ids: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        backbone = pl_module.backbone
        compute = backbone.time_ids

        def recorded(*args, **kwargs):
            result = compute(*args, **kwargs)
            self.time_ids.append(result.detach().cpu())
            return result

        backbone.time_ids = recorded

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((list(batch["keys"]), list(batch["captions"]), batch["original_sizes"].cpu()))


def test_img2dataset_shards_train_as_they_are_with_the_original_sizes(tiny_sdxl_path, tmp_path):
    folder = write_img2dataset_output(tmp_path / "download")
    spec = EncoderSpec(
        backbone=str(tiny_sdxl_path / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2
    )
    module = NestedAttentionModule(
        str(tiny_sdxl_path),
        spec,
        subjects={"<person>": "person"},
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
    )
    datamodule = NestedDataModule(
        [DomainSpec("faces", str(folder / "{00000..00001}.tar"), "<person>")],
        resolution=64,
        reference_size=32,
        batch_size=2,
        num_workers=0,
        epoch_samples=8,
        shuffle_buffer=8,
    )
    seen = SizesSeen()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        default_root_dir=str(tmp_path / "run"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[seen],
    )
    trainer.fit(module, datamodule=datamodule)

    assert len(seen.batches) == len(seen.time_ids) == 3
    keys_seen = set()
    for (keys, captions, sizes), time_ids in zip(seen.batches, seen.time_ids, strict=True):
        for row, (key, caption, size) in enumerate(zip(keys, captions, sizes.tolist(), strict=True)):
            name, _, (original_width, original_height), json_caption = PHOTOS[key]
            # (h, w) of the photo before img2dataset resized it, not of the stored 64 px image.
            assert size == [original_height, original_width]
            assert time_ids[row, :2].tolist() == [original_height, original_width]
            assert caption == (json_caption or f"a photo of <person>, {name}")
            keys_seen.add(key)
    assert keys_seen and not (folder / "shards.json").exists()  # trained without conversion

    # Every sample, read once (the validation stream): the caption from json, or from txt without one.
    every = list(build_stream(datamodule.domains, train=False, resolution=64, reference_size=32))
    assert sorted(sample["key"] for sample in every) == sorted(PHOTOS)
    for sample in every:
        name, _, (original_width, original_height), json_caption = PHOTOS[sample["key"]]
        assert sample["original_size"] == (original_height, original_width)
        assert sample["caption"] == (json_caption or f"a photo of <person>, {name}")


def test_nested_shards_reads_an_img2dataset_folder_as_its_source(tmp_path, capsys):
    folder = write_img2dataset_output(tmp_path / "download")
    out = tmp_path / "shards"
    args = [
        str(folder),
        str(out),
        "--domain",
        "web",
        "--subject",
        "<person>",
        "--no-progress",
        "--workers",
        "2",
    ]
    assert main_shards(args) == 0
    index = json.loads((out / "shards.json").read_text())
    assert index["total_samples"] == len(PHOTOS) and index["rejected"] == 0
    metas = {}
    for shard in index["shards"]:
        with tarfile.open(out / shard["url"]) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    metas[meta["source"]] = meta
    assert set(metas) == {f"{key[:5]}/{key}.jpg" for key in PHOTOS}
    for key, (name, _, (original_width, original_height), caption) in PHOTOS.items():
        meta = metas[f"{key[:5]}/{key}.jpg"]
        assert meta["original_size"] == [original_height, original_width]
        assert meta["caption"] == (caption or f"a photo of <person>, {name}")

    # Images beside the tars: which to read is unclear, so nothing is read.
    _photo("rocket", (64, 64)).save(folder / "stray.jpg")
    capsys.readouterr()
    assert main_shards([*args[:1], str(tmp_path / "other"), *args[2:]]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"{folder} holds both .tar files and images" in error


def test_a_tar_cut_short_keeps_its_whole_samples_and_a_caption_not_utf8_is_rejected(tmp_path):
    folder = write_img2dataset_output(tmp_path / "download")
    with wds.TarWriter(str(folder / "00002.tar"), encoder=False) as writer:
        failed = {"status": "failed_to_download", "error_message": "HTTP Error 404"}  # img2dataset: json only
        writer.write({"__key__": "000020009", "json": json.dumps(failed).encode()})
        for index, name in enumerate(["rocket", "coffee", "chelsea", "camera"]):
            buffer = io.BytesIO()
            _photo(name, (64, 64)).save(buffer, format="JPEG")
            caption = "un caf\u00e9 <person>".encode("latin-1") if index == 0 else f"{name} <person>".encode()
            writer.write({"__key__": f"00002000{index}", "jpg": buffer.getvalue(), "txt": caption})
    whole = (folder / "00002.tar").read_bytes()
    with tarfile.open(folder / "00002.tar") as tar:
        third = [m for m in tar if m.name.startswith("000020002.")][0]
    (folder / "00002.tar").write_bytes(whole[: third.offset_data + 100])  # cut inside the third image
    report = build_shards(folder, tmp_path / "out", domain="web", subject="<person>", progress=False)
    assert report.total_samples == len(PHOTOS) + 1  # 000020001: the one whole, UTF-8 sample of 00002.tar
    rejected = {r["path"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").open())}
    tar = folder / "00002.tar"
    assert set(rejected) == {f"{tar}:000020009", f"{tar}:000020000", str(tar)}, rejected
    assert rejected[f"{tar}:000020009"] == "img2dataset status 'failed_to_download': HTTP Error 404"
    assert rejected[f"{tar}:000020000"].startswith("caption not UTF-8: byte 0xe9 at offset 6")
    assert rejected[str(tar)].startswith("unreadable tar (ReadError: ")
    assert rejected[str(tar)].endswith("the 3 whole samples before the damage are kept; download it again")

    # Cut where a header begins: tarfile itself ends there without a word; the missing end blocks tell.
    with tarfile.open(fileobj=io.BytesIO(whole)) as archive:
        header = [m for m in archive if m.name == "000020001.txt"][0].offset
    tar.write_bytes(whole[: header + 200])
    report = build_shards(folder, tmp_path / "out2", domain="web", subject="<person>", progress=False)
    assert report.total_samples == len(PHOTOS)  # 000020001 lost its caption: not whole
    rejected = {
        r["path"]: r["reason"] for r in map(json.loads, (tmp_path / "out2" / "rejected.jsonl").open())
    }
    assert rejected[str(tar)] == (
        f"unreadable tar (ReadError: no end-of-archive blocks after byte {header}: the file was cut short): "
        "the 2 whole samples before the damage are kept; download it again"
    )


def test_training_turns_an_image_upright_by_its_exif_orientation(tmp_path):
    """img2dataset can keep a camera's bytes (--skip_reencode): the EXIF tag says how to turn them."""
    from nested.data.loading import decoder

    upright = _photo("astronaut", (48, 64))  # 48 wide, 64 high
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as the camera wrote it: 64 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif)
    sample = decoder()({"__key__": "k", "jpg": buffer.getvalue(), "json": b"{}"})
    assert sample["jpg"].size == (48, 64)
    error = np.abs(np.asarray(sample["jpg"], dtype=np.float64) - np.asarray(upright, dtype=np.float64))
    assert error.mean() < 8  # JPEG's loss: 4.2; turned the other way: 92


def test_an_exif_turned_photos_original_size_is_the_upright_one(tmp_path):
    """img2dataset measures a photo's size with OpenCV, which ignores its EXIF orientation: a phone's portrait
    stored as landscape bytes and a tag is 768 x 1024 (h x w) in the json, and 1024 x 768 upright."""
    stored = _photo("astronaut", (72, 96)).transpose(Image.Transpose.ROTATE_90)  # the bytes: 96 wide, 72 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif)
    meta = {"caption": "a photo of <person>", "key": "000000000", "status": "success"}
    meta.update(width=96, height=72, original_width=1024, original_height=768)
    folder = tmp_path / "download"
    folder.mkdir()
    with wds.TarWriter(str(folder / "00000.tar"), encoder=False) as writer:
        writer.write({"__key__": "000000000", "jpg": buffer.getvalue(), "json": json.dumps(meta).encode()})
    spec = DomainSpec("web", str(folder / "00000.tar"), "<person>")
    (sample,) = list(build_stream([spec], train=False, resolution=32, reference_size=32))
    assert sample["original_size"] == (1024, 768)
    out = tmp_path / "shards"
    assert (
        main_shards([str(folder), str(out), "--domain", "web", "--subject", "<person>", "--no-progress"]) == 0
    )
    with tarfile.open(next(out.glob("*.tar"))) as tar:
        (member,) = [m for m in tar if m.name.endswith(".json")]
        assert json.loads(tar.extractfile(member).read())["original_size"] == [1024, 768]


@pytest.mark.faces
def test_nested_shards_adds_face_crops_to_an_img2dataset_download(tmp_path):
    photos = {
        "000000000": ("astronaut", (256, 256), (1024, 1024), "a photo of <person>"),
        "000000001": ("chelsea", (300, 200), (1351, 900), "a photo of <person>"),  # a cat: no face
    }
    folder = write_img2dataset_output(tmp_path / "download", photos)
    out = tmp_path / "faces"
    args = [str(folder), str(out), "--domain", "faces", "--subject", "<person>", "--no-progress", "--faces"]
    assert main_shards([*args, "--face-size", "128"]) == 0
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert rejected == [
        {
            "path": f"{folder / '00000.tar'}:000000001",
            "reason": "no face found (dlib's frontal face detector)",
        }
    ]
    with tarfile.open(out / "faces-000000.tar") as tar:
        members = {member.name: tar.extractfile(member).read() for member in tar}
    meta = json.loads(members["0000000_00000_000000000.json"])
    assert meta["original_size"] == [1024, 1024]
    x0, y0, x1, y1 = meta["bbox"]  # her face in the stored 256 px image (eyes near (112, 52))
    assert x0 < 100 < x1 and y0 < 52 < y1
    assert Image.open(io.BytesIO(members["0000000_00000_000000000.ref.jpg"])).size == (128, 128)

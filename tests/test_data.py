"""Tests of nested.data: skip counting, url checks, mixing, rank/worker splits, the batch contract."""

from __future__ import annotations

import io
import json
import pickle
import random
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from nested.data import (
    SKIP_KEYS,
    DomainSpec,
    NestedDataModule,
    ReferenceAugment,
    build_stream,
    collate_batch,
    contains_subject,
    reference_transform,
    target_transform,
)
from nested.data.domains import SkipCounter
from nested.data.loading import sample_caption
from nested.data.train_stream import DomainSource, Piece, Share, TrainStream
from nested.errors import DataError

BATCH_KEYS = {
    "pixel_values",
    "reference",
    "captions",
    "subjects",
    "domains",
    "keys",
    "original_sizes",
    "crops_top_left",
    "skipped",
}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def _coords(height: int, width: int) -> np.ndarray:
    """Pixel (y, x) = (4x, 4y, 0): the crop position can be read back from the pixels."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([4 * x, 4 * y, np.zeros_like(x)], -1).astype(np.uint8)


def _sample(
    key: str, caption: str | None = "a photo of <person>", pixels: np.ndarray | None = None, **meta
) -> dict:
    sample = {
        "__key__": key,
        "png": _png(_noise(seed=zlib.crc32(key.encode())) if pixels is None else pixels),
    }
    if caption is not None:
        sample["json"] = json.dumps({"caption": caption, **meta}).encode()
    return sample


def _write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def _collect(stream, batch_size: int = 1, num_workers: int = 0) -> list[dict]:
    loader = DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_batch)
    return list(loader)


@pytest.fixture
def broken_shards(tmp_path: Path) -> list[str]:
    """Shard a: 2 good, a corrupt png, a caption without the subject, a sample without json.
    Shard b: 4 good samples, cut in the middle of the third one's image."""
    corrupt = _sample("a2")
    corrupt["png"] = np.random.default_rng(1).bytes(300)
    a = _write_shard(
        tmp_path / "a.tar",
        [_sample("a0"), _sample("a1"), corrupt, _sample("a3", caption="a man"), _sample("a4", caption=None)],
    )
    b = _write_shard(tmp_path / "b.tar", [_sample(f"b{i}") for i in range(4)])
    with tarfile.open(b) as tar:
        member = next(m for m in tar.getmembers() if m.name == "b2.png")
    data = b.read_bytes()
    b.write_bytes(data[: member.offset_data + member.size // 2])
    return [str(a), str(b)]


def test_corrupt_truncated_and_subjectless_samples_are_skipped_and_counted(broken_shards: list[str]) -> None:
    drop = DomainSpec("faces", broken_shards, "<person>", caption_rule="drop")
    batches = _collect(build_stream([drop], train=False, resolution=16, reference_size=8), batch_size=2)
    keys = [k for b in batches for k in b["keys"]]
    skipped = {k: sum(int(b["skipped"][k]) for b in batches) for k in SKIP_KEYS}
    assert sorted(keys) == ["a0", "a1", "b0", "b1"]
    assert skipped == {
        "corrupt": 3,  # the undecodable png, the sample without json, b2's json without its cut png
        "broken_shards": 1,  # the truncated shard, counted once
        "no_subject_dropped": 1,
        "no_subject_inserted": 0,
        "no_reference": 0,
    }

    insert = DomainSpec(
        "faces", broken_shards, "<person>", caption_rule="insert", insert_template="{subject} photo"
    )
    samples = list(build_stream([insert], train=False, resolution=16, reference_size=8))
    captions = {s["key"]: s["caption"] for s in samples}
    assert captions["a3"] == "<person> photo, a man"
    assert captions["a0"] == "a photo of <person>"  # already has the subject: unchanged
    totals = {k: sum(s["skipped"][k] for s in samples) for k in SKIP_KEYS}
    assert totals["no_subject_inserted"] == 1 and totals["no_subject_dropped"] == 0 and totals["corrupt"] == 3


def test_entirely_broken_data_raises_instead_of_spinning(tmp_path: Path) -> None:
    shard = _write_shard(tmp_path / "bad.tar", [_sample("x", caption="no token here")])
    spec = DomainSpec("faces", str(shard), "<person>", caption_rule="drop")
    stream = build_stream([spec], train=True, resolution=16, reference_size=8, max_consecutive_failures=50)
    with pytest.raises(DataError) as caught:
        next(iter(stream))
    # The counter's verdict, not counted again as one more corrupt sample; its fix names the setting.
    assert str(caught.value).startswith(
        "data: 51 samples/shards in a row were skipped (no_subject_dropped: 51)"
    )
    assert str(caught.value).endswith(
        "set caption_rule: insert, or check the domain's subject against the captions."
    )

    spec = DomainSpec("faces", str(shard), "<person>", reference="ref")  # no sample has a ref image
    stream = build_stream([spec], train=True, resolution=16, reference_size=8, max_consecutive_failures=50)
    with pytest.raises(
        DataError, match=r"\(no_reference: 51\); last: x\. The domain's reference: ref needs a"
    ):
        next(iter(stream))


def test_missing_or_empty_urls_fail_at_start_naming_them(tmp_path: Path) -> None:
    missing = DomainSpec("faces", str(tmp_path / "faces-{000000..000003}.tar"), "<person>")
    with pytest.raises(FileNotFoundError, match=r"4 of 4 shard files .*faces-000000\.tar"):
        build_stream([missing], train=True, resolution=16)
    datamodule = NestedDataModule([missing], resolution=16, num_workers=0)
    with pytest.raises(FileNotFoundError, match="faces-000003.tar"):
        datamodule.setup("fit")

    index = tmp_path / "shards.json"
    index.write_text(json.dumps({"shards": []}))
    with pytest.raises(FileNotFoundError, match="expand to no shard files"):
        build_stream([DomainSpec("faces", str(index), "<person>")], train=False, resolution=16)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_stream(
            [DomainSpec("faces", str(tmp_path / "nope.json"), "<person>")], train=False, resolution=16
        )
    with pytest.raises(
        FileNotFoundError, match=rf"urls '{tmp_path}' is a folder; name its shards instead \(its "
    ):
        build_stream([DomainSpec("faces", str(tmp_path), "<person>")], train=False, resolution=16)

    with pytest.raises(ValueError, match="urls is empty"):
        DomainSpec("faces", [], "<person>")
    with pytest.raises(ValueError) as error:  # every problem in one message
        DomainSpec("faces", "x.tar", "<person>", weight=0, insert_template="a photo")
    assert "weight=0" in str(error.value) and "{subject}" in str(error.value)


def test_two_domains_mix_with_their_weights(tmp_path: Path) -> None:
    faces = _write_shard(tmp_path / "faces.tar", [_sample(f"f{i}", "<person> smiling") for i in range(8)])
    pets = _write_shard(tmp_path / "pets.tar", [_sample(f"p{i}", "a dog on grass") for i in range(8)])
    domains = [
        DomainSpec("faces", str(faces), "<person>", weight=0.8),
        DomainSpec("pets", str(pets), "dog", weight=0.2),
    ]
    stream = build_stream(
        domains, train=True, resolution=32, reference_size=8, epoch_samples=1000, shuffle_buffer=4
    )
    samples = list(stream)
    assert len(samples) == len(stream) == 1000
    share = sum(s["domain"] == "faces" for s in samples) / len(samples)
    assert abs(share - 0.8) < 0.04  # 3 standard deviations of a binomial(1000, 0.8) share
    for sample in samples:
        assert sample["subject"] == {"faces": "<person>", "pets": "dog"}[sample["domain"]]
        assert contains_subject(sample["caption"], sample["subject"])


def _split_shards(tmp_path: Path, num_shards: int, per_shard: int) -> list[str]:
    return [
        str(_write_shard(tmp_path / f"s{i}.tar", [_sample(f"s{i}_{j}") for j in range(per_shard)]))
        for i in range(num_shards)
    ]


@pytest.mark.parametrize("num_shards", [4, 1])  # by shard; fewer shards than slots: by sample
def test_validation_split_over_ranks_and_workers_is_disjoint_and_complete(
    tmp_path: Path, num_shards: int
) -> None:
    urls = _split_shards(tmp_path, num_shards, 12 // num_shards)
    spec = DomainSpec("faces", urls, "<person>")
    seen = []
    for rank in range(2):
        stream = build_stream([spec], train=False, resolution=16, reference_size=8, rank=rank, world_size=2)
        keys = [k for b in _collect(stream, num_workers=2) for k in b["keys"]]
        assert len(keys) >= 2  # every rank (and worker) gets data, or DDP would hang
        seen.append(keys)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(
        f"s{i}_{j}" for i in range(num_shards) for j in range(12 // num_shards)
    )


def test_readers_hold_equal_disjoint_runs_and_draw_every_sample_equally_often(tmp_path: Path) -> None:
    """Shards that split unevenly over the readers (sizes 10, 10, 10, 2 over 4 readers) still give each
    reader 8 samples, none shared, and every sample about the same number of draws."""
    counts = [10, 10, 10, 2]
    urls = [
        str(
            _write_shard(
                tmp_path / f"s{i}.tar", [{"__key__": f"s{i}-{j:02d}", "txt": b"x"} for j in range(n)]
            )
        )
        for i, n in enumerate(counts)
    ]
    shares = [Share.of(len(counts), reader, 4, counts) for reader in range(4)]
    held = [[(p.shard, i) for p in share.pieces for i in range(p.start, p.stop)] for share in shares]
    assert [len(h) for h in held] == [8, 8, 8, 8]
    assert sorted(sum(held, [])) == [(shard, i) for shard, n in enumerate(counts) for i in range(n)]
    # Without counts (remote shards without an index), whole shards, one per reader here.
    assert [Share.of(4, r, 4).pieces for r in range(4)] == [(Piece(r),) for r in range(4)]

    draws: Counter[str] = Counter()
    for rank in range(4):  # 4 ranks of one reader each
        source = DomainSource("d", urls, 1.0, {}, lambda raw, rng: {"key": raw["__key__"]})
        stream = TrainStream(
            [source], counter=SkipCounter(10), seed=0, rank=rank, world_size=4, num_workers=0, per_reader=800
        )
        assert source.counted == dict(zip(urls, counts, strict=True))  # counted once, before any worker
        keys = [sample["key"] for sample in stream]
        assert len(keys) == 800
        draws.update(keys)
    assert len(draws) == sum(counts)
    # 100 draws per sample on average; split by whole shards, the 2-sample shard's got 400 each.
    assert max(draws.values()) < 1.3 * min(draws.values()), draws


def test_resampled_stream_with_one_shard_is_bounded_and_differs_per_rank_and_worker(tmp_path: Path) -> None:
    (url,) = _split_shards(tmp_path, 1, 16)
    spec = DomainSpec("faces", url, "<person>")

    def streams(rank: int, seed: int = 0) -> list[list[str]]:
        stream = build_stream(
            [spec],
            train=True,
            resolution=16,
            reference_size=8,
            rank=rank,
            world_size=2,
            num_workers=2,
            epoch_samples=16,
            shuffle_buffer=16,
            seed=seed,
        )
        batches = _collect(stream, num_workers=2)
        assert len(batches) == len(stream) == 8  # 16 samples / 2 ranks, whole epoch, no hang
        # A DataLoader takes batches from its workers in turn: batch i comes from worker i % 2.
        return [[b["keys"][0] for b in batches[worker::2]] for worker in range(2)]

    rank0, rank1 = streams(0), streams(1)
    per_slot = [*rank0, *rank1]
    assert len({tuple(s) for s in per_slot}) == 4  # rank 0/1 x worker 0/1 all differ
    assert streams(0) == rank0  # reproducible from the seed
    assert streams(0, seed=1) != rank0


def test_datamodule_batch_contract(tmp_path: Path) -> None:
    samples = [
        _sample(f"k{i}", "<cat> on a sofa", _noise(40, 56, seed=i), original_size=[400, 560])
        for i in range(6)
    ]
    samples[0]["ref.png"] = _png(_noise(20, 20, seed=99))
    url = _write_shard(tmp_path / "pets.tar", samples)
    datamodule = NestedDataModule(
        [{"name": "pets", "urls": str(url), "subject": "<cat>"}],  # dicts are accepted too
        resolution=32,
        reference_size=24,
        batch_size=4,
        num_workers=0,
        epoch_samples=10,
        random_flip=True,
        val_domains=[DomainSpec("pets", str(url), "<cat>")],
    )
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 3  # ceil(10 / 4): whole batches, the length is exact
    batch = batches[0]
    assert set(batch) == BATCH_KEYS | {"stream"}  # no "latents": none cached
    # The stream position is taken out of every batch before the training step sees it.
    assert set(datamodule.on_before_batch_transfer(dict(batch), 0)) == BATCH_KEYS
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["pixel_values"].min() < -0.5 and batch["pixel_values"].max() > 0.5  # really [-1, 1]
    assert batch["reference"].shape == (4, 3, 24, 24) and batch["reference"].dtype == torch.float32
    assert batch["reference"].min() >= 0 and batch["reference"].max() <= 1
    assert (
        batch["original_sizes"].dtype == torch.long and batch["original_sizes"].tolist() == [[400, 560]] * 4
    )
    # 40x56 -> 32x45 after the resize: the crop's top is 0 and its left in [0, 13].
    assert batch["crops_top_left"].dtype == torch.long and batch["crops_top_left"].shape == (4, 2)
    assert (batch["crops_top_left"][:, 0] == 0).all() and (batch["crops_top_left"][:, 1] <= 13).all()
    assert batch["captions"] == ["<cat> on a sofa"] * 4 and batch["subjects"] == ["<cat>"] * 4
    assert batch["domains"] == ["pets"] * 4 and len(batch["keys"]) == 4
    assert set(batch["skipped"]) == set(SKIP_KEYS) and all(
        v.dtype == torch.long for v in batch["skipped"].values()
    )

    val = list(datamodule.val_dataloader())
    assert sorted(k for b in val for k in b["keys"]) == [f"k{i}" for i in range(6)]
    assert (val[0]["crops_top_left"][:, 1] == 6).all()  # validation: center crop, (45 - 32) // 2

    # Rank and world size come from the trainer when attached: 2 ranks share the epoch.
    datamodule.trainer = SimpleNamespace(global_rank=1, world_size=2, current_epoch=3)
    assert len(datamodule.train_dataloader()) == 2  # ceil(10 / (2 * 4))
    pickle.dumps(datamodule.train_dataloader().dataset)  # workers can be spawned, not only forked


def test_target_transform_reports_the_crop_it_made() -> None:
    image = Image.fromarray(_coords(32, 60))  # resolution == short side: no resize
    view = target_transform(image, resolution=32, center_crop=True)
    assert view.original_size == (32, 60) and view.crop_top_left == (0, 14)
    assert view.pixel_values.shape == (3, 32, 32)
    red = (view.pixel_values[0] + 1) / 2 * 255  # = 4 * x in the source image
    assert torch.allclose(red[0, :3], torch.tensor([56.0, 60.0, 64.0]))
    for seed in range(6):
        view = target_transform(
            image, resolution=32, center_crop=False, random_flip=True, rng=random.Random(seed)
        )
        top, left = view.crop_top_left
        red = ((view.pixel_values[0] + 1) / 2 * 255).round()
        if red[0, 0] > red[0, -1]:  # flipped: left is measured in the mirrored image
            assert red[0, -1] == 4 * (60 - 32 - left)
        else:
            assert red[0, 0] == 4 * left


def test_reference_comes_from_ref_image_bbox_or_target(tmp_path: Path) -> None:
    pixels = _coords(48, 64)
    # bbox 32x16 at (8, 16): squared around its centre to 32x32 at (8, 8), no margin.
    crop = reference_transform(Image.fromarray(pixels), size=32, bbox=[8, 16, 40, 32], bbox_margin=0.0)
    assert crop.shape == (3, 32, 32)
    torch.testing.assert_close(
        crop[:2] * 255, torch.from_numpy(_coords(32, 32)[..., :2] + [32, 32]).permute(2, 0, 1).float()
    )
    # Augmentation changes the view but keeps it in [0, 1].
    augmented = reference_transform(
        Image.fromarray(pixels),
        size=32,
        bbox=[8, 16, 40, 32],
        augment=ReferenceAugment(),
        rng=random.Random(0),
    )
    assert not torch.equal(augmented, crop) and augmented.min() >= 0 and augmented.max() <= 1

    ref_pixels = _noise(32, 32, seed=5)
    samples = [
        _sample("with_ref", pixels=pixels, bbox=[8, 16, 40, 32]),
        _sample("bbox_only", pixels=pixels, bbox=[8, 16, 40, 32]),
    ]
    samples[0]["ref.png"] = _png(ref_pixels)
    url = str(_write_shard(tmp_path / "r.tar", samples))

    def references(reference: str) -> dict[str, torch.Tensor]:
        spec = DomainSpec("faces", url, "<person>", reference=reference, bbox_margin=0.0)
        return {
            s["key"]: s["reference"]
            for s in build_stream([spec], train=False, resolution=16, reference_size=32)
        }

    by_bbox = references("bbox_crop")
    torch.testing.assert_close(
        by_bbox["with_ref"] * 255, torch.from_numpy(ref_pixels).permute(2, 0, 1).float()
    )
    torch.testing.assert_close(by_bbox["bbox_only"], crop)
    whole = references("target")["bbox_only"]  # center square of the target, resized
    assert whole[0, 0, 0] * 255 == pytest.approx(32, abs=3)
    assert list(references("ref")) == ["with_ref"]  # no ref image: skipped (counted as no_reference)


def test_caption_subject_matching() -> None:
    assert contains_subject("A Dog in the park", "dog")
    assert not contains_subject("a hotdog stand", "dog")
    assert contains_subject("portrait of <person>, smiling", "<person>")
    assert not contains_subject("portrait of a person", "<person>")
    # Words as CLIP cuts them: letters join, digits and underscores do not.
    assert contains_subject("dog2 and cat", "dog") and contains_subject("a dog_toy", "dog")
    assert contains_subject("x<person>'s hat", "<person>")


def test_datamodule_parses_from_lightning_cli_yaml() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(NestedDataModule, "data")
    config = {
        "data": {
            "domains": [
                {"name": "faces", "urls": "f.tar", "subject": "<person>", "weight": 0.7},
                {"name": "pets", "urls": ["a.tar", "b.tar"], "subject": "dog", "caption_rule": "drop"},
            ],
            "reference_augment": {"scale": [0.5, 1.0], "flip": False},
        }
    }
    datamodule = parser.instantiate(parser.parse_object(config)).data
    assert [d.subject for d in datamodule.domains] == ["<person>", "dog"]
    assert datamodule.domains[1].urls == ["a.tar", "b.tar"] and datamodule.domains[1].caption_rule == "drop"
    assert datamodule.reference_augment == ReferenceAugment(scale=(0.5, 1.0), flip=False)
    config["data"]["domains"][0]["wieght"] = 0.7  # a typo is an error, not silently ignored
    with pytest.raises(Exception, match="wieght"):
        parser.parse_object(config)


# ----------------------------------------------------------------------------- shards against their index


def _built_shards(tmp_path: Path) -> Path:
    """4 samples in 2 shards, written by ``nested shards``; returns their shards.json."""
    from nested.data.shards import build_shards

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        Image.fromarray(_noise(64, 64, seed=i)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text("a photo of <person>")
    out = tmp_path / "shards"
    build_shards(src, out, domain="faces", subject="<person>", maxcount=2, min_size=16, progress=False)
    return out / "shards.json"


def test_shards_that_differ_from_their_index_fail_at_setup_naming_them(tmp_path: Path) -> None:
    index = _built_shards(tmp_path)
    spec = DomainSpec("faces", str(index), "<person>")

    def setup(verify: str = "size") -> None:
        NestedDataModule([spec], resolution=16, num_workers=0, verify_shards=verify).setup("fit")

    setup()
    setup("sha256")
    shard = index.parent / "faces-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:-512])  # cut short
    with pytest.raises(DataError) as error:
        setup()
    assert f"shard {shard} differs from its index {index} (entry 1): it has {len(data) - 512} bytes" in str(
        error.value
    )
    shard.write_bytes(data[:600] + bytes([data[600] ^ 1]) + data[601:])  # same size, one bit flipped
    setup()  # a size check cannot see it; a hash check does
    with pytest.raises(DataError, match=r"faces-000001\.tar differs .* \(entry 1\): its sha256 is"):
        setup("sha256")
    setup("off")

    shard.write_bytes(data)
    record = json.loads(index.read_text())
    for entry in record["shards"]:
        entry["sha256"] = "0" * 64
    index.write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"faces-000000\.tar differs .* \(entry 0\)"):
        setup("sha256")
    with pytest.raises(ValueError, match="verify_shards='md5' must be one of size, sha256, off"):
        NestedDataModule([spec], verify_shards="md5")


@pytest.mark.parametrize(
    "text, problem",
    [
        (
            '{"shards": [\n  {"url": "a.tar",}\n]}',
            "is not valid JSON (line 2, column 19: Expecting property name",
        ),
        ("[]", "is not a shards index: it has no 'shards' list"),
        ('{"shards": [{"url": "a.tar"}, {"bytes": 3}]}', "is not a shards index: shard entry 1 has no 'url'"),
    ],
)
def test_a_malformed_index_is_one_error_naming_the_file_and_the_fix(
    tmp_path: Path, text: str, problem: str
) -> None:
    index = tmp_path / "shards.json"
    index.write_text(text)
    with pytest.raises(DataError) as error:
        NestedDataModule([DomainSpec("faces", str(index), "<person>")], num_workers=0).setup("fit")
    assert str(error.value).startswith(f"data.domains: {index} {problem}")
    assert f"rebuild it with `nested shards SRC {tmp_path} " in str(error.value)


def test_nested_fit_stops_at_start_naming_the_shard_that_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nested.cli.main import main

    index = _built_shards(tmp_path)
    shard = index.parent / "faces-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-512])
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr("sys.argv", ["nested"])  # the arguments below are the command line
    domains = json.dumps([{"name": "faces", "urls": str(index), "subject": "<person>"}])
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", "--config", "configs/smoke.yaml", f"--data.domains={domains}", "--trainer.max_steps=1",
             f"--trainer.default_root_dir={tmp_path / 'run'}"]
        )  # fmt: skip
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(
        f"nested fit: error: data.domains: domain 'faces': shard {shard} differs from its index {index}"
    )


def test_missing_validation_shards_are_named_as_data_val_domains_with_the_way_to_go_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The recipes validate on shards of their own: a user who points only data.domains at theirs must learn
    which option names the missing ones."""
    from nested.cli.main import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    missing = tmp_path / "faces-val" / "shards.json"
    val_domains = json.dumps([{"name": "faces", "urls": str(missing), "subject": "<person>"}])
    argv = ["fit", "--config", "configs/smoke.yaml", "--trainer.max_steps=1", "--data.num_workers=0",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'run'}"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, f"--data.val_domains={val_domains}"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(
        f"nested fit: error: data.val_domains: domain 'faces': 1 of 1 shard files from urls '{missing}' do not exist"
    )
    assert error.endswith("To train without validation, pass --data.val_domains=[].")
    assert main([*argv, f"--data.val_domains={val_domains}", "--data.val_domains=[]"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_a_raw_txt_caption_is_read_as_nested_shards_reads_a_caption_file() -> None:
    """img2dataset's txt members train as they are: a Windows editor's byte-order mark and CRLF line ends."""
    raw = "\ufeffa photo of <person>\r\non a beach\rat noon".encode()
    assert sample_caption({}, raw) == "a photo of <person>\non a beach\nat noon"
    assert sample_caption({"caption": "from the json"}, raw) == "from the json"
    with pytest.raises(UnicodeDecodeError):
        sample_caption({}, "café".encode("latin-1"))

"""``nested eval``: the per-image CSV, the summary's points, the grid and the trade-off plot; with
``--judges``, the toy-world judge columns and the ``--pair`` two-subject path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_generate import strict_json
from test_pipeline import write_bomb_png, write_truncated_jpeg

from nested.adapter import NestedAdapter
from nested.backbone import DiffusionBackbone
from nested.cli.eval import main_eval, read_pair_prompts, read_prompts
from nested.encoder import EncoderSpec
from nested.errors import DataError
from nested.evaluation.images import Reference, load_references
from nested.evaluation.metrics import IdentitySimilarity, VisionEmbedder
from nested.evaluation.report import JUDGE_COLUMNS
from nested.testing import write_tiny_clip
from nested.toyworld.judges import judge_chance, judge_images, judged_subjects
from nested.toyworld.world import (
    FaceIdentity,
    PetIdentity,
    caption,
    contexts,
    parse_caption,
    render,
    render_pair,
    split_identities,
    write_world_shards,
)

REPO = Path(__file__).resolve().parents[1]
JUDGES = REPO / "data" / "toyworld" / "judges"
PROMPTS = REPO / "data" / "prompts"
needs_judges = pytest.mark.skipif(not JUDGES.is_dir(), reason=f"no trained judges at {JUDGES} yet")


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def tiny_pet_adapter(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained <pet> adapter (domain "pets") for the tiny SD pipeline, for --pair."""
    backbone = DiffusionBackbone.from_pretrained(tiny_sd_path)
    spec = EncoderSpec(backbone=str(tiny_sd_path / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2)
    torch.manual_seed(1)
    adapter = NestedAdapter.for_unet(
        backbone.unet,
        token="<pet>",
        class_word="pet",
        encoder=spec,
        base_model=str(tiny_sd_path),
        domain="pets",
    )
    adapter.add_tokens(backbone.tokenizers, backbone.text_encoders)
    return adapter.save_pretrained(tmp_path_factory.mktemp("adapters") / "pet")


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Held-out toy-world identities as reference shards, 2 per domain, one sample each."""
    folder = tmp_path_factory.mktemp("world")
    shards = {}
    for domain in ("faces", "pets"):
        held_out = split_identities(domain)[1]
        write_world_shards(folder / domain, domain, identities=held_out[:2], samples_per_identity=1, seed=0)
        shards[domain] = folder / domain / "shards.json"
    return shards


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _subjects(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("alice", "bob"):
        Image.fromarray((rng.random((48, 40, 3)) * 255).astype("uint8")).save(folder / f"{name}.png")
    return folder


def test_eval_writes_one_row_per_image_and_plots_every_strength_and_the_base(
    tiny_sd_path, tiny_adapter, tiny_clip_path, tmp_path
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na photo of {token}\n\n<person> on the beach\n")
    out = tmp_path / "eval"
    code = main_eval(
        [
            "--base", str(tiny_sd_path),
            "--adapter", f"<person>={tiny_adapter}",
            "--prompts", str(prompts),
            "--subjects", str(_subjects(tmp_path / "subjects")),
            "--strengths", "0.5,1.0",
            "--seeds", "0,1",
            "--clip", str(tiny_clip_path),
            "--steps", "2",
            "--height", "32",
            "--width", "32",
            "--batch-size", "8",
            "--out", str(out),
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0

    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    adapter_rows = [r for r in rows if r["variant"] == "adapter"]
    base_rows = [r for r in rows if r["variant"] == "base"]
    keys = {(r["subject"], r["prompt_index"], float(r["strength"]), int(r["seed"])) for r in adapter_rows}
    assert len(adapter_rows) == len(keys) == 2 * 2 * 2 * 2  # subjects x prompts x strengths x seeds
    assert len(base_rows) == 2 * 2 * 2  # subjects x prompts x seeds, no strength
    assert {r["clip_text"] for r in rows} == {"a photo of person", "person on the beach"}
    assert all((out / r["image"]).is_file() for r in rows)
    assert all(-1 <= float(r["identity_similarity"]) <= 1 for r in rows)
    # Each row is scored against its own subject's reference: recomputed here from the saved PNG with the
    # adapter's image encoder (eval's identity model without --identity-model) and the reference eval read.
    encoder = NestedAdapter.from_pretrained(tiny_adapter).encoder
    size = (encoder.image_size, encoder.image_size)
    mean, std = encoder.image_mean.flatten().tolist(), encoder.image_std.flatten().tolist()
    identity = IdentitySimilarity(VisionEmbedder(encoder.backbone, crop=size, mean=mean, std=std))
    references = {
        r.name: r.image[None] for r in load_references(tmp_path / "subjects", size=512, token="<person>")
    }
    assert sorted(references) == ["alice", "bob"]
    for row in rows:
        image = torch.from_numpy(np.asarray(Image.open(out / row["image"]))).permute(2, 0, 1)[None] / 255
        scores = {name: identity.score_batch(image, ref).item() for name, ref in references.items()}
        other = next(name for name in scores if name != row["subject"])
        # The PNG's rounding moves the score by < 1e-3 (3e-4 here); the other reference by > 5e-3 (1.4e-2).
        assert float(row["identity_similarity"]) == pytest.approx(scores[row["subject"]], abs=1e-3)
        assert abs(scores[row["subject"]] - scores[other]) > 5e-3

    summary = json.loads((out / "summary.json").read_text())
    points = summary["points"]
    assert [p["label"] for p in points] == ["base", "s=0.5", "s=1"]
    for point in points:
        selected = [
            r
            for r in rows
            if r["variant"] == point["variant"]
            and (point["strength"] is None or float(r["strength"]) == point["strength"])
        ]
        assert point["n"] == len(selected)
        mean = np.mean([float(r["identity_similarity"]) for r in selected])
        assert point["identity_similarity"] == pytest.approx(mean, abs=1e-5)
        mean = np.mean([float(r["prompt_alignment"]) for r in selected])
        assert point["prompt_alignment"] == pytest.approx(mean, abs=1e-3)

    with Image.open(out / "tradeoff.png") as plot:
        plot.verify()
    with Image.open(out / "tradeoff.png") as plot:
        assert plot.format == "PNG" and plot.size == (640, 480)
    # The grid goes through the subjects first, each with another prompt.
    assert strict_json(out / "summary.json")["grid"]["rows"] == [
        ["<person>", 0, 0], ["<person>", 1, 1], ["<person>", 0, 1], ["<person>", 1, 0]
    ]  # fmt: skip
    with Image.open(out / "grid.png") as grid:  # 4 rows (subject x prompt) x (reference, base, 2 strengths)
        # 32 px images shown at 128 px, 4 px apart; a 20 px header, and a 20 px prompt line above each row
        assert grid.size == (4 * 128 + 5 * 4, 20 + 4 * (20 + 128 + 4) + 4)
        pixels = np.asarray(grid.convert("L"))
    for column in range(4):  # every column is named in the header
        left = 4 + column * 132
        assert (pixels[:20, left : left + 128] < 128).sum() > 20
    for row in range(4):  # every row has its prompt written above it, and four pictures under it
        top = 20 + row * 152
        assert (pixels[top : top + 20, :] < 160).sum() > 20
        assert pixels[top + 20 : top + 148, 4:132].std() > 0


def test_eval_token_weight_changes_the_adapter_images_only_and_is_recorded(
    tiny_sd_path, tiny_adapter, tiny_clip_path, tmp_path
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\n")
    subjects = _subjects(tmp_path / "subjects")
    scores = {}
    for weight in (None, "4"):
        out = tmp_path / f"eval-{weight}"
        argv = ["--base", str(tiny_sd_path), "--adapter", f"<person>={tiny_adapter}", "--prompts", str(prompts),
                "--subjects", str(subjects), "--strengths", "1.0", "--seeds", "0", "--clip", str(tiny_clip_path),
                "--steps", "2", "--height", "32", "--width", "32", "--out", str(out), "--no-progress",
                "--no-images"]  # fmt: skip
        assert main_eval(argv + (["--token-weight", f"<person>={weight}"] if weight else [])) == 0
        with open(out / "results.csv") as file:
            scores[weight] = {
                (r["variant"], r["subject"]): float(r["identity_similarity"]) for r in csv.DictReader(file)
            }
        summary = json.loads((out / "summary.json").read_text())
        assert summary["token_weights"] == ({"<person>": 4.0} if weight else {})
    for key, plain in scores[None].items():
        if key[0] == "base":
            assert scores["4"][key] == pytest.approx(plain, abs=1e-6)
        else:
            assert abs(scores["4"][key] - plain) > 1e-4, key


def test_eval_reports_a_prompt_without_the_token_in_one_line(tiny_adapter, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\na photo of a dog\n")
    code = main_eval(
        ["--base", "unused", "--adapter", f"<person>={tiny_adapter}", "--prompts", str(prompts),
         "--subjects", str(tmp_path), "--out", str(tmp_path / "out")]
    )  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert error.startswith("nested eval: error:") and "prompts.txt:2" in error and "\n" not in error


def test_eval_refuses_a_used_out_and_overwrite_replaces_the_earlier_run_whole(
    tiny_sd_path, tiny_adapter, tiny_clip_path, tmp_path, capsys
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\n")
    out = tmp_path / "eval"
    argv = ["--base", str(tiny_sd_path), "--adapter", f"<person>={tiny_adapter}", "--prompts", str(prompts),
            "--subjects", str(_subjects(tmp_path / "subjects")), "--max-subjects", "1", "--strengths", "1.0",
            "--seeds", "0", "--clip", str(tiny_clip_path), "--steps", "2", "--height", "32", "--width", "32",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main_eval(argv) == 0
    first = _tree(out)
    assert sorted(first) == [
        "grid.png", "images/person/alice/p00_s1_seed0.png", "images/person/base/p00_seed0.png", "results.csv",
        "summary.json", "tradeoff.png",
    ]  # fmt: skip
    capsys.readouterr()

    assert main_eval([*argv, "--no-images"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"nested eval: error: --out '{out}' is not empty (it holds 'grid.png' and 5 more files)"
    )
    assert "--overwrite" in err and "\n" not in err and _tree(out) == first

    assert main_eval([*argv, "--no-images", "--overwrite"]) == 0
    second = _tree(out)
    assert sorted(second) == ["grid.png", "results.csv", "summary.json", "tradeoff.png"]  # no stale images/
    assert strict_json(out / "summary.json")["rows"] == 2 and all(row["image"] == "" for row in _rows(out))
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no staging left

    (out / "images").mkdir()
    (out / "images" / "notes.txt").write_text("mine")
    assert main_eval([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out '{out}' holds 'images/notes.txt', which nested eval did not write" in err
    assert (out / "images" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--strengths": "0.5,nan"}, "--strengths: nan is not a finite number."),
        ({"--guidance": "inf"}, "--guidance: inf is not a finite number."),
        ({"--token-weight": "<person>=nan"}, "--token-weight '<person>=nan': nan is not a finite number."),
        ({"--device": "cuda:99"}, "--device cuda:99: this machine has "),
        (
            {"prompts": "caf\xe9 {token}".encode("latin-1")},
            "prompts.txt is not UTF-8 text: 'utf-8' codec can't",
        ),
        # A subject image that cannot be used is fatal, named, before any model loads (--base is not one).
        (
            {"subject": "truncated.jpg"},
            "truncated.jpg': unreadable image: the file is damaged (image file is truncated",
        ),
        (
            {"subject": "bomb.png"},
            "bomb.png': decompression bomb: Image size (400000000 pixels) exceeds limit",
        ),
        (
            {"--reference-size": "0"},
            "--reference-size must be >= 16 (the side of the reference images), got 0.",
        ),
        (
            {"--seeds": f"0,{2**64}"},
            f"--seeds {2**64}: a seed must lie in torch's range -2**63 .. 2**64 - 1.",
        ),
    ],
)
def test_eval_bad_numbers_and_a_damaged_subject_image_end_in_one_line(
    tiny_adapter, tmp_path, capsys, change, message
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\n")
    subjects = _subjects(tmp_path / "subjects")
    argv = ["--base", "unused", "--adapter", f"<person>={tiny_adapter}", "--prompts", str(prompts),
            "--subjects", str(subjects), "--out", str(tmp_path / "out")]  # fmt: skip
    for option, value in change.items():
        if option == "subject":
            {"truncated.jpg": write_truncated_jpeg, "bomb.png": write_bomb_png}[value](subjects / value)
        elif option == "prompts":
            prompts.write_bytes(value)
        else:
            argv += [option, value]
    assert main_eval(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("nested eval: error:") and message in error and "\n" not in error
    if "subject" in change:
        assert f"cannot use the image '{subjects / change['subject']}'" in error
    assert not (tmp_path / "out").exists()


def test_eval_refuses_what_it_cannot_measure_in_one_line_before_the_base_loads(
    tiny_adapter, tiny_pet_adapter, tiny_clip_path, tiny_sd_path, tmp_path, capsys
):
    """--base names no model: each mistake must be found before it would load."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of <person>\n")
    subjects = _subjects(tmp_path / "subjects")
    base = ["--base", "unused", "--adapter", f"<person>={tiny_adapter}", "--prompts", str(prompts),
            "--clip", str(tiny_clip_path), "--out", str(tmp_path / "out")]  # fmt: skip
    judges = tmp_path / "judges"
    judges.mkdir()
    (judges / "config.json").write_text((JUDGES / "config.json").read_text())  # no model.safetensors
    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("anna.png", "anna.jpg"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(twins / name)
    cases = [
        (
            ["--subjects", str(twins)],
            "the reference images anna.jpg, anna.png would all be the subject 'anna'",
        ),
        (
            ["--subjects", str(subjects), "--adapter", f"<pet>={tiny_pet_adapter}"],
            f"{prompts}: no prompt names <pet>: add lines with {{token}} (every subject) or with <pet>",
        ),
        (["--subjects", str(subjects), "--judges", str(judges)], f"{judges} is not a judges folder: model"),
        (
            ["--subjects", f"<dog>={subjects}"],
            f"--subjects '<dog>={subjects}': '<dog>' has no --adapter (the adapters' tokens: <person>).",
        ),
        (
            ["--subjects", str(subjects), "--identity-model", str(tiny_sd_path / "text_encoder")],
            "is a clip_text_model model, which takes no image: pass a vision model (CLIP, DINOv2) or 'face'.",
        ),
    ]
    for extra, message in cases:
        argv = [*base, *extra]
        if "--clip" in extra:
            argv[argv.index("--clip") + 1] = extra[extra.index("--clip") + 1]
        assert main_eval(argv) == 2, message
        error = capsys.readouterr().err.strip()
        assert error.startswith("nested eval: error:") and message in error and "\n" not in error, error
    argv = [*base, "--subjects", str(subjects)]
    argv[argv.index("--clip") + 1] = str(tiny_sd_path / "image_encoder")  # a vision tower, no text
    assert main_eval(argv) == 2
    assert "is a clip_vision_model model, not a full CLIP (text and vision towers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_of_references_reads_every_image_type_nested_shards_reads(tmp_path):
    from nested.image_files import IMAGE_SUFFIXES

    folder = tmp_path / "subjects"
    folder.mkdir()
    formats = {".tif": "TIFF", ".gif": "GIF", ".jfif": "JPEG", ".jpe": "JPEG", ".png": "PNG"}
    for index, (suffix, kind) in enumerate(formats.items()):
        Image.fromarray(np.full((16, 16, 3), 50 * index, np.uint8)).save(
            folder / f"s{index}{suffix}", format=kind
        )
    (folder / "notes.txt").write_text("not an image")
    assert set(formats) <= set(IMAGE_SUFFIXES)
    assert [r.name for r in load_references(folder, size=16)] == [f"s{i}" for i in range(len(formats))]


def test_references_from_shards_with_a_damaged_sample_among_them_are_refused(tmp_path, caplog):
    """The subjects measured are the ones asked for: a damaged sample among them is not silently replaced by
    the next one. One after them does not matter."""
    import io

    import webdataset as wds

    shard = tmp_path / "faces-000000.tar"
    with wds.TarWriter(str(shard), encoder=False) as writer:
        for index in range(4):
            buffer = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 40 * index, np.uint8)).save(buffer, format="PNG")
            image = buffer.getvalue() if index != 2 else b"not a png"
            writer.write({"__key__": f"s{index}", "png": image, "json": b'{"caption": "<person>"}'})
    assert [r.name for r in load_references(str(shard), count=2, size=16, token="<person>")] == ["s0", "s1"]
    with pytest.raises(
        DataError, match=r"1 sample\(s\) among the subjects asked for could not be read \(corrupt"
    ):
        load_references(str(shard), count=3, size=16, token="<person>")
    with pytest.raises(DataError, match="could not be read"):
        load_references(str(shard), size=16, token="<person>")  # all of them
    # The log the message points to names the sample and member (webdataset's DecodingError has no message).
    assert f"data: corrupt #1 in this worker: {shard} s2 (png): UnidentifiedImageError(" in caplog.text


def test_eval_warns_of_a_strength_outside_the_range_before_loading_anything(tiny_adapter, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\na photo of a dog\n")  # line 2: an error found after the strengths
    argv = ["--base", "unused", "--adapter", f"<person>={tiny_adapter}", "--prompts", str(prompts),
            "--subjects", str(tmp_path), "--strengths", "0.5,2.5", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main_eval(argv) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning == (
        "nested eval: warning: the strength of '<person>' (2.5) is outside [0, 2], the range adapters are made for "
        "(0: the plain prompt, 1: the subject); images may break down."
    )
    assert error.startswith("nested eval: error:") and "prompts.txt:2" in error


# ----------------------------------------------------------------------------- --judges


def _toy_prompts(path: Path, source: str, count: int = 2) -> Path:
    """The first ``count`` templates of a data/prompts/toyworld-*.txt file (a small sweep)."""
    lines = [
        line for line in (PROMPTS / source).read_text().splitlines() if line and not line.startswith("#")
    ]
    path.write_text("\n".join(lines[:: len(lines) // count + 1][:count]) + "\n")  # other scenes and styles
    return path


def _judged_eval(tiny_sd_path: Path, out: Path, *extra: str) -> int:
    return main_eval(
        [
            "--base", str(tiny_sd_path),
            "--judges", str(JUDGES),
            "--clip", "none",
            "--seeds", "0",
            "--steps", "2",
            "--height", "32",
            "--width", "32",
            "--batch-size", "8",
            "--reference-size", "32",
            "--out", str(out),
            "--no-progress",
            *extra,
        ]
    )  # fmt: skip


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as file:
        return list(csv.DictReader(file))


def _check_point_means(points: list[dict], rows: list[dict[str, str]], columns: list[str]) -> None:
    for point in points:
        selected = [
            r
            for r in rows
            if r["token"] == point["token"]
            and r["variant"] == point["variant"]
            and (point["strength"] is None or float(r["strength"]) == point["strength"])
        ]
        assert point["n"] == len(selected) > 0
        for column in columns:
            assert point[column] == pytest.approx(np.mean([float(r[column]) for r in selected]), abs=1e-5)


@needs_judges
def test_eval_with_judges_scores_every_image_against_the_true_label_and_the_prompt(
    tiny_sd_path, tiny_adapter, world_shards, tmp_path, capsys
):
    out = tmp_path / "eval"
    code = _judged_eval(
        tiny_sd_path,
        out,
        "--adapter", f"<person>={tiny_adapter}",
        "--prompts", str(_toy_prompts(tmp_path / "prompts.txt", "toyworld-faces.txt")),
        "--subjects", str(world_shards["faces"]),
        "--strengths", "0.5,1.0",
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0

    rows = _rows(out)
    attributes = [f"identity_attr_{a}" for a in FaceIdentity.ATTRIBUTES]
    assert list(rows[0])[-9:] == [*JUDGE_COLUMNS, *attributes]
    assert len([r for r in rows if r["variant"] == "adapter"]) == 2 * 2 * 2  # subjects x prompts x strengths
    base = [r for r in rows if r["variant"] == "base"]
    assert len(base) == 2 * 2 and len({r["subject"] for r in base}) == 2  # base images vs every subject
    for row in rows:  # every row judged, base rows included
        assert float(row["identity_exact"]) in (0.0, 1.0) and float(row["context"]) in (0.0, 1.0)
        assert all(0.0 <= float(row[c]) <= 1.0 for c in JUDGE_COLUMNS)
        assert float(row["identity_exact"]) <= float(row["identity_attributes"])
        assert float(row["context"]) <= float(row["context_scene"])
        assert row["prompt_alignment"] == "nan"  # --clip none
        per_attribute = [float(row[c]) for c in attributes]  # the summaries are these, per attribute
        assert set(per_attribute) <= {0.0, 1.0}
        assert float(row["identity_attributes"]) == pytest.approx(sum(per_attribute) / len(attributes))
        assert float(row["identity_exact"]) == float(all(per_attribute))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["clip"] is None and summary["judges"] == str(JUDGES)
    points = summary["points"]
    assert [p["label"] for p in points] == ["base", "s=0.5", "s=1"]
    _check_point_means(points, rows, [*JUDGE_COLUMNS, *attributes, "identity_similarity"])
    refs = load_references(str(world_shards["faces"]), count=1, size=32, token="<person>")
    expected_chance = judge_chance(judged_subjects({"<person>": refs})[0])
    assert expected_chance["identity_exact"] == pytest.approx(1 / 1440)
    assert expected_chance["context"] == pytest.approx(1 / 24)
    assert expected_chance["identity_attr_hair_style"] == pytest.approx(1 / 4)  # bald, short, long, spiky
    for point in points:
        assert point["prompt_alignment"] is None
        assert point["chance"] == pytest.approx(expected_chance)
    assert (
        "identity exact" in printed and "(chance 0.000694)" in printed and "prompt alignment" not in printed
    )
    with Image.open(out / "tradeoff.png") as plot:
        assert plot.format == "PNG" and plot.size == (640, 480)


@needs_judges
def test_eval_pair_binds_both_adapters_and_judges_each_subject_in_its_half(
    tiny_sd_path, tiny_adapter, tiny_pet_adapter, world_shards, tmp_path
):
    out = tmp_path / "eval"
    code = _judged_eval(
        tiny_sd_path,
        out,
        "--adapter", f"<person>={tiny_adapter}",
        "--adapter", f"<pet>={tiny_pet_adapter}",
        "--pair", "<person>,<pet>",
        "--prompts", str(_toy_prompts(tmp_path / "prompts.txt", "toyworld-pairs.txt")),
        "--subjects", f"<person>={world_shards['faces']}",
        "--subjects", f"<pet>={world_shards['pets']}",
        "--strengths", "1.0",
    )  # fmt: skip
    assert code == 0

    rows = _rows(out)
    per_token = [
        "identity_similarity_person", "identity_similarity_pet",
        "identity_exact_person", "identity_attributes_person", "identity_exact_pet", "identity_attributes_pet",
    ]  # fmt: skip
    assert set(per_token + list(JUDGE_COLUMNS)) <= set(rows[0])
    assert {r["token"] for r in rows} == {"<person>+<pet>"}
    faces = load_references(str(world_shards["faces"]), size=32, token="<person>")
    pets = load_references(str(world_shards["pets"]), size=32, token="<pet>")
    assert {r["subject"] for r in rows} == {f"{a.name}+{b.name}" for a, b in zip(faces, pets, strict=True)}
    assert len([r for r in rows if r["variant"] == "adapter"]) == 2 * 2  # pairs x prompts
    base = [r for r in rows if r["variant"] == "base"]
    assert len(base) == 2 * 2 and {r["clip_text"] for r in base} <= {
        caption("pair", c, ("person", "pet")) for c in contexts()
    }
    for row in rows:
        assert all(0.0 <= float(row[c]) <= 1.0 for c in [*JUDGE_COLUMNS, *per_token[2:]])
        both = float(row["identity_exact_person"]) * float(row["identity_exact_pet"])
        assert float(row["identity_exact"]) == both
        mean = (float(row["identity_attributes_person"]) + float(row["identity_attributes_pet"])) / 2
        assert float(row["identity_attributes"]) == pytest.approx(mean, abs=1e-5)
        mean = (float(row["identity_similarity_person"]) + float(row["identity_similarity_pet"])) / 2
        assert float(row["identity_similarity"]) == pytest.approx(mean, abs=1e-5)
        pet = [float(row[f"identity_attr_{a}_pet"]) for a in PetIdentity.ATTRIBUTES]  # each token's own
        assert float(row["identity_attributes_pet"]) == pytest.approx(sum(pet) / len(pet), abs=1e-5)
        assert "identity_attr_eye_colour_person" in row and "identity_attr_eye_colour" not in row

    summary = json.loads((out / "summary.json").read_text())
    assert summary["pair"] == ["<person>", "<pet>"]
    _check_point_means(summary["points"], rows, [*JUDGE_COLUMNS, *per_token])
    chance = summary["points"][0]["chance"]
    assert chance["identity_exact"] == pytest.approx(1 / 1440 / 432)
    assert chance["identity_exact_pet"] == pytest.approx(1 / 432)
    assert chance["identity_attr_species_pet"] == pytest.approx(1 / 2)
    assert all(p["chance"] == chance for p in summary["points"])


@pytest.fixture(scope="module")
def many_references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Reference]]:
    """12 held-out identities per domain, read back through load_references (labels from the shards)."""
    folder = tmp_path_factory.mktemp("many")
    references = {}
    for domain, token in (("faces", "<person>"), ("pets", "<pet>")):
        held_out = split_identities(domain)[1]
        chosen = held_out[:: len(held_out) // 12][:12]  # spread over the attribute values
        write_world_shards(folder / domain, domain, identities=chosen, samples_per_identity=1, seed=1)
        references[token] = load_references(str(folder / domain / "shards.json"), size=32, token=token)
    return references


@needs_judges
def test_judges_score_true_renders_highly_so_labels_prompts_and_halves_are_wired_right(many_references):
    """Renders of the true identity in each prompt's context, scored in place of generated images by the
    same functions as the sweep: high accuracy proves that labels, prompt parsing and halves line up."""
    from nested.toyworld.judges import ToyJudges  # only once the judges exist

    judges = ToyJudges.from_pretrained(JUDGES)
    faces, pets = many_references["<person>"], many_references["<pet>"]
    prompts = [p for _, p in read_prompts(PROMPTS / "toyworld-faces.txt", ["<person>"])["<person>"]]
    pair_prompts = [p for _, p in read_pair_prompts(PROMPTS / "toyworld-pairs.txt", ("<person>", "<pet>"))]

    def tensor(images) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1).float() / 255 for i in images])

    singles, pairs, swapped = [], [], []
    for i, (face, pet) in enumerate(zip(faces, pets, strict=True)):
        [subject] = judged_subjects({"<person>": [face]})[0]
        face_id = FaceIdentity.from_label(face.meta["identity"])
        images = tensor(render(face_id, parse_caption(p), seed=100 * i + k) for k, p in enumerate(prompts))
        singles += judge_images(judges, images, prompts, [subject])

        both = judged_subjects({"<person>": [face], "<pet>": [pet]})[0]
        assert [s.half for s in both] == ["left", "right"] and both[1].domain == "pets"
        pet_id = PetIdentity.from_label(pet.meta["identity"])
        images = tensor(
            render_pair(face_id, pet_id, parse_caption(p), seed=100 * i + k)
            for k, p in enumerate(pair_prompts)
        )
        pairs += judge_images(judges, images, pair_prompts, both)
        # Control: the same images with the halves swapped, each subject judged on the other's side.
        wrong = [type(s)(s.token, s.domain, s.label, h) for s, h in zip(both, ["right", "left"], strict=True)]
        swapped += judge_images(judges, images, pair_prompts, wrong)

    def mean(rows, column):
        return float(np.mean([row[column] for row in rows]))

    # The judges' own held-out accuracy on clean renders (measured by their trainer, when recorded):
    # miswired labels, prompts or halves would fall far below it, towards chance.
    measured = judges.config.get("accuracy", {}).get("clean", {})

    def floor(key: str, default: float) -> float:
        return max(default, measured.get(key, {}).get("attributes", 0.0) - 0.1)

    chance = judge_chance(both)
    assert len(singles) == len(pairs) == 12 * 24
    assert mean(singles, "context") >= 0.9 and mean(pairs, "context") >= 0.9
    assert mean(singles, "context_scene") >= 0.95 and mean(pairs, "context_scene") >= 0.95
    assert mean(singles, "identity_attributes") >= floor("faces_single", 0.55)  # chance 0.24
    assert mean(singles, "identity_exact") >= 20 * chance["identity_exact_person"]
    for token, key in (("person", "faces_pair"), ("pet", "pets_pair")):
        column = f"identity_attributes_{token}"
        assert mean(pairs, column) >= floor(key, 0.55) > chance[column] + 0.2
        assert mean(swapped, column) <= mean(pairs, column) - 0.2  # the control falls towards chance


def test_eval_with_judges_says_which_reference_has_no_label(tiny_adapter, tmp_path, capsys):
    prompts = _toy_prompts(tmp_path / "prompts.txt", "toyworld-faces.txt")
    code = main_eval(
        ["--base", "unused", "--adapter", f"<person>={tiny_adapter}", "--prompts", str(prompts),
         "--subjects", str(_subjects(tmp_path / "subjects")), "--judges", str(JUDGES), "--clip", "none",
         "--out", str(tmp_path / "out")]
    )  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert error.startswith("nested eval: error: --judges needs the true identity")
    assert "'alice'" in error and "no label" in error


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--judges": None}, "--clip none leaves nothing to plot"),
        ({"--judges": "missing-judges"}, "is not a folder"),
        ({"prompt": "a photo of <person> on the moon"}, "names no known scene"),
        ({"prompt": "a photo of <person>"}, "names no scene"),
        ({"--pair": "<person>,<pet>"}, "--pair '<person>,<pet>' evaluates exactly the adapters"),
        ({"--pair": "<person>"}, "--pair expects two different tokens"),
        ({"--token-weight": "<pet>=2"}, "'<pet>' has no --adapter"),
        ({"--token-weight": "<person>=0"}, "the weight must be > 0"),
    ],
)
def test_eval_judges_and_pair_mistakes_end_in_one_line(tiny_adapter, tmp_path, capsys, change, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(change.pop("prompt", "a sketch of <person> at night") + "\n")
    options = {"--judges": str(JUDGES), "--clip": "none", **change}
    argv = ["--base", "unused", "--adapter", f"<person>={tiny_adapter}", "--prompts", str(prompts),
            "--subjects", str(tmp_path), "--out", str(tmp_path / "out")]  # fmt: skip
    for option, value in options.items():
        argv += [option, value] if value is not None else []
    code = main_eval(argv)
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("nested eval: error:") and "\n" not in error
    assert message in error


def test_judged_subjects_take_the_label_and_domain_from_the_shard_metadata_and_say_what_is_wrong():
    label = FaceIdentity("tan", "ginger", "spiky", "azure", "oval").to_label()
    face = Reference("f", torch.zeros(3, 8, 8), {"identity": label, "domain": "faces"})
    pet = Reference(
        "p",
        torch.zeros(3, 8, 8),
        {"identity": PetIdentity("cat", "grey", "solid", "round", "jade").to_label()},
    )
    [[subject]] = judged_subjects({"<person>": [face]})
    assert (subject.domain, subject.label, subject.half) == ("faces", label, None)
    [[a, b]] = judged_subjects(
        {"<person>": [face], "<pet>": [pet]}, {"<pet>": "pets"}
    )  # pet: adapter's domain
    assert (a.half, b.half, b.domain) == ("left", "right", "pets")
    with pytest.raises(ValueError, match="no toy-world domain for <pet> reference 'p'"):
        judged_subjects({"<pet>": [pet]})
    with pytest.raises(ValueError, match="'f' is from the faces domain but its adapter is a pets adapter"):
        judged_subjects({"<pet>": [face]}, {"<pet>": "pets"})
    no_skin = {"identity": {k: v for k, v in label.items() if k != "skin"}, "domain": "faces"}
    with pytest.raises(ValueError, match="lacks skin of the faces domain"):
        judged_subjects({"<person>": [Reference("g", face.image, no_skin)]})
    with pytest.raises(ValueError, match="<person> reference 'x' has no label"):
        judged_subjects({"<person>": [Reference("x", face.image)]})


def test_pair_prompts_must_name_both_tokens(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of <person> and <pet> at night\na photo of <person> at night\n")
    with pytest.raises(ValueError, match=r"prompts.txt:2: .* does not name <pet>"):
        read_pair_prompts(prompts, ("<person>", "<pet>"))


@pytest.mark.parametrize(
    ("source", "domain", "token"),
    [("toyworld-faces.txt", "faces", "<person>"), ("toyworld-pets.txt", "pets", "<pet>"),
     ("toyworld-pairs.txt", "pair", ("<person>", "<pet>"))],
)  # fmt: skip
def test_toyworld_prompt_files_are_the_worlds_captions_of_every_context(source, domain, token):
    lines = [
        line for line in (PROMPTS / source).read_text().splitlines() if line and not line.startswith("#")
    ]
    assert lines == [caption(domain, context, token) for context in contexts()]
    assert [parse_caption(line) for line in lines] == contexts()

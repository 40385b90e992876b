"""Faces on real photos: detection, the subject rule, FFHQ-style alignment, face shards with same-identity
references, the face-identity metric in ``nested eval``, and the error when the ``nested[faces]`` extra is
missing.

The photos ship with installed packages: scikit-image's astronaut (Eileen Collins) and camera man (no
frontal face), matplotlib's Grace Hopper; augmented by rotation, crop, scale and brightness.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image, ImageEnhance, ImageOps
from skimage import data
from test_pipeline import tiny_pipeline, write_adapter

import nested
import nested.evaluation.sweep
from nested.cli.shards import main_shards
from nested.errors import DataError

SRC = Path(nested.__file__).resolve().parents[1]  # the nested under test, for subprocesses


def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def grace_hopper() -> Image.Image:
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        return image.convert("RGB")


def camera() -> Image.Image:
    return Image.fromarray(data.camera()).convert("RGB")


# Where Grace Hopper's face is in two_people().
HOPPER_BOX = (1150, 320, 1400, 560)


def two_people() -> Image.Image:
    """The astronaut and Grace Hopper side by side, their faces about the same size (180 and 190 px)."""
    canvas = Image.new("RGB", (1536, 1000), "gray")
    canvas.paste(astronaut().resize((1000, 1000), Image.Resampling.BICUBIC), (0, 0))
    canvas.paste(grace_hopper(), (1012, 200))
    return canvas


def rotated(image: Image.Image, degrees: float) -> Image.Image:
    return image.rotate(degrees, resample=Image.Resampling.BICUBIC)


def augmented(image: Image.Image) -> dict[str, Image.Image]:
    """The same person, changed: rotated both ways, cropped off-centre, half size on a gray canvas, darker,
    brighter."""
    width, height = image.size
    return {
        "rotated +15": rotated(image, 15),
        "rotated -15": rotated(image, -15),
        "cropped": image.crop((int(width * 0.15), int(height * 0.1), int(width * 0.95), int(height * 0.9))),
        "smaller": ImageOps.pad(image.resize((width // 2, height // 2)), (width, height), color="gray"),
        "darker": ImageEnhance.Brightness(image).enhance(0.6),
        "brighter": ImageEnhance.Brightness(image).enhance(1.4),
    }


def eye_errors(crop: Image.Image) -> np.ndarray:
    """How far (pixels) the eye centres found in an aligned crop are from ALIGNED_EYES: (2, 2) |dx|, |dy|."""
    from nested.data import faces

    face = faces.choose_subject(faces.detect_faces(crop))
    expected = np.asarray(faces.ALIGNED_EYES) * crop.width
    return np.abs(np.stack(face.eyes) - expected)


# ----------------------------------------------------------------------------- detection and alignment


@pytest.mark.faces
def test_the_subject_is_the_face_not_the_detection_on_her_suit_and_camera_has_none():
    from nested.data import faces

    found = faces.detect_faces(astronaut())
    assert len(found) == 2  # her face and a weak "face" on the suit, of about the same size
    subject = faces.choose_subject(found)
    assert subject.score == max(face.score for face in found)
    x0, y0, x1, y1 = subject.box
    assert x0 < 210 < x1 and y0 < 105 < y1  # her eyes are near (225, 103)
    with pytest.raises(faces.FaceRejected, match="no face found"):
        faces.choose_subject(faces.detect_faces(camera()))


@pytest.mark.faces
@pytest.mark.parametrize(
    "photo",
    [
        "astronaut",
        "astronaut rotated +15",
        "astronaut rotated -15",
        "grace hopper",
        "grace hopper rotated +15",
    ],
)
@pytest.mark.parametrize("size", [256, 512])
def test_the_eyes_of_an_aligned_crop_land_on_the_template(photo, size):
    from nested.data import faces

    image = grace_hopper() if photo.startswith("grace") else astronaut()
    if "rotated" in photo:
        image = rotated(image, float(photo.rsplit(" ", 1)[1]))
    crop = faces.align_face(image, faces.choose_subject(faces.detect_faces(image)), size)
    assert crop.size == (size, size)
    # Within a few pixels: dlib's landmarks are whole pixels, found again in the crop.
    assert eye_errors(crop).max() <= 4.0, eye_errors(crop)


@pytest.mark.faces
def test_two_faces_of_a_size_are_ambiguous_and_a_bbox_chooses_one():
    from nested.data import faces

    found = faces.detect_faces(two_people())
    with pytest.raises(faces.FaceRejected, match="2 faces of similar size"):
        faces.choose_subject(found)
    hopper = faces.choose_subject(found, hint=HOPPER_BOX)
    assert hopper.box[0] > 1000
    assert faces.choose_subject(found, ambiguous="largest").area == max(face.area for face in found)


# ----------------------------------------------------------------------------- identity


@pytest.mark.faces
def test_the_same_person_across_augmentations_is_closer_than_two_people_and_a_blank_scores_nothing():
    from nested.errors import DataError
    from nested.evaluation.metrics import FaceEmbedder, IdentitySimilarity, identity_embedder

    def tensor(image: Image.Image) -> torch.Tensor:
        square = ImageOps.fit(image, (512, 512), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.array(square)).permute(2, 0, 1)[None].float() / 255

    embedder = identity_embedder("face")
    assert isinstance(embedder, FaceEmbedder)
    metric = IdentitySimilarity(embedder)
    variants = augmented(astronaut())
    blank = torch.full((1, 3, 512, 512), 0.5)
    generated = [*(tensor(image) for image in variants.values()), tensor(grace_hopper()), blank, blank * 0]
    metric.update(torch.cat(generated), tensor(astronaut()))
    scores = metric.per_sample()
    same_person, other_person, blanks = scores[: len(variants)], scores[len(variants)], scores[-2:]
    assert same_person.min() > other_person, dict(zip(variants, same_person.tolist(), strict=True))
    assert blanks.tolist() == [0.0, 0.0]  # no face, no identity credit
    assert float(metric.detection_rate()) == pytest.approx((len(variants) + 1) / len(generated))

    with pytest.raises(DataError, match="reference 'camera': the identity embedder finds no face"):
        metric.check_references([tensor(astronaut())[0], tensor(camera())[0]], ["'astronaut'", "'camera'"])


# ----------------------------------------------------------------------------- shards


def _tar_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, extension = member.name.partition(".")
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def _photo_folder(folder: Path) -> Path:
    """Two people, three photos of the astronaut and two of Grace Hopper (one per identity folder), and
    the camera man, who shows no frontal face."""
    photos = {
        "collins/a.jpg": astronaut(),
        "collins/b.jpg": rotated(astronaut(), 15),
        "collins/c.jpg": augmented(astronaut())["cropped"],
        "hopper/a.jpg": grace_hopper(),
        "hopper/b.jpg": ImageEnhance.Brightness(grace_hopper()).enhance(0.7),
        "hopper/camera.png": camera(),
    }
    for name, image in photos.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        path.with_suffix(".txt").write_text("a photo of <person>")
    return folder


@pytest.mark.faces
def test_face_shards_align_references_from_other_photos_of_the_same_person(tmp_path):
    from nested.data import faces

    src = _photo_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    args = [str(src), str(out), "--domain", "faces", "--subject", "<person>", "--no-progress"]
    code = main_shards([*args, "--faces", "--face-size", "256", "--identity-folders", "--workers", "2"])
    assert code == 0

    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert rejected == [
        {"path": str(src / "hopper/camera.png"), "reason": "no face found (dlib's frontal face detector)"}
    ]
    samples = _tar_samples(out)
    metas = {json.loads(s["json"])["source"]: (key, json.loads(s["json"])) for key, s in samples.items()}
    assert set(metas) == {"collins/a.jpg", "collins/b.jpg", "collins/c.jpg", "hopper/a.jpg", "hopper/b.jpg"}
    # Never the target itself: the next photo of the same person, in source order, the last takes the first.
    references = {source: meta["reference"] for source, (_, meta) in metas.items()}
    assert references == {
        "collins/a.jpg": "collins/b.jpg",
        "collins/b.jpg": "collins/c.jpg",
        "collins/c.jpg": "collins/a.jpg",
        "hopper/a.jpg": "hopper/b.jpg",
        "hopper/b.jpg": "hopper/a.jpg",
    }
    assert {meta["identity"] for _, meta in metas.values()} == {"collins", "hopper"}

    own_crops = {}
    for source, (key, meta) in metas.items():
        target = Image.open(io.BytesIO(samples[key]["jpg"])).convert("RGB")
        box = meta["bbox"]
        face = faces.choose_subject(faces.detect_faces(target))
        assert np.allclose(box, face.box, atol=1.0)  # the detected subject's box, in target pixels
        own_crops[source] = faces.align_face(target, face, 256)
    for source, (key, _) in metas.items():
        reference = Image.open(io.BytesIO(samples[key]["ref.jpg"])).convert("RGB")
        assert reference.size == (256, 256)
        assert eye_errors(reference).max() <= 4.0
        lender = np.asarray(own_crops[references[source]], dtype=np.float64)  # the other photo's crop
        assert np.abs(np.asarray(reference, dtype=np.float64) - lender).mean() < 3.0  # JPEG only


@pytest.mark.faces
def test_a_manifest_bbox_chooses_between_two_faces_and_an_identity_column_pairs_photos(tmp_path):
    two_people().save(tmp_path / "both.jpg")
    grace_hopper().save(tmp_path / "hopper.jpg")
    rows = [
        {"image": "both.jpg", "caption": "<person> and a friend"},  # two faces alike: ambiguous
        {
            "image": "both.jpg",
            "caption": "<person> with a friend",
            "bbox": list(HOPPER_BOX),
            "identity": 7,
        },
        {"image": "hopper.jpg", "caption": "<person>", "identity": "7"},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    args = [str(manifest), str(out), "--domain", "faces", "--subject", "<person>", "--no-progress"]
    assert main_shards([*args, "--faces", "--face-size", "128", "--workers", "0"]) == 0

    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rejected] == [f"{manifest}:1"]
    assert rejected[0]["reason"].startswith("2 faces of similar size")
    metas = [json.loads(s["json"]) for s in _tar_samples(out).values()]
    chosen = next(meta for meta in metas if meta["source"] == "both.jpg")
    assert chosen["bbox"][0] > 1000  # Grace Hopper's face, on the right
    assert [meta["identity"] for meta in metas] == ["7", "7"]
    assert {meta["source"]: meta["reference"] for meta in metas} == {
        "both.jpg": "hopper.jpg",
        "hopper.jpg": "both.jpg",
    }


def _pets_by_identity_folders(tmp_path: Path, names: tuple[str, ...]) -> tuple[Path, Path]:
    """Random photos at ``names`` (under ``<identity>/``) with captions, made into shards by identity folders
    without faces; returns (source, out)."""
    src = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for name in names:
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(path)
        path.with_suffix(".txt").write_text("a photo of <pet>")
    out = tmp_path / "out"
    code = main_shards(
        [str(src), str(out), "--domain", "pets", "--subject", "<pet>", "--identity-folders", "--no-progress"]
    )
    assert code == 0
    return src, out


def test_identity_folders_without_faces_lend_the_other_photo_and_one_photo_keeps_its_own(tmp_path):
    src, out = _pets_by_identity_folders(tmp_path, ("rex/1.png", "rex/2.png", "tom/1.png", "loose.png"))
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rejected] == ["loose.png"]
    assert rejected[0]["reason"].startswith("not inside an identity folder")
    samples = {json.loads(s["json"])["source"]: s for s in _tar_samples(out).values()}
    assert samples["rex/1.png"]["ref.png"] == (src / "rex/2.png").read_bytes()
    assert samples["rex/2.png"]["ref.png"] == (src / "rex/1.png").read_bytes()
    assert samples["tom/1.png"]["ref.png"] == (src / "tom/1.png").read_bytes()  # the only photo of tom


def test_one_photo_in_two_formats_never_lends_itself_as_the_other_photo(tmp_path):
    _, out = _pets_by_identity_folders(
        tmp_path, ("max/a.png", "max/a.jpg", "max/b.png", "tom/1.png", "tom/1.jpg")
    )
    references = {
        json.loads(s["json"])["source"]: json.loads(s["json"])["reference"]
        for s in _tar_samples(out).values()
    }
    assert references == {
        "max/a.jpg": "max/b.png",
        "max/a.png": "max/b.png",
        "max/b.png": "max/a.jpg",
        "tom/1.jpg": "tom/1.jpg",  # one photo of tom, in two formats: each keeps its own
        "tom/1.png": "tom/1.png",
    }


# ----------------------------------------------------------------------------- nested eval


@pytest.mark.faces
def test_eval_with_the_face_embedder_gives_faceless_images_no_credit_and_names_a_faceless_reference(
    tiny_sd_path, tiny_adapter, tmp_path, capsys
):
    from nested.cli.eval import main_eval
    from nested.testing import write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip")
    subjects = tmp_path / "subjects"
    subjects.mkdir()
    astronaut().save(subjects / "collins.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\n")
    args = [
        "--base", str(tiny_sd_path), "--adapter", f"<person>={tiny_adapter}", "--prompts", str(prompts),
        "--strengths", "1.0", "--seeds", "0", "--clip", str(clip), "--steps", "2", "--height", "64",
        "--width", "64", "--identity-model", "face", "--no-progress",
    ]  # fmt: skip
    out = tmp_path / "eval"
    assert main_eval([*args, "--subjects", str(subjects), "--out", str(out)]) == 0
    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    # A tiny random model draws no face: every image is scored 0 and counted as not found.
    assert len(rows) == 2 and {r["face_detected"] for r in rows} == {"0.0"}
    assert {float(r["identity_similarity"]) for r in rows} == {0.0}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["identity_model"] == "face"
    assert [p["face_detected"] for p in summary["points"]] == [0.0, 0.0]
    assert "face-recognition embeddings" in summary["metrics"]["identity_similarity"]

    camera().save(subjects / "man.png")
    capsys.readouterr()
    assert main_eval([*args, "--subjects", str(subjects), "--out", str(tmp_path / "eval2")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("nested eval: error: reference man: the identity embedder")


# ----------------------------------------------------------------------------- without the extra

# Makes `import dlib` (and finding dlib's models) fail, as in an environment without nested[faces].
WITHOUT_DLIB = """
import sys
class NoFacesExtra:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("dlib", "_dlib_pybind11", "face_recognition_models"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoFacesExtra())
"""


def test_without_the_faces_extra_everything_imports_and_a_faces_feature_fails_in_one_line(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    astronaut().save(src / "a.jpg")
    (src / "a.txt").write_text("a photo of <person>")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    shards = [str(src), str(tmp_path / "out"), "--domain", "faces", "--subject", "<person>", "--faces"]
    script = (
        WITHOUT_DLIB
        + f"""
import nested, nested.data.shards, nested.data.faces, nested.evaluation.metrics, nested.evaluation.sweep
from nested.errors import MissingDependencyError
from nested.evaluation.metrics import identity_embedder
try:
    identity_embedder("face")
except MissingDependencyError as error:
    print("metric:", error)
from nested.cli import main
sys.exit(main(["shards", *{shards!r}]))
"""
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'nested[faces]'" in result.stdout  # the metric's error
    error = result.stderr.strip()
    assert "\n" not in error, error
    assert error.startswith("nested shards: error: face detection and face identity need dlib")
    assert error.endswith("pip install 'nested[faces]'")
    assert not (tmp_path / "out" / "shards.json").exists()


# ----------------------------------------------------------------------------- subject photos at inference


@pytest.mark.faces
def test_generate_align_face_gives_the_adapter_the_crop_nested_shards_would_have_written(
    tiny_sd_path, tiny_adapter, tmp_path, capsys
):
    """--align-face TOKEN: the photo goes through the same detection, choice and alignment as a training
    reference; the images equal those drawn from that crop given directly. A photo with no face, or with
    two of similar size, ends in one line."""
    from nested.cli.generate import main_generate
    from nested.data.faces import aligned_subject_face

    photo, crop = tmp_path / "collins.png", tmp_path / "collins-aligned.png"
    rotated(astronaut(), 10).save(photo)
    aligned_subject_face(rotated(astronaut(), 10)).save(crop)
    base = ["--base", str(tiny_sd_path), "--adapter", f"<person>={tiny_adapter}", "--prompt", "a photo of <person>",
            "--steps", "1", "--no-progress"]  # fmt: skip
    assert main_generate([*base, "--subject", f"<person>={photo}", "--align-face", "<person>",
                          "--out", str(tmp_path / "aligned")]) == 0  # fmt: skip
    assert main_generate([*base, "--subject", f"<person>={crop}", "--out", str(tmp_path / "crop")]) == 0
    assert main_generate([*base, "--subject", f"<person>={photo}", "--out", str(tmp_path / "whole")]) == 0
    image = (tmp_path / "aligned" / "image-000.png").read_bytes()
    assert image == (tmp_path / "crop" / "image-000.png").read_bytes()
    assert image != (tmp_path / "whole" / "image-000.png").read_bytes()
    settings = json.loads((tmp_path / "aligned" / "generation.json").read_text())
    assert settings["subjects"]["<person>"]["aligned_face"] is True
    assert (
        json.loads((tmp_path / "whole" / "generation.json").read_text())["subjects"]["<person>"][
            "aligned_face"
        ]
        is False
    )

    camera().save(tmp_path / "man.png")
    two_people().save(tmp_path / "two.png")
    capsys.readouterr()
    for name, reason in (("man.png", "no face found"), ("two.png", "2 faces of similar size")):
        argv = [*base, "--subject", f"<person>={tmp_path / name}", "--align-face", "<person>",
                "--out", str(tmp_path / f"out-{name}")]  # fmt: skip
        assert main_generate(argv) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"nested generate: error: --subject <person>={tmp_path / name}: {reason}"), (
            error
        )
        assert "leave out --align-face" in error and "\n" not in error
        assert not (tmp_path / f"out-{name}").exists()
    assert main_generate([*base, "--subject", f"<person>={photo}", "--align-face", "<dog>"]) == 2
    assert "--align-face '<dog>' has no --subject." in capsys.readouterr().err


@pytest.mark.faces
def test_aligned_subject_face_reads_a_photo_as_nested_shards_does(tmp_path):
    """A photo opened with PIL, as the README shows: turned upright by its EXIF tag, 16-bit and transparent
    pixels read as nested shards reads them (before, no face was found in the first two)."""
    from nested.data.faces import aligned_subject_face
    from nested.image_files import ExifTag, to_rgb

    sideways = grace_hopper().transpose(Image.Transpose.ROTATE_90)  # the bytes a camera held sideways writes
    exif = Image.Exif()
    exif[ExifTag.Orientation] = 6  # turn 90 degrees clockwise to show it
    sideways.save(tmp_path / "exif.jpg", exif=exif, quality=100)
    deep = np.asarray(grace_hopper().convert("L"), dtype=np.uint16) * 257
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit grayscale
    clear = astronaut().convert("RGBA")
    clear.putalpha(255)
    clear.save(tmp_path / "clear.png")
    with Image.open(tmp_path / "exif.jpg") as photo:
        assert (
            aligned_subject_face(photo).tobytes()
            == aligned_subject_face(ImageOps.exif_transpose(photo)).tobytes()
        )
    with Image.open(tmp_path / "deep.png") as photo:
        assert (
            photo.mode.startswith("I")
            and aligned_subject_face(photo).tobytes() == aligned_subject_face(to_rgb(photo)).tobytes()
        )
    with Image.open(tmp_path / "clear.png") as photo:
        assert aligned_subject_face(photo).tobytes() == aligned_subject_face(astronaut()).tobytes()


@pytest.mark.faces
def test_eval_align_face_references_are_aligned_face_crops_and_shards_are_refused(
    tiny_adapter, tmp_path, capsys
):
    from nested.cli.eval import main_eval
    from nested.data.faces import aligned_subject_face
    from nested.errors import DataError
    from nested.evaluation.images import load_references
    from nested.inference.subjects import load_image

    folder = tmp_path / "subjects"
    folder.mkdir()
    astronaut().save(folder / "collins.png")
    grace_hopper().save(folder / "hopper.png")
    references = load_references(folder, size=96, align_faces=True)
    assert [r.name for r in references] == ["collins", "hopper"]
    for reference, photo in zip(references, (astronaut(), grace_hopper()), strict=True):
        assert torch.equal(reference.image, load_image(aligned_subject_face(photo, 96))[0])
    plain = load_references(folder, size=96)
    assert not torch.equal(plain[0].image, references[0].image)

    camera().save(folder / "man.png")
    with pytest.raises(DataError, match=r"man\.png: no face found .* leave out --align-face\.$"):
        load_references(folder, size=96, align_faces=True)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\n")
    argv = ["--base", "unused", "--adapter", f"<person>={tiny_adapter}", "--prompts", str(prompts),
            "--subjects", "held_out/shards.json", "--align-face", "<person>", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main_eval(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "nested eval: error: --align-face '<person>': its --subjects held_out/shards.json are shards, which hold "
        "the references nested shards prepared (--faces aligns them); use --align-face with a folder of photos."
    )


def _noise(path, seed):
    pixels = (torch.rand(48, 40, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path


@pytest.mark.faces
def test_generate_aligns_only_the_subjects_named_by_align_face(tiny_sd_path, tiny_adapter, tmp_path):
    """--align-face <person> beside a <dog> subject: the dog photo (no face) is given whole, and
    generation.json says which subject was aligned."""
    from nested.cli.generate import main_generate

    pets = write_adapter(tiny_pipeline(tiny_sd_path).unet, tmp_path / "pets", tiny_sd_path / "image_encoder",
                         "<dog>", "dog", 2, domain="pets")  # fmt: skip
    astronaut().save(tmp_path / "collins.png")
    argv = ["--base", str(tiny_sd_path), "--adapter", f"<person>={tiny_adapter}", "--adapter", f"<dog>={pets}",
            "--subject", f"<person>={tmp_path / 'collins.png'}", "--subject", f"<dog>={_noise(tmp_path / 'rex.png', 2)}",
            "--align-face", "<person>", "--prompt", "a <person> with a <dog>", "--steps", "1", "--no-progress",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main_generate(argv) == 0
    subjects = json.loads((tmp_path / "out" / "generation.json").read_text())["subjects"]
    assert subjects["<person>"]["aligned_face"] is True and subjects["<dog>"]["aligned_face"] is False


@pytest.mark.faces
def test_eval_aligns_the_references_of_the_align_face_tokens_only(
    tiny_sd_path, tiny_adapter, tmp_path, monkeypatch, capsys
):
    """Each --align-face token's references are aligned, the others' are not; an unknown token is one line."""
    from nested.cli.eval import main_eval

    pets = write_adapter(tiny_pipeline(tiny_sd_path).unet, tmp_path / "pets", tiny_sd_path / "image_encoder",
                         "<dog>", "dog", 2, domain="pets")  # fmt: skip
    for name in ("people", "dogs"):
        (tmp_path / name).mkdir()
    astronaut().save(tmp_path / "people" / "collins.png")
    _noise(tmp_path / "dogs" / "rex.png", 2)
    calls = {}

    def load_references(source, *, token, align_faces=False, **kwargs):
        calls[token] = align_faces
        if len(calls) == 2:
            raise DataError("stopped here by the test")
        return []

    monkeypatch.setattr(nested.evaluation.sweep, "load_references", load_references)  # records, then stops
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\n")
    base = ["--base", str(tiny_sd_path), "--adapter", f"<person>={tiny_adapter}", "--adapter", f"<dog>={pets}",
            "--prompts", str(prompts), "--subjects", f"<person>={tmp_path / 'people'}",
            "--subjects", f"<dog>={tmp_path / 'dogs'}", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main_eval([*base, "--align-face", "<person>"]) == 2
    assert "stopped here by the test" in capsys.readouterr().err
    assert calls == {"<person>": True, "<dog>": False}

    assert main_eval([*base, "--align-face", "<cat>"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("nested eval: error: --align-face '<cat>' is not a token of --adapter")
        and "\n" not in err
    )


def test_load_references_refuses_to_align_the_references_of_shards():
    from nested.evaluation.images import load_references

    with pytest.raises(ValueError, match="shards hold their prepared references"):
        load_references("held_out/shards.json", align_faces=True)


def test_a_face_domain_card_gives_the_align_face_advice(tiny_adapter, tmp_path):
    """A domain named "face" is a faces domain too."""
    from nested.hub.model_card import model_card

    adapter = shutil.copytree(tiny_adapter, tmp_path / "face")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "domain": "face"}))
    assert "--align-face '<person>'" in model_card(adapter)

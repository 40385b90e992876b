"""The procedural toy world: determinism, labels, splits, captions, contexts and shards."""

from __future__ import annotations

import importlib.util
import json
import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from nested.data import DomainSpec, build_stream
from nested.toyworld.world import (
    DEFAULT_TOKENS,
    DOMAINS,
    SCENES,
    STYLES,
    WORLD_VERSION,
    Context,
    FaceIdentity,
    PetIdentity,
    caption,
    contexts,
    identities,
    identity_class,
    parse_caption,
    png_bytes,
    render,
    render_pair,
    split_identities,
    write_world_shards,
)

REPO = Path(__file__).resolve().parents[1]
FACE = FaceIdentity("tan", "ginger", "spiky", "azure", "oval")
PET = PetIdentity("cat", "grey", "stripes", "pointy", "amber")


def _attribute_words() -> set[str]:
    return {v for d in DOMAINS for values in identity_class(d).ATTRIBUTES.values() for v in values}


def test_identity_counts_and_fixed_order() -> None:
    faces, pets = identities("faces"), identities("pets")
    assert len(faces) == 1440 and len(set(faces)) == 1440
    assert len(pets) == 432 and len(set(pets)) == 432
    assert identities("faces") == faces
    with pytest.raises(ValueError, match="unknown domain"):
        identities("cars")
    with pytest.raises(ValueError, match="hair_colour"):
        FaceIdentity("tan", "purple", "spiky", "azure", "oval")


@pytest.mark.parametrize("domain", DOMAINS)
def test_labels_round_trip_for_every_attribute(domain: str) -> None:
    cls = identity_class(domain)
    everyone = identities(domain)
    for ident in everyone:
        label = json.loads(json.dumps(ident.to_label()))
        assert cls.from_label(label) == ident
        assert cls.from_indices(ident.indices()) == ident
    for name, values in cls.ATTRIBUTES.items():  # every value of every attribute occurs, index = position
        seen = {(getattr(i, name), i.indices()[name]) for i in everyone}
        assert seen == {(v, k) for k, v in enumerate(values)}
    for context in [*contexts(), Context("plain")]:
        assert Context.from_label(json.loads(json.dumps(context.to_label()))) == context


@pytest.mark.parametrize("domain", DOMAINS)
def test_split_is_deterministic_disjoint_and_complete(domain: str) -> None:
    train, held = split_identities(domain, 0.2, seed=0)
    assert (train, held) == split_identities(domain, 0.2, seed=0)
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(identities(domain))
    assert len(held) == round(0.2 * len(identities(domain)))
    assert split_identities(domain, 0.2, seed=1)[1] != held
    for name, values in identity_class(domain).ATTRIBUTES.items():  # held-out values all seen in training
        assert {getattr(i, name) for i in train} == set(values)


def test_render_is_deterministic_per_seed_and_varies_across_seeds() -> None:
    context = Context("beach")
    for ident in (FACE, PET):
        first = png_bytes(render(ident, context, seed=3))
        assert first == png_bytes(render(ident, context, seed=3))
        assert first != png_bytes(render(ident, context, seed=4))
        assert (
            render(ident, context, seed=3).size == (64, 64) and render(ident, context, seed=3).mode == "RGB"
        )
    pair = png_bytes(render_pair(FACE, PET, Context("city"), seed=2))
    assert pair == png_bytes(render_pair(FACE, PET, Context("city"), seed=2))
    assert pair != png_bytes(render_pair(FACE, PET, Context("city"), seed=5))
    assert render(FACE, context, seed=1, size=32).size == (32, 32)


@pytest.mark.parametrize("domain", DOMAINS)
def test_identities_differ_under_the_same_nuisance(domain: str) -> None:
    everyone = identities(domain)
    cls = identity_class(domain)
    for base in everyone[:: len(everyone) // 5]:
        a = np.asarray(render(base, Context("plain"), seed=7), dtype=np.int16)
        for name, values in cls.ATTRIBUTES.items():  # changing any single attribute changes the image
            for value in values:
                other = cls.from_label({**base.to_label(), name: value})
                if other != base:
                    b = np.asarray(render(other, Context("plain"), seed=7), dtype=np.int16)
                    assert np.abs(a - b).max() > 40, (base, name, value)
    blobs = {png_bytes(render(i, Context("red"), seed=11)) for i in everyone[::7]}
    assert len(blobs) == len(everyone[::7])


def test_captions_never_name_identity() -> None:
    attribute_words = _attribute_words()
    caption_words: set[str] = set()
    for context in [*contexts(), Context("plain")]:
        texts = [
            caption("faces", context),
            caption("pets", context),
            caption("pair", context),
            caption("faces", context, "<person>"),
            caption("pair", context, ("<person>", "<pet>")),
        ]
        for text in texts:
            caption_words |= set(re.findall(r"[a-z]+", text))
    assert not caption_words & attribute_words  # includes the species words "cat" / "dog"
    assert caption("faces", Context("beach")) == "a photo of a person at the beach"
    assert caption("pets", Context("snow", "sketch")) == "a sketch of a pet in the snow"
    assert caption("faces", Context("beach"), "<person>") == "a photo of a <person> at the beach"
    assert caption("pair", Context("city")) == "a photo of a person and a pet in the city"
    assert caption("pair", Context("city"), ("<p>", "<q>")) == "a photo of a <p> and a <q> in the city"
    assert caption("faces", Context("plain")) == "a photo of a person"
    with pytest.raises(ValueError):
        caption("pair", Context("city"), "<person>")


def test_parse_caption_inverts_caption_for_every_context_domain_and_pair() -> None:
    for context in [*contexts(), Context("plain")]:
        texts = [
            caption("faces", context),
            caption("pets", context),
            caption("pair", context),
            caption("faces", context, "<person>"),
            caption("pets", context, "<pet>"),
            caption("pair", context, ("<person>", "<pet>")),
            caption("faces", context, "person"),  # nested eval's base rows: the token -> its class word
        ]
        for text in texts:
            assert parse_caption(text) == context, text
            assert parse_caption(f"  {text.replace(' ', '  ')} ") == context  # spacing does not matter
    for text in (
        "a photo of <person> on the moon",
        "a photo of <person> at the beach today",
        "a drawing of a pet",
    ):
        with pytest.raises(ValueError, match=re.escape(repr(text))):
            parse_caption(text)


def test_contexts_are_distinguishable() -> None:
    border = np.ones((64, 64), dtype=bool)
    border[6:58, 6:58] = False  # mostly background: the subject is centred
    for style in STYLES:
        means = {
            scene: np.asarray(render(FACE, Context(scene, style), seed=5), dtype=np.float64)[border].mean(0)
            for scene in SCENES
        }
        for a, b in combinations(SCENES, 2):
            assert np.linalg.norm(means[a] - means[b]) > 8, (style, a, b)
    photo = np.asarray(render(PET, Context("grass"), seed=5), dtype=np.int16)
    for style in STYLES[1:]:
        styled = np.asarray(render(PET, Context("grass", style), seed=5), dtype=np.int16)
        assert np.abs(styled - photo).mean() > 5, style


@pytest.mark.parametrize("domain", DOMAINS)
def test_shards_read_back_through_build_stream(
    tmp_path: Path, domain: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    train, _ = split_identities(domain)
    chosen = train[:6]
    out = tmp_path / domain
    report = write_world_shards(
        out, domain, identities=chosen, samples_per_identity=2, seed=0, token=None, maxcount=5
    )
    token = DEFAULT_TOKENS[domain]
    index = json.loads((out / "shards.json").read_text())
    assert index["total_samples"] == report.total_samples == 12 and len(index["shards"]) == 3
    assert index["subject"] == token and all(len(s["sha256"]) == 64 for s in index["shards"])

    again = write_world_shards(
        tmp_path / "again", domain, identities=chosen, samples_per_identity=2, seed=0, token=None, maxcount=5
    )
    assert [s["sha256"] for s in again.shards] == [s["sha256"] for s in report.shards]

    raw = list(wds.WebDataset(str(out / f"{domain}-{{000000..000002}}.tar"), shardshuffle=False))
    assert len(raw) == 12
    cls = identity_class(domain)
    expected_refs = {}
    for sample in raw:
        meta = json.loads(sample["json"])
        ident = cls.from_label(meta["identity"])
        assert ident in chosen and meta["domain"] == domain and meta["subject"] == token
        context = Context.from_label(meta["context"])
        assert meta["caption"] == caption(domain, context, token)
        assert sample["png"] == png_bytes(render(ident, context, seed=meta["seed"]))
        assert sample["ref.png"] == png_bytes(render(ident, Context("plain"), seed=meta["ref_seed"]))
        assert meta["seed"] != meta["ref_seed"]
        expected_refs[sample["__key__"]] = (meta["caption"], sample["ref.png"])
    assert len({ref for _, ref in expected_refs.values()}) == 12  # a fresh reference render per sample

    spec = DomainSpec(domain, str(out / "shards.json"), token, reference="ref", caption_rule="drop")
    samples = list(build_stream([spec], train=False, resolution=64, reference_size=64))
    assert sorted(s["key"] for s in samples) == sorted(expected_refs)
    for s in samples:
        assert s["caption"] == expected_refs[s["key"]][0]
        assert tuple(s["pixel_values"].shape) == (3, 64, 64)
        assert s["reference"].shape[-2:] == (64, 64)
        assert sum(s["skipped"].values()) == 0


def _make_world_script():
    spec = importlib.util.spec_from_file_location(
        "make_world", REPO / "scripts" / "toyworld" / "make_world.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_world_skip_if_current_keeps_current_shards_and_renders_stale_ones(
    tmp_path: Path, capsys
) -> None:
    make_world = _make_world_script()
    args = [
        "--out",
        str(tmp_path),
        "--domains",
        "pets",
        "--train-identities",
        "3",
        "--held-out-identities",
        "2",
    ]
    assert make_world.main([*args, "--skip-if-current"]) == 0
    train = tmp_path / "pets" / "train"
    recipe = json.loads((train / "world.json").read_text())
    assert recipe["world_version"] == WORLD_VERSION and recipe["identities"] == 3
    first = (train / "shards.json").read_text()
    capsys.readouterr()

    assert make_world.main([*args, "--skip-if-current"]) == 0
    assert capsys.readouterr().out.count("up to date") == 2  # both splits kept
    assert (train / "shards.json").read_text() == first

    # Other arguments, or shards from before the recipe was recorded (no world.json): rendered again.
    assert make_world.main([*args, "--samples-per-identity", "2", "--skip-if-current"]) == 0
    assert json.loads((train / "shards.json").read_text())["total_samples"] == 6
    (train / "world.json").unlink()
    assert make_world.main([*args, "--skip-if-current"]) == 0
    assert "pets/train: up to date" not in capsys.readouterr().out
    assert json.loads((train / "shards.json").read_text())["total_samples"] == 3

    # Without --skip-if-current or --overwrite, existing shards are never replaced.
    assert make_world.main(args) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert (train / "world.json").is_file()

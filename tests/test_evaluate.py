"""``nested eval``: the per-image CSV, the summary's points, the grid and the trade-off plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nested.adapter import NestedAdapter
from nested.backbone import DiffusionBackbone
from nested.encoder import EncoderSpec
from nested.evaluate import main_eval
from nested.testing import write_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def tiny_adapter(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained <person> adapter for the tiny SD pipeline, saved like a trained one."""
    backbone = DiffusionBackbone.from_pretrained(tiny_sd_path)
    spec = EncoderSpec(backbone=str(tiny_sd_path / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2)
    torch.manual_seed(0)
    adapter = NestedAdapter.for_unet(
        backbone.unet, token="<person>", class_word="person", encoder=spec, base_model=str(tiny_sd_path)
    )
    adapter.add_tokens(backbone.tokenizers, backbone.text_encoders)
    return adapter.save_pretrained(tmp_path_factory.mktemp("adapters") / "person")


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
    with Image.open(out / "grid.png") as grid:  # 4 rows (subject x prompt) x (reference, base, 2 strengths)
        assert grid.size == (4 * 32 + 5 * 2, 4 * 32 + 5 * 2)


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

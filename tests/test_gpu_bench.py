"""benchmarks/gpu/bench.py in its smoke mode: every section runs on tiny models and reports its figures
(compiled_training only when named)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_smoke(out: Path, *arguments: str) -> dict:
    """The sections ``bench.py --smoke`` measured into ``out``; no section may have failed."""
    return run_report(out, *arguments)["sections"]


def run_report(out: Path, *arguments: str) -> dict:
    """Everything ``bench.py --smoke`` wrote to ``out/gpu.json``; no section may have failed."""
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu/bench.py", "--smoke", "--out", str(out), *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = json.loads((out / "gpu.json").read_text())
    assert report["errors"] == {}, report["errors"]
    assert done.returncode == 0, done.stderr[-3000:]
    return report


def test_the_gpu_benchmark_runs_every_default_section_in_smoke_mode(tmp_path):
    sections = run_smoke(tmp_path)
    assert " ".join(sections) == "environment tests accuracy inference training loader compile"

    tests = sections["tests"]
    on_gpu = torch.cuda.is_available()
    assert tests["counts"]["passed" if on_gpu else "skipped"] == len(tests["cases"]) > 0
    assert all(row["error_ratio"] < 4 and row["unbound_row_exact"] for row in sections["accuracy"]["rows"])

    for row in sections["inference"]["batches"].values():
        assert row["checks"]["nested_differs_from_plain"] and row["checks"]["finite"]
        assert row["nested/plain"] > 0 and row["nested/ip16"] > 0
    assert sections["inference"]["batches"]["2"]["checks"]["unbound_row_equals_plain"]

    rows = sections["training"]["rows"]
    # nested: 2 checkpointing settings x 2 batches + 2 VAE rows; decoupled: 2 x 2
    assert [r["injection"] for r in rows].count("nested") == 6 and len(rows) == 10
    assert all(r["step/frozen"] > 0 for r in rows if r["injection"] == "nested" and r["inputs"] == "latents")

    assert sections["compile"]["fullgraph"] and sections["compile"]["graph_breaks_in_nested"] == 0
    assert not sections["compile"]["recompiled_on_rebinding"]
    assert sections["loader"]["workers_needed"] >= 1

    table = (tmp_path / "gpu.md").read_text()
    assert "## Targets" in table and "graph breaks in the nested processor" in table


def test_the_compiled_training_section_runs_when_named(tmp_path):
    """Not in a default run (it compiles the UNet's forward and backward twice): named, it times the
    step with model.compile against the compiled frozen UNet, each in one graph that timing reuses."""
    row = run_smoke(tmp_path, "--sections", "compiled_training")["compiled_training"]
    assert row["graphs"] == 2 and not row["recompiled_while_timing"]  # nested, then frozen (no subject)
    assert row["step/frozen_compiled"] > 0 and row["step/frozen_eager"] > 0
    assert "both compiled" in (tmp_path / "gpu.md").read_text()


def test_the_dit_sections_run_the_transformer_benchmark_in_the_order_named(tmp_path):
    sections = run_smoke(tmp_path, "--sections", "dit", "dit_quantized", "environment")
    assert list(sections) == ["dit", "dit_quantized", "environment"]
    dit, quantized = sections["dit"], sections["dit_quantized"]
    assert list(dit["architectures"]) == ["FLUX.1-dev", "SD3.5-Large", "SD3.5-Medium"]
    assert dit["setup"]["gradient_checkpointing"] and dit["errors"] == {}
    assert list(quantized["architectures"]) == ["FLUX.1-dev"] and quantized["errors"] == {}
    assert quantized["setup"]["quantize"] == "int8" and dit["setup"]["quantize"] is None
    assert (quantized["setup"]["optimizer"], dit["setup"]["optimizer"]) == ("adamw8bit", "adamw")
    for row in [*dit["architectures"].values(), *quantized["architectures"].values()]:
        assert all(row["inference"]["checks"].values()) and row["training"]["nested/frozen"] > 0
    dense_gib, int8_gib = (
        section["architectures"]["FLUX.1-dev"]["weights_gib"] for section in (dit, quantized)
    )
    assert 0.25 < int8_gib / dense_gib < 0.75  # float32 smoke models: a quarter for the linear weights
    assert sections["environment"]["torchao"]
    table = (tmp_path / "gpu.md").read_text()
    assert "## Diffusion transformers" in table and "| FLUX.1-dev | 8 |" in table
    assert "## FLUX.1-dev with its transformer in int8 and AdamW8bit" in table
    assert "linear weights in int8, torchao's AdamW8bit" in table


def test_a_budget_skips_the_sections_that_do_not_fit_and_says_so(tmp_path):
    report = run_report(tmp_path, "--budget", "0", "--sections", "environment", "accuracy")
    assert report["sections"] == {} and list(report["skipped"]) == ["environment", "accuracy"]
    assert "0 s of the 0 s budget left" in report["skipped"]["accuracy"]
    assert "## Skipped (over the --budget)" in (tmp_path / "gpu.md").read_text()


def test_compile_regional_compiles_blocks_in_the_compile_and_compiled_training_sections(tmp_path):
    sections = run_smoke(tmp_path, "--sections", "compile", "compiled_training", "--compile-regional")
    compiled = sections["compile"]
    # one block per nested (attn2) layer, compiled alone; no graph break in any
    assert compiled["regional"] and compiled["compiled_blocks"] == compiled["nested_layers"] > 1
    assert compiled["fullgraph"] and compiled["graph_breaks_in_nested"] == 0
    assert not compiled["recompiled_on_rebinding"] and compiled["compiled_nested/compiled_plain"] > 0
    training = sections["compiled_training"]
    assert training["regional"] and not training["recompiled_while_timing"]
    table = (tmp_path / "gpu.md").read_text()
    assert "nested / plain, both compiled (each block compiled), guided batch 2" in table
    assert "checkpointing on, backend eager, each block compiled)" in table


def test_the_budget_starts_a_section_only_if_its_expected_time_fits_in_what_is_left(tmp_path, monkeypatch):
    """Report.run against a 100 s budget, a section's expected time given: 50 s and 90 s fit (nothing has
    run long yet), 101 s does not; what ran and what was skipped are both in gpu.json."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks" / "gpu"))
    import bench

    args = bench.parse_args(["--smoke", "--out", str(tmp_path), "--budget", "100"])
    report = bench.Report(tmp_path, args)
    ran = []
    for name, expected in (("first", 50.0), ("too_long", 101.0), ("last", 90.0)):
        report.run(name, lambda name=name: ran.append(name) or {"figure": 1}, expected)
    assert ran == ["first", "last"]
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert list(saved["sections"]) == ["first", "last"]
    assert saved["skipped"]["too_long"].startswith("expected 101 s, 100 s of the 100 s budget left")


def test_the_lease_scripts_answer_help_without_running_anything():
    for script, words in (
        ("device.sh", "The one command of a GPU lease"),
        ("wheels.sh", "fetch into .whl/"),
        ("rehearse.sh", "the lease's software on this CPU"),
    ):
        done = subprocess.run(
            ["bash", f"benchmarks/gpu/{script}", "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0 and words in done.stdout and not done.stdout.startswith("#")


def test_the_rehearsal_refuses_to_start_without_what_it_needs_and_builds_nothing(tmp_path):
    """Without the carried wheels, or without a Python 3.12, one line names the fix and nothing is built."""
    done = subprocess.run(
        ["bash", "benchmarks/gpu/rehearse.sh", "smoke"],
        cwd=REPO,
        env={**os.environ, "PYTHON": "false", "VENV": str(tmp_path / "venv")},  # `false`: no Python at all
        capture_output=True,
        text=True,
        check=False,
    )
    wheels = any((REPO / ".whl").glob("*.whl"))  # wheels.sh ran here; a clean clone has none
    expected = "false is not a Python 3.12" if wheels else "no wheels in .whl/; run benchmarks/gpu/wheels.sh"
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "venv").exists()

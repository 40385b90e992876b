"""benchmarks/dit_step.py in its smoke mode: every architecture and variant runs and reports its ratios."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *arguments: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``python benchmarks/<script> ... --json FILE`` in a temporary folder: the finished process (it must
    have succeeded) and the JSON it wrote."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "results.json"
        done = subprocess.run(
            [sys.executable, f"benchmarks/{script}", *arguments, "--json", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done, json.loads(out.read_text())


def test_the_transformer_step_benchmark_runs_every_variant_in_smoke_mode():
    done, results = run_benchmark("dit_step.py", "--smoke", "--device", "cpu")
    rows = results["architectures"]
    assert list(rows) == ["FLUX.1-dev", "SD3.5-Large", "SD3.5-Medium"]
    # 2 double- + 2 single-stream blocks; 2 joint blocks each
    assert [row["blocks"] for row in rows.values()] == [4, 2, 2]
    for name, row in rows.items():
        inference = row["inference"]
        assert all(inference["checks"].values()), (name, inference["checks"])
        assert inference["nested/plain"] > 0 and inference["nested_recomputed/plain"] > 0
        assert row["training"]["nested/frozen"] > 0
    flux = rows["FLUX.1-dev"]["inference"]
    assert flux["checks"]["ip_differs_from_plain"] and flux["nested/ip"] > 0
    assert "ip/plain" not in rows["SD3.5-Large"]["inference"]
    assert "| FLUX.1-dev | 8 |" in done.stdout


def test_an_architecture_that_fails_keeps_its_figures_so_far_and_the_next_one_runs(monkeypatch):
    """An out-of-memory training step on one transformer (a GPU lease's likely failure) is recorded with
    its traceback; that architecture's inference figures stay, the next architectures are measured, and
    the figures are handed on after each architecture (what a run cut off at its time limit keeps)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import dit_step

    measured_training = dit_step.training

    def training(bench, args):
        if bench.is_flux:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return measured_training(bench, args)

    monkeypatch.setattr(dit_step, "training", training)
    snapshots = []
    args = dit_step.parse_args(["--smoke", "--device", "cpu", "--architectures", "FLUX.1-dev", "SD3.5-Large"])
    results = dit_step.run(args, lambda partial: snapshots.append(json.loads(json.dumps(partial))))

    assert [list(s["architectures"]) for s in snapshots] == [["FLUX.1-dev"], ["FLUX.1-dev", "SD3.5-Large"]]
    assert list(snapshots[0]["errors"]) == ["FLUX.1-dev"]
    assert "OutOfMemoryError" in results["errors"]["FLUX.1-dev"]
    flux, sd3 = results["architectures"]["FLUX.1-dev"], results["architectures"]["SD3.5-Large"]
    assert "training" not in flux and flux["inference"]["nested/plain"] > 0
    assert sd3["training"]["nested/frozen"] > 0 and "SD3.5-Large" not in results["errors"]
    assert "FLUX.1-dev failed: torch.OutOfMemoryError: CUDA out of memory" in dit_step.markdown(results)

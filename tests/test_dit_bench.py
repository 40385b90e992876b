"""benchmarks/dit_step.py in its smoke mode: every architecture and variant runs and reports its ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_transformer_step_benchmark_runs_every_variant_in_smoke_mode(tmp_path):
    out = tmp_path / "dit.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/dit_step.py", "--smoke", "--device", "cpu", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
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

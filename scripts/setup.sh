#!/usr/bin/env bash
# Create .venv and install nested with pinned dependencies (CPU torch; no GPU needed).
# Usage: bash scripts/setup.sh        (idempotent: re-running only installs what is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch first: PyPI's Linux torch is a multi-GB CUDA build. The CPU build comes from a local wheelhouse
# (pip's find-links: offline machines, CI) if it has one, else from PyTorch's CPU index, beside the configured
# index (its 2.13.0+cpu ranks above PyPI's 2.13.0). A wheelhouse may hold torch without its dependencies, so
# torch alone comes from there (--no-deps) and the install below takes its dependencies from the index.
# A torch 2.13.0 already in .venv (users with GPUs install the build for their CUDA first) is kept: the
# constraints below accept any 2.13.0 build.
if ! .venv/bin/python -m pip install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
fi
# faces: dlib and its models (face detection, alignment, face identity), prebuilt wheels: no compiler.
# quantize: torchao, for the frozen models in 8 bits (model.quantize).
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,faces,quantize]"
echo "nested installed in .venv ($(.venv/bin/python -c 'import nested; print(nested.__version__)'))"

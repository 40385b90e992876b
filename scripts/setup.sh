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
# Pin torch first: an unpinned torch pulls a multi-GB CUDA build. Users with GPUs install the
# torch build for their CUDA first; the constraints below accept any 2.13.0 build.
.venv/bin/python -m pip install -q "torch==2.13.0"
# faces: dlib and its models (face detection, alignment, face identity), prebuilt wheels: no compiler.
# quantize: torchao, for the frozen models in 8 bits (model.quantize).
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,faces,quantize]"
echo "nested installed in .venv ($(.venv/bin/python -c 'import nested; print(nested.__version__)'))"

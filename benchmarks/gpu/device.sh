#!/usr/bin/env bash
# The one command of a GPU lease, run THERE from the repository root (the device tool's `run`, with
# `carry: [".whl"]` after benchmarks/gpu/wheels.sh ran here). It installs the carried wheels, then runs
# every GPU check by priority within BUDGET seconds (default 540: a 600 s command limit, with room for the
# last section to overrun its estimate), writing gpu.json, gpu.md and log.txt into OUT. Extra arguments go
# to bench.py and replace all the defaults below, e.g. the second command of a lease:
#   BUDGET=200 benchmarks/gpu/device.sh --sections environment dit_quantized compiled_training loader --compile-regional
set -uo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'  # the comment above
  exit 0
fi
OUT=${OUT:-runs/gpu}
BUDGET=${BUDGET:-540}
mkdir -p "${OUT}"
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${site}" \
    .whl/*.whl || exit 2
  export PYTHONPATH="${site}"
fi
export PYTHONPATH="${PWD}/src${PYTHONPATH:+:${PYTHONPATH}}" PYTHONUNBUFFERED=1
# transformers imports torchao whenever it is installed: a torchao whose kernels cannot load into this torch
# would end every section, so it goes, and only what needs it (model.quantize) fails.
if [ -n "${site:-}" ] && compgen -G "${site}/torchao" >/dev/null && ! python3 -c "import torchao" >/dev/null 2>&1; then
  echo "device.sh: torchao does not import with this torch; removed (model.quantize is not measured)" \
    | tee "${OUT}/torchao.txt"
  rm -rf "${site}"/torchao*
fi
if [ $# -eq 0 ]; then
  # By priority: the transformer figures, the SDXL inference step after the host-cost fixes, the CUDA tests
  # (compiled training steps against eager among them), the SDXL training step, the compiled nested /
  # compiled plain inference step (the comparison the FLOP floor is about) and the compiled training step,
  # both compiled block by block (minutes less compiling than whole UNets), FLUX.1-dev's step with its
  # transformer in int8, then the checks already measured once.
  set -- --sections environment dit inference tests training compile compiled_training dit_quantized \
    loader accuracy --batches 1 4 --compile-regional
fi
python3 benchmarks/gpu/bench.py --out "${OUT}" --budget "${BUDGET}" "$@" 2>&1 | tee "${OUT}/log.txt"

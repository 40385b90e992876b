#!/usr/bin/env bash
# Run HERE, before a GPU lease: the lease's software on this CPU. It builds VENV (default .venv-gpu) with
# Python 3.12 (PYTHON names it; default python3.12) and the GPU image's versions of torch (a CUDA build, run
# on the CPU), transformers, huggingface_hub, lightning and the rest (benchmarks/gpu/image-versions.txt),
# installs the wheels of .whl/ as device.sh does there (run benchmarks/gpu/wheels.sh first), then runs
# device.sh's smoke mode with every section, the test suite, and the CUDA tests' bodies on the CPU. A failure
# here is one the lease would have spent minutes on. About 3 minutes to build (2.5 GB of downloads, once),
# 1 for the smoke run, 10 for the tests, 2 for the CUDA tests' bodies.
#   PYTHON=/root/.pyenv/versions/3.12.1/bin/python3 benchmarks/gpu/rehearse.sh   # all three
#   benchmarks/gpu/rehearse.sh smoke      # only the smoke run (also: suite, cuda)
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'  # the comment above
  exit 0
fi
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv-gpu}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(smoke suite cuda)
compgen -G ".whl/*.whl" >/dev/null || { echo "rehearse.sh: no wheels in .whl/; run benchmarks/gpu/wheels.sh" >&2; exit 2; }
python=${PYTHON:-python3.12}
"${python}" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
  || { echo "rehearse.sh: ${python} is not a Python 3.12 (the GPU machine's); name one with PYTHON=" >&2; exit 2; }
if [ ! -e "${VENV}/.complete" ]; then
  grep -qx "/${VENV}/" .git/info/exclude 2>/dev/null || echo "/${VENV}/" >>.git/info/exclude
  rm -rf "${VENV}"
  "${python}" -m venv "${VENV}"
  # Besides the pinned ones, what the image also holds of the project's and the tests' needs (any version).
  "${VENV}/bin/pip" install -q -r benchmarks/gpu/image-versions.txt requests pillow pyyaml tqdm matplotlib \
    tensorboard scipy scikit-image pytest pytest-timeout pytest-xdist pytest-cov pytest-mock hypothesis
  "${VENV}/bin/pip" install -q --no-deps .whl/*.whl
  # The image has no faces extra: the tests that need it skip, as they would there.
  "${VENV}/bin/pip" install -q --no-deps -e .
  touch "${VENV}/.complete"
fi
"${VENV}/bin/python" -c "import torch, transformers; print('rehearsal: torch', torch.__version__, '| transformers', transformers.__version__)"
failed=()
for step in "${steps[@]}"; do
  echo "=== rehearsal: ${step}"
  case "${step}" in
    smoke)
      out=$(mktemp -d)
      PATH="${PWD}/${VENV}/bin:${PATH}" OUT="${out}" benchmarks/gpu/device.sh --smoke --sections environment dit \
        inference tests training compile compiled_training dit_quantized loader accuracy >"${out}/stdout.txt" 2>&1 \
        || { tail -30 "${out}/stdout.txt"; failed+=("smoke (${out})"); }
      grep "^=== .*: " "${out}/log.txt" || true
      ;;
    suite) "${VENV}/bin/python" -m pytest -q -p no:cacheprovider || failed+=(suite) ;;
    cuda)
      # The CUDA tests' bodies on the CPU: a copy of tests/test_cuda.py with the device swapped and the skip
      # removed; 16-mixed needs a GPU and the sync-debug test the CUDA API.
      copy=tests/test_cuda_on_cpu_rehearsal.py
      trap 'rm -f "${copy}"' EXIT
      sed -e 's/CUDA = torch.device("cuda")/CUDA = torch.device("cpu")/; s/accelerator="gpu"/accelerator="cpu"/g' \
        -e '/pytest.mark.skipif(not torch.cuda.is_available/d' tests/test_cuda.py >"${copy}"
      "${VENV}/bin/python" -m pytest -q -p no:cacheprovider -m "" "${copy}" -k "not 16-mixed and not never_waits" \
        || failed+=(cuda)
      rm -f "${copy}"
      ;;
    *) echo "rehearse.sh: unknown step ${step} (smoke, suite, cuda)" >&2; exit 2 ;;
  esac
done
[ ${#failed[@]} -eq 0 ] || { echo "rehearse.sh: failed: ${failed[*]}" >&2; exit 1; }
echo "rehearse.sh: every step passed"

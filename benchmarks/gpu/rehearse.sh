#!/usr/bin/env bash
# Run HERE, before a GPU lease: the lease's software on this CPU. It builds VENV (default .venv-gpu) with
# Python 3.12 (PYTHON names it; default python3.12) and the GPU image's versions of torch (a CUDA build, run
# on the CPU), transformers, huggingface_hub, lightning and the rest (benchmarks/gpu/image-versions.txt) and
# the wheels of .whl/ (run benchmarks/gpu/wheels.sh first), then runs device.sh's smoke mode with every
# section and the lease's options, the test suite, and the CUDA tests' bodies on the CPU. A failure here is
# one the lease would have spent minutes on. About 3 minutes to build (2.5 GB of downloads; rebuilt when the
# versions, the wheels or pyproject.toml change), 1 for the smoke run, 10 for the tests, 2 for the CUDA
# tests' bodies.
#   PYTHON=/root/.pyenv/versions/3.12.1/bin/python3 benchmarks/gpu/rehearse.sh   # all three
#   benchmarks/gpu/rehearse.sh smoke      # only the smoke run (also: suite, cuda)
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'  # the comment above
  exit 0
fi
absolute() { case "$1" in /*) echo "$1" ;; *) echo "${PWD}/$1" ;; esac }
VENV=$(absolute "${VENV:-.venv-gpu}")
python=${PYTHON:-python3.12}
case "${python}" in */*) python=$(absolute "${python}") ;; esac
cd "$(dirname "$0")/../.."
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(smoke suite cuda)
for step in "${steps[@]}"; do
  case "${step}" in smoke | suite | cuda) ;; *) echo "rehearse.sh: unknown step ${step} (smoke, suite, cuda)" >&2; exit 2 ;; esac
done
compgen -G ".whl/*.whl" >/dev/null || { echo "rehearse.sh: no wheels in .whl/; run benchmarks/gpu/wheels.sh" >&2; exit 2; }
"${python}" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
  || { echo "rehearse.sh: ${python} is not a Python 3.12 (the GPU machine's); name one with PYTHON=" >&2; exit 2; }

# What the venv was built from: a change to any of it rebuilds the venv.
recipe=$(cat benchmarks/gpu/image-versions.txt pyproject.toml <(ls .whl) | sha256sum | cut -c1-16)
marker="${VENV}/.rehearsal"
if [ "$(cat "${marker}" 2>/dev/null)" != "${recipe}" ]; then
  if [ -e "${VENV}" ] && [ ! -e "${marker}" ]; then
    echo "rehearse.sh: ${VENV} exists and is not a rehearsal venv; remove it or name another with VENV=" >&2
    exit 2
  fi
  if exclude=$(git rev-parse --git-path info/exclude 2>/dev/null) && [[ "${VENV}" == "${PWD}/"* ]]; then
    entry="/${VENV#"${PWD}/"}/"
    grep -qxF "${entry}" "${exclude}" 2>/dev/null || echo "${entry}" >>"${exclude}" || true
  fi
  rm -rf "${VENV}"
  "${python}" -m venv "${VENV}"
  echo building >"${marker}"  # this script's own: a later run may remove it
  # Besides the pinned ones, what the image also holds of the project's and the tests' needs (any version).
  "${VENV}/bin/pip" install -q -r benchmarks/gpu/image-versions.txt requests pillow pyyaml tqdm matplotlib \
    tensorboard scipy scikit-image pytest pytest-timeout pytest-xdist pytest-cov pytest-mock hypothesis
  "${VENV}/bin/pip" install -q --no-deps .whl/*.whl
  # The image has no faces extra: the tests that need it skip, as they would there.
  "${VENV}/bin/pip" install -q --no-deps -e .
  echo "${recipe}" >"${marker}"
fi
"${VENV}/bin/python" -c "import torch, transformers; print('rehearsal: torch', torch.__version__, '| transformers', transformers.__version__)"

failed=()
for step in "${steps[@]}"; do
  echo "=== rehearsal: ${step}"
  case "${step}" in
    smoke)
      # device.sh's default sections and options (all sections, regional compilation), on tiny models, with
      # a budget that skips none. device.sh installs the wheels again, into its own folder, as it does there.
      out="${VENV}/smoke"
      rm -rf "${out}"
      PATH="${VENV}/bin:${PATH}" OUT="${out}" BUDGET=100000 benchmarks/gpu/device.sh --smoke --compile-regional \
        --batches 1 4 --sections environment dit inference tests training compile compiled_training \
        dit_quantized loader accuracy >"${out}.txt" 2>&1 || { tail -30 "${out}.txt"; failed+=("smoke (${out}.txt)"); }
      grep "^=== .*: " "${out}/log.txt" || true
      if grep -q "^=== .*: skipped" "${out}/log.txt"; then failed+=("smoke (a section was skipped)"); fi
      ;;
    suite) "${VENV}/bin/python" -m pytest -q -p no:cacheprovider || failed+=(suite) ;;
    cuda)
      # The CUDA tests' bodies on the CPU: a copy of tests/test_cuda.py with the device swapped and the skip
      # removed, named so that no other pytest run collects it; 16-mixed (fp16 autocast) needs a GPU, and the
      # sync-debug test the CUDA API.
      copy=tests/_cuda_on_cpu_rehearsal.py
      trap 'rm -f "${copy}"' EXIT
      sed -e 's/CUDA = torch.device("cuda")/CUDA = torch.device("cpu")/; s/accelerator="gpu"/accelerator="cpu"/g' \
        -e '/pytest.mark.skipif(not torch.cuda.is_available/d' tests/test_cuda.py >"${copy}"
      "${VENV}/bin/python" -m pytest -q -p no:cacheprovider -m "" "${copy}" \
        -k "not sd-16-mixed and not sdxl-16-mixed and not never_waits" || failed+=(cuda)
      rm -f "${copy}"
      ;;
  esac
done
[ ${#failed[@]} -eq 0 ] || { echo "rehearse.sh: failed: ${failed[*]}" >&2; exit 1; }
echo "rehearse.sh: every step passed"

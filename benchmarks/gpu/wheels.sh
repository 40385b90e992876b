#!/usr/bin/env bash
# Run HERE, before a GPU lease: fetch into .whl/ the wheels the GPU machine lacks, at the versions
# constraints.txt pins. That machine has Python 3.12 with torch, transformers, lightning, safetensors and
# huggingface_hub, and no internet; benchmarks/gpu/device.sh installs these wheels there (torchao for
# model.quantize: its wheel needs torch >= 2.11, which that machine has).
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'  # the comment above
  exit 0
fi
cd "$(dirname "$0")/../.."
packages=(diffusers webdataset braceexpand jsonargparse docstring_parser typeshed_client importlib_metadata
  lazy-importer torchao)
pins=()
for name in "${packages[@]}"; do
  pin=$(grep -i "^${name}==" constraints.txt) || { echo "constraints.txt pins no ${name}" >&2; exit 2; }
  pins+=("${pin}")
done
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl.partial
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl.partial "${pins[@]}"
rm -rf .whl && mv .whl.partial .whl
ls .whl

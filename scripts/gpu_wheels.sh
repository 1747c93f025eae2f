#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the pure-Python wheels that scripts/gpu_check.sh installs on the lent GPU
# machine, which has no network and whose python3 (3.12, with torch, transformers, huggingface_hub, ...) lacks
# diffusers and importlib_metadata. importlib_metadata needs lazy-importer (missing there) and zipp>=3.20;
# gpu_check.sh installs only the wheels whose package does not import there. Never add torch here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 zipp==4.1.2)
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
ls -l .whl
# Requirements of the wheels, for a check by eye against the GPU machine's packages (docs: KINDS.md there).
for wheel in .whl/*.whl; do
    echo "$(basename "$wheel"): $(unzip -p "$wheel" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
        | sed 's/^Requires-Dist: //' | paste -sd ';' -)"
done

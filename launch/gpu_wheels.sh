#!/bin/bash
# Fills .whl/ (git-ignored) with the wheels launch/gpu_check.py needs that a
# GPU image with jax, flax, optax, orbax and torch may lack: Python 3.12,
# x86-64 Linux (absl-py too: gpu_check.py reads its flags with it). Run it here (where pip reaches the package index), then carry
# .whl to the GPU machine; gpu_check.py installs them into /tmp/bsf_site.
#   bash launch/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  monai==1.6.1 ml-collections nibabel isal absl-py
ls -la .whl

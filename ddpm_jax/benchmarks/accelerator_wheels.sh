#!/usr/bin/env bash
# Downloads the wheels that `accelerator.sh` installs on an accelerator machine that has no
# network: Python 3.12, manylinux x86-64, no dependencies resolved (each one is named here).
# The machine's image already holds jax 0.11 with its CUDA plugin, torch, numpy, absl, etils,
# tensorstore, safetensors, huggingface-hub and the rest; these are the packages it lacks or
# whose versions ddpm_jax is tested with. Usage (from the repository root):
#   bash ddpm_jax/benchmarks/accelerator_wheels.sh [DIR]      # default DIR: .whl (git-ignored)
set -euo pipefail
dir="${1:-.whl}"
python="${PYTHON:-python3}"
mkdir -p "$dir"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dir" \
  ml-collections==1.1.0 \
  flax==0.12.12 \
  optax==0.2.8 \
  orbax-checkpoint==0.12.8 \
  diffusers==0.42.1
du -ch "$dir"/*.whl | tail -1

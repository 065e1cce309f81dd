#!/usr/bin/env bash
# The accelerator run on a machine without network, from the repository root:
#   bash ddpm_jax/benchmarks/accelerator.sh OUT [flags of ddpm_jax.benchmarks.accelerator]
# Installs the wheels that accelerator_wheels.sh downloaded (into $WHEELS, default .whl; no
# index, no dependency resolution) into a folder of their own that comes first on PYTHONPATH,
# then runs `python -m ddpm_jax.benchmarks.accelerator --out=OUT` under `timeout $LIMIT_S`
# (default 460 s; the module itself skips parts after --budget_s). OUT receives
# accelerator.json, accelerator.txt, determinism.json(.log), gpu.csv and log.txt.
set -uo pipefail
out="${1:?usage: accelerator.sh OUT [flags]}"
shift
python="${PYTHON:-python3}"
wheels="${WHEELS:-.whl}"
site="${SITE:-/tmp/ddpm_jax_site}"
mkdir -p "$out"
start=$(date +%s)
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" "$wheels"/*.whl || { echo "installing the wheels of $wheels failed"; exit 1; }
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.80}"  # torch too
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/ddpm_jax_xla_cache}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  > "$out/gpu.csv" 2>&1 || echo "no nvidia-smi" > "$out/gpu.csv"
echo "installed in $(( $(date +%s) - start )) s"
timeout "${LIMIT_S:-460}" "$python" -m ddpm_jax.benchmarks.accelerator --out="$out" "$@" \
  2>&1 | tee "$out/log.txt"
status=${PIPESTATUS[0]}
echo "exit $status after $(( $(date +%s) - start )) s"
exit "$status"

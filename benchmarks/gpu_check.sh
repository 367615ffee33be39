#!/usr/bin/env bash
# The one GPU check: build the extension with CUDA, run the CUDA tests and the GPU benchmarks,
# print a short table last. Run on a lent GPU machine from the repository root:
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYASGD_CUDA_ARCHS="${PYASGD_CUDA_ARCHS:-90}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m pip install -q --no-build-isolation --no-deps -e . || { echo "BUILD FAILED"; exit 1; }
python3 -m pyasgd.info
python3 -m pytest -q -m cuda tests/ -p no:cacheprovider 2>&1 | tail -15
python3 -m pytest -q benchmarks/ -k "cuda" --benchmark-disable -p no:cacheprovider 2>&1 | grep -A20 "pyasgd results"

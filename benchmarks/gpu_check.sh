#!/usr/bin/env bash
# The one GPU check: build the extension with CUDA, run the CUDA tests and the GPU benchmark,
# print a short table last. On a lent GPU machine, from the repository root:
#   bash benchmarks/gpu_check.sh
# Needs python3 with torch (CUDA), pybind11, cmake, ninja, pytest (pytest-benchmark optional).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYASGD_CUDA_ARCHS="${PYASGD_CUDA_ARCHS:-90}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import pytest" || { echo "pytest is missing: carry its wheels (device README)"; exit 1; }
bench_opt=""
python3 -c "import pytest_benchmark" 2>/dev/null && bench_opt="--benchmark-disable"
start=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . || { echo "BUILD FAILED"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python3 -m pyasgd.info
tests=$(python3 -m pytest -q -m cuda tests/ -p no:cacheprovider 2>&1 | tee /dev/stderr | tail -1)
bench=$(python3 -m pytest -q -s benchmarks/test_bench_fused_adam_cuda.py $bench_opt -p no:cacheprovider 2>&1 \
        | tee /dev/stderr | grep -A6 "pyasgd results")
echo
echo "==== GPU check ===="
echo "CUDA tests: $tests"
echo "${bench:-benchmark: no results (see above)}"

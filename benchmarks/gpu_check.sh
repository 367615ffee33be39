#!/usr/bin/env bash
# The one GPU check, in one call of about 8 minutes: build the extension with CUDA, run every CUDA
# test, the CUDA kernel and pinned-memory benchmarks and the GPU training runs, then print one
# short table last. On a lent GPU machine, from the repository root:
#   bash benchmarks/gpu_check.sh
# Needs python3 with torch (CUDA), pybind11, cmake, ninja, pytest, sacrebleu, sentencepiece.
# Each stage has its own time limit, so a hang in one still leaves the others' figures.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYASGD_CUDA_ARCHS="${PYASGD_CUDA_ARCHS:-90}"
export PYASGD_GPU_E2E_S="${PYASGD_GPU_E2E_S:-60}" PYASGD_GPU_BASE_S="${PYASGD_GPU_BASE_S:-40}"
log=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import pytest" || { echo "pytest is missing: install or carry its wheels (device README)"; exit 1; }
# The ini's options for plugins that may be absent (pytest-timeout, pytest-benchmark) must not fail the run.
popts=(-p no:cacheprovider -W "ignore::pytest.PytestConfigWarning" -o "addopts=-ra")
python3 -c "import pytest_benchmark" 2>/dev/null && popts+=(--benchmark-disable)
start=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$log/build" 2>&1 \
  || { tail -30 "$log/build"; echo "BUILD FAILED"; exit 1; }
build_s=$(( $(date +%s) - start ))
python3 -m pyasgd.info
stage() {  # name, seconds, pytest args...
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  timeout "$secs" python3 -m pytest -q -s "${popts[@]}" "$@" > "$log/$name" 2>&1
  local rc=$?
  tail -40 "$log/$name"
  echo "$name: rc=$rc, $(( $(date +%s) - t0 )) s, $(tail -1 "$log/$name")" >> "$log/stages"
}
stage cuda-tests 120 -m cuda tests/
stage kernels 150 benchmarks/test_bench_cuda.py
stage training 330 benchmarks/test_bench_gpu_train.py
echo
echo "==== GPU check ($(date -u +%F), build ${build_s} s) ===="
cat "$log/stages"
for f in kernels training; do sed -n '/pyasgd results/,$p' "$log/$f" | grep -v "^=\+ .*passed\|^=\+ .*failed"; done

#!/usr/bin/env bash
# Issue 6's checks that need a GPU, in one command for the GPU machine (the `device` tool):
# builds with CUDA, runs the C++ and Python device tests, then benchmarks/gpu_bench.py.
# Logs and the result table go to $OUT (default ./gpu-out). Prepare here first with
# ../shared/device/fetch-debs.sh, then run with carry [".device"]:
#   source .device/setup.sh && scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSLUICE_CUDA=ON \
  -DSLUICE_BUILD_BENCHMARKS=OFF -DPython_EXECUTABLE="$(command -v python3)" \
  ${CMAKE_PREFIX_PATH:+-DCMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH"} > "$out/configure.log" 2>&1
cmake --build build-gpu > "$out/build.log" 2>&1
status=0
build-gpu/tests/pipeline_test --gtest_filter='DeviceTest.*' > "$out/device_test.log" 2>&1 || status=1
PYTHONPATH=build-gpu/python python3 -m pytest -q -p no:cacheprovider tests/python/test_device.py \
  > "$out/test_device.log" 2>&1 || status=1
PYTHONPATH=build-gpu/python python3 benchmarks/gpu_bench.py "${GPU_BENCH_WORK:-/tmp/sluice-gpu}" \
  --seconds "${GPU_BENCH_SECONDS:-10}" --json > "$out/gpu_bench.md" 2> "$out/gpu_bench.log" || status=1
tail -n 3 "$out/device_test.log" "$out/test_device.log"
cat "$out/gpu_bench.md"
exit $status

#!/usr/bin/env bash
# Issue 34's checks that need a GPU, in one command for the GPU machine (the `device` tool):
# builds the targets the device tests need with CUDA, runs the C++ and Python device tests
# (bytes on the GPU, the consumer's stream, memory flat over 1000+ batches, a tensor outliving
# its loader, samples from a `sluice serve` on loopback), asks UCX what it knows of CUDA
# memory, then benchmarks/gpu_bench.py (H2D, GPU idle, decode to the GPU). Last, if time is
# left, a mutation check: without the consumer stream's wait for the copy the ordering tests
# must fail. Every stage appends to its file under $OUT as it goes (at most 8 files come back).
# Prepare here: scripts/install-deps.sh, a build in build/, ../shared/device/make-kit.sh, and
# (optional) Debian's ucx_info in .gpu/, ignored by git:
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu /tmp/u && (cd /tmp/u && apt-get download
#   ucx-utils && dpkg -x ucx-utils_*.deb x) && cp /tmp/u/x/usr/bin/ucx_info .gpu/
# then run with carry [".device", ".gpu"] (about 4.5 minutes on an H200 with 16 cores):
#   source .device/setup.sh && scripts/gpu-check.sh
# GPU_BUILD (build-gpu), GPU_WORK (/tmp/sluice-gpu) and MUTATION_BEFORE (400 s) adjust it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
work=${GPU_WORK:-/tmp/sluice-gpu}
build=${GPU_BUILD:-build-gpu}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
status=0
step() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$out/steps.log"; }
# run NAME SECONDS LOGFILE CMD...: one stage, bounded, its exit status in steps.log
run() {
  local name=$1 limit=$2 log=$3; shift 3
  step "$name: start"
  echo "=== $name" >> "$log"
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  step "$name: exit $rc"
  return $rc
}

{ nvidia-smi; echo; nproc; free -g; df -h /tmp; head -5 /proc/meminfo; cat /proc/self/cgroup
  python3 -c 'import sys, torch, torchvision; print(sys.version); print("torch", torch.__version__,
"torchvision", torchvision.__version__, torch.cuda.get_device_name(0))'; } > "$out/machine.txt" 2>&1

# The kit's UCX as one family: where the machine has a libucs.so.0 of its own, the kit's
# libucp (loaded by sluice at first use) would bind to it ("undefined symbol: ucs_...").
kit_lib=/opt/deps/usr/lib/x86_64-linux-gnu
if [ -e "$kit_lib/libucp.so.0" ]; then
  mkdir -p /opt/deps/ucx
  for l in libucp libucs libuct libucm; do ln -sf "$kit_lib/$l.so.0" /opt/deps/ucx/; done
  export LD_LIBRARY_PATH=/opt/deps/ucx${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

# The JPEG tars for the decode benchmark need only Pillow: made while the build runs.
python3 benchmarks/gpu_bench.py "$work" --make-jpegs >> "$out/bench.log" 2>&1 &
jpegs=$!

run configure 120 "$out/build.log" cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DSLUICE_CUDA=ON -DSLUICE_BUILD_BENCHMARKS=OFF -DPython_EXECUTABLE="$(command -v python3)" || exit 1
run build 300 "$out/build.log" cmake --build "$build" -j16 --target pipeline_test sluice_python \
  || { tail -40 "$out/build.log"; exit 1; }

export PYTHONPATH=$PWD/$build/python
run cpp-device-tests 150 "$out/tests.log" $build/tests/pipeline_test --gtest_filter='DeviceTest.*' \
  || status=1
run py-device-tests 200 "$out/tests.log" python3 -m pytest -v -p no:cacheprovider \
  tests/python/test_device.py || status=1
grep -E '^\[  (PASSED|FAILED|SKIPPED) |^tests/python.*(PASSED|FAILED|SKIPPED|ERROR)' "$out/tests.log"

[ -x .gpu/ucx_info ] && { echo "## ucx_info -v"; .gpu/ucx_info -v
  echo "## ucx_info -d: memory domains and transports"; .gpu/ucx_info -d | grep -E 'Memory domain|Transport|memory types|domain:'
  echo "## ucx_info -d: any CUDA?"; .gpu/ucx_info -d | grep -i cuda || echo "(no CUDA memory domain or transport)"
  echo "## ucx_info -b: CUDA in the build?"; .gpu/ucx_info -b | grep -i cuda || echo "(built without CUDA)"
  echo "## ucx_info -p -u t: the context"; .gpu/ucx_info -p -u t | head -40
  echo "## the machine's own UCX libraries"; ldconfig -p | grep -E 'libuc[pstm]\.so' || echo "(none)"
} > "$out/ucx.txt" 2>&1

wait $jpegs
for section in h2d idle decode; do
  run "bench-$section" 150 "$out/bench.log" python3 benchmarks/gpu_bench.py "$work" \
    --sections "$section" --md "$out/results.md" --json "$out/results.json" || status=1
done
cat "$out/results.md"

# Mutation check (about a minute): the consumer's stream no longer waits for the batch's copy.
if [ "$SECONDS" -lt "${MUTATION_BEFORE:-400}" ]; then
  cp src/pipeline/loader.cc "$work/loader.cc.orig"
  sed -i 's/s_->device->copied->wait_on(stream);/(void)stream;  \/\/ MUTATION/' src/pipeline/loader.cc
  if grep -q MUTATION src/pipeline/loader.cc &&
     run mutation-build 120 "$out/build.log" cmake --build "$build" -j16 --target pipeline_test sluice_python; then
    if run mutation-cpp 120 "$out/tests.log" $build/tests/pipeline_test \
         --gtest_filter='DeviceTest.ACopyOnTheConsumersStreamSeesCompleteData'; then
      step "mutation: the C++ ordering test PASSED without the wait: it cannot fail"; status=1
    else step "mutation: the C++ ordering test fails without the wait, as it must"; fi
    if run mutation-py 120 "$out/tests.log" python3 -m pytest -q -p no:cacheprovider \
         tests/python/test_device.py -k kernel_on_the_consumer; then
      step "mutation: the Python ordering test PASSED without the wait: it cannot fail"; status=1
    else step "mutation: the Python ordering test fails without the wait, as it must"; fi
  else
    step "mutation: not applied or not built"
  fi
  cp "$work/loader.cc.orig" src/pipeline/loader.cc
else
  step "mutation: skipped (${SECONDS}s gone)"
fi
step "done, status $status"
exit $status

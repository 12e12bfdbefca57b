#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz) with clang-14 + ASan/UBSan and runs each one for
# SECONDS (default 20) from its seed corpus in tests/fuzz/corpus/TARGET. New inputs go to a
# scratch copy, not into the repo. A crash stops the run with its reproducer named; make it a
# regression test (copy it into the seed corpus) once fixed.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(fuzz_manifest fuzz_index fuzz_config fuzz_wire fuzz_handshake fuzz_sources fuzz_s3_list fuzz_image fuzz_embed)
jobs=$(nproc)
CC=clang-14 CXX=clang++-14 cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSLUICE_FUZZ=ON -DSLUICE_SANITIZE=address,undefined -DSLUICE_BUILD_TESTS=OFF \
  -DSLUICE_BUILD_BENCHMARKS=OFF -DSLUICE_BUILD_PYTHON=OFF -DSLUICE_CUDA=OFF >/dev/null
cmake --build build-fuzz -j "$jobs" --target "${targets[@]}"
for t in "${targets[@]}"; do
  work=build-fuzz/corpus/$t
  mkdir -p "$work"
  cp -n tests/fuzz/corpus/"$t"/* "$work"/ 2>/dev/null || true
  echo "== $t: ${secs}s"
  # -rss_limit: YAML and tar inputs may ask for large allocations; they must fail cleanly.
  # UCX_HANDLE_ERRORS=none: UCX (linked by the net targets) must not take the crash signals, or
  # it exits before libFuzzer can write the failing input.
  rc=0
  UCX_MEM_EVENTS=no UCX_HANDLE_ERRORS=none build-fuzz/tests/fuzz/"$t" "$work" \
    -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix=build-fuzz/"$t"- > build-fuzz/"$t".log 2>&1 || rc=$?
  grep -E "^#[0-9]+.*DONE|stat::number_of_executed_units|ERROR|SUMMARY|artifact" build-fuzz/"$t".log || true
  units=$(sed -n 's/^stat::number_of_executed_units: *//p' build-fuzz/"$t".log | tail -1)
  # A target fails the run when it exits non-zero, leaves a failing input, or ran no input at
  # all (a crash at start-up, a signal taken by someone else).
  if [[ $rc -ne 0 ]] || compgen -G "build-fuzz/$t-crash-*" >/dev/null ||
     compgen -G "build-fuzz/$t-leak-*" >/dev/null || compgen -G "build-fuzz/$t-oom-*" >/dev/null ||
     [[ -z "$units" || "$units" -eq 0 ]]; then
    echo "fuzz: $t failed (exit $rc, ${units:-no} inputs run): $(ls build-fuzz/"$t"-* 2>/dev/null)"
    tail -30 build-fuzz/"$t".log
    exit 1
  fi
done
echo "== fuzz: no failures"

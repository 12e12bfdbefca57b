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
[[ ${#targets[@]} -gt 0 ]] || targets=(fuzz_manifest fuzz_index fuzz_config fuzz_wire fuzz_handshake fuzz_sources)
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
  UCX_MEM_EVENTS=no build-fuzz/tests/fuzz/"$t" "$work" -max_total_time="$secs" \
    -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix=build-fuzz/"$t"- 2>&1 |
    grep -E "^#[0-9]+.*DONE|stat::number_of_executed_units|ERROR|SUMMARY|artifact" || true
  if compgen -G "build-fuzz/$t-crash-*" >/dev/null || compgen -G "build-fuzz/$t-leak-*" >/dev/null ||
     compgen -G "build-fuzz/$t-oom-*" >/dev/null; then
    echo "fuzz: $t found a failing input: $(ls build-fuzz/"$t"-*)"
    exit 1
  fi
done
echo "== fuzz: no failures"

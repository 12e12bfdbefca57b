#!/usr/bin/env bash
# Installs the build into a temporary prefix, builds examples/ (cpp_trainer) against it with
# find_package(sluice) (and against the build tree), and runs it on a freshly packed dataset, killing it once mid-epoch.
# Usage: install_test.sh SOURCE_DIR BUILD_DIR
set -euo pipefail
SRC=$1 BUILD=$2
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cmake --install "$BUILD" --prefix "$TMP/prefix" >/dev/null
test -x "$TMP/prefix/bin/sluice"
test -f "$TMP/prefix/include/sluice/sluice.h"
cmake -S "$SRC/examples" -B "$TMP/examples" -G Ninja -DCMAKE_PREFIX_PATH="$TMP/prefix" >/dev/null
cmake --build "$TMP/examples" >/dev/null
# The build tree is a package too, without an install.
cmake -S "$SRC/examples" -B "$TMP/examples-build-tree" -G Ninja -DCMAKE_PREFIX_PATH="$BUILD" >/dev/null
cmake --build "$TMP/examples-build-tree" >/dev/null
# Public headers must not drag in third-party headers.
if grep -rEl '#include <(liburing|ucp|yaml-cpp|fmt|cuda|pybind11|xxhash)' "$TMP/prefix/include"; then
  echo "FAIL: public headers include third-party headers"; exit 1
fi
python3 "$SRC/examples/make_image_folder.py" "$TMP/images" --classes 3 --per-class 200
"$TMP/prefix/bin/sluice" pack "$TMP/images" -o "$TMP/ds" >/dev/null
printf 'dataset: {path: ds}\nbatch_size: 5\ndistributed: {rank: 0, world_size: 1}\n' > "$TMP/t.yaml"
out=$("$TMP/examples/cpp_trainer" "$TMP/t.yaml" 2 2>/dev/null)
echo "$out" | grep -q "epoch 1: 120 batches, 600 samples" || { echo "FAIL: cpp_trainer: $out"; exit 1; }
out=$("$TMP/examples-build-tree/cpp_trainer" "$TMP/t.yaml" 1 2>/dev/null)
echo "$out" | grep -q "epoch 0: 120 batches, 600 samples" ||
  { echo "FAIL: cpp_trainer built against the build tree: $out"; exit 1; }
# Killed with SIGKILL ten times at different points, it always finds a whole state file and
# resumes exactly where that file says; then it finishes. A damaged state file is an error.
state="$TMP/state"
for k in $(seq 1 10); do
  "$TMP/examples/cpp_trainer" "$TMP/t.yaml" 2 "$state" > "$TMP/run$k" 2>&1 &
  pid=$!
  sleep "0.$(( (k * 37) % 9 + 1 ))"
  kill -9 $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
  if [[ ! -e "$state" ]]; then
    grep -q "no state file yet" "$TMP/run$k" || { echo "FAIL: run $k: no state and no fresh start"; exit 1; }
    continue
  fi
  read -r e p < "$state" || { echo "FAIL: kill $k left an empty or torn state file"; exit 1; }
  [[ "$e" =~ ^[0-9]+$ && "$p" =~ ^[0-9]+$ ]] || { echo "FAIL: kill $k: state \"$e $p\""; exit 1; }
  next=$("$TMP/examples/cpp_trainer" "$TMP/t.yaml" 0 "$state" 2>/dev/null | head -1)
  [[ "$next" == "resumed at epoch $e, position $p" ]] || { echo "FAIL: kill $k: state $e $p, then: $next"; exit 1; }
done
"$TMP/examples/cpp_trainer" "$TMP/t.yaml" 2 "$state" > "$TMP/resumed" 2>&1 || { echo "FAIL: $(cat "$TMP/resumed")"; exit 1; }
grep -q "resumed at" "$TMP/resumed" || { echo "FAIL: the last run did not resume"; exit 1; }
printf 'garbage' > "$state"
if "$TMP/examples/cpp_trainer" "$TMP/t.yaml" 2 "$state" > "$TMP/bad" 2>&1; then
  echo "FAIL: a damaged state file started a fresh run"; exit 1
fi
grep -q "not a state file" "$TMP/bad" || { echo "FAIL: $(cat "$TMP/bad")"; exit 1; }
echo "1 passed, 0 failed"

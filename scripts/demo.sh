#!/usr/bin/env bash
# The main job, from a bare Debian 12 machine: build sluice, generate an ImageFolder-style
# dataset, pack it, verify it, print what each of 2 ranks reads in epoch 0, run the C++ loader
# over it for 2 epochs, then install the Python package (pip install . into .venv, with torch
# 2.13.0) and train a small PyTorch model through sluice and through torch's DataLoader.
#
#   ./scripts/demo.sh [WORKDIR]      # default WORKDIR: /tmp/sluice-demo
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
work=${1:-/tmp/sluice-demo}

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target sluice_cli
mkdir -p "$work"

echo "== generate: 10 classes x 500 files of 1-16 KiB under $work/images"
python3 examples/make_image_folder.py "$work/images" --classes 10 --per-class 500
echo "== pack"
build/sluice pack "$work/images" -o "$work/packed" --shard-size 8M --force
echo "== inspect"
build/sluice inspect "$work/packed"
echo "== verify"
build/sluice verify "$work/packed"

cat > "$work/train.yaml" <<YAML
dataset: {path: packed, format: shards}
batch_size: 64
drop_last: true
seed: 0
shuffle: {mode: global}
YAML
for rank in 0 1; do
  build/sluice order "$work/train.yaml" --rank $rank --world-size 2 --epoch 0 > "$work/order-rank$rank.txt"
  echo "== rank $rank of 2, epoch 0: $(wc -l < "$work/order-rank$rank.txt") samples, first 8:" \
       "$(head -8 "$work/order-rank$rank.txt" | tr '\n' ' ')"
done
both=$(cat "$work"/order-rank?.txt | sort -n | uniq | wc -l)
total=$(cat "$work"/order-rank?.txt | wc -l)
echo "== $total samples delivered across ranks, $both distinct (exactly once: $([[ $both -eq $total ]] && echo yes || echo NO))"
echo "== load 2 epochs with the C++ loader (a consumer that touches every sample)"
build/sluice bench "$work/train.yaml" --epochs 2
echo "== install the Python package into .venv (pip install .)"
./scripts/python-env.sh
echo "== train a small model for 3 epochs through sluice, then through torch.utils.data.DataLoader"
.venv/bin/python examples/train.py "$work/train.yaml" --images "$work/images" --epochs 3

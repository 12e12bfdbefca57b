#!/usr/bin/env bash
# Issue 4's numbers: sluice's Python iterator against `sluice bench` on the same config, and
# against the loaders users would otherwise pick (benchmarks/peers: torch DataLoader and
# torchdata StatefulDataLoader doing os.pread on sluice's own shard files, mosaicml-streaming
# on MDS shards, webdataset on tar shards), all on the same 4 KiB samples, global shuffle,
# batch 256, warm page cache and cold (dropped caches). Needs root (drop_caches).
#   benchmarks/python_bench.sh [WORKDIR] [SECONDS] [ROUNDS]
# Rounds alternate the loaders; the table gives medians and the median of per-round ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/sluice-py-bench}
secs=${2:-10}
rounds=${3:-3}
ds=${SLUICE_BENCH_DATASET:-/var/tmp/sluice-io-bench/ds4k}  # shared with io_bench.sh
batch=256
mkdir -p "$work"

cmake --build build --target sluice_cli make_dataset >/dev/null
[[ -f "$ds/manifest.sluice" ]] || build/benchmarks/make_dataset "$ds" 524288 4096
./scripts/python-env.sh                                # .venv: sluice + torch
benchmarks/peers/setup_env.sh >/dev/null               # .venv-bench: the peers
SLUICE_VENV=.venv-bench ./scripts/python-env.sh        # ... and sluice, for `convert`
[[ -f "$work/meta.json" ]] ||
  .venv-bench/bin/python benchmarks/peers/peers.py convert --source "$ds" --out "$work" >&2

cat > "$work/warm.yaml" <<YAML
dataset: {path: $ds}
batch_size: $batch
shuffle: {mode: global}
prefetch: 16
io: {direct: false, threads: 2}
YAML
cat > "$work/cold.yaml" <<YAML
dataset: {path: $ds}
batch_size: $batch
shuffle: {mode: global}
prefetch: 16
io: {direct: true, threads: 8}
YAML

results="$work/results.jsonl"
: > "$results"
record() {  # record CASE ROUND JSON-LINE
  python3 -c 'import json,sys; d=json.loads(sys.argv[3]); d["case"]=sys.argv[1]; d["round"]=int(sys.argv[2]); print(json.dumps(d))' \
    "$1" "$2" "$(tail -n 1)" >> "$results"
}
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
peers=(dataloader statefuldataloader streaming webdataset)

for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds: warm" >&2
  cat "$ds"/shard-*.sluice "$work"/mds/* "$work"/tar/* > /dev/null 2>&1 || true
  build/sluice bench "$work/warm.yaml" --seconds "$secs" --json 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); d["peer"]="sluice-bench"; print(json.dumps(d))' | record warm "$r"
  .venv/bin/python benchmarks/python_iter.py "$work/warm.yaml" --seconds "$secs" --json 2>/dev/null | record warm "$r"
  for p in "${peers[@]}"; do
    .venv-bench/bin/python benchmarks/peers/peers.py run "$p" --work "$work" --batch-size $batch \
      --seconds "$secs" --json 2>/dev/null | record warm "$r"
  done
  echo "round $r/$rounds: cold" >&2
  drop
  build/sluice bench "$work/cold.yaml" --seconds "$secs" --json 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); d["peer"]="sluice-bench"; print(json.dumps(d))' | record cold "$r"
  .venv/bin/python benchmarks/python_iter.py "$work/cold.yaml" --seconds "$secs" --cold --json 2>/dev/null | record cold "$r"
  for p in "${peers[@]}"; do
    .venv-bench/bin/python benchmarks/peers/peers.py run "$p" --work "$work" --batch-size $batch \
      --seconds "$secs" --cold --json 2>/dev/null | record cold "$r"
  done
done

python3 - "$results" <<'PY'
import json, statistics, sys
from collections import defaultdict
rows = [json.loads(l) for l in open(sys.argv[1])]
by = defaultdict(dict)  # (case, peer) -> {round: samples/s}
for d in rows:
    by[(d["case"], d["peer"])][d["round"]] = d["samples_per_s"]
order = ["sluice-python", "sluice-bench", "dataloader", "statefuldataloader", "streaming", "webdataset"]
print("| case | loader | samples/s (median) | sluice Python / this loader (median of per-round ratios) |")
print("|---|---|---|---|")
for case in ("warm", "cold"):
    mine = by[(case, "sluice-python")]
    for peer in order:
        runs = by.get((case, peer))
        if not runs:
            continue
        ratios = [mine[r] / runs[r] for r in runs if r in mine and runs[r] > 0]
        print(f"| {case}, 4 KiB | {peer} | {statistics.median(runs.values()):.0f} | "
              f"{statistics.median(ratios):.2f}x |")
print()
print("per round:", {f"{c}/{p}": [round(v) for _, v in sorted(runs.items())] for (c, p), runs in by.items()})
PY

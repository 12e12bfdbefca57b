#!/usr/bin/env bash
# sluice bench against fio on the same shard files (issue 3's targets):
#   cold cache, 4 KiB samples, global shuffle: samples/s vs fio randread 4k direct io_uring QD64
#   cold cache, 64 KiB samples: bytes/s vs fio at bs=64k
#   warm cache, 4 KiB samples: samples/s vs single-job fio psync buffered
# Needs root (drop_caches), fio and a Release build in build/. Prints a markdown table.
# The disk's speed drifts from minute to minute, so each case alternates fio and sluice
# ROUNDS times and reports the medians and the median of the per-round ratios.
#   benchmarks/io_bench.sh [WORKDIR] [SECONDS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/sluice-io-bench}
secs=${2:-10}
rounds=${3:-3}
command -v fio >/dev/null || { echo "io_bench: needs fio (apt-get install fio)"; exit 1; }
cmake --build build --target sluice_cli make_dataset >/dev/null
mkdir -p "$work"

make() {  # make NAME SAMPLES SIZE
  [[ -f "$work/$1/manifest.sluice" ]] || build/benchmarks/make_dataset "$work/$1" "$2" "$3"
}
make ds4k $((2 * 1024 * 1024 * 1024 / 4096)) 4096
make ds64k $((2 * 1024 * 1024 * 1024 / 65536)) 65536

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
files() { ls "$work/$1"/shard-*.sluice | paste -sd: -; }
fio_json() {  # fio_json NAME BS ENGINE DIRECT DEPTH EXTRA...
  local ds=$1 bs=$2 engine=$3 direct=$4 depth=$5; shift 5
  fio --name=peer --filename="$(files "$ds")" --rw=randread --bs="$bs" --direct="$direct" \
      --ioengine="$engine" --iodepth="$depth" --time_based --runtime="$secs" --numjobs=1 \
      --group_reporting --output-format=json "$@" 2>/dev/null
}
fio_iops() { python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["iops"])'; }
fio_bw() { python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["bw_bytes"])'; }
bench() {  # bench NAME DIRECT BATCH -> json
  cat > "$work/$1.yaml" <<YAML
dataset: {path: $1}
batch_size: $3
shuffle: {mode: global}
prefetch: ${SLUICE_BENCH_PREFETCH:-16}
io: {engine: auto, queue_depth: 128, direct: $2, threads: ${SLUICE_BENCH_THREADS:-8}}
YAML
  build/sluice bench "$work/$1.yaml" --seconds "$secs" --json 2>/dev/null
}
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }

median() { python3 -c 'import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))' "$@"; }
ratios() { python3 -c 'import statistics,sys; a=sys.argv[1].split(); b=sys.argv[2].split(); print(f"{statistics.median(float(x)/float(y) for x,y in zip(b,a)):.2f}x")' "$1" "$2"; }

f1=(); s1=(); f2=(); s2=(); f3=(); s3=()
for r in $(seq 1 "$rounds"); do
  drop; f1+=("$(fio_json ds4k 4k io_uring 1 64 | fio_iops)")
  drop; s1+=("$(bench ds4k true 256 | field samples_per_s)")
  drop; f2+=("$(fio_json ds64k 64k io_uring 1 64 | fio_bw)")
  drop; s2+=("$(bench ds64k true 64 | field bytes_per_s)")
done
cat "$work"/ds4k/shard-*.sluice > /dev/null  # warm the page cache
for r in $(seq 1 "$rounds"); do
  f3+=("$(fio_json ds4k 4k psync 0 1 --invalidate=0 | fio_iops)")
  s3+=("$(bench ds4k false 256 | field samples_per_s)")
done

echo "| case | fio (peer), median | sluice bench, median | ratio (median of $rounds rounds) | target |"
echo "|---|---|---|---|---|"
printf "| cold, 4 KiB, global shuffle, samples/s | %.0f IOPS | %.0f | %s | 0.9x |\n" \
  "$(median "${f1[@]}")" "$(median "${s1[@]}")" "$(ratios "${f1[*]}" "${s1[*]}")"
printf "| cold, 64 KiB, global shuffle, bytes/s | %.0f MB/s | %.0f MB/s | %s | 0.9x |\n" \
  "$(python3 -c "print($(median "${f2[@]}")/1e6)")" "$(python3 -c "print($(median "${s2[@]}")/1e6)")" \
  "$(ratios "${f2[*]}" "${s2[*]}")"
printf "| warm, 4 KiB, samples/s (fio psync, 1 job) | %.0f IOPS | %.0f | %s | 0.6x |\n" \
  "$(median "${f3[@]}")" "$(median "${s3[@]}")" "$(ratios "${f3[*]}" "${s3[*]}")"
echo
echo "per round: fio 4k ${f1[*]} | sluice 4k ${s1[*]} | fio 64k ${f2[*]} | sluice 64k ${s2[*]} | fio warm ${f3[*]} | sluice warm ${s3[*]}"

#!/usr/bin/env bash
# Issue 5's numbers: remote reads through sluice's shard server and client against
# ucx_perftest's ucp_am_bw on the same transport (UCX tcp over loopback by default), at
# 4 KiB, 64 KiB and 1 MiB samples. The server reads through its page cache (--direct off) and
# the cache is warm, so this measures the network path, not the disk. Two sluice numbers: the
# client alone (build/benchmarks/remote_bench: requests in flight, every record checked), and
# the Loader (`sluice bench` on a node that has none of the shards: batches assembled from
# remote records). Needs ucx_perftest (apt-get install ucx-utils).
#   benchmarks/remote_bench.sh [WORKDIR] [SECONDS] [ROUNDS]
# env: UCX_TLS (default tcp), SLUICE_REMOTE_PER_REQUEST (default 16), SLUICE_REMOTE_IN_FLIGHT (8)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/sluice-remote-bench}
secs=${2:-10}
rounds=${3:-3}
export UCX_TLS=${UCX_TLS:-tcp}
per_request=${SLUICE_REMOTE_PER_REQUEST:-16}
in_flight=${SLUICE_REMOTE_IN_FLIGHT:-8}
command -v ucx_perftest >/dev/null || { echo "remote_bench: needs ucx_perftest (apt-get install ucx-utils)"; exit 1; }
cmake --build build --target sluice_cli make_dataset remote_bench >/dev/null
mkdir -p "$work"
export SLUICE_TOKEN=bench

declare -A count=([4096]=262144 [65536]=16384 [1048576]=1024)  # 1 GiB each
for size in 4096 65536 1048576; do
  [[ -f "$work/ds$size/manifest.sluice" ]] || build/benchmarks/make_dataset "$work/ds$size" "${count[$size]}" "$size" >/dev/null
  cat "$work/ds$size"/shard-*.sluice > /dev/null
done

sluice_run() {  # sluice_run SIZE -> "client bytes/s loader bytes/s"
  local size=$1 address
  rm -f "$work/serve.json"
  build/sluice serve "$work/ds$size" --listen 127.0.0.1:0 --direct off --json > "$work/serve.json" 2>/dev/null &
  local pid=$!
  for _ in $(seq 50); do [[ -s "$work/serve.json" ]] && break; sleep 0.1; done
  address=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['address'])" "$work/serve.json")
  local per=$per_request
  (( size >= 1048576 )) && per=2  # 2 MiB replies
  (( size <= 4096 )) && per=256
  local client loader shards
  client=$(build/benchmarks/remote_bench "$address" "${count[$size]}" "$secs" "$per" "$in_flight" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_per_s"])')
  # The Loader on a node with only the manifest: every shard comes from the server.
  mkdir -p "$work/remote$size" && cp "$work/ds$size/manifest.sluice" "$work/remote$size/"
  shards=$(ls "$work/ds$size"/shard-*.sluice | wc -l)
  {
    echo "dataset: {path: $work/remote$size}"
    echo "batch_size: $(( size >= 1048576 ? 8 : size >= 65536 ? 64 : 512 ))"
    echo "io: {threads: 4}"
    echo "distributed:"
    echo "  peers:"
    echo "    - {address: \"$address\", shards: [$(seq -s, 0 $((shards - 1)))]}"
  } > "$work/remote$size.yaml"
  loader=$(build/sluice bench "$work/remote$size.yaml" --seconds "$secs" --json 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_per_s"])')
  kill -INT $pid; wait $pid 2>/dev/null || true
  echo "$client $loader"
}
perftest_run() {  # perftest_run SIZE -> bytes/s
  # A port below the ephemeral range (32768-): connections left in TIME_WAIT hold ports there.
  local size=$1 port=$((20000 + RANDOM % 12000)) iters=$((4 * 1024 * 1024 * 1024 / $1))
  (( iters > 2000000 )) && iters=2000000
  ucx_perftest -p "$port" > /dev/null 2>&1 &
  local pid=$!
  sleep 0.5
  ucx_perftest 127.0.0.1 -p "$port" -t ucp_am_bw -s "$size" -n "$iters" -w 1000 -f 2>/dev/null |
    tail -n 1 | awk '{print $(NF-2) * 1048576}'  # -f: last line, overall bandwidth (MB/s) -> bytes/s
  wait $pid 2>/dev/null || true
}

declare -A s l p
for r in $(seq 1 "$rounds"); do
  for size in 4096 65536 1048576; do
    p[$size,$r]=$(perftest_run "$size")
    read -r s[$size,$r] l[$size,$r] <<< "$(sluice_run "$size")"
    echo "round $r size $size: ucx_perftest ${p[$size,$r]} B/s, sluice client ${s[$size,$r]} B/s, loader ${l[$size,$r]} B/s" >&2
  done
done

echo "| sample size | ucx_perftest ucp_am_bw (median) | sluice client (median) | ratio | sluice Loader (median) | ratio | target |"
echo "|---|---|---|---|---|---|---|"
for size in 4096 65536 1048576; do
  ps=(); ss=(); ls=()
  for r in $(seq 1 "$rounds"); do ps+=("${p[$size,$r]}"); ss+=("${s[$size,$r]}"); ls+=("${l[$size,$r]}"); done
  python3 - "$size" "${ps[*]}" "${ss[*]}" "${ls[*]}" <<'PY'
import statistics, sys
size = int(sys.argv[1]); p, s, l = (list(map(float, a.split())) for a in sys.argv[2:5])
med = statistics.median
ratio = lambda xs: med(b / a for a, b in zip(p, xs))  # median of per-round ratios
target = "0.8x" if size >= 65536 else "(recorded)"
print(f"| {size // 1024} KiB | {med(p) / 1e6:.0f} MB/s | {med(s) / 1e6:.0f} MB/s ({med(s) / size:.0f} samples/s) "
      f"| {ratio(s):.2f}x | {med(l) / 1e6:.0f} MB/s ({med(l) / size:.0f} samples/s) | {ratio(l):.2f}x | {target} |")
PY
done

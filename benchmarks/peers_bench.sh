#!/usr/bin/env bash
# What a peer costs a loader: peak file descriptors and resident memory of `sluice bench` reading a
# dataset whose shards are all on NPEERS `sluice serve` processes on loopback (shard k on peer
# k mod NPEERS), against the same loader reading them from NPEERS/8 of those peers: the
# difference over the extra peers is the cost of one. (The same loader reading every shard
# locally is shown too.) Each SLUICE binary given is measured in turn (A/B: an old build against
# a new one), ROUNDS times, alternating.
#   benchmarks/peers_bench.sh WORKDIR NPEERS ROUNDS SLUICE [SLUICE...]
# Prints one line per run: binary, threads, fds, RSS (MiB), the per-peer figures, and the
# samples/s of the remote run (a cost per peer bought with speed would show there).
set -euo pipefail
WORK=$1 NPEERS=$2 ROUNDS=$3
shift 3
BINS=("$@")
SERVER=${BINS[-1]}
HERE=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$WORK" && mkdir -p "$WORK"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
export SLUICE_TOKEN=peers-bench

python3 "$HERE/examples/make_image_folder.py" "$WORK/src" --classes 8 --per-class 400 \
  --min-bytes 1000 --max-bytes 8000 > /dev/null
"$SERVER" pack "$WORK/src" -o "$WORK/full" --shard-size 96K --json > /dev/null
shards=$(ls "$WORK/full"/shard-*.sluice | wc -l)
((shards >= NPEERS)) || { echo "only $shards shards for $NPEERS peers" >&2; exit 1; }
mkdir "$WORK/none"
cp "$WORK/full/manifest.sluice" "$WORK/none/"  # this node has no shard

addrs=()
for ((p = 0; p < NPEERS; p++)); do
  "$SERVER" serve "$WORK/full" --listen 127.0.0.1:0 --json > "$WORK/serve.$p.json" \
    2> "$WORK/serve.$p.err" &
  pids+=($!)
done
for ((p = 0; p < NPEERS; p++)); do
  for _ in $(seq 200); do [[ -s "$WORK/serve.$p.json" ]] && break; sleep 0.05; done
  addrs+=("$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['address'])" \
    "$WORK/serve.$p.json")")
done

FEW=$((NPEERS / 8 > 0 ? NPEERS / 8 : 1))
config() {  # config FILE THREADS [remote [N]]: N (default NPEERS) peers
  {
    echo "dataset: {path: $WORK/$([[ ${3:-} == remote ]] && echo none || echo full)}"
    echo "batch_size: 64"
    echo "io: {threads: $2}"
    if [[ ${3:-} == remote ]]; then
      echo "distributed:"
      echo "  peers:"
      local n=${4:-$NPEERS}
      for ((p = 0; p < n; p++)); do
        s=""
        for ((k = p; k < shards; k += n)); do s+="${s:+, }$k"; done
        echo "    - {address: \"${addrs[$p]}\", shards: [$s]}"
      done
    fi
  } > "$1"
}

measure() {  # measure BINARY CONFIG: "peak_fds peak_rss_kib samples/s" of a 5 s loader run
  "$1" bench "$2" --seconds 5 --json > "$WORK/bench.json" 2> "$WORK/bench.err" &
  local pid=$! fds=0 rss=0 n r
  while kill -0 "$pid" 2> /dev/null; do  # peaks, sampled every 0.1 s
    n=$(ls "/proc/$pid/fd" 2> /dev/null | wc -l)
    r=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status" 2> /dev/null || true)
    ((n > fds)) && fds=$n
    [[ -n $r ]] && ((r > rss)) && rss=$r
    sleep 0.1
  done
  wait "$pid" || { cat "$WORK/bench.err" >&2; return 1; }
  echo "$fds $rss $(python3 -c "import json,sys; print(int(json.load(open(sys.argv[1]))['samples_per_s']))" "$WORK/bench.json")"
}

for threads in 2 4; do
  config "$WORK/local.$threads.yaml" "$threads"
  config "$WORK/remote.$threads.yaml" "$threads" remote
  config "$WORK/few.$threads.yaml" "$threads" remote "$FEW"
done
for ((r = 1; r <= ROUNDS; r++)); do
  for bin in "${BINS[@]}"; do
    for threads in 2 4; do
      read -r lf lr _ <<< "$(measure "$bin" "$WORK/local.$threads.yaml")"
      read -r ff fr _ <<< "$(measure "$bin" "$WORK/few.$threads.yaml")"
      read -r rf rr rs <<< "$(measure "$bin" "$WORK/remote.$threads.yaml")"
      python3 - "$bin" "$threads" "$FEW" "$NPEERS" "$lf" "$lr" "$ff" "$fr" "$rf" "$rr" "$rs" <<'EOF'
import sys
b, t, k, n, lf, lr, ff, fr, rf, rr, rs = sys.argv[1], *map(int, sys.argv[2:])
print(f"{b} threads={t} local: {lf} fds {lr/1024:.0f} MiB; {k} peers: {ff} fds {fr/1024:.0f} MiB;"
      f" {n} peers: {rf} fds {rr/1024:.0f} MiB, {rs} samples/s;"
      f" per peer: {(rf-ff)/(n-k):.1f} fds {(rr-fr)/(n-k)/1024:.2f} MiB")
EOF
    done
  done
done

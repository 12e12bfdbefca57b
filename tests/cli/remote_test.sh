#!/usr/bin/env bash
# End to end across processes: two `sluice serve` processes hold a dataset; a loader (sluice
# bench) on a node with only half the shards reads the rest from them; one server is killed
# mid-run (the replica takes over), then a loader without a replica loses its only peer.
#   tests/cli/remote_test.sh SLUICE
set -uo pipefail
SLUICE=$1
TMP=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done; rm -rf "$TMP"; }
trap cleanup EXIT
passes=0 fails=0
check() {  # check NAME CMD...
  if "${@:2}"; then passes=$((passes + 1)); else echo "FAIL: $1"; fails=$((fails + 1)); fi
}
export SLUICE_TOKEN=remote-test

python3 "$(dirname "$0")/../../examples/make_image_folder.py" "$TMP/src" --classes 4 \
  --per-class 80 --min-bytes 1000 --max-bytes 30000
"$SLUICE" pack "$TMP/src" -o "$TMP/full" --shard-size 1M --json > /dev/null
shards=$(ls "$TMP/full"/shard-*.sluice | wc -l)
mkdir "$TMP/half"
cp "$TMP/full/manifest.sluice" "$TMP/half/"
odd=""
for ((k = 0; k < shards; k++)); do
  f=$(printf "shard-%05d.sluice" $k)
  if ((k % 2 == 0)); then cp "$TMP/full/$f" "$TMP/half/"; else odd+="${odd:+, }$k"; fi
done

serve() {  # serve NAME [ARGS]: starts a server; sets $addr
  local name=$1; shift
  "$SLUICE" serve "$TMP/full" --listen 127.0.0.1:0 --json "$@" > "$TMP/$name.json" 2> "$TMP/$name.err" &
  pids+=($!)
  disown $! 2>/dev/null || true
  eval "${name}_pid=$!"
  for _ in $(seq 100); do [[ -s "$TMP/$name.json" ]] && break; sleep 0.05; done
  addr=$(python3 -c "import json; print(json.load(open('$TMP/$name.json'))['address'])")
  eval "${name}_addr=$addr"
}
# O_DIRECT where the file system takes it (auto reads a dataset this small through the page cache).
odirect=$(python3 -c "
import mmap, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT); os.preadv(fd, [mmap.mmap(-1, 4096)], 0); print('on')
except OSError:
    print('off')" "$TMP/full/manifest.sluice")
serve a --direct "$odirect"
serve b --direct off  # through the page cache
check "serve --direct off says it reads through the page cache" grep -q '"io":"[^"]*page cache' "$TMP/b.json"

config() {  # config FILE PEER...
  local file=$1; shift
  {
    echo "dataset: {path: $TMP/half}"
    echo "batch_size: 16"
    echo "drop_last: false"
    echo "io: {threads: 2}"
    echo "distributed:"
    echo "  peer_timeout_ms: 2000"
    echo "  peers:"
    for p in "$@"; do echo "    - {address: \"$p\", shards: [$odd]}"; done
  } > "$file"
}
config "$TMP/both.yaml" "$a_addr" "$b_addr"
config "$TMP/one.yaml" "$a_addr"
sed "s|$TMP/half|$TMP/full|; /distributed:/,\$d" "$TMP/both.yaml" > "$TMP/local.yaml"

samples() { python3 -c "import json,sys; print(json.load(sys.stdin)['samples'])"; }
local_n=$("$SLUICE" bench "$TMP/local.yaml" --epochs 2 --json 2>/dev/null | samples)
remote_n=$("$SLUICE" bench "$TMP/both.yaml" --epochs 2 --json 2>/dev/null | samples)
check "remote epochs deliver what local ones do ($local_n)" test "$remote_n" = "$local_n"

# Loaders killed in the middle of transfers (kill -9: their connections drop with replies in
# flight) leave both servers serving.
for k in 1 2 3; do
  "$SLUICE" bench "$TMP/both.yaml" --seconds 5 > /dev/null 2>&1 &
  victim=$!
  sleep "0.$((3 * k))"
  kill -9 "$victim"
  wait "$victim" 2>/dev/null
done
check "servers survive loaders killed mid-transfer" kill -0 "$a_pid" "$b_pid"
again_n=$("$SLUICE" bench "$TMP/both.yaml" --epochs 2 --json 2>/dev/null | samples)
check "and still serve whole epochs ($again_n)" test "$again_n" = "$local_n"

# Server a dies a second into a 3-second run: the replica b serves the rest.
"$SLUICE" bench "$TMP/both.yaml" --seconds 3 --json > "$TMP/failover.json" 2> "$TMP/failover.err" &
bench=$!
# Mid-run: once the loader is connected to a (its handshake connection to a's port).
a_port=${a_addr##*:}
# (The loader reconnects each epoch, so a connection is looked for, not checked twice.)
reached_a() {
  for _ in $(seq 1 1000); do
    ss -tnp state established 2>/dev/null | grep "pid=$bench," | grep -q ":$a_port" && return 0
    sleep 0.01
  done
  return 1
}
check "failover: the loader reads from a before a dies" reached_a
kill -9 "$a_pid"
wait $bench
rc=$?
check "failover: the run completes" test $rc -eq 0
check "failover: the dead peer is named once on stderr" grep -q "peer $a_addr: .*replicas" "$TMP/failover.err"

# With only a (dead now), the loader fails naming it, within the peer timeout.
start=$(date +%s)
"$SLUICE" bench "$TMP/one.yaml" --seconds 3 --json > /dev/null 2> "$TMP/dead.err"
rc=$?
check "no replica: non-zero exit" test $rc -ne 0
check "no replica: names the peer" grep -q "peer $a_addr" "$TMP/dead.err"
check "no replica: fails fast" test $(( $(date +%s) - start )) -le 10
[[ $fails -eq 0 ]] || { for f in failover dead a b; do echo "--- $f.err"; cat "$TMP/$f.err"; done; }
echo "$passes passed, $fails failed"
[[ $fails -eq 0 ]]

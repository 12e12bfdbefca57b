#!/usr/bin/env bash
# End-to-end test of the `sluice` CLI as a user runs it: pack a directory tree, inspect,
# verify, print per-rank orders, and check the errors for bad input.
# Usage: cli_test.sh path/to/sluice
set -euo pipefail
SLUICE=${1:?usage: cli_test.sh path/to/sluice}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fails=0
passes=0
check() {  # check NAME CONDITION...
  local name=$1; shift
  if "$@"; then passes=$((passes + 1)); else echo "FAIL: $name"; fails=$((fails + 1)); fi
}
expect_fail() {  # expect_fail NAME PATTERN CMD...: non-zero exit and PATTERN on stderr
  local name=$1 pattern=$2; shift 2
  local err rc=0
  err=$("$@" 2>&1 >/dev/null) || rc=$?
  if [[ $rc -ne 0 && "$err" == *"$pattern"* ]]; then passes=$((passes + 1));
  else echo "FAIL: $name (rc=$rc, stderr: $err)"; fails=$((fails + 1)); fi
}

# A tree of 3 classes, 211 files of varied sizes (some empty), plus hidden files to ignore.
for c in ant bee cow; do mkdir -p "$TMP/src/$c"; done
for i in $(seq 0 210); do
  c=$(( i % 3 )); cls=(ant bee cow)
  head -c $(( (i * 977) % 9000 )) /dev/urandom > "$TMP/src/${cls[$c]}/f$i.bin"
done
touch "$TMP/src/.DS_Store" "$TMP/src/ant/.hidden"

"$SLUICE" --help >/dev/null
check "help lists commands" bash -c "'$SLUICE' --help | grep -q order"
"$SLUICE" pack "$TMP/src" -o "$TMP/ds" --shard-size 64K >/dev/null
check "pack made a manifest" test -f "$TMP/ds/manifest.sluice"
check "pack left no staging dir" bash -c "! ls -a '$TMP' | grep -q partial"

json=$("$SLUICE" inspect "$TMP/ds" --json)
python3 - "$json" <<'PY' || { echo "FAIL: inspect --json"; exit 1; }
import json, sys
d = json.loads(sys.argv[1])
assert d["samples"] == 211, d["samples"]
assert d["shards"] > 1, d["shards"]
assert d["fields"]["data"]["dtype"] == "uint8" and d["fields"]["label"]["dtype"] == "int64"
assert d["classes"] == ["ant", "bee", "cow"]
assert d["bytes"] > 0
PY
check "inspect text" bash -c "'$SLUICE' inspect '$TMP/ds' | grep -q 'samples   211'"
check "verify ok" "$SLUICE" verify "$TMP/ds"

# Per-rank order: ranks partition the epoch, every rank the same length, deterministic.
cat > "$TMP/train.yaml" <<YAML
dataset: {path: ds}
batch_size: 8
drop_last: false
seed: 3
shuffle: {mode: global}
YAML
for r in 0 1 2; do "$SLUICE" order "$TMP/train.yaml" --rank $r --world-size 3 --epoch 1 > "$TMP/o$r"; done
check "ranks equal length" test "$(wc -l < "$TMP/o0")" -eq "$(wc -l < "$TMP/o2")"
check "every sample once" test "$(cat "$TMP"/o? | grep -v pad | sort -n | uniq | wc -l)" -eq 211
check "no duplicates" test "$(cat "$TMP"/o? | grep -v pad | wc -l)" -eq 211
check "padding marked" test "$(cat "$TMP"/o? | grep -c pad)" -eq 2
"$SLUICE" order "$TMP/train.yaml" --rank 0 --world-size 3 --epoch 1 > "$TMP/again"
check "deterministic" cmp -s "$TMP/o0" "$TMP/again"
"$SLUICE" order "$TMP/train.yaml" --rank 0 --world-size 3 --epoch 2 > "$TMP/e2"
check "epochs differ" bash -c "! cmp -s '$TMP/o0' '$TMP/e2'"
# Elastic resume from the CLI: 2 global batches of 3x8 done, the rest on 2 ranks.
for r in 0 1; do "$SLUICE" order "$TMP/train.yaml" --rank $r --world-size 2 --epoch 1 --position 48 > "$TMP/r$r"; done
check "elastic rest" test "$( (head -16 "$TMP/o0"; head -16 "$TMP/o1"; head -16 "$TMP/o2"; cat "$TMP"/r?) | grep -v pad | sort -n | uniq | wc -l)" -eq 211
check "order --json" bash -c "'$SLUICE' order '$TMP/train.yaml' --rank 1 --world-size 3 --json | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"batches\"] == 9 and len(d[\"indices\"]) == 71 and d[\"padding\"] == [], d'"

# bench: one epoch through the C++ loader, every sample touched; Ctrl-C stops it promptly.
check "bench --epochs 1" bash -c "'$SLUICE' bench '$TMP/train.yaml' --epochs 1 --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"samples\"] == 211 and d[\"batches\"] == 27 and 0 <= d[\"wait_fraction\"] <= 1, d'"
"$SLUICE" bench "$TMP/train.yaml" --seconds 60 --json > "$TMP/bench.json" 2>/dev/null &
pid=$!
# Ready once it reads: the loader has the dataset's shards open.
for _ in $(seq 1 1000); do ls -l /proc/$pid/fd 2>/dev/null | grep -q "shard-" && break; sleep 0.01; done
check "bench: started reading before the Ctrl-C" bash -c "ls -l /proc/$pid/fd | grep -q shard-"
start=$(date +%s)
kill -INT $pid
rc=0; wait $pid || rc=$?
check "bench: Ctrl-C exits 130" test $rc -eq 130
check "bench: Ctrl-C is prompt" test $(( $(date +%s) - start )) -le 5
check "bench: Ctrl-C still reports" python3 -c "import json; assert json.load(open('$TMP/bench.json'))['interrupted']"

# Bad input: non-zero exit and a one-line reason that names the input.
expect_fail "missing dataset" "nope: dataset not found" "$SLUICE" inspect "$TMP/nope"
expect_fail "pack exists" "already exists" "$SLUICE" pack "$TMP/src" -o "$TMP/ds"
check "pack --force" "$SLUICE" pack "$TMP/src" -o "$TMP/ds" --force --json --shard-size 64K
expect_fail "bad shard size" "size \"12X\"" "$SLUICE" pack "$TMP/src" -o "$TMP/x" --shard-size 12X
expect_fail "bad arg" "" "$SLUICE" order
printf 'dataset: {path: ds}\nshuffle:\n  mode: globl\n' > "$TMP/bad.yaml"
expect_fail "config error" "bad.yaml:3: shuffle.mode: unknown value \"globl\"" "$SLUICE" order "$TMP/bad.yaml" --rank 0 --world-size 1
expect_fail "rank range" "rank 3 out of range" "$SLUICE" order "$TMP/train.yaml" --rank 3 --world-size 3

# Corruption: verify names the shard file and the sample, and exits non-zero.
cp -r "$TMP/ds" "$TMP/bad"
python3 - "$TMP/bad/shard-00001.sluice" <<'PY'
import sys
p = sys.argv[1]
with open(p, "r+b") as f:
    f.seek(4096 + 10)
    b = f.read(1)
    f.seek(4096 + 10)
    f.write(bytes([b[0] ^ 0xff]))
PY
expect_fail "verify flipped byte" "shard-00001.sluice: sample" "$SLUICE" verify "$TMP/bad"
truncate -s 5000 "$TMP/bad/shard-00002.sluice"
expect_fail "verify truncated" "shard-00002.sluice: truncated" "$SLUICE" verify "$TMP/bad"
rm "$TMP/bad/shard-00002.sluice"
expect_fail "verify missing" "shard-00002.sluice: shard 2 is missing" "$SLUICE" verify "$TMP/bad"

# More shards than the soft open-file limit allows: raised toward the hard limit, saying so;
# with the hard limit too low, an error that says how many descriptors are needed.
python3 "$(dirname "$0")/../../examples/make_image_folder.py" "$TMP/fds" --classes 2 --per-class 300 \
  --min-bytes 3000 --max-bytes 5000 >/dev/null
"$SLUICE" pack "$TMP/fds" -o "$TMP/fdds" --shard-size 8K >/dev/null
check "many shards: the soft fd limit is raised" \
  bash -c "ulimit -Sn 200; '$SLUICE' verify '$TMP/fdds' 2>&1 | grep -q 'raised the open-file limit'"
expect_fail "many shards: a hard fd limit too low says how many" "needs about" \
  bash -c "ulimit -n 200; exec '$SLUICE' verify '$TMP/fdds'"

# A pack killed mid-way leaves no directory that looks complete: the destination either does
# not exist or verifies, and the hidden staging directory is not a dataset.
python3 "$(dirname "$0")/../../examples/make_image_folder.py" "$TMP/many" --classes 2 --per-class 1500 \
  --min-bytes 16384 --max-bytes 65536
"$SLUICE" pack "$TMP/many" -o "$TMP/killed" --shard-size 1M >/dev/null &
pid=$!
for _ in $(seq 1 2000); do  # until the pack has closed a few shards (at most ~10 s)
  compgen -G "$TMP/.killed.partial-*/shard-00002.sluice" >/dev/null && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.005
done
# The kill must land mid-pack (the input is ~120 shards): a pack that finished first would make
# this check vacuous, so that fails too.
check "killed pack: still packing at the kill" kill -0 $pid
kill -9 $pid 2>/dev/null || true
wait $pid 2>/dev/null || true
check "killed pack: no destination" test ! -e "$TMP/killed"
partial=$(ls -d "$TMP"/.killed.partial-* 2>/dev/null | head -1)
check "killed pack: left a hidden staging dir" test -n "$partial"
expect_fail "killed pack: staging dir is no dataset" "not a packed sluice dataset" "$SLUICE" inspect "$partial"
"$SLUICE" pack "$TMP/many" -o "$TMP/killed" --shard-size 1M >/dev/null
check "killed pack: a second pack completes and verifies" "$SLUICE" verify "$TMP/killed"

# ENOSPC while packing (a 4 MiB tmpfs; needs root to mount, skipped otherwise): a clear error
# and no destination that looks like a dataset.
if [[ $(id -u) -eq 0 ]] && mkdir -p "$TMP/small" && mount -t tmpfs -o size=4m tmpfs "$TMP/small" 2>/dev/null; then
  expect_fail "ENOSPC pack: error names the cause" "No space left on device" \
    "$SLUICE" pack "$TMP/many" -o "$TMP/small/full" --shard-size 1M
  check "ENOSPC pack: no destination" test ! -e "$TMP/small/full"
  # The failed pack removes its staging directory; if one is left it must not read as a dataset.
  for partial in "$TMP"/small/.full.partial-*; do
    [[ -e "$partial" ]] || continue
    expect_fail "ENOSPC pack: staging dir is no dataset" "not a packed sluice dataset" \
      "$SLUICE" inspect "$partial"
  done
  umount "$TMP/small"
else
  echo "skip: ENOSPC pack (needs root to mount a small tmpfs)"
fi

# A flat uint16 token file (as nanoGPT writes it), read in place and packed.
head -c 20000 /dev/urandom > "$TMP/train.bin"
cat > "$TMP/tokens.yaml" <<YAML
dataset: {path: train.bin, format: tokens, seq_len: 100, stride: 50}
batch_size: 7
YAML
check "tokens: order reads the file in place" \
  test "$("$SLUICE" order "$TMP/tokens.yaml" --rank 0 --world-size 1 --epoch 0 | wc -l)" -eq 196
check "tokens: pack" "$SLUICE" pack "$TMP/train.bin" -o "$TMP/tok" --format tokens --seq-len 100 \
  --stride 50 --json
check "tokens: packed windows" bash -c "'$SLUICE' inspect '$TMP/tok' --json | grep -q '\"samples\": *199'"
check "tokens: packed verify" "$SLUICE" verify "$TMP/tok"
head -c 20001 /dev/urandom > "$TMP/odd.bin"
expect_fail "tokens: odd byte count" "not a whole number of 2-byte tokens" \
  "$SLUICE" pack "$TMP/odd.bin" -o "$TMP/odd" --format tokens --seq-len 10
expect_fail "tokens: seq-len required" "dataset.seq_len: required" \
  "$SLUICE" pack "$TMP/train.bin" -o "$TMP/x" --format tokens
expect_fail "serve: nothing to serve" "give a DATASET, --checkpoint-dir DIR, or both" \
  "$SLUICE" serve --listen 127.0.0.1:0 --no-token
expect_fail "serve: checkpoint copies need a token" "takes copies only from the cluster's token" \
  "$SLUICE" serve --checkpoint-dir "$TMP/copies" --listen 127.0.0.1:0 --no-token
# UCX is loaded when a server or client starts: without it, a message that says what to install
# (tests/python/test_wheel.py hides the real library; this names a file that is not there).
expect_fail "serve: no UCX on the machine" "apt-get install libucx0" \
  env SLUICE_UCX_LIBRARY="$TMP/no-such-libucp.so.0" "$SLUICE" serve "$TMP/ds" --listen 127.0.0.1:0 --no-token
check "inspect needs no UCX" env SLUICE_UCX_LIBRARY="$TMP/no-such-libucp.so.0" "$SLUICE" inspect "$TMP/ds"

echo "$passes passed, $fails failed"
[[ $fails -eq 0 ]]

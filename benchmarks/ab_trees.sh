#!/usr/bin/env bash
# Two trees' Release builds against each other (a change against its base: "nothing slower"),
# alternating base and new in every round, medians and per-round ratios new/base:
#   warm4k   sluice bench, 4 KiB samples in the page cache, default config (no io: section)
#   python   the Python iterator over the same data (benchmarks/python_iter.py)
#   cold4k   sluice bench after drop_caches, io.direct: true
#   remote   sluice bench on a node with no shards: 64 KiB records from a `sluice serve` of the
#            same tree over UCX tcp on loopback
#   decode   sluice bench with transforms (decode, random_resized_crop 224, flip) on JPEG tars
# Each tree needs build/ (sluice, benchmarks/make_dataset, python/); NEW also .venv. Root for
# drop_caches.
#   benchmarks/ab_trees.sh BASE_TREE NEW_TREE [WORKDIR] [SECONDS] [ROUNDS]
set -uo pipefail
base=$(realpath "$1") new=$(realpath "$2") work=${3:-/var/tmp/sluice-ab} secs=${4:-4} rounds=${5:-5}
mkdir -p "$work"
[[ -f $work/ds4k/manifest.sluice ]] || "$new/build/benchmarks/make_dataset" "$work/ds4k" 262144 4096 >/dev/null
[[ -f $work/ds64k/manifest.sluice ]] || "$new/build/benchmarks/make_dataset" "$work/ds64k" 16384 65536 >/dev/null
if [[ ! -f $work/jpg/shard-3.tar ]]; then
  mkdir -p "$work/jpg"
  "$new/.venv/bin/python" - "$work/jpg" "$new/benchmarks" <<'PY'
import io, sys, tarfile
import numpy as np
sys.path.insert(0, sys.argv[2])
from jpegs import photo_jpeg
rng = np.random.default_rng(0)
for s in range(4):
    with tarfile.open(f"{sys.argv[1]}/shard-{s}.tar", "w") as t:
        for i in range(250):
            for suffix, data in (("jpg", photo_jpeg(rng)), ("cls", str(i % 10).encode())):
                info = tarfile.TarInfo(f"{s:02d}{i:05d}.{suffix}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
PY
fi
printf 'dataset: {path: %s}\nbatch_size: 256\nshuffle: {mode: global}\n' "$work/ds4k" > "$work/warm.yaml"
printf 'dataset: {path: %s}\nbatch_size: 256\nshuffle: {mode: global}\nio: {direct: true}\n' "$work/ds4k" > "$work/cold.yaml"
cat > "$work/decode.yaml" <<Y
dataset: {path: $work/jpg, format: tar}
batch_size: 64
shuffle: {mode: global}
transforms:
  jpg: [{decode: rgb}, {random_resized_crop: {size: 224}}, {flip: 0.5}]
Y
field() { python3 -c "import json,sys; print(round(json.load(sys.stdin)['$1']))"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
bench() { "$1/build/sluice" bench "$2" --seconds "$secs" --json 2>/dev/null | field "$3"; }
remote() {  # remote TREE -> bytes/s
  local t=$1 address shards pid
  rm -f "$work/serve.json"
  SLUICE_TOKEN=bench "$t/build/sluice" serve "$work/ds64k" --listen 127.0.0.1:0 --direct off --json \
    > "$work/serve.json" 2>/dev/null &
  pid=$!
  for _ in $(seq 50); do [[ -s $work/serve.json ]] && break; sleep 0.1; done
  address=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['address'])" "$work/serve.json")
  mkdir -p "$work/remote" && cp "$work/ds64k/manifest.sluice" "$work/remote/"
  shards=$(ls "$work"/ds64k/shard-*.sluice | wc -l)
  printf 'dataset: {path: %s}\nbatch_size: 64\nio: {threads: 4}\ndistributed:\n  peers:\n    - {address: "%s", shards: [%s]}\n' \
    "$work/remote" "$address" "$(seq -s, 0 $((shards - 1)))" > "$work/remote.yaml"
  SLUICE_TOKEN=bench UCX_TLS=tcp bench "$t" "$work/remote.yaml" bytes_per_s
  kill -INT $pid; wait $pid 2>/dev/null
}
out=$work/ab.txt
: > "$out"
for r in $(seq "$rounds"); do
  for t in "$base" "$new"; do
    tag=$([[ $t == "$base" ]] && echo base || echo new)
    cat "$work"/ds4k/shard-*.sluice > /dev/null
    w=$(bench "$t" "$work/warm.yaml" samples_per_s)
    p=$(PYTHONPATH=$t/build/python "$new/.venv/bin/python" "$new/benchmarks/python_iter.py" "$work/warm.yaml" \
        --seconds "$secs" --json 2>/dev/null | field samples_per_s)
    drop; c=$(bench "$t" "$work/cold.yaml" samples_per_s)
    cat "$work"/ds64k/shard-*.sluice > /dev/null
    m=$(remote "$t")
    d=$(bench "$t" "$work/decode.yaml" samples_per_s)
    echo "round $r $tag warm4k $w python $p cold4k $c remote $m decode $d" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    t = line.split()
    for k, v in zip(t[3::2], t[4::2]):
        runs[k][t[2]].append(float(v))
print("| case | base, median | new, median | new/base (medians) | per round |")
print("|---|---|---|---|---|")
for k, r in runs.items():
    b, n = r["base"], r["new"]
    per = ", ".join(f"{x / y:.2f}" for x, y in zip(n, b))
    print(f"| {k} | {statistics.median(b):.4g} | {statistics.median(n):.4g} | "
          f"{statistics.median(n) / statistics.median(b):.2f} | {per} |")
PY

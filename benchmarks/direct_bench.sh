#!/usr/bin/env bash
# Issue 19's numbers: what a user gets with an empty `io:` section (io.direct: auto) against
# io.direct: true and io.direct: false, `sluice bench` samples/s, global shuffle, in four states:
#   resident  every byte of the dataset in the page cache (read once before)
#   cold      caches dropped just before the run
#   half      caches dropped, then half of the dataset read
#   small     caches dropped, run inside a memory cgroup whose limit is below the dataset's size
#             (a dataset larger than the memory the process may use)
# for 4 KiB and 64 KiB samples, packed and as WebDataset tars. Each case alternates the three
# configs ROUNDS times and reports medians, and auto against the better of the other two.
# Needs root (drop_caches, a cgroup v1 memory controller or cgroup v2) and a Release build.
#   benchmarks/direct_bench.sh [WORKDIR] [SECONDS] [ROUNDS] [DATASET_MB]
# env: DATASETS (default "p4096 p65536 t4096 t65536"), STATES (default "resident cold half small")
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/sluice-direct-bench}
secs=${2:-4}
rounds=${3:-3}
mb=${4:-1600}
cmake --build build --target sluice_cli make_dataset >/dev/null
mkdir -p "$work"

# The datasets: packed by make_dataset, and the same samples as tar shards of ~256 MB.
for size in 4096 65536; do
  n=$((mb * 1024 * 1024 / size))
  [[ -f "$work/p$size/manifest.sluice" ]] || build/benchmarks/make_dataset "$work/p$size" "$n" "$size" >/dev/null
  if [[ ! -d "$work/t$size" ]]; then
    python3 - "$work/t$size" "$n" "$size" <<'PY'
import io, os, sys, tarfile
out, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(out + ".tmp", exist_ok=True)
per = max(1, (256 << 20) // (size + 1024))
payload = bytearray(os.urandom(size))
for s in range(0, n, per):
    with tarfile.open(f"{out}.tmp/shard-{s // per:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as t:
        for i in range(s, min(n, s + per)):
            payload[:8] = i.to_bytes(8, "little")
            for ext, data in (("bin", bytes(payload)), ("cls", str(i % 10).encode())):
                info = tarfile.TarInfo(f"s{i:09d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
os.rename(out + ".tmp", out)
PY
  fi
done

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
shards() { ls "$work/$1"/*.sluice "$work/$1"/*.tar 2>/dev/null | grep -v manifest; }
warm() { shards "$1" | xargs cat > /dev/null; }
warm_half() { local all; all=$(shards "$1"); echo "$all" | head -n $(( $(echo "$all" | wc -l) / 2 )) | xargs cat > /dev/null; }
dataset_bytes() { du -sb "$work/$1" | cut -f1; }

# A memory cgroup with a limit at half the dataset's size (v1 here; v2 where mounted so).
cg=""
cg_setup() {  # cg_setup BYTES
  if [[ -d /sys/fs/cgroup/memory ]]; then
    cg=/sys/fs/cgroup/memory/sluice-direct-bench
    mkdir -p "$cg"
    echo "$1" > "$cg/memory.limit_in_bytes"
  else
    cg=/sys/fs/cgroup/sluice-direct-bench
    mkdir -p "$cg"
    echo "$1" > "$cg/memory.max"
  fi
}
# A run's last process may still be leaving the cgroup at exit (rmdir: EBUSY): try a few times.
cg_cleanup() {
  [[ -n "$cg" ]] || return 0
  for _ in 1 2 3 4 5; do [[ ! -d "$cg" ]] || rmdir "$cg" 2>/dev/null && return 0; sleep 1; done
  echo "direct_bench: could not remove $cg" >&2
}
trap cg_cleanup EXIT

run() {  # run DATASET STATE CONFIG -> samples/s
  local ds=$1 state=$2 cfg=$3 format=shards
  [[ $ds == t* ]] && format=tar
  {
    echo "dataset: {path: $work/$ds, format: $format}"
    echo "batch_size: 256"
    echo "shuffle: {mode: global}"
    case $cfg in
      auto) ;;  # what a user gets: no io: section
      direct) echo "io: {direct: true}" ;;
      buffered) echo "io: {direct: false}" ;;
    esac
  } > "$work/run.yaml"
  case $state in
    resident) warm "$ds" ;;
    cold) drop ;;
    half) drop; warm_half "$ds" ;;
    small) drop ;;
  esac
  local cmd=(build/sluice bench "$work/run.yaml" --seconds "$secs" --json)
  if [[ $state == small ]]; then
    cg_setup $(( $(dataset_bytes "$ds") / 2 ))
    sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$cg" "${cmd[@]}" 2>"$work/run.err"
  else
    "${cmd[@]}" 2>"$work/run.err"
  fi | python3 -c 'import json,sys; print(json.load(sys.stdin)["samples_per_s"])'
}

echo "| dataset | state | auto (median) | direct: true | direct: false | auto / best | auto chose |"
echo "|---|---|---|---|---|---|---|"
for ds in ${DATASETS:-p4096 p65536 t4096 t65536}; do
  for state in ${STATES:-resident cold half small}; do
    a=(); d=(); b=(); chose=""
    for r in $(seq 1 "$rounds"); do
      a+=("$(run "$ds" "$state" auto)")
      chose=$(grep -o "direct I/O[^;]*" "$work/run.err" | head -1 || true)
      d+=("$(run "$ds" "$state" direct)")
      b+=("$(run "$ds" "$state" buffered)")
    done
    python3 - "$ds" "$state" "${a[*]}" "${d[*]}" "${b[*]}" "$chose" <<'PY'
import statistics, sys
ds, state = sys.argv[1], sys.argv[2]
a, d, b = (list(map(float, x.split())) for x in sys.argv[3:6])
med = statistics.median
best = max(med(d), med(b))
print(f"| {ds} | {state} | {med(a):,.0f} | {med(d):,.0f} | {med(b):,.0f} | {med(a) / best:.2f} | {sys.argv[6][:70]} |")
PY
  done
done

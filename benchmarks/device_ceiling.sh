#!/usr/bin/env bash
# Issue 33: cold reads against fio's best on the same files, on this machine's disk and on a
# RAM-backed loop device (a device faster than any disk here). For each device and sample size
# (4 KiB, 64 KiB) and each round, caches dropped before every run: fio's sweep (io_uring,
# O_DIRECT, random reads, QD 32/64/128/256 x 1 or 2 jobs), then `sluice bench` with the default
# config (no io: section) and with io.direct: true. Prints per-round lines with sluice's own
# accounts (CPU per sample, reads in flight, idle share, loader stages) and a table of medians:
# each sluice figure against the best fio configuration of the same round.
#   [DEVICES="disk loop"] [SIZES="4k 64k"] benchmarks/device_ceiling.sh [WORKDIR] [SECONDS] [ROUNDS] [GIB]
# Needs root (drop_caches, losetup, mount), fio, and a Release build in build/. The loop device
# lives in /dev/shm (GIB x 2 + 10%); it is unmounted, detached and deleted on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/sluice-ceiling}
secs=${2:-5}
rounds=${3:-3}
gib=${4:-1}
devices=${DEVICES:-disk loop}
sizes=${SIZES:-4k 64k}
command -v fio >/dev/null || { echo "device_ceiling: needs fio (apt-get install fio)"; exit 1; }
cmake --build build --target sluice_cli make_dataset >/dev/null
mkdir -p "$work"

img=/dev/shm/sluice-ceiling.img mnt=$work/loop loop=""
cleanup() {
  for _ in 1 2 3 4 5; do ! mountpoint -q "$mnt" || umount "$mnt" && break; sleep 1; done
  [ -n "$loop" ] && losetup -d "$loop"
  rm -f "$img"
}
trap cleanup EXIT

make_sets() {  # make_sets DIR: 4 KiB and 64 KiB samples, GIB each
  mkdir -p "$1"
  local n=$((gib * 1024 * 1024 * 1024))
  [ -f "$1/p4k/manifest.sluice" ] || build/benchmarks/make_dataset "$1/p4k" $((n / 4096)) 4096 >/dev/null
  [ -f "$1/p64k/manifest.sluice" ] || build/benchmarks/make_dataset "$1/p64k" $((n / 65536)) 65536 >/dev/null
}
make_sets "$work/disk"
truncate -s $((gib * 2 * 1100))M "$img"
loop=$(losetup -f --show "$img")
mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$loop"
mkdir -p "$mnt"
mount "$loop" "$mnt"
make_sets "$mnt"

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
fio_run() {  # fio_run DIR BS QD JOBS -> "value cpu_us_per_io"
  fio --name=peer --filename="$(ls "$1"/shard-*.sluice | paste -sd: -)" --rw=randread --bs="$2" \
      --direct=1 --ioengine=io_uring --iodepth="$3" --numjobs="$4" --group_reporting \
      --time_based --runtime="$secs" --output-format=json 2>/dev/null | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]; r = j["read"]
print(r["bw_bytes"], (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000 / max(1, r["total_ios"]) * 1e6)'
}
sluice_run() {  # sluice_run DIR BATCH IO-LINE -> "bytes_per_s cpu_us inflight idle stages"
  printf 'dataset: {path: %s}\nbatch_size: %s\nshuffle: {mode: global}\n%s\n' "$1" "$2" "$3" \
    > "$work/bench.yaml"
  build/sluice bench "$work/bench.yaml" --seconds "$secs" --json 2>/dev/null | python3 -c '
import json, sys
j = json.load(sys.stdin)
st = " ".join("%s=%.2f" % (k, v) for k, v in j["stage_seconds"].items() if v >= 0.01)
print(j["bytes_per_s"], "%.2f %.1f %.3f %s %s" % (j["cpu_us_per_sample"], j["io_inflight_mean"],
      j["io_idle_fraction"], "direct" if j["direct_io"] else "cache", st))'
}

results=$work/results.txt
: > "$results"
for r in $(seq 1 "$rounds"); do
  for dev in $devices; do
    root=$work/disk
    [ "$dev" = loop ] && root=$mnt
    for size in $sizes; do
      ds=$root/p$size batch=256
      [ "$size" = 64k ] && batch=64
      for qd in 32 64 128 256; do
        for jobs in 1 2; do
          drop
          echo "$r $dev $size fio qd$qd/j$jobs $(fio_run "$ds" "$size" "$qd" "$jobs")" | tee -a "$results"
        done
      done
      drop
      echo "$r $dev $size sluice default $(sluice_run "$ds" "$batch" "")" | tee -a "$results"
      drop
      echo "$r $dev $size sluice direct $(sluice_run "$ds" "$batch" "io: {direct: true}")" |
        tee -a "$results"
    done
  done
done

python3 - "$results" <<'EOF'
import collections, statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
best = {}  # (round, dev, size) -> (bytes/s, config, cpu)
ours = collections.defaultdict(list)  # (dev, size, config) -> [(ratio, bytes/s, cpu, cpu ratio, inflight, idle)]
for r in rows:
    if r[3] == "fio":
        k = (r[0], r[1], r[2])
        if k not in best or float(r[5]) > best[k][0]:
            best[k] = (float(r[5]), r[4], float(r[6]))
for r in rows:
    if r[3] == "sluice":
        b = best[(r[0], r[1], r[2])]
        bps, cpu = float(r[5]), float(r[6])
        ours[(r[1], r[2], r[4])].append((bps / b[0], bps, cpu, cpu / b[2], float(r[7]), float(r[8]), b))
print("| device | samples | sluice config | sluice, median | fio best, median (configs) | ratio, median | CPU us per sample vs fio's per IO | in flight | idle |")
print("|---|---|---|---|---|---|---|---|---|")
for (dev, size, cfg), v in ours.items():
    unit = 4096 if size == "4k" else 65536
    fio = [x[6] for x in v]
    per = (lambda b: f"{b / unit / 1e3:.0f}k/s") if size == "4k" else (lambda b: f"{b / 1e6:.0f} MB/s")
    print(f"| {dev} | {size} | {cfg} | {per(statistics.median(x[1] for x in v))} | "
          f"{per(statistics.median(f[0] for f in fio))} ({', '.join(sorted(set(f[1] for f in fio)))}) | "
          f"{statistics.median(x[0] for x in v):.2f}x ({', '.join(f'{x[0]:.2f}' for x in v)}) | "
          f"{statistics.median(x[2] for x in v):.2f} vs {statistics.median(f[2] for f in fio):.2f} "
          f"({statistics.median(x[3] for x in v):.2f}x) | {statistics.median(x[4] for x in v):.0f} | "
          f"{statistics.median(x[5] for x in v):.3f} |")
EOF

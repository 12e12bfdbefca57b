#!/usr/bin/env bash
# The shard server in a network namespace of its own, reached from this one over a veth pair
# (a real network path, not loopback): every byte a client reads equals the local read.
# Skips (exit 77) where the machine does not allow network namespaces.
#   tests/net/netns_test.sh SLUICE_CLI NET_TEST
set -euo pipefail
cli=$1
net_test=$2
ns=sluice-test-$$
host_if=slh$$
ns_if=sls$$
work=$(mktemp -d)
server=""
cleanup() {
  [[ -n "$server" ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  ip link del "$host_if" 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
if ! ip netns add "$ns" 2>"$work/why"; then
  echo "SKIP: cannot create a network namespace: $(cat "$work/why")"
  exit 77
fi
if ! ip link add "$host_if" type veth peer name "$ns_if" 2>"$work/why"; then
  echo "SKIP: cannot create a veth pair: $(cat "$work/why")"
  exit 77
fi
ip link set "$ns_if" netns "$ns"
ip addr add 10.211.0.1/30 dev "$host_if"
ip link set "$host_if" up
ip netns exec "$ns" ip addr add 10.211.0.2/30 dev "$ns_if"
ip netns exec "$ns" ip link set "$ns_if" up
ip netns exec "$ns" ip link set lo up

# A dataset of variable-size files, packed with the CLI.
python3 "$(dirname "$0")/../../examples/make_image_folder.py" "$work/src" --classes 3 \
  --per-class 40 --min-bytes 100 --max-bytes 200000
"$cli" pack "$work/src" -o "$work/ds" --json > /dev/null

SLUICE_TOKEN=ns-token ip netns exec "$ns" "$cli" serve "$work/ds" --listen 10.211.0.2:7070 \
  --json > "$work/serve.json" &
server=$!
for _ in $(seq 100); do [[ -s "$work/serve.json" ]] && break; sleep 0.1; done
[[ -s "$work/serve.json" ]] || { echo "FAIL: sluice serve did not start in $ns"; exit 1; }

SLUICE_TEST_PEER=10.211.0.2:7070 SLUICE_TEST_DATASET="$work/ds" SLUICE_TOKEN=ns-token \
  "$net_test" --gtest_filter='ExternalServer.*' --gtest_also_run_disabled_tests
echo "PASS: read every sample from a server in network namespace $ns"

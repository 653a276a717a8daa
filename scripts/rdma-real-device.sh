#!/usr/bin/env bash
# Runs the verbs tests (test/rdma/verbs) against a real RDMA device, the check that the
# verbs emulation (rdma/emu, what CI links) and the hardware agree; then measures a local
# cluster's latency over the device next to the same cluster over TCP.
#   scripts/rdma-real-device.sh [BUILD_DIR]   (default build-rdma-system)
# If `ibv_devices` lists a device: builds with -DRAMKV_VERBS=system (the system's
# libibverbs) in its own build directory and runs the verbs tests there. Then builds
# ramkv-coordinator, ramkv-server and ramkv-bench there (Google Benchmark needed), starts a
# local cluster (scripts/cluster.sh, every process on --transport rdma, first device, port
# 1), runs `ramkv-bench latency --transport rdma`, stops it, does the same over TCP, and
# prints both with their ratio. Otherwise prints
# "SKIPPED: no RDMA device (ibv_devices lists none)" and exits 0.
# Environment: LATENCY_COUNT (samples per operation, default 5000), LATENCY_PORT (the
# clusters' coordinator port, default 22246; servers take the next two).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build_dir=${1:-build-rdma-system}
[[ "$build_dir" = /* ]] || build_dir="$root/$build_dir"

# `ibv_devices` prints a two-line header, then one line per device.
devices=0
if command -v ibv_devices >/dev/null 2>&1; then
  devices=$(ibv_devices 2>/dev/null | awk 'NR > 2 && NF > 0' | wc -l)
fi
if [ "$devices" -eq 0 ]; then
  echo "SKIPPED: no RDMA device (ibv_devices lists none)"
  exit 0
fi
echo "rdma-real-device: $devices device(s):"
ibv_devices

cmake -S "$root" -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DRAMKV_VERBS=system -DRAMKV_BUILD_BENCH=OFF >/dev/null
cmake --build "$build_dir" -j "${JOBS:-2}" --target ramkv_verbs_tests
# Every verbs test, now against the device ("rdma/verbs:" is the binary's ctest prefix).
(cd "$build_dir" && ctest --output-on-failure -R '^rdma/verbs:')

# ---- Latency: the same local cluster over the device and over TCP, in this run --------
# (The emulation's figures are not compared: they mean nothing about hardware,
# docs/rdma-emulation.md.)
cmake -S "$root" -B "$build_dir" -DRAMKV_BUILD_BENCH=ON >/dev/null ||
  { echo "rdma-real-device: cannot configure ramkv-bench (is Google Benchmark installed?)" >&2; exit 1; }
cmake --build "$build_dir" -j "${JOBS:-2}" --target ramkv-coordinator ramkv-server ramkv-bench
count=${LATENCY_COUNT:-5000}
port=${LATENCY_PORT:-22246}
cluster_dir=$(mktemp -d /var/tmp/ramkv-rdma-latency-XXXXXX)
cluster() { "$root/scripts/cluster.sh" "$@" --dir "$cluster_dir"; }
# Whatever happens, the cluster's processes are stopped (cluster.sh stops exactly the
# PIDs it started in this directory).
trap 'cluster stop >/dev/null 2>&1 || true; rm -rf "$cluster_dir"' EXIT

# Prints the one JSON line of `ramkv-bench latency --json` over transport $1.
latency_json() {
  local transport=$1 out
  cluster start --bin "$build_dir/bin" --transport "$transport" --port "$port" \
    --servers 2 --replicas 1 --memory 256M >&2 || return 1
  out=$("$build_dir/bin/ramkv-bench" latency --transport "$transport" \
    --coordinator "127.0.0.1:$port" --count "$count" --keys 10000 --value-bytes 100 --json \
    2>"$cluster_dir/bench-$transport.log") ||
    { echo "rdma-real-device: ramkv-bench latency over $transport failed:" >&2
      tail -n 5 "$cluster_dir/bench-$transport.log" >&2; return 1; }
  cluster stop >&2
  grep -m1 '^{' <<<"$out"
}
# A number field of a JSON line: field NAME JSON.
field() { grep -o "\"$1\": [0-9.]*" <<<"$2" | awk '{ print $2 }'; }

rdma_json=$(latency_json rdma)
tcp_json=$(latency_json tcp)
echo "rdma-real-device: ramkv-bench latency, $count samples each, 100 B values, one client;"
echo "  2 servers (1 replica) on this machine; the same build and cluster shape over both"
printf '%-14s %12s %12s %10s\n' "" "tcp us" "rdma us" "rdma/tcp"
for f in rtt_p50 rtt_p99 read_p50 read_p99 write_p50 write_p99; do
  t=$(field "${f}_us" "$tcp_json")
  r=$(field "${f}_us" "$rdma_json")
  printf '%-14s %12s %12s %10s\n' "$f" "$t" "$r" "$(awk -v r="$r" -v t="$t" \
    'BEGIN { if (t > 0) printf "%.2f", r / t; else print "-" }')"
done
echo "tcp:  $tcp_json"
echo "rdma: $rdma_json"

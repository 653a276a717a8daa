#!/usr/bin/env bash
# Runs the verbs tests (test/rdma/verbs) against a real RDMA device, the check that the
# verbs emulation (rdma/emu, what CI links) and the hardware agree.
#   scripts/rdma-real-device.sh [BUILD_DIR]   (default build-rdma-system)
# If `ibv_devices` lists a device: builds with -DRAMKV_VERBS=system (the system's
# libibverbs) in its own build directory and runs the verbs tests there. Otherwise prints
# "SKIPPED: no RDMA device (ibv_devices lists none)" and exits 0.
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

# TODO(latency benchmark): run the RDMA latency benchmark against the device here and
# compare it with the emulation's figures (to be added by the benchmark's author).

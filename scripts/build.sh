#!/usr/bin/env bash
# Configures and builds ramkv into a build directory.
#   scripts/build.sh [BUILD_DIR] [extra cmake args...]
# Binaries land in BUILD_DIR/bin (default build/bin). Uses Ninja, -j2 unless JOBS is set.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build_dir=${1:-build}
shift || true
[[ "$build_dir" = /* ]] || build_dir="$root/$build_dir"
cmake -S "$root" -B "$build_dir" -G Ninja "$@" >/dev/null
cmake --build "$build_dir" -j "${JOBS:-2}"

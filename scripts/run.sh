#!/usr/bin/env bash
# The README's main command: sets up, builds, and shows ramkv working.
# Today that is the master's storage engine (log-structured memory, hash table, cleaner)
# under its memory benchmark: fill the log to 50% and then 90% utilisation, overwrite at
# random with the cleaner running, read back and check every value read.
# Extra arguments go to `ramkv-bench memory` (e.g. --seconds 10 --memory 4G).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
echo "== building (build/, Release)"
bash scripts/build.sh build -DCMAKE_BUILD_TYPE=Release -DRAMKV_BUILD_TESTS=OFF
echo "== ramkv-bench memory: the storage engine at 50% and 90% memory utilisation"
./build/bin/ramkv-bench memory --utilization 50 90 --seconds 5 "$@"

#!/usr/bin/env bash
# The README's main command: sets up, builds, starts a local ramkv cluster on 127.0.0.1
# (by default a coordinator and 4 servers, each master and backup, 3 replicas), shows it
# working with the ramkv tool, measures read and write latency against the bare round
# trip, then fills one master with --recovery-bytes of data (default 256M), kills it with
# SIGKILL, and prints the measured time-to-recovery and the check that nothing was lost
# (ramkv-bench recovery; a plot of the replay in DIR/recovery.png), and stops the cluster.
#   scripts/run.sh [--servers N] [--masters N] [--backups N] [--replicas R]
#                  [--durability buffered|disk] [--dir DIR] [--recovery-bytes SIZE]
# The cluster flags go to scripts/cluster.sh start unchanged (see its --help).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cluster_flags=()
dir=/tmp/ramkv-demo
recovery_bytes=256M
while [ $# -gt 0 ]; do
  case "$1" in
    --servers|--masters|--backups|--replicas|--durability)
      [ $# -ge 2 ] || { echo "run.sh: $1 needs a value" >&2; exit 2; }
      cluster_flags+=("$1" "$2"); shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --recovery-bytes) recovery_bytes=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

bash scripts/setup.sh
echo "== building (build/, Release)"
bash scripts/build.sh build -DCMAKE_BUILD_TYPE=Release -DRAMKV_BUILD_TESTS=OFF >/dev/null
port=12246
bash scripts/cluster.sh stop --dir "$dir" >/dev/null 2>&1 || true
trap 'bash scripts/cluster.sh stop --dir "$dir"' EXIT
echo "== starting a local cluster in $dir"
# Each server has room for its share and for what it recovers of a crashed master.
memory_mib=$(( $(numfmt --from=iec "$recovery_bytes") * 3 / 2 / 1048576 + 256 ))
# Each backup reads a third of the crashed master's segments (8 MiB each) into buffers it
# touched at start, and has room for the replicas being written meanwhile.
buffers=$(( $(numfmt --from=iec "$recovery_bytes") / 3 / 8388608 + 32 ))
bash scripts/cluster.sh start ${cluster_flags[@]+"${cluster_flags[@]}"} --dir "$dir" --port "$port" \
  --memory "${memory_mib}M" --backup-buffers-at-start "$buffers"
bash scripts/cluster.sh status --dir "$dir"

ramkv() {
  echo "\$ ramkv $*"
  build/bin/ramkv --coordinator "127.0.0.1:$port" "$@"
}
echo "== using it"
ramkv create-table demo
ramkv put demo alice "likes segments"
ramkv put demo bob "likes cleaners"
ramkv get demo alice
ramkv incr demo visits 1
ramkv incr demo visits 41
ramkv del demo bob
ramkv get demo bob || true
ramkv scan demo
ramkv tablets demo
ramkv servers
echo "== latency: one synchronous client, next to the bare echo round trip"
build/bin/ramkv-bench latency --coordinator "127.0.0.1:$port" --count 5000 --keys 5000
echo "== crash recovery: fill one master with $recovery_bytes, kill it (SIGKILL), time it back"
build/bin/ramkv-bench recovery --coordinator "127.0.0.1:$port" --bytes "$recovery_bytes" \
  --kill-command "bash scripts/cluster.sh kill {locator} --dir '$dir'" \
  --csv "$dir/recovery.csv" --plot "$dir/recovery.png"
echo "== the timeline of that recovery: $dir/recovery.csv (plot: $dir/recovery.png)"

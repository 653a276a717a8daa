#!/usr/bin/env bash
# What replication costs: write latency (1 client, 100 B values) and write throughput
# (8 clients x 16 requests in flight) on a local cluster of 1 master-only server and 3
# backup-only servers, with R = 0, 1 and 3, in buffered and disk durability. Each run
# also measures the bare echo round trip to the master, so latencies are reported as
# ratios to it, and throughputs as ratios to R = 0 of the same run.
#
#   scripts/bench-replication.sh [--seconds S] [--out DIR]
#
# Targets (issue 4): a replicated write with R = 3, buffered, costs at most about two
# bare round trips plus 20% (write p50 / rtt p50 <= 2.4); throughput with R = 3 is at
# least half of R = 0.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=3
out=/tmp/ramkv-bench-replication
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) seconds=${2:?--seconds needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-replication: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $seconds =~ ^[1-9][0-9]*$ ]] || { echo "bench-replication: bad --seconds '$seconds'" >&2; exit 2; }

[ -x build/bin/ramkv-bench ] && [ -x build/bin/ramkv-server ] ||
  bash scripts/build.sh build -DCMAKE_BUILD_TYPE=Release >/dev/null
mkdir -p "$out"
port=13400
cleanup() { bash scripts/cluster.sh stop --dir "$out/cluster" >/dev/null 2>&1 || true; }
trap cleanup EXIT

for durability in buffered disk; do
  for r in 0 1 3; do
    echo "== R = $r, $durability"
    bash scripts/cluster.sh start --masters 1 --backups 3 --replicas "$r" \
      --durability "$durability" --dir "$out/cluster" --port "$port" --memory 512M >/dev/null
    build/bin/ramkv-bench latency --coordinator "127.0.0.1:$port" --value-bytes 100 \
      --count $((seconds * 2000)) --keys 2000 --json >"$out/latency-$durability-$r.json"
    build/bin/ramkv-bench throughput --coordinator "127.0.0.1:$port" --clients 8 --window 16 \
      --seconds "$seconds" --workload write --keys 2000 --json \
      >"$out/throughput-$durability-$r.json"
    bash scripts/cluster.sh stop --dir "$out/cluster" >/dev/null
  done
done

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
print(f"{'durability':<10} {'R':>2} {'rtt p50 us':>11} {'write p50 us':>13} {'p50/rtt':>8} "
      f"{'write p99 us':>13} {'writes/s':>10} {'vs R=0':>7}")
for d in ("buffered", "disk"):
    base = None
    for r in (0, 1, 3):
        lat = json.load(open(f"{out}/latency-{d}-{r}.json"))
        thr = json.load(open(f"{out}/throughput-{d}-{r}.json"))
        ops = thr["write_ops_per_sec"]
        base = base or ops
        rows[f"{d}_r{r}"] = {"rtt_p50_us": lat["rtt_p50_us"], "write_p50_us": lat["write_p50_us"],
                             "write_p99_us": lat["write_p99_us"],
                             "write_p50_over_rtt": lat["write_p50_over_rtt"],
                             "write_ops_per_sec": ops, "write_ops_over_r0": ops / base}
        print(f"{d:<10} {r:>2} {lat['rtt_p50_us']:>11.1f} {lat['write_p50_us']:>13.1f} "
              f"{lat['write_p50_over_rtt']:>8.2f} {lat['write_p99_us']:>13.1f} {ops:>10.0f} "
              f"{ops / base:>7.2f}")
b3 = rows["buffered_r3"]
print(f"target: R=3 buffered write p50 / rtt <= 2.4: {b3['write_p50_over_rtt']:.2f}; "
      f"R=3 / R=0 writes/s >= 0.5: {b3['write_ops_over_r0']:.2f} (buffered), "
      f"{rows['disk_r3']['write_ops_over_r0']:.2f} (disk)")
json.dump(rows, open(f"{out}/summary.json", "w"), indent=1)
PY
echo "raw results in $out"

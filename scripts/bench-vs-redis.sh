#!/usr/bin/env bash
# ramkv next to Redis on this machine, in one run: Redis GET latency with one client and
# throughput with 50 clients (redis-benchmark: 50 connections from one thread, so 50
# requests in flight), then the same shapes on a local ramkv cluster (ramkv-bench
# latency; throughput from one client thread keeping 50 requests in flight). Prints both and the ratios, and writes
# the raw results to OUT (default /tmp/ramkv-vs-redis).
#   scripts/bench-vs-redis.sh [--masters N] [--seconds S] [--out DIR]
# Installs redis-server and redis-tools with apt-get if missing. Stops everything it
# started (by PID) when it ends.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
masters=3
seconds=5
out=/tmp/ramkv-vs-redis
while [ $# -gt 0 ]; do
  case "$1" in
    --masters) masters=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-vs-redis.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh >/dev/null
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  echo "bench-vs-redis: installing redis-server and redis-tools"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi
[ -x build/bin/ramkv-bench ] && [ -x build/bin/ramkv-server ] ||
  bash scripts/build.sh build -DCMAKE_BUILD_TYPE=Release >/dev/null
mkdir -p "$out"

redis_port=16379
redis_pid=""
cleanup() {
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null || true
  bash scripts/cluster.sh stop --dir "$out/cluster" >/dev/null 2>&1 || true
}
trap cleanup EXIT

redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  >"$out/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done

n1=$((seconds * 8000))
n50=$((seconds * 60000))
echo "== Redis $(redis-server --version | grep -Eo 'v=[0-9.]+' | cut -c3-): GET, 100 B values"
redis-benchmark -p "$redis_port" -q -t set -d 100 -r 10000 -n 20000 >/dev/null
redis-benchmark -p "$redis_port" --csv -t get -d 100 -r 10000 -n "$n1" -c 1 >"$out/redis-c1.csv"
redis-benchmark -p "$redis_port" --csv -t get -d 100 -r 10000 -n "$n50" -c 50 >"$out/redis-c50.csv"
col() { tail -n 1 "$1" | tr -d '"' | cut -d, -f"$2"; }  # rps,avg,min,p50,p95,p99,max
redis_rps1=$(col "$out/redis-c1.csv" 2)
redis_p50=$(awk -v v="$(col "$out/redis-c1.csv" 5)" 'BEGIN{print v*1000}')
redis_p99=$(awk -v v="$(col "$out/redis-c1.csv" 7)" 'BEGIN{print v*1000}')
redis_rps50=$(col "$out/redis-c50.csv" 2)
kill "$redis_pid"; wait "$redis_pid" 2>/dev/null || true; redis_pid=""

echo "== ramkv: $masters masters on 127.0.0.1"
# Master-only and unreplicated, like the Redis it is compared with (no persistence).
bash scripts/cluster.sh start --masters "$masters" --replicas 0 --dir "$out/cluster" --port 13400 >/dev/null
coord=127.0.0.1:13400
build/bin/ramkv-bench latency --coordinator "$coord" --value-bytes 100 --count $((seconds * 4000)) \
  --json >"$out/ramkv-latency.json"
build/bin/ramkv-bench throughput --coordinator "$coord" --clients 1 --window 50 \
  --workload read --seconds "$seconds" --json >"$out/ramkv-throughput-c50.json"
build/bin/ramkv-bench throughput --coordinator "$coord" --clients 8 --window 16 \
  --workload read --workload write --workload mixed --workload multiread --seconds "$seconds" \
  --json >"$out/ramkv-throughput-window.json"
bash scripts/cluster.sh stop --dir "$out/cluster" >/dev/null

python3 - "$out" "$redis_p50" "$redis_p99" "$redis_rps1" "$redis_rps50" <<'PY'
import json, sys
out, rp50, rp99, rrps1, rrps50 = sys.argv[1], *map(float, sys.argv[2:])
lat = json.load(open(f"{out}/ramkv-latency.json"))
c50 = json.load(open(f"{out}/ramkv-throughput-c50.json"))
win = json.load(open(f"{out}/ramkv-throughput-window.json"))
print(f"{'':34} {'ramkv':>12} {'Redis':>12} {'ratio':>8}")
print(f"{'GET p50, 1 client (us)':34} {lat['read_p50_us']:>12.1f} {rp50:>12.1f} {lat['read_p50_us']/rp50:>8.2f}")
print(f"{'GET p99, 1 client (us)':34} {lat['read_p99_us']:>12.1f} {rp99:>12.1f} {lat['read_p99_us']/rp99:>8.2f}")
print(f"{'GET ops/s, 50 requests in flight':34} {c50['read_ops_per_sec']:>12.0f} {rrps50:>12.0f} {c50['read_ops_per_sec']/rrps50:>8.2f}")
print(f"ramkv read p50 over the bare echo round trip: {lat['read_p50_over_rtt']:.2f} "
      f"(rtt p50 {lat['rtt_p50_us']:.1f} us); write p50 {lat['write_p50_us']:.1f} us")
print("ramkv, 8 clients x 16 in flight: " + ", ".join(
    f"{k[:-12]} {v:.0f}/s" for k, v in win.items() if k.endswith("_ops_per_sec")))
json.dump({"ramkv_read_p50_us": lat["read_p50_us"], "redis_get_p50_us": rp50,
           "ramkv_read_p99_us": lat["read_p99_us"], "redis_get_p99_us": rp99,
           "ramkv_read_ops_50_clients": c50["read_ops_per_sec"], "redis_get_ops_50_clients": rrps50,
           "read_p50_over_rtt": lat["read_p50_over_rtt"], "write_p50_over_rtt": lat["write_p50_over_rtt"]},
          open(f"{out}/summary.json", "w"), indent=1)
PY
echo "raw results in $out"

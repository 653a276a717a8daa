#!/usr/bin/env bash
# Starts, stops and shows a local ramkv cluster on 127.0.0.1.
#
#   scripts/cluster.sh start  [--masters N] [--dir DIR] [--port P] [--memory SIZE]
#                             [--poll block|busy] [--bin DIR]
#   scripts/cluster.sh status [--dir DIR]
#   scripts/cluster.sh stop   [--dir DIR]
#
# start: a coordinator on P (default 12246) and N masters (default 3) on P+1..P+N, each
# with SIZE of log memory (default 256M). PIDs go to DIR/pids, logs to DIR/logs, the
# coordinator's state to DIR/coordinator (started afresh). It returns once every master
# has enlisted.
# stop: stops exactly the processes this script started in DIR (by PID, checking that
# the PID is still that program), TERM first, KILL after 5 s.
# status: one line per process, the coordinator first: role, PID, address, state.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

cmd=${1:-}
[ -n "$cmd" ] && shift || true
dir=/tmp/ramkv-cluster
masters=3
port=12246
memory=256M
poll=block
bin="$root/build/bin"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --masters) masters=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --memory) memory=$2; shift 2 ;;
    --poll) poll=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "cluster.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$masters" =~ ^[0-9]+$ ]] && [ "$masters" -ge 1 ] || { echo "cluster.sh: --masters must be a number >= 1" >&2; exit 2; }
[[ "$port" =~ ^[0-9]+$ ]] || { echo "cluster.sh: --port must be a number" >&2; exit 2; }

# Is PID alive and still running program NAME (listening on ADDR, when given)? argv[0]'s
# base name must be NAME exactly and ADDR one whole argument: a PID reused by some other
# process whose command line merely mentions NAME (an editor, a grep, a tail of a log)
# or by a ramkv process of another cluster must never be signalled.
alive() {
  local pid=$1 name=$2 addr=${3:-}
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  local args=()
  mapfile -d '' -t args <"/proc/$pid/cmdline" 2>/dev/null || return 1
  [ "${#args[@]}" -gt 0 ] && [ "$(basename -- "${args[0]}")" = "$name" ] || return 1
  [ -z "$addr" ] && return 0
  local a
  for a in "${args[@]}"; do [ "$a" = "$addr" ] && return 0; done
  return 1
}

start() {
  for b in ramkv-coordinator ramkv-server; do
    [ -x "$bin/$b" ] || { echo "cluster.sh: $bin/$b not found; build first (scripts/build.sh)" >&2; exit 1; }
  done
  if [ -d "$dir/pids" ] && ls "$dir"/pids/*.pid >/dev/null 2>&1; then
    for f in "$dir"/pids/*.pid; do
      IFS=' ' read -r pid prog _ addr <"$f"
      if alive "$pid" "$prog" "$addr"; then echo "cluster.sh: a cluster is already running in $dir (stop it first)" >&2; exit 1; fi
    done
  fi
  # A new cluster: its masters start empty, so the previous coordinator state goes too.
  rm -rf "$dir/pids" "$dir/logs" "$dir/coordinator"
  mkdir -p "$dir/pids" "$dir/logs" "$dir/coordinator"
  local coord="127.0.0.1:$port"
  "$bin/ramkv-coordinator" --listen "$coord" --data-dir "$dir/coordinator" --poll "$poll" \
    >"$dir/logs/coordinator.log" 2>&1 &
  echo "$! ramkv-coordinator coordinator $coord" >"$dir/pids/0-coordinator.pid"
  for i in $(seq 1 "$masters"); do
    local addr="127.0.0.1:$((port + i))"
    "$bin/ramkv-server" --coordinator "$coord" --listen "$addr" --memory "$memory" --poll "$poll" \
      >"$dir/logs/server-$i.log" 2>&1 &
    echo "$! ramkv-server master $addr" >"$dir/pids/$i-server.pid"
  done
  # Wait (bounded) for every master to enlist.
  local deadline=$((SECONDS + 30))
  while [ $SECONDS -lt $deadline ]; do
    local up
    up=$(grep -l "listening on" "$dir"/logs/server-*.log 2>/dev/null | wc -l || true)
    [ "$up" -ge "$masters" ] && { echo "cluster.sh: coordinator on $coord, $masters master(s) up; logs in $dir/logs"; return 0; }
    for f in "$dir"/pids/*.pid; do
      IFS=' ' read -r pid prog role addr <"$f"
      if ! alive "$pid" "$prog" "$addr"; then
        echo "cluster.sh: $role at $addr exited during start; its log:" >&2
        tail -n 5 "$dir/logs/$( [ "$role" = coordinator ] && echo coordinator || echo "server-$(basename "$f" -server.pid)").log" >&2 || true
        stop_all; exit 1
      fi
    done
    sleep 0.1
  done
  echo "cluster.sh: masters did not come up within 30 s; see $dir/logs" >&2
  stop_all; exit 1
}

status() {
  [ -d "$dir/pids" ] || { echo "cluster.sh: no cluster in $dir"; exit 1; }
  local any=0
  for f in $(ls "$dir"/pids/*.pid 2>/dev/null | sort -V); do
    IFS=' ' read -r pid prog role addr <"$f"
    local state=dead
    alive "$pid" "$prog" "$addr" && { state=running; any=1; }
    printf '%-12s pid %-8s %-22s %s\n' "$role" "$pid" "$addr" "$state"
  done
  [ $any -eq 1 ]
}

stop_all() {
  [ -d "$dir/pids" ] || return 0
  local pids=()
  for f in $(ls -r "$dir"/pids/*.pid 2>/dev/null | sort -rV); do
    IFS=' ' read -r pid prog _ addr <"$f"
    if alive "$pid" "$prog" "$addr"; then kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid $prog $addr"); fi
  done
  local deadline=$((SECONDS + 5))
  for p in "${pids[@]}"; do
    local pid prog addr
    read -r pid prog addr <<<"$p"
    while alive "$pid" "$prog" "$addr" && [ $SECONDS -lt $deadline ]; do sleep 0.05; done
    alive "$pid" "$prog" "$addr" && kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$dir"/pids/*.pid
  echo "cluster.sh: stopped ${#pids[@]} process(es) in $dir"
}

case "$cmd" in
  start) start ;;
  status) status ;;
  stop) stop_all ;;
  -h|--help|help|"") usage; [ -n "$cmd" ] ;;
  *) echo "cluster.sh: unknown command '$cmd' (start, status, stop)" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Starts, stops and shows a local ramkv cluster on 127.0.0.1.
#
#   scripts/cluster.sh start  [--servers N] [--masters N] [--backups N] [--replicas R]
#                             [--durability buffered|disk] [--dir DIR] [--port P]
#                             [--memory SIZE] [--poll block|busy] [--bin DIR]
#                             [--transport tcp|rdma] [--rdma-device NAME]
#                             [--backup-buffers-at-start N] [--tcp-congestion NAME]
#   scripts/cluster.sh status [--dir DIR]
#   scripts/cluster.sh stop   [--dir DIR]
#   scripts/cluster.sh kill   ADDRESS [--dir DIR]
#
# start: a coordinator on P (default 12246), then servers on P+1, P+2, ...:
#   --servers N   N servers that each run a master and a backup (the usual deployment)
#   --masters N   N master-only servers
#   --backups N   N backup-only servers
# These combine. With none of them: 4 servers, each master and backup.
#   --replicas R  replicas each master keeps of its log (default 3; 0: none), each on a
#                 backup of another server: so with S combined servers and B backup-only
#                 ones, R <= S - 1 + B (R <= B when every master is master-only)
#   --durability  when a backup acknowledges a write: buffered (default; once in its
#                 memory) or disk (once on disk)
#   --memory      log memory of each master (default 256M)
#   --transport   tcp (default) or rdma, for every process (rdma: libibverbs, or the
#                 emulated provider in a build made with -DRAMKV_VERBS=emulated)
#   --rdma-device NAME
#                 with --transport rdma: the adapter every process uses, as ibv_devices
#                 names it (default: each process takes the first)
#   --backup-buffers-at-start N
#                 segment buffers each backup allocates and touches at start (default:
#                 ramkv-server's): a backup reads its share of a crashed master into
#                 them, fast where memory touched for the first time is slow (VMs)
#   --tcp-congestion NAME
#                 the congestion control of every process's TCP sockets (default: the
#                 programs' own, cubic; 'default': the kernel's)
# Server n logs to DIR/logs/server-<n>.log; a backup keeps its replica files in
# DIR/backup-<n>; PIDs go to DIR/pids, the coordinator's state to DIR/coordinator. All of
# it is started afresh (a new cluster's masters are empty, so old replicas and state
# go). It returns once every server has enlisted with the coordinator.
# stop: stops exactly the processes this script started in DIR (by PID, checking that
# the PID is still that program), TERM first, KILL after 5 s.
# status: one line per process, the coordinator first: role (coordinator, master, backup,
# master+backup), PID, address, alive or dead, and a backup's data directory. Exits 1
# if none is alive.
# kill: SIGKILLs the server of this cluster listening at ADDRESS (a crash, for recovery
# tests and `ramkv-bench recovery --kill-command`). Exits 1 if none is alive there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

cmd=${1:-}
[ -n "$cmd" ] && shift || true
target=""
if [ "$cmd" = kill ] && [ $# -gt 0 ] && [[ "$1" != --* ]]; then target=$1; shift; fi
dir=/tmp/ramkv-cluster
servers=""
masters=""
backups=""
replicas=3
durability=buffered
port=12246
memory=256M
poll=block
transport=tcp
rdma_device=""
backup_buffers_at_start=""
tcp_congestion=""
bin="$root/build/bin"

# The header comment above, without the '#'.
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }
die() { echo "cluster.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dir|--servers|--masters|--backups|--replicas|--durability|--port|--memory|--poll|--bin|--transport|--rdma-device|--backup-buffers-at-start|--tcp-congestion)
      [ $# -ge 2 ] || die "$1 needs a value (see --help)"
      case "$1" in
        --dir) dir=$2 ;;
        --servers) servers=$2 ;;
        --masters) masters=$2 ;;
        --backups) backups=$2 ;;
        --replicas) replicas=$2 ;;
        --durability) durability=$2 ;;
        --port) port=$2 ;;
        --memory) memory=$2 ;;
        --poll) poll=$2 ;;
        --transport) transport=$2 ;;
        --rdma-device) rdma_device=$2 ;;
        --backup-buffers-at-start) backup_buffers_at_start=$2 ;;
        --tcp-congestion) tcp_congestion=$2 ;;
        --bin) bin=$2 ;;
      esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
# The default deployment: 4 servers, each master and backup, so R = 3 fits.
if [ -z "$servers$masters$backups" ]; then servers=4; fi
for v in servers masters backups; do
  [ -z "${!v}" ] && printf -v "$v" 0
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "--$v must be a number >= 0, not '${!v}'"
done
[[ "$replicas" =~ ^[0-9]+$ ]] || die "--replicas must be a number >= 0, not '$replicas'"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number"
case "$durability" in buffered|disk) ;; *) die "--durability must be buffered or disk, not '$durability'" ;; esac
case "$poll" in block|busy) ;; *) die "--poll must be block or busy, not '$poll'" ;; esac
case "$transport" in tcp|rdma) ;; *) die "--transport must be tcp or rdma, not '$transport'" ;; esac
if [ -n "$rdma_device" ] && [ "$transport" != rdma ]; then
  die "--rdma-device needs --transport rdma"
fi
# The transport flags every process gets.
transport_args=(--transport "$transport")
if [ -n "$rdma_device" ]; then transport_args+=(--rdma-device "$rdma_device"); fi
if [ -n "$tcp_congestion" ]; then transport_args+=(--tcp-congestion "$tcp_congestion"); fi
total=$((servers + masters + backups))

# Checks the shape of the cluster asked for (start only; stop and status ignore it).
check_shape() {
  [ $((servers + masters)) -ge 1 ] || die "no masters: give --servers N or --masters N (N >= 1)"
  [ $((port + total)) -le 65535 ] || die "--port $port leaves no room for $total servers"
  # The fewest backups on other servers that any master has: a combined server's own
  # backup does not count.
  local avail=$backups what="$backups backup-only server(s)"
  if [ "$servers" -ge 1 ]; then
    avail=$((servers - 1 + backups))
    what="$servers master+backup and $backups backup-only server(s)"
  fi
  [ "$replicas" -le "$avail" ] ||
    die "--replicas $replicas needs $replicas backups on servers other than each master's own, but $what give a master only $avail; add --servers or --backups, or lower --replicas"
}

# Server n's role: the combined servers first, then master-only, then backup-only.
role_of() {
  local n=$1
  if [ "$n" -le "$servers" ]; then echo master+backup
  elif [ "$n" -le $((servers + masters)) ]; then echo master
  else echo backup; fi
}

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
  check_shape
  for b in ramkv-coordinator ramkv-server; do
    [ -x "$bin/$b" ] || { echo "cluster.sh: $bin/$b not found; build first (scripts/build.sh)" >&2; exit 1; }
  done
  if [ -d "$dir/pids" ] && ls "$dir"/pids/*.pid >/dev/null 2>&1; then
    for f in "$dir"/pids/*.pid; do
      IFS=' ' read -r pid prog _ addr <"$f"
      if alive "$pid" "$prog" "$addr"; then echo "cluster.sh: a cluster is already running in $dir (stop it first)" >&2; exit 1; fi
    done
  fi
  # A new cluster: its masters start empty and server ids start again at 1, so the
  # previous coordinator state and replica files go too.
  rm -rf "$dir/pids" "$dir/logs" "$dir/coordinator" "$dir"/backup-*
  mkdir -p "$dir/pids" "$dir/logs" "$dir/coordinator"
  local coord="127.0.0.1:$port"
  "$bin/ramkv-coordinator" --listen "$coord" --data-dir "$dir/coordinator" --poll "$poll" \
    "${transport_args[@]}" >"$dir/logs/coordinator.log" 2>&1 &
  echo "$! ramkv-coordinator coordinator $coord" >"$dir/pids/0-coordinator.pid"
  local n
  for n in $(seq 1 "$total"); do
    local addr="127.0.0.1:$((port + n))" role
    role=$(role_of "$n")
    local args=(--coordinator "$coord" --listen "$addr" --poll "$poll" "${transport_args[@]}")
    case "$role" in
      master|master+backup) args+=(--master --memory "$memory" --replicas "$replicas") ;;
      *) args+=(--no-master) ;;
    esac
    case "$role" in
      backup|master+backup)
        mkdir -p "$dir/backup-$n"
        args+=(--backup --data-dir "$dir/backup-$n" --durability "$durability")
        if [ -n "$backup_buffers_at_start" ]; then
          args+=(--backup-buffers-at-start "$backup_buffers_at_start")
        fi ;;
    esac
    "$bin/ramkv-server" "${args[@]}" >"$dir/logs/server-$n.log" 2>&1 &
    echo "$! ramkv-server $role $addr" >"$dir/pids/$n-server.pid"
  done
  # Wait (bounded) for every server to enlist: the coordinator logs each one with its
  # address.
  local deadline=$((SECONDS + 30))
  while [ $SECONDS -lt $deadline ]; do
    local up=0
    for n in $(seq 1 "$total"); do
      grep -qF "at 127.0.0.1:$((port + n)) (" "$dir/logs/coordinator.log" 2>/dev/null && up=$((up + 1))
    done
    if [ "$up" -ge "$total" ]; then
      echo "cluster.sh: coordinator on $coord; $total server(s) up ($servers master+backup," \
        "$masters master, $backups backup; $replicas replica(s), $durability); logs in $dir/logs"
      return 0
    fi
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
  echo "cluster.sh: servers did not come up within 30 s; see $dir/logs" >&2
  stop_all; exit 1
}

status() {
  ls "$dir"/pids/*.pid >/dev/null 2>&1 || { echo "cluster.sh: no cluster in $dir"; exit 1; }
  local any=0 files=()
  mapfile -t files < <(printf '%s\n' "$dir"/pids/*.pid | sort -V)
  for f in "${files[@]}"; do
    IFS=' ' read -r pid prog role addr <"$f"
    local state=dead data=""
    alive "$pid" "$prog" "$addr" && { state=alive; any=1; }
    [[ "$role" == *backup ]] && data="data $dir/backup-$(basename "$f" -server.pid)"
    printf '%-14s pid %-8s %-22s %-6s %s\n' "$role" "$pid" "$addr" "$state" "$data"
  done
  [ $any -eq 1 ]
}

stop_all() {
  [ -d "$dir/pids" ] || return 0
  local pids=() files=()
  ls "$dir"/pids/*.pid >/dev/null 2>&1 && mapfile -t files < <(printf '%s\n' "$dir"/pids/*.pid | sort -rV)
  for f in ${files[@]+"${files[@]}"}; do
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

kill_server() {
  [ -n "$target" ] || die "kill needs the ADDRESS of a server (see status)"
  ls "$dir"/pids/*.pid >/dev/null 2>&1 || { echo "cluster.sh: no cluster in $dir" >&2; exit 1; }
  for f in "$dir"/pids/*-server.pid; do
    IFS=' ' read -r pid prog role addr <"$f"
    if [ "$addr" = "$target" ] && alive "$pid" "$prog" "$addr"; then
      kill -KILL "$pid"
      echo "cluster.sh: killed $role $addr (pid $pid) with SIGKILL"
      return 0
    fi
  done
  echo "cluster.sh: no live server at $target in $dir" >&2
  exit 1
}

case "$cmd" in
  start) start ;;
  status) status ;;
  stop) stop_all ;;
  kill) kill_server ;;
  -h|--help|help|"") usage; [ -n "$cmd" ] ;;
  *) echo "cluster.sh: unknown command '$cmd' (start, status, stop, kill)" >&2; exit 2 ;;
esac

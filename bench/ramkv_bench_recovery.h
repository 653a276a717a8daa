// `ramkv-bench recovery`: time-to-recovery of a crashed master (docs/recovery.md). Fills
// one master with --bytes of objects, kills it with SIGKILL, and measures the failure
// detection time and the recovery time (kill -> every tablet served again), then reads
// every object back and checks its value. With --local it starts its own cluster (a
// coordinator and --servers combined master+backup servers on 127.0.0.1) and stops it
// afterwards; otherwise it uses the cluster at --coordinator and kills the master with
// --kill-command (the owner's locator replaces {locator} in it).
//
// Reported: recovery_seconds, detection_seconds, recovered_bytes, recovery_mb_per_sec,
// per recovery master replay MB/s, per backup read MB/s, objects_checked, objects_lost
// (must be 0), and the single-process replay ceiling (`ramkv-bench replay`, run by this
// command on the same machine) with the recovery rate per recovery master as a ratio of
// it. With the ceiling it also measures the network floor: the bytes the survivors sent
// during the recovery (replication and recovery data, from their stats) moved again over
// loopback TCP by plain sender and receiver processes, one pair per recovery master, and
// the CPU that took; that CPU plus the replay's at the ceiling, spread over the machine's
// CPUs, is the floor of a recovery over TCP here (floor_seconds, floor_mb_per_sec).
// --csv writes a timeline of bytes replayed per recovery master, --plot a PNG of it
// (gnuplot).
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>

namespace ramkv::bench {

struct RecoveryBenchOptions {
  std::string coordinator;
  std::string kill_command;
  bool local = false;
  uint32_t servers = 4;
  uint32_t replicas = 3;
  std::string memory;  // per server, --local (default: enough for --bytes)
  // Per server, --local: empty sizes it for the objects written (bench_keys.h);
  // "default" leaves the server's own default (memory / 16).
  std::string hash_table_bytes;
  std::string dir;  // --local: data and logs (default: a fresh one under /var/tmp)
  std::string bin;  // --local: ramkv-coordinator and ramkv-server (default: ours)
  std::string durability = "buffered";
  std::string partition_bytes;  // --local: the coordinator's --recovery-partition-bytes
  std::string bytes = "1G";
  uint32_t object_bytes = 1000;
  uint32_t timeout_s = 600;
  // The replay ceiling's run: empty, as many bytes as the recovery (--bytes); 0: skip it
  // (and the floor).
  std::string ceiling_bytes;
  std::string csv;
  std::string plot;
  bool json = false;
};

void add_recovery_command(CLI::App& app, RecoveryBenchOptions& options);
int run_recovery_bench(const RecoveryBenchOptions& options);

}  // namespace ramkv::bench

// ramkv-bench: whole-system benchmarks. Each subcommand prints a table for people and,
// with --json, one JSON object for tools. Figures meant for comparison are reported next
// to a reference measured in the same run.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "bench/ramkv_bench_backup.h"
#include "bench/ramkv_bench_cluster.h"
#include "bench/ramkv_bench_memory.h"
#include "bench/ramkv_bench_recovery.h"
#include "bench/ramkv_bench_replay.h"
#include "common/log.h"

int main(int argc, char** argv) {
  CLI::App app{"ramkv-bench: benchmarks for ramkv: the storage engine, and running clusters"};
  app.require_subcommand(1);
  ramkv::bench::MemoryBenchOptions memory;
  ramkv::bench::add_memory_command(app, memory);
  ramkv::bench::ClusterBenchOptions cluster;
  ramkv::bench::add_cluster_commands(app, cluster);
  ramkv::bench::BackupDiskOptions backup_disk;
  ramkv::bench::add_backup_disk_command(app, backup_disk);
  ramkv::bench::ReplayBenchOptions replay;
  ramkv::bench::add_replay_command(app, replay);
  ramkv::bench::RecoveryBenchOptions recovery;
  ramkv::bench::add_recovery_command(app, recovery);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    std::fprintf(stderr, "%s: %s (see --help)\n", "ramkv-bench", e.what());
    return 2;
  }
  if (app.got_subcommand("memory")) return ramkv::bench::run_memory_bench(memory);
  if (app.got_subcommand("latency")) return ramkv::bench::run_latency_bench(cluster);
  if (app.got_subcommand("throughput")) return ramkv::bench::run_throughput_bench(cluster);
  if (app.got_subcommand("backup-disk")) return ramkv::bench::run_backup_disk_bench(backup_disk);
  if (app.got_subcommand("replay")) return ramkv::bench::run_replay_bench(replay);
  if (app.got_subcommand("recovery")) return ramkv::bench::run_recovery_bench(recovery);
  return 2;
}

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
#include "common/transport.h"
#ifdef RAMKV_HAVE_RDMA
#include "rdma/rdma_transport.h"
#endif

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
  // Every subcommand that talks to a cluster takes the cluster's transport.
  std::string transport = "tcp";
  std::string rdma_device;
  uint32_t rdma_port = 1;
  std::string tcp_congestion = "cubic";
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
    if (sub->get_name() == "memory" || sub->get_name() == "replay" ||
        sub->get_name() == "backup-disk") {
      continue;  // in-process benchmarks: no RPCs
    }
    sub->add_option("--transport", transport,
                    "tcp or rdma: the cluster's transport (rdma: this process's RPCs go over "
                    "libibverbs, or the emulated provider in an emulated build)")
        ->check(CLI::IsMember({"tcp", "rdma"}))
        ->capture_default_str();
    sub->add_option("--rdma-device", rdma_device,
                    "rdma: the device, as ibv_devices names it (default: the first)");
    sub->add_option("--rdma-port", rdma_port, "rdma: the device port")
        ->check(CLI::Range(1, 255))
        ->capture_default_str();
    sub->add_option("--tcp-congestion", tcp_congestion,
                    "tcp: the congestion control of this process's sockets (and, with "
                    "recovery --local, of the cluster's), or 'default' for the kernel's")
        ->capture_default_str();
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    std::fprintf(stderr, "%s: %s (see --help)\n", "ramkv-bench", e.what());
    return 2;
  }
  // The clients of latency and throughput make their transport from these (as
  // ClientOptions); everything else here (recovery's clients, the servers it starts)
  // follows the process-wide choice below.
  bool congestion_given = false;
  for (CLI::App* sub : app.get_subcommands()) {
    const CLI::Option* opt = sub->get_option_no_throw("--tcp-congestion");
    congestion_given = congestion_given || (opt != nullptr && opt->count() > 0);
  }
  if (std::string why; !ramkv::choose_tcp_congestion(tcp_congestion, congestion_given, &why)) {
    std::fprintf(stderr, "ramkv-bench: bad --tcp-congestion: %s\n", why.c_str());
    return 2;
  }
  cluster.transport = transport;
  cluster.rdma_device = rdma_device;
  cluster.rdma_port = rdma_port;
  if (transport == "rdma") {
#ifdef RAMKV_HAVE_RDMA
    ramkv::rdma::RdmaOptions rdma;
    rdma.device = rdma_device;
    rdma.port = static_cast<uint8_t>(rdma_port);
    ramkv::rdma::use_rdma(rdma);
    std::fprintf(stderr, "ramkv-bench: RPCs over RDMA (%s)\n",
                 std::string(ramkv::rdma::rdma_provider()).c_str());
#else
    std::fprintf(stderr, "ramkv-bench: --transport rdma: this build has no RDMA transport\n");
    return 2;
#endif
  }
  if (app.got_subcommand("memory")) return ramkv::bench::run_memory_bench(memory);
  if (app.got_subcommand("latency")) return ramkv::bench::run_latency_bench(cluster);
  if (app.got_subcommand("throughput")) return ramkv::bench::run_throughput_bench(cluster);
  if (app.got_subcommand("backup-disk")) return ramkv::bench::run_backup_disk_bench(backup_disk);
  if (app.got_subcommand("replay")) return ramkv::bench::run_replay_bench(replay);
  if (app.got_subcommand("recovery")) return ramkv::bench::run_recovery_bench(recovery);
  return 2;
}

// ramkv-coordinator: parses flags, opens the state store, runs the CoordinatorService
// until SIGTERM or SIGINT. Exit codes: 0 after a clean stop, 1 when the service cannot
// start (bad state file, port in use), 2 for bad command-line input.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <string>

#include "common/config.h"
#include "common/log.h"
#include "common/stop_signals.h"
#include "coordinator/coordinator_service.h"
#include "coordinator/external_store.h"
#ifdef RAMKV_HAVE_RDMA
#include "rdma/rdma_transport.h"
#endif

namespace {

struct Flags {
  std::string listen = "127.0.0.1:12246";
  std::string data_dir;
  std::string poll = "block";
  std::string tcp_congestion = "cubic";
  std::string log_level = "info";
  uint32_t verify_timeout_ms = 500;
  uint32_t verify_attempts = 3;
  std::string recovery_partition = "512M";
  std::string transport = "tcp";
  std::string rdma_device;
  uint32_t rdma_port = 1;
};

}  // namespace

int main(int argc, char** argv) {
  using namespace ramkv;
  CLI::App app{"ramkv coordinator: server list, tables and the tablet map"};
  Flags flags;
  app.add_option("--listen", flags.listen, "host:port to serve on")->capture_default_str();
  app.add_option("--data-dir", flags.data_dir, "directory for coordinator.state (created)")
      ->required();
  app.add_option("--poll", flags.poll, "dispatch loop: busy (spin) or block")
      ->check(CLI::IsMember({"busy", "block"}))
      ->capture_default_str();
  app.add_option("--log-level", flags.log_level, "debug, info, warning, error or silent")
      ->check(CLI::IsMember({"debug", "info", "warning", "error", "silent"}))
      ->capture_default_str();
  app.add_option("--verify-timeout-ms", flags.verify_timeout_ms,
                 "failure detection: timeout of each ping the coordinator sends to a server "
                 "reported as not answering (attempts are this far apart)")
      ->check(CLI::Range(1u, 600'000u))
      ->capture_default_str();
  app.add_option("--verify-attempts", flags.verify_attempts,
                 "failure detection: pings that must all fail before a server is declared "
                 "crashed")
      ->check(CLI::Range(1u, 100u))
      ->capture_default_str();
  app.add_option("--recovery-partition-bytes", flags.recovery_partition,
                 "crash recovery: the share of a crashed master's data each recovery master "
                 "replays (about a second of work each), e.g. 512M")
      ->capture_default_str();
  app.add_option("--tcp-congestion", flags.tcp_congestion,
                 "tcp: the congestion control of the coordinator's sockets, or 'default' for "
                 "the kernel's (see ramkv-server --help)")
      ->capture_default_str();
  app.add_option("--transport", flags.transport,
                 "RPC transport: tcp, or rdma (every process of the cluster must use the same)")
      ->check(CLI::IsMember({"tcp", "rdma"}))
      ->capture_default_str();
  app.add_option("--rdma-device", flags.rdma_device,
                 "rdma: the device to use, as ibv_devices names it (default: the first)");
  app.add_option("--rdma-port", flags.rdma_port, "rdma: the device port")
      ->check(CLI::Range(1u, 255u))
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    std::fprintf(stderr, "ramkv-coordinator: %s (see --help)\n", e.what());
    return 2;
  }
  if (!parse_locator(flags.listen).ok()) {
    std::fprintf(stderr, "ramkv-coordinator: --listen: '%s' is not host:port\n",
                 flags.listen.c_str());
    return 2;
  }
  LogLevel level;
  parse_log_level(flags.log_level, &level);
  set_log_level(level);
  if (std::string why;
      !choose_tcp_congestion(flags.tcp_congestion, app.count("--tcp-congestion") > 0, &why)) {
    std::fprintf(stderr, "ramkv-coordinator: bad --tcp-congestion: %s\n", why.c_str());
    return 2;
  }

  auto store = coordinator::FileStore::open(flags.data_dir);
  if (!store.ok()) {
    std::fprintf(stderr, "ramkv-coordinator: cannot use --data-dir %s\n", flags.data_dir.c_str());
    return 1;
  }
  auto partition = parse_bytes(flags.recovery_partition);
  if (!partition.ok() || *partition == 0) {
    std::fprintf(stderr,
                 "ramkv-coordinator: bad --recovery-partition-bytes '%s': expected a size "
                 "such as 512M\n",
                 flags.recovery_partition.c_str());
    return 2;
  }
  coordinator::CoordinatorOptions options{
      .listen_locator = flags.listen,
      .busy_poll = flags.poll == "busy",
      .verify_timeout_ns = uint64_t{flags.verify_timeout_ms} * 1'000'000,
      .verify_attempts = flags.verify_attempts,
      .recovery_partition_bytes = *partition};
  std::unique_ptr<ServerTransport> transport;  // null: TCP
  if (flags.transport == "rdma") {
#ifdef RAMKV_HAVE_RDMA
    rdma::RdmaOptions ropts;
    ropts.device = flags.rdma_device;
    ropts.port = static_cast<uint8_t>(flags.rdma_port);
    std::string why;
    auto made = rdma::make_rdma_server_transport({.busy_poll = flags.poll == "busy"}, ropts, &why);
    if (!made.ok()) {
      std::fprintf(stderr, "ramkv-coordinator: cannot start the RDMA transport: %s\n", why.c_str());
      return 1;
    }
    transport = std::move(made).value();
    // Every RPC this process sends goes over RDMA too.
    rdma::use_rdma(ropts);
#else
    std::fprintf(stderr,
                 "ramkv-coordinator: --transport rdma: this build has no RDMA transport (the "
                 "libibverbs headers were missing when it was built)\n");
    return 2;
#endif
  }
  auto service =
      coordinator::CoordinatorService::create(options, std::move(*store), std::move(transport));
  if (!service.ok()) {
    std::fprintf(stderr, "ramkv-coordinator: cannot start: %s\n",
                 std::string(status_name(service.status())).c_str());
    return 1;
  }
  stop_on_signal(service->get());
  install_stop_signals();
  LOG_INFO("coordinator listening on {} ({})", (*service)->locator(),
           flags.transport == "rdma" ? std::string("rdma")
           : tcp_congestion().empty()
               ? std::string("tcp, the kernel's congestion control")
               : "tcp, " + std::string(tcp_congestion()) + " congestion control");
  (*service)->run();
  stop_on_signal<coordinator::CoordinatorService>(nullptr);
  LOG_INFO("coordinator stopped");
  return 0;
}

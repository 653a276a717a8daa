// ramkv-server: one storage host, running a master, a backup, or both (the usual
// deployment). It allocates the master's memory and scans the backup's data directory,
// listens, enlists with the coordinator and serves on one dispatch thread until SIGTERM
// or SIGINT (docs/rpc.md, "Master" and "Backup"). A master with --replicas R > 0 keeps
// every segment on R backups of other servers and acknowledges a write only once it is
// on all of them (master/replica_manager.h). A failure detector thread pings the other
// servers and reports silent ones to the coordinator; a master that learns it was declared
// crashed stops serving (server/failure_detector.h, docs/recovery.md).
//
// Exit codes: 0 after a clean stop; 1 when the coordinator cannot be reached or refuses
// us, the memory cannot be had or the data directory cannot be used; 2 for bad flags or
// a bad configuration. Each failure ends with one line on stderr.
#include <CLI/CLI.hpp>

#include <malloc.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>

#include "backup/backup_service.h"
#include "backup/found_replica_collector.h"
#include "common/clock.h"
#include "common/config.h"
#include "common/log.h"
#include "common/stop_signals.h"
#include "common/transport.h"
#include "common/wire_format.h"
#include "master/master_service.h"
#include "master/recovery_task.h"
#include "master/replica_manager.h"
#include "master/tablet_dropper.h"
#include "server/failure_detector.h"
#ifdef RAMKV_HAVE_RDMA
#include "rdma/rdma_transport.h"
#endif

namespace {

using ramkv::Status;

struct ServerOptions {
  std::string coordinator;
  std::string listen = "127.0.0.1:0";
  bool master = true;
  bool backup = false;
  std::string memory = "1G";
  std::string segment_bytes;
  std::string hash_table_bytes;
  std::string poll = "block";
  std::string tcp_congestion = "cubic";
  std::string log_level;
  std::string data_dir;
  uint32_t replicas = 3;
  std::string durability = "buffered";
  uint32_t backup_buffers = 64;
  uint32_t backup_buffers_at_start = 8;
  double recovery_flush_hold_seconds = 10;
  uint32_t ping_interval_ms = 100;
  uint32_t ping_timeout_ms = 500;
  uint32_t recovery_pull_delay_ms = 0;
  uint32_t rpc_result_ttl_s = 3600;
  std::string transport = "tcp";
  std::string rdma_device;
  uint32_t rdma_port = 1;
  uint32_t rdma_recv_buffers = 16;
  std::string one_sided = "on";
};

// Replicas travel in one RPC each, so a segment must fit a message with room to spare.
constexpr uint64_t kMaxReplicatedSegmentBytes = 8u << 20;

// How long to keep trying a coordinator that does not answer, and each attempt's timeout.
constexpr uint64_t kEnlistPatienceNs = 10'000'000'000;
constexpr uint64_t kEnlistAttemptNs = 1'000'000'000;

template <typename... Args>
int fail(int code, fmt::format_string<Args...> format, Args&&... args) {
  std::fprintf(stderr, "ramkv-server: %s\n",
               fmt::format(format, std::forward<Args>(args)...).c_str());
  return code;
}

void add_flags(CLI::App& app, ServerOptions& o) {
  app.add_option("--coordinator", o.coordinator, "coordinator locator HOST:PORT")->required();
  app.add_option("--listen", o.listen, "address to serve on, HOST:PORT (port 0: any free port)")
      ->capture_default_str();
  app.add_flag("--master,!--no-master", o.master, "run the master service (default on)");
  app.add_flag("--backup", o.backup,
               "run the backup service, keeping replicas of other masters' segments in "
               "--data-dir");
  app.add_option("--data-dir", o.data_dir,
                 "backup: directory for replica files (<dir>/<master-id>/<segment-id>)");
  app.add_option("--replicas", o.replicas,
                 "master: replicas of each segment on other servers' backups; a write is "
                 "acknowledged once on all of them (0: no replication)")
      ->capture_default_str();
  app.add_option("--durability", o.durability,
                 "backup: acknowledge writes once in RAM buffers (buffered, which assumes "
                 "they survive power loss, as RAMCloud does) or once on disk (disk); use "
                 "the same on every server")
      ->check(CLI::IsMember({"buffered", "disk"}))
      ->capture_default_str();
  app.add_option("--backup-buffers", o.backup_buffers,
                 "backup: open replicas held in RAM at once (each one segment in size)")
      ->check(CLI::Range(1u, 1u << 16))
      ->capture_default_str();
  app.add_option("--backup-buffers-at-start", o.backup_buffers_at_start,
                 "backup: segment-sized buffers allocated and touched at start, kept for "
                 "open replicas and recovery reads (memory touched for the first time is "
                 "slow on virtual machines; a backup that should read its share of a "
                 "crashed master fast wants that share, in segments, plus some)")
      ->check(CLI::Range(0u, 1u << 16))
      ->capture_default_str();
  app.add_option("--backup-recovery-flush-hold", o.recovery_flush_hold_seconds,
                 "backup, buffered durability: seconds after a recovery starts reading our "
                 "replicas during which closed replicas stay in RAM rather than go to disk "
                 "(until the recovery is over, or a quarter of --backup-buffers is left), so "
                 "that the disk and CPUs go to the recovery; 0: never")
      ->check(CLI::Range(0.0, 3600.0))
      ->capture_default_str();
  app.add_option("--memory", o.memory, "log memory of the master, e.g. 1G")->capture_default_str();
  app.add_option("--transport", o.transport,
                 "RPC transport: tcp, or rdma (libibverbs RC queue pairs; every process of "
                 "the cluster must use the same)")
      ->check(CLI::IsMember({"tcp", "rdma"}))
      ->capture_default_str();
  app.add_option("--rdma-device", o.rdma_device,
                 "rdma: the device to use, as ibv_devices names it (default: the first)");
  app.add_option("--rdma-port", o.rdma_port, "rdma: the device port")
      ->check(CLI::Range(1u, 255u))
      ->capture_default_str();
  app.add_option("--rdma-recv-buffers", o.rdma_recv_buffers,
                 "rdma: receive buffers of the largest message size (16 MiB) posted for "
                 "requests; registered (pinned) memory")
      ->check(CLI::Range(1u, 4096u))
      ->capture_default_str();
  app.add_option("--one-sided", o.one_sided,
                 "rdma: masters append to backups' exposed buffers with RDMA WRITEs (on), or "
                 "every append is a write RPC (off); backups expose buffers only with "
                 "--durability buffered")
      ->check(CLI::IsMember({"on", "off"}))
      ->capture_default_str();
  app.add_option("--recovery-pull-delay-ms", o.recovery_pull_delay_ms,
                 "testing only: a recovery master waits this long between pulls of segment "
                 "data (slows recovery down so that tests can fail servers during one)")
      ->check(CLI::Range(0u, 60'000u));
  app.add_option("--rpc-result-ttl-s", o.rpc_result_ttl_s,
                 "master: forget the completion records (exactly-once results) of a client "
                 "not heard from for this long")
      ->check(CLI::Range(1u, 30u * 24 * 3600))
      ->capture_default_str();
  app.add_option("--segment-bytes", o.segment_bytes, "log segment size, e.g. 8M (default 8M)");
  app.add_option("--hash-table-bytes", o.hash_table_bytes,
                 "hash-table memory (default: memory / 16)");
  app.add_option("--tcp-congestion", o.tcp_congestion,
                 "tcp: the congestion control of this server's sockets, or 'default' for the "
                 "kernel's (net.ipv4.tcp_congestion_control); cubic because the kernel's "
                 "pacing under BBR doubles the CPU a byte costs on loopback (docs/rpc.md)")
      ->capture_default_str();
  app.add_option("--poll", o.poll, "dispatch loop: busy (spin) or block (sleep in the kernel)")
      ->check(CLI::IsMember({"busy", "block"}))
      ->capture_default_str();
  app.add_option("--log-level", o.log_level, "debug, info, warning, error or silent");
  app.add_option("--ping-interval-ms", o.ping_interval_ms,
                 "failure detection: ping one other server this often (0: do not ping)")
      ->check(CLI::Range(0u, 600'000u))
      ->capture_default_str();
  app.add_option("--ping-timeout-ms", o.ping_timeout_ms,
                 "failure detection: a server that does not answer a ping this soon is reported "
                 "to the coordinator, which checks it itself")
      ->check(CLI::Range(1u, 600'000u))
      ->capture_default_str();
}

// Turns the size flags into a MasterConfig; the error line names the flag.
ramkv::Result<ramkv::master::MasterConfig> master_config(const ServerOptions& o) {
  ramkv::master::MasterConfig config;
  // The server id is known only after enlisting, which happens after the memory is
  // allocated (so a host that cannot allocate never enlists); 0 marks "not enlisted".
  config.master_id = 0;
  auto memory = ramkv::parse_bytes(o.memory);
  if (!memory.ok()) {
    fail(2, "bad --memory '{}': expected a size such as 1G", o.memory);
    return Status::kInvalidArgument;
  }
  config.memory_bytes = *memory;
  config.rpc_result_ttl_ns = uint64_t{o.rpc_result_ttl_s} * 1'000'000'000;
  if (!o.segment_bytes.empty()) {
    auto segment = ramkv::parse_bytes(o.segment_bytes);
    if (!segment.ok() || *segment > UINT32_MAX) {
      fail(2, "bad --segment-bytes '{}': expected a size such as 8M", o.segment_bytes);
      return Status::kInvalidArgument;
    }
    config.segment_bytes = static_cast<uint32_t>(*segment);
  }
  if (!o.hash_table_bytes.empty()) {
    auto table = ramkv::parse_bytes(o.hash_table_bytes);
    if (!table.ok() || *table == 0) {
      fail(2, "bad --hash-table-bytes '{}': expected a size such as 64M", o.hash_table_bytes);
      return Status::kInvalidArgument;
    }
    config.hash_table_bytes = *table;
  }
  return config;
}

// Enlists with `services`, retrying while the coordinator is unreachable. The server id,
// or 0 after printing why not.
uint64_t enlist(const std::string& coordinator, const std::string& locator, uint32_t services,
                uint64_t replaces_id) {
  auto transport = ramkv::make_client_transport({});
  std::vector<std::byte> body;
  ramkv::wire::BodyWriter w(&body);
  w.put(ramkv::wire::EnlistServerRequest{.services = services,
                                         .locator_bytes = static_cast<uint32_t>(locator.size()),
                                         .replaces_id = replaces_id});
  w.put_bytes(locator);
  const ramkv::Clock& clock = ramkv::SystemClock::instance();
  const uint64_t deadline = clock.now_ns() + kEnlistPatienceNs;
  Status last = Status::kUnavailable;
  while (!ramkv::stop_requested() && clock.now_ns() < deadline) {
    auto r = ramkv::call(
        *transport, coordinator,
        {.opcode = ramkv::wire::Opcode::kEnlistServer, .timeout_ns = kEnlistAttemptNs}, body);
    last = r.status;
    if (r.status == Status::kOk) {
      ramkv::wire::BodyReader in(r.body);
      ramkv::wire::EnlistServerResponse resp;
      if (!in.get(&resp) || !in.at_end() || resp.server_id == 0) {
        fail(1, "the coordinator at {} sent a malformed enlist reply", coordinator);
        return 0;
      }
      return resp.server_id;
    }
    if (!ramkv::status_is_retryable(r.status)) break;
    transport->disconnect(coordinator);  // reconnect from scratch next time
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  if (ramkv::stop_requested()) {
    fail(1, "stopped before enlisting");
  } else if (ramkv::status_is_retryable(last)) {
    fail(1, "cannot reach the coordinator at {} (gave up after {} s: {})", coordinator,
         kEnlistPatienceNs / 1'000'000'000, ramkv::status_name(last));
  } else {
    fail(1, "the coordinator at {} refused to enlist us: {}", coordinator,
         ramkv::status_name(last));
  }
  return 0;
}

// The id this backup had before a restart (kept in its data directory), or 0.
uint64_t previous_server_id(const std::string& data_dir) {
  std::FILE* f = std::fopen((data_dir + "/server-id").c_str(), "r");
  if (f == nullptr) return 0;
  unsigned long long id = 0;
  if (std::fscanf(f, "%llu", &id) != 1) id = 0;
  std::fclose(f);
  return id;
}

bool save_server_id(const std::string& data_dir, uint64_t id) {
  std::string tmp = data_dir + "/server-id.tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "w");
  if (f == nullptr) return false;
  bool ok = std::fprintf(f, "%llu\n", static_cast<unsigned long long>(id)) > 0;
  ok = std::fflush(f) == 0 && ok;
  ok = ::fsync(fileno(f)) == 0 && ok;
  ok = std::fclose(f) == 0 && ok;
  return ok && std::rename(tmp.c_str(), (data_dir + "/server-id").c_str()) == 0;
}

// Fences every master the list shows crashed or replaced by a newer generation (a zombie
// must not change replicas that recovery will read).
void fence_masters(ramkv::backup::BackupService& backup,
                   const std::vector<ramkv::wire::ServerListItem>& servers) {
  for (const auto& s : servers) {
    if (s.status != 0) backup.fence_master(s.server_id);
    // Older generations of this index were replaced: fence the ones we have seen.
    backup.fence_generations_below(s.server_id);
    // Removed: its recovery is over, and its replicas are no longer needed.
    if (s.status == 2) backup.free_master(s.server_id);
  }
}

// The backup's lines of `get server stats`.
std::string backup_stats(const ramkv::backup::BackupService& backup) {
  return fmt::format(
      "backup_replicas {}\nbackup_buffers_in_use {}\nbackup_buffers_free {}\n"
      "backup_buffers_allocated_late {}\nbackup_recovery_read_bytes {}\n"
      "backup_recovery_read_ns {}\nbackup_regions_exposed {}\nbackup_remote_appends {}\n"
      "backup_bytes_placed {}\nbackup_flushes_queued {}\nbackup_flush_operations_in_flight {}\n"
      "backup_flush_failures {}\nbackup_holding_flushes {}\n",
      backup.replica_count(), backup.buffers_in_use(), backup.buffers_free(),
      backup.buffers_allocated_late(), backup.recovery_bytes_read(), backup.recovery_read_ns(),
      backup.regions_exposed(), backup.remote_appends(), backup.bytes_placed(),
      backup.flushes_queued(), backup.operations_in_flight(), backup.flush_failures(),
      backup.holding_flushes() ? 1 : 0);
}

// Asks the coordinator for the server list once (after enlisting: the pushed update may
// have been sent before our loop ran).
bool fetch_server_list(const std::string& coordinator,
                       std::vector<ramkv::wire::ServerListItem>* servers, uint64_t* version) {
  auto transport = ramkv::make_client_transport({});
  auto r = ramkv::call(
      *transport, coordinator,
      {.opcode = ramkv::wire::Opcode::kGetServerList, .timeout_ns = kEnlistAttemptNs}, {});
  return r.status == Status::kOk &&
         ramkv::wire::decode_server_list(r.body, version, servers) == Status::kOk;
}

int run_server(const ServerOptions& o) {
  std::unique_ptr<ramkv::master::MasterService> master;
  uint32_t segment_bytes = 8u << 20;
  if (o.master) {
    auto config = master_config(o);
    if (!config.ok()) return 2;
    if (o.replicas > 0 && config->segment_bytes > kMaxReplicatedSegmentBytes) {
      return fail(2, "--segment-bytes {} is too large to replicate (at most {})",
                  ramkv::format_bytes(config->segment_bytes),
                  ramkv::format_bytes(kMaxReplicatedSegmentBytes));
    }
    segment_bytes = config->segment_bytes;
    auto service = ramkv::master::MasterService::create(*config);
    if (!service.ok()) {
      // kInvalidArgument was explained on one line by MasterConfig::finalize.
      if (service.status() == Status::kInvalidArgument) return 2;
      return fail(1, "cannot allocate the master's memory ({}): {}", o.memory,
                  ramkv::status_name(service.status()));
    }
    master = std::move(service).value();
  } else if (!o.segment_bytes.empty()) {
    auto parsed = ramkv::parse_bytes(o.segment_bytes);
    if (!parsed.ok() || *parsed == 0 || *parsed > kMaxReplicatedSegmentBytes) {
      return fail(2, "bad --segment-bytes '{}': expected a size up to 8M", o.segment_bytes);
    }
    segment_bytes = static_cast<uint32_t>(*parsed);
  }
  std::unique_ptr<ramkv::backup::BackupService> backup;
  uint64_t replaces_id = 0;
  if (o.backup) {
    std::error_code ec;
    std::filesystem::create_directories(o.data_dir, ec);
    if (ec) return fail(1, "cannot create --data-dir {}: {}", o.data_dir, ec.message());
    // The largest segment any master may send: ours, or the most a replica may be.
    auto service = ramkv::backup::BackupService::create(
        {.data_dir = o.data_dir,
         .segment_bytes = o.segment_bytes.empty() && !o.master
                              ? static_cast<uint32_t>(kMaxReplicatedSegmentBytes)
                              : segment_bytes,
         .max_buffers = o.backup_buffers,
         .buffers_at_start = o.backup_buffers_at_start,
         .durability = o.durability == "disk" ? ramkv::backup::Durability::kDisk
                                              : ramkv::backup::Durability::kBuffered,
         .recovery_flush_hold_ns = static_cast<uint64_t>(o.recovery_flush_hold_seconds * 1e9)});
    if (!service.ok()) {
      return fail(1, "cannot start the backup service on {}: {}", o.data_dir,
                  ramkv::status_name(service.status()));
    }
    backup = std::move(service).value();
    replaces_id = previous_server_id(o.data_dir);
  }
  ramkv::TransportOptions topts;
  topts.busy_poll = o.poll == "busy";
  std::unique_ptr<ramkv::ServerTransport> transport;
  if (o.transport == "rdma") {
#ifdef RAMKV_HAVE_RDMA
    ramkv::rdma::RdmaOptions ropts;
    ropts.device = o.rdma_device;
    ropts.port = static_cast<uint8_t>(o.rdma_port);
    ropts.recv_buffers = o.rdma_recv_buffers;
    std::string why;
    auto made = ramkv::rdma::make_rdma_server_transport(topts, ropts, &why);
    if (!made.ok()) return fail(1, "cannot start the RDMA transport: {}", why);
    transport = std::move(made).value();
    // Every RPC this process sends goes over RDMA too.
    ramkv::rdma::use_rdma(ropts);
    if (master) {
      if (Status s = transport->register_memory(master->objects().log().pool().arena());
          s != Status::kOk) {
        return fail(1, "cannot register the log memory ({}) with the RDMA device",
                    ramkv::format_bytes(master->objects().config().memory_bytes));
      }
    }
#else
    return fail(2,
                "--transport rdma: this build has no RDMA transport (the libibverbs "
                "headers were missing when it was built)");
#endif
  } else {
    transport = ramkv::make_tcp_server_transport(topts);
  }
  if (Status s = transport->listen(o.listen); s != Status::kOk) {
    return fail(s == Status::kInvalidArgument ? 2 : 1, "cannot listen on {}: {}", o.listen,
                ramkv::status_name(s));
  }
  ramkv::stop_on_signal(transport.get());
  // The locator the transport really bound (port 0 picks one) is the one clients need.
  const std::string locator = transport->locator();
  if (locator.starts_with("0.0.0.0:")) {
    LOG_WARNING(
        "enlisting as {}: clients on other hosts cannot use that address; pass --listen "
        "with this host's address",
        locator);
  }
  const uint32_t services =
      (master ? ramkv::wire::kServiceMaster : 0u) | (backup ? ramkv::wire::kServiceBackup : 0u);
  uint64_t server_id = enlist(o.coordinator, locator, services, replaces_id);
  if (server_id == 0) {
    // The transport dies on return: a signal must not reach it through the handler.
    ramkv::stop_on_signal<ramkv::ServerTransport>(nullptr);
    return 1;
  }
  if (backup && !save_server_id(o.data_dir, server_id)) {
    LOG_WARNING("cannot record our server id in {}: a restart will enlist as a new server",
                o.data_dir);
  }
  std::unique_ptr<ramkv::master::ReplicaManager> replicas;
  std::unique_ptr<ramkv::master::RecoveryTask> recovery;
  std::unique_ptr<ramkv::master::TabletDropper> dropper;
  if (master) {
    if (Status s = master->objects().log().set_master_id(server_id); s != Status::kOk) {
      ramkv::stop_on_signal<ramkv::ServerTransport>(nullptr);
      return fail(1, "cannot start the log as master {}: {}", server_id, ramkv::status_name(s));
    }
    if (o.replicas > 0) {
      replicas = std::make_unique<ramkv::master::ReplicaManager>(
          ramkv::master::ReplicaManager::Options{.replicas = o.replicas,
                                                 .coordinator = o.coordinator,
                                                 .one_sided = o.one_sided == "on"},
          master->objects().log(), *transport);
      if (o.transport == "rdma") {
        // Refused registration is logged; the appends then go as RPCs.
        (void)replicas->use_log_memory(master->objects().log().pool().arena());
      }
      replicas->set_server_id(server_id);
      master->set_replication(replicas.get());
      transport->add_loop_task(replicas.get());
    }
    // Any master may be asked to recover part of a crashed one (docs/recovery.md).
    recovery = std::make_unique<ramkv::master::RecoveryTask>(
        ramkv::master::RecoveryTask::Options{
            .coordinator = o.coordinator,
            .pull_delay_ns = uint64_t{o.recovery_pull_delay_ms} * 1'000'000},
        master->objects(), replicas.get());
    recovery->set_server_id(server_id);
    if (backup) {
      recovery->set_local_backup([&backup](const ramkv::wire::GetRecoveryDataRequest& request,
                                           ramkv::wire::RecoveryDataResponse* head,
                                           std::vector<std::span<const std::byte>>* pieces) {
        return backup->recovery_data(request, head, pieces);
      });
    }
    master->set_recovery(recovery.get());
    transport->add_loop_task(recovery.get());
    // Dropped tablets are emptied between requests, not in the drop's RPC.
    dropper = std::make_unique<ramkv::master::TabletDropper>(
        master->objects(), ramkv::master::TabletDropper::Options{});
    master->set_dropper(dropper.get());
    recovery->set_dropper(dropper.get());
    recovery->set_owned(&master->tablets());
    transport->add_loop_task(dropper.get());
  }
  // The backup's disk writes complete on the dispatch loop, which sends their replies.
  if (backup) backup->attach(*transport);
  // Declared crashed (by a list pushed to the dispatch thread, or one the detector's thread
  // fetched): the master stops serving for good. Said once in the log.
  std::atomic<bool> declared_crashed{false};
  auto stop_serving = [&](const char* how) {
    if (master) master->fence();
    if (!declared_crashed.exchange(true)) {
      LOG_WARNING("server {}.{} was declared crashed by the coordinator ({}){}",
                  static_cast<uint32_t>(server_id), static_cast<uint32_t>(server_id >> 32), how,
                  master ? ": the master stops serving (every request but echo is answered "
                           "fenced)"
                         : "");
    }
  };
  std::unique_ptr<ramkv::server::FailureDetector> detector;
  if (o.ping_interval_ms > 0) {
    detector = std::make_unique<ramkv::server::FailureDetector>(
        ramkv::server::FailureDetector::Options{
            .coordinator = o.coordinator,
            .self_id = server_id,
            .ping_interval_ns = uint64_t{o.ping_interval_ms} * 1'000'000,
            .ping_timeout_ns = uint64_t{o.ping_timeout_ms} * 1'000'000},
        [&] { stop_serving("seen in a server list fetched after losing touch"); });
  }
  std::vector<ramkv::wire::ServerListItem> servers;
  uint64_t list_version = 0;
  // Everything a server list from the coordinator changes here, on the dispatch thread.
  auto take_server_list = [&] {
    if (detector) detector->update_servers(list_version, servers);
    if (backup) fence_masters(*backup, servers);
    if (ramkv::server::declared_gone(server_id, servers)) stop_serving("seen in the server list");
  };
  if (fetch_server_list(o.coordinator, &servers, &list_version)) {
    if (master) master->update_server_list(list_version, servers);
    take_server_list();
  }
  if (detector) detector->start();
  // A restarted backup tells the coordinator what its disk holds, then frees what the
  // masters no longer need (backup/found_replica_collector.h).
  std::unique_ptr<ramkv::backup::FoundReplicaCollector> collector;
  if (backup) {
    auto found = backup->list(/*found_on_disk_only=*/true);
    if (!found.empty()) {
      LOG_INFO("found {} replicas in {} from before the restart", found.size(), o.data_dir);
      collector = std::make_unique<ramkv::backup::FoundReplicaCollector>(
          ramkv::backup::FoundReplicaCollector::Options{
              .coordinator = o.coordinator, .self_locator = locator, .backup_id = server_id},
          std::move(found));
      collector->start();
    }
  }
  LOG_INFO(
      "server {} listening on {} ({}{}{}; {})", server_id, locator,
      master
          ? fmt::format("master with {} of log memory, a {} hash table, {} replicas",
                        ramkv::format_bytes(master->objects().config().memory_bytes),
                        ramkv::format_bytes(master->objects().stats().hash_table_bytes), o.replicas)
          : std::string(),
      master && backup ? "; " : "",
      backup ? fmt::format("backup in {}, {} durability", o.data_dir, o.durability) : std::string(),
      o.transport == "rdma" ? std::string("rdma")
      : ramkv::tcp_congestion().empty()
          ? std::string("tcp, the kernel's congestion control")
          : fmt::format("tcp, {} congestion control", ramkv::tcp_congestion()));
  transport->run([&](const ramkv::wire::MessageHeader& h, std::span<const std::byte> body,
                     ramkv::Reply& reply) {
    const auto op = static_cast<ramkv::wire::Opcode>(h.opcode);
    const bool backup_op =
        h.opcode >= static_cast<uint16_t>(ramkv::wire::Opcode::kBackupOpen) &&
        h.opcode <= static_cast<uint16_t>(ramkv::wire::Opcode::kBackupGetRecoveryData);
    if (backup_op) {
      if (backup) return backup->handle(h, body, reply);
      return reply.set_status(Status::kBadRequest);
    }
    if (op == ramkv::wire::Opcode::kServerListUpdate) {
      uint64_t version = 0;
      std::vector<ramkv::wire::ServerListItem> update;
      if (ramkv::wire::decode_server_list(body, &version, &update) != Status::kOk) {
        return reply.set_status(Status::kBadRequest);
      }
      if (version >= list_version) {
        list_version = version;
        servers = std::move(update);
        take_server_list();
      }
      if (!master) return;
    }
    if (master) {
      master->handle(h, body, reply);
      if (op == ramkv::wire::Opcode::kGetServerStats && backup && reply.status() == Status::kOk) {
        reply.writer().put_bytes(backup_stats(*backup));
      }
      return;
    }
    if (op == ramkv::wire::Opcode::kEcho) return reply.add_external(body);
    if (op == ramkv::wire::Opcode::kGetServerStats && body.empty()) {
      return reply.writer().put_bytes(backup_stats(*backup));
    }
    reply.set_status(Status::kBadRequest);  // a backup-only server has no master service
  });
  if (detector) detector->stop();
  if (collector) collector->stop();
  ramkv::stop_on_signal<ramkv::ServerTransport>(nullptr);
  // Buffered closes are answered before their files are written; what is still in RAM
  // goes to disk now, so that a restart here finds it.
  if (backup) backup->write_held(10'000'000'000);
  LOG_INFO("server {} stopped", server_id);
  return 0;
}

// A server allocates and frees megabyte buffers all the time (messages in and out,
// replication ranges, replica buffers). glibc would hand each one back to the kernel
// (munmap, or a trim of the heap's top) and map fresh pages for the next, and on virtual
// machines every fresh page costs a fault when first touched (~5 us per 4 KiB here: a
// recovery faulted ~130k pages, ~0.6 s of CPU). Kept in the heap, freed buffers are
// reused warm. Allocations of 32 MiB or more (the hash table) are still mapped apart.
void keep_freed_memory() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
}

}  // namespace

int main(int argc, char** argv) {
  keep_freed_memory();
  CLI::App app{"ramkv-server: a ramkv storage server (master and/or backup service)"};
  ServerOptions options;
  add_flags(app, options);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    return fail(2, "{} (see --help)", e.what());
  }
  if (!options.log_level.empty()) {
    ramkv::LogLevel level;
    if (!ramkv::parse_log_level(options.log_level, &level)) {
      return fail(2, "bad --log-level '{}': expected debug, info, warning, error or silent",
                  options.log_level);
    }
    ramkv::set_log_level(level);
  }
  if (!options.master && !options.backup) {
    return fail(2, "nothing to run: --no-master and no --backup");
  }
  if (options.backup && options.data_dir.empty()) {
    return fail(2, "--backup needs --data-dir DIR for its replica files");
  }
  if (auto loc = ramkv::parse_locator(options.coordinator); !loc.ok()) {
    return fail(2, "bad --coordinator '{}': expected HOST:PORT", options.coordinator);
  }
  if (auto loc = ramkv::parse_locator(options.listen); !loc.ok()) {
    return fail(2, "bad --listen '{}': expected HOST:PORT", options.listen);
  }
  if (std::string why; !ramkv::choose_tcp_congestion(options.tcp_congestion,
                                                     app.count("--tcp-congestion") > 0, &why)) {
    return fail(2, "bad --tcp-congestion: {}", why);
  }
  ramkv::install_stop_signals();
  return run_server(options);
}

// Crash recovery with real processes (docs/recovery.md): a master killed with kill -9 is
// detected, its data is rebuilt on the other masters from the backups, and every
// acknowledged write is readable afterwards with its latest value; an incomplete log
// stops recovery instead of serving partial data.
#include <catch2/catch.hpp>

#include <filesystem>
#include <map>
#include <optional>
#include <string>

#include "common/clock.h"
#include "test/cluster/cluster_fixture.h"

namespace ramkv {
using test::ClusterShape;
using test::LocalCluster;
using test::server_stat;
namespace {

struct RecoveryRow {
  wire::RecoveryInfo info;
  std::vector<wire::PartitionInfo> partitions;
  std::string error;
};

// The coordinator's recoveries (kGetRecoveries).
std::vector<RecoveryRow> recoveries(const std::string& coordinator) {
  auto transport = make_client_transport({});
  auto r = call(*transport, coordinator,
                {.opcode = wire::Opcode::kGetRecoveries, .timeout_ns = 5'000'000'000}, {});
  REQUIRE(r.status == Status::kOk);
  wire::BodyReader in(r.body);
  wire::RecoveriesHeader header;
  REQUIRE(in.get(&header));
  std::vector<RecoveryRow> rows(header.count);
  for (auto& row : rows) REQUIRE(in.get(&row.info));
  for (auto& row : rows) {
    row.partitions.resize(row.info.partitions);
    for (auto& p : row.partitions) REQUIRE(in.get(&p));
  }
  for (auto& row : rows) {
    std::string_view error;
    REQUIRE(in.get_string(row.info.error_bytes, &error));
    row.error = std::string(error);
  }
  REQUIRE(in.at_end());
  return rows;
}

// The recovery of `master_id` once it has ended (done or failed), or nullopt after
// `seconds`.
std::optional<RecoveryRow> wait_for_recovery(const std::string& coordinator, uint64_t master_id,
                                             int seconds, uint8_t until) {
  for (int i = 0; i < seconds * 20; ++i) {
    for (const auto& row : recoveries(coordinator)) {
      if (row.info.crashed_master_id == master_id && row.info.state == until) return row;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return std::nullopt;
}

// The id of server `n` (a combined server keeps it in its backup dir).
uint64_t server_id(LocalCluster& cluster, size_t n) {
  for (int i = 0; i < 250; ++i) {
    if (uint64_t id = cluster.backup_server_id(n); id != 0) return id;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  FAIL("server " << n + 1 << " never saved its id");
  return 0;
}

std::string value_for(int key, int round) {
  return "value-" + std::to_string(key) + "-" + std::to_string(round) +
         std::string(static_cast<size_t>(100 + key % 200), static_cast<char>('a' + key % 26));
}

// The coordinator's id of server `n` of the cluster (by its locator).
uint64_t server_id_of(LocalCluster& cluster, Client& client, size_t n) {
  auto servers = client.servers();
  REQUIRE(servers.ok());
  for (const auto& s : *servers) {
    if (s.locator == cluster.locator_of(n)) return s.server_id;
  }
  FAIL("server " << n + 1 << " is not listed");
  return 0;
}

}  // namespace

TEST_CASE("recovery: a master killed under writes comes back with every acknowledged write",
          "[cluster][recovery]") {
  LocalCluster cluster(ClusterShape{.servers = 4, .replicas = 3});
  auto client = cluster.client(30'000);
  auto table = client->create_table("recovered", 8);
  REQUIRE(table.ok());
  const uint64_t victim = server_id(cluster, 0);

  // key -> latest acknowledged value (nullopt: removed).
  std::map<std::string, std::optional<std::string>> acked;
  const uint64_t deadline = SystemClock::instance().now_ns() + 120'000'000'000;
  for (int round = 0; round < 3; ++round) {
    for (int k = 0; k < 600; ++k) {
      REQUIRE(SystemClock::instance().now_ns() < deadline);
      std::string key = "key-" + std::to_string(k);
      if (round == 2 && k == 100) cluster.server(0).kill9();  // under load
      if (round > 0 && k % 7 == 0) {
        auto r = client->remove(*table, key);
        INFO("remove " << key << ": " << status_name(r.status()));
        REQUIRE(r.ok());
        acked[key] = std::nullopt;
      } else {
        auto r = client->write(*table, key, value_for(k, round));
        INFO("write " << key << " round " << round << ": " << status_name(r.status()));
        REQUIRE(r.ok());
        acked[key] = value_for(k, round);
      }
    }
  }
  auto row = wait_for_recovery(cluster.coordinator(), victim, 60, wire::kRecoveryDone);
  REQUIRE(row.has_value());
  CHECK(row->info.finished_unix_ns >= row->info.declared_unix_ns);
  for (const auto& p : row->partitions) {
    CHECK(p.done == 1);
    CHECK(p.recovery_master_id != victim);
  }
  // No tablet is left with the dead master, and every acknowledged write reads back.
  auto tablets = client->tablets(*table);
  REQUIRE(tablets.ok());
  for (const auto& t : *tablets) CHECK(t.server_id != victim);
  for (const auto& [key, value] : acked) {
    auto r = client->read(*table, key);
    INFO(key);
    if (value.has_value()) {
      REQUIRE(r.ok());
      CHECK(r->value == *value);
    } else {
      CHECK(r.status() == Status::kObjectNotFound);
    }
  }
  // Writes go on, on the new owners.
  REQUIRE(client->write(*table, "after", "recovery").ok());
  // Every server is master and backup: a recovery master had the segments its own backup
  // was primary for by a call (master/recovery_task.h, set_local_backup), the others by
  // RPC. Which are which depends on where the primaries fell; every partition pulled
  // every segment of the log once (nothing failed here).
  int64_t local = 0;
  int64_t remote = 0;
  for (size_t n = 1; n < 4; ++n) {
    const int64_t l = server_stat(*client, cluster.locator_of(n), "recovery_segments_local");
    const int64_t r = server_stat(*client, cluster.locator_of(n), "recovery_segments_remote");
    REQUIRE(l >= 0);
    REQUIRE(r >= 0);
    local += l;
    remote += r;
    // The bytes had over the network are those of the segments had by RPC.
    const int64_t pulled = server_stat(*client, cluster.locator_of(n), "recovery_bytes_pulled");
    const int64_t pulled_remote =
        server_stat(*client, cluster.locator_of(n), "recovery_bytes_pulled_remote");
    REQUIRE(pulled_remote >= 0);
    CHECK(pulled_remote <= pulled);
    if (r == 0) CHECK(pulled_remote == 0);
    if (l == 0) CHECK(pulled_remote == pulled);
  }
  INFO("segments had locally " << local << ", by RPC " << remote);
  CHECK(local + remote >= static_cast<int64_t>(row->partitions.size()));
  CHECK((local + remote) % static_cast<int64_t>(row->partitions.size()) == 0);
  // A recovery master's report resent after the recovery ended (its answer was lost) is
  // answered kOk: kUnknownTablet would have it drop keys it owns. Another master's is not.
  auto transport = make_client_transport({});
  for (const auto& p : row->partitions) {
    for (const uint64_t claimed : {p.recovery_master_id, victim}) {
      std::vector<std::byte> body;
      wire::BodyWriter(&body).put(
          wire::RecoveryMasterFinishedRequest{.recovery_id = row->info.recovery_id,
                                              .recovery_master_id = claimed,
                                              .partition_id = p.partition_id,
                                              .status = static_cast<uint16_t>(Status::kOk)});
      auto r = call(*transport, cluster.coordinator(),
                    {.opcode = wire::Opcode::kRecoveryMasterFinished, .timeout_ns = 5'000'000'000},
                    body);
      CHECK(r.status == (claimed == victim ? Status::kUnknownTablet : Status::kOk));
    }
  }
  // A report the coordinator cannot place (a recovery it does not know: it restarted, or
  // is retrying one that failed) is kOk when the tablets it names are that master's in
  // the persisted map, kUnknownTablet when they are not.
  REQUIRE(!tablets->empty());
  const TabletInfo& mine = tablets->front();
  for (const uint64_t claimed : {mine.server_id, victim}) {
    std::vector<std::byte> body;
    wire::BodyWriter w(&body);
    w.put(wire::RecoveryMasterFinishedRequest{.recovery_id = 1,
                                              .recovery_master_id = claimed,
                                              .partition_id = 0,
                                              .status = static_cast<uint16_t>(Status::kOk)});
    w.put(wire::TabletListHeader{.count = 1});
    w.put(wire::TabletWire{.table_id = mine.table_id,
                           .start_hash = mine.start_hash,
                           .end_hash = mine.end_hash,
                           .server_id = claimed});
    auto r =
        call(*transport, cluster.coordinator(),
             {.opcode = wire::Opcode::kRecoveryMasterFinished, .timeout_ns = 5'000'000'000}, body);
    CHECK(r.status == (claimed == victim ? Status::kUnknownTablet : Status::kOk));
  }
}

TEST_CASE("recovery: a log with a segment missing everywhere stops with an error",
          "[cluster][recovery]") {
  // Disk durability, so that every replica is a file the test can remove; small segments,
  // so that the log has several and the digest names the missing one.
  LocalCluster cluster(
      ClusterShape{.servers = 4, .replicas = 3, .durability = "disk", .segment_bytes = "3M"});
  auto client = cluster.client(5'000);
  auto table = client->create_table("incomplete", 4);
  REQUIRE(table.ok());
  const uint64_t victim = server_id(cluster, 0);
  // 4 tablets over 4 masters: about a quarter of 40 MB lands on the victim.
  for (int k = 0; k < 1200; ++k) {
    REQUIRE(client->write(*table, "key-" + std::to_string(k), std::string(32'000, 'x')).ok());
  }
  cluster.server(0).kill9();
  // Every replica of the victim's first segment goes, on every backup. The backups still
  // list them (their files are read only when recovery asks).
  int removed = 0;
  for (size_t n = 1; n < cluster.server_count(); ++n) {
    std::filesystem::path dir =
        std::filesystem::path(cluster.backup_dir(n)) / std::to_string(victim);
    std::error_code ec;
    for (const auto& f : std::filesystem::directory_iterator(dir, ec)) {
      if (f.path().filename() == "1") removed += std::filesystem::remove(f.path()) ? 1 : 0;
    }
  }
  REQUIRE(removed == 3);
  auto row = wait_for_recovery(cluster.coordinator(), victim, 60, wire::kRecoveryFailed);
  REQUIRE(row.has_value());
  INFO(row->error);
  // Found missing when the backups list their replicas, or when none can read it.
  CHECK((row->error.find("no usable replica of segment 1 ") != std::string::npos ||
         row->error.find("no backup could give segment 1 ") != std::string::npos));
  // Its tablets stay with the dead master: unserved, not served half empty.
  auto tablets = client->tablets(*table);
  REQUIRE(tablets.ok());
  bool still_victims = false;
  for (const auto& t : *tablets) still_victims |= t.server_id == victim;
  CHECK(still_victims);
}

namespace {

// Fills `table` with `count` objects of about 20 KB, every write acknowledged.
// The process of server `id`. The fixture numbers its servers from 0 in start order; the
// coordinator's ids follow enlistment, so the process is found by locator.
test::Process& process_of(LocalCluster& cluster, const std::vector<ServerInfo>& servers,
                          uint64_t id) {
  for (const auto& s : servers) {
    if (s.server_id != id) continue;
    for (size_t n = 0; n < cluster.server_count(); ++n) {
      if (cluster.locator_of(n) == s.locator) return cluster.server(n);
    }
  }
  FAIL("no process for server " << id);
  return cluster.server(0);
}

std::map<std::string, std::string> fill(Client& client, uint64_t table, int count) {
  std::map<std::string, std::string> acked;
  for (int k = 0; k < count; ++k) {
    std::string key = "key-" + std::to_string(k);
    std::string value = value_for(k, 0) + std::string(20'000, static_cast<char>('a' + k % 26));
    auto r = client.write(table, key, value);
    INFO("write " << key << ": " << status_name(r.status()));
    REQUIRE(r.ok());
    acked[key] = value;
  }
  return acked;
}

void check_all(Client& client, uint64_t table, const std::map<std::string, std::string>& acked) {
  for (const auto& [key, value] : acked) {
    auto r = client.read(table, key);
    INFO(key << ": " << status_name(r.status()));
    REQUIRE(r.ok());
    CHECK(r->value == value);
  }
}

// Waits until the coordinator shows a running recovery of `master_id` with a partition
// given to a recovery master; returns that master's id (0 after 30 s).
uint64_t wait_for_recovery_master(const std::string& coordinator, uint64_t master_id) {
  for (int i = 0; i < 6000; ++i) {
    for (const auto& row : recoveries(coordinator)) {
      if (row.info.crashed_master_id != master_id || row.info.state != wire::kRecoveryRunning) {
        continue;
      }
      for (const auto& p : row.partitions) {
        if (p.recovery_master_id != 0 && p.done == 0) return p.recovery_master_id;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return 0;
}

}  // namespace

TEST_CASE("recovery: a recovery master killed during recovery does not lose the recovery",
          "[cluster][recovery]") {
  // Recovery masters pause between segment pulls (fault injection), so the test can kill
  // one while it recovers.
  LocalCluster cluster(ClusterShape{.masters = 4,
                                    .backups = 4,
                                    .replicas = 3,
                                    .segment_bytes = "3M",
                                    .server_args = {"--recovery-pull-delay-ms", "300"}});
  auto client = cluster.client(60'000);
  auto table = client->create_table("twice", 4);
  REQUIRE(table.ok());
  auto acked = fill(*client, *table, 1200);
  auto servers = client->servers();
  REQUIRE(servers.ok());
  uint64_t victim = 0;
  for (const auto& s : *servers) {
    if (s.master && victim == 0) victim = s.server_id;
  }
  process_of(cluster, *servers, victim).kill9();
  const uint64_t recovery_master = wait_for_recovery_master(cluster.coordinator(), victim);
  REQUIRE(recovery_master != 0);
  process_of(cluster, *servers, recovery_master).kill9();
  // Both are recovered: the first master's partition goes to another master, and the
  // killed recovery master's own data too.
  REQUIRE(wait_for_recovery(cluster.coordinator(), victim, 90, wire::kRecoveryDone).has_value());
  REQUIRE(wait_for_recovery(cluster.coordinator(), recovery_master, 90, wire::kRecoveryDone)
              .has_value());
  check_all(*client, *table, acked);
  REQUIRE(client->write(*table, "after", "both recoveries").ok());
}

TEST_CASE("recovery: what a recovery master re-replicated comes back when it crashes too",
          "[cluster][recovery]") {
  // A recovery master's replay closes segments faster than they reach its backups, which
  // then catch up; the recovery ends only once all of it is durable there. Those replicas
  // must be whole: the recovery master is killed in turn and recovered from them.
  LocalCluster cluster(ClusterShape{.servers = 4, .replicas = 3, .segment_bytes = "4M"});
  auto client = cluster.client(60'000);
  auto table = client->create_table("twice over", 1);  // one tablet: one master holds it
  REQUIRE(table.ok());
  auto acked = fill(*client, *table, 800);  // about 16 MB: four segments and more
  auto servers = client->servers();
  REQUIRE(servers.ok());
  auto tablets = client->tablets(*table);
  REQUIRE(tablets.ok());
  REQUIRE(tablets->size() == 1);
  const uint64_t victim = (*tablets)[0].server_id;
  process_of(cluster, *servers, victim).kill9();
  auto first = wait_for_recovery(cluster.coordinator(), victim, 90, wire::kRecoveryDone);
  REQUIRE(first.has_value());
  REQUIRE(!first->partitions.empty());
  const uint64_t recovery_master = first->partitions[0].recovery_master_id;
  check_all(*client, *table, acked);

  process_of(cluster, *servers, recovery_master).kill9();
  REQUIRE(wait_for_recovery(cluster.coordinator(), recovery_master, 90, wire::kRecoveryDone)
              .has_value());
  check_all(*client, *table, acked);
  REQUIRE(client->write(*table, "after", "both recoveries").ok());
}

TEST_CASE("recovery: a backup killed during recovery does not lose the recovery",
          "[cluster][recovery]") {
  LocalCluster cluster(ClusterShape{.masters = 3,
                                    .backups = 4,
                                    .replicas = 3,
                                    .segment_bytes = "3M",
                                    .server_args = {"--recovery-pull-delay-ms", "300"}});
  auto client = cluster.client(60'000);
  auto table = client->create_table("backup-dies", 3);
  REQUIRE(table.ok());
  auto acked = fill(*client, *table, 900);
  // Masters are servers 0-2, backups 3-6.
  const uint64_t victim = server_id_of(cluster, *client, 0);
  cluster.server(0).kill9();
  REQUIRE(wait_for_recovery_master(cluster.coordinator(), victim) != 0);
  cluster.server(3).kill9();  // a backup, while recovery masters pull from it
  auto row = wait_for_recovery(cluster.coordinator(), victim, 90, wire::kRecoveryDone);
  REQUIRE(row.has_value());
  check_all(*client, *table, acked);
  REQUIRE(client->write(*table, "after", "recovery").ok());
}

TEST_CASE("recovery: a coordinator restarted during a recovery carries on, and after it",
          "[cluster][recovery]") {
  LocalCluster cluster(ClusterShape{.masters = 3,
                                    .backups = 4,
                                    .replicas = 3,
                                    .segment_bytes = "3M",
                                    .server_args = {"--recovery-pull-delay-ms", "300"}});
  auto client = cluster.client(60'000);
  auto table = client->create_table("restarts", 3);
  REQUIRE(table.ok());
  auto acked = fill(*client, *table, 900);
  const uint64_t victim = server_id_of(cluster, *client, 0);
  cluster.server(0).kill9();
  REQUIRE(wait_for_recovery_master(cluster.coordinator(), victim) != 0);
  // Mid-recovery: the coordinator goes down and comes back on the same state.
  REQUIRE(cluster.coordinator_process().stop() == 0);
  cluster.start_coordinator();
  auto row = wait_for_recovery(cluster.coordinator(), victim, 90, wire::kRecoveryDone);
  REQUIRE(row.has_value());
  check_all(*client, *table, acked);
  // After it: the moved tablets stay moved.
  REQUIRE(cluster.coordinator_process().stop() == 0);
  cluster.start_coordinator();
  auto tablets = client->tablets(*table);
  REQUIRE(tablets.ok());
  for (const auto& t : *tablets) CHECK(t.server_id != victim);
  check_all(*client, *table, acked);
  REQUIRE(client->write(*table, "after", "two restarts").ok());
}

}  // namespace ramkv

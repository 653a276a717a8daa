// Replication with real processes: masters keep R replicas on backups of other servers,
// acknowledge writes only once they are there, re-replicate after a backup dies, and a
// master the coordinator replaced (a zombie) gets its writes refused. The replicas are
// read back from the backups' files and parsed, as recovery will.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>

#include "backup/replica_file.h"
#include "common/log_entry.h"
#include "common/segment_iterator.h"
#include "test/cluster/cluster_fixture.h"

namespace ramkv {
using test::ClusterShape;
using test::free_port;
using test::LocalCluster;
namespace {

// key -> newest version, of the objects in one backup's replicas of `master_id` (0: of
// every master). Every replica must load and validate against its certificate.
std::map<std::string, uint64_t> objects_on_backup(const std::string& data_dir, uint64_t master_id) {
  std::map<std::string, uint64_t> out;
  std::error_code ec;
  if (!std::filesystem::exists(data_dir, ec)) return out;
  for (const auto& dir : std::filesystem::directory_iterator(data_dir)) {
    if (!dir.is_directory()) continue;
    if (master_id != 0 && dir.path().filename() != std::to_string(master_id)) continue;
    for (const auto& file : std::filesystem::directory_iterator(dir.path())) {
      auto loaded = backup::load_replica(file.path().string());
      INFO("replica " << file.path());
      REQUIRE(loaded.ok());
      std::span<const std::byte> bytes =
          loaded->data.span().subspan(0, loaded->header.certificate_bytes);
      SegmentIterator it(bytes, Certificate{loaded->header.certificate_bytes,
                                            loaded->header.certificate_checksum});
      REQUIRE(it.validate() == Status::kOk);
      for (; it.valid(); it.next()) {
        if (it.type() != EntryType::kObject) continue;
        auto object = decode_object(it.payload());
        REQUIRE(object.ok());
        uint64_t& v = out[std::string(object->key)];
        v = std::max(v, object->version);
      }
    }
  }
  return out;
}

// Waits (bounded) until every master holds no reply and has no replication write in
// flight, closes included, and every backup has written what it holds to disk (a buffered
// close is answered before its file is written): a test that reads the files meanwhile
// could find one just created and still empty.
void wait_until_replicated(Client& client, const std::vector<ServerInfo>& servers) {
  for (int i = 0; i < 200; ++i) {
    bool idle = true;
    for (const auto& s : servers) {
      auto stats = client.server_stats(s.locator);
      if (!stats.ok()) continue;
      auto has = [&](const char* line) { return stats->find(line) != std::string::npos; };
      if (s.master &&
          (!has("replication_replies_held 0\n") || !has("replication_writes_in_flight 0\n"))) {
        idle = false;
      }
      if (has("backup_flushes_queued") &&
          (!has("backup_flushes_queued 0\n") || !has("backup_flush_operations_in_flight 0\n"))) {
        idle = false;
      }
    }
    if (idle) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

// A write sent straight to one master, bypassing the client library.
Status raw_write(const std::string& locator, uint64_t table_id, std::string_view key,
                 std::string_view value) {
  std::vector<std::byte> body;
  wire::BodyWriter w(&body);
  w.put(wire::WriteRequest{.table_id = table_id,
                           .key_bytes = static_cast<uint32_t>(key.size()),
                           .value_bytes = static_cast<uint32_t>(value.size()),
                           .rules = {}});
  w.put_bytes(key);
  w.put_bytes(value);
  auto transport = make_client_transport({});
  return call(*transport, locator, {.opcode = wire::Opcode::kWrite, .timeout_ns = 3'000'000'000},
              body)
      .status;
}

// The replicas a backup holds (kBackupListReplicas).
std::vector<wire::ReplicaEntry> backup_replicas(const std::string& locator) {
  auto transport = make_client_transport({});
  auto r = call(*transport, locator, {.opcode = wire::Opcode::kBackupListReplicas}, {});
  REQUIRE(r.status == Status::kOk);
  wire::BodyReader in(r.body);
  wire::BackupListHeader header;
  REQUIRE(in.get(&header));
  std::vector<wire::ReplicaEntry> out(header.count);
  for (auto& e : out) REQUIRE(in.get(&e));
  REQUIRE(in.at_end());
  return out;
}

// What restarted backups reported to the coordinator (kGetBackupReplicas).
std::vector<wire::ReportedReplica> reported_replicas(const std::string& coordinator) {
  auto transport = make_client_transport({});
  auto r = call(*transport, coordinator, {.opcode = wire::Opcode::kGetBackupReplicas}, {});
  REQUIRE(r.status == Status::kOk);
  wire::BodyReader in(r.body);
  wire::BackupReplicasHeader header;
  REQUIRE(in.get(&header));
  std::vector<wire::ReportedReplica> out(header.count);
  for (auto& e : out) REQUIRE(in.get(&e));
  REQUIRE(in.at_end());
  return out;
}

// The server at index `n` of the cluster as the coordinator lists it now (by the backup's
// saved id: a restarted server re-enlists with a new generation of its index).
ServerInfo listed_server(LocalCluster& cluster, Client& client, size_t n) {
  // The restarted server saves its new id only after the coordinator listed it, and the
  // old id is gone from the list by then: look until the saved id is listed (bounded).
  uint64_t saved = 0;
  for (int i = 0; i < 300; ++i) {
    saved = cluster.backup_server_id(n);
    if (saved != 0) {
      auto servers = client.servers();
      REQUIRE(servers.ok());
      for (const auto& s : *servers) {
        if (s.server_id == saved) return s;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  FAIL("server " << n + 1 << " (id " << saved << ") is not listed");
  return {};
}

}  // namespace

TEST_CASE("replication: every acknowledged write is on R backups of other servers",
          "[cluster][replication]") {
  LocalCluster cluster(ClusterShape{.servers = 4, .replicas = 3, .durability = "disk"});
  auto client = cluster.client();
  auto table = client->create_table("replicated");
  REQUIRE(table.ok());
  std::map<std::string, uint64_t> acked;
  for (int i = 0; i < 200; ++i) {
    std::string key = "key-" + std::to_string(i);
    auto v = client->write(*table, key, "value-" + std::to_string(i));
    REQUIRE(v.ok());
    acked[key] = *v;
  }
  auto servers = client->servers();
  REQUIRE(servers.ok());
  // Disk durability: an acknowledged write is already in every replica's file.
  std::map<std::string, int> copies;
  for (size_t i = 0; i < cluster.server_count(); ++i) {
    for (const auto& [key, version] : objects_on_backup(cluster.backup_dir(i), 0)) {
      if (acked.contains(key) && version >= acked[key]) ++copies[key];
    }
  }
  for (const auto& [key, version] : acked) {
    INFO(key);
    CHECK(copies[key] == 3);
  }
  // Never on the master's own server: no backup holds a directory named by its own id.
  for (size_t i = 0; i < cluster.server_count(); ++i) {
    std::ifstream id_file(cluster.backup_dir(i) + "/server-id");
    uint64_t own_id = 0;
    id_file >> own_id;
    REQUIRE(own_id != 0);
    CHECK_FALSE(std::filesystem::exists(cluster.backup_dir(i) + "/" + std::to_string(own_id)));
  }
}

TEST_CASE("replication: a backup killed during writes loses nothing and is replaced",
          "[cluster][replication]") {
  LocalCluster cluster(
      ClusterShape{.masters = 1, .backups = 4, .replicas = 3, .durability = "disk"});
  auto client = cluster.client();
  auto table = client->create_table("survives");
  REQUIRE(table.ok());
  auto servers = client->servers();
  REQUIRE(servers.ok());
  uint64_t master_id = 0;
  for (const auto& s : *servers) {
    if (s.master) master_id = s.server_id;
  }
  REQUIRE(master_id != 0);

  std::map<std::string, uint64_t> acked;
  size_t killed = SIZE_MAX;
  for (int i = 0; i < 400; ++i) {
    if (i == 150) {
      // Kill a backup that holds a replica of this master.
      for (size_t b = 1; b < cluster.server_count() && killed == SIZE_MAX; ++b) {
        if (std::filesystem::exists(cluster.backup_dir(b) + "/" + std::to_string(master_id))) {
          killed = b;
        }
      }
      REQUIRE(killed != SIZE_MAX);
      cluster.server(killed).kill9();
    }
    std::string key = "key-" + std::to_string(i);
    auto v = client->write(*table, key, std::string(100, static_cast<char>('a' + i % 26)));
    INFO("write " << i << ": " << status_name(v.status()));
    REQUIRE(v.ok());
    acked[key] = *v;
  }
  wait_until_replicated(*client, *servers);
  // Every acknowledged write is readable, and on all three surviving backups: the
  // replicas the dead backup held were made again from the master's memory.
  for (const auto& [key, version] : acked) {
    auto r = client->read(*table, key);
    REQUIRE(r.ok());
    CHECK(r->version == version);
  }
  for (size_t b = 1; b < cluster.server_count(); ++b) {
    if (b == killed) continue;
    auto held = objects_on_backup(cluster.backup_dir(b), master_id);
    for (const auto& [key, version] : acked) {
      INFO("backup " << b + 1 << " key " << key);
      REQUIRE(held.contains(key));
      CHECK(held[key] >= version);
    }
  }
  // The open head lost a replica, so its epoch went up and the coordinator recorded it.
  auto transport = make_client_transport({});
  auto epochs =
      call(*transport, cluster.coordinator(), {.opcode = wire::Opcode::kGetReplicationEpochs}, {});
  REQUIRE(epochs.status == Status::kOk);
  wire::BodyReader in(epochs.body);
  wire::ReplicationEpochsHeader header;
  REQUIRE(in.get(&header));
  bool found = false;
  for (uint32_t i = 0; i < header.count; ++i) {
    wire::ReplicationEpochEntry e;
    REQUIRE(in.get(&e));
    if (e.master_id == master_id) {
      found = true;
      CHECK(e.epoch >= 2);
    }
  }
  CHECK(found);
}

TEST_CASE("replication: a zombie master's writes are refused by its backups",
          "[cluster][replication]") {
  LocalCluster cluster(ClusterShape{.masters = 1, .backups = 3, .replicas = 3});
  auto client = cluster.client();
  auto table = client->create_table("zombie");
  REQUIRE(table.ok());
  REQUIRE(client->write(*table, "before", "ok").ok());
  auto servers = client->servers();
  REQUIRE(servers.ok());
  ServerInfo master;
  for (const auto& s : *servers) {
    if (s.master) master = s;
  }
  // Another server enlists in the master's place (as a restarted one would): the
  // coordinator replaces the old id, and the backups fence it.
  std::string fake = "127.0.0.1:" + std::to_string(free_port());
  std::vector<std::byte> body;
  wire::BodyWriter w(&body);
  w.put(wire::EnlistServerRequest{.services = wire::kServiceMaster,
                                  .locator_bytes = static_cast<uint32_t>(fake.size()),
                                  .replaces_id = master.server_id});
  w.put_bytes(fake);
  auto transport = make_client_transport({});
  REQUIRE(call(*transport, cluster.coordinator(), {.opcode = wire::Opcode::kEnlistServer}, body)
              .status == Status::kOk);

  // The old master still runs and still thinks it owns the table; its backups refuse it.
  Status last = Status::kOk;
  for (int i = 0; i < 100 && last != Status::kFenced; ++i) {
    last = raw_write(master.locator, *table, "zombie-" + std::to_string(i), "value");
    if (last == Status::kOk) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  CHECK(last == Status::kFenced);
  // Once fenced it stays so, and every backup refuses the old id directly too.
  CHECK(raw_write(master.locator, *table, "after", "value") == Status::kFenced);
  for (const auto& s : *servers) {
    if (!s.backup) continue;
    std::vector<std::byte> b;
    wire::BodyWriter bw(&b);
    bw.put(wire::BackupWriteRequest{.master_id = master.server_id,
                                    .segment_id = 999,
                                    .epoch = 1,
                                    .offset = 0,
                                    .length = 0,
                                    .open = 1});
    CHECK(call(*transport, s.locator, {.opcode = wire::Opcode::kBackupWrite}, b).status ==
          Status::kFenced);
  }
}

TEST_CASE("replication: a restarted backup reports its replicas and frees what masters re-made",
          "[cluster][replication]") {
  // Small segments, so that the backup holds several closed replicas and an open one.
  LocalCluster cluster(ClusterShape{
      .masters = 1, .backups = 4, .replicas = 3, .durability = "disk", .segment_bytes = "4M"});
  auto client = cluster.client();
  auto table = client->create_table("restart");
  REQUIRE(table.ok());
  std::map<std::string, uint64_t> acked;
  auto write_some = [&](int from, int to) {
    for (int i = from; i < to; ++i) {
      std::string key = "key-" + std::to_string(i);
      auto v = client->write(*table, key, std::string(30000, static_cast<char>('a' + i % 26)));
      INFO("write " << i << ": " << status_name(v.status()));
      REQUIRE(v.ok());
      acked[key] = *v;
    }
  };
  write_some(0, 200);
  // A backup that holds replicas; what it holds before it stops.
  size_t victim = SIZE_MAX;
  std::set<std::pair<uint64_t, uint64_t>> held_before;
  for (size_t b = 1; b < cluster.server_count() && victim == SIZE_MAX; ++b) {
    auto replicas = backup_replicas(listed_server(cluster, *client, b).locator);
    if (replicas.size() < 2) continue;
    victim = b;
    for (const auto& r : replicas) held_before.insert({r.master_id, r.segment_id});
  }
  REQUIRE(victim != SIZE_MAX);
  const ServerInfo before = listed_server(cluster, *client, victim);
  REQUIRE(cluster.server(victim).stop() == 0);
  write_some(200, 300);  // the master re-makes the lost replicas on the other backups

  cluster.start_server(victim);
  ServerInfo after;
  for (int i = 0; i < 300; ++i) {
    after = listed_server(cluster, *client, victim);
    if (after.server_id != before.server_id && after.status == ServerStatus::kUp) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // Re-enlisted in its old place, with a new generation.
  REQUIRE(after.server_id != before.server_id);
  CHECK((after.server_id & 0xffffffffu) == (before.server_id & 0xffffffffu));

  // It told the coordinator what it found on disk: exactly what it held.
  std::set<std::pair<uint64_t, uint64_t>> reported;
  for (int i = 0; i < 100 && reported.empty(); ++i) {
    for (const auto& r : reported_replicas(cluster.coordinator())) {
      CHECK(r.backup_id == after.server_id);
      CHECK(r.replica.found_on_disk == 1);
      CHECK(r.replica.status == wire::kReplicaOk);
      reported.insert({r.replica.master_id, r.replica.segment_id});
    }
    if (reported.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK(reported == held_before);

  // The master holds every segment on three other replicas by now, so it tells the backup
  // to free them: none found on disk is left (bounded wait: the collector asks each second).
  size_t left = SIZE_MAX;
  for (int i = 0; i < 150 && left != 0; ++i) {
    left = 0;
    for (const auto& r : backup_replicas(after.locator)) left += r.found_on_disk;
    if (left != 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  CHECK(left == 0);
  write_some(300, 350);
  auto servers = client->servers();
  REQUIRE(servers.ok());
  wait_until_replicated(*client, *servers);
  for (const auto& [key, version] : acked) {
    auto r = client->read(*table, key);
    REQUIRE(r.ok());
    CHECK(r->version == version);
  }
  // Nothing acknowledged depended on the freed copies: three replicas of every object on
  // the backups' disks.
  std::map<std::string, int> copies;
  for (size_t b = 1; b < cluster.server_count(); ++b) {
    for (const auto& [key, version] : objects_on_backup(cluster.backup_dir(b), 0)) {
      if (acked.contains(key) && version >= acked[key]) ++copies[key];
    }
  }
  for (const auto& [key, version] : acked) {
    INFO(key);
    CHECK(copies[key] >= 3);
  }

  // A master that is gone (killed: declared crashed, or not yet) cannot say it has its
  // data elsewhere, and its recovery needs them: a backup restarted now keeps them.
  cluster.server(0).kill9();
  const size_t holder = victim == 1 ? 2 : 1;
  const ServerInfo holder_before = listed_server(cluster, *client, holder);
  size_t held = backup_replicas(holder_before.locator).size();
  REQUIRE(held > 0);
  REQUIRE(cluster.server(holder).stop() == 0);
  cluster.start_server(holder);
  ServerInfo holder_after;
  for (int i = 0; i < 300; ++i) {
    holder_after = listed_server(cluster, *client, holder);
    if (holder_after.server_id != holder_before.server_id) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  REQUIRE(holder_after.server_id != holder_before.server_id);
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));  // two collector rounds
  auto kept = backup_replicas(holder_after.locator);
  CHECK(kept.size() == held);
  for (const auto& r : kept) CHECK(r.found_on_disk == 1);
}

TEST_CASE("replication: buffered appends go one-sided over RDMA and as write RPCs over TCP",
          "[cluster][replication]") {
  // 4 MiB segments: ten megabytes of writes close two, whose replicas then travel
  // the whole way: opened by RPC, appended one-sided (over RDMA), closed by RPC, on disk.
  LocalCluster cluster(ClusterShape{
      .masters = 1, .backups = 3, .replicas = 3, .segment_bytes = "4M", .memory = "64M"});
  auto client = cluster.client();
  auto table = client->create_table("one-sided");
  REQUIRE(table.ok());
  std::map<std::string, uint64_t> acked;
  for (int i = 0; i < 10000; ++i) {
    std::string key = "key-" + std::to_string(i);
    auto v = client->write(*table, key, std::string(1000, static_cast<char>('a' + i % 26)));
    INFO("write " << i << ": " << status_name(v.status()));
    REQUIRE(v.ok());
    acked[key] = *v;
  }
  auto servers = client->servers();
  REQUIRE(servers.ok());
  wait_until_replicated(*client, *servers);
  auto stat = [&](const std::string& locator, const std::string& name) -> int64_t {
    auto stats = client->server_stats(locator);
    REQUIRE(stats.ok());
    auto at = stats->find(name + " ");
    REQUIRE(at != std::string::npos);
    return std::stoll(stats->substr(at + name.size() + 1));
  };
  uint64_t master_id = 0;
  int64_t remote_writes = 0;
  int64_t write_rpcs = 0;
  int64_t absorbed = 0;
  for (const auto& s : *servers) {
    if (s.master) {
      master_id = s.server_id;
      remote_writes = stat(s.locator, "replication_remote_writes");
      write_rpcs = stat(s.locator, "replication_write_rpcs");
    } else {
      absorbed += stat(s.locator, "backup_remote_appends");
    }
  }
  INFO("transport " << test::test_transport() << ": " << remote_writes << " one-sided appends, "
                    << write_rpcs << " write RPCs, " << absorbed << " slots absorbed");
  CHECK(write_rpcs > 0);  // opens and closes at least
  if (test::test_transport() == "rdma") {
    CHECK(remote_writes > write_rpcs);  // most appends
    CHECK(absorbed > 0);
  } else {
    CHECK(remote_writes == 0);
    CHECK(absorbed == 0);
  }
  // The closed replicas validate against their certificates on every backup
  // (objects_on_backup requires it), and hold most of the writes on all three.
  std::map<std::string, int> copies;
  for (size_t i = 1; i < cluster.server_count(); ++i) {
    for (const auto& [key, version] : objects_on_backup(cluster.backup_dir(i), master_id)) {
      if (acked.contains(key) && version == acked[key]) ++copies[key];
    }
  }
  size_t on_all = 0;
  for (const auto& [key, n] : copies) on_all += n == 3 ? 1 : 0;
  CHECK(on_all > acked.size() / 2);
  for (const auto& [key, version] : acked) {
    auto r = client->read(*table, key);
    REQUIRE(r.ok());
    CHECK(r->version == version);
  }
}

}  // namespace ramkv

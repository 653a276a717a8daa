// Backup failures with real processes: a backup whose disk fills up inside a running
// cluster (a small loop-mounted ext4 filesystem as its data dir), and a backup killed with
// kill -9 whose open replica then loses its tail, as a power cut would leave it. The
// backups are asked what they hold with `backup list replicas`, and a restarted one's
// report is read back from the coordinator (docs/rpc.md, Backup).
#include <sys/statvfs.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "backup/replica_file.h"
#include "backup/replica_scanner.h"
#include "test/backup/small_filesystem.h"
#include "test/cluster/cluster_fixture.h"

namespace ramkv {
using test::ClusterShape;
using test::LocalCluster;
using test::server_stat;
namespace {

using SteadyClock = std::chrono::steady_clock;

constexpr size_t kValueBytes = 1000;
constexpr size_t kBatch = 64;  // objects per multi write or multi read

std::string key_for(size_t i) { return "key-" + std::to_string(i); }

// 1000 bytes that differ from object to object, so a value read back under the wrong key
// or cut short is caught.
std::string value_for(size_t i) {
  std::string v = "value-" + std::to_string(i) + "|";
  v.resize(kValueBytes, static_cast<char>('a' + i % 26));
  return v;
}

// Writes objects [first, first + count) in batches and records each acknowledged one
// (index -> version) in *acked. Every write must succeed; stops early at `deadline`. A
// failure shows the replication stats of the master at `master`.
void write_objects(Client& client, uint64_t table, size_t first, size_t count,
                   SteadyClock::time_point deadline, std::map<size_t, uint64_t>* acked,
                   const std::string& master) {
  for (size_t start = first; start < first + count && SteadyClock::now() < deadline;
       start += kBatch) {
    std::vector<MultiWriteItem> items;
    for (size_t i = start; i < std::min(first + count, start + kBatch); ++i) {
      items.push_back({.table_id = table, .key = key_for(i), .value = value_for(i)});
    }
    auto results = client.multi_write(items);
    REQUIRE(results.size() == items.size());
    for (size_t j = 0; j < items.size(); ++j) {
      if (!results[j].ok()) {
        auto stats = client.server_stats(master);
        std::string replication;
        for (size_t at = stats.ok() ? stats->find("replication_") : std::string::npos;
             at != std::string::npos; at = stats->find("replication_", at + 1)) {
          replication += stats->substr(at, stats->find('\n', at) - at) + "; ";
        }
        UNSCOPED_INFO("master stats: " << replication);
      }
      INFO("write of " << items[j].key << ": " << status_name(results[j].status()));
      REQUIRE(results[j].ok());
      (*acked)[start + j] = *results[j];
    }
  }
}

// Every acknowledged object reads back with its value and version.
void check_reads(Client& client, uint64_t table, const std::map<size_t, uint64_t>& acked) {
  std::vector<std::pair<size_t, uint64_t>> all(acked.begin(), acked.end());
  for (size_t start = 0; start < all.size(); start += kBatch) {
    std::vector<MultiReadItem> items;
    for (size_t i = start; i < std::min(all.size(), start + kBatch); ++i) {
      items.push_back({.table_id = table, .key = key_for(all[i].first)});
    }
    auto results = client.multi_read(items);
    REQUIRE(results.size() == items.size());
    for (size_t j = 0; j < items.size(); ++j) {
      const auto& [index, version] = all[start + j];
      INFO("read of " << items[j].key << ": " << status_name(results[j].status()));
      REQUIRE(results[j].ok());
      CHECK(results[j]->version == version);
      CHECK(results[j]->value == value_for(index));
    }
  }
}

// What one backup holds (`backup list replicas`), every entry of every master.
std::vector<wire::ReplicaEntry> list_replicas(const std::string& locator) {
  auto transport = make_client_transport({});
  auto r = call(*transport, locator,
                {.opcode = wire::Opcode::kBackupListReplicas, .timeout_ns = 5'000'000'000}, {});
  INFO("list replicas at " << locator << ": " << status_name(r.status));
  REQUIRE(r.status == Status::kOk);
  wire::BodyReader in(r.body);
  wire::BackupListHeader header;
  REQUIRE(in.get(&header));
  std::vector<wire::ReplicaEntry> entries(header.count);
  for (auto& e : entries) REQUIRE(in.get(&e));
  REQUIRE(in.at_end());
  return entries;
}

std::vector<wire::ReplicaEntry> of_master(const std::vector<wire::ReplicaEntry>& entries,
                                          uint64_t master_id) {
  std::vector<wire::ReplicaEntry> out;
  for (const auto& e : entries) {
    if (e.master_id == master_id) out.push_back(e);
  }
  return out;
}

// The locator of the server with `id`, if the coordinator lists it up ("" if not).
std::string locator_of(Client& client, uint64_t id) {
  auto servers = client.servers();
  if (!servers.ok()) return "";
  for (const auto& s : *servers) {
    if (s.server_id == id && s.status == ServerStatus::kUp) return s.locator;
  }
  return "";
}

// The locator of backup `index` of `cluster` (waiting, bounded, for it to have saved the id
// it enlisted with: the coordinator may list it up a moment before).
std::string backup_locator(LocalCluster& cluster, Client& client, size_t index) {
  for (int i = 0; i < 250; ++i) {
    uint64_t id = cluster.backup_server_id(index);
    std::string locator = id != 0 ? locator_of(client, id) : "";
    if (!locator.empty()) return locator;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  FAIL("backup " << index << " is not up at the coordinator; logs in " << cluster.dir());
  return "";
}

uint64_t master_of(Client& client) {
  auto servers = client.servers();
  REQUIRE(servers.ok());
  uint64_t id = 0;
  for (const auto& s : *servers) {
    if (s.master) id = s.server_id;
  }
  REQUIRE(id != 0);
  return id;
}

// The replicas of one master's segments on a set of backups: segment id -> entries.
using SegmentReplicas = std::map<uint64_t, std::vector<wire::ReplicaEntry>>;

SegmentReplicas replicas_by_segment(const std::vector<std::string>& backups, uint64_t master_id) {
  SegmentReplicas out;
  for (const auto& locator : backups) {
    for (const auto& e : of_master(list_replicas(locator), master_id)) {
      out[e.segment_id].push_back(e);
    }
  }
  return out;
}

// The entries of a segment at its newest epoch: the copies the master counts. An older
// one is a replica it lost (its free is best effort and may still be on the way).
std::vector<wire::ReplicaEntry> current(const std::vector<wire::ReplicaEntry>& entries) {
  uint64_t newest = 0;
  for (const auto& e : entries) newest = std::max(newest, e.epoch);
  std::vector<wire::ReplicaEntry> out;
  for (const auto& e : entries) {
    if (e.epoch == newest) out.push_back(e);
  }
  return out;
}

// Whether every segment has exactly `r` current replicas, all ok, all closed or all open,
// and at most one segment (the head) is open.
bool settled(const SegmentReplicas& segments, size_t r) {
  int open = 0;
  for (const auto& [id, entries] : segments) {
    auto now = current(entries);
    if (now.size() != r) return false;
    for (const auto& e : now) {
      if (e.status != wire::kReplicaOk || e.closed != now.front().closed) return false;
    }
    open += now.front().closed == 0;
  }
  return open <= 1;
}

}  // namespace

TEST_CASE(
    "backup failure: a backup on a small filesystem fills up inside a running cluster "
    "without losing an acknowledged write",
    "[cluster][backup]") {
  constexpr uint64_t kSmallFilesystemBytes = 12 << 20;   // room for 3 replicas of 3 MiB
  constexpr uint32_t kSegmentBytes = 3 << 20;            // the least that fits the largest object
  constexpr size_t kObjects = (40 << 20) / kValueBytes;  // 14 segments, ~10 on each backup
  constexpr size_t kSmall = 4;  // server index of the backup on the small filesystem

  // Declared before the cluster: its processes are stopped before the unmount.
  std::string why;
  auto fs = test::SmallFilesystem::create(kSmallFilesystemBytes, &why);
  if (fs == nullptr) {
    WARN("SKIPPED: no small ext4 filesystem for a backup to fill: " << why);
    return;
  }
  // Server 0 is the master, 1 to 4 the backups.
  LocalCluster cluster(ClusterShape{.masters = 1,
                                    .backups = 4,
                                    .replicas = 3,
                                    .durability = "disk",
                                    .segment_bytes = "3M",
                                    .memory = "128M",
                                    .backup_dirs = {{kSmall, fs->path() + "/backup"}}});
  auto client = cluster.client(10'000);
  auto table = client->create_table("fills");
  REQUIRE(table.ok());
  const uint64_t master_id = master_of(*client);
  const std::string master = locator_of(*client, master_id);
  std::vector<std::string> backups;
  for (size_t b = 1; b <= 4; ++b) backups.push_back(backup_locator(cluster, *client, b));

  std::map<size_t, uint64_t> acked;
  const auto start = SteadyClock::now();
  write_objects(*client, *table, 0, kObjects, start + std::chrono::seconds(90), &acked, master);
  INFO(acked.size()
       << " objects written in "
       << std::chrono::duration_cast<std::chrono::milliseconds>(SteadyClock::now() - start).count()
       << " ms; logs in " << cluster.dir());
  REQUIRE(acked.size() == kObjects);

  // The small backup really filled: the master lost replicas there (kNoSpace) and placed
  // them elsewhere, and its filesystem has no room left for one more whole replica. A
  // replica that failed is freed, so up to about one segment may be free again.
  CHECK(server_stat(*client, master, "replication_replicas_lost") >= 1);
  struct statvfs vfs {};
  REQUIRE(::statvfs(fs->path().c_str(), &vfs) == 0);
  const uint64_t free_bytes = uint64_t{vfs.f_bfree} * vfs.f_frsize;
  INFO("small filesystem: " << free_bytes << " of " << uint64_t{vfs.f_blocks} * vfs.f_frsize
                            << " bytes free");
  CHECK(free_bytes < kSegmentBytes + backup::kReplicaHeaderBlock + (256 << 10));

  // Every acknowledged write reads back.
  check_reads(*client, *table, acked);

  // Every segment is on 3 backups: closed ones closed on all 3, the head open on all 3.
  // Closes and frees are sent after the writes they follow were acknowledged: wait
  // (bounded) until they have landed.
  SegmentReplicas segments;
  for (int i = 0; i < 100; ++i) {
    segments = replicas_by_segment(backups, master_id);
    if (settled(segments, 3)) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK(segments.size() >= kObjects * kValueBytes / kSegmentBytes);
  int open_segments = 0;
  for (const auto& [segment_id, entries] : segments) {
    auto now = current(entries);
    INFO("segment " << segment_id << ": " << entries.size() << " replicas, " << now.size()
                    << " at its newest epoch " << now.front().epoch);
    CHECK(now.size() == 3);
    for (const auto& e : now) {
      CHECK(e.status == wire::kReplicaOk);
      CHECK(e.closed == now.front().closed);
    }
    open_segments += now.front().closed == 0;
  }
  CHECK(open_segments == 1);
  // The full backup holds fewer of them than any other.
  std::vector<size_t> held;
  for (const auto& locator : backups)
    held.push_back(of_master(list_replicas(locator), master_id).size());
  INFO("replicas held by backups 1-4: " << held[0] << " " << held[1] << " " << held[2] << " "
                                        << held[3]);
  for (size_t b = 1; b <= 3; ++b) CHECK(held[kSmall - 1] < held[b - 1]);
  // The cluster goes first (its destructor), then the filesystem is unmounted.
}

TEST_CASE(
    "backup failure: a torn replica tail (a simulated power cut after kill -9) is "
    "detected on restart",
    "[cluster][backup]") {
  // About 5.5 segments of 3 MiB: the victim below holds several closed ones besides the
  // head, which the master re-replicates once the restart replaces the victim's old id.
  constexpr size_t kObjects = (33 << 20) / (2 * kValueBytes);
  // Server 0 is the master, 1 to 4 the backups. Four backups for three replicas, so that
  // the master can go on acknowledging writes while one of them is down.
  LocalCluster cluster(ClusterShape{
      .masters = 1, .backups = 4, .replicas = 3, .durability = "disk", .segment_bytes = "3M"});
  auto client = cluster.client(10'000);
  auto table = client->create_table("torn");
  REQUIRE(table.ok());
  const uint64_t master_id = master_of(*client);
  const std::string master = locator_of(*client, master_id);
  const auto deadline = SteadyClock::now() + std::chrono::seconds(60);
  std::map<size_t, uint64_t> acked;
  write_objects(*client, *table, 0, kObjects, deadline, &acked, master);
  REQUIRE(acked.size() == kObjects);

  // The victim: a backup with a replica of the master's open head (with certified bytes
  // to lose), and the most other replicas besides.
  std::map<size_t, std::vector<wire::ReplicaEntry>> held;  // backup index -> entries
  uint64_t head_id = 0;
  for (size_t b = 1; b <= 4; ++b) {
    held[b] = of_master(list_replicas(backup_locator(cluster, *client, b)), master_id);
    for (const auto& e : held[b]) {
      if (e.closed == 0 && e.certificate_bytes > 0) head_id = std::max(head_id, e.segment_id);
    }
  }
  size_t victim = 0;
  size_t victim_replicas = 0;
  for (const auto& [b, entries] : held) {
    for (const auto& e : entries) {
      if (e.segment_id == head_id && e.closed == 0 && entries.size() > victim_replicas) {
        victim = b;
        victim_replicas = entries.size();
      }
    }
  }
  REQUIRE(victim != 0);
  REQUIRE(victim_replicas >= 2);  // the head and at least one closed segment
  const uint64_t old_id = cluster.backup_server_id(victim);
  INFO("backup " << victim << " (id " << old_id << ") holds the open head " << head_id << " of "
                 << master_id << " and " << victim_replicas - 1 << " other replicas; logs in "
                 << cluster.dir());

  cluster.server(victim).kill9();
  // The master finds the replica gone at its next write and re-replicates the head to the
  // fourth backup: writes go on, and the head is on no replica of the dead backup (the
  // closed segments it held are lost to the master only once the restart replaces it).
  write_objects(*client, *table, kObjects, 200, deadline, &acked, master);
  REQUIRE(acked.size() == kObjects + 200);

  // Simulated: what a power cut would add to the kill -9. A disk-mode write reaches the
  // file as data blocks, then the header, then one fdatasync, and nothing orders them on
  // the device before it: the header certifying the newest bytes can land while their
  // last block does not. Cut that block (and any after it) from the victim's replica of
  // the head, so the file is shorter than its certificate says: torn, not corrupt.
  const std::string path = backup::replica_path(cluster.backup_dir(victim), master_id, head_id);
  auto before = backup::load_replica(path);
  REQUIRE(before.ok());
  const uint32_t certified = before->header.certificate_bytes;
  REQUIRE(certified > 0);
  const uint64_t cut_to = backup::kReplicaHeaderBlock + (certified - 1) / 4096 * 4096;
  REQUIRE(::truncate(path.c_str(), static_cast<off_t>(cut_to)) == 0);
  REQUIRE(backup::check_replica(path, master_id, head_id).status == Status::kFormatError);

  cluster.start_server(victim);
  // The coordinator does not notice a kill -9 by itself, so the old entry still counts
  // as up: wait for the new generation the restarted backup enlists with.
  std::string locator;
  uint64_t new_id = 0;
  for (int i = 0; i < 500 && locator.empty(); ++i) {
    new_id = cluster.backup_server_id(victim);
    if (new_id != 0 && new_id != old_id) locator = locator_of(*client, new_id);
    if (locator.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  INFO("restarted as " << new_id << " at " << locator);
  REQUIRE(!locator.empty());
  cluster.wait_for_servers(5);
  CHECK(static_cast<uint32_t>(new_id) == static_cast<uint32_t>(old_id));  // same index
  CHECK((new_id >> 32) > (old_id >> 32));                                 // newer generation

  // The restarted backup reports what its disk holds to the coordinator: the damaged
  // replica torn, the others ok. (Asked of the coordinator, not the backup: the backup
  // frees replicas the master has re-made elsewhere soon after its restart.)
  std::vector<wire::ReplicaEntry> entries;
  for (int i = 0; i < 250 && entries.empty(); ++i) {
    auto transport = make_client_transport({});
    auto r = call(*transport, cluster.coordinator(),
                  {.opcode = wire::Opcode::kGetBackupReplicas, .timeout_ns = 5'000'000'000}, {});
    REQUIRE(r.status == Status::kOk);
    wire::BodyReader in(r.body);
    wire::BackupReplicasHeader header;
    REQUIRE(in.get(&header));
    for (uint32_t k = 0; k < header.count; ++k) {
      wire::ReportedReplica e;
      REQUIRE(in.get(&e));
      if (e.backup_id == new_id && e.replica.master_id == master_id) entries.push_back(e.replica);
    }
    if (entries.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  bool found = false;
  for (const auto& e : entries) {
    INFO("segment " << e.segment_id << " status " << int{e.status} << " found on disk "
                    << int{e.found_on_disk} << " closed " << int{e.closed} << " epoch " << e.epoch
                    << " certificate " << e.certificate_bytes);
    CHECK(e.found_on_disk == 1);
    if (e.segment_id == head_id) {
      found = true;
      CHECK(e.status == wire::kReplicaTorn);
      // Its header survived the cut: what it claimed is still known.
      CHECK(e.epoch >= 1);
      CHECK(e.certificate_bytes > 0);
    } else {
      CHECK(e.status == wire::kReplicaOk);
    }
  }
  CHECK(found);

  // The master lost nothing: every object reads back, and writes go on.
  check_reads(*client, *table, acked);
  write_objects(*client, *table, kObjects + 200, 200, deadline, &acked, master);
  REQUIRE(acked.size() == kObjects + 400);
  check_reads(*client, *table, acked);
}

}  // namespace ramkv

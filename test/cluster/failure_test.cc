// Failure detection with real processes (docs/recovery.md, "Failure detection"): a server
// killed with kill -9 is declared crashed by the coordinator and every server is told,
// while the live ones stay up under load; a master stopped with SIGSTOP until it is
// declared crashed (a zombie, as a long pause or a partition would leave it) can get no
// write accepted once it resumes: it fences itself, and its backups refuse it.
#include <signal.h>
#include <sys/types.h>

#include <catch2/catch.hpp>

#include <chrono>
#include <string>
#include <vector>

#include "common/checksum.h"
#include "test/cluster/cluster_fixture.h"

namespace ramkv {
using test::ClusterShape;
using test::LocalCluster;
namespace {

using SteadyClock = std::chrono::steady_clock;

// Resumes a process stopped with SIGSTOP when it goes out of scope, so that the cluster's
// SIGTERM at the end reaches a running process (declare it after the cluster).
class ResumeOnExit {
 public:
  explicit ResumeOnExit(pid_t pid) : pid_(pid) {}
  ~ResumeOnExit() { ::kill(pid_, SIGCONT); }
  ResumeOnExit(const ResumeOnExit&) = delete;
  ResumeOnExit& operator=(const ResumeOnExit&) = delete;

 private:
  pid_t pid_;
};

// The id server `index` enlisted with (every server here runs a backup, which keeps it).
uint64_t server_id_of(LocalCluster& cluster, size_t index) {
  for (int i = 0; i < 300; ++i) {
    if (uint64_t id = cluster.backup_server_id(index); id != 0) return id;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  FAIL("server " << index + 1 << " never saved its id");
  return 0;
}

ServerInfo listed(Client& client, uint64_t id) {
  auto servers = client.servers();
  REQUIRE(servers.ok());
  for (const auto& s : *servers) {
    if (s.server_id == id) return s;
  }
  FAIL("server " << id << " is not listed");
  return {};
}

// Polls the coordinator until server `id` is listed with `status`, for up to `limit`. A
// crashed master is removed once its recovery is over, so kCrashed also accepts kRemoved.
bool wait_for_status(Client& client, uint64_t id, ServerStatus status, std::chrono::seconds limit) {
  auto reached = [&] {
    ServerStatus now = listed(client, id).status;
    return now == status || (status == ServerStatus::kCrashed && now == ServerStatus::kRemoved);
  };
  const auto deadline = SteadyClock::now() + limit;
  for (int i = 0; i < 10'000 && SteadyClock::now() < deadline; ++i) {
    if (reached()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return reached();
}

// Waits (bounded) until the master at `locator` counts `backups` usable backups: it has
// taken in the server list that announced the crash, and so has its backup service
// (both happen on the same message).
bool wait_for_backup_count(Client& client, const std::string& locator, int backups) {
  const std::string want = "replication_backups " + std::to_string(backups) + "\n";
  for (int i = 0; i < 200; ++i) {
    auto stats = client.server_stats(locator);
    if (stats.ok() && stats->find(want) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

CallResult raw_call(const std::string& locator, wire::Opcode opcode,
                    const std::vector<std::byte>& body) {
  auto transport = make_client_transport({});
  return call(*transport, locator, {.opcode = opcode, .timeout_ns = 3'000'000'000}, body);
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
  return raw_call(locator, wire::Opcode::kWrite, body).status;
}

Status raw_read(const std::string& locator, uint64_t table_id, std::string_view key) {
  std::vector<std::byte> body;
  wire::BodyWriter w(&body);
  w.put(wire::ReadRequest{
      .table_id = table_id, .key_bytes = static_cast<uint32_t>(key.size()), .rules = {}});
  w.put_bytes(key);
  return raw_call(locator, wire::Opcode::kRead, body).status;
}

// A key of `table` that master `master_id` owns.
std::string key_owned_by(Client& client, uint64_t table, uint64_t master_id) {
  auto tablets = client.tablets(table);
  REQUIRE(tablets.ok());
  for (int i = 0; i < 100'000; ++i) {
    std::string key = "key-" + std::to_string(i);
    const uint64_t h = key_hash(table, key);
    for (const auto& t : *tablets) {
      if (t.server_id == master_id && t.start_hash <= h && h <= t.end_hash) return key;
    }
  }
  FAIL("master " << master_id << " owns no tablet of table " << table);
  return {};
}

// Stops server `index` with SIGSTOP and waits until the coordinator lists it crashed.
void stop_until_declared(LocalCluster& cluster, Client& client, size_t index, uint64_t id) {
  REQUIRE(::kill(cluster.server(index).pid(), SIGSTOP) == 0);
  const auto start = SteadyClock::now();
  // The others' pings time out, then the coordinator's own attempts: a few seconds.
  REQUIRE(wait_for_status(client, id, ServerStatus::kCrashed, std::chrono::seconds(20)));
  INFO("declared after "
       << std::chrono::duration_cast<std::chrono::milliseconds>(SteadyClock::now() - start).count()
       << " ms");
  CHECK(SteadyClock::now() - start < std::chrono::seconds(10));
}

}  // namespace

TEST_CASE("failure detection: a killed server is declared crashed, and only it",
          "[cluster][failure]") {
  LocalCluster cluster(ClusterShape{.servers = 4, .replicas = 2});
  auto client = cluster.client();
  std::vector<uint64_t> ids;
  for (size_t i = 0; i < cluster.server_count(); ++i) ids.push_back(server_id_of(cluster, i));
  auto before = client->create_table("before");
  REQUIRE(before.ok());
  for (int i = 0; i < 50; ++i) REQUIRE(client->write(*before, "k" + std::to_string(i), "v").ok());

  const size_t victim = 2;
  const auto start = SteadyClock::now();
  cluster.server(victim).kill9();
  REQUIRE(wait_for_status(*client, ids[victim], ServerStatus::kCrashed, std::chrono::seconds(10)));
  const auto declared_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(SteadyClock::now() - start).count();
  UNSCOPED_INFO("declared crashed after " << declared_ms << " ms");

  // Every live server is told: each master counts the two other live backups.
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i == victim) continue;
    INFO("server " << i + 1);
    CHECK(wait_for_backup_count(*client, listed(*client, ids[i]).locator, 2));
  }
  // Some load for a few seconds, on a table the coordinator puts on the live masters only;
  // meanwhile every server keeps pinging. Nobody else is declared crashed.
  auto after = client->create_table("after");
  REQUIRE(after.ok());
  auto tablets = client->tablets(*after);
  REQUIRE(tablets.ok());
  for (const auto& t : *tablets) CHECK(t.server_id != ids[victim]);
  const auto load_end = SteadyClock::now() + std::chrono::seconds(4);
  int writes = 0;
  for (; writes < 100'000 && SteadyClock::now() < load_end; ++writes) {
    auto v = client->write(*after, "load-" + std::to_string(writes % 500), std::string(200, 'x'));
    INFO("write " << writes << ": " << status_name(v.status()));
    REQUIRE(v.ok());
  }
  UNSCOPED_INFO(writes << " writes under load");
  auto servers = client->servers();
  REQUIRE(servers.ok());
  REQUIRE(servers->size() == ids.size());
  for (const auto& s : *servers) {
    INFO("server " << s.server_id);
    if (s.server_id == ids[victim]) {
      // Crashed, or removed once its recovery is over.
      CHECK(s.status != ServerStatus::kUp);
    } else {
      CHECK(s.status == ServerStatus::kUp);
    }
  }
}

TEST_CASE(
    "failure detection: a master declared crashed while stopped gets no write accepted "
    "when it resumes",
    "[cluster][failure]") {
  LocalCluster cluster(ClusterShape{.servers = 4, .replicas = 3});
  auto client = cluster.client(1500);
  auto table = client->create_table("zombie");
  REQUIRE(table.ok());
  std::vector<uint64_t> ids;
  for (size_t i = 0; i < cluster.server_count(); ++i) ids.push_back(server_id_of(cluster, i));
  const size_t victim = 1;
  const ServerInfo zombie = listed(*client, ids[victim]);
  const std::string key = key_owned_by(*client, *table, zombie.server_id);
  REQUIRE(client->write(*table, key, "before").ok());

  ResumeOnExit resume(cluster.server(victim).pid());
  stop_until_declared(cluster, *client, victim, zombie.server_id);
  // Every backup has taken in the list that declares it (each live master now counts the
  // two other live backups) before the zombie runs again.
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i == victim) continue;
    REQUIRE(wait_for_backup_count(*client, listed(*client, ids[i]).locator, 2));
  }
  REQUIRE(::kill(cluster.server(victim).pid(), SIGCONT) == 0);

  // Straight to the zombie, on a key it owned: never acknowledged, and fenced at the
  // latest once it has heard (bounded retries; a timeout while it wakes is allowed).
  Status last = Status::kOk;
  for (int i = 0; i < 40 && last != Status::kFenced; ++i) {
    last = raw_write(zombie.locator, *table, key, "zombie-" + std::to_string(i));
    INFO("attempt " << i << ": " << status_name(last));
    REQUIRE(last != Status::kOk);
    if (last != Status::kFenced) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  CHECK(last == Status::kFenced);
  CHECK(raw_write(zombie.locator, *table, key, "again") == Status::kFenced);
  CHECK(raw_read(zombie.locator, *table, key) == Status::kFenced);
  CHECK(raw_call(zombie.locator, wire::Opcode::kEcho, {}).status == Status::kOk);  // alive
  // Every live backup refuses the zombie's id directly too.
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i == victim) continue;
    std::vector<std::byte> b;
    wire::BodyWriter(&b).put(wire::BackupWriteRequest{.master_id = zombie.server_id,
                                                      .segment_id = 999,
                                                      .epoch = 1,
                                                      .offset = 0,
                                                      .length = 0,
                                                      .open = 1});
    INFO("backup " << i + 1);
    CHECK(raw_call(listed(*client, ids[i]).locator, wire::Opcode::kBackupWrite, b).status ==
          Status::kFenced);
  }
  // The client never surfaces kFenced: its key was recovered onto another master, which
  // takes the write, with the value written before the crash still there.
  auto before = client->read(*table, key);
  REQUIRE(before.ok());
  CHECK(before->value == "before");
  auto w = client->write(*table, key, "through the client");
  CHECK(w.ok());
  auto owner = client->tablets(*table);
  REQUIRE(owner.ok());
  for (const auto& t : *owner) CHECK(t.server_id != zombie.server_id);
  // Nobody else was declared crashed.
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i != victim) CHECK(listed(*client, ids[i]).status == ServerStatus::kUp);
  }
}

TEST_CASE(
    "failure detection: a master without replication fences itself when it resumes "
    "declared crashed",
    "[cluster][failure]") {
  LocalCluster cluster(ClusterShape{.servers = 3, .replicas = 0});
  auto client = cluster.client(1500);
  auto table = client->create_table("alone");
  REQUIRE(table.ok());
  const size_t victim = 0;
  const ServerInfo zombie = listed(*client, server_id_of(cluster, victim));
  const std::string key = key_owned_by(*client, *table, zombie.server_id);
  REQUIRE(client->write(*table, key, "before").ok());

  ResumeOnExit resume(cluster.server(victim).pid());
  stop_until_declared(cluster, *client, victim, zombie.server_id);
  REQUIRE(::kill(cluster.server(victim).pid(), SIGCONT) == 0);
  const auto resumed = SteadyClock::now();
  // No backup stands between it and a client: it must learn it was declared crashed
  // itself (the coordinator's update, or its own check after its detector saw it had not
  // run for a while), within a few seconds.
  Status last = Status::kOk;
  for (int i = 0; i < 100 && last != Status::kFenced; ++i) {
    last = raw_write(zombie.locator, *table, key, "zombie-" + std::to_string(i));
    if (last != Status::kFenced) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  REQUIRE(last == Status::kFenced);
  CHECK(SteadyClock::now() - resumed < std::chrono::seconds(10));
  CHECK(raw_read(zombie.locator, *table, key) == Status::kFenced);
  CHECK(raw_call(zombie.locator, wire::Opcode::kEcho, {}).status == Status::kOk);
  auto w = client->write(*table, key, "through the client");
  CHECK_FALSE(w.ok());
  CHECK(w.status() != Status::kFenced);
}

}  // namespace ramkv

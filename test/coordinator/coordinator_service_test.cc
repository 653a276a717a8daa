#include "coordinator/coordinator_service.h"

#include <unistd.h>

#include <array>
#include <atomic>
#include <catch2/catch.hpp>
#include <filesystem>
#include <mutex>
#include <thread>

#include "common/checksum.h"
#include "test/temp_dir.h"

using namespace ramkv;
using namespace ramkv::coordinator;

namespace {

using ramkv::test::TempDir;

// A coordinator on 127.0.0.1:0, serving on its own thread, over a FileStore in `dir`.
// `verify_timeout_ns`: each of its 3 pings to a server hinted to have crashed.
struct RunningCoordinator {
  explicit RunningCoordinator(const std::string& dir, uint64_t verify_timeout_ns = 500'000'000) {
    auto store = FileStore::open(dir);
    REQUIRE(store.ok());
    auto created = CoordinatorService::create({.listen_locator = "127.0.0.1:0",
                                               .master_rpc_timeout_ns = 1'000'000'000,
                                               .verify_timeout_ns = verify_timeout_ns,
                                               .verify_attempts = 3},
                                              std::move(*store));
    REQUIRE(created.ok());
    service = std::move(*created);
    thread = std::thread([this] { service->run(); });
  }
  ~RunningCoordinator() {
    service->stop();
    thread.join();
  }
  std::unique_ptr<CoordinatorService> service;
  std::thread thread;
};

// A stand-in master: records the take/drop tablets orders and server lists it gets, and
// counts the pings (echo) it answers.
struct FakeMaster {
  FakeMaster() : transport(make_tcp_server_transport({})) {
    REQUIRE(transport->listen("127.0.0.1:0") == Status::kOk);
    thread = std::thread([this] {
      transport->run([this](const wire::MessageHeader& h, std::span<const std::byte> body, Reply&) {
        record(h, body);
      });
    });
  }
  ~FakeMaster() {
    transport->stop();
    thread.join();
  }
  void record(const wire::MessageHeader& h, std::span<const std::byte> body) {
    if (h.opcode == static_cast<uint16_t>(wire::Opcode::kEcho)) {
      ++echoes;
      return;
    }
    if (h.opcode == static_cast<uint16_t>(wire::Opcode::kServerListUpdate)) {
      uint64_t version = 0;
      std::vector<wire::ServerListItem> servers;
      REQUIRE(wire::decode_server_list(body, &version, &servers) == Status::kOk);
      std::lock_guard lock(mutex);
      server_list_updates.push_back(static_cast<uint32_t>(servers.size()));
      server_lists.push_back(std::move(servers));
      return;
    }
    wire::BodyReader in(body);
    wire::TabletListHeader list;
    REQUIRE(in.get(&list));
    std::lock_guard lock(mutex);
    for (uint32_t i = 0; i < list.count; ++i) {
      wire::TabletWire t;
      REQUIRE(in.get(&t));
      (h.opcode == static_cast<uint16_t>(wire::Opcode::kTakeTablets) ? taken : dropped)
          .push_back(t);
    }
  }
  size_t taken_count() {
    std::lock_guard lock(mutex);
    return taken.size();
  }
  size_t dropped_count() {
    std::lock_guard lock(mutex);
    return dropped.size();
  }
  std::unique_ptr<ServerTransport> transport;
  std::mutex mutex;
  std::vector<wire::TabletWire> taken;
  std::vector<uint32_t> server_list_updates;  // the size of each list received
  // Each list received, whole.
  std::vector<std::vector<wire::ServerListItem>> server_lists;
  std::atomic<int> echoes{0};
  std::vector<wire::TabletWire> dropped;
  std::thread thread;
};

struct Client {
  explicit Client(std::string coordinator) : locator(std::move(coordinator)) {}
  CallResult call(wire::Opcode op, const std::vector<std::byte>& body) {
    return ramkv::call(*transport, locator, {.opcode = op, .timeout_ns = 5'000'000'000}, body);
  }
  Result<uint64_t> enlist(const std::string& server_locator, uint32_t services,
                          uint64_t replaces_id = 0) {
    std::vector<std::byte> body;
    wire::BodyWriter w(&body);
    w.put(wire::EnlistServerRequest{.services = services,
                                    .locator_bytes = static_cast<uint32_t>(server_locator.size()),
                                    .replaces_id = replaces_id});
    w.put_bytes(server_locator);
    return id_of(call(wire::Opcode::kEnlistServer, body));
  }
  Result<uint64_t> create_table(std::string_view name, uint32_t tablet_count = 0) {
    std::vector<std::byte> body;
    wire::BodyWriter w(&body);
    w.put(wire::CreateTableRequest{.name_bytes = static_cast<uint32_t>(name.size()),
                                   .tablet_count = tablet_count});
    w.put_bytes(name);
    return id_of(call(wire::Opcode::kCreateTable, body));
  }
  CallResult by_name(wire::Opcode op, std::string_view name) {
    std::vector<std::byte> body;
    wire::BodyWriter w(&body);
    w.put(wire::TableNameRequest{.name_bytes = static_cast<uint32_t>(name.size())});
    w.put_bytes(name);
    return call(op, body);
  }
  Result<uint64_t> table_id(std::string_view name) {
    return id_of(by_name(wire::Opcode::kGetTableId, name));
  }
  static Result<uint64_t> id_of(const CallResult& r) {
    if (r.status != Status::kOk) return r.status;
    wire::BodyReader in(r.body);
    uint64_t id = 0;
    if (!in.get(&id) || !in.at_end()) return Status::kFormatError;
    return id;
  }

  struct TabletMap {
    std::vector<wire::TabletWire> tablets;
    std::vector<std::pair<wire::ServerEntry, std::string>> servers;
  };
  Result<TabletMap> tablet_map(uint64_t table_id) {
    std::vector<std::byte> body;
    wire::BodyWriter(&body).put(wire::TabletMapRequest{.table_id = table_id});
    auto r = call(wire::Opcode::kGetTabletMap, body);
    if (r.status != Status::kOk) return r.status;
    wire::BodyReader in(r.body);
    wire::TabletMapHeader h;
    TabletMap map;
    REQUIRE(in.get(&h));
    map.tablets.resize(h.count);
    for (auto& t : map.tablets) REQUIRE(in.get(&t));
    for (uint32_t i = 0; i < h.server_count; ++i) {
      wire::ServerEntry e;
      std::string_view loc;
      REQUIRE(in.get(&e));
      REQUIRE(in.get_string(e.locator_bytes, &loc));
      map.servers.emplace_back(e, std::string(loc));
    }
    REQUIRE(in.at_end());
    return map;
  }

  Status set_epoch(uint64_t master_id, uint64_t segment_id, uint64_t epoch) {
    std::vector<std::byte> body;
    wire::BodyWriter(&body).put(wire::ReplicationEpochEntry{
        .master_id = master_id, .segment_id = segment_id, .epoch = epoch});
    auto r = call(wire::Opcode::kSetReplicationEpoch, body);
    CHECK(r.body.empty());
    return r.status;
  }
  Result<std::vector<wire::ReplicationEpochEntry>> epochs() {
    auto r = call(wire::Opcode::kGetReplicationEpochs, {});
    if (r.status != Status::kOk) return r.status;
    wire::BodyReader in(r.body);
    wire::ReplicationEpochsHeader h;
    REQUIRE(in.get(&h));
    std::vector<wire::ReplicationEpochEntry> entries(h.count);
    for (auto& e : entries) REQUIRE(in.get(&e));
    REQUIRE(in.at_end());
    return entries;
  }

  std::string locator;
  std::unique_ptr<ClientTransport> transport = make_tcp_client_transport({});
};

// (master, segment, epoch) triples, for comparing with CHECK.
std::vector<std::array<uint64_t, 3>> triples(const std::vector<wire::ReplicationEpochEntry>& es) {
  std::vector<std::array<uint64_t, 3>> out;
  for (const auto& e : es) out.push_back({e.master_id, e.segment_id, e.epoch});
  return out;
}

std::vector<std::byte> raw(std::string_view s) {
  auto b = as_bytes(s);
  return {b.begin(), b.end()};
}

}  // namespace

TEST_CASE("coordinator: enlisting servers gives ids from index 1, generation 1",
          "[coordinator][service]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  Client client(c.service->locator());
  CHECK(*client.enlist("127.0.0.1:3001", wire::kServiceMaster) == make_server_id(1, 1));
  CHECK(*client.enlist("127.0.0.1:3002", wire::kServiceBackup) == make_server_id(2, 1));
  CHECK(*client.enlist("127.0.0.1:3001", wire::kServiceMaster) == make_server_id(1, 2));

  auto r = client.call(wire::Opcode::kGetServerList, {});
  REQUIRE(r.status == Status::kOk);
  wire::BodyReader in(r.body);
  wire::ServerListHeader h;
  REQUIRE(in.get(&h));
  CHECK(h.count == 2);
  CHECK(h.version == 3);
  wire::ServerEntry e;
  std::string_view loc;
  REQUIRE(in.get(&e));
  REQUIRE(in.get_string(e.locator_bytes, &loc));
  CHECK(e.server_id == make_server_id(1, 2));
  CHECK(loc == "127.0.0.1:3001");
}

TEST_CASE("coordinator: creating a table with no master up asks to retry",
          "[coordinator][service]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  Client client(c.service->locator());
  CHECK(client.create_table("t").status() == Status::kRetry);
  REQUIRE(client.enlist("127.0.0.1:3002", wire::kServiceBackup).ok());
  CHECK(client.create_table("t").status() == Status::kRetry);
}

TEST_CASE("coordinator: creating an existing table returns its id", "[coordinator][service]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  FakeMaster m1, m2;
  Client client(c.service->locator());
  REQUIRE(client.enlist(m1.transport->locator(), wire::kServiceMaster).ok());
  REQUIRE(client.enlist(m2.transport->locator(), wire::kServiceMaster).ok());
  auto id = client.create_table("users");
  REQUIRE(id.ok());
  CHECK(*id == 1);
  CHECK(*client.create_table("users") == *id);
  CHECK(*client.create_table("orders", 8) == 2);
  CHECK(*client.table_id("users") == 1);
  // create table answers after the masters acknowledged their tablets.
  CHECK(m1.taken_count() + m2.taken_count() == 2 + 8);
  CHECK(m1.taken_count() == 1 + 4);
}

TEST_CASE("coordinator: the tablet map covers the whole hash space exactly once",
          "[coordinator][service]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  FakeMaster m1, m2, m3;
  Client client(c.service->locator());
  for (auto* m : {&m1, &m2, &m3}) {
    REQUIRE(client.enlist(m->transport->locator(), wire::kServiceMaster).ok());
  }
  uint64_t id = *client.create_table("t", 7);
  REQUIRE(client.create_table("other").ok());
  auto map = client.tablet_map(id);
  REQUIRE(map.ok());
  REQUIRE(map->tablets.size() == 7);
  CHECK(map->tablets.front().start_hash == 0);
  CHECK(map->tablets.back().end_hash == UINT64_MAX);
  for (size_t i = 1; i < map->tablets.size(); ++i) {
    CHECK(map->tablets[i].start_hash == map->tablets[i - 1].end_hash + 1);
  }
  REQUIRE(map->servers.size() == 3);
  for (const auto& [entry, loc] : map->servers) {
    CHECK(entry.status == 0);
    CHECK(!loc.empty());
  }
  auto all = client.tablet_map(0);
  REQUIRE(all.ok());
  CHECK(all->tablets.size() == 7 + 3);
  CHECK(client.tablet_map(99).status() == Status::kUnknownTable);
}

TEST_CASE("coordinator: dropping a table forgets it and tells its masters",
          "[coordinator][service]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  FakeMaster m;
  Client client(c.service->locator());
  REQUIRE(client.enlist(m.transport->locator(), wire::kServiceMaster).ok());
  uint64_t id = *client.create_table("t", 4);
  CHECK(client.by_name(wire::Opcode::kDropTable, "t").status == Status::kOk);
  CHECK(m.dropped_count() == 4);
  CHECK(client.table_id("t").status() == Status::kUnknownTable);
  CHECK(client.tablet_map(id).status() == Status::kUnknownTable);
  CHECK(client.by_name(wire::Opcode::kDropTable, "t").status == Status::kUnknownTable);
  CHECK(*client.create_table("t") == id + 1);  // ids are never reused
}

TEST_CASE("coordinator: unknown tables are reported as such", "[coordinator][service]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  Client client(c.service->locator());
  CHECK(client.table_id("nope").status() == Status::kUnknownTable);
  CHECK(client.by_name(wire::Opcode::kDropTable, "nope").status == Status::kUnknownTable);
  CHECK(client.tablet_map(1).status() == Status::kUnknownTable);
}

TEST_CASE("coordinator: malformed bodies get bad request and the server keeps answering",
          "[coordinator][service]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  Client client(c.service->locator());
  using wire::Opcode;
  // Short fixed parts.
  for (Opcode op : {Opcode::kEnlistServer, Opcode::kCreateTable, Opcode::kDropTable,
                    Opcode::kGetTableId, Opcode::kGetTabletMap, Opcode::kSetReplicationEpoch}) {
    CHECK(client.call(op, raw("ab")).status == Status::kBadRequest);
  }
  // Lying lengths, trailing bytes, empty and oversized names, bad locators.
  std::vector<std::byte> body;
  wire::BodyWriter w(&body);
  w.put(wire::TableNameRequest{.name_bytes = 1000});
  w.put_bytes("short");
  CHECK(client.call(Opcode::kGetTableId, body).status == Status::kBadRequest);
  CHECK(client.by_name(Opcode::kGetTableId, "").status == Status::kBadRequest);
  CHECK(client.create_table(std::string(1025, 'x')).status() == Status::kBadRequest);
  CHECK(client.create_table("t", CoordinatorState::kMaxTabletsPerTable + 1).status() ==
        Status::kBadRequest);
  CHECK(client.call(Opcode::kGetServerList, raw("x")).status == Status::kBadRequest);
  CHECK(client.call(Opcode::kGetTabletMap, raw("123456789")).status == Status::kBadRequest);
  CHECK(client.enlist("no-port", wire::kServiceMaster).status() == Status::kBadRequest);
  CHECK(client.enlist("127.0.0.1:1", 0).status() == Status::kBadRequest);
  CHECK(client.enlist("127.0.0.1:1", 4).status() == Status::kBadRequest);
  CHECK(client.call(Opcode::kRead, raw("x")).status == Status::kBadRequest);
  // Still serving, and nothing changed.
  CHECK(client.call(Opcode::kEcho, raw("hello")).body == raw("hello"));
  CHECK(c.service->state().servers().empty());
  CHECK(c.service->state().table_count() == 0);
}

TEST_CASE("coordinator: a restarted coordinator keeps its tables and servers",
          "[coordinator][service]") {
  TempDir dir;
  FakeMaster m;
  uint64_t id = 0;
  {
    RunningCoordinator c(dir.path);
    Client client(c.service->locator());
    REQUIRE(*client.enlist(m.transport->locator(), wire::kServiceMaster) == make_server_id(1, 1));
    id = *client.create_table("kept", 3);
    REQUIRE(client.create_table("dropped").ok());
    REQUIRE(client.by_name(wire::Opcode::kDropTable, "dropped").status == Status::kOk);
  }
  REQUIRE(m.taken_count() == 3 + 1);
  RunningCoordinator c(dir.path);
  // On start the coordinator re-sends take tablets to the owners.
  REQUIRE(c.service->notifier().wait_idle(5'000'000'000));
  CHECK(m.taken_count() == 3 + 1 + 3);
  Client client(c.service->locator());
  CHECK(*client.table_id("kept") == id);
  CHECK(client.table_id("dropped").status() == Status::kUnknownTable);
  auto map = client.tablet_map(id);
  REQUIRE(map.ok());
  CHECK(map->tablets.size() == 3);
  CHECK(*client.create_table("new") == id + 2);
  CHECK(*client.enlist("127.0.0.1:3999", wire::kServiceBackup) == make_server_id(2, 1));
}

TEST_CASE("coordinator: a corrupt state file stops the coordinator from starting",
          "[coordinator][service]") {
  TempDir dir;
  {
    auto store = FileStore::open(dir.path);
    REQUIRE(store.ok());
    REQUIRE((*store)->put(raw("not a state")) == Status::kOk);
  }
  auto store = FileStore::open(dir.path);
  REQUIRE(store.ok());
  auto created = CoordinatorService::create({.listen_locator = "127.0.0.1:0"}, std::move(*store));
  CHECK(created.status() == Status::kFormatError);
}

TEST_CASE("coordinator: a master that is down does not block table creation",
          "[coordinator][service]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  Client client(c.service->locator());
  std::string dead_locator;
  {
    FakeMaster m;
    dead_locator = m.transport->locator();
  }
  REQUIRE(client.enlist(dead_locator, wire::kServiceMaster).ok());
  CHECK(client.create_table("t").ok());  // the failed send is logged only
  CHECK(client.call(wire::Opcode::kEcho, raw("still here")).status == Status::kOk);
}

TEST_CASE("coordinator: replication epochs are recorded per master and only move forward",
          "[coordinator][service]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  Client client(c.service->locator());
  // Locators nobody listens on: the server list updates fail quietly.
  uint64_t m1 = *client.enlist("127.0.0.1:3001", wire::kServiceMaster | wire::kServiceBackup);
  uint64_t m2 = *client.enlist("127.0.0.1:3002", wire::kServiceMaster);
  REQUIRE(client.epochs().ok());
  CHECK(client.epochs()->empty());
  CHECK(client.set_epoch(m2, 4, 1) == Status::kOk);
  CHECK(client.set_epoch(m1, 7, 2) == Status::kOk);
  CHECK(client.set_epoch(m1, 7, 3) == Status::kOk);
  CHECK(client.set_epoch(m1, 7, 3) == Status::kOk);  // resent: accepted, nothing changes
  CHECK(client.set_epoch(m1, 6, 9) == Status::kOk);  // older segment: accepted, ignored
  CHECK(client.set_epoch(m2, 5, 0) == Status::kOk);  // newer segment replaces
  using T = std::vector<std::array<uint64_t, 3>>;
  CHECK(triples(*client.epochs()) == T{{m1, 7, 3}, {m2, 5, 0}});  // by master id
  CHECK(c.service->state().replication_epoch(m1) == ReplicationEpoch{.segment_id = 7, .epoch = 3});
}

TEST_CASE("coordinator: replication epochs survive a coordinator restart",
          "[coordinator][service]") {
  TempDir dir;
  uint64_t m = 0;
  {
    RunningCoordinator c(dir.path);
    Client client(c.service->locator());
    m = *client.enlist("127.0.0.1:3001", wire::kServiceMaster);
    REQUIRE(client.set_epoch(m, 12, 5) == Status::kOk);
  }
  RunningCoordinator c(dir.path);
  Client client(c.service->locator());
  using T = std::vector<std::array<uint64_t, 3>>;
  CHECK(triples(*client.epochs()) == T{{m, 12, 5}});
  CHECK(client.set_epoch(m, 12, 4) == Status::kOk);
  CHECK(triples(*client.epochs()) == T{{m, 12, 5}});
}

TEST_CASE("coordinator: a replaced master setting a replication epoch is fenced",
          "[coordinator][service]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  Client client(c.service->locator());
  uint64_t old_id = *client.enlist("127.0.0.1:3001", wire::kServiceMaster);
  REQUIRE(client.set_epoch(old_id, 3, 1) == Status::kOk);
  uint64_t new_id = *client.enlist("127.0.0.1:3001", wire::kServiceMaster);  // restarted
  REQUIRE(new_id != old_id);
  // The zombie learns it is one, and its call changes nothing.
  CHECK(client.set_epoch(old_id, 3, 2) == Status::kFenced);
  CHECK(client.set_epoch(old_id, 4, 0) == Status::kFenced);
  CHECK(client.set_epoch(new_id, 1, 1) == Status::kOk);
  using T = std::vector<std::array<uint64_t, 3>>;
  // The replaced master's epoch stays: its recovery needs it.
  CHECK(triples(*client.epochs()) == T{{old_id, 3, 1}, {new_id, 1, 1}});
}

TEST_CASE("coordinator: set replication epoch rejects malformed bodies and non-masters",
          "[coordinator][service]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  Client client(c.service->locator());
  uint64_t master = *client.enlist("127.0.0.1:3001", wire::kServiceMaster);
  uint64_t backup = *client.enlist("127.0.0.1:3002", wire::kServiceBackup);
  using wire::Opcode;
  std::vector<std::byte> body;
  wire::BodyWriter(&body).put(
      wire::ReplicationEpochEntry{.master_id = master, .segment_id = 1, .epoch = 1});
  // Built from a range, not by pop_back(): GCC 12 -O2 warns falsely on that (array-bounds).
  std::vector<std::byte> shorter(body.begin(), body.end() - 1);
  auto longer = body;
  longer.push_back(std::byte{0});
  CHECK(client.call(Opcode::kSetReplicationEpoch, {}).status == Status::kBadRequest);
  CHECK(client.call(Opcode::kSetReplicationEpoch, shorter).status == Status::kBadRequest);
  CHECK(client.call(Opcode::kSetReplicationEpoch, longer).status == Status::kBadRequest);
  CHECK(client.call(Opcode::kGetReplicationEpochs, raw("x")).status == Status::kBadRequest);
  // Ids never given out, and a server that is not a master.
  CHECK(client.set_epoch(0, 1, 1) == Status::kBadRequest);
  CHECK(client.set_epoch(make_server_id(9, 1), 1, 1) == Status::kBadRequest);
  CHECK(client.set_epoch(make_server_id(1, 2), 1, 1) == Status::kBadRequest);
  CHECK(client.set_epoch(backup, 1, 1) == Status::kBadRequest);
  CHECK(client.epochs()->empty());
  CHECK(c.service->state().replication_epochs().empty());
  // The well-formed body is accepted.
  CHECK(client.call(Opcode::kSetReplicationEpoch, body).status == Status::kOk);
  CHECK(client.epochs()->size() == 1);
}

TEST_CASE("coordinator: a restarted backup's report of its replicas is kept and listed",
          "[coordinator][service]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  Client client(c.service->locator());
  uint64_t master = *client.enlist("127.0.0.1:3001", wire::kServiceMaster);
  uint64_t backup = *client.enlist("127.0.0.1:3002", wire::kServiceBackup);
  auto report = [&](uint64_t backup_id, std::vector<wire::ReplicaEntry> entries) {
    std::vector<std::byte> body;
    wire::BodyWriter w(&body);
    w.put(wire::BackupReportHeader{.backup_id = backup_id,
                                   .count = static_cast<uint32_t>(entries.size())});
    for (const auto& e : entries) w.put(e);
    return client.call(wire::Opcode::kReportBackupReplicas, body).status;
  };
  auto listed = [&] {
    auto r = client.call(wire::Opcode::kGetBackupReplicas, {});
    REQUIRE(r.status == Status::kOk);
    wire::BodyReader in(r.body);
    wire::BackupReplicasHeader h;
    REQUIRE(in.get(&h));
    std::vector<wire::ReportedReplica> out(h.count);
    for (auto& e : out) REQUIRE(in.get(&e));
    REQUIRE(in.at_end());
    return out;
  };
  const wire::ReplicaEntry a{.master_id = master, .segment_id = 7, .epoch = 2, .closed = 1};
  const wire::ReplicaEntry b{
      .master_id = master, .segment_id = 8, .epoch = 1, .status = wire::kReplicaTorn};
  CHECK(listed().empty());
  REQUIRE(report(backup, {a, b}) == Status::kOk);
  auto got = listed();
  REQUIRE(got.size() == 2);
  CHECK(got[0].backup_id == backup);
  CHECK(got[0].replica.segment_id == 7);
  CHECK(got[0].replica.closed == 1);
  CHECK(got[1].replica.segment_id == 8);
  CHECK(got[1].replica.status == wire::kReplicaTorn);
  // A newer report replaces the older one.
  REQUIRE(report(backup, {b}) == Status::kOk);
  CHECK(listed().size() == 1);
  // Not a backup, never issued, a lying count: refused; a replaced backup: fenced, and its
  // report is dropped.
  CHECK(report(master, {a}) == Status::kBadRequest);
  CHECK(report(make_server_id(9, 1), {a}) == Status::kBadRequest);
  std::vector<std::byte> lying;
  wire::BodyWriter(&lying).put(wire::BackupReportHeader{.backup_id = backup, .count = 2});
  CHECK(client.call(wire::Opcode::kReportBackupReplicas, lying).status == Status::kBadRequest);
  uint64_t restarted = *client.enlist("127.0.0.1:3002", wire::kServiceBackup, backup);
  CHECK(report(backup, {a}) == Status::kFenced);
  REQUIRE(report(restarted, {a}) == Status::kOk);
  got = listed();
  REQUIRE(got.size() == 1);
  CHECK(got[0].backup_id == restarted);
}

namespace ramkv::coordinator {

TEST_CASE("coordinator: every enlist sends the whole server list to the servers that are up",
          "[coordinator][service]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  FakeMaster m1, m2;
  Client client(c.service->locator());
  REQUIRE(client.enlist(m1.transport->locator(), wire::kServiceMaster).ok());
  REQUIRE(client.enlist(m2.transport->locator(), wire::kServiceMaster).ok());
  // The updates go out from the notifier thread: wait for them, bounded.
  auto newest = [](FakeMaster& m) {
    std::lock_guard lock(m.mutex);
    return m.server_list_updates.empty() ? 0u : m.server_list_updates.back();
  };
  for (int i = 0; i < 200 && (newest(m1) != 2 || newest(m2) != 2); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(newest(m1) == 2);
  CHECK(newest(m2) == 2);
}

// ---- Failure detection: hint server crashed (docs/recovery.md) -------------------------

namespace {

using SteadyClock = std::chrono::steady_clock;

// A locator where nothing listens (bound once, then released).
std::string dead_locator() {
  auto t = make_tcp_server_transport({});
  REQUIRE(t->listen("127.0.0.1:0") == Status::kOk);
  return t->locator();
}

struct ListedServers {
  uint64_t version = 0;
  std::vector<wire::ServerListItem> servers;
  // The status of `id` (0 up, 1 crashed, 2 removed), or -1 if it is not listed.
  int status_of(uint64_t id) const {
    for (const auto& s : servers) {
      if (s.server_id == id) return s.status;
    }
    return -1;
  }
};

ListedServers list_servers(Client& client) {
  auto r = client.call(wire::Opcode::kGetServerList, {});
  REQUIRE(r.status == Status::kOk);
  ListedServers out;
  REQUIRE(wire::decode_server_list(r.body, &out.version, &out.servers) == Status::kOk);
  return out;
}

Status hint(Client& client, uint64_t id) {
  std::vector<std::byte> body;
  wire::BodyWriter(&body).put(wire::ServerIdRequest{.server_id = id});
  auto r = client.call(wire::Opcode::kHintServerCrashed, body);
  CHECK(r.body.empty());
  return r.status;
}

// Polls the server list until `id` has `status`, for up to `limit`; true if it did.
bool wait_for_status(Client& client, uint64_t id, int status,
                     std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  const auto deadline = SteadyClock::now() + limit;
  for (int i = 0; i < 10'000 && SteadyClock::now() < deadline; ++i) {
    if (list_servers(client).status_of(id) == status) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return list_servers(client).status_of(id) == status;
}

}  // namespace

TEST_CASE("coordinator: a hint about a server that answers pings leaves it up",
          "[coordinator][service][failure]") {
  TempDir dir;
  // Generous: a live server is never declared on a loaded machine.
  RunningCoordinator c(dir.path, 1'000'000'000);
  FakeMaster m;
  Client client(c.service->locator());
  auto id = client.enlist(m.transport->locator(), wire::kServiceMaster | wire::kServiceBackup);
  REQUIRE(id.ok());
  const uint64_t version = list_servers(client).version;
  REQUIRE(hint(client, *id) == Status::kOk);
  for (int i = 0; i < 1000 && m.echoes == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  REQUIRE(m.echoes >= 1);
  // Had the ping been lost, the verification would go on; the server stays up either way.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  auto listed = list_servers(client);
  CHECK(listed.status_of(*id) == 0);
  CHECK(listed.version == version);
}

TEST_CASE("coordinator: a silent hinted server is declared crashed, persisted and announced",
          "[coordinator][service][failure]") {
  TempDir dir;
  FakeMaster alive;
  const std::string dead = dead_locator();
  const uint64_t verify_ns = 200'000'000;
  uint64_t alive_id = 0, dead_id = 0, version = 0;
  {
    RunningCoordinator c(dir.path, verify_ns);
    Client client(c.service->locator());
    alive_id = *client.enlist(alive.transport->locator(), wire::kServiceMaster);
    dead_id = *client.enlist(dead, wire::kServiceMaster | wire::kServiceBackup);
    REQUIRE(client.create_table("before", 2).ok());  // one tablet on each
    const auto start = SteadyClock::now();
    REQUIRE(hint(client, dead_id) == Status::kOk);
    REQUIRE(wait_for_status(client, dead_id, 1));
    // Three pings a verify timeout apart, all refused: at least two timeouts.
    CHECK(SteadyClock::now() - start >= std::chrono::nanoseconds(2 * verify_ns));
    auto listed = list_servers(client);
    CHECK(listed.status_of(alive_id) == 0);
    version = listed.version;
    // The crashed master keeps its tablets (recovery moves them); new tables avoid it.
    auto before = client.tablet_map(*client.table_id("before"));
    REQUIRE(before.ok());
    CHECK(before->tablets.size() == 2);
    auto after = client.create_table("after", 4);
    REQUIRE(after.ok());
    auto map = client.tablet_map(*after);
    REQUIRE(map.ok());
    for (const auto& t : map->tablets) CHECK(t.server_id == alive_id);
    // Every server that is up hears of it (bounded wait: the notifier's thread sends).
    auto told = [&] {
      std::lock_guard lock(alive.mutex);
      for (const auto& list : alive.server_lists) {
        for (const auto& s : list) {
          if (s.server_id == dead_id && s.status == 1) return true;
        }
      }
      return false;
    };
    for (int i = 0; i < 500 && !told(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    CHECK(told());
  }
  // Persisted: a restarted coordinator still lists it crashed.
  RunningCoordinator c(dir.path, verify_ns);
  Client client(c.service->locator());
  auto listed = list_servers(client);
  CHECK(listed.status_of(dead_id) == 1);
  CHECK(listed.status_of(alive_id) == 0);
  CHECK(listed.version == version);
}

TEST_CASE("coordinator: a hint naming an id never given out, or malformed, is a bad request",
          "[coordinator][service][failure]") {
  TempDir dir;
  RunningCoordinator c(dir.path);
  Client client(c.service->locator());
  CHECK(hint(client, make_server_id(1, 1)) == Status::kBadRequest);  // nobody enlisted yet
  auto id = client.enlist(dead_locator(), wire::kServiceMaster);
  REQUIRE(id.ok());
  CHECK(hint(client, 0) == Status::kBadRequest);
  CHECK(hint(client, make_server_id(2, 1)) == Status::kBadRequest);
  CHECK(hint(client, make_server_id(1, 2)) == Status::kBadRequest);  // a future generation
  CHECK(hint(client, make_server_id(0, 1)) == Status::kBadRequest);
  CHECK(client.call(wire::Opcode::kHintServerCrashed, {}).status == Status::kBadRequest);
  std::vector<std::byte> body;
  wire::BodyWriter(&body).put(wire::ServerIdRequest{.server_id = *id});
  auto short_body = body;
  short_body.pop_back();
  CHECK(client.call(wire::Opcode::kHintServerCrashed, short_body).status == Status::kBadRequest);
  body.push_back(std::byte{0});
  CHECK(client.call(wire::Opcode::kHintServerCrashed, body).status == Status::kBadRequest);
  // None of them started a verification: the (dead) server is still up.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(list_servers(client).status_of(*id) == 0);
}

TEST_CASE("coordinator: a hint about a server already crashed or replaced changes nothing",
          "[coordinator][service][failure]") {
  TempDir dir;
  const uint64_t verify_ns = 100'000'000;
  RunningCoordinator c(dir.path, verify_ns);
  Client client(c.service->locator());
  FakeMaster m;
  auto crashed = client.enlist(dead_locator(), wire::kServiceBackup);
  REQUIRE(crashed.ok());
  REQUIRE(hint(client, *crashed) == Status::kOk);
  REQUIRE(wait_for_status(client, *crashed, 1));
  // A server replaced by a newer generation: the hint names the old id. The new one's
  // locator is dead too, so a verification started by mistake would declare it.
  auto old_id = client.enlist(m.transport->locator(), wire::kServiceMaster);
  REQUIRE(old_id.ok());
  auto new_id = client.enlist(dead_locator(), wire::kServiceMaster, *old_id);
  REQUIRE(new_id.ok());
  REQUIRE(*new_id == make_server_id(server_index(*old_id), 2));
  const uint64_t version = list_servers(client).version;
  for (int i = 0; i < 3; ++i) {
    CHECK(hint(client, *crashed) == Status::kOk);
    CHECK(hint(client, *old_id) == Status::kOk);
  }
  // Longer than a whole verification (3 pings 100 ms apart).
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  auto listed = list_servers(client);
  CHECK(listed.version == version);
  CHECK(listed.status_of(*crashed) == 1);
  CHECK(listed.status_of(*new_id) == 0);
  CHECK(m.echoes == 0);
}

}  // namespace ramkv::coordinator

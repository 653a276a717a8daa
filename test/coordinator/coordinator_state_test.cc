#include "coordinator/coordinator_state.h"

#include <array>
#include <catch2/catch.hpp>
#include <string>

#include "common/buffer.h"
#include "common/wire_format.h"

using namespace ramkv;
using namespace ramkv::coordinator;

namespace {

CoordinatorState sample_state() {
  CoordinatorState st;
  auto m1 = st.enlist(wire::kServiceMaster | wire::kServiceBackup, "127.0.0.1:2001", 0);
  auto m2 = st.enlist(wire::kServiceMaster, "127.0.0.1:2002", 0);
  st.enlist(wire::kServiceBackup, "127.0.0.1:2003", 0);
  st.create_table("users", 0, {m1.server_id, m2.server_id});
  st.create_table("orders", 5, {m1.server_id, m2.server_id});
  st.set_replication_epoch(m1.server_id, {.segment_id = 7, .epoch = 2});
  st.set_replication_epoch(m2.server_id, {.segment_id = 3, .epoch = 1});
  return st;
}

// A state in format version 1 (no replication epochs), written field by field as that
// version laid it out: one master at "h:1", table "t" (id 1) in one tablet it owns.
std::vector<std::byte> version_1_bytes() {
  std::vector<std::byte> out(256);
  ByteWriter w(out);
  w.put(uint32_t{1});  // format version
  w.put(uint64_t{1});  // server list version
  w.put(uint64_t{1});  // tablet map version
  w.put(uint64_t{2});  // next table id
  w.put_varint(1);     // servers
  w.put(make_server_id(1, 1));
  w.put(wire::kServiceMaster);
  w.put(uint8_t{0});  // up
  w.put_varint(3);
  w.put_bytes(std::string_view("h:1"));
  w.put_varint(1);  // tables
  w.put(uint64_t{1});
  w.put_varint(1);
  w.put_bytes(std::string_view("t"));
  w.put_varint(1);  // tablets
  w.put(uint64_t{1});
  w.put(uint64_t{0});
  w.put(UINT64_MAX);
  w.put(make_server_id(1, 1));
  REQUIRE(w.ok());
  out.resize(w.size());
  return out;
}

// Every hash in [0, 2^64) is covered by exactly one tablet of `tablets`.
void check_covers_hash_space(std::vector<Tablet> tablets) {
  REQUIRE(!tablets.empty());
  CHECK(tablets.front().start_hash == 0);
  CHECK(tablets.back().end_hash == UINT64_MAX);
  for (size_t i = 1; i < tablets.size(); ++i) {
    CHECK(tablets[i].start_hash == tablets[i - 1].end_hash + 1);
  }
}

}  // namespace

TEST_CASE("coordinator state: server ids are index and generation, from 1",
          "[coordinator][state]") {
  CoordinatorState st;
  auto a = st.enlist(wire::kServiceMaster, "h:1", 0);
  auto b = st.enlist(wire::kServiceMaster, "h:2", 0);
  CHECK(a.server_id == make_server_id(1, 1));
  CHECK(b.server_id == make_server_id(2, 1));
  CHECK(a.replaced_id == 0);
  CHECK(st.up_masters() == std::vector<uint64_t>{a.server_id, b.server_id});
}

TEST_CASE("coordinator state: a server enlisting again gets a new generation",
          "[coordinator][state]") {
  CoordinatorState st;
  auto a = st.enlist(wire::kServiceMaster, "h:1", 0);
  uint64_t table = st.create_table("t", 2, {a.server_id});
  auto again = st.enlist(wire::kServiceMaster, "h:1", 0);  // same locator
  CHECK(again.server_id == make_server_id(1, 2));
  CHECK(again.replaced_id == a.server_id);
  CHECK(st.find_server(a.server_id) == nullptr);
  // The old incarnation keeps its tablets: its recovery moves them.
  for (const auto& t : st.tablets(table)) CHECK(t.server_id == a.server_id);
  auto third = st.enlist(wire::kServiceMaster, "h:9", again.server_id);  // by replaces_id
  CHECK(third.server_id == make_server_id(1, 3));
  CHECK(st.servers().size() == 1);
}

TEST_CASE("coordinator state: a table's tablets cover the hash space exactly once",
          "[coordinator][state]") {
  for (uint32_t count : {1u, 2u, 3u, 7u, 64u, 4096u}) {
    auto ranges = split_hash_space(count);
    REQUIRE(ranges.size() == count);
    std::vector<Tablet> tablets;
    for (auto [start, end] : ranges) tablets.push_back({1, start, end, 1});
    check_covers_hash_space(tablets);
  }
  CoordinatorState st = sample_state();
  auto orders = st.tablets(*st.table_id("orders"));
  CHECK(orders.size() == 5);
  check_covers_hash_space(orders);
  CHECK(orders[0].server_id != orders[1].server_id);  // round-robin
  CHECK(orders[0].server_id == orders[2].server_id);
}

TEST_CASE("coordinator state: table ids are never reused", "[coordinator][state]") {
  CoordinatorState st = sample_state();
  uint64_t orders = *st.table_id("orders");
  REQUIRE(st.drop_table("orders").ok());
  CHECK(!st.table_id("orders"));
  CHECK(st.tablets(orders).empty());
  CHECK(st.drop_table("orders").status() == Status::kUnknownTable);
  uint64_t again = st.create_table("orders", 0, st.up_masters());
  CHECK(again > orders);
}

TEST_CASE("coordinator state: serialization round trips", "[coordinator][state]") {
  CoordinatorState st = sample_state();
  REQUIRE(st.drop_table("users").ok());
  auto bytes = st.serialize();
  auto back = CoordinatorState::deserialize(bytes);
  REQUIRE(back.ok());
  CHECK(*back == st);
  CHECK(back->serialize() == bytes);

  auto empty = CoordinatorState::deserialize(CoordinatorState().serialize());
  REQUIRE(empty.ok());
  CHECK(*empty == CoordinatorState());
}

TEST_CASE("coordinator state: truncated or extended bytes are a format error",
          "[coordinator][state]") {
  auto bytes = sample_state().serialize();
  for (size_t n = 0; n < bytes.size(); ++n) {
    auto r = CoordinatorState::deserialize(std::span<const std::byte>(bytes).first(n));
    CHECK(r.status() == Status::kFormatError);
  }
  bytes.push_back(std::byte{0});
  CHECK(CoordinatorState::deserialize(bytes).status() == Status::kFormatError);
}

TEST_CASE("coordinator state: flipped bytes never crash the decoder", "[coordinator][state]") {
  auto bytes = sample_state().serialize();
  for (size_t i = 0; i < bytes.size(); ++i) {
    auto copy = bytes;
    copy[i] ^= std::byte{0xff};
    auto r = CoordinatorState::deserialize(copy);  // may decode or fail, never crash
    if (r.ok()) CHECK(r->serialize().size() == copy.size());
  }
}

TEST_CASE("coordinator state: a replication epoch only moves forward", "[coordinator][state]") {
  CoordinatorState st;
  uint64_t m = st.enlist(wire::kServiceMaster, "h:1", 0).server_id;
  CHECK(!st.replication_epoch(m));
  CHECK(st.set_replication_epoch(m, {.segment_id = 5, .epoch = 1}));
  CHECK(st.set_replication_epoch(m, {.segment_id = 5, .epoch = 2}));   // same segment, higher
  CHECK(!st.set_replication_epoch(m, {.segment_id = 5, .epoch = 2}));  // equal: a resend
  CHECK(!st.set_replication_epoch(m, {.segment_id = 5, .epoch = 1}));  // lower epoch
  CHECK(!st.set_replication_epoch(m, {.segment_id = 4, .epoch = 9}));  // older segment
  CHECK(*st.replication_epoch(m) == ReplicationEpoch{.segment_id = 5, .epoch = 2});
  CHECK(st.set_replication_epoch(m, {.segment_id = 6, .epoch = 0}));  // newer segment
  CHECK(*st.replication_epoch(m) == ReplicationEpoch{.segment_id = 6, .epoch = 0});
  CHECK(st.replication_epochs().size() == 1);
}

TEST_CASE("coordinator state: a replaced master keeps its replication epoch",
          "[coordinator][state]") {
  CoordinatorState st;
  uint64_t old_id = st.enlist(wire::kServiceMaster, "h:1", 0).server_id;
  REQUIRE(st.set_replication_epoch(old_id, {.segment_id = 9, .epoch = 4}));
  uint64_t new_id = st.enlist(wire::kServiceMaster, "h:1", 0).server_id;
  CHECK(st.issued(old_id));
  CHECK(st.issued(new_id));
  CHECK(!st.issued(make_server_id(1, 3)));
  CHECK(!st.issued(make_server_id(2, 1)));
  CHECK(!st.issued(0));
  CHECK(*st.replication_epoch(old_id) == ReplicationEpoch{.segment_id = 9, .epoch = 4});
  CHECK(!st.replication_epoch(new_id));
  auto back = CoordinatorState::deserialize(st.serialize());
  REQUIRE(back.ok());
  CHECK(*back == st);
}

TEST_CASE("coordinator state: replication epochs survive serialization, by master id",
          "[coordinator][state]") {
  CoordinatorState st;
  std::vector<uint64_t> ids;
  for (int i = 0; i < 4; ++i) {
    ids.push_back(st.enlist(wire::kServiceMaster, "h:" + std::to_string(i + 1), 0).server_id);
  }
  // Recorded out of order; kept (and written) in master id order.
  for (size_t i : {size_t{3}, size_t{0}, size_t{2}}) {
    REQUIRE(st.set_replication_epoch(ids[i], {.segment_id = 100u + i, .epoch = 10u + i}));
  }
  auto back = CoordinatorState::deserialize(st.serialize());
  REQUIRE(back.ok());
  CHECK(*back == st);
  std::vector<uint64_t> order;
  for (const auto& [id, e] : back->replication_epochs()) order.push_back(id);
  CHECK(order == std::vector<uint64_t>{ids[0], ids[2], ids[3]});
  CHECK(*back->replication_epoch(ids[2]) == ReplicationEpoch{.segment_id = 102, .epoch = 12});
  // Changing only an epoch changes the state and its bytes.
  CoordinatorState changed = *back;
  REQUIRE(changed.set_replication_epoch(ids[0], {.segment_id = 100, .epoch = 11}));
  CHECK(!(changed == st));
  CHECK(changed.serialize() != st.serialize());
}

TEST_CASE("coordinator state: format version 1 still loads, with no epochs",
          "[coordinator][state]") {
  auto v1 = version_1_bytes();
  auto st = CoordinatorState::deserialize(v1);
  REQUIRE(st.ok());
  REQUIRE(st->servers().size() == 1);
  CHECK(st->servers()[0].locator == "h:1");
  CHECK(*st->table_id("t") == 1);
  CHECK(st->tablets(1).size() == 1);
  CHECK(st->replication_epochs().empty());
  // Rewritten as version 2, which loads back equal.
  auto v2 = st->serialize();
  CHECK(ByteReader(v2).get<uint32_t>() == 2);
  auto again = CoordinatorState::deserialize(v2);
  REQUIRE(again.ok());
  CHECK(*again == *st);
  // A version-1 file followed by an epoch section is not version 1.
  auto longer = v1;
  longer.push_back(std::byte{0});
  CHECK(CoordinatorState::deserialize(longer).status() == Status::kFormatError);
  // Truncated version-1 files are rejected too.
  for (size_t n = 0; n < v1.size(); ++n) {
    CHECK(CoordinatorState::deserialize(std::span<const std::byte>(v1).first(n)).status() ==
          Status::kFormatError);
  }
}

TEST_CASE("coordinator state: bad epoch sections and unknown versions are format errors",
          "[coordinator][state]") {
  CoordinatorState st;
  uint64_t m1 = st.enlist(wire::kServiceMaster, "h:1", 0).server_id;
  uint64_t m2 = st.enlist(wire::kServiceMaster, "h:2", 0).server_id;
  auto base = st.serialize();  // ends with the epoch count, 0
  REQUIRE(base.back() == std::byte{0});
  base.pop_back();
  auto with_epochs = [&](std::vector<std::array<uint64_t, 3>> entries) {
    std::vector<std::byte> out = base;
    out.resize(base.size() + 10 + entries.size() * 24);
    ByteWriter w(std::span<std::byte>(out).subspan(base.size()));
    w.put_varint(entries.size());
    for (const auto& e : entries) {
      for (uint64_t v : e) w.put(v);
    }
    REQUIRE(w.ok());
    out.resize(base.size() + w.size());
    return out;
  };
  CHECK(CoordinatorState::deserialize(with_epochs({{m1, 1, 1}, {m2, 1, 1}})).ok());
  // Duplicate or decreasing master ids.
  CHECK(CoordinatorState::deserialize(with_epochs({{m1, 1, 1}, {m1, 2, 2}})).status() ==
        Status::kFormatError);
  CHECK(CoordinatorState::deserialize(with_epochs({{m2, 1, 1}, {m1, 1, 1}})).status() ==
        Status::kFormatError);
  // Master ids never issued: index 0, an index not listed, a generation not reached.
  for (uint64_t bad : {uint64_t{0}, make_server_id(0, 1), make_server_id(3, 1),
                       make_server_id(1, 2), make_server_id(1, 0)}) {
    CHECK(CoordinatorState::deserialize(with_epochs({{bad, 1, 1}})).status() ==
          Status::kFormatError);
  }
  // A count larger than the bytes that follow.
  auto lying = with_epochs({{m1, 1, 1}});
  lying[base.size()] = std::byte{2};
  CHECK(CoordinatorState::deserialize(lying).status() == Status::kFormatError);
  // Versions other than 1 and 2, and bytes that are no state at all.
  for (uint32_t version : {0u, 3u, 0xffffffffu}) {
    auto copy = st.serialize();
    ByteWriter(copy).put(version);
    CHECK(CoordinatorState::deserialize(copy).status() == Status::kFormatError);
  }
  std::string garbage = "not a coordinator state at all";
  auto g = std::as_bytes(std::span(garbage));
  CHECK(CoordinatorState::deserialize(g).status() == Status::kFormatError);
  CHECK(CoordinatorState::deserialize({}).status() == Status::kFormatError);
}

TEST_CASE("coordinator state: recovery moves a range of a tablet, splitting it",
          "[coordinator][state]") {
  CoordinatorState st;
  auto a = st.enlist(wire::kServiceMaster, "h:1", 0);
  auto b = st.enlist(wire::kServiceMaster, "h:2", 0);
  uint64_t table = st.create_table("t", 1, {a.server_id});
  const uint64_t version = st.tablet_map_version();
  // The middle of a's only tablet goes to b: three tablets, still tiling the hash space.
  REQUIRE(st.move_tablet_range(a.server_id, {table, 100, 199, b.server_id}) == Status::kOk);
  auto tablets = st.tablets(table);
  REQUIRE(tablets.size() == 3);
  CHECK(tablets[0] == Tablet{table, 0, 99, a.server_id});
  CHECK(tablets[1] == Tablet{table, 100, 199, b.server_id});
  CHECK(tablets[2] == Tablet{table, 200, UINT64_MAX, a.server_id});
  CHECK(st.tablet_map_version() > version);
  // Its edges, then a range a does not own.
  REQUIRE(st.move_tablet_range(a.server_id, {table, 0, 99, b.server_id}) == Status::kOk);
  REQUIRE(st.move_tablet_range(a.server_id, {table, 200, UINT64_MAX, b.server_id}) == Status::kOk);
  CHECK(st.tablets_of(a.server_id).empty());
  CHECK(st.move_tablet_range(a.server_id, {table, 0, 5, b.server_id}) == Status::kInvalidArgument);
  check_covers_hash_space(st.tablets(table));
  // A state with split tablets survives serialization.
  auto back = CoordinatorState::deserialize(st.serialize());
  REQUIRE(back.ok());
  CHECK(*back == st);
  // Removal is for crashed servers only.
  CHECK_FALSE(st.mark_removed(a.server_id));
  REQUIRE(st.mark_crashed(a.server_id));
  CHECK(st.mark_removed(a.server_id));
  CHECK(st.find_server(a.server_id)->status == ServerStatus::kRemoved);
}

TEST_CASE("coordinator state: marking a server crashed changes only that entry, once",
          "[coordinator][state]") {
  CoordinatorState st = sample_state();
  const uint64_t m1 = make_server_id(1, 1);
  const uint64_t version = st.server_list_version();
  const auto tablets = st.tablets_of(m1);
  REQUIRE(st.mark_crashed(m1));
  CHECK(st.find_server(m1)->status == ServerStatus::kCrashed);
  CHECK(st.server_list_version() == version + 1);
  CHECK(st.tablets_of(m1) == tablets);  // recovery moves them, not the declaration
  CHECK(st.up_masters() == std::vector<uint64_t>{make_server_id(2, 1)});
  // Again, an unknown id, a future generation: nothing changes.
  CHECK_FALSE(st.mark_crashed(m1));
  CHECK_FALSE(st.mark_crashed(make_server_id(9, 1)));
  CHECK_FALSE(st.mark_crashed(make_server_id(2, 2)));
  CHECK(st.server_list_version() == version + 1);
  // Persisted with the rest.
  auto back = CoordinatorState::deserialize(st.serialize());
  REQUIRE(back.ok());
  CHECK(*back == st);
  CHECK(back->find_server(m1)->status == ServerStatus::kCrashed);
  // A crashed server that enlists again gets a new generation, up.
  auto again = st.enlist(wire::kServiceMaster | wire::kServiceBackup, "127.0.0.1:2001", m1);
  CHECK(again.server_id == make_server_id(1, 2));
  CHECK(st.find_server(again.server_id)->status == ServerStatus::kUp);
}

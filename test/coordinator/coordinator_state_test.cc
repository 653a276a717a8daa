#include "coordinator/coordinator_state.h"

#include <catch2/catch.hpp>

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
  return st;
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
  for (const auto& t : st.tablets(table)) CHECK(t.server_id == again.server_id);
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

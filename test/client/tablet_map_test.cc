#include "client/tablet_map.h"

#include <catch2/catch.hpp>

#include "common/checksum.h"

using ramkv::Status;
using ramkv::client::Tablet;
using ramkv::client::TabletMap;
using ramkv::client::TabletMapReply;

namespace {

// Table `table_id` split into `n` equal ranges owned round-robin by servers 1..owners.
TabletMapReply split(uint64_t table_id, uint64_t n, uint64_t owners) {
  TabletMapReply r;
  uint64_t step = UINT64_MAX / n;
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t end = i + 1 == n ? UINT64_MAX : (i + 1) * step - 1;
    r.tablets.push_back({table_id, i * step, end, 1 + i % owners});
  }
  for (uint64_t s = 1; s <= owners; ++s) {
    r.servers.push_back({.server_id = s,
                         .services = 1,
                         .status = 0,
                         .locator = "127.0.0.1:" + std::to_string(1000 + s)});
  }
  return r;
}

std::vector<std::byte> encode(const TabletMapReply& r, uint32_t claimed_count) {
  std::vector<std::byte> b;
  ramkv::wire::BodyWriter w(&b);
  w.put(ramkv::wire::TabletMapHeader{.version = 7,
                                     .count = claimed_count,
                                     .server_count = static_cast<uint32_t>(r.servers.size())});
  for (const auto& t : r.tablets) {
    w.put(ramkv::wire::TabletWire{t.table_id, t.start_hash, t.end_hash, t.server_id});
  }
  for (const auto& s : r.servers) {
    w.put(ramkv::wire::ServerEntry{.server_id = s.server_id,
                                   .services = s.services,
                                   .status = s.status,
                                   .locator_bytes = static_cast<uint32_t>(s.locator.size())});
    w.put_bytes(s.locator);
  }
  return b;
}

}  // namespace

TEST_CASE("tablet map: every key goes to the tablet that covers its hash", "[client][tablet_map]") {
  TabletMap map;
  map.replace_all(split(3, 8, 3));
  for (int i = 0; i < 2000; ++i) {
    std::string key = "key-" + std::to_string(i);
    uint64_t h = ramkv::key_hash(3, key);
    const Tablet* t = map.find(3, h);
    REQUIRE(t != nullptr);
    CHECK(t->table_id == 3);
    CHECK(h >= t->start_hash);
    CHECK(h <= t->end_hash);
    REQUIRE(map.server(t->server_id) != nullptr);
  }
  CHECK(map.find(3, 0)->start_hash == 0);
  CHECK(map.find(3, UINT64_MAX)->end_hash == UINT64_MAX);
}

TEST_CASE("tablet map: other tables and holes find nothing", "[client][tablet_map]") {
  TabletMap map;
  TabletMapReply r;
  r.tablets.push_back({5, 100, 199, 1});
  r.tablets.push_back({5, 300, 399, 1});
  map.replace_all(r);
  CHECK(map.find(4, 150) == nullptr);
  CHECK(map.find(6, 150) == nullptr);
  CHECK(map.find(5, 99) == nullptr);
  CHECK(map.find(5, 250) == nullptr);
  CHECK(map.find(5, 400) == nullptr);
  REQUIRE(map.find(5, 199) != nullptr);
  CHECK(map.find(5, 300)->start_hash == 300);
  CHECK(map.server(1) == nullptr);  // named by no server entry
}

TEST_CASE("tablet map: a refresh replaces one table's tablets and leaves the others",
          "[client][tablet_map]") {
  TabletMap map;
  map.replace_all(split(1, 4, 2));
  TabletMapReply both = split(2, 4, 2);
  map.replace_table(2, both);
  CHECK(map.tablets_of(1).size() == 4);
  CHECK(map.tablets_of(2).size() == 4);
  map.replace_table(2, split(2, 1, 2));  // merged into one tablet
  CHECK(map.tablets_of(2).size() == 1);
  CHECK(map.tablets_of(1).size() == 4);
  map.forget_table(1);
  CHECK_FALSE(map.has_table(1));
  CHECK(map.has_table(2));
}

TEST_CASE("tablet map: decoding takes a well-formed reply", "[client][tablet_map]") {
  TabletMapReply r = split(9, 3, 2);
  auto body = encode(r, 3);
  auto decoded = ramkv::client::decode_tablet_map(body);
  REQUIRE(decoded.ok());
  CHECK(decoded->version == 7);
  REQUIRE(decoded->tablets.size() == 3);
  CHECK(decoded->tablets[2].end_hash == UINT64_MAX);
  REQUIRE(decoded->servers.size() == 2);
  CHECK(decoded->servers[1].locator == "127.0.0.1:1002");
}

TEST_CASE("tablet map: decoding refuses truncated or lying replies", "[client][tablet_map]") {
  TabletMapReply r = split(9, 3, 2);
  auto body = encode(r, 3);
  for (size_t cut = 0; cut < body.size(); ++cut) {
    auto d = ramkv::client::decode_tablet_map(std::span<const std::byte>(body.data(), cut));
    CHECK(d.status() == Status::kBadRequest);
  }
  CHECK(ramkv::client::decode_tablet_map(encode(r, 1u << 30)).status() == Status::kBadRequest);
  CHECK(ramkv::client::decode_tablet_map(encode(r, 2)).status() == Status::kBadRequest);
  body.push_back(std::byte{0});
  CHECK(ramkv::client::decode_tablet_map(body).status() == Status::kBadRequest);
}

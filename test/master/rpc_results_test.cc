// Tests for exactly-once writes, removes and increments (master/rpc_results.h and
// ObjectManager's use of it, docs/rpc.md "Exactly once"): a retried request is answered
// from its completion record, records leave when acknowledged, survive the cleaner until
// then, and travel with their key's partition through a recovery's replay.
#include <catch2/catch.hpp>

#include <cstring>
#include <string>
#include <vector>

#include "common/checksum.h"
#include "common/log_entry.h"
#include "common/segment_iterator.h"
#include "master/object_manager.h"
#include "master/rpc_results.h"
#include "test/master/object_manager_helpers.h"

namespace ramkv::master {
namespace {

using testing::int_value;
using testing::make;
using testing::small_config;

constexpr uint64_t kTable = 1;
constexpr uint64_t kClient = 0xc11e47;

// Every completion record in the log, as a backup would see them.
std::vector<RpcResultView> logged_records(ObjectManager& om) {
  std::vector<RpcResultView> out;
  for (uint64_t id : om.log().segment_ids()) {
    auto copy = om.log().copy_segment(id);
    REQUIRE(copy.has_value());
    for (SegmentIterator it(copy->bytes, copy->certificate); it.valid(); it.next()) {
      if (it.type() != EntryType::kRpcResult) continue;
      auto r = decode_rpc_result(it.payload());
      REQUIRE(r.ok());
      out.push_back(*r);
    }
  }
  return out;
}

std::vector<std::vector<std::byte>> log_segments(ObjectManager& om) {
  std::vector<std::vector<std::byte>> out;
  for (uint64_t id : om.log().segment_ids()) {
    auto copy = om.log().copy_segment(id);
    REQUIRE(copy.has_value());
    out.push_back(copy->bytes);
  }
  return out;
}

int64_t as_int(const std::string& v) {
  int64_t n = 0;
  REQUIRE(v.size() == sizeof(n));
  std::memcpy(&n, v.data(), sizeof(n));
  return n;
}

TEST_CASE("rpc results: a record answers its retries until the client acknowledges it",
          "[master][rpc_results]") {
  std::vector<std::pair<LogRef, uint32_t>> released;
  RpcResults results([&](LogRef ref, uint32_t bytes) { released.emplace_back(ref, bytes); });
  RpcOutcome out;
  const RpcId first{.client_id = kClient, .seq = 1, .ack = 0};
  REQUIRE(results.check(first, 10, &out) == RpcResults::Check::kNew);
  results.record(first, {.status = Status::kOk, .version = 7, .value = 3}, 4096, 40, 10);
  out = {};
  REQUIRE(results.check(first, 11, &out) == RpcResults::Check::kDone);
  CHECK(out.status == Status::kOk);
  CHECK(out.version == 7);
  CHECK(out.value == 3);
  // Another client's sequence 1 is its own request.
  CHECK(results.check({.client_id = kClient + 1, .seq = 1}, 11, &out) == RpcResults::Check::kNew);
  CHECK(released.empty());
  // Sequence 2 acknowledges 1: its record goes, and 1 is now a stale duplicate.
  CHECK(results.check({.client_id = kClient, .seq = 2, .ack = 1}, 12, &out) ==
        RpcResults::Check::kNew);
  REQUIRE(released.size() == 1);
  CHECK(released[0] == std::pair<LogRef, uint32_t>{4096, 40});
  CHECK(results.check(first, 13, &out) == RpcResults::Check::kStale);
  auto stats = results.stats();
  CHECK(stats.records == 0);
  CHECK(stats.duplicates == 1);
  CHECK(stats.stale == 1);
  CHECK(stats.released == 1);
  CHECK(stats.clients == 2);
}

TEST_CASE("rpc results: an ack at or above the request carrying it is not taken",
          "[master][rpc_results]") {
  int released = 0;
  RpcResults results([&](LogRef, uint32_t) { ++released; });
  RpcOutcome out;
  results.record({.client_id = kClient, .seq = 5}, {.version = 1}, 0, 30, 0);
  // A broken client claiming to have the reply of the request it is sending.
  CHECK(results.check({.client_id = kClient, .seq = 6, .ack = 9}, 1, &out) ==
        RpcResults::Check::kNew);
  CHECK(released == 0);
  CHECK(results.check({.client_id = kClient, .seq = 5, .ack = 4}, 1, &out) ==
        RpcResults::Check::kDone);
}

TEST_CASE("rpc results: a client silent for the expiry time is forgotten with its records",
          "[master][rpc_results]") {
  std::vector<LogRef> released;
  RpcResults results([&](LogRef ref, uint32_t) { released.push_back(ref); });
  results.record({.client_id = 1, .seq = 1}, {}, 100, 30, /*now_ns=*/1'000);
  results.record({.client_id = 1, .seq = 2}, {}, 200, 30, 1'000);
  results.record({.client_id = 2, .seq = 1}, {}, 300, 30, 5'000);
  CHECK(results.expire(/*now_ns=*/5'500, /*ttl_ns=*/1'000) == 1);
  CHECK(released == std::vector<LogRef>{100, 200});
  RpcOutcome out;
  CHECK(results.check({.client_id = 2, .seq = 1}, 5'600, &out) == RpcResults::Check::kDone);
  CHECK(results.stats().records == 1);
  CHECK(results.stats().expired_clients == 1);
}

TEST_CASE("rpc results: the completion record entry round-trips and rejects damage",
          "[master][rpc_results]") {
  const RpcResultView r{.table_id = 300,
                        .key_hash = 0xfeedfacecafebeef,
                        .client_id = UINT64_MAX,
                        .rpc_seq = 1u << 20,
                        .ack_seq = (1u << 20) - 3,
                        .status = static_cast<uint32_t>(Status::kWrongVersion),
                        .version = 77,
                        .value = static_cast<uint64_t>(-5)};
  std::byte buf[kMaxRpcResultBytes];
  uint32_t n = encode_rpc_result(r, buf);
  auto back = decode_rpc_result({buf, n});
  REQUIRE(back.ok());
  CHECK(*back == r);
  CHECK(decode_rpc_result({buf, n - 1}).status() == Status::kFormatError);
  std::vector<std::byte> longer(buf, buf + n);
  longer.push_back(std::byte{0});
  CHECK(decode_rpc_result(longer).status() == Status::kFormatError);
  // A record without an increment's value leaves the value out.
  RpcResultView plain = r;
  plain.value = 0;
  uint32_t plain_bytes = encode_rpc_result(plain, buf);
  CHECK(plain_bytes == n - 8);
  auto plain_back = decode_rpc_result({buf, plain_bytes});
  REQUIRE(plain_back.ok());
  CHECK(*plain_back == plain);
}

TEST_CASE("object manager: a retried write, remove or increment is applied once",
          "[master][rpc_results]") {
  auto om = make(small_config(false));
  uint64_t seq = 0;
  auto id = [&](uint64_t s) { return RpcId{.client_id = kClient, .seq = s, .ack = 0}; };

  const RpcId write_id = id(++seq);
  auto v1 = om->write(kTable, "k", "one", nullptr, &write_id);
  REQUIRE(v1.ok());
  auto again = om->write(kTable, "k", "one", nullptr, &write_id);
  REQUIRE(again.ok());
  CHECK(*again == *v1);

  const RpcId inc_id = id(++seq);
  auto inc = om->increment(kTable, "n", 5, nullptr, &inc_id);
  REQUIRE(inc.ok());
  for (int i = 0; i < 3; ++i) {
    auto retry = om->increment(kTable, "n", 5, nullptr, &inc_id);
    REQUIRE(retry.ok());
    CHECK(retry->value == 5);
    CHECK(retry->version == inc->version);
  }
  std::string value;
  REQUIRE(om->read(kTable, "n", &value).ok());
  CHECK(as_int(value) == 5);

  // A rejected conditional write keeps its answer even after the state it saw changed.
  const RejectRules must_not_exist{.exists = true};
  const RpcId cond_id = id(++seq);
  CHECK(om->write(kTable, "k", "two", &must_not_exist, &cond_id).status() == Status::kObjectExists);
  const RpcId remove_id = id(++seq);
  auto removed = om->remove(kTable, "k", nullptr, &remove_id);
  REQUIRE(removed.ok());
  CHECK(*removed == *v1);
  CHECK(om->write(kTable, "k", "two", &must_not_exist, &cond_id).status() == Status::kObjectExists);
  CHECK(om->read(kTable, "k", &value).status() == Status::kObjectNotFound);
  // The remove's retry reports the version it removed, not "nothing there".
  auto removed_again = om->remove(kTable, "k", nullptr, &remove_id);
  REQUIRE(removed_again.ok());
  CHECK(*removed_again == *v1);

  // Untracked requests (client id 0) are applied every time.
  const RpcId untracked{.client_id = 0, .seq = 99};
  REQUIRE(om->increment(kTable, "n", 1, nullptr, &untracked).ok());
  REQUIRE(om->increment(kTable, "n", 1, nullptr, &untracked).ok());
  REQUIRE(om->read(kTable, "n", &value).ok());
  CHECK(as_int(value) == 7);

  auto stats = om->stats().rpc_results;
  CHECK(stats.records == 4);
  CHECK(stats.duplicates == 6);
  CHECK(logged_records(*om).size() == 4);
}

TEST_CASE("object manager: a completion record is appended with the object, last",
          "[master][rpc_results]") {
  auto om = make(small_config(false));
  REQUIRE(om->write(kTable, "k", "a").ok());
  const RpcId rpc{.client_id = kClient, .seq = 1};
  auto v = om->write(kTable, "k", "b", nullptr, &rpc);
  REQUIRE(v.ok());
  std::vector<EntryType> types;
  for (uint64_t id : om->log().segment_ids()) {
    auto copy = om->log().copy_segment(id);
    for (SegmentIterator it(copy->bytes, copy->certificate); it.valid(); it.next()) {
      if (it.type() == EntryType::kObject || it.type() == EntryType::kTombstone ||
          it.type() == EntryType::kRpcResult) {
        types.push_back(it.type());
      }
    }
  }
  CHECK(types == std::vector<EntryType>{EntryType::kObject, EntryType::kObject,
                                        EntryType::kTombstone, EntryType::kRpcResult});
  auto records = logged_records(*om);
  REQUIRE(records.size() == 1);
  CHECK(records[0].client_id == kClient);
  CHECK(records[0].rpc_seq == 1);
  CHECK(records[0].version == *v);
  CHECK(records[0].key_hash == key_hash(kTable, "k"));
}

TEST_CASE("object manager: records survive the cleaner until acknowledged, then leave the log",
          "[master][rpc_results]") {
  auto om = make(small_config(false));
  constexpr uint64_t kWrites = 1000;  // several segments: the head is never cleaned
  const std::string big(200, 'x');
  for (uint64_t s = 1; s <= kWrites; ++s) {
    const RpcId rpc{.client_id = kClient, .seq = s, .ack = 0};
    REQUIRE(om->write(kTable, "key" + std::to_string(s % 20), big, nullptr, &rpc).ok());
  }
  // Overwrites left most objects dead: cleaning moves what is live, records included.
  for (Segment* s : om->log().cleanable_segments()) om->cleaner().compact(s);
  om->cleaner().clean_combined(om->log().cleanable_segments());
  CHECK(logged_records(*om).size() == kWrites);
  const RpcId early{.client_id = kClient, .seq = 3, .ack = 0};
  auto v = om->write(kTable, "key3", "changed", nullptr, &early);
  REQUIRE(v.ok());
  std::string value;
  REQUIRE(om->read(kTable, "key3", &value).ok());
  CHECK(value == big);  // answered from the record, not written again

  const uint64_t live_before = om->stats().log.live_bytes;
  // The next request acknowledges everything before it.
  const RpcId next{.client_id = kClient, .seq = kWrites + 1, .ack = kWrites};
  REQUIRE(om->write(kTable, "other", "v", nullptr, &next).ok());
  CHECK(om->stats().rpc_results.records == 1);
  CHECK(om->stats().rpc_results.released == kWrites);
  CHECK(om->stats().log.live_bytes < live_before);
  for (Segment* s : om->log().cleanable_segments()) om->cleaner().compact(s);
  om->cleaner().clean_combined(om->log().cleanable_segments());
  auto records = logged_records(*om);
  // The cleaner only takes closed segments; whatever it cleaned lost its dead records.
  CHECK(records.size() < kWrites / 2);
  CHECK(om->write(kTable, "key3", "x", nullptr, &early).status() == Status::kStaleRpc);
}

TEST_CASE("replay: completion records go with their key's partition and answer retries there",
          "[master][rpc_results][replay]") {
  auto crashed = make(small_config(false));
  // Client A increments "a" (seq 1) and "b" (seq 2); seq 3 acknowledges seq 1.
  const RpcId a1{.client_id = kClient, .seq = 1};
  const RpcId a2{.client_id = kClient, .seq = 2};
  const RpcId a3{.client_id = kClient, .seq = 3, .ack = 1};
  REQUIRE(crashed->increment(kTable, "a", 10, nullptr, &a1).ok());
  REQUIRE(crashed->increment(kTable, "b", 20, nullptr, &a2).ok());
  REQUIRE(crashed->increment(kTable, "c", 30, nullptr, &a3).ok());
  const auto segments = log_segments(*crashed);

  // One recovery master takes the partition of "b" and "c", another that of "a".
  const uint64_t hash_a = key_hash(kTable, "a");
  auto recovery = make(small_config(false));
  ReplayStats stats;
  for (const auto& s : segments) {
    REQUIRE(recovery->replay(
                s, [&](uint64_t, uint64_t hash) { return hash != hash_a; }, &stats) == Status::kOk);
  }
  recovery->finish_replay(std::vector<TabletRange>{{kTable}}, 0);
  CHECK(stats.rpc_results == 2);
  auto b = recovery->increment(kTable, "b", 20, nullptr, &a2);
  REQUIRE(b.ok());
  CHECK(b->value == 20);
  auto c = recovery->increment(kTable, "c", 30, nullptr, &a3);
  REQUIRE(c.ok());
  CHECK(c->value == 30);
  std::string value;
  REQUIRE(recovery->read(kTable, "b", &value).ok());
  CHECK(as_int(value) == 20);

  // The other partition: "a"'s record was acknowledged by seq 3's, which that master never
  // sees; it keeps "a"'s record and answers its retry from it.
  auto other = make(small_config(false));
  ReplayStats other_stats;
  for (const auto& s : segments) {
    REQUIRE(other->replay(
                s, [&](uint64_t, uint64_t hash) { return hash == hash_a; }, &other_stats) ==
            Status::kOk);
  }
  CHECK(other_stats.rpc_results == 1);
  auto a = other->increment(kTable, "a", 10, nullptr, &a1);
  REQUIRE(a.ok());
  CHECK(a->value == 10);

  // Replaying the same segments again (a retried pull) changes nothing.
  ReplayStats twice;
  for (const auto& s : segments) {
    REQUIRE(recovery->replay(
                s, [&](uint64_t, uint64_t hash) { return hash != hash_a; }, &twice) == Status::kOk);
  }
  CHECK(twice.rpc_results == 0);
  CHECK(logged_records(*recovery).size() == 2);
  // The recovery master's own log now holds the records: a second crash keeps them.
  auto second = make(small_config(false));
  for (const auto& s : log_segments(*recovery)) {
    REQUIRE(second->replay(
                s, [](uint64_t, uint64_t) { return true; }, nullptr) == Status::kOk);
  }
  auto b2 = second->increment(kTable, "b", 20, nullptr, &a2);
  REQUIRE(b2.ok());
  CHECK(b2->value == 20);
}

}  // namespace
}  // namespace ramkv::master

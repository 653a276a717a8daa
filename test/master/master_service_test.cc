// Tests for master/master_service.h: every master opcode driven through handle() with
// encoded bodies, no network.
#include <catch2/catch.hpp>

#include <cstddef>
#include <cstring>
#include <map>
#include <set>
#include <string>

#include "common/checksum.h"
#include "common/clock.h"
#include "master/master_service.h"
#include "test/master/master_rpc_helpers.h"

namespace ramkv::master {
namespace {

using namespace ramkv::master::testing;
using wire::Opcode;

constexpr uint64_t kTable = 7;
constexpr uint64_t kMid = UINT64_MAX / 2;  // lower half [0, kMid], upper half above

MasterConfig small_config() {
  MasterConfig c;
  c.memory_bytes = 4u << 20;
  c.segment_bytes = 64u << 10;
  c.seglet_bytes = 4u << 10;
  c.max_key_bytes = 1024;
  c.max_value_bytes = 8192;
  c.cleaner_thread = false;
  c.prefault_memory = false;
  return c;
}

std::unique_ptr<MasterService> make_service(MasterConfig config = small_config()) {
  auto s = MasterService::create(config);
  REQUIRE(s.ok());
  return std::move(s).value();
}

wire::TabletWire tablet(uint64_t table_id, uint64_t start, uint64_t end) {
  return {.table_id = table_id, .start_hash = start, .end_hash = end, .server_id = 1};
}

void take(MasterService& m, std::vector<wire::TabletWire> tablets) {
  REQUIRE(call(m, Opcode::kTakeTablets, tablets_body(tablets)).status == Status::kOk);
}

std::unique_ptr<MasterService> service_owning_table(uint64_t table_id = kTable) {
  auto m = make_service();
  take(*m, {tablet(table_id, 0, UINT64_MAX)});
  return m;
}

// A key of `table_id` whose hash is in the lower (or upper) half of the hash space.
std::string key_in_half(uint64_t table_id, bool lower, int skip = 0) {
  for (int i = 0;; ++i) {
    std::string key = "key-" + std::to_string(i);
    if ((key_hash(table_id, key) <= kMid) == lower && skip-- == 0) return key;
  }
}

template <typename T>
T decode_only(const Body& body) {
  wire::BodyReader in(body);
  T v;
  REQUIRE(in.get(&v));
  REQUIRE(in.at_end());
  return v;
}

struct ReadResult {
  uint64_t version = 0;
  std::string value;
};
ReadResult decode_read(const Body& body) {
  wire::BodyReader in(body);
  wire::ReadResponse r;
  std::string_view value;
  REQUIRE(in.get(&r));
  REQUIRE(in.get_string(r.value_bytes, &value));
  REQUIRE(in.at_end());
  return {r.version, std::string(value)};
}

// Per-item statuses (and versions, for write/remove; read values are skipped but checked).
struct MultiItem {
  Status status = Status::kOk;
  uint64_t version = 0;
  std::string value;
};
std::vector<MultiItem> decode_multi(const Body& body, Opcode op, size_t count) {
  wire::BodyReader in(body);
  std::vector<MultiItem> items(count);
  for (auto& item : items) {
    uint16_t status = 0;
    REQUIRE(in.get(&status));
    item.status = static_cast<Status>(status);
    if (item.status != Status::kOk) continue;
    if (op == Opcode::kMultiRead) {
      wire::ReadResponse r;
      std::string_view value;
      REQUIRE(in.get(&r));
      REQUIRE(in.get_string(r.value_bytes, &value));
      item.version = r.version;
      item.value = std::string(value);
    } else {
      wire::VersionResponse r;
      REQUIRE(in.get(&r));
      item.version = r.version;
    }
  }
  REQUIRE(in.at_end());
  return items;
}

uint64_t write_ok(MasterService& m, std::string_view key, std::string_view value,
                  uint64_t table_id = kTable) {
  auto r = call(m, Opcode::kWrite, write_body(table_id, key, value));
  REQUIRE(r.status == Status::kOk);
  return decode_only<wire::VersionResponse>(r.body).version;
}

// ---- Single-object operations ------------------------------------------------------------

TEST_CASE("master service: write, read, increment and remove work end to end",
          "[master][master_service]") {
  auto m = service_owning_table();
  uint64_t v1 = write_ok(*m, "alpha", "one");
  CHECK(v1 > 0);

  auto read = call(*m, Opcode::kRead, read_body(kTable, "alpha"));
  REQUIRE(read.status == Status::kOk);
  ReadResult got = decode_read(read.body);
  CHECK(got.version == v1);
  CHECK(got.value == "one");

  auto inc = call(*m, Opcode::kIncrement, increment_body(kTable, "counter", 5));
  REQUIRE(inc.status == Status::kOk);
  CHECK(decode_only<wire::IncrementResponse>(inc.body).value == 5);
  inc = call(*m, Opcode::kIncrement, increment_body(kTable, "counter", -8));
  REQUIRE(inc.status == Status::kOk);
  auto incremented = decode_only<wire::IncrementResponse>(inc.body);
  CHECK(incremented.value == -3);
  CHECK(incremented.version > v1);

  auto removed = call(*m, Opcode::kRemove, remove_body(kTable, "alpha"));
  REQUIRE(removed.status == Status::kOk);
  CHECK(decode_only<wire::VersionResponse>(removed.body).version == v1);
  read = call(*m, Opcode::kRead, read_body(kTable, "alpha"));
  CHECK(read.status == Status::kObjectNotFound);
  CHECK(read.body.empty());

  // Removing what is not there answers version 0, not an error.
  removed = call(*m, Opcode::kRemove, remove_body(kTable, "alpha"));
  REQUIRE(removed.status == Status::kOk);
  CHECK(decode_only<wire::VersionResponse>(removed.body).version == 0);
}

TEST_CASE("master service: reject rules travel with every single-object request",
          "[master][master_service]") {
  auto m = service_owning_table();
  uint64_t v = write_ok(*m, "k", "v");

  auto r = call(*m, Opcode::kWrite, write_body(kTable, "k", "w", {.exists = 1}));
  CHECK(r.status == Status::kObjectExists);
  CHECK(r.body.empty());
  r = call(*m, Opcode::kWrite,
           write_body(kTable, "k", "w", {.version_ne_given = 1, .given_version = v + 1}));
  CHECK(r.status == Status::kWrongVersion);
  r = call(*m, Opcode::kWrite,
           write_body(kTable, "k", "w", {.version_ne_given = 1, .given_version = v}));
  CHECK(r.status == Status::kOk);

  r = call(*m, Opcode::kRead, read_body(kTable, "k", {.version_le_given = 1, .given_version = v}));
  CHECK(r.status == Status::kOk);  // the version is now above v
  r = call(*m, Opcode::kRead, read_body(kTable, "missing", {.doesnt_exist = 1}));
  CHECK(r.status == Status::kObjectNotFound);
  r = call(*m, Opcode::kRemove, remove_body(kTable, "missing", {.doesnt_exist = 1}));
  CHECK(r.status == Status::kObjectNotFound);
  r = call(*m, Opcode::kIncrement, increment_body(kTable, "k", 1, {.exists = 1}));
  CHECK(r.status == Status::kObjectExists);
  // "k" holds a 1-byte value: not a counter.
  r = call(*m, Opcode::kIncrement, increment_body(kTable, "k", 1));
  CHECK(r.status == Status::kInvalidObject);
}

TEST_CASE("master service: a key outside every owned tablet gets unknown tablet",
          "[master][master_service]") {
  auto m = make_service();
  for (Opcode op : {Opcode::kRead, Opcode::kRemove}) {
    CHECK(call(*m, op, read_body(kTable, "a")).status == Status::kUnknownTablet);
  }
  CHECK(call(*m, Opcode::kWrite, write_body(kTable, "a", "b")).status == Status::kUnknownTablet);
  CHECK(call(*m, Opcode::kIncrement, increment_body(kTable, "a", 1)).status ==
        Status::kUnknownTablet);

  take(*m, {tablet(kTable, 0, kMid)});
  std::string lower = key_in_half(kTable, true);
  std::string upper = key_in_half(kTable, false);
  CHECK(call(*m, Opcode::kWrite, write_body(kTable, lower, "x")).status == Status::kOk);
  auto r = call(*m, Opcode::kWrite, write_body(kTable, upper, "x"));
  CHECK(r.status == Status::kUnknownTablet);
  CHECK(r.body.empty());
  CHECK(call(*m, Opcode::kRead, read_body(kTable, upper)).status == Status::kUnknownTablet);
  // The same key in another table is another hash and another tablet.
  CHECK(call(*m, Opcode::kRead, read_body(kTable + 1, lower)).status == Status::kUnknownTablet);
}

TEST_CASE("master service: an oversized key or value gets its own status",
          "[master][master_service]") {
  auto m = service_owning_table();
  std::string big_key(m->objects().config().max_key_bytes + 1, 'k');
  std::string big_value(m->objects().config().max_value_bytes + 1, 'v');
  CHECK(call(*m, Opcode::kWrite, write_body(kTable, "k", big_value)).status ==
        Status::kValueTooLarge);
  CHECK(call(*m, Opcode::kWrite, write_body(kTable, big_key, "v")).status == Status::kKeyTooLarge);
}

// ---- Tablets -----------------------------------------------------------------------------

TEST_CASE("master service: taking a tablet twice is harmless", "[master][master_service]") {
  auto m = make_service();
  take(*m, {tablet(kTable, 0, kMid), tablet(kTable, 0, kMid)});
  take(*m, {tablet(kTable, 0, kMid)});
  CHECK(m->tablets().range_count() == 1);
  take(*m, {tablet(kTable, kMid + 1, UINT64_MAX)});
  CHECK(m->tablets().covers(kTable, {0, UINT64_MAX}));
}

TEST_CASE("master service: dropping a tablet forgets it and removes its objects",
          "[master][master_service]") {
  auto m = make_service();
  take(*m, {tablet(kTable, 0, kMid), tablet(kTable, kMid + 1, UINT64_MAX)});
  for (int i = 0; i < 40; ++i) write_ok(*m, "key-" + std::to_string(i), "v");
  uint64_t upper_count = 0;
  for (int i = 0; i < 40; ++i) upper_count += key_hash(kTable, "key-" + std::to_string(i)) > kMid;
  REQUIRE(upper_count > 0);
  REQUIRE(upper_count < 40);

  REQUIRE(
      call(*m, Opcode::kDropTablets, tablets_body({tablet(kTable, kMid + 1, UINT64_MAX)})).status ==
      Status::kOk);
  CHECK(m->objects().stats().object_count == 40 - upper_count);
  std::string upper = key_in_half(kTable, false);
  std::string lower = key_in_half(kTable, true);
  CHECK(call(*m, Opcode::kRead, read_body(kTable, upper)).status == Status::kUnknownTablet);
  CHECK(call(*m, Opcode::kRead, read_body(kTable, lower)).status == Status::kOk);

  // Taken back, the tablet is empty: its objects went with the drop.
  take(*m, {tablet(kTable, kMid + 1, UINT64_MAX)});
  CHECK(call(*m, Opcode::kRead, read_body(kTable, upper)).status == Status::kObjectNotFound);
  // A drop of what is not owned is accepted (the coordinator may resend it).
  CHECK(call(*m, Opcode::kDropTablets, tablets_body({tablet(kTable + 5, 0, 10)})).status ==
        Status::kOk);
}

TEST_CASE(
    "master service: with a dropper, a drop answers at once and empties the range "
    "a piece at a time, and taking it back empties it first",
    "[master][master_service]") {
  auto m = make_service();
  TabletDropper dropper(m->objects(), {.objects_per_run = 1});
  m->set_dropper(&dropper);
  take(*m, {tablet(kTable, 0, kMid), tablet(kTable, kMid + 1, UINT64_MAX)});
  take(*m, {tablet(kTable + 1, 0, UINT64_MAX)});
  constexpr int kKeys = 2000;
  uint64_t upper_count = 0;
  for (int i = 0; i < kKeys; ++i) {
    const std::string key = "key-" + std::to_string(i);
    write_ok(*m, key, "v");
    upper_count += key_hash(kTable, key) > kMid;
  }
  REQUIRE(upper_count > 600);  // more than a few of enumerate's batches
  REQUIRE(call(*m, Opcode::kWrite, write_body(kTable + 1, "other", "v")).status == Status::kOk);

  // Dropped: not owned at once, nothing removed yet.
  REQUIRE(
      call(*m, Opcode::kDropTablets, tablets_body({tablet(kTable, kMid + 1, UINT64_MAX)})).status ==
      Status::kOk);
  CHECK(dropper.pending() == 1);
  CHECK(m->objects().stats().object_count == kKeys + 1);
  const std::string upper = key_in_half(kTable, false);
  CHECK(call(*m, Opcode::kRead, read_body(kTable, upper)).status == Status::kUnknownTablet);

  // One pass of the loop removes a piece and asks to be called again at once.
  CHECK(dropper.run() == 0);
  const uint64_t after_one = m->objects().stats().object_count;
  CHECK(after_one < kKeys + 1);
  CHECK(after_one > kKeys + 1 - upper_count);

  // Taken back before the loop got to the rest: the rest goes first, and only it.
  take(*m, {tablet(kTable, kMid + 1, UINT64_MAX)});
  CHECK(dropper.pending() == 0);
  CHECK(dropper.objects_removed() == upper_count);
  CHECK(m->objects().stats().object_count == kKeys + 1 - upper_count);
  CHECK(call(*m, Opcode::kRead, read_body(kTable, upper)).status == Status::kObjectNotFound);
  CHECK(call(*m, Opcode::kRead, read_body(kTable, key_in_half(kTable, true))).status ==
        Status::kOk);
  CHECK(call(*m, Opcode::kRead, read_body(kTable + 1, "other")).status == Status::kOk);
  CHECK(dropper.run() == UINT64_MAX);  // nothing left: the loop may sleep

  // Dropped again and left to the loop: it empties the range in passes, the other table's
  // object stays.
  REQUIRE(call(*m, Opcode::kDropTablets, tablets_body({tablet(kTable, 0, UINT64_MAX)})).status ==
          Status::kOk);
  int passes = 0;
  while (dropper.run() != UINT64_MAX && passes < 100'000) ++passes;
  CHECK(passes >= 2);
  CHECK(passes < 100'000);
  CHECK(dropper.pending() == 0);
  CHECK(m->objects().stats().object_count == 1);
  CHECK(call(*m, Opcode::kRead, read_body(kTable + 1, "other")).status == Status::kOk);

  // A table of one object: a pass walks a bounded number of buckets, not the whole table
  // looking for objects to remove.
  REQUIRE(
      call(*m, Opcode::kDropTablets, tablets_body({tablet(kTable + 1, 0, UINT64_MAX)})).status ==
      Status::kOk);
  passes = 0;
  while (dropper.run() != UINT64_MAX && passes < 100'000) ++passes;
  CHECK(passes >= static_cast<int>(m->objects().end_cursor() / 16) - 1);
  CHECK(m->objects().stats().object_count == 0);
}

TEST_CASE("master service: a tablet list with a bad tablet changes nothing",
          "[master][master_service]") {
  auto m = make_service();
  auto r =
      call(*m, Opcode::kTakeTablets, tablets_body({tablet(kTable, 0, 10), tablet(kTable, 20, 19)}));
  CHECK(r.status == Status::kBadRequest);
  CHECK(call(*m, Opcode::kTakeTablets, tablets_body({tablet(0, 0, 10)})).status ==
        Status::kBadRequest);
  CHECK(m->tablets().range_count() == 0);
}

TEST_CASE("master service: tablets named for another server are neither taken nor dropped",
          "[master][master_service]") {
  auto m = make_service();
  REQUIRE(m->objects().log().set_master_id(7) == Status::kOk);
  auto mine = tablet(kTable, 0, 100);
  mine.server_id = 7;
  take(*m, {mine});
  REQUIRE(m->tablets().range_count() == 1);
  // Orders meant for a server that had this locator before: refused whole.
  auto other = tablet(kTable + 1, 0, 100);
  other.server_id = 3;
  CHECK(call(*m, Opcode::kTakeTablets, tablets_body({mine, other})).status == Status::kBadRequest);
  auto mine_as_other = mine;
  mine_as_other.server_id = 3;
  CHECK(call(*m, Opcode::kDropTablets, tablets_body({mine_as_other})).status ==
        Status::kBadRequest);
  CHECK(m->tablets().range_count() == 1);
  CHECK(call(*m, Opcode::kDropTablets, tablets_body({mine})).status == Status::kOk);
  CHECK(m->tablets().range_count() == 0);
}

// ---- Multi-operations --------------------------------------------------------------------

TEST_CASE("master service: multi operations answer each item with its own status",
          "[master][master_service]") {
  auto m = make_service();
  take(*m, {tablet(kTable, 0, kMid)});
  std::string a = key_in_half(kTable, true, 0);
  std::string b = key_in_half(kTable, true, 1);
  std::string outside = key_in_half(kTable, false);
  uint64_t va = write_ok(*m, a, "old");

  auto w = call(*m, Opcode::kMultiWrite,
                multi_body({write_body(kTable, a, "new"), write_body(kTable, b, "bee"),
                            write_body(kTable, outside, "x"),
                            write_body(kTable, a, "never", {.exists = 1})}));
  REQUIRE(w.status == Status::kOk);
  auto wi = decode_multi(w.body, Opcode::kMultiWrite, 4);
  CHECK(wi[0].status == Status::kOk);
  CHECK(wi[0].version > va);
  CHECK(wi[1].status == Status::kOk);
  CHECK(wi[2].status == Status::kUnknownTablet);
  CHECK(wi[3].status == Status::kObjectExists);

  auto r = call(*m, Opcode::kMultiRead,
                multi_body({read_body(kTable, a), read_body(kTable, "nope"),
                            read_body(kTable, outside), read_body(kTable, b)}));
  REQUIRE(r.status == Status::kOk);
  auto ri = decode_multi(r.body, Opcode::kMultiRead, 4);
  CHECK(ri[0].status == Status::kOk);
  CHECK(ri[0].value == "new");
  CHECK(ri[0].version == wi[0].version);
  CHECK((ri[1].status == Status::kObjectNotFound || ri[1].status == Status::kUnknownTablet));
  CHECK(ri[2].status == Status::kUnknownTablet);
  CHECK(ri[3].value == "bee");

  auto d = call(*m, Opcode::kMultiRemove,
                multi_body({remove_body(kTable, a), remove_body(kTable, outside),
                            remove_body(kTable, b, {.version_ne_given = 1, .given_version = 1})}));
  REQUIRE(d.status == Status::kOk);
  auto di = decode_multi(d.body, Opcode::kMultiRemove, 3);
  CHECK(di[0].status == Status::kOk);
  CHECK(di[0].version == wi[0].version);
  CHECK(di[1].status == Status::kUnknownTablet);
  CHECK(di[2].status == Status::kWrongVersion);
  CHECK(call(*m, Opcode::kRead, read_body(kTable, b)).status == Status::kOk);
}

TEST_CASE("master service: a multi operation with no items or too many items",
          "[master][master_service]") {
  auto m = service_owning_table();
  auto r = call(*m, Opcode::kMultiRead, multi_body({}));
  CHECK(r.status == Status::kOk);
  CHECK(r.body.empty());
  std::vector<Body> items(wire::kMaxMultiCount + 1, read_body(kTable, "k"));
  CHECK(call(*m, Opcode::kMultiRead, multi_body(items)).status == Status::kBadRequest);
  items.pop_back();
  r = call(*m, Opcode::kMultiRead, multi_body(items));
  REQUIRE(r.status == Status::kOk);
  CHECK(decode_multi(r.body, Opcode::kMultiRead, items.size()).back().status ==
        Status::kObjectNotFound);
}

TEST_CASE("master service: a malformed item fails the whole multi write before any change",
          "[master][master_service]") {
  auto m = service_owning_table();
  Body bad = write_body(kTable, "second", "v");
  bad.pop_back();  // the second item's value is one byte short
  auto r = call(*m, Opcode::kMultiWrite, multi_body({write_body(kTable, "first", "v"), bad}));
  CHECK(r.status == Status::kBadRequest);
  CHECK(call(*m, Opcode::kRead, read_body(kTable, "first")).status == Status::kObjectNotFound);
}

MasterConfig big_value_config() {
  MasterConfig c;
  c.memory_bytes = 48u << 20;
  c.segment_bytes = 4u << 20;
  c.seglet_bytes = 64u << 10;
  c.cleaner_thread = false;
  c.prefault_memory = false;
  return c;
}

TEST_CASE("master service: a multi read answers retry for items past the reply size limit",
          "[master][master_service]") {
  auto m = make_service(big_value_config());
  take(*m, {tablet(kTable, 0, UINT64_MAX)});
  std::string value(m->objects().config().max_value_bytes, 'x');
  write_ok(*m, "big", value);
  std::vector<Body> items(20, read_body(kTable, "big"));
  auto r = call(*m, Opcode::kMultiRead, multi_body(items));
  REQUIRE(r.status == Status::kOk);
  CHECK(r.body.size() <= wire::kMaxBodyBytes);
  auto got = decode_multi(r.body, Opcode::kMultiRead, items.size());
  size_t first_retry = 0;
  while (first_retry < got.size() && got[first_retry].status == Status::kOk) ++first_retry;
  CHECK(first_retry > 10);
  CHECK(first_retry < got.size());
  for (size_t i = first_retry; i < got.size(); ++i) CHECK(got[i].status == Status::kRetry);
}

// ---- Enumerate ---------------------------------------------------------------------------

struct Enumerated {
  std::map<std::string, uint64_t> versions;  // key -> version
  size_t batches = 0;
  size_t duplicates = 0;
};

Enumerated enumerate_all(MasterService& m, uint64_t table_id, uint64_t start, uint64_t end,
                         uint32_t max_objects) {
  Enumerated e;
  uint64_t cursor = 0;
  while (cursor != wire::kEnumerateDone) {
    auto r = call(m, Opcode::kEnumerate, enumerate_body(table_id, start, end, cursor, max_objects));
    REQUIRE(r.status == Status::kOk);
    REQUIRE(r.body.size() <= wire::kMaxBodyBytes);
    wire::BodyReader in(r.body);
    wire::EnumerateResponse head;
    REQUIRE(in.get(&head));
    for (uint32_t i = 0; i < head.count; ++i) {
      wire::EnumeratedObject o;
      std::string_view key, value;
      REQUIRE(in.get(&o));
      REQUIRE(in.get_string(o.key_bytes, &key));
      REQUIRE(in.get_string(o.value_bytes, &value));
      uint64_t h = key_hash(table_id, key);
      CHECK(h >= start);
      CHECK(h <= end);
      if (!e.versions.emplace(std::string(key), o.version).second) ++e.duplicates;
    }
    REQUIRE(in.at_end());
    REQUIRE(head.next_cursor != cursor);
    cursor = head.next_cursor;
    ++e.batches;
    REQUIRE(e.batches < 100'000);
  }
  return e;
}

TEST_CASE("master service: enumerate over a tablet in batches returns every object once",
          "[master][master_service]") {
  auto m = make_service();
  take(*m, {tablet(kTable, 0, kMid), tablet(kTable, kMid + 1, UINT64_MAX),
            tablet(kTable + 1, 0, UINT64_MAX)});
  std::map<std::string, uint64_t> written;
  for (int i = 0; i < 600; ++i) {
    std::string key = "obj-" + std::to_string(i);
    written[key] = write_ok(*m, key, "value-" + std::to_string(i));
    write_ok(*m, key, "other table", kTable + 1);  // must not show up
  }
  Enumerated lower = enumerate_all(*m, kTable, 0, kMid, 7);
  Enumerated upper = enumerate_all(*m, kTable, kMid + 1, UINT64_MAX, 50);
  CHECK(lower.duplicates == 0);
  CHECK(upper.duplicates == 0);
  CHECK(lower.batches > 10);
  std::map<std::string, uint64_t> all = lower.versions;
  all.insert(upper.versions.begin(), upper.versions.end());
  CHECK(all.size() == lower.versions.size() + upper.versions.size());
  CHECK(all == written);
  // The whole table in one range, with the server's cap on the batch size.
  Enumerated whole = enumerate_all(*m, kTable, 0, UINT64_MAX, 100'000);
  CHECK(whole.versions == written);
}

TEST_CASE("master service: enumerate checks the tablet and the cursor",
          "[master][master_service]") {
  auto m = make_service();
  take(*m, {tablet(kTable, 0, kMid)});
  CHECK(call(*m, Opcode::kEnumerate, enumerate_body(kTable, 0, UINT64_MAX, 0, 10)).status ==
        Status::kUnknownTablet);
  CHECK(call(*m, Opcode::kEnumerate, enumerate_body(kTable + 1, 0, kMid, 0, 10)).status ==
        Status::kUnknownTablet);
  CHECK(call(*m, Opcode::kEnumerate, enumerate_body(kTable, 10, 5, 0, 10)).status ==
        Status::kBadRequest);
  CHECK(call(*m, Opcode::kEnumerate, enumerate_body(kTable, 0, kMid, UINT64_MAX - 1, 10)).status ==
        Status::kBadRequest);
  auto done =
      call(*m, Opcode::kEnumerate, enumerate_body(kTable, 0, kMid, wire::kEnumerateDone, 10));
  REQUIRE(done.status == Status::kOk);
  auto head = decode_only<wire::EnumerateResponse>(done.body);
  CHECK(head.next_cursor == wire::kEnumerateDone);
  CHECK(head.count == 0);
  // An empty tablet ends in one call.
  CHECK(enumerate_all(*m, kTable, 0, kMid, 10).batches == 1);
}

TEST_CASE("master service: enumerate keeps each reply under the body limit with big values",
          "[master][master_service]") {
  auto m = make_service(big_value_config());
  take(*m, {tablet(kTable, 0, UINT64_MAX)});
  std::string value(m->objects().config().max_value_bytes, 'x');
  for (int i = 0; i < 24; ++i) write_ok(*m, "big-" + std::to_string(i), value);
  Enumerated e = enumerate_all(*m, kTable, 0, UINT64_MAX, 1000);
  CHECK(e.versions.size() == 24);
  CHECK(e.batches > 1);
}

// ---- Stats, echo, server list ------------------------------------------------------------

TEST_CASE("master service: server stats are name value lines", "[master][master_service]") {
  auto m = service_owning_table();
  write_ok(*m, "a", "b");
  write_ok(*m, "c", "d");
  auto r = call(*m, Opcode::kGetServerStats, {});
  REQUIRE(r.status == Status::kOk);
  std::string text(reinterpret_cast<const char*>(r.body.data()), r.body.size());
  CHECK(text.find("object_count 2\n") != std::string::npos);
  CHECK(text.find("log_memory_bytes ") != std::string::npos);
  CHECK(text.back() == '\n');
  Body junk(1, std::byte{0});
  CHECK(call(*m, Opcode::kGetServerStats, junk).status == Status::kBadRequest);
}

TEST_CASE("master service: echo returns the body and server list updates are accepted",
          "[master][master_service]") {
  auto m = make_service();
  Body body;
  wire::BodyWriter(&body).put_bytes(std::string_view("ping pong"));
  auto r = call(*m, Opcode::kEcho, body);
  CHECK(r.status == Status::kOk);
  CHECK(r.body == body);
  CHECK(call(*m, Opcode::kEcho, {}).body.empty());
  // A server list update is checked whole: "ping pong" is not one, an empty list is.
  CHECK(call(*m, Opcode::kServerListUpdate, body).status == Status::kBadRequest);
  Body list;
  wire::BodyWriter(&list).put(wire::ServerListHeader{.version = 3, .count = 0});
  CHECK(call(*m, Opcode::kServerListUpdate, list).status == Status::kOk);
}

TEST_CASE("master service: coordinator opcodes and unknown opcodes are bad requests",
          "[master][master_service]") {
  auto m = make_service();
  for (int op : {10, 11, 12, 13, 14, 15, 0, 29, 42, 9999}) {
    CHECK(call(*m, static_cast<Opcode>(static_cast<uint16_t>(op)), {}).status ==
          Status::kBadRequest);
  }
}

// ---- Malformed bodies --------------------------------------------------------------------

// A valid body for every opcode whose body is checked strictly.
std::vector<std::pair<Opcode, Body>> valid_bodies() {
  return {
      {Opcode::kRead, read_body(kTable, "key")},
      {Opcode::kWrite, write_body(kTable, "key", "value")},
      {Opcode::kRemove, remove_body(kTable, "key")},
      {Opcode::kIncrement, increment_body(kTable, "ctr", 1)},
      {Opcode::kMultiRead, multi_body({read_body(kTable, "a"), read_body(kTable, "bb")})},
      {Opcode::kMultiWrite,
       multi_body({write_body(kTable, "a", "1"), write_body(kTable, "b", "")})},
      {Opcode::kMultiRemove, multi_body({remove_body(kTable, "a"), remove_body(kTable, "b")})},
      {Opcode::kEnumerate, enumerate_body(kTable, 0, UINT64_MAX, 0, 10)},
      {Opcode::kTakeTablets, tablets_body({tablet(kTable, 0, UINT64_MAX)})},
      {Opcode::kDropTablets, tablets_body({tablet(kTable + 9, 0, UINT64_MAX)})},
  };
}

TEST_CASE("master service: truncated bodies and trailing bytes are bad requests",
          "[master][master_service]") {
  auto m = service_owning_table();
  for (const auto& [op, body] : valid_bodies()) {
    INFO("opcode " << wire::opcode_name(op));
    REQUIRE(call(*m, op, body).status != Status::kBadRequest);
    for (size_t n = 0; n < body.size(); ++n) {
      INFO("truncated to " << n << " bytes");
      CHECK(call(*m, op, std::span(body).first(n)).status == Status::kBadRequest);
    }
    Body longer = body;
    longer.push_back(std::byte{0});
    CHECK(call(*m, op, longer).status == Status::kBadRequest);
  }
}

// Overwrites the u32 at `offset` of a body.
Body with_u32(Body body, size_t offset, uint32_t v) {
  std::memcpy(body.data() + offset, &v, sizeof(v));
  return body;
}

TEST_CASE("master service: lengths that point beyond the body are bad requests",
          "[master][master_service]") {
  auto m = service_owning_table();
  const size_t key_at = offsetof(wire::ReadRequest, key_bytes);
  const size_t wkey_at = offsetof(wire::WriteRequest, key_bytes);
  const size_t wvalue_at = offsetof(wire::WriteRequest, value_bytes);
  const size_t ikey_at = offsetof(wire::IncrementRequest, key_bytes);
  for (uint32_t lie : {4u, 1000u, 0x7fffffffu, UINT32_MAX}) {
    INFO("announced length " << lie);
    CHECK(call(*m, Opcode::kRead, with_u32(read_body(kTable, "key"), key_at, lie)).status ==
          Status::kBadRequest);
    CHECK(call(*m, Opcode::kRemove, with_u32(read_body(kTable, "key"), key_at, lie)).status ==
          Status::kBadRequest);
    CHECK(call(*m, Opcode::kWrite, with_u32(write_body(kTable, "key", "v"), wkey_at, lie)).status ==
          Status::kBadRequest);
    CHECK(
        call(*m, Opcode::kWrite, with_u32(write_body(kTable, "key", "v"), wvalue_at, lie)).status ==
        Status::kBadRequest);
    CHECK(call(*m, Opcode::kIncrement, with_u32(increment_body(kTable, "k", 1), ikey_at, lie))
              .status == Status::kBadRequest);
    Body multi = multi_body({read_body(kTable, "a"), read_body(kTable, "b")});
    CHECK(call(*m, Opcode::kMultiRead, with_u32(multi, 0, lie)).status == Status::kBadRequest);
    CHECK(call(*m, Opcode::kMultiRead, with_u32(multi, sizeof(wire::MultiHeader) + key_at, lie))
              .status == Status::kBadRequest);
    CHECK(call(*m, Opcode::kTakeTablets, with_u32(tablets_body({tablet(kTable, 0, 1)}), 0, lie))
              .status == Status::kBadRequest);
  }
  CHECK(m->objects().stats().object_count == 0);
}

TEST_CASE("master service: random bytes for every opcode are bad requests and never crash",
          "[master][master_service]") {
  auto m = service_owning_table();
  uint64_t v = write_ok(*m, "survivor", "intact");
  Random rng(20240611);
  const auto bodies = valid_bodies();
  for (int round = 0; round < 3000; ++round) {
    const auto& [op, valid] = bodies[rng.uniform(bodies.size())];
    Body body(rng.uniform(160));
    // Half the bodies start from a valid one with random damage, so decoding gets deep.
    if (rng.uniform(2) == 0) {
      body = valid;
      body.resize(rng.uniform(valid.size() + 8));
      for (int flips = 0; flips < 3 && !body.empty(); ++flips) {
        body[rng.uniform(body.size())] = static_cast<std::byte>(rng.next());
      }
      if (body.size() == valid.size()) continue;  // damaged in place may still be valid
    } else {
      for (auto& b : body) b = static_cast<std::byte>(rng.next());
      // An enumerate body is fixed-size: 36 random bytes can be a valid request.
      if (op == Opcode::kEnumerate && body.size() == sizeof(wire::EnumerateRequest)) continue;
    }
    INFO("round " << round << " opcode " << wire::opcode_name(op) << " bytes " << body.size());
    CHECK(call(*m, op, body).status == Status::kBadRequest);
  }
  // Random bytes to the opcodes that take any body are answered, not crashed on.
  for (int round = 0; round < 200; ++round) {
    Body body(rng.uniform(64));
    for (auto& b : body) b = static_cast<std::byte>(rng.next());
    CHECK(call(*m, Opcode::kEcho, body).body == body);
    auto st = call(*m, Opcode::kServerListUpdate, body).status;
    CHECK((st == Status::kBadRequest || st == Status::kOk));
  }
  auto r = call(*m, Opcode::kRead, read_body(kTable, "survivor"));
  REQUIRE(r.status == Status::kOk);
  CHECK(decode_read(r.body).version == v);
  CHECK(decode_read(r.body).value == "intact");
}

TEST_CASE("master service: without replication no backup's replica is needed",
          "[master][master_service]") {
  auto m = service_owning_table();
  write_ok(*m, "k", "v");
  auto ask = [&](uint32_t count, size_t ids) {
    Body b;
    wire::BodyWriter w(&b);
    w.put(wire::ReplicaNeededHeader{.backup_id = 42, .count = count});
    for (size_t i = 0; i < ids; ++i) w.put(uint64_t{i + 1});
    return call(*m, Opcode::kIsReplicaNeeded, b);
  };
  auto r = ask(3, 3);
  REQUIRE(r.status == Status::kOk);
  CHECK(r.body == Body(3, std::byte{0}));
  CHECK(ask(0, 0).body.empty());
  // A count that lies about the ids that follow, or too many ids.
  CHECK(ask(3, 2).status == Status::kBadRequest);
  CHECK(ask(2, 3).status == Status::kBadRequest);
  CHECK(ask(wire::kMaxReplicaNeededCount + 1, 0).status == Status::kBadRequest);
}

TEST_CASE("master service: a fenced master answers every request but echo with fenced",
          "[master][master_service]") {
  auto m = service_owning_table();
  const uint64_t v = write_ok(*m, "before", "kept");
  CHECK_FALSE(m->fenced());
  m->fence();
  m->fence();  // idempotent
  CHECK(m->fenced());
  for (const auto& [op, body] : valid_bodies()) {
    INFO(wire::opcode_name(op));
    auto r = call(*m, op, body);
    CHECK(r.status == Status::kFenced);
    CHECK(r.body.empty());
  }
  Body list;
  wire::BodyWriter(&list).put(wire::ServerListHeader{.version = 3, .count = 0});
  CHECK(call(*m, Opcode::kServerListUpdate, list).status == Status::kFenced);
  CHECK(call(*m, Opcode::kGetServerStats, {}).status == Status::kFenced);
  // Echo still answers: the process is alive, only its data is no longer its own.
  Body ping;
  wire::BodyWriter(&ping).put_bytes(std::string_view("ping"));
  auto echo = call(*m, Opcode::kEcho, ping);
  CHECK(echo.status == Status::kOk);
  CHECK(echo.body == ping);
  // Nothing changed underneath: the object written before is still there, unserved.
  std::string value;
  auto read = m->objects().read(kTable, "before", &value);
  REQUIRE(read.ok());
  CHECK(*read == v);
  CHECK(value == "kept");
  CHECK(m->objects().stats().object_count == 1);
}

}  // namespace
}  // namespace ramkv::master

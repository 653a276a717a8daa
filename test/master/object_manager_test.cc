// Tests for master/object_manager.h: the operations of the client API on one master,
// their reject rules, size limits, statistics, enumeration, and behaviour when memory is
// full and when several threads share keys while the cleaner runs.
#include "master/object_manager.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/segment_iterator.h"
#include "test/master/object_manager_helpers.h"

namespace ramkv::master {
namespace {

using namespace ramkv::master::testing;

}  // namespace

TEST_CASE("object manager: a written object reads back with its value and version",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  auto v = om->write(1, "key", "value");
  REQUIRE(v.ok());
  CHECK(*v > 0);
  std::string value;
  auto r = om->read(1, "key", &value);
  REQUIRE(r.ok());
  CHECK(*r == *v);
  CHECK(value == "value");

  auto v2 = om->write(1, "key", "other");
  REQUIRE(v2.ok());
  CHECK(*v2 > *v);
  REQUIRE(om->read(1, "key", &value).ok());
  CHECK(value == "other");
}

TEST_CASE("object manager: reading a missing object is object not found",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  std::string value = "untouched";
  CHECK(om->read(1, "nope", &value).status() == Status::kObjectNotFound);
  CHECK(value == "untouched");
}

TEST_CASE("object manager: a removed object is gone and remove returns its version",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  auto v = om->write(1, "key", "value");
  REQUIRE(v.ok());
  auto removed = om->remove(1, "key");
  REQUIRE(removed.ok());
  CHECK(*removed == *v);
  std::string value;
  CHECK(om->read(1, "key", &value).status() == Status::kObjectNotFound);
  // Removing it again is not an error and reports no version.
  auto again = om->remove(1, "key");
  REQUIRE(again.ok());
  CHECK(*again == 0);
}

TEST_CASE("object manager: increment adds to an 8-byte value and creates a missing one",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  auto created = om->increment(1, "counter", 5);
  REQUIRE(created.ok());
  CHECK(created->value == 5);
  auto next = om->increment(1, "counter", -8);
  REQUIRE(next.ok());
  CHECK(next->value == -3);
  CHECK(next->version > created->version);
  std::string value;
  auto r = om->read(1, "counter", &value);
  REQUIRE(r.ok());
  CHECK(*r == next->version);
  CHECK(value == int_value(-3));

  // A value written by write() that happens to be 8 bytes is a counter too.
  REQUIRE(om->write(1, "written", int_value(40)).ok());
  auto inc = om->increment(1, "written", 2);
  REQUIRE(inc.ok());
  CHECK(inc->value == 42);
}

TEST_CASE("object manager: increment wraps around like two's complement",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  REQUIRE(om->write(1, "c", int_value(INT64_MAX)).ok());
  auto inc = om->increment(1, "c", 1);
  REQUIRE(inc.ok());
  CHECK(inc->value == INT64_MIN);
}

TEST_CASE(
    "object manager: increment of a value that is not 8 bytes is invalid object and "
    "changes nothing",
    "[master][object_manager]") {
  auto om = make(small_config(false));
  for (std::string bad : {std::string(), std::string(7, 'x'), std::string(9, 'x')}) {
    INFO("value of " << bad.size() << " bytes");
    auto v = om->write(1, "k", bad);
    REQUIRE(v.ok());
    CHECK(om->increment(1, "k", 1).status() == Status::kInvalidObject);
    std::string value;
    auto r = om->read(1, "k", &value);
    REQUIRE(r.ok());
    CHECK(*r == *v);
    CHECK(value == bad);
  }
}

TEST_CASE("object manager: read rejects by its rules and returns nothing then",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  std::string value = "untouched";
  auto missing_rules = doesnt_exist();
  CHECK(om->read(1, "k", &value, &missing_rules).status() == Status::kObjectNotFound);
  auto v = om->write(1, "k", "v");
  REQUIRE(v.ok());

  auto e = exists();
  CHECK(om->read(1, "k", &value, &e).status() == Status::kObjectExists);
  auto le_same = version_le(*v);
  CHECK(om->read(1, "k", &value, &le_same).status() == Status::kWrongVersion);
  auto le_above = version_le(*v + 1);
  CHECK(om->read(1, "k", &value, &le_above).status() == Status::kWrongVersion);
  auto ne = version_ne(*v + 1);
  CHECK(om->read(1, "k", &value, &ne).status() == Status::kWrongVersion);
  CHECK(value == "untouched");

  // The rules that hold let the read through.
  auto le_below = version_le(*v - 1);
  CHECK(om->read(1, "k", &value, &le_below).ok());
  auto eq = version_ne(*v);
  value.clear();
  CHECK(om->read(1, "k", &value, &eq).ok());
  CHECK(value == "v");
  CHECK(om->read(1, "k", &value, &missing_rules).ok());
}

TEST_CASE("object manager: a write rejected by its rules changes nothing",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  auto missing_rules = doesnt_exist();
  CHECK(om->write(1, "k", "new", &missing_rules).status() == Status::kObjectNotFound);
  std::string value;
  CHECK(om->read(1, "k", &value).status() == Status::kObjectNotFound);
  CHECK(om->stats().object_count == 0);

  auto v = om->write(1, "k", "first");
  REQUIRE(v.ok());
  auto before = om->stats();

  auto e = exists();
  auto le = version_le(*v);
  auto ne = version_ne(*v - 1);
  const RejectRules* rejecting[] = {&e, &le, &ne};
  CHECK(om->write(1, "k", "x", rejecting[0]).status() == Status::kObjectExists);
  CHECK(om->write(1, "k", "x", rejecting[1]).status() == Status::kWrongVersion);
  CHECK(om->write(1, "k", "x", rejecting[2]).status() == Status::kWrongVersion);

  auto r = om->read(1, "k", &value);
  REQUIRE(r.ok());
  CHECK(*r == *v);
  CHECK(value == "first");
  auto after = om->stats();
  CHECK(after.object_count == before.object_count);
  CHECK(after.user_bytes == before.user_bytes);
  CHECK(after.log.appended_bytes == before.log.appended_bytes);
  // A rejected write does not use up a version: the next write is the next one.
  auto next = om->write(1, "other", "y");
  REQUIRE(next.ok());
  CHECK(*next == *v + 1);

  // Compare-and-swap succeeds with the current version.
  auto cas = version_ne(*v);
  auto v2 = om->write(1, "k", "second", &cas);
  REQUIRE(v2.ok());
  CHECK(*v2 > *v);
  auto stale = version_ne(*v);
  CHECK(om->write(1, "k", "third", &stale).status() == Status::kWrongVersion);
  REQUIRE(om->read(1, "k", &value).ok());
  CHECK(value == "second");
  // exists on a missing key lets a create through.
  CHECK(om->write(1, "fresh", "f", &e).ok());
}

TEST_CASE("object manager: a remove rejected by its rules keeps the object",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  auto missing_rules = doesnt_exist();
  CHECK(om->remove(1, "k", &missing_rules).status() == Status::kObjectNotFound);
  auto v = om->write(1, "k", "value");
  REQUIRE(v.ok());
  auto before = om->stats();

  auto e = exists();
  CHECK(om->remove(1, "k", &e).status() == Status::kObjectExists);
  auto le = version_le(*v);
  CHECK(om->remove(1, "k", &le).status() == Status::kWrongVersion);
  auto ne = version_ne(*v + 1);
  CHECK(om->remove(1, "k", &ne).status() == Status::kWrongVersion);

  std::string value;
  auto r = om->read(1, "k", &value);
  REQUIRE(r.ok());
  CHECK(*r == *v);
  CHECK(value == "value");
  auto after = om->stats();
  CHECK(after.object_count == before.object_count);
  CHECK(after.log.appended_bytes == before.log.appended_bytes);

  auto ok_rules = version_ne(*v);
  auto removed = om->remove(1, "k", &ok_rules);
  REQUIRE(removed.ok());
  CHECK(*removed == *v);
  CHECK(om->read(1, "k", &value).status() == Status::kObjectNotFound);
}

TEST_CASE("object manager: an increment rejected by its rules changes nothing",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  auto missing_rules = doesnt_exist();
  CHECK(om->increment(1, "c", 1, &missing_rules).status() == Status::kObjectNotFound);
  std::string value;
  CHECK(om->read(1, "c", &value).status() == Status::kObjectNotFound);

  auto first = om->increment(1, "c", 10);
  REQUIRE(first.ok());
  auto e = exists();
  CHECK(om->increment(1, "c", 1, &e).status() == Status::kObjectExists);
  auto le = version_le(first->version);
  CHECK(om->increment(1, "c", 1, &le).status() == Status::kWrongVersion);
  auto ne = version_ne(first->version + 7);
  CHECK(om->increment(1, "c", 1, &ne).status() == Status::kWrongVersion);

  auto r = om->read(1, "c", &value);
  REQUIRE(r.ok());
  CHECK(*r == first->version);
  CHECK(value == int_value(10));

  auto ok_rules = version_ne(first->version);
  auto inc = om->increment(1, "c", 1, &ok_rules);
  REQUIRE(inc.ok());
  CHECK(inc->value == 11);
}

TEST_CASE("object manager: versions only grow across writes, removes and re-creates",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  uint64_t last = 0;
  for (int round = 0; round < 20; ++round) {
    auto w = om->write(7, "k", "v" + std::to_string(round));
    REQUIRE(w.ok());
    CHECK(*w > last);
    last = *w;
    auto inc_key = "n" + std::to_string(round);
    auto inc = om->increment(7, inc_key, 1);
    REQUIRE(inc.ok());
    CHECK(inc->version > last);
    last = inc->version;
    if (round % 2 == 0) {
      auto removed = om->remove(7, "k");
      REQUIRE(removed.ok());
      CHECK(*removed == *w);
    }
  }
}

TEST_CASE("object manager: a re-created object gets a higher version than the removed one",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  auto v1 = om->write(1, "k", "one");
  REQUIRE(v1.ok());
  REQUIRE(om->remove(1, "k").ok());
  // Conditional create of the removed key, as a client would do it.
  auto create_only = exists();
  auto v2 = om->write(1, "k", "two", &create_only);
  REQUIRE(v2.ok());
  CHECK(*v2 > *v1);
  // A compare-and-swap against the old incarnation's version must fail.
  auto stale = version_ne(*v1);
  CHECK(om->write(1, "k", "three", &stale).status() == Status::kWrongVersion);
  REQUIRE(om->remove(1, "k").ok());
  auto inc = om->increment(1, "k", 1);
  REQUIRE(inc.ok());
  CHECK(inc->version > *v2);
}

TEST_CASE("object manager: keys up to the maximum are accepted and longer ones rejected",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  const uint32_t max = om->config().max_key_bytes;
  std::string key(max, 'k');
  std::string too_long(max + 1, 'k');
  REQUIRE(om->write(1, key, "v").ok());
  std::string value;
  CHECK(om->read(1, key, &value).ok());
  CHECK(value == "v");
  CHECK(om->write(1, too_long, "v").status() == Status::kKeyTooLarge);
  CHECK(om->read(1, too_long, &value).status() == Status::kKeyTooLarge);
  CHECK(om->remove(1, too_long).status() == Status::kKeyTooLarge);
  CHECK(om->increment(1, too_long, 1).status() == Status::kKeyTooLarge);
  CHECK(om->stats().object_count == 1);
  CHECK(om->remove(1, key).ok());
  CHECK(om->increment(1, key, 1).ok());
}

TEST_CASE("object manager: values up to the maximum are accepted and longer ones rejected",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  const uint32_t max = om->config().max_value_bytes;
  std::string big(max, '\0');
  for (uint32_t i = 0; i < max; ++i) big[i] = static_cast<char>(i * 7 + 3);
  REQUIRE(om->write(1, "big", big).ok());
  std::string value;
  REQUIRE(om->read(1, "big", &value).ok());
  CHECK(value == big);
  CHECK(om->write(1, "big", std::string(max + 1, 'x')).status() == Status::kValueTooLarge);
  CHECK(om->write(1, "new", std::string(max + 1, 'x')).status() == Status::kValueTooLarge);
  REQUIRE(om->read(1, "big", &value).ok());
  CHECK(value == big);
  CHECK(om->read(1, "new", &value).status() == Status::kObjectNotFound);
}

TEST_CASE("object manager: the default limits accept a 64 KiB key and a 1 MiB value",
          "[master][object_manager]") {
  MasterConfig c;
  c.memory_bytes = 16u << 20;
  c.segment_bytes = 4u << 20;
  c.seglet_bytes = 64u << 10;
  c.prefault_memory = false;
  c.cleaner_thread = false;
  auto om = make(c);
  REQUIRE(om->config().max_key_bytes == 64u << 10);
  REQUIRE(om->config().max_value_bytes == 1u << 20);
  std::string key(64u << 10, 'k');
  std::string value(1u << 20, 'v');
  REQUIRE(om->write(1, key, value).ok());
  std::string out;
  REQUIRE(om->read(1, key, &out).ok());
  CHECK(out == value);
  CHECK(om->write(1, std::string((64u << 10) + 1, 'k'), "v").status() == Status::kKeyTooLarge);
  CHECK(om->write(1, "k", std::string((1u << 20) + 1, 'v')).status() == Status::kValueTooLarge);
}

TEST_CASE("object manager: an empty value is an object", "[master][object_manager]") {
  auto om = make(small_config(false));
  auto v = om->write(1, "empty", "");
  REQUIRE(v.ok());
  std::string value = "not empty";
  auto r = om->read(1, "empty", &value);
  REQUIRE(r.ok());
  CHECK(*r == *v);
  CHECK(value.empty());
  auto must_exist = doesnt_exist();
  CHECK(om->read(1, "empty", &value, &must_exist).ok());
  CHECK(om->stats().object_count == 1);
  // The empty key is a key too.
  REQUIRE(om->write(1, "", "for the empty key").ok());
  REQUIRE(om->read(1, "", &value).ok());
  CHECK(value == "for the empty key");
}

TEST_CASE("object manager: the same key in two tables is two objects", "[master][object_manager]") {
  auto om = make(small_config(false));
  REQUIRE(om->write(1, "k", "in one").ok());
  REQUIRE(om->write(2, "k", "in two").ok());
  std::string value;
  REQUIRE(om->read(1, "k", &value).ok());
  CHECK(value == "in one");
  REQUIRE(om->read(2, "k", &value).ok());
  CHECK(value == "in two");
  CHECK(om->read(3, "k", &value).status() == Status::kObjectNotFound);
  REQUIRE(om->remove(1, "k").ok());
  CHECK(om->read(1, "k", &value).status() == Status::kObjectNotFound);
  REQUIRE(om->read(2, "k", &value).ok());
  CHECK(value == "in two");
  CHECK(om->stats().object_count == 1);
}

TEST_CASE("object manager: table ids use their whole 64-bit range", "[master][object_manager]") {
  auto om = make(small_config(false));
  REQUIRE(om->write(0, "k", "zero").ok());
  REQUIRE(om->write(UINT64_MAX, "k", "max").ok());
  REQUIRE(om->increment(UINT64_MAX - 1, "k", 3).ok());
  std::string value;
  REQUIRE(om->read(0, "k", &value).ok());
  CHECK(value == "zero");
  REQUIRE(om->read(UINT64_MAX, "k", &value).ok());
  CHECK(value == "max");
  auto all = enumerate_all(*om, UINT64_MAX, 10);
  REQUIRE(all.size() == 1);
  CHECK(all.begin()->second.value == "max");
  REQUIRE(om->remove(UINT64_MAX, "k").ok());
  REQUIRE(om->read(0, "k", &value).ok());
  CHECK(om->read(UINT64_MAX, "k", &value).status() == Status::kObjectNotFound);
}

TEST_CASE("object manager: a one-bucket hash table chains overflow buckets and loses nothing",
          "[master][object_manager]") {
  auto config = small_config(false);
  config.hash_table_bytes = 64;  // one bucket: every key shares one chain
  auto om = make(config);
  REQUIRE(om->end_cursor() == 1);
  std::map<std::string, std::string> model;
  for (int i = 0; i < 300; ++i) {
    std::string key = "key" + std::to_string(i);
    REQUIRE(om->write(1, key, "v" + std::to_string(i)).ok());
    model[key] = "v" + std::to_string(i);
  }
  CHECK(om->stats().hash_overflow_buckets > 0);
  // Free slots in the middle of the chain, then fill them again.
  for (int i = 0; i < 300; i += 3) {
    std::string key = "key" + std::to_string(i);
    REQUIRE(om->remove(1, key).ok());
    model.erase(key);
  }
  for (int i = 1000; i < 1100; ++i) {
    std::string key = "key" + std::to_string(i);
    REQUIRE(om->write(1, key, "w").ok());
    model[key] = "w";
  }
  for (const auto& [key, value] : model) {
    std::string out;
    INFO("key " << key);
    REQUIRE(om->read(1, key, &out).ok());
    CHECK(out == value);
  }
  // The cleaner moves entries along the same chain.
  REQUIRE(om->log().roll_head() == Status::kOk);
  om->cleaner().clean_combined(om->log().cleanable_segments());
  auto all = enumerate_all(*om, 1, 7);
  CHECK(all.size() == model.size());
  for (const auto& [key, value] : model) {
    INFO("key " << key);
    REQUIRE(all.count(key) == 1);
    CHECK(all[key].value == value);
  }
}

TEST_CASE("object manager: enumerate returns every object of a table once, in batches",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  std::map<std::string, std::string> expected;
  for (int i = 0; i < 500; ++i) {
    std::string key = "key" + std::to_string(i);
    std::string value = "value" + std::to_string(i * 31);
    REQUIRE(om->write(10, key, value).ok());
    expected[key] = value;
    // Same keys, other tables: must not show up.
    REQUIRE(om->write(11, key, "other").ok());
    if (i % 3 == 0) REQUIRE(om->write(9, key, "other").ok());
  }
  for (int i = 0; i < 500; i += 7) {
    std::string key = "key" + std::to_string(i);
    REQUIRE(om->remove(10, key).ok());
    expected.erase(key);
  }
  for (size_t batch : {size_t{1}, size_t{3}, size_t{50}, size_t{100000}}) {
    INFO("batch " << batch);
    auto all = enumerate_all(*om, 10, batch);
    REQUIRE(all.size() == expected.size());
    for (const auto& [key, value] : expected) {
      INFO("key " << key);
      auto it = all.find(key);
      REQUIRE(it != all.end());
      CHECK(it->second.value == value);
      std::string read_value;
      auto version = om->read(10, key, &read_value);
      REQUIRE(version.ok());
      CHECK(it->second.version == *version);
    }
  }
  CHECK(enumerate_all(*om, 12, 10).empty());
}

TEST_CASE("object manager: enumerate rejects a cursor past the end", "[master][object_manager]") {
  auto om = make(small_config(false));
  std::vector<ObjectManager::Object> out;
  CHECK(om->enumerate(1, om->end_cursor() + 1, 10, &out).status() == Status::kBadRequest);
  auto at_end = om->enumerate(1, om->end_cursor(), 10, &out);
  REQUIRE(at_end.ok());
  CHECK(*at_end == om->end_cursor());
  CHECK(out.empty());
}

TEST_CASE("object manager: object count and user bytes follow writes, overwrites and removes",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  auto table_stat = [&](uint64_t table) {
    for (const auto& t : om->table_stats()) {
      if (t.table_id == table) return t;
    }
    return TableStat{table, 0, 0};
  };
  CHECK(om->stats().object_count == 0);
  CHECK(om->stats().user_bytes == 0);

  REQUIRE(om->write(1, "ab", "12345").ok());  // 7 bytes
  REQUIRE(om->write(1, "c", "").ok());        // 1
  REQUIRE(om->write(2, "ab", "xy").ok());     // 4
  CHECK(om->stats().object_count == 3);
  CHECK(om->stats().user_bytes == 12);
  CHECK(table_stat(1).object_count == 2);
  CHECK(table_stat(2).object_count == 1);
  uint64_t t1_bytes = table_stat(1).object_bytes;
  CHECK(t1_bytes > 7 + 1);  // entry bytes: headers and metadata included

  REQUIRE(om->write(1, "ab", "1234567890").ok());  // +5 user bytes
  CHECK(om->stats().object_count == 3);
  CHECK(om->stats().user_bytes == 17);
  CHECK(table_stat(1).object_count == 2);
  CHECK(table_stat(1).object_bytes == t1_bytes + 5);

  REQUIRE(om->increment(2, "n", 1).ok());  // 1 + 8
  CHECK(om->stats().object_count == 4);
  CHECK(om->stats().user_bytes == 26);

  REQUIRE(om->remove(1, "ab").ok());
  CHECK(om->stats().object_count == 3);
  CHECK(om->stats().user_bytes == 14);
  REQUIRE(om->remove(1, "c").ok());
  CHECK(table_stat(1).object_count == 0);
  CHECK(table_stat(1).object_bytes == 0);
  // A table with no objects left is not reported.
  for (const auto& t : om->table_stats()) CHECK(t.table_id != 1);
  REQUIRE(om->remove(1, "never there").ok());
  CHECK(om->stats().object_count == 2);
  CHECK(om->stats().user_bytes == 13);
}

TEST_CASE("object manager: a bad configuration is rejected at create", "[master][object_manager]") {
  auto c = small_config(false);
  c.seglet_bytes = 3000;
  CHECK(ObjectManager::create(c).status() == Status::kInvalidArgument);
  c = small_config(false);
  c.max_value_bytes = 64u << 10;  // an object larger than half a segment
  CHECK(ObjectManager::create(c).status() == Status::kInvalidArgument);
  c = small_config(false);
  c.memory_bytes = 3 * c.segment_bytes;
  CHECK(ObjectManager::create(c).status() == Status::kInvalidArgument);
  // The largest object fits half a segment, but not with a tombstone for its long key
  // beside it in what the head's metadata leaves.
  c = small_config(false);
  c.max_key_bytes = 20u << 10;
  c.max_value_bytes = 12u << 10;
  c.max_value_bytes -= 100;
  CHECK(ObjectManager::create(c).status() == Status::kInvalidArgument);
  c.max_key_bytes = 12u << 10;
  CHECK(ObjectManager::create(c).ok());
}

TEST_CASE("object manager: a full memory answers no space or retry and loses nothing",
          "[master][object_manager]") {
  auto config = small_config(true);
  config.write_wait_for_cleaner_ns = 50'000'000;
  auto om = make(config);
  const std::string filler(1000, 'f');
  std::map<std::string, std::string> acked;
  Status failure = Status::kOk;
  // 1 MiB cannot hold 2000 objects of 1 KB.
  for (int i = 0; i < 2000; ++i) {
    std::string key = "key" + std::to_string(i);
    std::string value = std::to_string(i) + filler;
    auto w = om->write(1, key, value);
    if (!w.ok()) {
      failure = w.status();
      break;
    }
    acked[key] = value;
  }
  INFO("failure " << static_cast<int>(failure) << " after " << acked.size() << " writes");
  CHECK((failure == Status::kNoSpace || failure == Status::kRetry));
  CHECK(acked.size() > 500);  // most of the memory holds data
  for (const auto& [key, value] : acked) {
    std::string out;
    INFO("key " << key);
    REQUIRE(om->read(1, key, &out).ok());
    CHECK(out == value);
  }

  // Free most of the data. Removes need a little log space for their tombstones, which
  // the cleaner must be able to find in a full memory.
  size_t removed = 0;
  size_t remove_failures = 0;
  for (auto it = acked.begin(); it != acked.end();) {
    if (removed % 4 != 3) {
      Result<uint64_t> r = Status::kRetry;
      for (int attempt = 0; attempt < 50 && r.status() == Status::kRetry; ++attempt) {
        r = om->remove(1, it->first);
      }
      if (r.ok()) {
        it = acked.erase(it);
        ++removed;
        continue;
      }
      ++remove_failures;
      if (remove_failures > 20) break;
    }
    ++removed;
    ++it;
  }
  CHECK(remove_failures == 0);
  // And writes go through again: the cleaner reclaims the removed objects' space.
  for (int i = 0; i < 200; ++i) {
    std::string key = "again" + std::to_string(i);
    std::string value = std::to_string(i) + filler;
    auto w = write_retrying(*om, 1, key, value);
    INFO("write " << i << " status " << static_cast<int>(w.status()));
    REQUIRE(w.ok());
    acked[key] = value;
  }
  for (const auto& [key, value] : acked) {
    std::string out;
    INFO("key " << key);
    REQUIRE(om->read(1, key, &out).ok());
    CHECK(out == value);
  }
  CHECK(om->stats().object_count == acked.size());
}

TEST_CASE("object manager: removes still work when random overwrites have filled memory",
          "[master][object_manager]") {
  // Random overwrites spread the dead space thinly over every segment, so once writes
  // are refused the cleaner may have nothing to free until something is removed: the
  // removes themselves must get through, or the store could never be emptied.
  auto config = small_config(true);
  config.memory_bytes = 2u << 20;
  config.write_wait_for_cleaner_ns = 20'000'000;
  auto om = make(config);
  Random rng(7);
  std::map<std::string, std::string> model;
  Status refusal = Status::kOk;
  for (int op = 0; op < 100'000 && refusal == Status::kOk; ++op) {
    std::string key = "key" + std::to_string(rng.uniform(8000));
    std::string value(static_cast<size_t>(rng.uniform(601)), static_cast<char>('a' + op % 26));
    auto w = om->write(1, key, value);
    if (w.ok()) {
      model[key] = value;
    } else {
      refusal = w.status();
    }
  }
  INFO("refused with " << static_cast<int>(refusal) << " holding " << model.size() << " objects, "
                       << om->stats().log.live_bytes << " live bytes");
  REQUIRE((refusal == Status::kNoSpace || refusal == Status::kRetry));
  // Small writes still fit the head's last seglet: fill it up, so that not even a
  // tombstone would fit in the memory that writes may use.
  Status small_refusal = Status::kOk;
  for (int n = 0; n < 10'000 && small_refusal == Status::kOk; ++n) {
    std::string key = "small" + std::to_string(n);
    auto w = om->write(1, key, "");
    if (w.ok()) {
      model[key] = "";
    } else {
      small_refusal = w.status();
    }
  }
  REQUIRE((small_refusal == Status::kNoSpace || small_refusal == Status::kRetry));

  // Remove every other object; each remove must go through (after a bounded wait).
  size_t i = 0;
  for (auto it = model.begin(); it != model.end(); ++i) {
    if (i % 2 == 1) {
      ++it;
      continue;
    }
    Result<uint64_t> r = Status::kRetry;
    for (int attempt = 0; attempt < 50 && !r.ok(); ++attempt) r = om->remove(1, it->first);
    INFO("remove of " << it->first << " gave " << static_cast<int>(r.status()));
    REQUIRE(r.ok());
    it = model.erase(it);
  }
  // Now writes fit again.
  for (int n = 0; n < 1000; ++n) {
    std::string key = "new" + std::to_string(n);
    std::string value(300, 'n');
    auto w = write_retrying(*om, 1, key, value);
    INFO("write " << n << " gave " << static_cast<int>(w.status()));
    REQUIRE(w.ok());
    model[key] = value;
  }
  for (const auto& [key, value] : model) {
    std::string out;
    INFO("key " << key);
    REQUIRE(om->read(1, key, &out).ok());
    CHECK(out == value);
  }
}

TEST_CASE("object manager: a memory overfilled by random writes and removes refuses cleanly",
          "[master][object_manager]") {
  // More data than fits, thinly spread dead space: the cleaner keeps running out of
  // work it can do. Every refusal must be kNoSpace or kRetry (the cleaner once drained
  // its reserve here and aborted), and nothing acknowledged may be lost.
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    INFO("seed " << seed);
    auto config = small_config(true);
    config.memory_bytes = 2u << 20;
    config.write_wait_for_cleaner_ns = 5'000'000;
    auto om = make(config);
    Random rng(seed);
    std::map<std::string, std::string> model;
    uint64_t refused = 0;
    for (int op = 0; op < 30'000; ++op) {
      std::string key = "key" + std::to_string(rng.uniform(10'000));
      if (rng.uniform(10) < 8) {
        std::string value(static_cast<size_t>(rng.uniform(601)), static_cast<char>('a' + op % 26));
        auto w = om->write(1, key, value);
        if (w.ok()) {
          model[key] = value;
          continue;
        }
        INFO("write status " << static_cast<int>(w.status()));
        REQUIRE((w.status() == Status::kNoSpace || w.status() == Status::kRetry));
      } else {
        auto r = om->remove(1, key);
        if (r.ok()) {
          model.erase(key);
          continue;
        }
        INFO("remove status " << static_cast<int>(r.status()));
        REQUIRE((r.status() == Status::kNoSpace || r.status() == Status::kRetry));
      }
      ++refused;
    }
    CHECK(refused > 0);
    for (const auto& [key, value] : model) {
      std::string out;
      INFO("key " << key);
      REQUIRE(om->read(1, key, &out).ok());
      CHECK(out == value);
    }
    CHECK(om->stats().object_count == model.size());
  }
}

TEST_CASE("object manager: overwrites in a nearly full memory keep going with the cleaner",
          "[master][object_manager]") {
  auto om = make(small_config(true));
  // About 60% of memory live, then many overwrites of the same keys.
  const std::string filler(1500, 'o');
  std::map<std::string, std::string> acked;
  for (int i = 0; i < 400; ++i) {
    std::string key = "key" + std::to_string(i);
    std::string value = std::to_string(i) + filler;
    auto w = write_retrying(*om, 1, key, value);
    REQUIRE(w.ok());
    acked[key] = value;
  }
  for (int round = 0; round < 5; ++round) {
    for (int i = 0; i < 400; ++i) {
      std::string key = "key" + std::to_string(i);
      std::string value = std::to_string(round * 1000 + i) + filler;
      auto w = write_retrying(*om, 1, key, value);
      INFO("round " << round << " key " << key << " status " << static_cast<int>(w.status()));
      REQUIRE(w.ok());
      acked[key] = value;
    }
  }
  for (const auto& [key, value] : acked) {
    std::string out;
    INFO("key " << key);
    REQUIRE(om->read(1, key, &out).ok());
    CHECK(out == value);
  }
  auto stats = om->stats();
  CHECK(stats.cleaner.compactions + stats.cleaner.combined_passes > 0);
  CHECK(stats.log.appended_bytes > stats.log.memory_bytes);  // memory was reused
}

TEST_CASE(
    "object manager: threads sharing keys with the cleaner running keep every "
    "acknowledged write",
    "[master][object_manager]") {
  auto om = make(small_config(true));
  constexpr int kThreads = 4;
  constexpr int kOpsPerThread = 20'000;
  constexpr int kOwnKeys = 60;
  constexpr int kSharedKeys = 20;
  const std::string filler(400, 's');

  std::atomic<uint64_t> increments{0};
  std::atomic<int> errors{0};
  std::vector<std::string> first_error(kThreads);
  std::vector<std::map<std::string, std::string>> last(kThreads);

  auto worker = [&](int t) {
    Random rng(static_cast<uint64_t>(t) + 1);
    // Catch2 assertions are not thread-safe: remember the first failure per thread.
    auto fail = [&](const std::string& what) {
      errors.fetch_add(1);
      if (first_error[static_cast<size_t>(t)].empty()) first_error[static_cast<size_t>(t)] = what;
    };
    auto& mine = last[static_cast<size_t>(t)];
    for (int op = 0; op < kOpsPerThread; ++op) {
      uint64_t pick = rng.uniform(10);
      std::string own = "t" + std::to_string(t) + "-" + std::to_string(rng.uniform(kOwnKeys));
      std::string shared = "shared" + std::to_string(rng.uniform(kSharedKeys));
      std::string value = std::to_string(t) + ":" + std::to_string(op) + ":" +
                          filler.substr(0, rng.uniform(filler.size()));
      if (pick < 3) {
        auto w = write_retrying(*om, 1, own, value);
        if (w.ok()) {
          mine[own] = value;
        } else if (w.status() != Status::kRetry && w.status() != Status::kNoSpace) {
          fail("write of " + own + ": " + std::string(status_name(w.status())));
        }
      } else if (pick < 5) {
        std::string out;
        auto r = om->read(1, own, &out);
        auto it = mine.find(own);
        if (it == mine.end()) {
          if (r.status() != Status::kObjectNotFound) fail("read of unwritten " + own);
        } else if (!r.ok() || out != it->second) {
          fail("read of " + own + " does not give the last write");
        }
      } else if (pick < 7) {
        auto w = write_retrying(*om, 1, shared, value);
        if (!w.ok() && w.status() != Status::kRetry && w.status() != Status::kNoSpace) {
          fail("write of " + shared);
        }
      } else if (pick < 8) {
        std::string out;
        auto r = om->read(1, shared, &out);
        // Every value of a shared key starts with a writer's "thread:op:".
        if (r.ok() && std::count(out.begin(), out.end(), ':') < 2) fail("torn " + shared);
        if (!r.ok() && r.status() != Status::kObjectNotFound) fail("read of " + shared);
      } else {
        Result<ObjectManager::Incremented> r = Status::kRetry;
        for (int i = 0; i < 100 && r.status() == Status::kRetry; ++i) {
          r = om->increment(1, "counter", 1);
        }
        if (r.ok()) {
          increments.fetch_add(1);
        } else {
          fail("increment: " + std::string(status_name(r.status())));
        }
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();

  for (int t = 0; t < kThreads; ++t) {
    INFO("thread " << t << ": " << first_error[static_cast<size_t>(t)]);
    CHECK(first_error[static_cast<size_t>(t)].empty());
  }
  CHECK(errors.load() == 0);
  for (int t = 0; t < kThreads; ++t) {
    for (const auto& [key, value] : last[static_cast<size_t>(t)]) {
      std::string out;
      INFO("key " << key);
      REQUIRE(om->read(1, key, &out).ok());
      CHECK(out == value);
    }
  }
  std::string counter;
  REQUIRE(om->read(1, "counter", &counter).ok());
  REQUIRE(counter.size() == 8);
  int64_t total = 0;
  std::memcpy(&total, counter.data(), 8);
  CHECK(total == static_cast<int64_t>(increments.load()));
  CHECK(increments.load() > 0);
  auto stats = om->stats();
  CHECK(stats.cleaner.compactions + stats.cleaner.combined_passes > 0);
}

}  // namespace ramkv::master

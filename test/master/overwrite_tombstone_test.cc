// Tests for tombstones on overwrite (docs/log-format.md): an overwrite or increment logs a
// tombstone for the version it replaces, right after the new object, counted in live
// bytes until the old version's segment leaves the log.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "master/object_manager.h"
#include "test/master/object_manager_helpers.h"

namespace ramkv::master {
namespace {
using namespace ramkv::master::testing;
}  // namespace

TEST_CASE("object manager: an overwrite logs a tombstone for the old object right after the new",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  auto v1 = om->write(1, "k", "one");
  REQUIRE(v1.ok());
  CHECK(tombstones_of(*om, "k").empty());  // a create supersedes nothing
  REQUIRE(om->log().roll_head() == Status::kOk);
  auto v2 = om->write(1, "k", "two");
  REQUIRE(v2.ok());
  auto tombstones = tombstones_of(*om, "k");
  REQUIRE(tombstones.size() == 1);
  Logged t = entry_after_object(*om, "k", *v2);
  CHECK(t.type == EntryType::kTombstone);
  CHECK(t.table_id == 1);
  CHECK(t.key == "k");
  CHECK(t.version == *v1);
  CHECK(t.named_segment_id == 1);  // where v1 is
  CHECK(t.segment_id == 2);

  // Within one segment too: exactly one more.
  auto v3 = om->write(1, "k", "three");
  REQUIRE(v3.ok());
  CHECK(tombstones_of(*om, "k").size() == 2);
  t = entry_after_object(*om, "k", *v3);
  CHECK(t.type == EntryType::kTombstone);
  CHECK(t.version == *v2);
  CHECK(t.named_segment_id == 2);

  // A rejected write logs nothing; a remove logs its own tombstone.
  size_t entries = logged_entries(*om).size();
  RejectRules rules = exists();
  CHECK(om->write(1, "k", "four", &rules).status() == Status::kObjectExists);
  CHECK(logged_entries(*om).size() == entries);
  REQUIRE(om->remove(1, "k").ok());
  tombstones = tombstones_of(*om, "k");
  REQUIRE(tombstones.size() == 3);
  CHECK(tombstones.back().version == *v3);
  // Another key's overwrite names only its own old version.
  REQUIRE(om->write(1, "j", "a").ok());
  REQUIRE(om->write(1, "j", "b").ok());
  CHECK(tombstones_of(*om, "j").size() == 1);
  CHECK(tombstones_of(*om, "k").size() == 3);
}

TEST_CASE("object manager: an increment of an existing counter logs a tombstone for the old value",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  auto first = om->increment(1, "n", 5);
  REQUIRE(first.ok());
  CHECK(tombstones_of(*om, "n").empty());
  REQUIRE(om->log().roll_head() == Status::kOk);
  auto second = om->increment(1, "n", 2);
  REQUIRE(second.ok());
  CHECK(second->value == 7);
  auto tombstones = tombstones_of(*om, "n");
  REQUIRE(tombstones.size() == 1);
  Logged t = entry_after_object(*om, "n", second->version);
  CHECK(t.type == EntryType::kTombstone);
  CHECK(t.version == first->version);
  CHECK(t.named_segment_id == 1);
  // A failed increment logs nothing.
  REQUIRE(om->write(1, "text", "not eight bytes").ok());
  size_t entries = logged_entries(*om).size();
  CHECK(om->increment(1, "text", 1).status() == Status::kInvalidObject);
  CHECK(logged_entries(*om).size() == entries);
}

TEST_CASE("object manager: overwrite tombstones count in live bytes but not as objects",
          "[master][object_manager]") {
  auto om = make(small_config(false));
  // Checks counts, user bytes and table statistics against the newest object entries in
  // the log, and the log's live bytes against those plus the tombstones in it whose
  // segment is still in the log (the others are dead, and wait for their own segment to
  // be cleaned).
  auto check_stats = [&](const std::map<std::string, std::string>& model) -> uint64_t {
    uint64_t object_bytes = 0;
    uint64_t tombstone_bytes = 0;
    for (const auto& l : logged_entries(*om)) {
      if (l.type == EntryType::kTombstone) {
        if (om->log().contains_segment(l.named_segment_id)) tombstone_bytes += l.entry_bytes;
        continue;
      }
      std::string value;
      auto version = om->read(l.table_id, l.key, &value);
      if (version.ok() && *version == l.version) object_bytes += l.entry_bytes;
    }
    uint64_t user_bytes = 0;
    for (const auto& [key, value] : model) user_bytes += key.size() + value.size();
    auto stats = om->stats();
    CHECK(stats.object_count == model.size());
    CHECK(stats.user_bytes == user_bytes);
    REQUIRE(om->table_stats().size() == 1);
    CHECK(om->table_stats()[0].object_count == model.size());
    CHECK(om->table_stats()[0].object_bytes == object_bytes);
    CHECK(stats.log.live_bytes == object_bytes + tombstone_bytes);
    CHECK(stats.tombstone_bytes == tombstone_bytes);
    return tombstone_bytes;
  };
  std::map<std::string, std::string> model;
  for (int i = 0; i < 40; ++i) {
    std::string key = "key" + std::to_string(i);
    model[key] = std::string(200, 'a');
    REQUIRE(om->write(1, key, model[key]).ok());
  }
  REQUIRE(om->log().roll_head() == Status::kOk);
  for (int i = 0; i < 30; ++i) {
    std::string key = "key" + std::to_string(i);
    model[key] = std::string(static_cast<size_t>(300 + i), 'b');
    REQUIRE(om->write(1, key, model[key]).ok());
  }
  REQUIRE(om->increment(1, "n", 1).ok());
  REQUIRE(om->increment(1, "n", 1).ok());
  model["n"] = int_value(2);
  CHECK(check_stats(model) > 0);
  REQUIRE(om->remove(1, "key39").ok());
  model.erase("key39");
  CHECK(check_stats(model) > 0);
  REQUIRE(om->log().roll_head() == Status::kOk);
  for (Segment* s : om->log().cleanable_segments()) om->cleaner().compact(s);
  check_stats(model);
  REQUIRE(om->cleaner().clean_combined(om->log().cleanable_segments()) > 0);
  check_stats(model);
  for (const auto& [key, value] : model) {
    std::string out;
    INFO("key " << key);
    REQUIRE(om->read(1, key, &out).ok());
    CHECK(out == value);
  }
}

}  // namespace ramkv::master

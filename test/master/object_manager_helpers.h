// Helpers shared by the object manager's tests (object_manager_test.cc and
// overwrite_tombstone_test.cc): a small master, and the entries its log holds.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/segment_iterator.h"
#include "master/object_manager.h"

namespace ramkv::master::testing {

// A small master: 1 MiB of log in 64 KiB segments of 4 KiB seglets, so the cleaner has
// work after a few hundred writes.
inline MasterConfig small_config(bool cleaner_thread) {
  MasterConfig c;
  c.memory_bytes = 1u << 20;
  c.segment_bytes = 64u << 10;
  c.seglet_bytes = 4u << 10;
  c.max_key_bytes = 1024;
  c.max_value_bytes = 8192;
  c.cleaner_thread = cleaner_thread;
  c.prefault_memory = false;
  c.lock_stripes = 64;
  return c;
}

inline std::unique_ptr<ObjectManager> make(const MasterConfig& config) {
  auto om = ObjectManager::create(config);
  REQUIRE(om.ok());
  return std::move(om).value();
}

inline std::string int_value(int64_t v) {
  std::string s(sizeof(v), '\0');
  std::memcpy(s.data(), &v, sizeof(v));
  return s;
}

// An object or tombstone entry of the log, as a backup holds it.
struct Logged {
  uint64_t segment_id = 0;
  EntryType type = EntryType::kInvalid;
  uint64_t table_id = 0;
  std::string key;
  uint64_t version = 0;
  uint64_t named_segment_id = 0;  // tombstones: the segment of the object it kills
  uint32_t entry_bytes = 0;
};
// Every object and tombstone in the log: segments in id order, entries in log order.
inline std::vector<Logged> logged_entries(ObjectManager& om) {
  std::vector<Logged> out;
  for (uint64_t id : om.log().segment_ids()) {
    auto copy = om.log().copy_segment(id);
    REQUIRE(copy.has_value());
    SegmentIterator it(copy->bytes, copy->certificate);
    REQUIRE(it.validate() == Status::kOk);
    for (; it.valid(); it.next()) {
      if (it.type() == EntryType::kObject) {
        auto o = decode_object(it.payload());
        REQUIRE(o.ok());
        out.push_back({id, it.type(), o->table_id, std::string(o->key), o->version, 0,
                       it.header().total_bytes()});
      } else if (it.type() == EntryType::kTombstone) {
        auto t = decode_tombstone(it.payload());
        REQUIRE(t.ok());
        out.push_back({id, it.type(), t->table_id, std::string(t->key), t->version, t->segment_id,
                       it.header().total_bytes()});
      }
    }
    CHECK(it.status() == Status::kOk);
  }
  return out;
}
inline std::vector<Logged> tombstones_of(ObjectManager& om, std::string_view key) {
  std::vector<Logged> out;
  for (auto& l : logged_entries(om)) {
    if (l.type == EntryType::kTombstone && l.key == key) out.push_back(std::move(l));
  }
  return out;
}
// The entry after the object (key, version), which must be in the log and not last.
inline Logged entry_after_object(ObjectManager& om, std::string_view key, uint64_t version) {
  auto all = logged_entries(om);
  auto it = std::find_if(all.begin(), all.end(), [&](const Logged& l) {
    return l.type == EntryType::kObject && l.key == key && l.version == version;
  });
  REQUIRE(it != all.end());
  REQUIRE(std::next(it) != all.end());
  CHECK(std::next(it)->segment_id == it->segment_id);
  return *std::next(it);
}

inline RejectRules doesnt_exist() { return {.doesnt_exist = true}; }
inline RejectRules exists() { return {.exists = true}; }
inline RejectRules version_le(uint64_t v) { return {.version_le_given = true, .given_version = v}; }
inline RejectRules version_ne(uint64_t v) { return {.version_ne_given = true, .given_version = v}; }

// Every object of a table, by enumeration in batches of `batch`; fails the test if a key
// comes back twice or the enumeration does not end at end_cursor().
inline std::map<std::string, ObjectManager::Object> enumerate_all(ObjectManager& om, uint64_t table,
                                                                  size_t batch) {
  std::map<std::string, ObjectManager::Object> out;
  uint64_t cursor = 0;
  // Each call advances the cursor by at least one bucket.
  for (uint64_t calls = 0; cursor != om.end_cursor() && calls <= om.end_cursor(); ++calls) {
    std::vector<ObjectManager::Object> objects;
    auto next = om.enumerate(table, cursor, batch, &objects);
    REQUIRE(next.ok());
    REQUIRE(*next > cursor);
    cursor = *next;
    for (auto& o : objects) {
      INFO("key " << o.key);
      CHECK(out.count(o.key) == 0);
      out[o.key] = std::move(o);
    }
  }
  CHECK(cursor == om.end_cursor());
  return out;
}

// Retries a write that the cleaner may need to make room for (kRetry), a bounded number
// of times.
inline Result<uint64_t> write_retrying(ObjectManager& om, uint64_t table, std::string_view key,
                                       std::string_view value) {
  Result<uint64_t> r = Status::kRetry;
  for (int i = 0; i < 100 && r.status() == Status::kRetry; ++i) r = om.write(table, key, value);
  return r;
}

}  // namespace ramkv::master::testing

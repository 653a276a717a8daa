// Tests for ObjectManager::replay and finish_replay (master/object_manager.h): a recovery
// master replaying a crashed master's log entries (docs/recovery.md, step 5). Entries are
// built with the log format's own encoders; histories of writes and removes are checked
// against a model whatever order their segments arrive in.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/checksum.h"
#include "common/clock.h"
#include "common/log_entry.h"
#include "common/segment_iterator.h"
#include "master/object_manager.h"

namespace ramkv::master {
namespace {

using Bytes = std::vector<std::byte>;

// A small master: 8 MiB of log in 64 KiB segments of 4 KiB seglets; the cleaner is driven
// by hand unless asked for.
MasterConfig replay_config(uint64_t memory_bytes = 8u << 20, bool cleaner_thread = false) {
  MasterConfig c;
  c.memory_bytes = memory_bytes;
  c.segment_bytes = 64u << 10;
  c.seglet_bytes = 4u << 10;
  c.max_key_bytes = 1024;
  c.max_value_bytes = 8192;
  c.cleaner_thread = cleaner_thread;
  c.prefault_memory = false;
  c.lock_stripes = 64;
  return c;
}

std::unique_ptr<ObjectManager> make(const MasterConfig& config) {
  auto om = ObjectManager::create(config);
  REQUIRE(om.ok());
  return std::move(om).value();
}

void append_bytes(Bytes* out, std::span<const std::byte> bytes) {
  out->insert(out->end(), bytes.begin(), bytes.end());
}

Bytes object_entry(uint64_t table, std::string_view key, uint64_t version, std::string_view value,
                   uint32_t timestamp = 1234) {
  std::byte prefix[kMaxObjectPrefixBytes];
  uint32_t n =
      encode_object_prefix(table, version, timestamp, static_cast<uint32_t>(key.size()), prefix);
  Bytes payload(prefix, prefix + n);
  append_bytes(&payload, as_bytes(key));
  append_bytes(&payload, as_bytes(value));
  return build_entry(EntryType::kObject, payload);
}

// `segment_id` names the crashed master's segment that held the removed object.
Bytes tombstone_entry(uint64_t table, std::string_view key, uint64_t version,
                      uint64_t segment_id = 77, uint32_t timestamp = 1234) {
  std::byte prefix[kMaxTombstonePrefixBytes];
  uint32_t n = encode_tombstone_prefix(table, version, segment_id, timestamp, prefix);
  Bytes payload(prefix, prefix + n);
  append_bytes(&payload, as_bytes(key));
  return build_entry(EntryType::kTombstone, payload);
}

// The metadata a head segment starts with, which replay ignores.
Bytes head_metadata(uint64_t segment_id) {
  Bytes out, payload;
  encode_segment_header({.master_id = 9, .segment_id = segment_id, .segment_bytes = 1 << 16},
                        &payload);
  append_bytes(&out, build_entry(EntryType::kSegmentHeader, payload));
  payload.clear();
  uint64_t ids[] = {segment_id};
  encode_log_digest(ids, &payload);
  append_bytes(&out, build_entry(EntryType::kLogDigest, payload));
  payload.clear();
  encode_safe_version(5, &payload);
  append_bytes(&out, build_entry(EntryType::kSafeVersion, payload));
  payload.clear();
  TableStat stats[] = {{.table_id = 1, .object_count = 3, .object_bytes = 300}};
  encode_table_stats(stats, &payload);
  append_bytes(&out, build_entry(EntryType::kTableStats, payload));
  return out;
}

Bytes concat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const auto& p : parts) append_bytes(&out, p);
  return out;
}

const auto kAcceptAll = [](uint64_t, uint64_t) { return true; };

// What a key should read as after replay.
struct Expected {
  uint64_t version = 0;
  std::string value;
  uint32_t entry_bytes = 0;
};
using Key = std::pair<uint64_t, std::string>;  // table, key
using Model = std::map<Key, std::optional<Expected>>;

// A crashed master's log: entries in log order, each tagged with its key and version.
struct LogEntry {
  Key key;
  uint64_t version = 0;
  bool tombstone = false;
  Bytes bytes;
};
struct History {
  std::vector<LogEntry> entries;
  Model model;  // the final state of every key touched
  uint64_t max_version = 0;
};

// Random writes and removes over `key_count` keys in three tables, with versions from one
// master-wide counter (which other keys also advance: it jumps).
History random_history(Random& rng, int key_count, int op_count) {
  History h;
  uint64_t next_version = 1 + rng.uniform(1000);
  std::map<Key, uint64_t> current;  // version of each present object
  for (int i = 0; i < op_count; ++i) {
    auto k = static_cast<int>(rng.uniform(static_cast<uint64_t>(key_count)));
    Key key{1 + static_cast<uint64_t>(k % 3), "key-" + std::to_string(k)};
    auto it = current.find(key);
    if (it != current.end() && rng.uniform(100) < 30) {
      // A remove: its tombstone names the removed object's version.
      h.entries.push_back(
          {key, it->second, true, tombstone_entry(key.first, key.second, it->second)});
      h.model[key] = std::nullopt;
      current.erase(it);
      continue;
    }
    uint64_t version = next_version;
    next_version += 1 + rng.uniform(3);
    std::string value(rng.uniform(200), 'a');
    for (auto& c : value) c = static_cast<char>('a' + rng.uniform(26));
    Bytes bytes = object_entry(key.first, key.second, version, value);
    h.model[key] = Expected{version, value, static_cast<uint32_t>(bytes.size())};
    current[key] = version;
    h.entries.push_back({key, version, false, std::move(bytes)});
    h.max_version = version;
  }
  return h;
}

// What a crashed master's cleaner may have left: some dead objects gone, and tombstones
// gone once no object they cover is left (log-format.md, rules 2 and 4).
std::vector<LogEntry> cleaned(Random& rng, const std::vector<LogEntry>& entries) {
  std::vector<bool> keep(entries.size(), true);
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    bool dead = false;  // overwritten or removed later
    for (size_t j = i + 1; j < entries.size() && !dead; ++j) dead = entries[j].key == e.key;
    if (!e.tombstone && dead && rng.uniform(100) < 40) keep[i] = false;
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    if (!e.tombstone) continue;
    bool covers_kept = false;
    for (size_t j = 0; j < entries.size(); ++j) {
      covers_kept |= keep[j] && !entries[j].tombstone && entries[j].key == e.key &&
                     entries[j].version <= e.version;
    }
    if (!covers_kept && rng.uniform(100) < 50) keep[i] = false;
  }
  std::vector<LogEntry> out;
  for (size_t i = 0; i < entries.size(); ++i) {
    if (keep[i]) out.push_back(entries[i]);
  }
  return out;
}

// Cuts entries into segments of 1 to 20 (each opening with head metadata), in log order.
std::vector<Bytes> into_segments(Random& rng, const std::vector<LogEntry>& entries) {
  std::vector<Bytes> segments;
  for (size_t i = 0; i < entries.size();) {
    Bytes seg = head_metadata(segments.size() + 1);
    size_t n = 1 + rng.uniform(20);
    for (; n > 0 && i < entries.size(); --n, ++i) append_bytes(&seg, entries[i].bytes);
    segments.push_back(std::move(seg));
  }
  return segments;
}

template <typename T>
void shuffle(Random& rng, std::vector<T>* v) {
  for (size_t i = v->size(); i > 1; --i) std::swap((*v)[i - 1], (*v)[rng.uniform(i)]);
}

// Every key of the model reads as it says; counts and table stats agree with it.
void check_matches(ObjectManager& om, const Model& model) {
  uint64_t live = 0;
  std::map<uint64_t, TableStat> tables;
  for (const auto& [key, expected] : model) {
    INFO("table " << key.first << " key " << key.second);
    std::string value;
    auto r = om.read(key.first, key.second, &value);
    if (!expected) {
      CHECK(r.status() == Status::kObjectNotFound);
      continue;
    }
    REQUIRE(r.ok());
    CHECK(*r == expected->version);
    CHECK(value == expected->value);
    ++live;
    TableStat& t = tables[key.first];
    t.table_id = key.first;
    t.object_count++;
    t.object_bytes += expected->entry_bytes;
  }
  CHECK(om.stats().object_count == live);
  std::map<uint64_t, TableStat> got;
  for (const auto& t : om.table_stats()) got[t.table_id] = t;
  CHECK(got == tables);
}

// Every entry of this master's log, by iterating its segments as a backup holds them.
struct LoggedEntry {
  uint64_t segment_id = 0;
  EntryType type = EntryType::kInvalid;
  uint64_t table_id = 0;
  std::string key;
  uint64_t version = 0;
  uint64_t tombstone_segment_id = 0;
};
std::vector<LoggedEntry> log_entries(ObjectManager& om, std::vector<Bytes>* segments = nullptr) {
  std::vector<LoggedEntry> out;
  for (uint64_t id : om.log().segment_ids()) {
    auto copy = om.log().copy_segment(id);
    REQUIRE(copy);
    SegmentIterator it(copy->bytes, copy->certificate);
    REQUIRE(it.validate() == Status::kOk);
    for (; it.valid(); it.next()) {
      if (it.type() == EntryType::kObject) {
        auto o = decode_object(it.payload());
        REQUIRE(o.ok());
        out.push_back({id, it.type(), o->table_id, std::string(o->key), o->version, 0});
      } else if (it.type() == EntryType::kTombstone) {
        auto t = decode_tombstone(it.payload());
        REQUIRE(t.ok());
        out.push_back({id, it.type(), t->table_id, std::string(t->key), t->version, t->segment_id});
      }
    }
    CHECK(it.status() == Status::kOk);
    if (segments != nullptr) segments->push_back(std::move(copy->bytes));
  }
  return out;
}

std::string read_value(ObjectManager& om, uint64_t table, std::string_view key) {
  std::string value;
  auto r = om.read(table, key, &value);
  return r.ok() ? value : std::string("<") + std::string(status_name(r.status())) + ">";
}

}  // namespace

TEST_CASE("replay: the newest version of every key wins whatever order segments arrive in",
          "[master][replay]") {
  for (uint64_t seed = 1; seed <= 25; ++seed) {
    INFO("seed " << seed);
    Random rng(seed);
    History h = random_history(rng, 40, 400);
    std::vector<Bytes> segments = into_segments(rng, cleaned(rng, h.entries));
    if (seed % 2 == 0) {
      shuffle(rng, &segments);
    } else {
      // Entry by entry in any order, as if every entry were a segment of its own.
      segments.clear();
      for (const auto& e : h.entries) segments.push_back(e.bytes);
      shuffle(rng, &segments);
    }
    auto om = make(replay_config());
    ReplayStats stats;
    for (const auto& s : segments) REQUIRE(om->replay(s, kAcceptAll, &stats) == Status::kOk);
    check_matches(*om, h.model);
    CHECK(stats.skipped == 0);
    CHECK(stats.objects + stats.tombstones <= stats.entries);
    om->finish_replay(std::vector<TabletRange>{{1}, {2}, {3}}, h.max_version / 2);
    CHECK(om->replay_marker_count() == 0);
    auto v = om->write(1, "new key", "x");
    REQUIRE(v.ok());
    CHECK(*v > h.max_version);
  }
}

TEST_CASE("replay: this master's log replays to the same state (a later crash keeps it)",
          "[master][replay]") {
  for (uint64_t seed = 100; seed < 110; ++seed) {
    INFO("seed " << seed);
    Random rng(seed);
    History h = random_history(rng, 30, 300);
    std::vector<LogEntry> entries = h.entries;
    shuffle(rng, &entries);
    auto first = make(replay_config());
    for (const auto& e : entries)
      REQUIRE(first->replay(e.bytes, kAcceptAll, nullptr) == Status::kOk);
    first->finish_replay(std::vector<TabletRange>{{1}, {2}, {3}}, 0);

    // The replayed objects are in the first master's log with their versions, and each
    // logged tombstone names a segment of that log.
    std::vector<Bytes> segments;
    auto logged = log_entries(*first, &segments);
    std::vector<uint64_t> ids = first->log().segment_ids();
    for (const auto& item : h.model) {  // (clang 14 cannot capture structured bindings)
      const Key& key = item.first;
      const std::optional<Expected>& expected = item.second;
      if (!expected) continue;
      INFO("key " << key.second);
      CHECK(std::any_of(logged.begin(), logged.end(), [&](const LoggedEntry& l) {
        return l.type == EntryType::kObject && l.table_id == key.first && l.key == key.second &&
               l.version == expected->version;
      }));
    }
    for (const auto& l : logged) {
      if (l.type != EntryType::kTombstone) continue;
      CHECK(std::find(ids.begin(), ids.end(), l.tombstone_segment_id) != ids.end());
    }

    // The first master crashes: its log, in any order, gives the same state.
    shuffle(rng, &segments);
    auto second = make(replay_config());
    for (const auto& s : segments) REQUIRE(second->replay(s, kAcceptAll, nullptr) == Status::kOk);
    check_matches(*second, h.model);
  }
}

TEST_CASE("replay: an object that supersedes one in this log is logged with a tombstone for it",
          "[master][replay]") {
  auto om = make(replay_config());
  REQUIRE(om->replay(object_entry(1, "k", 5, "old"), kAcceptAll, nullptr) == Status::kOk);
  REQUIRE(om->log().roll_head() == Status::kOk);
  REQUIRE(om->replay(object_entry(1, "k", 9, "new", 4321), kAcceptAll, nullptr) == Status::kOk);
  auto logged = log_entries(*om);
  auto old_object = std::find_if(logged.begin(), logged.end(), [](const LoggedEntry& l) {
    return l.type == EntryType::kObject && l.key == "k" && l.version == 5;
  });
  auto new_object = std::find_if(logged.begin(), logged.end(), [](const LoggedEntry& l) {
    return l.type == EntryType::kObject && l.key == "k" && l.version == 9;
  });
  REQUIRE(old_object != logged.end());
  REQUIRE(new_object != logged.end());
  REQUIRE(std::next(new_object) != logged.end());
  // Right after the new object, naming this log's segment that holds the old one.
  const LoggedEntry& t = *std::next(new_object);
  CHECK(t.type == EntryType::kTombstone);
  CHECK(t.segment_id == new_object->segment_id);
  CHECK(t.key == "k");
  CHECK(t.version == 5);
  CHECK(t.tombstone_segment_id == old_object->segment_id);
  CHECK(std::count_if(logged.begin(), logged.end(),
                      [](const LoggedEntry& l) { return l.type == EntryType::kTombstone; }) == 1);
  CHECK(read_value(*om, 1, "k") == "new");

  // An object replayed over a marker supersedes nothing in this log: no tombstone.
  REQUIRE(om->replay(tombstone_entry(1, "m", 3), kAcceptAll, nullptr) == Status::kOk);
  REQUIRE(om->replay(object_entry(1, "m", 4, "back"), kAcceptAll, nullptr) == Status::kOk);
  for (const auto& l : log_entries(*om)) CHECK(!(l.type == EntryType::kTombstone && l.key == "m"));
  CHECK(read_value(*om, 1, "m") == "back");
}

TEST_CASE(
    "replay: a key removed after an overwrite stays removed once the cleaner has taken the "
    "remove's tombstone",
    "[master][replay]") {
  // docs/log-format.md, "Overwrites": v1 in segment A (1), v2 in segment B (2), then a
  // remove whose tombstone names B. The cleaner cleans B, and then that tombstone (B is
  // gone), while A keeps the dead v1. A recovery of this master replays every segment of
  // its log, and must not bring v1 back.
  auto om = make(replay_config());
  Log& log = om->log();
  REQUIRE(om->write(1, "k", "v1").ok());
  REQUIRE(om->write(1, "other", "x").ok());  // A holds live data: it stays in the log
  REQUIRE(log.roll_head() == Status::kOk);
  REQUIRE(om->write(1, "k", "v2").ok());
  REQUIRE(log.roll_head() == Status::kOk);
  REQUIRE(om->remove(1, "k").ok());
  REQUIRE(log.roll_head() == Status::kOk);
  auto names_b = [&] {
    auto logged = log_entries(*om);
    return std::any_of(logged.begin(), logged.end(), [](const LoggedEntry& l) {
      return l.type == EntryType::kTombstone && l.key == "k" && l.tombstone_segment_id == 2;
    });
  };
  REQUIRE(names_b());
  // Combined cleaning of everything but A until neither B nor the tombstone is left.
  for (int pass = 0; pass < 10 && (log.contains_segment(2) || names_b()); ++pass) {
    std::vector<Segment*> victims;
    for (Segment* s : log.cleanable_segments()) {
      if (s->id() != 1) victims.push_back(s);
    }
    if (victims.size() >= 2) om->cleaner().clean_combined(victims);
    REQUIRE(log.roll_head() == Status::kOk);
  }
  REQUIRE(!log.contains_segment(2));
  REQUIRE(!names_b());
  REQUIRE(log.contains_segment(1));

  // The crash: a recovery master gets every segment of the log from the backups.
  std::vector<Bytes> segments;
  auto logged = log_entries(*om, &segments);
  CHECK(std::any_of(logged.begin(), logged.end(), [](const LoggedEntry& l) {
    return l.type == EntryType::kObject && l.key == "k" && l.segment_id == 1;
  }));
  auto recovered = make(replay_config());
  for (const auto& s : segments) REQUIRE(recovered->replay(s, kAcceptAll, nullptr) == Status::kOk);
  recovered->finish_replay(std::vector<TabletRange>{{1}}, 0);
  CHECK(read_value(*recovered, 1, "k") == "<object not found>");
  CHECK(read_value(*recovered, 1, "other") == "x");
  CHECK(recovered->stats().object_count == 1);

  // What keeps v1 dead is the overwrite's tombstone naming A: without it, v1 is back.
  int dropped = 0;
  auto resurrected = make(replay_config());
  for (const auto& s : segments) {
    Bytes kept;
    for (SegmentIterator it(s); it.valid(); it.next()) {
      if (it.type() == EntryType::kTombstone) {
        auto t = decode_tombstone(it.payload());
        REQUIRE(t.ok());
        if (t->segment_id == 1) {
          ++dropped;
          continue;
        }
      }
      append_bytes(&kept, it.raw());
    }
    REQUIRE(resurrected->replay(kept, kAcceptAll, nullptr) == Status::kOk);
  }
  CHECK(dropped == 1);
  CHECK(read_value(*resurrected, 1, "k") == "v1");
}

TEST_CASE("replay: a log cleaned in any order replays to what the master held (random histories)",
          "[master][replay]") {
  // Writes, overwrites, increments and removes of a few keys, with head rolls, combined
  // cleaning of random sets of segments and compactions between them; now and then the
  // master "crashes" and its log, replayed into a fresh master, must give the model. The
  // cleaner's own policy rarely lets an old segment outlive newer ones; here any
  // segment may go first.
  for (uint64_t seed = 1; seed <= 12; ++seed) {
    INFO("seed " << seed);
    Random rng(seed);
    auto om = make(replay_config());
    Log& log = om->log();
    std::map<std::string, std::pair<uint64_t, std::string>> model;  // key -> version, value
    auto check_crash = [&](int step) {
      INFO("crash after step " << step);
      std::vector<Bytes> segments;
      log_entries(*om, &segments);
      shuffle(rng, &segments);
      auto recovered = make(replay_config());
      for (const auto& s : segments) {
        REQUIRE(recovered->replay(s, kAcceptAll, nullptr) == Status::kOk);
      }
      recovered->finish_replay(std::vector<TabletRange>{{1}}, 0);
      for (int k = 0; k < 16; ++k) {
        std::string key = "k" + std::to_string(k);
        INFO("key " << key);
        std::string value;
        auto r = recovered->read(1, key, &value);
        auto it = model.find(key);
        if (it == model.end()) {
          CHECK(r.status() == Status::kObjectNotFound);
        } else {
          REQUIRE(r.ok());
          CHECK(*r == it->second.first);
          CHECK(value == it->second.second);
        }
      }
      CHECK(recovered->stats().object_count == model.size());
    };
    for (int step = 0; step < 1500; ++step) {
      std::string key = "k" + std::to_string(rng.uniform(16));
      uint64_t pick = rng.uniform(100);
      if (pick < 35) {
        std::string value(rng.uniform(400), static_cast<char>('a' + step % 26));
        auto v = om->write(1, key, value);
        REQUIRE(v.ok());
        model[key] = {*v, value};
      } else if (pick < 45) {
        auto it = model.find(key);
        if (it != model.end() && it->second.second.size() != 8) continue;
        auto inc = om->increment(1, key, 3);
        REQUIRE(inc.ok());
        std::string value(8, '\0');
        std::memcpy(value.data(), &inc->value, 8);
        model[key] = {inc->version, value};
      } else if (pick < 65) {
        REQUIRE(om->remove(1, key).ok());
        model.erase(key);
      } else if (pick < 75) {
        REQUIRE(log.roll_head() == Status::kOk);
      } else if (pick < 90) {
        std::vector<Segment*> candidates;
        for (Segment* s : log.cleanable_segments()) {
          if (rng.uniform(2) == 0) candidates.push_back(s);
        }
        om->cleaner().clean_combined(candidates);
      } else if (pick < 97) {
        auto segments = log.cleanable_segments();
        if (!segments.empty()) om->cleaner().compact(segments[rng.uniform(segments.size())]);
      } else {
        check_crash(step);
      }
    }
    check_crash(1500);
  }
}

TEST_CASE("replay: a tombstone keeps out an older version replayed after it", "[master][replay]") {
  auto om = make(replay_config());
  ReplayStats stats;
  REQUIRE(om->replay(tombstone_entry(1, "k", 5), kAcceptAll, &stats) == Status::kOk);
  CHECK(om->replay_marker_count() == 1);
  Bytes older = concat({object_entry(1, "k", 3, "older"), object_entry(1, "k", 5, "removed")});
  REQUIRE(om->replay(older, kAcceptAll, &stats) == Status::kOk);
  CHECK(read_value(*om, 1, "k") == "<object not found>");
  CHECK(stats.objects == 2);
  CHECK(stats.tombstones == 1);
  CHECK(stats.obsolete == 2);
  CHECK(om->stats().object_count == 0);
  CHECK(om->table_stats().empty());
  // Nothing was appended for them: the log holds no object of the key.
  for (const auto& l : log_entries(*om)) CHECK(l.key != "k");
  // An older tombstone changes nothing either.
  REQUIRE(om->replay(tombstone_entry(1, "k", 4), kAcceptAll, &stats) == Status::kOk);
  CHECK(stats.obsolete == 3);
  CHECK(om->replay_marker_count() == 1);
}

TEST_CASE("replay: an object newer than a tombstone comes back, in either order",
          "[master][replay]") {
  auto om = make(replay_config());
  REQUIRE(om->replay(concat({tombstone_entry(1, "a", 5), object_entry(1, "a", 7, "again")}),
                     kAcceptAll, nullptr) == Status::kOk);
  REQUIRE(om->replay(concat({object_entry(1, "b", 7, "again"), tombstone_entry(1, "b", 5)}),
                     kAcceptAll, nullptr) == Status::kOk);
  for (const char* key : {"a", "b"}) {
    std::string value;
    auto r = om->read(1, key, &value);
    REQUIRE(r.ok());
    CHECK(*r == 7);
    CHECK(value == "again");
  }
  // The object replaced the marker of "a"; "b" never needed one.
  CHECK(om->replay_marker_count() == 0);
  CHECK(om->stats().object_count == 2);
}

TEST_CASE("replay: a tombstone removes an object replayed before it and is logged naming it",
          "[master][replay]") {
  auto om = make(replay_config());
  ReplayStats stats;
  REQUIRE(om->replay(object_entry(1, "k", 3, "value"), kAcceptAll, &stats) == Status::kOk);
  CHECK(om->stats().object_count == 1);
  REQUIRE(om->replay(tombstone_entry(1, "k", 4, /*segment_id=*/12345), kAcceptAll, &stats) ==
          Status::kOk);
  CHECK(read_value(*om, 1, "k") == "<object not found>");
  CHECK(om->stats().object_count == 0);
  CHECK(om->stats().user_bytes == 0);
  CHECK(om->table_stats().empty());
  CHECK(stats.obsolete == 0);
  // The tombstone in this log names this log's segment that holds the object, not the
  // crashed master's segment 12345.
  auto logged = log_entries(*om);
  uint64_t object_segment = 0, tombstone_names = 0, tombstones = 0;
  for (const auto& l : logged) {
    if (l.key != "k") continue;
    if (l.type == EntryType::kObject) object_segment = l.segment_id;
    if (l.type == EntryType::kTombstone) {
      ++tombstones;
      tombstone_names = l.tombstone_segment_id;
      CHECK(l.version == 4);
    }
  }
  CHECK(tombstones == 1);
  CHECK(object_segment != 0);
  CHECK(tombstone_names == object_segment);
  // An older copy of the object replayed later stays out.
  REQUIRE(om->replay(object_entry(1, "k", 3, "value"), kAcceptAll, &stats) == Status::kOk);
  CHECK(read_value(*om, 1, "k") == "<object not found>");
}

TEST_CASE("replay: entries outside the accepted partition are skipped and counted",
          "[master][replay]") {
  auto om = make(replay_config());
  const uint64_t half = UINT64_MAX / 2;
  auto accept = [&](uint64_t table, uint64_t hash) { return table == 1 && hash <= half; };
  Bytes stream = head_metadata(1);
  uint64_t in = 0, out = 0;
  std::vector<Key> keys;
  for (uint64_t table = 1; table <= 2; ++table) {
    for (int i = 0; i < 50; ++i) {
      std::string key = "key-" + std::to_string(i);
      append_bytes(&stream, object_entry(table, key, 10 + static_cast<uint64_t>(i), "v" + key));
      append_bytes(&stream, tombstone_entry(table, key, 5));
      bool accepted = table == 1 && key_hash(table, key) <= half;
      (accepted ? in : out) += 2;
      keys.emplace_back(table, key);
    }
  }
  ReplayStats stats;
  REQUIRE(om->replay(stream, accept, &stats) == Status::kOk);
  CHECK(in > 0);
  CHECK(out > 0);
  CHECK(stats.skipped == out);
  CHECK(stats.objects + stats.tombstones == in);
  CHECK(stats.entries == in + out + 4);  // and the head metadata
  CHECK(stats.bytes == stream.size());
  CHECK(stats.obsolete == in / 2);  // every tombstone is older than its object
  for (const auto& [table, key] : keys) {
    bool accepted = table == 1 && key_hash(table, key) <= half;
    CHECK(read_value(*om, table, key) == (accepted ? "v" + key : "<object not found>"));
  }
  CHECK(om->stats().object_count == in / 2);
}

TEST_CASE(
    "replay: a corrupt or truncated entry stops replay with corrupt, keeping what came before",
    "[master][replay]") {
  Bytes a = object_entry(1, "a", 1, "first");
  Bytes b = object_entry(1, "b", 2, "second");
  Bytes c = object_entry(1, "c", 3, "third");
  Bytes stream = concat({a, b, c});
  auto expect_only_a = [&](const Bytes& bad, uint64_t entries_ok) {
    auto om = make(replay_config());
    ReplayStats stats;
    CHECK(om->replay(bad, kAcceptAll, &stats) == Status::kCorrupt);
    CHECK(stats.entries == entries_ok);
    CHECK(read_value(*om, 1, "a") == "first");
    if (entries_ok == 1) CHECK(read_value(*om, 1, "b") == "<object not found>");
    CHECK(read_value(*om, 1, "c") == "<object not found>");
    CHECK(om->stats().object_count == entries_ok);
  };
  SECTION("a flipped payload byte") {
    Bytes bad = stream;
    bad[a.size() + b.size() - 2] ^= std::byte{0x20};
    expect_only_a(bad, 1);
  }
  SECTION("a flipped checksum byte") {
    Bytes bad = stream;
    bad[a.size() + 3] ^= std::byte{0x01};
    expect_only_a(bad, 1);
  }
  SECTION("an entry cut short") { expect_only_a(Bytes(stream.begin(), stream.end() - 3), 2); }
  SECTION("a header cut short") {
    expect_only_a(
        Bytes(stream.begin(), stream.begin() + static_cast<ptrdiff_t>(a.size() + b.size() + 1)), 2);
  }
  SECTION("unwritten space") {
    Bytes bad = concat({a, b});
    bad.resize(bad.size() + 16);
    expect_only_a(bad, 2);
  }
  SECTION("an unknown entry type") {
    Bytes bad = concat({a, b});
    bad.push_back(std::byte{0x3f});
    bad.resize(bad.size() + 8);
    expect_only_a(bad, 2);
  }
  SECTION("an object payload that does not parse, under a good checksum") {
    Bytes payload{std::byte{0x80}};  // a varint that never ends
    expect_only_a(concat({a, b, build_entry(EntryType::kObject, payload), c}), 2);
  }
  SECTION("a tombstone payload that does not parse, under a good checksum") {
    Bytes payload{std::byte{0x01}};
    expect_only_a(concat({a, b, build_entry(EntryType::kTombstone, payload), c}), 2);
  }
}

TEST_CASE("replay: entries go in batches; a bad one in a later batch keeps every entry before it",
          "[master][replay]") {
  // 20 entries (replay checks and prefetches up to 8 at a time), the 14th damaged.
  std::vector<Bytes> entries;
  for (int i = 0; i < 20; ++i) {
    entries.push_back(object_entry(1, "k" + std::to_string(i), static_cast<uint64_t>(i + 1),
                                   "v" + std::to_string(i)));
  }
  Bytes stream;
  size_t damaged_at = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    if (i == 13) damaged_at = stream.size() + entries[i].size() - 1;
    stream.insert(stream.end(), entries[i].begin(), entries[i].end());
  }
  SECTION("whole: every entry replayed") {
    auto om = make(replay_config());
    ReplayStats stats;
    REQUIRE(om->replay(stream, kAcceptAll, &stats) == Status::kOk);
    CHECK(stats.entries == 20);
    CHECK(om->stats().object_count == 20);
  }
  SECTION("damaged: the 13 before it are kept, nothing after") {
    stream[damaged_at] ^= std::byte{0x04};
    auto om = make(replay_config());
    ReplayStats stats;
    CHECK(om->replay(stream, kAcceptAll, &stats) == Status::kCorrupt);
    CHECK(stats.entries == 13);
    for (int i = 0; i < 20; ++i) {
      const std::string key = "k" + std::to_string(i);
      CHECK(read_value(*om, 1, key) == (i < 13 ? "v" + std::to_string(i) : "<object not found>"));
    }
  }
}

TEST_CASE("replay: an object over this master's limits is refused", "[master][replay]") {
  auto om = make(replay_config());
  std::string long_key(2000, 'k');
  std::string long_value(9000, 'v');
  CHECK(om->replay(object_entry(1, long_key, 1, "v"), kAcceptAll, nullptr) == Status::kKeyTooLarge);
  CHECK(om->replay(object_entry(1, "k", 1, long_value), kAcceptAll, nullptr) ==
        Status::kValueTooLarge);
  CHECK(om->stats().object_count == 0);
}

TEST_CASE("replay: new versions come above the safe version and every replayed version",
          "[master][replay]") {
  SECTION("the safe version is the higher") {
    auto om = make(replay_config());
    REQUIRE(om->replay(object_entry(1, "a", 100, "v"), kAcceptAll, nullptr) == Status::kOk);
    // Even before finish_replay, a write never takes a version replayed.
    auto early = om->write(2, "other", "x");
    REQUIRE(early.ok());
    CHECK(*early > 100);
    om->finish_replay(std::vector<TabletRange>{{1}}, 1000);
    auto v = om->write(1, "a", "w");
    REQUIRE(v.ok());
    CHECK(*v > 1000);
    CHECK(om->safe_version() > 1000);
  }
  SECTION("a replayed version is the higher") {
    auto om = make(replay_config());
    REQUIRE(om->replay(tombstone_entry(1, "a", 5000), kAcceptAll, nullptr) == Status::kOk);
    om->finish_replay(std::vector<TabletRange>{{1}}, 50);
    auto v = om->write(1, "a", "w");
    REQUIRE(v.ok());
    CHECK(*v > 5000);
  }
  SECTION("entries of other partitions do not move the counter, metadata neither") {
    auto om = make(replay_config());
    auto none = [](uint64_t, uint64_t) { return false; };
    REQUIRE(om->replay(concat({head_metadata(1), object_entry(1, "a", 1u << 30, "v")}), none,
                       nullptr) == Status::kOk);
    auto v = om->write(1, "b", "w");
    REQUIRE(v.ok());
    CHECK(*v < 1000);
  }
}

TEST_CASE("replay: replaying the same entries twice changes nothing", "[master][replay]") {
  Random rng(7);
  History h = random_history(rng, 30, 300);
  Bytes stream;
  for (const auto& e : h.entries) append_bytes(&stream, e.bytes);
  auto om = make(replay_config());
  ReplayStats first;
  REQUIRE(om->replay(stream, kAcceptAll, &first) == Status::kOk);
  uint64_t appended = om->stats().log.appended_bytes;
  uint64_t markers = om->replay_marker_count();
  ReplayStats second;
  REQUIRE(om->replay(stream, kAcceptAll, &second) == Status::kOk);
  CHECK(om->stats().log.appended_bytes == appended);
  CHECK(om->replay_marker_count() == markers);
  CHECK(second.obsolete == second.objects + second.tombstones);
  CHECK(second.entries == first.entries);
  check_matches(*om, h.model);
}

TEST_CASE("replay: finish_replay drops the markers of its tablets only", "[master][replay]") {
  auto om = make(replay_config());
  Bytes stream =
      concat({tombstone_entry(1, "a", 5), tombstone_entry(1, "b", 5), tombstone_entry(2, "a", 5)});
  REQUIRE(om->replay(stream, kAcceptAll, nullptr) == Status::kOk);
  CHECK(om->replay_marker_count() == 3);
  uint64_t hash_a = key_hash(1, "a");
  om->finish_replay(
      std::vector<TabletRange>{{.table_id = 1, .start_hash = hash_a, .end_hash = hash_a}}, 0);
  CHECK(om->replay_marker_count() == 2);
  // Table 2 is still being recovered: its marker still keeps the old object out.
  REQUIRE(om->replay(object_entry(2, "a", 4, "old"), kAcceptAll, nullptr) == Status::kOk);
  CHECK(read_value(*om, 2, "a") == "<object not found>");
  om->finish_replay(std::vector<TabletRange>{{1}, {2}}, 0);
  CHECK(om->replay_marker_count() == 0);
}

TEST_CASE("replay: a full memory answers retry or no space, and what was applied stays",
          "[master][replay]") {
  const std::string value(1000, 'v');
  Bytes stream;
  for (int i = 0; i < 2000; ++i) {  // 2 MB of objects for 1 MiB of memory
    append_bytes(&stream,
                 object_entry(1, "key-" + std::to_string(i), 1 + static_cast<uint64_t>(i), value));
  }
  for (bool cleaner_thread : {false, true}) {
    INFO("cleaner thread " << cleaner_thread);
    auto om = make(replay_config(1u << 20, cleaner_thread));
    ReplayStats stats;
    Status s = om->replay(stream, kAcceptAll, &stats);
    CHECK((s == Status::kRetry || s == Status::kNoSpace));
    CHECK(stats.objects > 100);
    CHECK(stats.objects < 2000);
    CHECK(om->stats().object_count == stats.objects);
    for (uint64_t i = 0; i < stats.objects; ++i) {
      CHECK(read_value(*om, 1, "key-" + std::to_string(i)) == value);
    }
    CHECK(read_value(*om, 1, "key-" + std::to_string(stats.objects)) == "<object not found>");
    // Removes still make room (the log keeps seglets for tombstones): a tombstone replayed
    // into the full memory applies.
    REQUIRE(om->replay(tombstone_entry(1, "key-0", 1), kAcceptAll, nullptr) == Status::kOk);
    CHECK(read_value(*om, 1, "key-0") == "<object not found>");
  }
}

TEST_CASE("replay: replayed objects survive cleaning of this master's log", "[master][replay]") {
  Random rng(11);
  History h = random_history(rng, 60, 3000);
  auto om = make(replay_config());
  for (const auto& e : h.entries) REQUIRE(om->replay(e.bytes, kAcceptAll, nullptr) == Status::kOk);
  om->finish_replay(std::vector<TabletRange>{{1}, {2}, {3}}, 0);
  REQUIRE(om->log().roll_head() == Status::kOk);
  uint64_t freed = 0;
  for (int i = 0; i < 50; ++i) freed += om->cleaner().clean_once();
  CHECK(freed > 0);
  check_matches(*om, h.model);
}

TEST_CASE("replay: other tablets are written and read while a partition is replayed",
          "[master][replay]") {
  Random rng(3);
  History h = random_history(rng, 200, 3000);
  auto om = make(replay_config(16u << 20));
  int writer_errors = 0;  // Catch2 assertions are for the test's own thread
  std::thread writer([&] {
    std::string value;
    for (int i = 0; i < 3000; ++i) {
      std::string key = "other-" + std::to_string(i % 300);
      bool ok = om->write(9, key, std::to_string(i)).ok() && om->read(9, key, &value).ok() &&
                value == std::to_string(i);
      writer_errors += ok ? 0 : 1;
    }
  });
  for (const auto& e : h.entries) REQUIRE(om->replay(e.bytes, kAcceptAll, nullptr) == Status::kOk);
  writer.join();
  CHECK(writer_errors == 0);
  om->finish_replay(std::vector<TabletRange>{{1}, {2}, {3}}, 0);
  Model model = h.model;
  for (int i = 2700; i < 3000; ++i) {
    std::string key = "other-" + std::to_string(i % 300);
    std::string value = std::to_string(i);
    std::byte prefix[kMaxObjectPrefixBytes];
    // Entry bytes as the write made them (its version is whatever it got: read it back).
    auto v = om->read(9, key, &value);
    REQUIRE(v.ok());
    uint32_t n = encode_object_prefix(9, *v, 0, static_cast<uint32_t>(key.size()), prefix);
    model[{9, key}] =
        Expected{*v, value, entry_bytes(static_cast<uint32_t>(n + key.size() + value.size()))};
  }
  check_matches(*om, model);
}

}  // namespace ramkv::master

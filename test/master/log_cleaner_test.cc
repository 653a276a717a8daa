// Tests for master/log_cleaner.h, driven by hand (no cleaner thread): in-memory
// compaction, combined cleaning, tombstone lifetime, and the metadata every new head
// carries (log digest, safe version, table statistics). Segments are inspected the way a
// backup sees them: copy_segment() and a SegmentIterator over the bytes.
#include "master/log_cleaner.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "common/segment_iterator.h"
#include "master/object_manager.h"

namespace ramkv::master {
namespace {

MasterConfig manual_config() {
  MasterConfig c;
  c.memory_bytes = 1u << 20;
  c.segment_bytes = 64u << 10;
  c.seglet_bytes = 4u << 10;
  c.max_key_bytes = 1024;
  c.max_value_bytes = 8192;
  c.cleaner_thread = false;
  c.prefault_memory = false;
  c.lock_stripes = 64;
  return c;
}

// What one segment of the log holds, decoded from a copy of its bytes.
struct SegmentScan {
  Status status = Status::kOk;  // of validate(): the certificate covers the bytes
  int objects = 0;
  int headers = 0;
  std::vector<TombstoneView> tombstones;  // views into `bytes`
  uint64_t tombstone_bytes = 0;           // their entries, headers included
  std::optional<std::vector<uint64_t>> digest;
  std::optional<uint64_t> safe_version;
  std::optional<std::vector<TableStat>> table_stats;
  std::vector<std::byte> bytes;
};

SegmentScan scan(Log& log, uint64_t segment_id) {
  SegmentScan out;
  auto copy = log.copy_segment(segment_id);
  REQUIRE(copy.has_value());
  out.bytes = std::move(copy->bytes);
  SegmentIterator it(out.bytes, copy->certificate);
  out.status = it.validate();
  for (int i = 0; it.valid() && i < 1'000'000; ++i, it.next()) {
    switch (it.type()) {
      case EntryType::kObject:
        ++out.objects;
        break;
      case EntryType::kSegmentHeader:
        ++out.headers;
        break;
      case EntryType::kTombstone: {
        auto t = decode_tombstone(it.payload());
        REQUIRE(t.ok());
        out.tombstones.push_back(*t);
        out.tombstone_bytes += it.header().total_bytes();
        break;
      }
      case EntryType::kLogDigest: {
        auto d = decode_log_digest(it.payload());
        REQUIRE(d.ok());
        out.digest = *d;
        break;
      }
      case EntryType::kSafeVersion: {
        auto v = decode_safe_version(it.payload());
        REQUIRE(v.ok());
        out.safe_version = *v;
        break;
      }
      case EntryType::kTableStats: {
        auto s = decode_table_stats(it.payload());
        REQUIRE(s.ok());
        out.table_stats = *s;
        break;
      }
      default:
        FAIL("unexpected entry type");
        break;
    }
  }
  CHECK(it.status() == Status::kOk);
  return out;
}

// The head is the newest segment: survivors take their ids before the head that commits
// them.
uint64_t head_id(Log& log) { return log.segment_ids().back(); }

Segment* segment(Log& log, uint64_t id) {
  for (Segment* s : log.cleanable_segments()) {
    if (s->id() == id) return s;
  }
  FAIL("segment " << id << " is not a closed segment of the log");
  return nullptr;
}

// Tombstones for `key` in each segment of the log.
std::map<uint64_t, int> tombstones_for(Log& log, std::string_view key) {
  std::map<uint64_t, int> out;
  for (uint64_t id : log.segment_ids()) {
    for (const auto& t : scan(log, id).tombstones) {
      if (t.key == key) ++out[id];
    }
  }
  return out;
}

// Bytes of every tombstone entry in the log.
uint64_t tombstone_bytes(Log& log) {
  uint64_t n = 0;
  for (uint64_t id : log.segment_ids()) n += scan(log, id).tombstone_bytes;
  return n;
}

int total(const std::map<uint64_t, int>& counts) {
  int n = 0;
  for (const auto& [id, c] : counts) n += c;
  return n;
}

std::vector<TableStat> sorted(std::vector<TableStat> stats) {
  std::sort(stats.begin(), stats.end(),
            [](const TableStat& a, const TableStat& b) { return a.table_id < b.table_id; });
  return stats;
}

std::string value_for(int i, size_t bytes) {
  std::string v = std::to_string(i) + ":";
  v.resize(bytes, static_cast<char>('a' + i % 26));
  return v;
}

// Writes keys [from, to) of table 1 with values of `bytes`, recording them in `model`.
void write_range(ObjectManager& om, int from, int to, size_t bytes, int salt,
                 std::map<std::string, std::string>* model) {
  for (int i = from; i < to; ++i) {
    std::string key = "key" + std::to_string(i);
    std::string value = value_for(i + salt, bytes);
    REQUIRE(om.write(1, key, value).ok());
    (*model)[key] = value;
  }
}

void check_all(ObjectManager& om, const std::map<std::string, std::string>& model) {
  for (const auto& [key, value] : model) {
    std::string out;
    INFO("key " << key);
    REQUIRE(om.read(1, key, &out).ok());
    CHECK(out == value);
  }
  CHECK(om.stats().object_count == model.size());
}

// The head's metadata agrees with the log and, when `stats_fresh` (the head was opened
// with no write in flight and none since), with the object manager's table statistics.
// A head that a write rolled over records the statistics from before that write.
void check_head(ObjectManager& om, bool stats_fresh = true) {
  Log& log = om.log();
  auto head = scan(log, head_id(log));
  CHECK(head.status == Status::kOk);
  CHECK(head.headers == 1);
  REQUIRE(head.digest.has_value());
  CHECK(*head.digest == log.segment_ids());
  REQUIRE(head.table_stats.has_value());
  if (stats_fresh) CHECK(sorted(*head.table_stats) == sorted(om.table_stats()));
}

}  // namespace

TEST_CASE("log cleaner: compaction frees the seglets of dead objects and keeps live ones",
          "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  std::map<std::string, std::string> model;
  write_range(om, 0, 100, 500, 0, &model);  // ~50 KB: segment 1
  REQUIRE(om.log().segment_ids() == std::vector<uint64_t>{1});
  REQUIRE(om.log().roll_head() == Status::kOk);
  write_range(om, 0, 80, 500, 1000, &model);  // 80% of segment 1 is dead now
  REQUIRE(om.log().roll_head() == Status::kOk);

  auto ids_before = om.log().segment_ids();
  Segment* victim = segment(om.log(), 1);
  uint64_t memory_before = victim->memory_bytes();
  uint32_t free_before = om.log().pool().free_count();
  uint64_t freed = om.cleaner().compact(victim);
  CHECK(freed > 0);
  CHECK(om.log().pool().free_count() > free_before);
  CHECK(uint64_t{om.log().pool().free_count() - free_before} * 4096 == freed);
  // Same segment, fewer seglets: compaction does not change the log's membership.
  CHECK(om.log().segment_ids() == ids_before);
  Segment* compacted = segment(om.log(), 1);
  CHECK(compacted->memory_bytes() + freed == memory_before);
  auto s = scan(om.log(), 1);
  CHECK(s.status == Status::kOk);
  CHECK(s.objects == 20);
  check_all(om, model);
  auto stats = om.cleaner().stats();
  CHECK(stats.compactions == 1);
  CHECK(stats.bytes_freed == freed);
  CHECK(stats.bytes_copied > 20 * 500);
  // Writes and removes still find the moved objects.
  REQUIRE(om.write(1, "key95", "new").ok());
  model["key95"] = "new";
  REQUIRE(om.remove(1, "key96").ok());
  model.erase("key96");
  check_all(om, model);
}

TEST_CASE("log cleaner: a compacted segment can be compacted again", "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  std::map<std::string, std::string> model;
  write_range(om, 0, 100, 500, 0, &model);
  REQUIRE(om.log().roll_head() == Status::kOk);
  write_range(om, 0, 50, 500, 1000, &model);
  CHECK(om.cleaner().compact(segment(om.log(), 1)) > 0);
  write_range(om, 50, 90, 500, 2000, &model);
  CHECK(om.cleaner().compact(segment(om.log(), 1)) > 0);
  CHECK(scan(om.log(), 1).objects == 10);
  check_all(om, model);
}

TEST_CASE("log cleaner: combined cleaning merges segments into fewer and keeps the data",
          "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  std::map<std::string, std::string> model;
  // Six closed segments, each with a few live objects among many dead ones.
  for (int round = 0; round < 6; ++round) {
    write_range(om, 0, 60, 700, round * 100, &model);
    write_range(om, 1000 + round * 6, 1000 + round * 6 + 6, 300, 0, &model);
    REQUIRE(om.log().roll_head() == Status::kOk);
  }
  write_range(om, 0, 60, 10, 0, &model);  // the last round's big values die too
  REQUIRE(om.log().roll_head() == Status::kOk);
  auto before = om.log().segment_ids();
  REQUIRE(before.size() == 8);
  uint32_t free_before = om.log().pool().free_count();
  uint64_t freed = om.cleaner().clean_combined(om.log().cleanable_segments());
  CHECK(freed > 0);
  auto after = om.log().segment_ids();
  INFO("segments after: " << after.size());
  CHECK(after.size() < before.size());
  CHECK(om.log().pool().free_count() > free_before);
  // Every victim is gone; what is left is the old head (closed now), the survivors and
  // the new head.
  CHECK(after.front() == before.back());
  auto stats = om.cleaner().stats();
  CHECK(stats.combined_passes == 1);
  CHECK(stats.segments_cleaned == 7);
  for (uint64_t id : after) CHECK(scan(om.log(), id).status == Status::kOk);
  check_all(om, model);
  check_head(om);
  // The moved objects can be overwritten and removed.
  write_range(om, 1000, 1036, 10, 7, &model);
  REQUIRE(om.remove(1, "key0").ok());
  model.erase("key0");
  check_all(om, model);
}

TEST_CASE("log cleaner: combined cleaning of a single candidate does nothing",
          "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  std::map<std::string, std::string> model;
  write_range(om, 0, 20, 500, 0, &model);
  REQUIRE(om.log().roll_head() == Status::kOk);
  auto before = om.log().segment_ids();
  CHECK(om.cleaner().clean_combined(om.log().cleanable_segments()) == 0);
  CHECK(om.log().segment_ids() == before);
  CHECK(om.cleaner().stats().combined_passes == 0);
  check_all(om, model);
}

TEST_CASE("log cleaner: clean_once with nothing to clean frees nothing", "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  CHECK(om.cleaner().clean_once() == 0);  // only the head
  std::map<std::string, std::string> model;
  write_range(om, 0, 20, 100, 0, &model);
  CHECK(om.cleaner().clean_once() == 0);  // the head is never cleaned
  CHECK(om.log().segment_ids().size() == 1);
  check_all(om, model);
}

TEST_CASE("log cleaner: clean_once compacts the segment with the most dead space",
          "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  std::map<std::string, std::string> model;
  write_range(om, 0, 100, 500, 0, &model);  // segment 1
  REQUIRE(om.log().roll_head() == Status::kOk);
  write_range(om, 100, 200, 500, 0, &model);  // segment 2
  REQUIRE(om.log().roll_head() == Status::kOk);
  write_range(om, 0, 10, 500, 1, &model);     // segment 1: 10% dead
  write_range(om, 100, 190, 500, 1, &model);  // segment 2: 90% dead
  REQUIRE(om.log().roll_head() == Status::kOk);
  uint64_t seg1 = segment(om.log(), 1)->memory_bytes();
  uint64_t seg2 = segment(om.log(), 2)->memory_bytes();
  CHECK(om.cleaner().clean_once() > 0);
  CHECK(om.cleaner().stats().compactions == 1);
  CHECK(segment(om.log(), 1)->memory_bytes() == seg1);
  CHECK(segment(om.log(), 2)->memory_bytes() < seg2);
  check_all(om, model);
}

TEST_CASE("log cleaner: a tombstone lives exactly as long as the segment of its object",
          "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  Log& log = om.log();
  std::map<std::string, std::string> model;
  // Segment 1: the doomed object among others.
  REQUIRE(om.write(1, "doomed", "value").ok());
  write_range(om, 0, 10, 200, 0, &model);
  REQUIRE(log.roll_head() == Status::kOk);
  // Segment 2: its tombstone.
  REQUIRE(om.remove(1, "doomed").ok());
  write_range(om, 10, 20, 200, 0, &model);
  REQUIRE(log.roll_head() == Status::kOk);
  // Segment 3: more data, and the head 4.
  write_range(om, 20, 30, 200, 0, &model);
  REQUIRE(log.roll_head() == Status::kOk);
  REQUIRE(log.segment_ids() == std::vector<uint64_t>{1, 2, 3, 4});
  auto where = tombstones_for(log, "doomed");
  REQUIRE(where == std::map<uint64_t, int>{{2, 1}});
  {
    auto t = scan(log, 2).tombstones;
    REQUIRE(t.size() == 1);
    CHECK(t[0].segment_id == 1);
    CHECK(t[0].table_id == 1);
  }

  // Compaction of the tombstone's segment keeps it: segment 1 is still in the log.
  om.cleaner().compact(segment(log, 2));
  CHECK(tombstones_for(log, "doomed") == std::map<uint64_t, int>{{2, 1}});

  // Combined cleaning of segments 2 and 3 keeps it too (in a survivor).
  CHECK(om.cleaner().clean_combined({segment(log, 2), segment(log, 3)}) > 0);
  CHECK(!log.contains_segment(2));
  CHECK(log.contains_segment(1));
  where = tombstones_for(log, "doomed");
  REQUIRE(total(where) == 1);
  uint64_t holder = where.begin()->first;
  CHECK(holder > 4);

  // Now segment 1 leaves the log (combined with the head that committed the survivors).
  REQUIRE(log.roll_head() == Status::kOk);
  std::vector<Segment*> without_holder;
  for (Segment* s : log.cleanable_segments()) {
    if (s->id() != holder) without_holder.push_back(s);
  }
  REQUIRE(without_holder.size() >= 2);
  CHECK(om.cleaner().clean_combined(without_holder) > 0);
  REQUIRE(!log.contains_segment(1));
  // Still there: nothing has cleaned the survivor that holds it.
  CHECK(tombstones_for(log, "doomed") == std::map<uint64_t, int>{{holder, 1}});

  // The next cleaning of its segment drops it.
  om.cleaner().compact(segment(log, holder));
  CHECK(total(tombstones_for(log, "doomed")) == 0);
  std::string out;
  CHECK(om.read(1, "doomed", &out).status() == Status::kObjectNotFound);
  check_all(om, model);
  check_head(om);
}

TEST_CASE("log cleaner: a tombstone in the same segment as its object is kept by compaction",
          "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  std::map<std::string, std::string> model;
  REQUIRE(om.write(1, "doomed", std::string(3000, 'd')).ok());
  write_range(om, 0, 10, 500, 0, &model);
  REQUIRE(om.remove(1, "doomed").ok());
  REQUIRE(om.log().roll_head() == Status::kOk);
  CHECK(om.cleaner().compact(segment(om.log(), 1)) > 0);
  // The object is gone from memory, but the segment's replicas still hold it.
  CHECK(tombstones_for(om.log(), "doomed") == std::map<uint64_t, int>{{1, 1}});
  CHECK(scan(om.log(), 1).objects == 10);
  check_all(om, model);
}

TEST_CASE("log cleaner: the newest head's digest names exactly the segments of the log",
          "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  std::map<std::string, std::string> model;
  check_head(om);
  REQUIRE(om.log().segment_ids() == std::vector<uint64_t>{1});
  for (int round = 0; round < 8; ++round) {
    INFO("round " << round);
    // Enough data to roll the head by itself now and then.
    write_range(om, 0, 50, 900, round, &model);
    check_head(om, false);
    if (round % 3 == 0) {
      REQUIRE(om.log().roll_head() == Status::kOk);
      check_head(om);
    }
    om.cleaner().clean_once();
    check_head(om, false);
  }
  auto ids = om.log().segment_ids();
  CHECK(om.stats().log.segment_count == ids.size());
  check_all(om, model);
}

TEST_CASE("log cleaner: a new head's safe version is above every version issued before it",
          "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  auto first = scan(om.log(), head_id(om.log()));
  REQUIRE(first.safe_version.has_value());
  CHECK(*first.safe_version >= 1);

  uint64_t highest = 0;
  for (int i = 0; i < 50; ++i) {
    auto v = om.write(1, "k" + std::to_string(i % 7), std::string(300, 'x'));
    REQUIRE(v.ok());
    highest = std::max(highest, *v);
  }
  auto inc = om.increment(1, "n", 1);
  REQUIRE(inc.ok());
  highest = std::max(highest, inc->version);
  REQUIRE(om.log().roll_head() == Status::kOk);
  auto head = scan(om.log(), head_id(om.log()));
  REQUIRE(head.safe_version.has_value());
  CHECK(*head.safe_version > highest);

  // The head a combined pass opens, too.
  for (int i = 0; i < 50; ++i) {
    auto v = om.write(1, "k" + std::to_string(i % 7), std::string(300, 'y'));
    REQUIRE(v.ok());
    highest = std::max(highest, *v);
  }
  REQUIRE(om.log().roll_head() == Status::kOk);
  REQUIRE(om.cleaner().clean_combined(om.log().cleanable_segments()) > 0);
  head = scan(om.log(), head_id(om.log()));
  REQUIRE(head.safe_version.has_value());
  CHECK(*head.safe_version > highest);
  // And a version issued afterwards is at least the safe version.
  auto later = om.write(1, "later", "v");
  REQUIRE(later.ok());
  CHECK(*later >= *head.safe_version);
}

TEST_CASE("log cleaner: the table statistics in a new head match the object manager's",
          "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  for (int i = 0; i < 30; ++i) REQUIRE(om.write(1, "a" + std::to_string(i), "v").ok());
  for (int i = 0; i < 10; ++i) REQUIRE(om.write(2, "b" + std::to_string(i), "vv").ok());
  for (int i = 0; i < 5; ++i) REQUIRE(om.write(3, "c" + std::to_string(i), "vvv").ok());
  for (int i = 0; i < 5; ++i) REQUIRE(om.remove(3, "c" + std::to_string(i)).ok());
  REQUIRE(om.write(1, "a0", std::string(100, 'x')).ok());
  REQUIRE(om.log().roll_head() == Status::kOk);

  auto head = scan(om.log(), head_id(om.log()));
  REQUIRE(head.table_stats.has_value());
  auto in_head = sorted(*head.table_stats);
  REQUIRE(in_head.size() == 2);  // table 3 is empty
  CHECK(in_head[0].table_id == 1);
  CHECK(in_head[0].object_count == 30);
  CHECK(in_head[1].table_id == 2);
  CHECK(in_head[1].object_count == 10);
  CHECK(in_head == sorted(om.table_stats()));
  // The byte counts are the objects' entries in the log: cleaning moves them unchanged.
  CHECK(om.cleaner().clean_combined(om.log().cleanable_segments()) == 0);  // one segment
  REQUIRE(om.log().roll_head() == Status::kOk);
  om.cleaner().compact(segment(om.log(), 1));
  REQUIRE(om.log().roll_head() == Status::kOk);
  CHECK(sorted(*scan(om.log(), head_id(om.log())).table_stats) == in_head);
}

TEST_CASE("log cleaner: live bytes follow overwrites, removes and moves", "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  std::map<std::string, std::string> model;
  // Keys of one length and small versions: every entry has the same size.
  write_range(om, 10, 50, 500, 0, &model);
  REQUIRE(om.log().roll_head() == Status::kOk);
  uint64_t all_live = segment(om.log(), 1)->live_bytes();
  uint64_t table_bytes = om.table_stats().at(0).object_bytes;
  CHECK(all_live == table_bytes);
  write_range(om, 10, 40, 500, 1, &model);
  uint64_t quarter_live = segment(om.log(), 1)->live_bytes();
  CHECK(quarter_live * 4 == all_live);
  // The overwrites' tombstones (naming segment 1) are live in the head.
  REQUIRE(tombstones_for(om.log(), "key10") == std::map<uint64_t, int>{{2, 1}});
  CHECK(tombstone_bytes(om.log()) > 0);
  CHECK(om.stats().log.live_bytes ==
        om.table_stats().at(0).object_bytes + tombstone_bytes(om.log()));
  om.cleaner().compact(segment(om.log(), 1));
  CHECK(segment(om.log(), 1)->live_bytes() == quarter_live);
  CHECK(om.stats().log.live_bytes ==
        om.table_stats().at(0).object_bytes + tombstone_bytes(om.log()));
  check_all(om, model);
  // Once segment 1 leaves the log, cleaning their segment drops them.
  REQUIRE(om.log().roll_head() == Status::kOk);
  REQUIRE(om.cleaner().clean_combined(om.log().cleanable_segments()) > 0);
  REQUIRE(!om.log().contains_segment(1));
  for (Segment* s : om.log().cleanable_segments()) om.cleaner().compact(s);
  CHECK(tombstone_bytes(om.log()) == 0);
  CHECK(om.stats().log.live_bytes == om.table_stats().at(0).object_bytes);
  check_all(om, model);
}

TEST_CASE("log cleaner: tombstones die with the segment they name, and cleaning takes them back",
          "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  Log& log = om.log();
  std::map<std::string, std::string> model;
  write_range(om, 0, 40, 500, 0, &model);  // segment 1
  REQUIRE(log.roll_head() == Status::kOk);
  write_range(om, 0, 30, 500, 1, &model);  // segment 2: 30 tombstones naming segment 1
  REQUIRE(log.roll_head() == Status::kOk);
  write_range(om, 100, 110, 500, 0, &model);  // segment 3
  REQUIRE(log.roll_head() == Status::kOk);
  const uint64_t dying = scan(log, 2).tombstone_bytes;
  REQUIRE(dying > 0);
  CHECK(om.tombstone_bytes_naming(1) == dying);
  CHECK(om.tombstone_bytes_naming(2) == 0);

  // Moved into a survivor, they still count there.
  REQUIRE(om.cleaner().clean_combined({segment(log, 2), segment(log, 3)}) > 0);
  auto where = tombstones_for(log, "key0");
  REQUIRE(total(where) == 1);
  const uint64_t holder = where.begin()->first;
  CHECK(scan(log, holder).tombstone_bytes == dying);
  CHECK(om.tombstone_bytes_naming(1) == dying);
  const uint64_t holder_live = segment(log, holder)->live_bytes();
  CHECK(om.stats().log.live_bytes == om.table_stats().at(0).object_bytes + dying);

  // Segment 1 leaves the log (alone: what frees memory here is its tombstones dying).
  CHECK(om.cleaner().clean_combined({segment(log, 1)}) > 0);
  REQUIRE(!log.contains_segment(1));
  CHECK(om.tombstone_bytes_naming(1) == 0);
  CHECK(om.cleaner().stats().tombstone_bytes_killed == dying);
  CHECK(segment(log, holder)->live_bytes() == holder_live - dying);
  CHECK(om.stats().log.live_bytes == om.table_stats().at(0).object_bytes);

  // The next compaction of their segment drops them (here less than a seglet).
  om.cleaner().compact(segment(log, holder));
  CHECK(scan(log, holder).tombstone_bytes == 0);
  CHECK(segment(log, holder)->live_bytes() == holder_live - dying);
  check_all(om, model);
  check_head(om);
}

TEST_CASE("log cleaner: clean_once removes segments first when tombstones fill the memory",
          "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  Log& log = om.log();
  // Long keys and empty values: each overwrite's tombstone is as large as its object.
  auto key_of = [](int i) { return std::to_string(i) + std::string(1000, 'k'); };
  for (int i = 0; i < 40; ++i) REQUIRE(om.write(1, key_of(i), "").ok());
  REQUIRE(log.roll_head() == Status::kOk);
  for (int round = 0; round < 7; ++round) {
    for (int i = 0; i < 40; ++i) REQUIRE(om.write(1, key_of(i), "").ok());
  }
  REQUIRE(log.roll_head() == Status::kOk);
  // About 284 KB of tombstones, over a quarter of the memory that 40 KB of objects leave.
  const uint64_t tombstones = om.stats().tombstone_bytes;
  REQUIRE(tombstones * 4 > log.stats().memory_bytes - om.table_stats().at(0).object_bytes);

  CHECK(om.cleaner().clean_once() > 0);
  auto stats = om.cleaner().stats();
  CHECK(stats.combined_passes == 1);
  CHECK(stats.compactions == 0);
  CHECK(stats.tombstone_bytes_killed > 0);
  CHECK(om.stats().tombstone_bytes == tombstones - stats.tombstone_bytes_killed);
  CHECK(!log.contains_segment(1));
  for (int i = 0; i < 40; ++i) {
    std::string out;
    CHECK(om.read(1, key_of(i), &out).ok());
  }
  check_head(om);
}

TEST_CASE("log cleaner: a combined pass drops a tombstone naming a victim it has moved out",
          "[master][log_cleaner]") {
  ManualClock clock;
  auto created = ObjectManager::create(manual_config(), clock);
  REQUIRE(created.ok());
  auto& om = **created;
  Log& log = om.log();
  std::map<std::string, std::string> model;
  // Segment 1: the doomed object. Segment 2, younger: its tombstone. Older segments score
  // higher, so the pass moves segment 1 out before it reaches the tombstone.
  REQUIRE(om.write(1, "doomed", "value").ok());
  write_range(om, 0, 10, 200, 0, &model);
  REQUIRE(log.roll_head() == Status::kOk);
  clock.advance_seconds(100);
  REQUIRE(om.remove(1, "doomed").ok());
  write_range(om, 10, 20, 200, 0, &model);
  // And a tombstone in the same segment as its object.
  REQUIRE(om.write(1, "self", "value").ok());
  REQUIRE(om.remove(1, "self").ok());
  REQUIRE(log.roll_head() == Status::kOk);
  clock.advance_seconds(100);
  REQUIRE(tombstones_for(log, "doomed") == std::map<uint64_t, int>{{2, 1}});
  REQUIRE(tombstones_for(log, "self") == std::map<uint64_t, int>{{2, 1}});

  REQUIRE(om.cleaner().clean_combined({segment(log, 1), segment(log, 2)}) > 0);
  CHECK(!log.contains_segment(1));
  CHECK(!log.contains_segment(2));
  // Neither moved: the objects they kill left the log with the same commit.
  CHECK(total(tombstones_for(log, "doomed")) == 0);
  CHECK(total(tombstones_for(log, "self")) == 0);
  CHECK(tombstone_bytes(log) == 0);
  CHECK(om.stats().log.live_bytes == om.table_stats().at(0).object_bytes);
  std::string out;
  CHECK(om.read(1, "doomed", &out).status() == Status::kObjectNotFound);
  CHECK(om.read(1, "self", &out).status() == Status::kObjectNotFound);
  check_all(om, model);
  check_head(om);
}

TEST_CASE("log cleaner: random overwrites at 90% utilisation never leave the cleaner stuck",
          "[master][log_cleaner]") {
  // The shape of `ramkv-bench memory` at 90% (small objects; 32 seglets a segment; the
  // reserve one segment), driven by hand so that it is the same run every time. Every
  // overwrite leaves a tombstone that only a combined pass can kill, so memory fills with
  // objects and tombstones and no segment holds a seglet of garbage; the cleaner must
  // still find the passes that give memory back. It once stopped choosing victims at the
  // first that did not fit, so a small segment ranked first made a pass of one that gave
  // nothing back, and writes failed with kNoSpace after 15,000 overwrites with 6% of
  // memory held by tombstones.
  ManualClock clock;
  MasterConfig config = manual_config();
  config.memory_bytes = 8u << 20;
  config.segment_bytes = 256u << 10;
  config.seglet_bytes = 8u << 10;
  auto created = ObjectManager::create(config, clock);
  REQUIRE(created.ok());
  auto& om = **created;
  Log& log = om.log();
  const std::string value(100, 'v');
  auto key_of = [](uint64_t i) { return fmt::format("key{:013}", i); };
  // 132-byte entries filling 90% of memory.
  const uint64_t objects = config.memory_bytes * 9 / 10 / 132;
  // Cleans the way the cleaner thread does (log_cleaner.cc, run()): until twice the low
  // watermark is free. False if nothing could be freed with no memory left for data.
  auto clean = [&] {
    for (int i = 0; i < 10'000; ++i) {
      if (log.free_for_data() >= 2 * log.low_free_seglets()) return true;
      if (om.cleaner().clean_once() == 0) return log.free_for_data() > 0;
    }
    FAIL("10,000 units of cleaning, each reporting progress, and memory still short");
    return false;
  };
  auto write = [&](uint64_t i) {
    for (int attempt = 0; attempt < 2; ++attempt) {
      auto r = om.write(1, key_of(i), value);
      if (r.ok()) return true;
      if (r.status() != Status::kRetry) FAIL("write failed: " << status_name(r.status()));
      if (!clean()) return false;
    }
    return false;
  };
  for (uint64_t i = 0; i < objects; ++i) REQUIRE(write(i));
  Random rng(42);
  uint64_t written = 0;
  for (; written < 3 * objects; ++written) {
    clock.advance_ns(1'000'000);
    const uint64_t i = rng.next() % objects;
    if (!write(i)) break;
  }
  INFO("stuck after " << written << " overwrites; tombstones " << om.stats().tombstone_bytes
                      << " B, live " << log.stats().live_bytes << " B of "
                      << log.stats().memory_bytes);
  CHECK(written == 3 * objects);
  CHECK(om.cleaner().stats().tombstone_bytes_killed > 0);
  CHECK(om.stats().object_count == objects);
  std::string out;
  for (uint64_t i = 0; i < objects; ++i) {
    if (!om.read(1, key_of(i), &out).ok() || out != value) FAIL("object " << i << " lost");
  }
  check_head(om, false);
}

}  // namespace ramkv::master

// TabletSet: the key-hash ranges a master owns, per table. A request for (table, key) is
// served only if key_hash(table, key) falls in an owned range (docs/rpc.md, "Master").
//
// Owner: MasterService. Threads: not thread-safe; only the dispatch thread touches it.
// Ranges are kept merged, so a tablet taken twice, or two adjacent tablets, are one range;
// dropping a tablet cuts exactly its hashes out again.
// Invariants:
//   1. Per table, ranges are sorted by start_hash, disjoint and not adjacent (a gap of at
//      least one hash separates neighbours); start_hash <= end_hash in each.
//   2. A table with no ranges has no entry.
#pragma once

#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace ramkv::master {

class TabletSet {
 public:
  struct Range {
    uint64_t start_hash = 0;  // inclusive
    uint64_t end_hash = 0;    // inclusive
  };

  // Adds the range (start_hash <= end_hash); hashes already owned stay owned.
  void add(uint64_t table_id, Range range);
  // Forgets the range's hashes; those not owned are ignored.
  void remove(uint64_t table_id, Range range);
  // Whether `hash` of `table_id` is owned. O(log ranges of the table).
  bool contains(uint64_t table_id, uint64_t hash) const;
  // Whether every hash of the range is owned.
  bool covers(uint64_t table_id, Range range) const;
  // Whether any hash of the range is owned.
  bool overlaps(uint64_t table_id, Range range) const;
  // How many merged ranges there are, over all tables.
  size_t range_count() const;
  std::vector<Range> ranges(uint64_t table_id) const;

 private:
  // The range holding `hash`, or nullptr.
  const Range* find(uint64_t table_id, uint64_t hash) const;

  std::unordered_map<uint64_t, std::vector<Range>> tables_;
};

}  // namespace ramkv::master

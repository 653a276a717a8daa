#include "master/tablet_set.h"

#include <algorithm>

#include "common/assert.h"

namespace ramkv::master {

namespace {

// True when `a` ends before `b` starts with at least one hash between them, so the two
// must stay separate ranges (invariant 1).
bool gap_between(TabletSet::Range a, TabletSet::Range b) {
  return a.end_hash < b.start_hash && b.start_hash - a.end_hash > 1;
}

}  // namespace

void TabletSet::add(uint64_t table_id, Range range) {
  RAMKV_CHECK(range.start_hash <= range.end_hash);
  std::vector<Range>& ranges = tables_[table_id];
  std::vector<Range> out;
  out.reserve(ranges.size() + 1);
  Range merged = range;
  // The input is sorted and gapped, so one pass finds every range that touches `merged`.
  for (Range r : ranges) {
    if (gap_between(r, merged) || gap_between(merged, r)) {
      out.push_back(r);
    } else {
      merged.start_hash = std::min(merged.start_hash, r.start_hash);
      merged.end_hash = std::max(merged.end_hash, r.end_hash);
    }
  }
  auto at = std::lower_bound(out.begin(), out.end(), merged,
                             [](Range a, Range b) { return a.start_hash < b.start_hash; });
  out.insert(at, merged);
  ranges = std::move(out);
}

void TabletSet::remove(uint64_t table_id, Range range) {
  auto it = tables_.find(table_id);
  if (it == tables_.end()) return;
  std::vector<Range> out;
  out.reserve(it->second.size() + 1);
  for (Range r : it->second) {
    if (r.end_hash < range.start_hash || r.start_hash > range.end_hash) {
      out.push_back(r);
      continue;
    }
    // The guards keep the +1/-1 from wrapping at 0 and UINT64_MAX.
    if (r.start_hash < range.start_hash) out.push_back({r.start_hash, range.start_hash - 1});
    if (r.end_hash > range.end_hash) out.push_back({range.end_hash + 1, r.end_hash});
  }
  if (out.empty()) {
    tables_.erase(it);
  } else {
    it->second = std::move(out);
  }
}

const TabletSet::Range* TabletSet::find(uint64_t table_id, uint64_t hash) const {
  auto it = tables_.find(table_id);
  if (it == tables_.end()) return nullptr;
  const std::vector<Range>& ranges = it->second;
  // The last range starting at or below `hash` is the only candidate.
  auto after = std::upper_bound(ranges.begin(), ranges.end(), hash,
                                [](uint64_t h, Range r) { return h < r.start_hash; });
  if (after == ranges.begin()) return nullptr;
  const Range& r = *(after - 1);
  return hash <= r.end_hash ? &r : nullptr;
}

bool TabletSet::contains(uint64_t table_id, uint64_t hash) const {
  return find(table_id, hash) != nullptr;
}

bool TabletSet::covers(uint64_t table_id, Range range) const {
  if (range.start_hash > range.end_hash) return false;
  // Merged ranges (invariant 1) mean a covered range lies inside a single one.
  const Range* r = find(table_id, range.start_hash);
  return r != nullptr && range.end_hash <= r->end_hash;
}

bool TabletSet::overlaps(uint64_t table_id, Range range) const {
  auto it = tables_.find(table_id);
  if (it == tables_.end() || range.start_hash > range.end_hash) return false;
  // The first range ending at or after the start (invariant 1: sorted and disjoint).
  auto r = std::lower_bound(it->second.begin(), it->second.end(), range.start_hash,
                            [](const Range& a, uint64_t hash) { return a.end_hash < hash; });
  return r != it->second.end() && r->start_hash <= range.end_hash;
}

size_t TabletSet::range_count() const {
  size_t n = 0;
  for (const auto& [id, ranges] : tables_) n += ranges.size();
  return n;
}

std::vector<TabletSet::Range> TabletSet::ranges(uint64_t table_id) const {
  auto it = tables_.find(table_id);
  return it == tables_.end() ? std::vector<Range>{} : it->second;
}

}  // namespace ramkv::master

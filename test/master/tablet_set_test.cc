// Tests for master/tablet_set.h.
#include <catch2/catch.hpp>

#include "master/tablet_set.h"

namespace ramkv::master {
namespace {

using Range = TabletSet::Range;

bool same(const std::vector<Range>& a, const std::vector<Range>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].start_hash != b[i].start_hash || a[i].end_hash != b[i].end_hash) return false;
  }
  return true;
}

TEST_CASE("tablet set: a hash is owned only inside an added range", "[master][tablet_set]") {
  TabletSet s;
  CHECK_FALSE(s.contains(1, 0));
  s.add(1, {100, 200});
  CHECK(s.contains(1, 100));
  CHECK(s.contains(1, 200));
  CHECK_FALSE(s.contains(1, 99));
  CHECK_FALSE(s.contains(1, 201));
  CHECK_FALSE(s.contains(2, 150));
  s.add(1, {UINT64_MAX - 1, UINT64_MAX});
  s.add(1, {0, 0});
  CHECK(s.contains(1, UINT64_MAX));
  CHECK(s.contains(1, 0));
  CHECK_FALSE(s.contains(1, 1));
  CHECK(s.range_count() == 3);
}

TEST_CASE("tablet set: overlapping, duplicate and adjacent ranges merge", "[master][tablet_set]") {
  TabletSet s;
  s.add(1, {10, 20});
  s.add(1, {10, 20});
  CHECK(s.range_count() == 1);
  s.add(1, {21, 30});  // adjacent
  s.add(1, {40, 50});
  CHECK(same(s.ranges(1), {{10, 30}, {40, 50}}));
  s.add(1, {25, 45});  // bridges both
  CHECK(same(s.ranges(1), {{10, 50}}));
  s.add(1, {0, UINT64_MAX});
  CHECK(same(s.ranges(1), {{0, UINT64_MAX}}));
  CHECK(s.covers(1, {0, UINT64_MAX}));
}

TEST_CASE("tablet set: a range overlaps where any of its hashes is owned", "[master][tablet_set]") {
  TabletSet s;
  CHECK_FALSE(s.overlaps(1, {0, UINT64_MAX}));
  s.add(1, {100, 200});
  s.add(1, {300, 400});
  CHECK(s.overlaps(1, {0, 100}));
  CHECK(s.overlaps(1, {200, 250}));
  CHECK(s.overlaps(1, {150, 160}));
  CHECK(s.overlaps(1, {0, UINT64_MAX}));
  CHECK(s.overlaps(1, {250, 300}));
  CHECK_FALSE(s.overlaps(1, {0, 99}));
  CHECK_FALSE(s.overlaps(1, {201, 299}));
  CHECK_FALSE(s.overlaps(1, {401, UINT64_MAX}));
  CHECK_FALSE(s.overlaps(2, {0, UINT64_MAX}));
  CHECK_FALSE(s.overlaps(1, {300, 299}));  // empty
}

TEST_CASE("tablet set: removing a range cuts exactly its hashes out", "[master][tablet_set]") {
  TabletSet s;
  s.add(1, {0, UINT64_MAX});
  s.remove(1, {100, 200});
  CHECK(same(s.ranges(1), {{0, 99}, {201, UINT64_MAX}}));
  CHECK(s.covers(1, {0, 99}));
  CHECK_FALSE(s.covers(1, {0, 100}));
  CHECK_FALSE(s.covers(1, {50, 300}));
  s.remove(1, {0, 99});
  s.remove(1, {UINT64_MAX, UINT64_MAX});
  CHECK(same(s.ranges(1), {{201, UINT64_MAX - 1}}));
  s.remove(1, {0, UINT64_MAX});
  CHECK(s.range_count() == 0);
  s.remove(7, {0, 5});  // nothing owned: nothing happens
  CHECK(s.range_count() == 0);
}

}  // namespace
}  // namespace ramkv::master

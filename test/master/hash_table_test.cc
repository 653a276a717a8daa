#include "master/hash_table.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <set>
#include <vector>

#include "common/clock.h"

namespace ramkv::master {
namespace {

// Finds the entry for (hash, ref): the matcher plays the part of the key comparison.
HashTable::SlotRef find_ref(HashTable& t, uint64_t hash, LogRef ref) {
  return t.find(hash, [&](LogRef candidate) { return candidate == ref; });
}

std::multiset<LogRef> bucket_refs(const HashTable& t, uint64_t bucket) {
  std::multiset<LogRef> refs;
  t.for_each_in_bucket(bucket, [&](LogRef r) { refs.insert(r); });
  return refs;
}

TEST_CASE("hash_table: an inserted entry is found, updated and erased", "[master][hash_table]") {
  HashTable t(64);
  CHECK(t.bucket_count() == 64);
  CHECK(t.memory_bytes() == 64 * 64);
  uint64_t hash = 0x0123456789abcdefULL;
  CHECK_FALSE(find_ref(t, hash, 100));
  t.insert(hash, 100);
  auto slot = find_ref(t, hash, 100);
  REQUIRE(slot);
  CHECK(slot.ref() == 100);
  // A matcher that rejects the candidate finds nothing.
  CHECK_FALSE(t.find(hash, [](LogRef) { return false; }));
  // Another hash, even in the same bucket, does not match the tag.
  CHECK_FALSE(t.find(hash ^ 1, [](LogRef) { return true; }));

  slot.set_ref(200);
  CHECK_FALSE(find_ref(t, hash, 100));
  auto moved = find_ref(t, hash, 200);
  REQUIRE(moved);
  CHECK(moved.ref() == 200);

  t.erase(moved);
  CHECK_FALSE(find_ref(t, hash, 200));
  CHECK_FALSE(t.find(hash, [](LogRef) { return true; }));
  CHECK(t.overflow_bucket_count() == 0);
}

TEST_CASE("hash_table: reference zero and the largest reference are stored exactly",
          "[master][hash_table]") {
  HashTable t(16);
  t.insert(1, 0);
  t.insert(2, HashTable::kMaxRef);
  auto zero = find_ref(t, 1, 0);
  REQUIRE(zero);
  CHECK(zero.ref() == 0);
  auto max = find_ref(t, 2, HashTable::kMaxRef);
  REQUIRE(max);
  CHECK(max.ref() == HashTable::kMaxRef);
  // set_ref keeps the tag.
  max.set_ref(0);
  CHECK(find_ref(t, 2, 0));
  CHECK_FALSE(find_ref(t, 1, HashTable::kMaxRef));
}

TEST_CASE("hash_table: keys with the same tag are told apart by the matcher",
          "[master][hash_table]") {
  HashTable t(1);
  // Same low 23 bits (the tag), different high bits.
  uint64_t a = (uint64_t{1} << 40) | 0x1234;
  uint64_t b = (uint64_t{2} << 40) | 0x1234;
  t.insert(a, 10);
  t.insert(b, 20);
  CHECK(find_ref(t, a, 10));
  CHECK(find_ref(t, b, 20));
  // The tag alone does not tell them apart: both entries are candidates for either hash.
  std::set<LogRef> candidates;
  t.find(a, [&](LogRef r) {
    candidates.insert(r);
    return false;
  });
  CHECK(candidates == std::set<LogRef>{10, 20});
}

TEST_CASE("hash_table: many entries in one bucket chain into overflow buckets and stay findable",
          "[master][hash_table]") {
  HashTable t(1);
  Random rng(1);
  std::map<LogRef, uint64_t> entries;  // ref -> hash
  for (LogRef ref = 0; ref < 200; ++ref) {
    uint64_t hash = rng.next();
    t.insert(hash, ref);
    entries[ref] = hash;
  }
  CHECK(t.overflow_bucket_count() > 0);
  // 7 entries per chained bucket plus 8 in the last one: at least this many overflows.
  CHECK(t.overflow_bucket_count() >= (200 - 8 + 6) / 7);
  CHECK(t.memory_bytes() == (1 + t.overflow_bucket_count()) * 64);
  for (const auto& [ref, hash] : entries) {
    auto slot = find_ref(t, hash, ref);
    INFO("ref " << ref);
    REQUIRE(slot);
    CHECK(slot.ref() == ref);
  }
}

TEST_CASE("hash_table: erasing a chained entry leaves the others findable",
          "[master][hash_table]") {
  HashTable t(1);
  Random rng(2);
  std::vector<uint64_t> hashes;
  for (LogRef ref = 0; ref < 50; ++ref) {
    hashes.push_back(rng.next());
    t.insert(hashes.back(), ref);
  }
  uint64_t overflows = t.overflow_bucket_count();
  REQUIRE(overflows > 0);
  // The first entries sit in the base bucket, the last ones deep in the chain.
  for (LogRef victim : {LogRef{0}, LogRef{7}, LogRef{25}, LogRef{49}}) {
    auto slot = find_ref(t, hashes[victim], victim);
    REQUIRE(slot);
    t.erase(slot);
    CHECK_FALSE(find_ref(t, hashes[victim], victim));
  }
  for (LogRef ref = 0; ref < 50; ++ref) {
    bool erased = ref == 0 || ref == 7 || ref == 25 || ref == 49;
    INFO("ref " << ref);
    CHECK(static_cast<bool>(find_ref(t, hashes[ref], ref)) == !erased);
  }
  // Freed slots are reused before the chain grows.
  for (LogRef ref = 100; ref < 104; ++ref) t.insert(rng.next(), ref);
  CHECK(t.overflow_bucket_count() == overflows);
  CHECK(bucket_refs(t, 0).size() == 50);
}

TEST_CASE("hash_table: for_each_in_bucket visits each entry of the chain exactly once",
          "[master][hash_table]") {
  HashTable t(4);
  Random rng(3);
  std::vector<std::multiset<LogRef>> expected(4);
  for (LogRef ref = 0; ref < 100; ++ref) {
    uint64_t hash = rng.next();
    t.insert(hash, ref);
    expected[static_cast<size_t>(t.bucket_of(hash))].insert(ref);
  }
  // The same ref inserted twice is two entries.
  uint64_t dup_hash = rng.next();
  t.insert(dup_hash, 1000);
  t.insert(dup_hash, 1000);
  expected[static_cast<size_t>(t.bucket_of(dup_hash))].insert({1000, 1000});

  size_t total = 0;
  for (uint64_t b = 0; b < 4; ++b) {
    auto got = bucket_refs(t, b);
    CHECK(got == expected[static_cast<size_t>(b)]);
    total += got.size();
  }
  CHECK(total == 102);
  CHECK(t.overflow_bucket_count() > 0);
}

TEST_CASE("hash_table: an empty bucket visits nothing", "[master][hash_table]") {
  HashTable t(8);
  CHECK(bucket_refs(t, 0).empty());
  CHECK(bucket_refs(t, 7).empty());
  t.insert(0, 5);  // bucket 0
  CHECK(bucket_refs(t, 0) == std::multiset<LogRef>{5});
  CHECK(bucket_refs(t, 7).empty());
}

TEST_CASE("hash_table: bucket_of is monotonic in the hash and covers every bucket",
          "[master][hash_table]") {
  for (uint64_t count : {uint64_t{1}, uint64_t{3}, uint64_t{1000}, uint64_t{1} << 20}) {
    HashTable t(count);
    CHECK(t.bucket_of(0) == 0);
    CHECK(t.bucket_of(UINT64_MAX) == count - 1);
    Random rng(count);
    std::vector<uint64_t> hashes{0, 1, UINT64_MAX, UINT64_MAX - 1, uint64_t{1} << 63};
    for (int i = 0; i < 2000; ++i) hashes.push_back(rng.next());
    std::sort(hashes.begin(), hashes.end());
    uint64_t prev = 0;
    for (uint64_t h : hashes) {
      uint64_t b = t.bucket_of(h);
      INFO("count " << count << " hash " << h);
      REQUIRE(b < count);
      REQUIRE(b >= prev);
      prev = b;
    }
  }
  HashTable four(4);
  CHECK(four.bucket_of((uint64_t{1} << 62) - 1) == 0);
  CHECK(four.bucket_of(uint64_t{1} << 62) == 1);
  CHECK(four.bucket_of(uint64_t{1} << 63) == 2);
  CHECK(four.bucket_of(uint64_t{3} << 62) == 3);
}

}  // namespace
}  // namespace ramkv::master

#include "master/seglet_pool.h"

#include <catch2/catch.hpp>

#include <cstring>
#include <set>
#include <vector>

#include "master/segment.h"

namespace ramkv::master {
namespace {

std::unique_ptr<SegletPool> make_pool(uint64_t memory_bytes, uint32_t seglet_bytes,
                                      uint32_t reserve_seglets = 0) {
  auto pool = SegletPool::create({.memory_bytes = memory_bytes,
                                  .seglet_bytes = seglet_bytes,
                                  .reserve_seglets = reserve_seglets,
                                  .prefault = false});
  REQUIRE(pool.ok());
  return std::move(pool).value();
}

// A segment used only as an owner token: it never appends, so it takes no seglets.
struct OwnerToken {
  explicit OwnerToken(SegletPool& pool)
      : segment(pool, {.id = 1, .capacity = pool.seglet_bytes()}) {}
  Segment segment;
};

TEST_CASE("seglet_pool: the pool is cut into whole seglets", "[master][seglet_pool]") {
  auto pool = make_pool(64 * 1024 + 100, 1024);
  CHECK(pool->seglet_bytes() == 1024);
  CHECK(pool->seglet_count() == 64);
  CHECK(pool->free_count() == 64);
  CHECK(pool->memory_bytes() == 64 * 1024);
  CHECK(pool->free_for_head() == 64);
}

TEST_CASE("seglet_pool: a large arena lies on 2 MiB boundaries and is all usable",
          "[master][seglet_pool]") {
  // Aligned so that the kernel can back all of it with huge pages (where it has them on);
  // the trimmed mapping still holds every seglet, first byte to last, prefaulted or not.
  for (bool prefault : {false, true}) {
    auto created = SegletPool::create({.memory_bytes = (uint64_t{6} << 20) + 4096,
                                       .seglet_bytes = 64 * 1024,
                                       .prefault = prefault});
    REQUIRE(created.ok());
    auto pool = std::move(created).value();
    const auto arena = pool->arena();
    CHECK(reinterpret_cast<uintptr_t>(arena.data()) % (uintptr_t{2} << 20) == 0);
    CHECK(arena.size() == uint64_t{6} << 20);
    auto* bytes = const_cast<std::byte*>(arena.data());
    std::memset(bytes, 0x5A, arena.size());
    CHECK(bytes[0] == std::byte{0x5A});
    CHECK(bytes[arena.size() - 1] == std::byte{0x5A});
  }
}

TEST_CASE("seglet_pool: allocation hands out distinct seglets until exhausted",
          "[master][seglet_pool]") {
  auto pool = make_pool(16 * 512, 512);
  OwnerToken owner(*pool);
  std::set<uint32_t> got;
  for (uint32_t i = 0; i < 16; ++i) {
    uint32_t s = pool->allocate(SegletPool::Purpose::kHead, &owner.segment, i);
    REQUIRE(s != SegletPool::kNoSeglet);
    CHECK(s < pool->seglet_count());
    CHECK(got.insert(s).second);
    CHECK(pool->free_count() == 16 - i - 1);
  }
  CHECK(pool->allocate(SegletPool::Purpose::kHead, &owner.segment, 16) == SegletPool::kNoSeglet);
  CHECK(pool->allocate(SegletPool::Purpose::kCleaner, &owner.segment, 16) == SegletPool::kNoSeglet);
  CHECK(pool->free_count() == 0);
  for (uint32_t s : got) pool->free(s);
  CHECK(pool->free_count() == 16);
}

TEST_CASE("seglet_pool: seglet memory is distinct, aligned to the seglet and writable",
          "[master][seglet_pool]") {
  auto pool = make_pool(8 * 512, 512);
  OwnerToken owner(*pool);
  std::vector<uint32_t> seglets;
  for (uint32_t i = 0; i < 8; ++i) {
    seglets.push_back(pool->allocate(SegletPool::Purpose::kHead, &owner.segment, i));
  }
  for (uint32_t s : seglets) std::memset(pool->seglet_memory(s), static_cast<int>(s), 512);
  for (uint32_t s : seglets) {
    const std::byte* mem = pool->seglet_memory(s);
    CHECK(mem == pool->seglet_memory(0) + pool->arena_offset(s));
    CHECK(pool->arena_offset(s) == uint64_t{s} * 512);
    CHECK(mem[0] == static_cast<std::byte>(s));
    CHECK(mem[511] == static_cast<std::byte>(s));
  }
  for (uint32_t s : seglets) pool->free(s);
}

TEST_CASE("seglet_pool: the head cannot take the cleaner's reserve but the cleaner can",
          "[master][seglet_pool]") {
  auto pool = make_pool(10 * 512, 512, 3);
  OwnerToken owner(*pool);
  CHECK(pool->reserve_seglets() == 3);
  CHECK(pool->free_for_head() == 7);
  std::vector<uint32_t> taken;
  for (uint32_t i = 0; i < 7; ++i) {
    uint32_t s = pool->allocate(SegletPool::Purpose::kHead, &owner.segment, i);
    REQUIRE(s != SegletPool::kNoSeglet);
    taken.push_back(s);
  }
  CHECK(pool->free_for_head() == 0);
  CHECK(pool->free_count() == 3);
  CHECK(pool->allocate(SegletPool::Purpose::kHead, &owner.segment, 7) == SegletPool::kNoSeglet);
  CHECK(pool->free_count() == 3);
  for (uint32_t i = 0; i < 3; ++i) {
    uint32_t s = pool->allocate(SegletPool::Purpose::kCleaner, &owner.segment, 7 + i);
    REQUIRE(s != SegletPool::kNoSeglet);
    taken.push_back(s);
  }
  CHECK(pool->free_count() == 0);
  CHECK(pool->allocate(SegletPool::Purpose::kCleaner, &owner.segment, 10) == SegletPool::kNoSeglet);

  // Freeing one seglet refills the reserve first: the head still cannot take it.
  pool->free(taken.back());
  taken.pop_back();
  CHECK(pool->free_for_head() == 0);
  CHECK(pool->allocate(SegletPool::Purpose::kHead, &owner.segment, 0) == SegletPool::kNoSeglet);
  for (uint32_t s : taken) pool->free(s);
  CHECK(pool->free_count() == 10);
  CHECK(pool->free_for_head() == 7);
}

TEST_CASE("seglet_pool: a freed seglet can be allocated again", "[master][seglet_pool]") {
  auto pool = make_pool(2 * 512, 512);
  OwnerToken owner(*pool);
  uint32_t a = pool->allocate(SegletPool::Purpose::kHead, &owner.segment, 0);
  uint32_t b = pool->allocate(SegletPool::Purpose::kHead, &owner.segment, 1);
  REQUIRE(a != SegletPool::kNoSeglet);
  REQUIRE(b != SegletPool::kNoSeglet);
  CHECK(pool->allocate(SegletPool::Purpose::kHead, &owner.segment, 2) == SegletPool::kNoSeglet);
  pool->free(a);
  CHECK(pool->free_count() == 1);
  CHECK(pool->allocate(SegletPool::Purpose::kHead, &owner.segment, 2) == a);
  pool->free(a);
  pool->free(b);
}

TEST_CASE("seglet_pool: owner_of resolves any byte of an allocated seglet",
          "[master][seglet_pool]") {
  auto pool = make_pool(4 * 1024, 1024);
  OwnerToken first(*pool);
  OwnerToken second(*pool);
  uint32_t a = pool->allocate(SegletPool::Purpose::kHead, &first.segment, 0);
  uint32_t b = pool->allocate(SegletPool::Purpose::kCleaner, &second.segment, 5);
  for (uint64_t delta : {uint64_t{0}, uint64_t{1}, uint64_t{1023}}) {
    auto oa = pool->owner_of(pool->arena_offset(a) + delta);
    CHECK(oa.segment == &first.segment);
    CHECK(oa.index_in_segment == 0);
    auto ob = pool->owner_of(pool->arena_offset(b) + delta);
    CHECK(ob.segment == &second.segment);
    CHECK(ob.index_in_segment == 5);
  }
  pool->free(a);
  CHECK(pool->owner_of(pool->arena_offset(a)).segment == nullptr);
  pool->free(b);
}

TEST_CASE("seglet_pool: unusable sizes are rejected as invalid arguments",
          "[master][seglet_pool]") {
  auto status_of = [](SegletPool::Options o) {
    o.prefault = false;
    return SegletPool::create(o).status();
  };
  SECTION("seglet smaller than 512 bytes") {
    CHECK(status_of({.memory_bytes = 1 << 20, .seglet_bytes = 256}) == Status::kInvalidArgument);
    CHECK(status_of({.memory_bytes = 1 << 20, .seglet_bytes = 0}) == Status::kInvalidArgument);
  }
  SECTION("seglet not a power of two") {
    CHECK(status_of({.memory_bytes = 1 << 20, .seglet_bytes = 3000}) == Status::kInvalidArgument);
    CHECK(status_of({.memory_bytes = 1 << 20, .seglet_bytes = 513}) == Status::kInvalidArgument);
  }
  SECTION("memory smaller than one seglet") {
    CHECK(status_of({.memory_bytes = 0, .seglet_bytes = 512}) == Status::kInvalidArgument);
    CHECK(status_of({.memory_bytes = 511, .seglet_bytes = 512}) == Status::kInvalidArgument);
  }
  SECTION("memory of 1 TiB or more") {
    CHECK(status_of({.memory_bytes = 1ULL << 40, .seglet_bytes = 64 * 1024}) ==
          Status::kInvalidArgument);
  }
  SECTION("a reserve that leaves nothing for the head") {
    CHECK(status_of({.memory_bytes = 4 * 512, .seglet_bytes = 512, .reserve_seglets = 4}) ==
          Status::kInvalidArgument);
    CHECK(status_of({.memory_bytes = 4 * 512, .seglet_bytes = 512, .reserve_seglets = 5}) ==
          Status::kInvalidArgument);
  }
  SECTION("the smallest usable pool is accepted") {
    CHECK(status_of({.memory_bytes = 512, .seglet_bytes = 512}) == Status::kOk);
    CHECK(status_of({.memory_bytes = 4 * 512, .seglet_bytes = 512, .reserve_seglets = 3}) ==
          Status::kOk);
  }
}

}  // namespace
}  // namespace ramkv::master

// The backup's pool of segment buffers (backup/buffer_pool.h), on its own: the recovery
// tests (recovery_segments_test.cc) use it for reads.
#include <catch2/catch.hpp>
#include <cstring>
#include <vector>

#include "backup/buffer_pool.h"

using namespace ramkv;
using namespace ramkv::backup;

TEST_CASE("buffer pool: keeps at most its count, of its size, and hands them out again",
          "[backup][buffer_pool]") {
  BufferPool pool(10000, 3);
  CHECK(pool.buffer_bytes() == align_up(10000));
  CHECK(pool.take().size() == 0);  // none yet
  pool.fill(5);                    // capped at what it keeps
  CHECK(pool.free_count() == 3);
  AlignedBuffer a = pool.take();
  REQUIRE(a.size() == pool.buffer_bytes());
  CHECK(pool.free_count() == 2);
  // A buffer comes back as its last user left it: not zeroed.
  std::memset(a.data(), 0xab, a.size());
  std::byte* where = a.data();
  pool.give(std::move(a));
  AlignedBuffer again = pool.take();
  CHECK(again.data() == where);
  CHECK(again.data()[17] == std::byte{0xab});
  pool.give(AlignedBuffer(4096));  // another size: freed, not kept
  CHECK(pool.free_count() == 2);
  pool.give(std::move(again));
  pool.give(pool.take_or_allocate());
  CHECK(pool.free_count() == 3);
  pool.give(AlignedBuffer(pool.buffer_bytes()));  // one more than it keeps: freed
  CHECK(pool.free_count() == 3);
  std::vector<AlignedBuffer> taken;
  for (int i = 0; i < 4; ++i) taken.push_back(pool.take_or_allocate());  // the 4th is new
  for (const auto& b : taken) CHECK(b.size() == pool.buffer_bytes());
  CHECK(pool.free_count() == 0);
  CHECK(pool.allocated_late() == 1);  // only the 4th: fill() and take() allocate none late
}

// SegletPool: all of a master's log memory, allocated once at start and cut into
// fixed-size seglets (64 KiB by default). Segments are made of seglets; a segment that
// the cleaner compacts gives seglets back without touching its replicas (RAMCloud's
// two-level cleaning). No log memory is allocated after start.
//
// Owner: the Log. Threads: every method is thread-safe (one short mutex).
// Invariants:
//   1. A seglet is either on the free list or owned by exactly one segment.
//   2. Allocations for the head never take the last `reserve_seglets` free seglets; those
//      are kept for the cleaner, so that cleaning can always make progress.
//   3. owner(i) is set for exactly the allocated seglets; a log reference (an offset into
//      the arena) resolves to its segment through it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "common/result.h"

namespace ramkv::master {

class Segment;

class SegletPool {
 public:
  struct Options {
    uint64_t memory_bytes = 0;
    uint32_t seglet_bytes = 64 * 1024;
    uint32_t reserve_seglets = 0;
    // Touch every page at start so RSS reflects the budget from the beginning and the
    // first writes do not pay page faults.
    bool prefault = true;
  };
  // kInvalidArgument if the sizes are unusable; kNoSpace if the memory cannot be mapped.
  static Result<std::unique_ptr<SegletPool>> create(const Options& options);
  ~SegletPool();
  SegletPool(const SegletPool&) = delete;
  SegletPool& operator=(const SegletPool&) = delete;

  enum class Purpose { kHead, kCleaner };
  // A free seglet's index, or kNoSeglet when none may be taken for `purpose`.
  static constexpr uint32_t kNoSeglet = UINT32_MAX;
  uint32_t allocate(Purpose purpose, Segment* owner, uint32_t index_in_segment);
  void free(uint32_t seglet);

  std::byte* seglet_memory(uint32_t seglet) const {
    return base_ + uint64_t{seglet} * seglet_bytes_;
  }
  uint64_t arena_offset(uint32_t seglet) const { return uint64_t{seglet} * seglet_bytes_; }
  // The segment that owns the seglet holding arena byte `offset`, and the seglet's
  // position in that segment. Only meaningful for allocated seglets.
  struct Owner {
    Segment* segment = nullptr;
    uint32_t index_in_segment = 0;
  };
  Owner owner_of(uint64_t arena_offset) const {
    return owners_[static_cast<size_t>(arena_offset / seglet_bytes_)];
  }

  uint32_t seglet_bytes() const { return seglet_bytes_; }
  uint32_t seglet_count() const { return seglet_count_; }
  uint32_t free_count() const { return free_count_.load(std::memory_order_relaxed); }
  uint32_t reserve_seglets() const { return reserve_seglets_; }
  // Free seglets the head may still take.
  uint32_t free_for_head() const {
    uint32_t f = free_count();
    return f > reserve_seglets_ ? f - reserve_seglets_ : 0;
  }
  uint64_t memory_bytes() const { return uint64_t{seglet_count_} * seglet_bytes_; }
  // The whole arena, for registering it with a network adapter once (zero-copy sends).
  std::span<const std::byte> arena() const { return {base_, memory_bytes()}; }
  // Whether the arena asked for transparent huge pages and the kernel has them on (it may
  // still give 4 KiB pages where it has no free huge ones).
  bool huge_pages() const { return huge_pages_; }

 private:
  SegletPool() = default;

  std::byte* base_ = nullptr;
  uint64_t mapped_bytes_ = 0;
  bool huge_pages_ = false;  // madvise(MADV_HUGEPAGE) took, and the kernel has them on
  uint32_t seglet_bytes_ = 0;
  uint32_t seglet_count_ = 0;
  uint32_t reserve_seglets_ = 0;
  std::vector<Owner> owners_;
  std::mutex mutex_;  // guards free_
  std::vector<uint32_t> free_;
  std::atomic<uint32_t> free_count_{0};
};

}  // namespace ramkv::master

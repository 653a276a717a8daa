#include "master/hash_table.h"

#include <cstdlib>
#include <cstring>
#include <new>

#include "common/assert.h"

namespace ramkv::master {

HashTable::HashTable(uint64_t bucket_count) : bucket_count_(bucket_count) {
  RAMKV_CHECK(bucket_count > 0);
  void* mem = std::aligned_alloc(64, bucket_count * sizeof(Bucket));
  RAMKV_CHECK_MSG(mem != nullptr, "cannot allocate the hash table");
  std::memset(mem, 0, bucket_count * sizeof(Bucket));
  buckets_ = static_cast<Bucket*>(mem);
}

namespace {
constexpr uint32_t kOverflowSlabBuckets = 1024;
}  // namespace

HashTable::~HashTable() {
  for (Bucket* slab : overflow_slabs_) std::free(slab);
  std::free(buckets_);
}

HashTable::Bucket* HashTable::allocate_overflow() {
  std::lock_guard lock(overflow_mutex_);
  if (overflow_slabs_.empty() || overflow_slab_used_ == kOverflowSlabBuckets) {
    void* mem = std::aligned_alloc(64, kOverflowSlabBuckets * sizeof(Bucket));
    RAMKV_CHECK_MSG(mem != nullptr, "cannot allocate hash-table overflow buckets");
    std::memset(mem, 0, kOverflowSlabBuckets * sizeof(Bucket));
    overflow_slabs_.push_back(static_cast<Bucket*>(mem));
    overflow_slab_used_ = 0;
  }
  overflow_count_.fetch_add(1, std::memory_order_relaxed);
  return &overflow_slabs_.back()[overflow_slab_used_++];
}

void HashTable::insert(uint64_t hash, LogRef ref) {
  RAMKV_CHECK(ref <= kMaxRef);
  uint64_t value = (tag_of(hash) << kTagShift) | (ref + 1);
  Bucket* b = &buckets_[bucket_of(hash)];
  while (true) {
    for (uint32_t i = 0; i < kSlotsPerBucket; ++i) {
      if (b->slots[i] == 0) {
        b->slots[i] = value;
        return;
      }
    }
    Bucket* next = next_of(b);
    if (next == nullptr) {
      // Chain a new bucket through the last slot; its entry moves into the new bucket.
      next = allocate_overflow();
      next->slots[0] = b->slots[kSlotsPerBucket - 1];
      next->slots[1] = value;
      b->slots[kSlotsPerBucket - 1] = kChainBit | reinterpret_cast<uint64_t>(next);
      return;
    }
    b = next;
  }
}

}  // namespace ramkv::master

// HashTable: maps a key hash to log references, with no key copies (RAMCloud).
//
// Layout: an array of 64-byte buckets (one cache line), each 8 slots of 8 bytes:
//
//   bit  63   62 ........... 40  39 ............... 0
//       +----+------------------+--------------------+
//       | 0  | tag (23 bits)    | log reference + 1  |   an entry
//       +----+------------------+--------------------+
//       | 1  | pointer to the next bucket (63 bits)  |   slot 7 only: overflow chain
//       +----+---------------------------------------+
//   0 = empty slot.
//
// The log reference is the entry's byte offset in the master's log arena (SegletPool),
// which is below 1 TiB. The tag is the low 23 bits of the key hash; the bucket is chosen
// by the high bits (multiply-shift), so bucket order is key-hash order: enumeration by
// bucket resumes exactly and walks tablets (hash ranges) in order. Several keys with the
// same tag share a bucket; callers confirm a match by comparing the key in the log.
//
// Owner: the ObjectManager. Threads: not thread-safe by itself. Every bucket chain belongs
// to one lock stripe (stripe_of(bucket)); callers hold that stripe's lock for any access
// to the chain. Overflow buckets come from slabs of 1024 buckets (no per-bucket malloc
// header) when a chain's slots are full, and are freed with the table. With 8 slots a
// bucket and n objects over b buckets, about P(Poisson(n/b) > 8) of the buckets chain:
// 15% at 75% slot load, 3% at 50%.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace ramkv::master {

using LogRef = uint64_t;  // an offset into the log arena

class HashTable {
 public:
  static constexpr uint32_t kSlotsPerBucket = 8;
  static constexpr uint64_t kMaxRef = (1ULL << 40) - 2;

  // `bucket_count` > 0. Memory: 64 bytes per bucket, allocated once here.
  explicit HashTable(uint64_t bucket_count);
  ~HashTable();
  HashTable(const HashTable&) = delete;
  HashTable& operator=(const HashTable&) = delete;

  uint64_t bucket_count() const { return bucket_count_; }
  uint64_t bucket_of(uint64_t hash) const {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(hash) * bucket_count_) >> 64);
  }

  // A handle to one slot, valid while the caller holds the stripe lock and does not
  // insert into or erase from the same chain.
  struct SlotRef {
    uint64_t* slot = nullptr;
    explicit operator bool() const { return slot != nullptr; }
    LogRef ref() const { return (*slot & kRefMask) - 1; }
    void set_ref(LogRef r) const { *slot = (*slot & ~kRefMask) | (r + 1); }
  };

  // The first slot in `hash`'s chain whose tag matches and for which matches(ref) is
  // true, or an empty SlotRef.
  template <typename Matches>
  SlotRef find(uint64_t hash, Matches&& matches) {
    uint64_t tag = tag_of(hash);
    for (Bucket* b = &buckets_[bucket_of(hash)]; b != nullptr; b = next_of(b)) {
      for (uint32_t i = 0; i < kSlotsPerBucket; ++i) {
        uint64_t s = b->slots[i];
        if (s == 0 || is_chain(s)) continue;
        if (((s >> kTagShift) & kTagMask) == tag && matches((s & kRefMask) - 1)) {
          return SlotRef{&b->slots[i]};
        }
      }
    }
    return {};
  }

  // Starts loading `hash`'s bucket into the cache (the cleaner looks up entries in
  // batches so their cache misses overlap).
  void prefetch(uint64_t hash) const { __builtin_prefetch(&buckets_[bucket_of(hash)]); }

  // Adds an entry for `hash` pointing at `ref`. Never fails (allocates an overflow bucket
  // when the chain is full).
  void insert(uint64_t hash, LogRef ref);
  // Clears a slot found by find(). Chains are not shortened.
  void erase(SlotRef slot) { *slot.slot = 0; }

  // Calls fn(ref) for every entry in bucket `bucket`'s chain.
  template <typename F>
  void for_each_in_bucket(uint64_t bucket, F&& fn) const {
    for (const Bucket* b = &buckets_[bucket]; b != nullptr; b = next_of(b)) {
      for (uint32_t i = 0; i < kSlotsPerBucket; ++i) {
        uint64_t s = b->slots[i];
        if (s != 0 && !is_chain(s)) fn((s & kRefMask) - 1);
      }
    }
  }

  uint64_t overflow_bucket_count() const { return overflow_count_.load(std::memory_order_relaxed); }
  uint64_t memory_bytes() const {
    return (bucket_count_ + overflow_bucket_count()) * sizeof(Bucket);
  }

 private:
  struct alignas(64) Bucket {
    uint64_t slots[kSlotsPerBucket];
  };
  static_assert(sizeof(Bucket) == 64);

  static constexpr uint64_t kChainBit = 1ULL << 63;
  static constexpr uint64_t kRefMask = (1ULL << 40) - 1;
  static constexpr int kTagShift = 40;
  static constexpr uint64_t kTagMask = (1ULL << 23) - 1;

  static uint64_t tag_of(uint64_t hash) { return hash & kTagMask; }
  static bool is_chain(uint64_t s) { return (s & kChainBit) != 0; }
  static Bucket* next_of(const Bucket* b) {
    uint64_t s = b->slots[kSlotsPerBucket - 1];
    return is_chain(s) ? reinterpret_cast<Bucket*>(s & ~kChainBit) : nullptr;
  }

  Bucket* allocate_overflow();

  uint64_t bucket_count_;
  Bucket* buckets_;
  std::mutex overflow_mutex_;  // guards the slabs (chains of different stripes share them)
  std::vector<Bucket*> overflow_slabs_;
  uint32_t overflow_slab_used_ = 0;
  std::atomic<uint64_t> overflow_count_{0};
};

}  // namespace ramkv::master

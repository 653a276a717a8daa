// Segment: one piece of a master's log, up to `capacity` bytes of entries laid end to end,
// held in seglets from the SegletPool. Entries may cross seglet boundaries; readers that
// need contiguous bytes copy (rare with 64 KiB seglets and small objects).
//
// Owner: the Log (segments in the log) or the cleaner (survivors being filled).
// Threads: appends come from one thread at a time (the Log's append lock for the head,
// the cleaner thread for survivors). Reads of entries that are already appended may come
// from any thread holding the hash-table stripe lock of that entry (see object_manager.h):
// appended bytes never change while the segment exists.
// Invariants:
//   1. Bytes [0, length()) are whole, checksummed entries; nothing after length() is read.
//   2. seglets_[i] holds logical bytes [i * seglet_bytes, (i + 1) * seglet_bytes).
//   3. certificate() covers exactly [0, length()).
//   4. live_bytes() <= length(); it counts object and tombstone entries still needed.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/certificate.h"
#include "common/log_entry.h"
#include "common/result.h"
#include "master/seglet_pool.h"

namespace ramkv::master {

class Segment {
 public:
  struct Options {
    uint64_t id = 0;
    uint32_t capacity = 0;  // logical bytes; a multiple of the seglet size
    SegletPool::Purpose purpose = SegletPool::Purpose::kHead;
    uint64_t created_ns = 0;
  };
  Segment(SegletPool& pool, const Options& options);
  ~Segment();  // gives every seglet back to the pool
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  // Appends an entry whose payload is the concatenation of `pieces`. Returns the entry's
  // logical offset. kNoSpace when the entry does not fit the capacity (the caller rolls
  // to a new segment); kRetry when the pool has no seglet for it. On failure nothing is
  // appended. `checksum`: the payload's entry_checksum, where the caller has it already
  // (replay checked it as the entry came in); computed here otherwise.
  Result<uint32_t> append(EntryType type, std::span<const std::span<const std::byte>> pieces,
                          std::optional<uint32_t> checksum = std::nullopt);
  // Appends a whole, already-encoded entry (header and payload) byte for byte: the
  // cleaner's relocation. Same failures as append().
  Result<uint32_t> append_raw(std::span<const std::byte> entry,
                              uint32_t checksum_chain_header_bytes);
  // Would an entry with this payload size fit the remaining capacity?
  bool fits(uint32_t payload_bytes) const {
    return uint64_t{length_} + entry_bytes(payload_bytes) <= capacity_;
  }

  // Copies logical bytes [offset, offset + out.size()) into out. Must be below length().
  void read(uint32_t offset, std::span<std::byte> out) const;
  // A view of [offset, offset + bytes) if it lies in one seglet, else an empty span.
  std::span<const std::byte> peek(uint32_t offset, uint32_t bytes) const;
  // Appends to `out` views of logical bytes [offset, offset + bytes) (below length()), in
  // order, as few as the seglets allow (neighbouring seglets adjacent in the arena merge).
  void views(uint32_t offset, uint32_t bytes, std::vector<std::span<const std::byte>>* out) const;
  // The entry at `offset`: its header, and its payload as a view (when contiguous) or
  // copied into `scratch`. The returned span is valid while the segment and scratch live.
  struct Entry {
    EntryHeader header;
    std::span<const std::byte> payload;
  };
  Entry entry_at(uint32_t offset, std::string* scratch) const;
  // The whole entry's bytes (header and payload), as entry_at.
  std::span<const std::byte> raw_entry_at(uint32_t offset, uint32_t total_bytes,
                                          std::string* scratch) const;

  // Calls fn(offset, entry) for every entry in [0, length()).
  template <typename F>
  void for_each_entry(F&& fn) const {
    std::string scratch;
    for (uint32_t off = 0; off < length_;) {
      Entry e = entry_at(off, &scratch);
      fn(off, e);
      off += e.header.total_bytes();
    }
  }

  // Copies [0, length()) into one contiguous buffer: what a backup receives.
  std::vector<std::byte> copy_out() const;

  // Arena offset of logical byte `offset` (a log reference) and the reverse.
  uint64_t arena_offset(uint32_t offset) const;
  uint32_t logical_offset(uint32_t index_in_segment, uint64_t arena_offset) const {
    return index_in_segment * seglet_bytes_ + static_cast<uint32_t>(arena_offset % seglet_bytes_);
  }

  uint64_t id() const { return id_; }
  uint32_t length() const { return length_; }
  uint32_t capacity() const { return capacity_; }
  uint32_t seglet_count() const { return static_cast<uint32_t>(seglets_.size()); }
  uint64_t memory_bytes() const { return uint64_t{seglet_count()} * seglet_bytes_; }
  Certificate certificate() const { return cert_.finish(length_); }
  uint64_t created_ns() const { return created_ns_; }
  void set_created_ns(uint64_t ns) { created_ns_ = ns; }

  // Which pool floor appends draw from (the head may not dip into the cleaner reserve).
  void set_purpose(SegletPool::Purpose p) { purpose_ = p; }

  bool closed() const { return closed_; }
  // No more appends. Seglets are taken only as bytes arrive, so the unused tail of a
  // closed segment costs no memory.
  void close() { closed_ = true; }

  uint64_t live_bytes() const { return live_bytes_.load(std::memory_order_relaxed); }
  void add_live_bytes(uint64_t n) { live_bytes_.fetch_add(n, std::memory_order_relaxed); }
  void sub_live_bytes(uint64_t n) { live_bytes_.fetch_sub(n, std::memory_order_relaxed); }

 private:
  // Makes sure seglets back logical bytes up to `end`; false if the pool has none.
  bool ensure_seglets(uint64_t end);
  void write(uint32_t offset, std::span<const std::byte> bytes);

  SegletPool& pool_;
  const uint64_t id_;
  const uint32_t capacity_;
  const uint32_t seglet_bytes_;
  SegletPool::Purpose purpose_;
  uint64_t created_ns_;
  std::vector<uint32_t> seglets_;
  uint32_t length_ = 0;
  CertificateBuilder cert_;
  bool closed_ = false;
  std::atomic<uint64_t> live_bytes_{0};
};

}  // namespace ramkv::master

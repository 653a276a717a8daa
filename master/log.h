// Log: a master's log-structured memory. It owns the seglet pool and every segment, keeps
// the head segment that new entries are appended to, and writes the metadata each new
// head needs for recovery (segment header, log digest, safe version, table statistics).
// The cleaner (log_cleaner.h) reclaims space through the narrow interface at the bottom.
//
// Threads:
//   - append() and everything marked "any thread" is thread-safe (append_mutex_).
//   - The cleaner interface is for the one cleaner thread (or a test driving it).
//   - Segments are deleted only by the cleaner interface, after the caller has moved
//     every live reference out of them; readers resolve references under the object
//     manager's stripe locks, which the cleaner also takes to move a reference.
// Invariants:
//   1. The head is the only open segment in the log; it is never cleaned.
//   2. A new head's digest lists every segment in the log, itself included. Segments
//      that survivors replace leave the log only together with a new head whose digest
//      says so (commit_cleaning), so a digest always names a complete log.
//   3. The head's safe version is above every version issued before it was opened.
//   4. Appends for new data never take the cleaner's reserve of seglets, nor the last
//      kRemoveMarginSeglets of the head's share: those are for tombstones, so that a
//      remove can be logged when writes have filled memory (removing is how a caller
//      frees memory, and the cleaner may have nothing to reclaim until it does). An
//      overwrite's tombstone is part of its write (append_all): new data.
//   5. The entries of one append_all() lie in one segment, in order, end to end; either
//      all of them are appended or none.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "common/clock.h"
#include "common/log_entry.h"
#include "common/result.h"
#include "master/hash_table.h"
#include "master/master_config.h"
#include "master/seglet_pool.h"
#include "master/segment.h"

namespace ramkv::master {

// What a new head records besides the digest: provided by the object manager.
class HeadMetadataSource {
 public:
  virtual ~HeadMetadataSource() = default;
  virtual uint64_t safe_version() const = 0;
  virtual std::vector<TableStat> table_stats() const = 0;
};

struct LogStats {
  uint64_t memory_bytes = 0;   // all log memory
  uint64_t free_bytes = 0;     // seglets on the free list (reserve included)
  uint64_t live_bytes = 0;     // object and tombstone entries still needed
  uint64_t segment_count = 0;  // segments in the log (head included)
  uint64_t head_rollovers = 0;
  uint64_t appended_bytes = 0;  // entries appended for new data (not by the cleaner)
};

class Log {
 public:
  static Result<std::unique_ptr<Log>> create(const MasterConfig& config, const Clock& clock,
                                             HeadMetadataSource* metadata);
  ~Log();
  Log(const Log&) = delete;
  Log& operator=(const Log&) = delete;

  struct Appended {
    LogRef ref = 0;
    // Valid only while something keeps the segment from being cleaned (the stripe lock
    // of an object entry's key); nothing does for a tombstone.
    Segment* segment = nullptr;
    uint32_t entry_bytes = 0;
    uint64_t segment_id = 0;  // of `segment`, safe to use when the pointer is not
  };
  // Appends an entry to the head, rolling to a new head when it does not fit. `live`
  // entries count toward their segment's live bytes. kRetry when no memory is free
  // (the cleaner may free some); nothing is appended then. Any thread.
  Result<Appended> append(EntryType type, std::span<const std::span<const std::byte>> pieces,
                          bool live, std::optional<uint32_t> checksum = std::nullopt);
  // One entry of append_all(): its payload is the concatenation of `pieces`.
  struct EntryToAppend {
    EntryType type = EntryType::kInvalid;
    std::span<const std::span<const std::byte>> pieces;
    bool live = false;
    // The payload's entry_checksum where the caller has it (Segment::append).
    std::optional<uint32_t> checksum;
  };
  // Appends `entries` to one segment, in this order, or none of them (invariant 5): an
  // overwrite's new object and the tombstone for the object it supersedes
  // (docs/log-format.md, "Overwrites"), and the operation's completion record (exactly
  // once). The batch takes memory as one entry would: if any entry is an object, or it is
  // a completion record alone, it is new data and may not take the remove margin. out[i]
  // receives entry i. Fails as append() does. create() checks that the largest object, a
  // tombstone for its key and a completion record fit an empty head together. Any thread.
  Status append_all(std::span<const EntryToAppend> entries, std::span<Appended> out);

  // The segment holding `ref` and the entry's offset in it. The reference must be live
  // (held in the hash table under its stripe lock, or owned by the caller).
  std::pair<Segment*, uint32_t> resolve(LogRef ref) const {
    auto owner = pool_->owner_of(ref);
    return {owner.segment, owner.segment->logical_offset(owner.index_in_segment, ref)};
  }

  // Closes the head and opens a new one (new digest). Any thread.
  Status roll_head();
  // Ids of the segments in the log, in id order. Any thread.
  std::vector<uint64_t> segment_ids() const;
  // Copy of one segment's bytes and certificate, e.g. for tests and tools; nullopt if
  // the segment is not in the log. Any thread (the head is read under the append lock).
  struct SegmentCopy {
    std::vector<std::byte> bytes;
    Certificate certificate;
  };
  std::optional<SegmentCopy> copy_segment(uint64_t segment_id) const;
  LogStats stats() const;
  SegletPool& pool() { return *pool_; }

  // ---- Replication (master/replica_manager.h) -----------------------------------------
  // The master's id, written into every segment header. A server learns it only after
  // enlisting, when its memory is already allocated: set_master_id replaces the first
  // head, which must hold nothing but its metadata yet (kInvalidArgument otherwise).
  Status set_master_id(uint64_t master_id);
  uint64_t master_id() const;
  // With replication required, a segment may be cleaned only once the replica manager
  // has said it is on its backups (mark_replicated); in-memory compaction then leaves
  // the backups' copies alone, as RAMCloud does. Set before the cleaner starts.
  void set_replication_required(bool required);
  // Bumped by every change to the log's segments or bytes; any thread.
  uint64_t change_count() const { return changes_.load(std::memory_order_acquire); }
  // Bumped (before change_count) by every change but an append to the head: a new head,
  // survivors in, victims out, a compaction. Between two equal counts only the head's
  // length changed. Any thread.
  uint64_t structure_change_count() const {
    return structure_changes_.load(std::memory_order_acquire);
  }
  // The head's id and length, read together. Any thread.
  void head_state(uint64_t* head_id, uint32_t* length) const;
  struct SegmentView {
    uint64_t id = 0;
    uint32_t length = 0;
    bool closed = false;
    bool has_digest = false;  // opened as a head: starts with a segment header and digest
  };
  // The segments in the log, in id order, and the head's id. Any thread.
  std::vector<SegmentView> replication_view(uint64_t* head_id) const;
  // What a replication write of a segment sends, in two steps so that the caller copies
  // into its own (reused, not zero-filled) buffer and may reuse a copy for several
  // replicas: the length, certificate and closed flag; then bytes [from, from +
  // out.size()), which must lie below a length said before (appended bytes never
  // change). false if the segment is not in the log (or is shorter, after a compaction).
  // Any thread.
  bool replication_state(uint64_t segment_id, uint32_t* length, Certificate* certificate,
                         bool* closed) const;
  bool read_for_replication(uint64_t segment_id, uint32_t from, std::span<std::byte> out) const;
  // The same bytes without a copy, for one-sided writes (RDMA WRITE straight from the
  // log): views of [from, from + bytes) appended to `out`. They stay valid and unchanged
  // until the segment is marked replicated (only replicated segments are cleaned or
  // compacted), so a write from them must complete before its replica's close is acked.
  bool replication_views(uint64_t segment_id, uint32_t from, uint32_t bytes,
                         std::vector<std::span<const std::byte>>* out) const;
  void mark_replicated(uint64_t segment_id);
  const MasterConfig& config() const { return config_; }

  // Blocks until memory may be free for an entry of `type` (new data, or a tombstone),
  // the cleaner reports that it cannot free any, or `timeout_ns` passes. Returns kOk,
  // kNoSpace or kRetry. Any thread.
  Status wait_for_memory(uint64_t timeout_ns, EntryType type = EntryType::kObject);
  // Seglets kept for tombstones when writes have filled memory (invariant 4).
  static constexpr uint32_t kRemoveMarginSeglets = 2;
  // Free seglets that appends of new data may take. Any thread.
  uint32_t free_for_data() const {
    uint32_t f = pool_->free_for_head();
    return f > kRemoveMarginSeglets ? f - kRemoveMarginSeglets : 0;
  }

  // ---- The cleaner's interface (one cleaner thread) -----------------------------------
  // Closed segments in the log (not the head), as candidates for cleaning.
  std::vector<Segment*> cleanable_segments() const;
  bool contains_segment(uint64_t segment_id) const;
  // The segment of the log with this id, or nullptr. Valid until the cleaner frees it:
  // for the cleaner's own thread, until its next commit or compaction.
  Segment* find_segment(uint64_t segment_id) const;
  // A new segment for relocated entries, drawing on the reserve. Survivors are not in
  // the log until commit_cleaning.
  std::unique_ptr<Segment> new_survivor(uint64_t created_ns);
  // A segment to compact `victim` into: same id, drawing on the reserve.
  std::unique_ptr<Segment> new_compaction_target(const Segment& victim);
  // Puts the compacted copy in place of `victim` and frees the victim's seglets.
  void finish_compaction(Segment* victim, std::unique_ptr<Segment> compacted);
  // Adds the survivors to the log, removes and frees the victims, and rolls the head so
  // the digest says so. Every live reference must already point into the survivors.
  void commit_cleaning(std::vector<std::unique_ptr<Segment>> survivors,
                       std::span<Segment* const> victims);
  // The cleaner reports the end of a round of cleaning that began after request number
  // `request` (see cleaning_requests()), and whether it left any memory for new data.
  void finish_cleaning_round(uint64_t request, bool stuck);
  uint64_t cleaning_requests() const;
  void notify_memory_freed();
  // Wakes the cleaner when free memory for new data falls below the low watermark.
  void set_cleaner_wakeup(std::function<void()> wake) { wake_cleaner_ = std::move(wake); }
  uint64_t low_free_seglets() const { return low_free_seglets_; }

 private:
  Log(const MasterConfig& config, const Clock& clock, HeadMetadataSource* metadata,
      std::unique_ptr<SegletPool> pool);
  // Opens a new head (closing the old one). Caller holds append_mutex_.
  Status open_head_locked(bool allow_reserve);
  // Seglets that appending `bytes` of entries may take from the pool (an upper bound
  // when they need a new head). Caller holds append_mutex_.
  uint64_t seglets_to_append_locked(uint64_t bytes) const;

  const MasterConfig config_;
  const Clock& clock_;
  HeadMetadataSource* metadata_;
  // Member order is teardown order in reverse: segments free their seglets into the pool,
  // so the pool is declared first and destroyed last.
  std::unique_ptr<SegletPool> pool_;
  mutable std::mutex append_mutex_;  // guards everything below except the cleaner flags
  std::unordered_map<uint64_t, std::unique_ptr<Segment>> segments_;
  std::unordered_set<uint64_t> pending_survivors_;
  Segment* head_ = nullptr;
  uint64_t next_segment_id_ = 1;
  uint64_t head_rollovers_ = 0;
  uint64_t low_free_seglets_ = 0;
  uint64_t master_id_ = 0;
  bool replication_required_ = false;
  std::unordered_set<uint64_t> replicated_;  // segments the cleaner may take
  std::atomic<uint64_t> changes_{0};
  std::atomic<uint64_t> structure_changes_{0};
  std::function<void()> wake_cleaner_;

  std::atomic<uint64_t> appended_bytes_{0};

  mutable std::mutex memory_mutex_;  // guards the cleaning round state, with memory_cv_
  std::condition_variable memory_cv_;
  uint64_t cleaning_requests_ = 0;
  uint64_t cleaning_rounds_done_ = 0;  // the request number the last round answered
  bool cleaner_stuck_ = false;
};

}  // namespace ramkv::master

// LogCleaner: reclaims the space of dead entries so a master can run its memory at
// 80-90% utilisation without stalling writes (RAMCloud's two-level cleaning, FAST'14).
//
// Two kinds of work, both chosen by cost-benefit, score = (1 - u) * age / (1 + u):
//   - In-memory compaction: copy one segment's live entries into fresh seglets under the
//     same segment id and free the old seglets. Cheap (no backup traffic later), but the
//     segment stays in the log, so the log's segment count does not shrink. u is live
//     bytes over the segment's memory.
//   - Combined cleaning: copy the live entries of several segments into new survivor
//     segments and drop the victims from the log (a new head digest says so). This is
//     what keeps the log's segment count (the backups' disk) bounded and what lets
//     tombstones go. u is live bytes over the full segment size.
// Combined cleaning is chosen when the log holds more than 90% of
// MasterConfig::max_log_segments(), or when no segment is worth compacting.
//
// Entries are moved byte for byte; whether one is still needed is decided by the
// LogEntryHandlers (the object manager), under the same lock writers take.
//
// Threads: its own thread (start()), woken by the log when free memory runs low; or
// driven by hand through clean_once() from one thread, for tests. Never both at once.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#include "common/clock.h"
#include "master/log.h"

namespace ramkv::master {

// Where a relocated entry goes (implemented by the cleaner).
class EntryRelocator {
 public:
  virtual ~EntryRelocator() = default;
  // Appends a whole entry verbatim; kRetry if there is no memory for it.
  virtual Result<LogRef> append(std::span<const std::byte> raw_entry, uint32_t header_bytes) = 0;
  // Whether a tombstone naming this segment must move: the segment was in the log when
  // this unit of cleaning began (only the cleaner removes segments, so it still is), and
  // does not leave with it. A victim of combined cleaning already moved out in full
  // leaves in the same commit that adds what is appended here; the victim being moved
  // now leaves too, or stays in the log holding the tombstone itself. Either way, by the
  // time a copy would be in the log the object it kills is not (docs/master-storage.md,
  // "Cleaning").
  virtual bool tombstone_needed(uint64_t named_segment_id) const = 0;
};

// Decides which entries are still needed, and moves their references (the object
// manager).
class LogEntryHandlers {
 public:
  virtual ~LogEntryHandlers() = default;
  // Moves the entry at `offset` of `victim` through `to` if it is still needed, updating
  // whatever refers to it. kOk whether moved or dropped; an error from `to` otherwise.
  virtual Status relocate(const Segment& victim, uint32_t offset, const Segment::Entry& entry,
                          EntryRelocator& to) = 0;
  // A hint that relocate() will soon be called for this entry: start its cache misses.
  virtual void prefetch(const Segment::Entry& entry) = 0;
  // Bytes of the tombstones in the log that are still needed, all of them, and those that
  // name one segment (they die when it leaves).
  virtual uint64_t tombstone_bytes() const = 0;
  virtual uint64_t tombstone_bytes_naming(uint64_t segment_id) const = 0;
  // The segments have left the log (a combined pass committed): the tombstones naming
  // them are dead, and their segments' live bytes go down. Returns those bytes. Called
  // from the cleaner's thread.
  virtual uint64_t segments_left_log(std::span<const uint64_t> segment_ids) = 0;
};

struct CleanerStats {
  uint64_t compactions = 0;  // segments compacted in memory
  uint64_t combined_passes = 0;
  uint64_t segments_cleaned = 0;        // victims of combined cleaning
  uint64_t bytes_copied = 0;            // entry bytes relocated, both kinds
  uint64_t bytes_freed = 0;             // memory returned to the pool, net
  uint64_t tombstone_bytes_killed = 0;  // tombstones that died with combined passes' victims
};

class LogCleaner {
 public:
  LogCleaner(Log& log, LogEntryHandlers& handlers, const Clock& clock);
  ~LogCleaner();  // stops the thread
  LogCleaner(const LogCleaner&) = delete;
  LogCleaner& operator=(const LogCleaner&) = delete;

  void start();
  void stop();
  void wake();

  // One unit of work: one compaction or one combined-cleaning pass. Returns the bytes of
  // memory it freed (net) or made free to reclaim (tombstones that died with a combined
  // pass's victims), 0 when nothing was worth cleaning.
  uint64_t clean_once();
  // The two kinds of work, for tests: compaction of one segment of the log, and a
  // combined pass over the best candidates. Return bytes freed (net), the combined pass
  // with the tombstone bytes that died.
  uint64_t compact(Segment* victim);
  uint64_t clean_combined(std::vector<Segment*> candidates);

  CleanerStats stats() const;

 private:
  class Survivors;
  void run();
  // A combined pass; with `memory_only`, only if it is expected to free memory, and
  // returning 0 if it did not.
  uint64_t clean_combined_for(std::vector<Segment*> candidates, bool memory_only);
  // Seglets the cleaner can allocate whatever writers do meanwhile.
  uint64_t cleaner_seglets() const;
  // Cost-benefit; `dying_tombstones` (bytes of the tombstones naming the segment) count
  // as space it gives back.
  double score(const Segment& s, uint64_t now_ns, bool combined,
               uint64_t dying_tombstones = 0) const;
  void count_copied(uint64_t bytes);

  Log& log_;
  LogEntryHandlers& handlers_;
  const Clock& clock_;
  const uint32_t seglet_bytes_;

  mutable std::mutex mutex_;  // guards the fields below, with cv_
  std::condition_variable cv_;
  bool stop_ = false;
  bool woken_ = false;
  CleanerStats stats_;
  // Declared last: the thread uses every member above.
  std::thread thread_;
};

}  // namespace ramkv::master

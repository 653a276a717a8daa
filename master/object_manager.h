// ObjectManager: a master's objects. It ties the hash table (key -> log reference) to the
// log (the only copy of the data) and implements the operations of the client API on one
// master: read, write, remove, increment, enumerate, each with reject rules.
//
// Owner: the master service. Threads: every public method is thread-safe.
// Locking (docs/master-storage.md, "Locking"):
//   - The hash table is split into lock stripes by bucket. An operation on a key holds
//     its stripe's mutex from the lookup until the hash table points at the new entry, so
//     operations on one key are serialised and reject rules are checked atomically.
//   - Appends to the head take the log's append mutex inside the stripe lock (stripe ->
//     log -> seglet pool, never the other way).
//   - The cleaner moves an entry only under the entry's stripe lock, and frees a segment
//     only after moving every live entry out of it; so a reader holding a stripe lock
//     never sees memory freed under it.
//   - Waiting for the cleaner happens with no stripe held.
// Invariants:
//   1. Each (table, key) has at most one hash-table slot, pointing at its newest object
//      entry; removed keys have none.
//   2. Versions only grow: every write takes the next value of one master-wide counter,
//      so a re-created object's version is above its removed predecessor's.
//   3. An object entry is counted in its segment's live bytes exactly while a slot
//      points at it.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/clock.h"
#include "common/result.h"
#include "master/hash_table.h"
#include "master/log.h"
#include "master/log_cleaner.h"
#include "master/master_config.h"

namespace ramkv::master {

// Conditions under which an operation is rejected (RAMCloud's RejectRules). Checked
// against the object's current state before anything is changed.
struct RejectRules {
  bool doesnt_exist = false;      // reject with kObjectNotFound if there is no object
  bool exists = false;            // reject with kObjectExists if there is one
  bool version_le_given = false;  // reject with kWrongVersion if version <= given_version
  bool version_ne_given = false;  // reject with kWrongVersion if version != given_version
  uint64_t given_version = 0;
};
// The status the rules give for an object with `version` (0 = no object).
Status check_reject_rules(const RejectRules* rules, uint64_t version);

struct ObjectManagerStats {
  uint64_t object_count = 0;
  uint64_t user_bytes = 0;  // keys plus values of live objects
  uint64_t hash_table_bytes = 0;
  uint64_t hash_overflow_buckets = 0;
  LogStats log;
  CleanerStats cleaner;
};

class ObjectManager final : public HeadMetadataSource, public LogEntryHandlers {
 public:
  // Allocates all memory (log and hash table). kInvalidArgument for a bad config.
  static Result<std::unique_ptr<ObjectManager>> create(
      MasterConfig config, const Clock& clock = SystemClock::instance());
  ~ObjectManager() override;
  ObjectManager(const ObjectManager&) = delete;
  ObjectManager& operator=(const ObjectManager&) = delete;

  // Copies the value into *value; returns the version.
  Result<uint64_t> read(uint64_t table_id, std::string_view key, std::string* value,
                        const RejectRules* rules = nullptr);
  // Returns the new version. kKeyTooLarge / kValueTooLarge for oversized input; kRetry
  // when the cleaner is behind; kNoSpace when memory is full of live data.
  Result<uint64_t> write(uint64_t table_id, std::string_view key, std::string_view value,
                         const RejectRules* rules = nullptr);
  // Returns the removed object's version, or 0 if there was none (not an error unless
  // the rules say doesnt_exist).
  Result<uint64_t> remove(uint64_t table_id, std::string_view key,
                          const RejectRules* rules = nullptr);
  // Adds `delta` to an 8-byte little-endian signed integer value, creating it (as delta)
  // if absent. kInvalidObject if the value is not 8 bytes.
  struct Incremented {
    int64_t value = 0;
    uint64_t version = 0;
  };
  Result<Incremented> increment(uint64_t table_id, std::string_view key, int64_t delta,
                                const RejectRules* rules = nullptr);

  // Objects of a table in key-hash order, a batch at a time. `cursor` starts at 0; the
  // returned cursor resumes the enumeration, and equals end_cursor() when it is done. A
  // batch ends after at least `max_objects` (unless done) and may exceed it slightly.
  struct Object {
    std::string key;
    std::string value;
    uint64_t version = 0;
  };
  Result<uint64_t> enumerate(uint64_t table_id, uint64_t cursor, size_t max_objects,
                             std::vector<Object>* out) {
    return enumerate(table_id, 0, UINT64_MAX, cursor, max_objects, out);
  }
  // The same over one tablet: only keys whose hash is in [hash_begin, hash_end]. Buckets
  // are in hash order, so the walk covers just the tablet's buckets.
  Result<uint64_t> enumerate(uint64_t table_id, uint64_t hash_begin, uint64_t hash_end,
                             uint64_t cursor, size_t max_objects, std::vector<Object>* out);
  // Removes every object of the table whose key hash is in [hash_begin, hash_end] (a
  // dropped table or a tablet given away). Returns how many.
  Result<uint64_t> remove_range(uint64_t table_id, uint64_t hash_begin, uint64_t hash_end);
  uint64_t end_cursor() const { return hash_table_.bucket_count(); }

  ObjectManagerStats stats() const;
  Log& log() { return *log_; }
  LogCleaner& cleaner() { return *cleaner_; }
  const MasterConfig& config() const { return config_; }

  // HeadMetadataSource
  uint64_t safe_version() const override { return next_version_.load(); }
  std::vector<TableStat> table_stats() const override;
  // LogEntryHandlers
  Status relocate(const Segment& victim, uint32_t offset, const Segment::Entry& entry,
                  EntryRelocator& to) override;
  void prefetch(const Segment::Entry& entry) override;

 private:
  ObjectManager(const MasterConfig& config, const Clock& clock);

  // What a lookup found: the slot and the object entry it points at.
  struct Found {
    HashTable::SlotRef slot;
    Segment* segment = nullptr;
    uint32_t entry_bytes = 0;
    ObjectView object;
  };
  // Finds the object for (table, key). Caller holds the stripe lock; views in the
  // result point into the log or *scratch.
  Found lookup(uint64_t hash, uint64_t table_id, std::string_view key, std::string* scratch);
  std::mutex& stripe_for(uint64_t hash) {
    return stripes_[hash_table_.bucket_of(hash) % stripes_.size()].mutex;
  }
  Status check_sizes(std::string_view key, std::string_view value) const;
  // Writes a new object entry for the key and points the slot at it; the shared part of
  // write and increment. Caller holds the stripe lock.
  Result<uint64_t> write_locked(uint64_t hash, uint64_t table_id, std::string_view key,
                                std::string_view value, Found& found);
  // Retries `op` (which takes and drops the stripe lock itself) while the log is out of
  // memory for an entry of `type` and the cleaner may free some.
  template <typename Op>
  auto with_memory_retry(EntryType type, Op&& op) -> decltype(op());
  void account(uint64_t table_id, int64_t objects, int64_t entry_bytes, int64_t user_bytes);

  const MasterConfig config_;
  const Clock& clock_;
  // Teardown order (reverse of declaration): the cleaner thread stops first, then the
  // log and its memory, then the hash table.
  HashTable hash_table_;
  struct alignas(64) Stripe {
    std::mutex mutex;
  };
  std::vector<Stripe> stripes_;
  std::atomic<uint64_t> next_version_{1};
  mutable std::mutex stats_mutex_;  // guards table_stats_, object_count_, user_bytes_
  std::unordered_map<uint64_t, TableStat> table_stats_;
  uint64_t object_count_ = 0;
  uint64_t user_bytes_ = 0;
  std::unique_ptr<Log> log_;
  std::unique_ptr<LogCleaner> cleaner_;
};

}  // namespace ramkv::master

// ObjectManager: a master's objects. It ties the hash table (key -> log reference) to the
// log (the only copy of the data) and implements the operations of the client API on one
// master: read, write, remove, increment, enumerate, each with reject rules; and, on a
// recovery master, the replay of a crashed master's log entries (replay()).
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
//   - Tombstone accounting (tombstones_mutex_) is taken inside a stripe, or by the
//     cleaner with no stripe held, and outside the log's mutex: stripe -> tombstones ->
//     log.
// Invariants:
//   1. Each (table, key) has at most one hash-table slot, pointing at its newest object
//      entry; removed keys have none.
//   2. Versions only grow: every write takes the next value of one master-wide counter,
//      so a re-created object's version is above its removed predecessor's. Replayed
//      objects keep their versions; the counter is moved above them (and above the
//      crashed master's safe version by finish_replay()).
//   3. An object entry is counted in its segment's live bytes exactly while a slot
//      points at it.
//   4. During a recovery's replay (replay(), finish_replay()), a key of the partition has
//      an object slot or a tombstone marker, never both. Markers live beside the hash
//      table, under the key's stripe lock, until finish_replay() drops them.
//   5. An object that stopped being its key's newest (overwritten, incremented, replaced
//      by a replayed object, or removed) has a tombstone naming the segment that held it,
//      appended by the operation that made it dead (with the new object in one
//      Log::append_all, the object first; or by the remove). The cleaner keeps the
//      tombstone, counted in its segment's live bytes, while that segment is in the log:
//      the segment's replicas still hold the dead object (docs/log-format.md,
//      "Overwrites").
//   6. tombstone_bytes_ holds, for each segment in the log, the bytes of the tombstones
//      naming it in each segment that holds them. When a segment leaves the log, those
//      tombstones die and the holders' live bytes go down by as much, so the cleaner
//      sees the memory it can take back (docs/master-storage.md, "Cleaning").
//   7. A write, remove or increment with a tracked RpcId (exactly-once, rpc_results.h)
//      appends its completion record in the same Log::append_all as its object or
//      tombstone, last, and records it in rpc_results_ under the key's stripe lock; a
//      retry of it finds the record under the same lock and gets the first outcome.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "common/result.h"
#include "master/hash_table.h"
#include "master/log.h"
#include "master/log_cleaner.h"
#include "master/master_config.h"
#include "master/rpc_results.h"

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
  uint64_t tombstone_bytes = 0;  // tombstones in the log still needed (in log.live_bytes)
  RpcResultsStats rpc_results;
  LogStats log;
  CleanerStats cleaner;
};

// What replay() did, summed over calls (each call adds to it). Every entry read is
// counted in `entries` and `bytes`; of the object and tombstone entries, those of other
// partitions are `skipped`, the others are `objects` or `tombstones`, and of those the
// ones older than what was already there (not applied) are also counted `obsolete`.
struct ReplayStats {
  uint64_t entries = 0;
  uint64_t objects = 0;
  uint64_t tombstones = 0;
  uint64_t skipped = 0;
  uint64_t obsolete = 0;
  uint64_t bytes = 0;
  uint64_t rpc_results = 0;  // completion records of the partition kept (rpc_results.h)
};

// A tablet under recovery: key hashes [start_hash, end_hash] (both inclusive) of a table.
struct TabletRange {
  uint64_t table_id = 0;
  uint64_t start_hash = 0;
  uint64_t end_hash = UINT64_MAX;
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
  //
  // write, remove and increment take the request's RpcId (rpc_results.h): when it is
  // tracked, the outcome (success or a reject rule's status) is recorded with the change
  // (invariant 7), and a retry of the same (client, sequence) returns that outcome
  // without applying anything; a request at or below its client's ack is kStaleRpc.
  Result<uint64_t> write(uint64_t table_id, std::string_view key, std::string_view value,
                         const RejectRules* rules = nullptr, const RpcId* rpc = nullptr);
  // Returns the removed object's version, or 0 if there was none (not an error unless
  // the rules say doesnt_exist).
  Result<uint64_t> remove(uint64_t table_id, std::string_view key,
                          const RejectRules* rules = nullptr, const RpcId* rpc = nullptr);
  // Adds `delta` to an 8-byte little-endian signed integer value, creating it (as delta)
  // if absent. kInvalidObject if the value is not 8 bytes.
  struct Incremented {
    int64_t value = 0;
    uint64_t version = 0;
  };
  Result<Incremented> increment(uint64_t table_id, std::string_view key, int64_t delta,
                                const RejectRules* rules = nullptr, const RpcId* rpc = nullptr);

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
  // `values` false: keys and versions only (the values are left empty).
  Result<uint64_t> enumerate(uint64_t table_id, uint64_t hash_begin, uint64_t hash_end,
                             uint64_t cursor, size_t max_objects, std::vector<Object>* out,
                             bool values = true);
  // Removes every object of the table whose key hash is in [hash_begin, hash_end] (a
  // dropped table or a tablet given away). Returns how many.
  //
  // Completion records of the range stay until acknowledged or expired: a client retrying
  // a write into a tablet that moved gets kUnknownTablet from the service first.
  Result<uint64_t> remove_range(uint64_t table_id, uint64_t hash_begin, uint64_t hash_end);
  // The same a piece at a time (TabletDropper): from where `cursor` (0 at first) says,
  // walks hash-table buckets until `max_objects` are gone (the last bucket may pass the
  // mark) or 16 x `max_objects` buckets are walked, and moves the cursor on; the range is
  // empty once *cursor == end_cursor(). A failed step leaves the cursor at the bucket it
  // failed in.
  Result<uint64_t> remove_range_step(uint64_t table_id, uint64_t hash_begin, uint64_t hash_end,
                                     uint64_t* cursor, size_t max_objects);
  uint64_t end_cursor() const { return hash_table_.bucket_count(); }

  // ---- Recovery (docs/recovery.md, step 5 "Replay") -----------------------------------
  // Replays whole log entries into this master: `entries` is a concatenation of entries,
  // each with its header and checksum, as a backup serves a recovery partition (segment
  // metadata entries among them are ignored). Objects and tombstones for which
  // accept(table_id, key_hash) is false belong to another partition and are skipped.
  // Entries may come from the crashed master's segments in any order; the newest version
  // of a key wins:
  //   - an object is applied only if it is newer than the key's object or tombstone
  //     marker here: it is appended to this log with its version and timestamp, and the
  //     hash table points at it (the marker, if any, goes); an object it supersedes here
  //     gets a tombstone in the same append, as an overwrite's does (invariant 5);
  //   - a tombstone at least as new as the key's object removes it and logs a tombstone
  //     naming this log's segment that held it (as remove() does), so a later recovery
  //     of this master keeps it dead. Whether or not there was an object to remove, it
  //     leaves a marker (beside the hash table: a copy of the key) that keeps out the
  //     versions it covers when they are replayed later. A tombstone that removes
  //     nothing here is not logged: nothing in this log needs it.
  // Markers matter to replay only (read, write and remove ignore them); finish_replay()
  // drops them. Replaying entries twice changes nothing, so after an error a caller may
  // replay the same entries again. Stops at the first entry it cannot use, with what
  // came before it applied: kCorrupt for a bad checksum, a truncated entry or one that
  // does not parse; kKeyTooLarge / kValueTooLarge for an object over this master's
  // limits; kRetry / kNoSpace when memory is full, as write(). Before it returns, object
  // counts and table statistics include what it applied, and the version counter is
  // above every version of the partition it read. Adds what it did to *stats (may be
  // null). Any thread (stripe locks; other tablets may be served meanwhile); `entries`
  // is read only during the call.
  Status replay(std::span<const std::byte> entries,
                const std::function<bool(uint64_t table_id, uint64_t key_hash)>& accept,
                ReplayStats* stats);
  // The same over pieces that each hold whole entries, in order (a backup's runs of one
  // partition's entries in a replica, not copied into one buffer).
  Status replay(std::span<const std::span<const std::byte>> pieces,
                const std::function<bool(uint64_t table_id, uint64_t key_hash)>& accept,
                ReplayStats* stats);
  // Ends a recovery's replay of `tablets`: drops the tombstone markers replay kept for them
  // and moves the version counter above `safe_version` (the crashed master's: every version
  // it issued is below it). Call it also when a replay is abandoned. Any thread.
  void finish_replay(std::span<const TabletRange> tablets, uint64_t safe_version);
  // Replay also keeps the partition's completion records (kRpcResult) that are not yet
  // acknowledged, appended to this log as they are, so retries reaching this master
  // after the crash get their first outcome (counted in ReplayStats::rpc_results).
  // Tombstone markers kept by replays not finished yet (tests, tools).
  uint64_t replay_marker_count() const { return marker_count_.load(std::memory_order_relaxed); }

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
  uint64_t tombstone_bytes() const override;
  uint64_t tombstone_bytes_naming(uint64_t segment_id) const override;
  uint64_t segments_left_log(std::span<const uint64_t> segment_ids) override;

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
  // A tombstone kept by replay for a key with no object here (invariant 4): it keeps out
  // object versions at or below `version` replayed later.
  struct ReplayMarker {
    uint64_t table_id = 0;
    uint64_t version = 0;
    std::string key;
  };
  using MarkerMap = std::unordered_multimap<uint64_t, ReplayMarker>;  // by key hash
  struct alignas(64) Stripe {
    std::mutex mutex;
    MarkerMap markers;  // guarded by `mutex`; empty outside recoveries
  };
  Stripe& stripe_of(uint64_t hash) {
    return stripes_[hash_table_.bucket_of(hash) % stripes_.size()];
  }
  std::mutex& stripe_for(uint64_t hash) { return stripe_of(hash).mutex; }
  Status check_sizes(std::string_view key, std::string_view value) const;
  // A completion record to append with an operation (invariant 7): built by
  // start_record(), appended by the operation, kept by keep_record().
  struct RecordToAppend {
    const RpcId* rpc = nullptr;  // null: the operation is not tracked
    RpcOutcome outcome;
    std::byte payload[kMaxRpcResultBytes];
    std::span<const std::byte> piece[1];
    Log::Appended appended;
    Log::EntryToAppend entry() const {
      return {.type = EntryType::kRpcResult, .pieces = piece, .live = true, .checksum = {}};
    }
  };
  // Fills *out for `rpc` (tracked) with the outcome. Returns out->rpc != nullptr.
  bool start_record(const RpcId* rpc, uint64_t table_id, uint64_t hash, const RpcOutcome& outcome,
                    RecordToAppend* out);
  void keep_record(const RecordToAppend& r);
  // RpcResults::check() for a tracked request (untracked ones are always new): kNew (run
  // it), kDone (*done is its first outcome), kStale. Caller holds the stripe lock.
  RpcResults::Check check_rpc(const RpcId* rpc, RpcOutcome* done);
  // A rejected or no-op tracked request: records `outcome` alone. Caller holds the
  // stripe lock.
  Status record_alone(const RpcId* rpc, uint64_t table_id, uint64_t hash,
                      const RpcOutcome& outcome);
  void maybe_expire_rpc_results();
  // Writes a new object entry for the key and points the slot at it; the shared part of
  // write and increment. `record` (may be null) is appended with it, its outcome's
  // version set here. Caller holds the stripe lock.
  Result<uint64_t> write_locked(uint64_t hash, uint64_t table_id, std::string_view key,
                                std::string_view value, Found& found, const RpcId* rpc = nullptr,
                                uint64_t result_value = 0);
  // Appends an object entry (its payload in pieces) for the key. When it supersedes the
  // object `found` has, a tombstone for that one, naming its segment and stamped
  // `timestamp`, goes in the same append, after the object (invariant 5): the pair needs
  // memory for new data, never the remove margin. Returns the object's entry. Caller
  // holds the stripe lock.
  Result<Log::Appended> append_object_locked(
      uint64_t table_id, std::string_view key, uint32_t timestamp,
      std::span<const std::span<const std::byte>> object_pieces, const Found& found,
      RecordToAppend* record = nullptr, std::optional<uint32_t> object_checksum = std::nullopt);
  // A change to one table's statistics (account()).
  struct StatsDelta {
    int64_t objects = 0;
    int64_t entry_bytes = 0;
    int64_t user_bytes = 0;
  };
  // Points the key's slot at a newly appended object entry; the old object, if `found`
  // has one, becomes dead. Returns the change to the table's statistics, for the caller
  // to account. Caller holds the stripe lock.
  StatsDelta install_locked(uint64_t hash, const Log::Appended& appended, uint64_t user_bytes,
                            const Found& found);
  // What one replay() call has done so far. Its statistics changes are accounted once, at
  // the end of the call (a call carries one segment's entries of a partition: few tables),
  // which saves a shared lock per entry.
  struct ReplayProgress {
    ReplayStats stats;
    uint64_t max_version = 0;
    std::vector<std::pair<uint64_t, StatsDelta>> table_deltas;
    void add(uint64_t table_id, const StatsDelta& delta);
  };
  // Replays one checked entry of a replay stream into *progress (all but `entries` and
  // `bytes`).
  // `checksum`: the entry's, checked against the payload already.
  Status replay_entry(EntryType type, std::span<const std::byte> payload, uint32_t checksum,
                      const std::function<bool(uint64_t, uint64_t)>& accept,
                      ReplayProgress* progress);
  // Replay of one object or tombstone of the partition (the stripe lock is taken inside).
  // Returns whether it was applied (false: obsolete).
  Result<bool> replay_object(uint64_t hash, const ObjectView& object,
                             std::span<const std::byte> payload, uint32_t checksum,
                             ReplayProgress* progress);
  Result<bool> replay_tombstone(uint64_t hash, const TombstoneView& tombstone,
                                ReplayProgress* progress);
  Result<bool> replay_rpc_result(const RpcResultView& record, std::span<const std::byte> payload);
  // The marker of (table, key) in its stripe, or markers.end(). Caller holds the stripe
  // lock.
  MarkerMap::iterator find_marker(Stripe& stripe, uint64_t hash, uint64_t table_id,
                                  std::string_view key);
  // Raises the version counter to at least `next_version`.
  void raise_next_version(uint64_t next_version);
  // Retries `op` (which takes and drops the stripe lock itself) while the log is out of
  // memory for an entry of `type` and the cleaner may free some.
  template <typename Op>
  auto with_memory_retry(EntryType type, Op&& op) -> decltype(op());
  // Counts `bytes` of tombstone naming segment `named` held in segment `holder` (negative:
  // no longer held there). The caller holds the stripe lock of the tombstone's key, so
  // that the cleaner moving that tombstone counts after the append did.
  void count_tombstone(uint64_t named, uint64_t holder, int64_t bytes);
  void account(uint64_t table_id, int64_t objects, int64_t entry_bytes, int64_t user_bytes);
  void account(uint64_t table_id, const StatsDelta& d) {
    account(table_id, d.objects, d.entry_bytes, d.user_bytes);
  }

  const MasterConfig config_;
  const Clock& clock_;
  // Teardown order (reverse of declaration): the cleaner thread stops first, then the
  // log and its memory, then the hash table.
  HashTable hash_table_;
  std::vector<Stripe> stripes_;
  std::atomic<uint64_t> next_version_{1};
  std::atomic<uint64_t> marker_count_{0};  // markers in all stripes
  mutable std::mutex stats_mutex_;         // guards table_stats_, object_count_, user_bytes_
  std::unordered_map<uint64_t, TableStat> table_stats_;
  uint64_t object_count_ = 0;
  uint64_t user_bytes_ = 0;
  // Tombstone bytes in the log by the segment they name, then by the segment holding
  // them (invariant 6). Locked after a stripe, before the log's append mutex.
  mutable std::mutex tombstones_mutex_;
  struct NamedTombstones {
    std::unordered_map<uint64_t, int64_t> by_holder;
    // The sum of the positive counts in by_holder: what dies with the segment. The
    // cleaner asks it of every candidate of every combined pass, so it is kept, not
    // summed.
    uint64_t dying = 0;
  };
  std::unordered_map<uint64_t, NamedTombstones> tombstone_bytes_;
  int64_t tombstone_bytes_total_ = 0;  // the sum of tombstone_bytes_
  std::unique_ptr<Log> log_;
  std::unique_ptr<RpcResults> rpc_results_;  // releases into log_: destroyed before it
  std::atomic<uint64_t> rpc_expire_at_ns_{0};
  std::unique_ptr<LogCleaner> cleaner_;
};

}  // namespace ramkv::master

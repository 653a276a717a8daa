#include "master/object_manager.h"

#include <algorithm>
#include <cstring>

#include "common/checksum.h"
#include "common/log.h"

namespace ramkv::master {

Status check_reject_rules(const RejectRules* rules, uint64_t version) {
  if (rules == nullptr) return Status::kOk;
  if (version == 0) return rules->doesnt_exist ? Status::kObjectNotFound : Status::kOk;
  if (rules->exists) return Status::kObjectExists;
  if (rules->version_le_given && version <= rules->given_version) return Status::kWrongVersion;
  if (rules->version_ne_given && version != rules->given_version) return Status::kWrongVersion;
  return Status::kOk;
}

Result<std::unique_ptr<ObjectManager>> ObjectManager::create(MasterConfig config,
                                                             const Clock& clock) {
  if (Status s = config.finalize(); s != Status::kOk) return s;
  std::unique_ptr<ObjectManager> om(new ObjectManager(config, clock));
  auto log = Log::create(om->config_, clock, om.get());
  if (!log.ok()) return log.status();
  om->log_ = std::move(log).value();
  Log* raw_log = om->log_.get();
  om->rpc_results_ = std::make_unique<RpcResults>([raw_log](LogRef ref, uint32_t bytes) {
    raw_log->resolve(ref).first->sub_live_bytes(bytes);
  });
  om->cleaner_ = std::make_unique<LogCleaner>(*om->log_, *om, clock);
  if (om->config_.cleaner_thread) om->cleaner_->start();
  return om;
}

ObjectManager::ObjectManager(const MasterConfig& config, const Clock& clock)
    : config_(config),
      clock_(clock),
      hash_table_(std::max<uint64_t>(1, config.hash_table_bytes / 64)),
      stripes_(config.lock_stripes) {}

ObjectManager::~ObjectManager() {
  if (cleaner_) cleaner_->stop();
}

Status ObjectManager::check_sizes(std::string_view key, std::string_view value) const {
  if (key.size() > config_.max_key_bytes) return Status::kKeyTooLarge;
  if (value.size() > config_.max_value_bytes) return Status::kValueTooLarge;
  return Status::kOk;
}

ObjectManager::Found ObjectManager::lookup(uint64_t hash, uint64_t table_id, std::string_view key,
                                           std::string* scratch) {
  Found found;
  found.slot = hash_table_.find(hash, [&](LogRef ref) {
    auto [seg, offset] = log_->resolve(ref);
    Segment::Entry e = seg->entry_at(offset, scratch);
    auto obj = decode_object(e.payload);
    RAMKV_CHECK(obj.ok());  // written by this process
    if (obj->table_id != table_id || obj->key != key) return false;
    found.segment = seg;
    found.entry_bytes = e.header.total_bytes();
    found.object = *obj;
    return true;
  });
  return found;
}

void ObjectManager::account(uint64_t table_id, int64_t objects, int64_t entry_bytes,
                            int64_t user_bytes) {
  std::lock_guard lock(stats_mutex_);
  TableStat& t = table_stats_[table_id];
  t.table_id = table_id;
  t.object_count = static_cast<uint64_t>(static_cast<int64_t>(t.object_count) + objects);
  t.object_bytes = static_cast<uint64_t>(static_cast<int64_t>(t.object_bytes) + entry_bytes);
  if (t.object_count == 0) table_stats_.erase(table_id);
  object_count_ = static_cast<uint64_t>(static_cast<int64_t>(object_count_) + objects);
  user_bytes_ = static_cast<uint64_t>(static_cast<int64_t>(user_bytes_) + user_bytes);
}

template <typename Op>
auto ObjectManager::with_memory_retry(EntryType type, Op&& op) -> decltype(op()) {
  uint64_t deadline = 0;  // set at the first kRetry: the fast path reads no clock
  while (true) {
    auto r = op();
    if (r.status() != Status::kRetry) return r;
    uint64_t now = clock_.now_ns();
    if (deadline == 0) deadline = now + config_.write_wait_for_cleaner_ns;
    if (now >= deadline) return r;
    Status s = log_->wait_for_memory(deadline - now, type);
    if (s != Status::kOk) return s;
  }
}

Result<uint64_t> ObjectManager::read(uint64_t table_id, std::string_view key, std::string* value,
                                     const RejectRules* rules) {
  if (key.size() > config_.max_key_bytes) return Status::kKeyTooLarge;
  thread_local std::string scratch;
  uint64_t hash = key_hash(table_id, key);
  std::lock_guard lock(stripe_for(hash));
  Found f = lookup(hash, table_id, key, &scratch);
  uint64_t version = f.slot ? f.object.version : 0;
  if (Status s = check_reject_rules(rules, version); s != Status::kOk) return s;
  if (!f.slot) return Status::kObjectNotFound;
  value->assign(f.object.value);
  return version;
}

Result<uint64_t> ObjectManager::write_locked(uint64_t hash, uint64_t table_id, std::string_view key,
                                             std::string_view value, Found& found, const RpcId* rpc,
                                             uint64_t result_value) {
  uint64_t version = next_version_.fetch_add(1);
  uint32_t timestamp = clock_.unix_seconds();
  std::byte prefix[kMaxObjectPrefixBytes];
  uint32_t prefix_bytes =
      encode_object_prefix(table_id, version, timestamp, static_cast<uint32_t>(key.size()), prefix);
  std::span<const std::byte> pieces[] = {{prefix, prefix_bytes}, as_bytes(key), as_bytes(value)};
  RecordToAppend record;
  const bool tracked =
      start_record(rpc, table_id, hash,
                   {.status = Status::kOk, .version = version, .value = result_value}, &record);
  auto appended =
      append_object_locked(table_id, key, timestamp, pieces, found, tracked ? &record : nullptr);
  if (!appended.ok()) return appended.status();
  account(table_id, install_locked(hash, *appended, key.size() + value.size(), found));
  if (tracked) keep_record(record);
  return version;
}

Result<Log::Appended> ObjectManager::append_object_locked(
    uint64_t table_id, std::string_view key, uint32_t timestamp,
    std::span<const std::span<const std::byte>> object_pieces, const Found& found,
    RecordToAppend* record, std::optional<uint32_t> object_checksum) {
  Log::EntryToAppend entries[3] = {{.type = EntryType::kObject,
                                    .pieces = object_pieces,
                                    .live = true,
                                    .checksum = object_checksum}};
  size_t count = 1;
  // The superseded object stays in its segment's replicas. Without a tombstone, a
  // recovery that no longer finds the new object (removed later, and its segment and the
  // remove's tombstone cleaned) would bring the old one back (docs/log-format.md,
  // "Overwrites"). The object goes first: a replica holding a prefix of the segment that
  // ends between the two still has the newer object, which wins.
  std::byte prefix[kMaxTombstonePrefixBytes];
  std::span<const std::byte> tombstone_pieces[1 + 1];
  if (found.slot) {
    uint32_t prefix_bytes = encode_tombstone_prefix(table_id, found.object.version,
                                                    found.segment->id(), timestamp, prefix);
    tombstone_pieces[0] = {prefix, prefix_bytes};
    tombstone_pieces[1] = as_bytes(key);
    entries[count++] = {
        .type = EntryType::kTombstone, .pieces = tombstone_pieces, .live = true, .checksum = {}};
  }
  // The completion record goes last: a replica that has it has what it reports.
  if (record != nullptr) entries[count++] = record->entry();
  Log::Appended appended[3];
  if (count == 1) {
    auto one = log_->append(EntryType::kObject, object_pieces, /*live=*/true, object_checksum);
    if (!one.ok()) return one.status();
    return *one;
  }
  if (Status s = log_->append_all({entries, count}, {appended, count}); s != Status::kOk) {
    return s;
  }
  if (found.slot) {
    count_tombstone(found.segment->id(), appended[1].segment_id, appended[1].entry_bytes);
  }
  if (record != nullptr) record->appended = appended[count - 1];
  return appended[0];
}

// ---- Exactly-once bookkeeping (rpc_results.h) -------------------------------------------

bool ObjectManager::start_record(const RpcId* rpc, uint64_t table_id, uint64_t hash,
                                 const RpcOutcome& outcome, RecordToAppend* out) {
  if (rpc == nullptr || !rpc->tracked()) return false;
  out->rpc = rpc;
  out->outcome = outcome;
  uint32_t bytes = encode_rpc_result({.table_id = table_id,
                                      .key_hash = hash,
                                      .client_id = rpc->client_id,
                                      .rpc_seq = rpc->seq,
                                      .ack_seq = rpc->ack,
                                      .status = static_cast<uint32_t>(outcome.status),
                                      .version = outcome.version,
                                      .value = outcome.value},
                                     out->payload);
  out->piece[0] = {out->payload, bytes};
  return true;
}

void ObjectManager::keep_record(const RecordToAppend& r) {
  rpc_results_->record(*r.rpc, r.outcome, r.appended.ref, r.appended.entry_bytes, clock_.now_ns());
}

RpcResults::Check ObjectManager::check_rpc(const RpcId* rpc, RpcOutcome* done) {
  if (rpc == nullptr || !rpc->tracked()) return RpcResults::Check::kNew;
  return rpc_results_->check(*rpc, clock_.now_ns(), done);
}

Status ObjectManager::record_alone(const RpcId* rpc, uint64_t table_id, uint64_t hash,
                                   const RpcOutcome& outcome) {
  RecordToAppend r;
  if (!start_record(rpc, table_id, hash, outcome, &r)) return Status::kOk;
  auto appended = log_->append(EntryType::kRpcResult, r.piece, /*live=*/true);
  if (!appended.ok()) return appended.status();
  r.appended = *appended;
  keep_record(r);
  return Status::kOk;
}

void ObjectManager::maybe_expire_rpc_results() {
  const uint64_t now = clock_.now_ns();
  uint64_t due = rpc_expire_at_ns_.load(std::memory_order_relaxed);
  if (now < due) return;
  // A sweep every 1/60 of the expiry time, by whichever request finds it due first.
  const uint64_t next = now + std::max<uint64_t>(1, config_.rpc_result_ttl_ns / 60);
  if (!rpc_expire_at_ns_.compare_exchange_strong(due, next)) return;
  if (due == 0) return;  // the first request only sets the schedule
  if (uint64_t n = rpc_results_->expire(now, config_.rpc_result_ttl_ns); n > 0) {
    LOG_INFO("dropped the completion records of {} clients silent for {} s", n,
             config_.rpc_result_ttl_ns / 1'000'000'000);
  }
}

void ObjectManager::count_tombstone(uint64_t named, uint64_t holder, int64_t bytes) {
  std::lock_guard lock(tombstones_mutex_);
  auto it = tombstone_bytes_.find(named);
  if (it == tombstone_bytes_.end()) {
    // Nothing to take back once the named segment has left the log (ids are not reused).
    if (bytes < 0) return;
    it = tombstone_bytes_.emplace(named, NamedTombstones{}).first;
  }
  NamedTombstones& entry = it->second;
  int64_t& held = entry.by_holder[holder];
  const int64_t before = held;
  held += bytes;
  tombstone_bytes_total_ += bytes;
  entry.dying = entry.dying + static_cast<uint64_t>(std::max<int64_t>(held, 0)) -
                static_cast<uint64_t>(std::max<int64_t>(before, 0));
  if (held == 0) entry.by_holder.erase(holder);
  if (entry.by_holder.empty()) tombstone_bytes_.erase(it);
}

uint64_t ObjectManager::tombstone_bytes() const {
  std::lock_guard lock(tombstones_mutex_);
  return tombstone_bytes_total_ > 0 ? static_cast<uint64_t>(tombstone_bytes_total_) : 0;
}

uint64_t ObjectManager::tombstone_bytes_naming(uint64_t segment_id) const {
  std::lock_guard lock(tombstones_mutex_);
  auto it = tombstone_bytes_.find(segment_id);
  return it == tombstone_bytes_.end() ? 0 : it->second.dying;
}

uint64_t ObjectManager::segments_left_log(std::span<const uint64_t> segment_ids) {
  uint64_t died = 0;
  std::lock_guard lock(tombstones_mutex_);
  for (uint64_t id : segment_ids) {
    auto it = tombstone_bytes_.find(id);
    if (it == tombstone_bytes_.end()) continue;
    for (const auto& [holder, held] : it->second.by_holder) {
      tombstone_bytes_total_ -= held;
      // A holder that left the log took its tombstones with it; a negative count is a
      // holder that a partial combined pass left behind, whose copies count elsewhere.
      Segment* segment = held > 0 ? log_->find_segment(holder) : nullptr;
      if (segment == nullptr) continue;
      const auto bytes = static_cast<uint64_t>(held);
      RAMKV_CHECK(bytes <= segment->live_bytes());
      segment->sub_live_bytes(bytes);
      died += bytes;
    }
    tombstone_bytes_.erase(it);
  }
  return died;
}

ObjectManager::StatsDelta ObjectManager::install_locked(uint64_t hash,
                                                        const Log::Appended& appended,
                                                        uint64_t user_bytes, const Found& found) {
  auto user = static_cast<int64_t>(user_bytes);
  if (found.slot) {
    found.segment->sub_live_bytes(found.entry_bytes);
    found.slot.set_ref(appended.ref);
    return {.objects = 0,
            .entry_bytes = int64_t{appended.entry_bytes} - found.entry_bytes,
            .user_bytes =
                user - static_cast<int64_t>(found.object.key.size() + found.object.value.size())};
  }
  hash_table_.insert(hash, appended.ref);
  return {.objects = 1, .entry_bytes = appended.entry_bytes, .user_bytes = user};
}

Result<uint64_t> ObjectManager::write(uint64_t table_id, std::string_view key,
                                      std::string_view value, const RejectRules* rules,
                                      const RpcId* rpc) {
  if (Status s = check_sizes(key, value); s != Status::kOk) return s;
  maybe_expire_rpc_results();
  uint64_t hash = key_hash(table_id, key);
  return with_memory_retry(EntryType::kObject, [&]() -> Result<uint64_t> {
    thread_local std::string scratch;
    std::lock_guard lock(stripe_for(hash));
    RpcOutcome done;
    if (auto c = check_rpc(rpc, &done); c != RpcResults::Check::kNew) {
      if (c == RpcResults::Check::kStale) return Status::kStaleRpc;
      if (done.status != Status::kOk) return done.status;
      return done.version;
    }
    Found f = lookup(hash, table_id, key, &scratch);
    if (Status s = check_reject_rules(rules, f.slot ? f.object.version : 0); s != Status::kOk) {
      if (Status r = record_alone(rpc, table_id, hash, {.status = s}); r != Status::kOk) return r;
      return s;
    }
    return write_locked(hash, table_id, key, value, f, rpc);
  });
}

Result<uint64_t> ObjectManager::remove(uint64_t table_id, std::string_view key,
                                       const RejectRules* rules, const RpcId* rpc) {
  if (key.size() > config_.max_key_bytes) return Status::kKeyTooLarge;
  maybe_expire_rpc_results();
  uint64_t hash = key_hash(table_id, key);
  return with_memory_retry(EntryType::kTombstone, [&]() -> Result<uint64_t> {
    thread_local std::string scratch;
    std::lock_guard lock(stripe_for(hash));
    RpcOutcome done;
    if (auto c = check_rpc(rpc, &done); c != RpcResults::Check::kNew) {
      if (c == RpcResults::Check::kStale) return Status::kStaleRpc;
      if (done.status != Status::kOk) return done.status;
      return done.version;
    }
    Found f = lookup(hash, table_id, key, &scratch);
    uint64_t version = f.slot ? f.object.version : 0;
    if (Status s = check_reject_rules(rules, version); s != Status::kOk) {
      if (Status r = record_alone(rpc, table_id, hash, {.status = s}); r != Status::kOk) return r;
      return s;
    }
    if (!f.slot) {
      if (Status r = record_alone(rpc, table_id, hash, {}); r != Status::kOk) return r;
      return uint64_t{0};
    }
    // The tombstone keeps the object dead at recovery for as long as the segment that
    // holds the object is in the log.
    std::byte prefix[kMaxTombstonePrefixBytes];
    uint32_t prefix_bytes =
        encode_tombstone_prefix(table_id, version, f.segment->id(), clock_.unix_seconds(), prefix);
    std::span<const std::byte> pieces[] = {{prefix, prefix_bytes}, as_bytes(key)};
    RecordToAppend record;
    const bool tracked = start_record(rpc, table_id, hash, {.version = version}, &record);
    Log::EntryToAppend entries[2] = {
        {.type = EntryType::kTombstone, .pieces = pieces, .live = true, .checksum = {}}};
    if (tracked) entries[1] = record.entry();
    const size_t count = tracked ? 2 : 1;
    Log::Appended appended[2];
    if (Status s = log_->append_all({entries, count}, {appended, count}); s != Status::kOk) {
      return s;
    }
    count_tombstone(f.segment->id(), appended[0].segment_id, appended[0].entry_bytes);
    f.segment->sub_live_bytes(f.entry_bytes);
    hash_table_.erase(f.slot);
    account(table_id, -1, -int64_t{f.entry_bytes},
            -static_cast<int64_t>(key.size() + f.object.value.size()));
    if (tracked) {
      record.appended = appended[1];
      keep_record(record);
    }
    return version;
  });
}

Result<ObjectManager::Incremented> ObjectManager::increment(uint64_t table_id, std::string_view key,
                                                            int64_t delta, const RejectRules* rules,
                                                            const RpcId* rpc) {
  if (key.size() > config_.max_key_bytes) return Status::kKeyTooLarge;
  maybe_expire_rpc_results();
  uint64_t hash = key_hash(table_id, key);
  return with_memory_retry(EntryType::kObject, [&]() -> Result<Incremented> {
    thread_local std::string scratch;
    std::lock_guard lock(stripe_for(hash));
    RpcOutcome done;
    if (auto c = check_rpc(rpc, &done); c != RpcResults::Check::kNew) {
      if (c == RpcResults::Check::kStale) return Status::kStaleRpc;
      if (done.status != Status::kOk) return done.status;
      return Incremented{static_cast<int64_t>(done.value), done.version};
    }
    Found f = lookup(hash, table_id, key, &scratch);
    if (Status s = check_reject_rules(rules, f.slot ? f.object.version : 0); s != Status::kOk) {
      if (Status r = record_alone(rpc, table_id, hash, {.status = s}); r != Status::kOk) return r;
      return s;
    }
    int64_t current = 0;
    if (f.slot) {
      if (f.object.value.size() != sizeof(int64_t)) {
        Status s = Status::kInvalidObject;
        if (Status r = record_alone(rpc, table_id, hash, {.status = s}); r != Status::kOk) return r;
        return s;
      }
      std::memcpy(&current, f.object.value.data(), sizeof(current));
    }
    // Two's-complement wrap-around, as RAMCloud and Redis (INCRBY errors instead).
    auto next = static_cast<int64_t>(static_cast<uint64_t>(current) + static_cast<uint64_t>(delta));
    char buf[sizeof(next)];
    std::memcpy(buf, &next, sizeof(next));
    auto version =
        write_locked(hash, table_id, key, {buf, sizeof(buf)}, f, rpc, static_cast<uint64_t>(next));
    if (!version.ok()) return version.status();
    return Incremented{next, *version};
  });
}

Result<uint64_t> ObjectManager::enumerate(uint64_t table_id, uint64_t hash_begin, uint64_t hash_end,
                                          uint64_t cursor, size_t max_objects,
                                          std::vector<Object>* out, bool values) {
  if (cursor > end_cursor() || hash_begin > hash_end) return Status::kBadRequest;
  cursor = std::max(cursor, hash_table_.bucket_of(hash_begin));
  const uint64_t last = hash_table_.bucket_of(hash_end);
  const bool whole_table = hash_begin == 0 && hash_end == UINT64_MAX;
  std::string scratch;
  size_t added = 0;
  while (cursor <= last && cursor < end_cursor() && (added < max_objects || max_objects == 0)) {
    std::lock_guard lock(stripes_[cursor % stripes_.size()].mutex);
    hash_table_.for_each_in_bucket(cursor, [&](LogRef ref) {
      auto [seg, offset] = log_->resolve(ref);
      auto obj = decode_object(seg->entry_at(offset, &scratch).payload);
      RAMKV_CHECK(obj.ok());
      if (obj->table_id != table_id) return;
      if (!whole_table) {
        uint64_t h = key_hash(table_id, obj->key);
        if (h < hash_begin || h > hash_end) return;
      }
      out->push_back(
          {std::string(obj->key), values ? std::string(obj->value) : std::string(), obj->version});
      ++added;
    });
    ++cursor;
    if (max_objects == 0) break;
  }
  return cursor > last ? end_cursor() : cursor;
}

Result<uint64_t> ObjectManager::remove_range(uint64_t table_id, uint64_t hash_begin,
                                             uint64_t hash_end) {
  uint64_t removed = 0;
  uint64_t cursor = 0;
  while (cursor != end_cursor()) {
    auto step = remove_range_step(table_id, hash_begin, hash_end, &cursor, SIZE_MAX);
    if (!step.ok()) return step.status();
    removed += *step;
  }
  return removed;
}

Result<uint64_t> ObjectManager::remove_range_step(uint64_t table_id, uint64_t hash_begin,
                                                  uint64_t hash_end, uint64_t* cursor,
                                                  size_t max_objects) {
  uint64_t removed = 0;
  // The buckets walked count too: every table's keys share the buckets, so a small table
  // on a large master has few objects in many of them.
  const size_t max_buckets = max_objects > SIZE_MAX / 16 ? SIZE_MAX : max_objects * 16;
  std::vector<Object> batch;
  for (size_t buckets = 0; *cursor != end_cursor() && removed < max_objects &&
                           buckets < std::max<size_t>(max_buckets, 1);
       ++buckets) {
    batch.clear();
    // A bucket; the values are not needed to remove them.
    auto next = enumerate(table_id, hash_begin, hash_end, *cursor, 0, &batch, /*values=*/false);
    if (!next.ok()) return next.status();
    for (const auto& o : batch) {
      auto r = remove(table_id, o.key);
      if (!r.ok()) return r.status();  // the cursor stays: the bucket is walked again
      ++removed;
    }
    *cursor = *next;
  }
  return removed;
}

std::vector<TableStat> ObjectManager::table_stats() const {
  std::lock_guard lock(stats_mutex_);
  std::vector<TableStat> out;
  out.reserve(table_stats_.size());
  for (const auto& [id, t] : table_stats_) out.push_back(t);
  return out;
}

ObjectManagerStats ObjectManager::stats() const {
  ObjectManagerStats s;
  {
    std::lock_guard lock(stats_mutex_);
    s.object_count = object_count_;
    s.user_bytes = user_bytes_;
  }
  s.hash_table_bytes = hash_table_.memory_bytes();
  s.hash_overflow_buckets = hash_table_.overflow_bucket_count();
  s.tombstone_bytes = tombstone_bytes();
  s.rpc_results = rpc_results_->stats();
  s.log = log_->stats();
  s.cleaner = cleaner_->stats();
  return s;
}

void ObjectManager::prefetch(const Segment::Entry& entry) {
  if (entry.header.type != EntryType::kObject) return;
  auto obj = decode_object(entry.payload);
  if (obj.ok()) hash_table_.prefetch(key_hash(obj->table_id, obj->key));
}

Status ObjectManager::relocate(const Segment& victim, uint32_t offset, const Segment::Entry& entry,
                               EntryRelocator& to) {
  thread_local std::string scratch;
  switch (entry.header.type) {
    case EntryType::kObject: {
      auto obj = decode_object(entry.payload);
      RAMKV_CHECK(obj.ok());
      uint64_t hash = key_hash(obj->table_id, obj->key);
      LogRef old_ref = victim.arena_offset(offset);
      std::lock_guard lock(stripe_for(hash));
      auto slot = hash_table_.find(hash, [&](LogRef ref) { return ref == old_ref; });
      if (!slot) return Status::kOk;  // overwritten or removed: dead
      auto raw = victim.raw_entry_at(offset, entry.header.total_bytes(), &scratch);
      auto new_ref = to.append(raw, entry.header.header_bytes);
      if (!new_ref.ok()) return new_ref.status();
      slot.set_ref(*new_ref);
      return Status::kOk;
    }
    case EntryType::kTombstone: {
      auto t = decode_tombstone(entry.payload);
      RAMKV_CHECK(t.ok());
      // Needed while the removed object's segment may still be replayed at recovery: not
      // once that segment leaves the log, nor when it leaves with this entry's victim
      // (whose count goes with it in segments_left_log).
      if (!to.tombstone_needed(t->segment_id)) return Status::kOk;
      // The key's stripe orders the move with the append that counted the tombstone.
      std::lock_guard lock(stripe_for(key_hash(t->table_id, t->key)));
      auto raw = victim.raw_entry_at(offset, entry.header.total_bytes(), &scratch);
      auto new_ref = to.append(raw, entry.header.header_bytes);
      if (!new_ref.ok()) return new_ref.status();
      if (uint64_t holder = log_->resolve(*new_ref).first->id(); holder != victim.id()) {
        const auto bytes = static_cast<int64_t>(entry.header.total_bytes());
        count_tombstone(t->segment_id, victim.id(), -bytes);
        count_tombstone(t->segment_id, holder, bytes);
      }
      return Status::kOk;
    }
    case EntryType::kRpcResult: {
      auto r = decode_rpc_result(entry.payload);
      RAMKV_CHECK(r.ok());
      // Needed while its client has not acknowledged it (rpc_results.h); the key's stripe
      // orders the move with the append that recorded it.
      std::lock_guard lock(stripe_for(r->key_hash));
      return rpc_results_->relocate(
          r->client_id, r->rpc_seq, victim.arena_offset(offset), [&]() -> Result<LogRef> {
            auto raw = victim.raw_entry_at(offset, entry.header.total_bytes(), &scratch);
            return to.append(raw, entry.header.header_bytes);
          });
    }
    default:
      // Headers, digests, safe versions and table stats are rewritten in every head.
      return Status::kOk;
  }
}

// ---- Recovery: replay (docs/recovery.md, step 5) ----------------------------------------

namespace {

// The next entry of a replay stream, checked. Bytes from a backup never reach an
// assertion: whatever cannot be a whole, intact entry is kCorrupt.
struct StreamEntry {
  EntryHeader header;
  std::span<const std::byte> payload;
};
Result<StreamEntry> next_stream_entry(std::span<const std::byte> rest) {
  auto h = decode_entry_header(rest);
  // A zero tag is unwritten space, which a concatenation of whole entries never holds.
  if (!h.ok() || h->type == EntryType::kInvalid) return Status::kCorrupt;
  if (uint64_t{h->header_bytes} + h->payload_bytes > rest.size()) return Status::kCorrupt;
  auto payload = rest.subspan(h->header_bytes, h->payload_bytes);
  if (entry_checksum(h->type, payload) != h->checksum) return Status::kCorrupt;
  return StreamEntry{*h, payload};
}

}  // namespace

Status ObjectManager::replay(std::span<const std::byte> entries,
                             const std::function<bool(uint64_t, uint64_t)>& accept,
                             ReplayStats* stats) {
  const std::span<const std::byte> one[] = {entries};
  return replay(std::span<const std::span<const std::byte>>(one), accept, stats);
}

Status ObjectManager::replay(std::span<const std::span<const std::byte>> pieces,
                             const std::function<bool(uint64_t, uint64_t)>& accept,
                             ReplayStats* stats) {
  ReplayProgress progress;
  Status status = Status::kOk;
  // Entries go in batches: each batch's entries are checked and their hash-table buckets
  // prefetched first, then replayed, so that the bucket misses (a recovery master's table
  // is sized for its memory, far past the caches) overlap instead of stalling one by one.
  constexpr size_t kBatch = 8;
  StreamEntry batch[kBatch];
  for (const std::span<const std::byte> entries : pieces) {
    for (size_t offset = 0; offset < entries.size() && status == Status::kOk;) {
      size_t n = 0;
      for (size_t at = offset; n < kBatch && at < entries.size(); ++n) {
        auto e = next_stream_entry(entries.subspan(at));
        if (!e.ok()) {
          status = e.status();  // after the entries before it are replayed
          break;
        }
        batch[n] = *e;
        at += e->header.total_bytes();
        if (e->header.type == EntryType::kObject) {
          if (auto o = decode_object(e->payload); o.ok()) {
            hash_table_.prefetch(key_hash(o->table_id, o->key));
          }
        } else if (e->header.type == EntryType::kTombstone) {
          if (auto t = decode_tombstone(e->payload); t.ok()) {
            hash_table_.prefetch(key_hash(t->table_id, t->key));
          }
        }
      }
      for (size_t i = 0; i < n; ++i) {
        const Status s = replay_entry(batch[i].header.type, batch[i].payload,
                                      batch[i].header.checksum, accept, &progress);
        if (s != Status::kOk) {
          status = s;
          break;
        }
        ++progress.stats.entries;
        progress.stats.bytes += batch[i].header.total_bytes();
        offset += batch[i].header.total_bytes();
      }
      if (n == 0) break;
    }
    if (status != Status::kOk) break;
  }
  for (const auto& [table_id, delta] : progress.table_deltas) account(table_id, delta);
  // Versions only grow per key across remove and re-create (log-format.md, rule 4): new
  // writes must come above whatever was replayed, even before finish_replay().
  if (progress.max_version != 0) raise_next_version(progress.max_version + 1);
  if (stats != nullptr) {
    const ReplayStats& done = progress.stats;
    stats->entries += done.entries;
    stats->objects += done.objects;
    stats->tombstones += done.tombstones;
    stats->skipped += done.skipped;
    stats->obsolete += done.obsolete;
    stats->bytes += done.bytes;
    stats->rpc_results += done.rpc_results;
  }
  return status;
}

void ObjectManager::ReplayProgress::add(uint64_t table_id, const StatsDelta& delta) {
  auto it = std::find_if(table_deltas.begin(), table_deltas.end(),
                         [&](const auto& t) { return t.first == table_id; });
  if (it == table_deltas.end()) it = table_deltas.insert(table_deltas.end(), {table_id, {}});
  it->second.objects += delta.objects;
  it->second.entry_bytes += delta.entry_bytes;
  it->second.user_bytes += delta.user_bytes;
}

Status ObjectManager::replay_entry(EntryType type, std::span<const std::byte> payload,
                                   uint32_t checksum,
                                   const std::function<bool(uint64_t, uint64_t)>& accept,
                                   ReplayProgress* progress) {
  ReplayStats& done = progress->stats;
  Result<bool> applied = true;
  if (type == EntryType::kObject) {
    auto object = decode_object(payload);
    if (!object.ok()) return Status::kCorrupt;
    uint64_t hash = key_hash(object->table_id, object->key);
    if (!accept(object->table_id, hash)) {
      ++done.skipped;
      return Status::kOk;
    }
    progress->max_version = std::max(progress->max_version, object->version);
    applied = replay_object(hash, *object, payload, checksum, progress);
    if (applied.ok()) ++done.objects;
  } else if (type == EntryType::kTombstone) {
    auto tombstone = decode_tombstone(payload);
    if (!tombstone.ok()) return Status::kCorrupt;
    uint64_t hash = key_hash(tombstone->table_id, tombstone->key);
    if (!accept(tombstone->table_id, hash)) {
      ++done.skipped;
      return Status::kOk;
    }
    progress->max_version = std::max(progress->max_version, tombstone->version);
    applied = replay_tombstone(hash, *tombstone, progress);
    if (applied.ok()) ++done.tombstones;
  } else if (type == EntryType::kRpcResult) {
    auto record = decode_rpc_result(payload);
    if (!record.ok()) return Status::kCorrupt;
    if (!accept(record->table_id, record->key_hash)) {
      ++done.skipped;
      return Status::kOk;
    }
    applied = replay_rpc_result(*record, payload);
    if (applied.ok() && *applied) ++done.rpc_results;
  }
  // Other entries (segment header, digest, safe version, table stats) describe the
  // crashed master's log, not its data; the coordinator has what recovery needs of them.
  if (!applied.ok()) return applied.status();
  if (!*applied) ++done.obsolete;
  return Status::kOk;
}

Result<bool> ObjectManager::replay_object(uint64_t hash, const ObjectView& object,
                                          std::span<const std::byte> payload, uint32_t checksum,
                                          ReplayProgress* progress) {
  if (Status s = check_sizes(object.key, object.value); s != Status::kOk) return s;
  return with_memory_retry(EntryType::kObject, [&]() -> Result<bool> {
    thread_local std::string scratch;
    Stripe& stripe = stripe_of(hash);
    std::lock_guard lock(stripe.mutex);
    Found f = lookup(hash, object.table_id, object.key, &scratch);
    auto marker = stripe.markers.end();
    if (f.slot) {
      if (f.object.version >= object.version) return false;
    } else {
      marker = find_marker(stripe, hash, object.table_id, object.key);
      if (marker != stripe.markers.end() && marker->second.version >= object.version) {
        return false;
      }
    }
    // The payload goes in unchanged: the object keeps its version and timestamp, and its
    // entry the checksum replay checked (not computed again). An object it supersedes
    // here gets a tombstone, as an overwrite's does: this log's own segments are what a
    // recovery of this master will replay.
    std::span<const std::byte> pieces[] = {payload};
    auto appended = append_object_locked(object.table_id, object.key, object.timestamp, pieces, f,
                                         /*record=*/nullptr, checksum);
    if (!appended.ok()) return appended.status();
    if (marker != stripe.markers.end()) {
      stripe.markers.erase(marker);
      marker_count_.fetch_sub(1, std::memory_order_relaxed);
    }
    progress->add(object.table_id,
                  install_locked(hash, *appended, object.key.size() + object.value.size(), f));
    return true;
  });
}

Result<bool> ObjectManager::replay_tombstone(uint64_t hash, const TombstoneView& tombstone,
                                             ReplayProgress* progress) {
  return with_memory_retry(EntryType::kTombstone, [&]() -> Result<bool> {
    thread_local std::string scratch;
    Stripe& stripe = stripe_of(hash);
    std::lock_guard lock(stripe.mutex);
    Found f = lookup(hash, tombstone.table_id, tombstone.key, &scratch);
    if (f.slot) {
      if (f.object.version > tombstone.version) return false;
      // The object was replayed into this log, so this log needs a tombstone for it, or a
      // recovery of this master would bring it back. It names this log's segment that
      // holds the object (the crashed master's segment id means nothing here), so the
      // cleaner keeps it exactly as long as it keeps one written by remove().
      std::byte prefix[kMaxTombstonePrefixBytes];
      uint32_t prefix_bytes = encode_tombstone_prefix(tombstone.table_id, tombstone.version,
                                                      f.segment->id(), tombstone.timestamp, prefix);
      std::span<const std::byte> pieces[] = {{prefix, prefix_bytes}, as_bytes(tombstone.key)};
      auto appended = log_->append(EntryType::kTombstone, pieces, /*live=*/true);
      if (!appended.ok()) return appended.status();
      count_tombstone(f.segment->id(), appended->segment_id, appended->entry_bytes);
      f.segment->sub_live_bytes(f.entry_bytes);
      hash_table_.erase(f.slot);
      progress->add(
          tombstone.table_id,
          {.objects = -1,
           .entry_bytes = -int64_t{f.entry_bytes},
           .user_bytes = -static_cast<int64_t>(f.object.key.size() + f.object.value.size())});
    } else if (auto marker = find_marker(stripe, hash, tombstone.table_id, tombstone.key);
               marker != stripe.markers.end()) {
      if (marker->second.version >= tombstone.version) return false;
      marker->second.version = tombstone.version;
      return true;
    }
    // No object of the key is left here. Objects replayed later that the tombstone covers
    // must stay out; with none of them in this log, no log entry is needed for that.
    stripe.markers.emplace(hash, ReplayMarker{.table_id = tombstone.table_id,
                                              .version = tombstone.version,
                                              .key = std::string(tombstone.key)});
    marker_count_.fetch_add(1, std::memory_order_relaxed);
    return true;
  });
}

Result<bool> ObjectManager::replay_rpc_result(const RpcResultView& record,
                                              std::span<const std::byte> payload) {
  return with_memory_retry(EntryType::kObject, [&]() -> Result<bool> {
    std::lock_guard lock(stripe_for(record.key_hash));
    if (!rpc_results_->wanted(record, clock_.now_ns())) return false;
    // Kept as it is (its ack included): a recovery of this master replays it again.
    std::span<const std::byte> pieces[] = {payload};
    auto appended = log_->append(EntryType::kRpcResult, pieces, /*live=*/true);
    if (!appended.ok()) return appended.status();
    rpc_results_->record(
        {.client_id = record.client_id, .seq = record.rpc_seq, .ack = record.ack_seq},
        {.status = static_cast<Status>(record.status),
         .version = record.version,
         .value = record.value},
        appended->ref, appended->entry_bytes, clock_.now_ns());
    return true;
  });
}

ObjectManager::MarkerMap::iterator ObjectManager::find_marker(Stripe& stripe, uint64_t hash,
                                                              uint64_t table_id,
                                                              std::string_view key) {
  if (stripe.markers.empty()) return stripe.markers.end();
  auto [it, end] = stripe.markers.equal_range(hash);
  for (; it != end; ++it) {
    if (it->second.table_id == table_id && it->second.key == key) return it;
  }
  return stripe.markers.end();
}

void ObjectManager::raise_next_version(uint64_t next_version) {
  uint64_t current = next_version_.load();
  while (current < next_version && !next_version_.compare_exchange_weak(current, next_version)) {
  }
}

void ObjectManager::finish_replay(std::span<const TabletRange> tablets, uint64_t safe_version) {
  raise_next_version(safe_version == UINT64_MAX ? safe_version : safe_version + 1);
  if (marker_count_.load(std::memory_order_relaxed) == 0) return;
  auto recovered = [&](uint64_t table_id, uint64_t hash) {
    return std::any_of(tablets.begin(), tablets.end(), [&](const TabletRange& t) {
      return t.table_id == table_id && hash >= t.start_hash && hash <= t.end_hash;
    });
  };
  for (Stripe& stripe : stripes_) {
    std::lock_guard lock(stripe.mutex);
    for (auto it = stripe.markers.begin(); it != stripe.markers.end();) {
      if (recovered(it->second.table_id, it->first)) {
        it = stripe.markers.erase(it);
        marker_count_.fetch_sub(1, std::memory_order_relaxed);
      } else {
        ++it;
      }
    }
  }
}

}  // namespace ramkv::master

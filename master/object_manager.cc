#include "master/object_manager.h"

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
                                             std::string_view value, Found& found) {
  uint64_t version = next_version_.fetch_add(1);
  std::byte prefix[kMaxObjectPrefixBytes];
  uint32_t prefix_bytes = encode_object_prefix(table_id, version, clock_.unix_seconds(),
                                               static_cast<uint32_t>(key.size()), prefix);
  std::span<const std::byte> pieces[] = {{prefix, prefix_bytes}, as_bytes(key), as_bytes(value)};
  auto appended = log_->append(EntryType::kObject, pieces, /*live=*/true);
  if (!appended.ok()) return appended.status();
  int64_t user = static_cast<int64_t>(key.size() + value.size());
  if (found.slot) {
    found.segment->sub_live_bytes(found.entry_bytes);
    found.slot.set_ref(appended->ref);
    account(table_id, 0, int64_t{appended->entry_bytes} - found.entry_bytes,
            user - static_cast<int64_t>(key.size() + found.object.value.size()));
  } else {
    hash_table_.insert(hash, appended->ref);
    account(table_id, 1, appended->entry_bytes, user);
  }
  return version;
}

Result<uint64_t> ObjectManager::write(uint64_t table_id, std::string_view key,
                                      std::string_view value, const RejectRules* rules) {
  if (Status s = check_sizes(key, value); s != Status::kOk) return s;
  uint64_t hash = key_hash(table_id, key);
  return with_memory_retry(EntryType::kObject, [&]() -> Result<uint64_t> {
    thread_local std::string scratch;
    std::lock_guard lock(stripe_for(hash));
    Found f = lookup(hash, table_id, key, &scratch);
    if (Status s = check_reject_rules(rules, f.slot ? f.object.version : 0); s != Status::kOk) {
      return s;
    }
    return write_locked(hash, table_id, key, value, f);
  });
}

Result<uint64_t> ObjectManager::remove(uint64_t table_id, std::string_view key,
                                       const RejectRules* rules) {
  if (key.size() > config_.max_key_bytes) return Status::kKeyTooLarge;
  uint64_t hash = key_hash(table_id, key);
  return with_memory_retry(EntryType::kTombstone, [&]() -> Result<uint64_t> {
    thread_local std::string scratch;
    std::lock_guard lock(stripe_for(hash));
    Found f = lookup(hash, table_id, key, &scratch);
    uint64_t version = f.slot ? f.object.version : 0;
    if (Status s = check_reject_rules(rules, version); s != Status::kOk) return s;
    if (!f.slot) return uint64_t{0};
    // The tombstone keeps the object dead at recovery for as long as the segment that
    // holds the object is in the log.
    std::byte prefix[kMaxTombstonePrefixBytes];
    uint32_t prefix_bytes =
        encode_tombstone_prefix(table_id, version, f.segment->id(), clock_.unix_seconds(), prefix);
    std::span<const std::byte> pieces[] = {{prefix, prefix_bytes}, as_bytes(key)};
    auto appended = log_->append(EntryType::kTombstone, pieces, /*live=*/true);
    if (!appended.ok()) return appended.status();
    f.segment->sub_live_bytes(f.entry_bytes);
    hash_table_.erase(f.slot);
    account(table_id, -1, -int64_t{f.entry_bytes},
            -static_cast<int64_t>(key.size() + f.object.value.size()));
    return version;
  });
}

Result<ObjectManager::Incremented> ObjectManager::increment(uint64_t table_id, std::string_view key,
                                                            int64_t delta,
                                                            const RejectRules* rules) {
  if (key.size() > config_.max_key_bytes) return Status::kKeyTooLarge;
  uint64_t hash = key_hash(table_id, key);
  return with_memory_retry(EntryType::kObject, [&]() -> Result<Incremented> {
    thread_local std::string scratch;
    std::lock_guard lock(stripe_for(hash));
    Found f = lookup(hash, table_id, key, &scratch);
    if (Status s = check_reject_rules(rules, f.slot ? f.object.version : 0); s != Status::kOk) {
      return s;
    }
    int64_t current = 0;
    if (f.slot) {
      if (f.object.value.size() != sizeof(int64_t)) return Status::kInvalidObject;
      std::memcpy(&current, f.object.value.data(), sizeof(current));
    }
    // Two's-complement wrap-around, as RAMCloud and Redis (INCRBY errors instead).
    auto next = static_cast<int64_t>(static_cast<uint64_t>(current) + static_cast<uint64_t>(delta));
    char buf[sizeof(next)];
    std::memcpy(buf, &next, sizeof(next));
    auto version = write_locked(hash, table_id, key, {buf, sizeof(buf)}, f);
    if (!version.ok()) return version.status();
    return Incremented{next, *version};
  });
}

Result<uint64_t> ObjectManager::enumerate(uint64_t table_id, uint64_t hash_begin, uint64_t hash_end,
                                          uint64_t cursor, size_t max_objects,
                                          std::vector<Object>* out) {
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
      out->push_back({std::string(obj->key), std::string(obj->value), obj->version});
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
  std::vector<Object> batch;
  while (cursor != end_cursor()) {
    batch.clear();
    auto next = enumerate(table_id, hash_begin, hash_end, cursor, 256, &batch);
    if (!next.ok()) return next.status();
    for (const auto& o : batch) {
      auto r = remove(table_id, o.key);
      if (!r.ok()) return r.status();
      ++removed;
    }
    cursor = *next;
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
      // Needed while the removed object's segment may still be replayed at recovery.
      if (!log_->contains_segment(t->segment_id)) return Status::kOk;
      auto raw = victim.raw_entry_at(offset, entry.header.total_bytes(), &scratch);
      auto new_ref = to.append(raw, entry.header.header_bytes);
      return new_ref.ok() ? Status::kOk : new_ref.status();
    }
    default:
      // Headers, digests, safe versions and table stats are rewritten in every head.
      return Status::kOk;
  }
}

}  // namespace ramkv::master
